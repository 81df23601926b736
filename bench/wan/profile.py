"""Summarise py-spy's collapsed stacks (``--format raw``) from a bench-wan run.

Owns: reading the files ``PAS_BENCH_PYSPY`` collected and printing, per file, where the
samples fall: the leaf function (where CPU or waiting happens) and the PAS function nearest to
the leaf (which of our code asked for it). Touches nothing else.

    python -m bench.wan.profile FOLDER [--top 15]
    python -m bench.wan.profile --timeline KEPT   # PAS_BENCH_KEEP's folder: the hub's rows
"""

from __future__ import annotations

import argparse
import collections
import json
import sqlite3
import sys
from pathlib import Path


def summarise(path: Path, top: int) -> str:
    leaves: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaves[frames[-1]] += count
        for frame in reversed(frames):
            if "appliance/" in frame:
                ours[frame] += count
                break
    lines = [f"== {path.name}: {total} samples"]
    for title, counter in (("leaf", leaves), ("nearest PAS frame", ours)):
        lines.append(f"  -- by {title}")
        for frame, count in counter.most_common(top):
            lines.append(f"  {count / max(total, 1):6.1%}  {frame[:150]}")
    return "\n".join(lines)


def timeline(folder: Path) -> str:
    """The hub's own stamps, in seconds from the first packet the shaper carried up: when
    each transfer was created and committed, when its buckets arrived (and their size), when
    its first and last instances were archived."""
    window = json.loads((folder / "window.json").read_text())
    t0 = window["start_wall"]
    db = sqlite3.connect(folder / "hub.sqlite")
    lines = [f"timed window: {window['end_wall'] - t0:.2f} s",
             "transfer  created  buckets arrived (s, KB)  archived first-last  committed"]
    for transfer_id, created, committed in db.execute(
            "SELECT id, created_at, committed_at FROM transfers ORDER BY created_at"):
        buckets = db.execute("SELECT received_at, size FROM buckets WHERE transfer_id = ? "
                             "ORDER BY received_at", (transfer_id,)).fetchall()
        first, last = db.execute("SELECT min(archived_at), max(archived_at) FROM "
                                 "archived_instances WHERE transfer_id = ?",
                                 (transfer_id,)).fetchone()
        arrived = " ".join(f"{at - t0:.2f}/{size // 1000}" for at, size in buckets)
        archived = f"{first - t0:.2f}-{last - t0:.2f}" if first else "-"
        done = f"{committed - t0:.2f}" if committed else "-"
        lines.append(f"{transfer_id[:8]}  {created - t0:6.2f}  {arrived}  {archived}  {done}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--timeline", action="store_true",
                        help="FOLDER is PAS_BENCH_KEEP's: print the hub's timeline")
    args = parser.parse_args(argv)
    if args.timeline:
        print(timeline(args.folder))
        return 0
    for path in sorted(args.folder.glob("*.txt")):
        print(summarise(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
