"""Three flushes per received instance, or one ``syncfs``: what the disk alone would give back.

PAS makes each instance durable with three flushes before its answer (invariant 1): the
file's fsync, its directory's, and SQLite's WAL commit (``synchronous=FULL``). One
``syncfs(2)`` after the rename and a WAL commit left unflushed (``synchronous=NORMAL``) makes
the same three durable on one file system in one journal commit. This measures both, with
plain ``os`` and ``sqlite3`` calls and no PAS, on the real sizes: a way weighed for issue 2's
ingest target and not built (docs/benchmarks.md says why).

Usage: ``python bench/one_flush_cost.py [FOLDER] [--sizes 88000 540000] [--files 300]``
(FOLDER: a temporary directory on the file system of /tmp by default, as PAS_HOME would be).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sqlite3
import tempfile
import time
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    finally:
        os.close(fd)


def measure(folder: Path, size: int, files: int, one_flush: bool) -> float:
    """Mean milliseconds per instance: temp file, write, rename, index row, made durable."""
    tmp, final = folder / "tmp", folder / "ab"
    tmp.mkdir(parents=True, exist_ok=True)
    final.mkdir(exist_ok=True)
    db = sqlite3.connect(folder / "index.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'NORMAL' if one_flush else 'FULL'}")
    db.execute("CREATE TABLE IF NOT EXISTS instances(path TEXT, size INTEGER)")
    data = os.urandom(size)
    started = time.perf_counter()
    for n in range(files):
        temp = tmp / str(n)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        os.write(fd, data)
        if not one_flush:
            os.fsync(fd)
        os.close(fd)
        os.replace(temp, final / str(n))
        if not one_flush:
            dir_fd = os.open(final, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
        db.execute("BEGIN")
        db.execute("INSERT INTO instances VALUES (?, ?)", (str(n), size))
        db.execute("COMMIT")
        if one_flush:
            _syncfs(folder)
    took = (time.perf_counter() - started) / files * 1000
    db.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[88_000, 540_000])
    parser.add_argument("--files", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pas-one-flush-", dir=args.folder) as tmp:
        print("| bytes | three flushes ms | one syncfs ms | saved ms |")
        print("|---|---|---|---|")
        for size in args.sizes:
            # The best of two runs each: the load and the disk cache vary between runs.
            three = min(measure(Path(tmp) / f"{size}-3-{r}", size, args.files, False)
                        for r in range(2))
            one = min(measure(Path(tmp) / f"{size}-1-{r}", size, args.files, True)
                      for r in range(2))
            print(f"| {size} | {three:.2f} | {one:.2f} | {three - one:.2f} |")


if __name__ == "__main__":
    main()
