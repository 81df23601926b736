"""The spool: received files on disk, exactly as kept, written durably.

Owns: file layout, atomic durable writes, free-space checks, and the room reserved by
temporary copies (never filed: a transcoded copy, an inflated dataset) against the quota and
the free-space floor until their bytes are gone. May not touch: the database
(the caller indexes what :meth:`Spool.write` returns, after it returned).

Files are content-addressed (``ab/<sha256>.dcm``): the same bytes land on the same name, so a
re-sent instance never makes a second copy, and two versions of one SOP Instance UID never
overwrite each other. The 256 fan-out directories are made once, so storing a file never
creates a directory (whose entry would need one more fsync). A write is: temp file in
``tmp/``, fsync, rename into place, fsync the directory. A crash leaves either nothing or a
temp file that start-up removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from appliance.store.index import StoredFile


class SpoolFull(Exception):
    """No room for this file under the configured quota or free-space floor.

    ``comment``: the same in at most 64 characters, for a C-STORE-RSP's Error Comment (an
    LO): the message itself, with its byte counts, was cut there in the middle of a number
    ("... 86456 needed, floor 80"), the floor's value lost."""

    def __init__(self, message: str, comment: str | None = None):
        super().__init__(message)
        self.comment = comment if comment is not None else message


def _mb(count: int) -> str:
    """``76092 MB``: a byte count in the configuration's megabytes (storage.min_free_mb,
    quota_mb: MiB), at most 8 characters (GB from 100,000 MB on), for an Error Comment."""
    value = max(count, 0) / (1 << 20)
    if value >= 99999.5:
        return f"{value / 1024:.0f} GB"
    return f"{value:.0f} MB" if value >= 10 or value == 0 else f"{value:.1f} MB"


class _TempFiles:
    """Empty temp files created ahead, by a thread of their own, while associations wait for
    their next image: creating a file cost 0.2-0.5 ms on the ext4 of the machine this was
    measured on, as much as writing a small image, and up to 1.2 ms of CPU after many files
    were deleted (that file system has no journal, and ext4 without one scans past every
    inode freed in the last minutes at each creation; docs/benchmarks.md). Nothing is
    created before the first write; a crash leaves a few empty ``.part`` files, which
    start-up removes with the other temp files. The thread wakes once per ``REFILL`` files
    taken, not per file: each wake-up takes the GIL from a receiving thread in the middle
    of its image (measured with strace: ~10 futex calls per wake)."""

    AHEAD = 8
    REFILL = 4  # wake the creator when this many have been taken since it last filled up

    def __init__(self, folder: Path):
        self.folder = folder
        self._ready: queue.SimpleQueue[tuple[Path, int]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._owned: set[Path] = set()
        self._queued = 0
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> tuple[Path, int]:
        """A new empty temp file and a descriptor open for writing (the caller closes it)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="pas-spool-temp")
                self._thread.start()
            ready = self._queued > 0
            if ready:
                self._queued -= 1
            refill = self._queued <= self.AHEAD - self.REFILL
        item = self._ready.get() if ready else self._create()
        if refill:
            self._wanted.set()
        return item

    def owns(self, path: Path) -> bool:
        with self._lock:
            return path in self._owned

    def forget(self, path: Path) -> None:
        with self._lock:
            self._owned.discard(path)

    def _create(self) -> tuple[Path, int]:
        # The creator's PID leads the name: recovery in another process leaves it alone
        # while that process lives (see _writer_alive).
        path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex}.part"
        with self._lock:
            self._owned.add(path)
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o644)
        except BaseException:
            self.forget(path)
            raise

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while True:
                with self._lock:
                    if self._queued >= self.AHEAD:
                        break
                try:
                    item = self._create()
                except OSError:
                    break  # disk full or folder gone: the writer creates its own, and says why
                self._ready.put(item)
                with self._lock:
                    self._queued += 1


class SpillFile:
    """A dataset too large to hold in memory (``dicom.spill_above_mb``), written to a spool
    temp file behind its file meta as its fragments arrive, then filed by
    :meth:`Spool.adopt`. The first write that fails (a full disk) is kept in ``error`` and
    the rest is dropped: the C-STORE still has to be read to its end before it is answered
    (0xA700). A crash leaves a ``.part`` file, which start-up removes with the others."""

    def __init__(self, spool: Spool, header: bytes):
        self._spool = spool
        self.path, self.fd = spool._temp_files.take()
        self.header_length = len(header)
        self.size = 0
        # The first write that failed (OSError), or the room check that refused the rest
        # (SpoolFull, :meth:`give_up`).
        self.error: OSError | SpoolFull | None = None
        self.write(header)

    def give_up(self, reason: SpoolFull) -> None:
        """No room for the rest (the quota or the free-space floor, checked as it grows):
        the file goes at once, what still arrives is dropped, and the C-STORE is refused
        with ``reason`` once it is read to its end (0xA700)."""
        if self.error is None:
            self.error = reason
        self.close()
        self.path.unlink(missing_ok=True)
        self._spool._temp_files.forget(self.path)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.error is not None or self.fd < 0:
            return
        try:
            _write_all(self.fd, data)
            self.size += len(data)
        except OSError as exc:
            self.error = exc

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """``data`` at ``offset`` after the header: a file rebuilt from pieces that may
        arrive out of order (the bucketed download). Errors are kept as :meth:`write` does."""
        if self.error is not None or self.fd < 0:
            return
        view, at = memoryview(data), self.header_length + offset
        try:
            while view:
                written = os.pwrite(self.fd, view, at)
                view, at = view[written:], at + written
            self.size = max(self.size, self.header_length + offset + len(data))
        except OSError as exc:
            self.error = exc

    def chunks(self, size: int = 1 << 20, *, start: int | None = None) -> Iterator[bytes]:
        """The file's bytes after its header (from ``start`` in the file, if given), ``size``
        at a time (to hash it, to inflate it: read, not mapped, every page of a mapping
        read whole would count in the daemon's RSS)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.header_length if start is None else start)
            while chunk := handle.read(size):
                yield chunk

    @contextlib.contextmanager
    def dataset(self) -> Iterator[memoryview]:
        """The dataset's bytes (after the file meta), mapped from the file rather than read
        into memory: the header walk touches only the pages of element headers."""
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        whole = memoryview(mapped)
        part = whole[self.header_length:]
        try:
            yield part
        finally:
            part.release()
            whole.release()
            with contextlib.suppress(BufferError):  # a view still held elsewhere: GC closes
                mapped.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """The C-STORE was refused or never finished: the temp file goes."""
        self.close()
        self.path.unlink(missing_ok=True)
        self._spool._temp_files.forget(self.path)


class Spool:
    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0,
                 quota_bytes: int = 0, held_bytes: Callable[[], int] | None = None,
                 create: bool = True):
        """``create=False``: for a command that only reads (``pas cache status``), which must
        not make the spool's folders. ``held_bytes``: what the spool holds as the index
        counts it (the daemon passes ``index.spool_bytes``; the spool does not read the
        database itself), for the quota check of a temporary copy (:meth:`open_temp`);
        without it only the copies themselves count."""
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.quota_bytes = quota_bytes
        self._held_bytes = held_bytes
        # Temporary copies made and not yet let go -> the room each was granted: they count
        # against the quota until their bytes are gone (see open_temp).
        self._copies: dict[Path, int] = {}
        self._copies_lock = threading.RLock()  # taken again by check_temp_room
        if create:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self._make_fanout()
        self._temp_files = _TempFiles(self.tmp)

    def _make_fanout(self) -> None:
        missing = [self.root / f"{n:02x}" for n in range(256)
                   if not (self.root / f"{n:02x}").is_dir()]
        for directory in missing:
            directory.mkdir(exist_ok=True)
        if missing and self.fsync:
            fsync_dir(self.root)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def check_room(self, size: int, used_bytes: int) -> None:
        """Refuse early when ``size`` more bytes would break the quota or the free floor."""
        if self.quota_bytes and used_bytes + size > self.quota_bytes:
            raise SpoolFull(
                f"spool quota reached: {used_bytes + size} bytes needed, quota {self.quota_bytes}",
                f"spool quota reached: {_mb(self.quota_bytes)} (storage.quota_mb)")
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            raise SpoolFull(
                f"disk nearly full: {free} bytes free, {size} needed, floor {self.min_free_bytes}",
                f"disk nearly full: {_mb(free)} free, {_mb(size)} needed, floor "
                f"{_mb(self.min_free_bytes)}")

    def write(self, chunks: Iterable[bytes | bytearray],
              digest: Any = None) -> tuple[StoredFile, bool]:
        """Write the chunks durably; return where they are (size, SHA-256) and whether this
        call created the file (False: the same bytes were already held; they are rewritten
        all the same, see :meth:`_place`). ``digest``: a hashlib SHA-256 object already fed
        exactly these chunks (the C-STORE path hashes fragments as they arrive), so they are
        not hashed twice."""
        hashed = digest is not None
        digest = digest if hashed else hashlib.sha256()
        size = 0
        temp, fd = self._temp_files.take()
        try:
            try:
                for chunk in chunks:
                    _write_all(fd, chunk)
                    if not hashed:
                        digest.update(chunk)
                    size += len(chunk)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return self._place(temp, size, digest.hexdigest())
        except BaseException:
            temp.unlink(missing_ok=True)
            self._temp_files.forget(temp)
            raise

    def open_temp(self, room: int = 0) -> tuple[Path, int]:
        """A new temp file for bytes that are never filed (a transcoded copy to send, an
        inflated dataset read once) and a descriptor open for writing (the caller closes
        it, and removes the file with :meth:`remove_temp`; start-up removes what a crash
        left). ``room``: the bytes it will hold (more may be asked with :meth:`grow_temp`),
        refused (SpoolFull) when they would cut into the free-space floor that keeps the
        modalities' C-STOREs possible, or take the spool past its quota.

        The quota is the operator's bound on the disk PAS takes: a copy is transient, but
        its bytes are on that disk while it is sent (a 300 MB decoded object from a 5 MB
        file), so its room counts together with what the spool holds (``held_bytes``) and
        the room of the copies not yet let go (several viewers at once). Ingest's own check
        (:meth:`check_room`) does not count copies: a viewer's read never makes a modality's
        C-STORE refused; a copy is what waits."""
        with self._copies_lock:  # checked and granted at once: two copies cannot both fit
            self._check_copy_room(room)
            path, fd = self._temp_files.take()
            self._copies[path] = room
        return path, fd

    def grow_temp(self, path: Path, more: int) -> None:
        """The temp copy at ``path`` (from :meth:`open_temp`) needs ``more`` bytes of room
        than it was granted (its size was not known ahead: an inflated dataset): checked
        against the floor and the quota as :meth:`open_temp` checks a new copy, and added
        to its reservation, or refused (SpoolFull) with nothing granted."""
        with self._copies_lock:
            self._check_copy_room(more)
            self._copies[path] = self._copies.get(path, 0) + more

    def _check_copy_room(self, room: int) -> None:
        """Whether ``room`` more bytes of temp copies fit (the caller holds the lock)."""
        self.check_temp_room(room)
        if not (self.quota_bytes and room):
            return
        held = self._held_bytes() if self._held_bytes else 0
        copies = sum(self._copies.values())
        if held + copies + room > self.quota_bytes:
            raise SpoolFull(
                f"spool quota reached: {room} bytes needed for a temporary copy, "
                f"{held + copies} in use, quota {self.quota_bytes} ({held} filed, "
                f"{copies} in other temporary copies)",
                "spool quota reached: no room for a temporary copy")

    def check_temp_room(self, room: int) -> None:
        """Refuse (SpoolFull) ``room`` more bytes of temp copies when they would cut into the
        free-space floor. The disk's free space does not yet show the bytes that copies in
        flight were granted and have not written: two copies at once could each see room
        for one. Those bytes (each copy's room less its file's size so far) count as used."""
        with self._copies_lock:
            free = shutil.disk_usage(self.tmp).free
            pending = 0
            for path, granted in self._copies.items():
                size = _size_of(path)  # None: removed, its bytes all written (kept open)
                pending += max(0, granted - size) if size is not None else 0
            if room and free - pending - room < self.min_free_bytes:
                raise SpoolFull(
                    f"disk nearly full: {free} bytes free, {room} needed for a temporary "
                    f"copy, {pending} promised to copies being written, floor "
                    f"{self.min_free_bytes}",
                    f"disk nearly full: no room for a temporary copy, floor "
                    f"{_mb(self.min_free_bytes)}")

    def remove_temp(self, path: Path, *, keep_room: bool = False) -> None:
        """Remove a temp file. ``keep_room``: a reader still holds it open, so its bytes
        stay on the disk after the name goes; its room stays counted against the quota
        until :meth:`release_room`."""
        path.unlink(missing_ok=True)
        self._temp_files.forget(path)
        if not keep_room:
            self.release_room(path)

    def release_room(self, path: Path) -> None:
        """The bytes of the temporary copy once at ``path`` are gone (idempotent)."""
        with self._copies_lock:
            self._copies.pop(path, None)

    def open_spill(self, header: bytes) -> SpillFile:
        """A temp file for a dataset too large to hold in memory, its file meta written."""
        return SpillFile(self, header)

    def adopt(self, spill: SpillFile, digest: Any) -> tuple[StoredFile, bool]:
        """File a spilled dataset (``digest`` fed with all its bytes) as :meth:`write`
        files chunks: fsync, rename into place, fsync the directory."""
        try:
            try:
                if self.fsync:
                    os.fsync(spill.fd)
            finally:
                spill.close()
            return self._place(spill.path, spill.size, digest.hexdigest())
        except BaseException:
            spill.discard()
            raise

    def _place(self, temp: Path, size: int, sha: str) -> tuple[StoredFile, bool]:
        """Rename a durable temp file into place under its content address."""
        relative = f"{sha[:2]}/{sha}.dcm"
        final = self.root / relative
        # The same bytes already held: this copy still replaces that file (a new inode at
        # the same name) instead of being thrown away. An eviction running meanwhile
        # unlinks a file only if it is still the very file it saw before deleting the
        # rows (store.eviction.evict_study): a rewritten one is being filed again and is
        # kept. ``created`` stays False so that a failed index commit does not discard
        # a file that older rows still name. (It also replaces a damaged file of the
        # same size with the good bytes.)
        held = _size_of(final) == size
        new_dirs: list[Path] = []
        try:
            os.replace(temp, final)
        except FileNotFoundError:  # a fan-out directory removed under us: made again
            if not temp.exists():
                raise
            new_dirs = [d for d in (final.parent.parent, final.parent) if not d.exists()]
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
        self._temp_files.forget(temp)
        if self.fsync:
            fsync_dir(final.parent)
            for directory in new_dirs:  # a new directory's entry lives in its parent
                fsync_dir(directory.parent)
        return StoredFile(relative, size, sha), not held

    def holds(self, stored: StoredFile) -> bool:
        """Whether the file is in place with its size (a cheap check, not a hash)."""
        return _size_of(self.root / stored.path) == stored.size

    def discard(self, relative: str) -> None:
        """Remove a file this process just wrote and could not index."""
        (self.root / relative).unlink(missing_ok=True)

    def remove_temp_files(self) -> int:
        """Start-up: temp files with bytes are writes that never finished (no one answered
        success); empty ones were created ahead by a previous run. All go; the count is of
        the interrupted writes."""
        removed = 0
        for temp in self.tmp.glob("*.part"):
            if self._temp_files.owns(temp) or _writer_alive(temp):
                continue  # this process's next writes, or another live process's (the CLI
                # runs recovery beside a running daemon: its writes are not abandoned)
            with contextlib.suppress(FileNotFoundError):
                removed += temp.stat().st_size > 0
                temp.unlink()
        return removed


def _writer_alive(temp: Path) -> bool:
    """Whether the temp file was created by another process that still runs."""
    pid_text, dash, _ = temp.name.partition("-")
    if not dash or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    return process_alive(int(pid_text))


def process_alive(pid: int) -> bool:
    """Whether a process with that id runs (under any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def _write_all(fd: int, chunk: bytes | bytearray) -> None:
    """os.write until every byte is written (a regular file takes all at once, but a write
    may legally be short, e.g. interrupted by a signal)."""
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]


def _size_of(path: Path) -> int | None:
    """A file's size, None if it is not there (one stat instead of exists() then stat())."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
