/* LD_PRELOAD shim for `make bench-ingest`: DCMTK storescp made durable, the peer PAS is
 * compared with when both keep invariant 1 (durable before success).
 *
 * storescp writes each received object straight to its final name and closes it (fclose)
 * before it sends the C-STORE-RSP. This shim turns that close of a regular file opened for
 * writing into: flush, fsync(file), close, fsync(the file's directory): the file's bytes and
 * its directory entry are on the disk before storescp answers. (PAS flushes once more: its
 * index commit.)
 * Build: cc -shared -fPIC -O2 -o durable_close.so durable_close.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int (*real_close)(int) = NULL;
static int (*real_fclose)(FILE *) = NULL;

/* Whether fd is a regular file open for writing; if so, its path (for its directory). */
static int written_file(int fd, char *path, size_t size) {
    struct stat st;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (flags & O_ACCMODE) == O_RDONLY || fstat(fd, &st) != 0
        || !S_ISREG(st.st_mode))
        return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, size - 1);
    if (n <= 0)
        return 0;
    path[n] = '\0';
    return 1;
}

static int fsync_directory_of(char *path) {
    int dir = open(dirname(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return -1;
    int rc = fsync(dir);
    if (!real_close)
        real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    real_close(dir);
    return rc;
}

int close(int fd) {
    if (!real_close)
        real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    char path[PATH_MAX];
    if (!written_file(fd, path, sizeof path))
        return real_close(fd);
    if (fsync(fd) != 0) {
        real_close(fd);  /* never leave the descriptor open: the caller thinks it is closed */
        return -1;
    }
    int rc = real_close(fd);
    return rc == 0 ? fsync_directory_of(path) : rc;
}

int fclose(FILE *stream) {
    if (!real_fclose)
        real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    char path[PATH_MAX];
    int fd = fileno(stream);
    if (fd < 0 || !written_file(fd, path, sizeof path))
        return real_fclose(stream);
    if (fflush(stream) != 0 || fsync(fd) != 0) {
        real_fclose(stream);  /* the stream is gone either way, as fclose promises */
        return -1;
    }
    int rc = real_fclose(stream);
    return rc == 0 ? fsync_directory_of(path) : rc;
}
