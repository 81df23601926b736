"""Summarise py-spy's collapsed stacks (``--format raw``) from a bench-wan run.

Owns: reading the files ``PAS_BENCH_PYSPY`` collected and printing, per file, where the
samples fall: the leaf function (where CPU or waiting happens) and the PAS function nearest to
the leaf (which of our code asked for it). Touches nothing else.

    python -m bench.wan.profile FOLDER [--top 15]
"""

from __future__ import annotations

import argparse
import collections
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    for path in sorted(args.folder.glob("*.txt")):
        print(summarise(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
