/*
 * PAS WAN link emulator: a userspace shaper between two TUN devices.
 *
 * Why this exists: the kernel on the build machines has no netem qdisc, so a link with rate,
 * delay and loss is emulated in userspace. The shaper creates one TUN device in each of two
 * network namespaces (the "site" end A and the "region" end B), reads IP packets from one and
 * writes them to the other after:
 *   - random loss (probability per packet, both directions),
 *   - a drop-tail queue in front of the bottleneck (bytes; a full queue drops arrivals),
 *   - serialisation at the configured bit rate (each direction has its own line),
 *   - a fixed one-way propagation delay,
 *   - an outage switch (while on, every packet is dropped and the queues are flushed).
 * It counts what it carries, so benchmarks can report the bytes on the wire.
 *
 * It only moves packets between its own two TUN devices: it never opens a socket.
 *
 * Usage: shaper NETNS_A NETNS_B IFNAME RATE_BPS DELAY_US LOSS QUEUE_BYTES SEED
 *   NETNS_* are paths such as /var/run/netns/NAME. Prints "ready" once both TUNs exist.
 * Control (one command a line on stdin, one reply line on stdout):
 *   stats            -> "a2b_in=.. a2b_out=.. a2b_drop_loss=.. a2b_drop_queue=.. a2b_drop_outage=..
 *                        b2a_... first_ns=.. last_ns=.." (bytes, except first/last: CLOCK_MONOTONIC
 *                        ns of the first/last packet A->B accepted since the last reset, 0 if none)
 *   reset            -> zero the counters; "ok"
 *   outage 1|0       -> cut / restore the link; "ok"
 *   set RATE DELAY LOSS QUEUE -> change the link; "ok"
 *   quit             -> exit
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_PKT 65536

typedef struct packet {
    struct packet *next;
    int64_t depart_ns;
    size_t len;
    unsigned char data[];
} packet;

typedef struct {
    int in_fd, out_fd;
    packet *head, *tail;
    int64_t line_free_ns;     /* when the bottleneck finishes serialising what it holds */
    uint64_t in_bytes, out_bytes, drop_loss, drop_queue, drop_outage, in_pkts;
} direction;

static double rate_bps, loss;
static int64_t delay_ns;
static int64_t queue_bytes;
static int outage;
static int64_t first_ns, last_ns;
static uint64_t rng_state;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double uniform(void) { /* xorshift64*: reproducible with the seed */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static int open_tun_in(const char *netns_path, const char *ifname) {
    int ns = open(netns_path, O_RDONLY | O_CLOEXEC);
    if (ns < 0) { perror(netns_path); exit(2); }
    if (setns(ns, CLONE_NEWNET) < 0) { perror("setns"); exit(2); }
    close(ns);
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) { perror("/dev/net/tun"); exit(2); }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF"); exit(2); }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

static void flush(direction *d) {
    while (d->head) {
        packet *p = d->head;
        d->head = p->next;
        d->drop_outage += p->len;
        free(p);
    }
    d->tail = NULL;
    d->line_free_ns = 0;
}

/* Read every packet waiting on the input TUN and schedule it (or drop it). */
static void arrive(direction *d, int is_a2b, unsigned char *buf) {
    for (;;) {
        ssize_t n = read(d->in_fd, buf, MAX_PKT);
        if (n <= 0) return;
        int64_t t = now_ns();
        d->in_bytes += (uint64_t)n;
        d->in_pkts++;
        if (outage) { d->drop_outage += (uint64_t)n; continue; }
        if (loss > 0 && uniform() < loss) { d->drop_loss += (uint64_t)n; continue; }
        int64_t start = d->line_free_ns > t ? d->line_free_ns : t;
        int64_t backlog_bytes = (int64_t)((double)(start - t) * rate_bps / 8e9);
        if (backlog_bytes + n > queue_bytes) { d->drop_queue += (uint64_t)n; continue; }
        int64_t tx_ns = (int64_t)((double)n * 8e9 / rate_bps);
        d->line_free_ns = start + tx_ns;
        packet *p = malloc(sizeof(packet) + (size_t)n);
        if (!p) { d->drop_queue += (uint64_t)n; continue; }
        p->next = NULL;
        p->len = (size_t)n;
        p->depart_ns = d->line_free_ns + delay_ns;
        memcpy(p->data, buf, (size_t)n);
        if (d->tail) d->tail->next = p; else d->head = p;
        d->tail = p;
        if (is_a2b && (buf[0] >> 4) == 4) {  /* IPv4 only: stray IPv6 chatter is no transfer */
            if (!first_ns) first_ns = t;
            last_ns = t;
        }
    }
}

/* Write every packet whose departure time has come. */
static void depart(direction *d, int64_t t) {
    while (d->head && d->head->depart_ns <= t) {
        packet *p = d->head;
        if (write(d->out_fd, p->data, p->len) < 0 && errno == EAGAIN) return;
        d->out_bytes += p->len;
        d->head = p->next;
        if (!d->head) d->tail = NULL;
        free(p);
    }
}

static void print_stats(direction *ab, direction *ba) {
    printf("a2b_in=%llu a2b_out=%llu a2b_pkts=%llu a2b_drop_loss=%llu a2b_drop_queue=%llu "
           "a2b_drop_outage=%llu b2a_in=%llu b2a_out=%llu b2a_pkts=%llu b2a_drop_loss=%llu "
           "b2a_drop_queue=%llu b2a_drop_outage=%llu first_ns=%lld last_ns=%lld now_ns=%lld\n",
           (unsigned long long)ab->in_bytes, (unsigned long long)ab->out_bytes,
           (unsigned long long)ab->in_pkts, (unsigned long long)ab->drop_loss,
           (unsigned long long)ab->drop_queue, (unsigned long long)ab->drop_outage,
           (unsigned long long)ba->in_bytes, (unsigned long long)ba->out_bytes,
           (unsigned long long)ba->in_pkts, (unsigned long long)ba->drop_loss,
           (unsigned long long)ba->drop_queue, (unsigned long long)ba->drop_outage,
           (long long)first_ns, (long long)last_ns, (long long)now_ns());
}

static void reset(direction *d) {
    d->in_bytes = d->out_bytes = d->drop_loss = d->drop_queue = d->drop_outage = d->in_pkts = 0;
}

/* Returns 0 to quit. */
static int command(char *line, direction *ab, direction *ba) {
    if (strncmp(line, "stats", 5) == 0) {
        print_stats(ab, ba);
    } else if (strncmp(line, "reset", 5) == 0) {
        reset(ab); reset(ba); first_ns = last_ns = 0;
        puts("ok");
    } else if (strncmp(line, "outage ", 7) == 0) {
        outage = atoi(line + 7) != 0;
        if (outage) { flush(ab); flush(ba); }
        puts("ok");
    } else if (strncmp(line, "set ", 4) == 0) {
        double r, l; long long d, q;
        if (sscanf(line + 4, "%lf %lld %lf %lld", &r, &d, &l, &q) == 4 && r > 0) {
            rate_bps = r; delay_ns = d * 1000LL; loss = l; queue_bytes = q;
            puts("ok");
        } else {
            puts("error: set RATE_BPS DELAY_US LOSS QUEUE_BYTES");
        }
    } else if (strncmp(line, "quit", 4) == 0) {
        return 0;
    } else {
        puts("error: unknown command");
    }
    fflush(stdout);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s NETNS_A NETNS_B IFNAME RATE_BPS DELAY_US LOSS QUEUE_BYTES SEED\n",
                argv[0]);
        return 2;
    }
    rate_bps = atof(argv[4]);
    delay_ns = atoll(argv[5]) * 1000LL;
    loss = atof(argv[6]);
    queue_bytes = atoll(argv[7]);
    rng_state = (uint64_t)atoll(argv[8]) * 2654435761ULL + 88172645463325252ULL;
    if (rate_bps <= 0 || queue_bytes <= 0) { fprintf(stderr, "rate and queue must be > 0\n"); return 2; }

    direction ab = {0}, ba = {0};
    int fd_a = open_tun_in(argv[1], argv[3]);
    int fd_b = open_tun_in(argv[2], argv[3]);
    ab.in_fd = fd_a; ab.out_fd = fd_b;
    ba.in_fd = fd_b; ba.out_fd = fd_a;
    puts("ready");
    fflush(stdout);

    static unsigned char buf[MAX_PKT];
    char line[256];
    size_t line_len = 0;
    for (;;) {
        int64_t t = now_ns();
        int64_t next = -1;
        if (ab.head) next = ab.head->depart_ns;
        if (ba.head && (next < 0 || ba.head->depart_ns < next)) next = ba.head->depart_ns;
        struct timespec timeout, *tp = NULL;
        if (next >= 0) {
            int64_t wait = next > t ? next - t : 0;
            timeout.tv_sec = wait / 1000000000LL;
            timeout.tv_nsec = wait % 1000000000LL;
            tp = &timeout;
        }
        struct pollfd fds[3] = {{fd_a, POLLIN, 0}, {fd_b, POLLIN, 0}, {0, POLLIN, 0}};
        if (ppoll(fds, 3, tp, NULL) < 0 && errno != EINTR) { perror("ppoll"); return 1; }
        if (fds[0].revents & POLLIN) arrive(&ab, 1, buf);
        if (fds[1].revents & POLLIN) arrive(&ba, 0, buf);
        if (fds[2].revents & (POLLIN | POLLHUP)) {
            ssize_t n = read(0, line + line_len, sizeof line - 1 - line_len);
            if (n <= 0) return 0;  /* the controller went away: the link goes with it */
            line_len += (size_t)n;
            char *nl;
            while ((nl = memchr(line, '\n', line_len))) {
                *nl = 0;
                if (!command(line, &ab, &ba)) return 0;
                size_t used = (size_t)(nl - line) + 1;
                memmove(line, nl + 1, line_len - used);
                line_len -= used;
            }
            if (line_len == sizeof line - 1) line_len = 0;
        }
        t = now_ns();
        depart(&ab, t);
        depart(&ba, t);
    }
}
