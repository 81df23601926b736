"""The spool: received files on disk, exactly as kept, written durably.

Owns: file layout, atomic durable writes, free-space checks. May not touch: the database
(the caller indexes what :meth:`Spool.write` returns, after it returned).

Files are content-addressed (``ab/<sha256>.dcm``): the same bytes land on the same name, so a
re-sent instance never makes a second copy, and two versions of one SOP Instance UID never
overwrite each other. The 256 fan-out directories are made once, so storing a file never
creates a directory (whose entry would need one more fsync). A write is: temp file in
``tmp/``, fsync, rename into place, fsync the directory. A crash leaves either nothing or a
temp file that start-up removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from appliance.store.index import StoredFile


class SpoolFull(Exception):
    """No room for this file under the configured quota or free-space floor."""


class Spool:
    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0,
                 quota_bytes: int = 0):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.quota_bytes = quota_bytes
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._make_fanout()

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
                f"spool quota reached: {used_bytes + size} bytes needed, quota {self.quota_bytes}"
            )
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            raise SpoolFull(
                f"disk nearly full: {free} bytes free, {size} needed, floor {self.min_free_bytes}"
            )

    def write(self, chunks: Iterable[bytes | bytearray],
              digest: Any = None) -> tuple[StoredFile, bool]:
        """Write the chunks durably; return where they are (size, SHA-256) and whether this
        call created the file (False: the same bytes were already held). ``digest``: a
        hashlib SHA-256 object already fed exactly these chunks (the C-STORE path hashes
        fragments as they arrive), so they are not hashed twice."""
        hashed = digest is not None
        digest = digest if hashed else hashlib.sha256()
        size = 0
        temp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(temp, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    if not hashed:
                        digest.update(chunk)
                    size += len(chunk)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            sha = digest.hexdigest()
            relative = f"{sha[:2]}/{sha}.dcm"
            final = self.root / relative
            if final.exists() and final.stat().st_size == size:
                temp.unlink()  # the same bytes are already held durably
                return StoredFile(relative, size, sha), False
            new_dirs = [d for d in (final.parent.parent, final.parent) if not d.exists()]
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
            if self.fsync:
                fsync_dir(final.parent)
                for directory in new_dirs:  # a new directory's entry lives in its parent
                    fsync_dir(directory.parent)
            return StoredFile(relative, size, sha), True
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def discard(self, relative: str) -> None:
        """Remove a file this process just wrote and could not index."""
        (self.root / relative).unlink(missing_ok=True)

    def remove_temp_files(self) -> int:
        """Start-up: temp files are writes that never finished; no one answered success."""
        removed = 0
        for temp in self.tmp.glob("*.part"):
            temp.unlink(missing_ok=True)
            removed += 1
        return removed


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
