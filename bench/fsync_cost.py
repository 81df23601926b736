"""What one durable file costs this disk, without PAS: create, write, fsync, rename, fsync the
directory, the same steps `appliance.store.spool.Spool.write` takes per received instance.

Usage: ``python bench/fsync_cost.py [FOLDER] [--sizes 88000 540000] [--files 300]``
(FOLDER defaults to a temporary directory on the same file system as /tmp). Prints the mean
milliseconds of each step per file size: the floor under ingest's per-instance time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path


def measure(folder: Path, size: int, files: int) -> dict[str, float]:
    tmp, final = folder / "tmp", folder / "ab"
    tmp.mkdir(parents=True, exist_ok=True)
    final.mkdir(exist_ok=True)
    data = os.urandom(size)
    spent = dict.fromkeys(("create", "write", "fsync", "rename", "fsync dir"), 0.0)
    for n in range(files):
        t0 = time.perf_counter()
        temp = tmp / uuid.uuid4().hex
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        t1 = time.perf_counter()
        os.write(fd, data)
        t2 = time.perf_counter()
        os.fsync(fd)
        t3 = time.perf_counter()
        os.close(fd)
        os.replace(temp, final / f"{size}-{n}")
        t4 = time.perf_counter()
        dir_fd = os.open(final, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        t5 = time.perf_counter()
        for key, took in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            spent[key] += took
    return {key: total / files * 1000 for key, total in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[88_000, 540_000])
    parser.add_argument("--files", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pas-fsync-", dir=args.folder) as tmp:
        print("| bytes | " + " | ".join(f"{step} ms" for step in
                                       ("create", "write", "fsync", "rename", "fsync dir")) + " |")
        print("|---|---|---|---|---|---|")
        for size in args.sizes:
            row = measure(Path(tmp) / str(size), size, args.files)
            print(f"| {size} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
