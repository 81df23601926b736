"""Where a C-STORE's time goes: the CPU each side spends on an instance, PAS next to storescp.

`bench/ingest.py` gives rates; this gives their parts. Each set is sent again with new SOP
Instance UIDs (so every instance is new to the receiver) from 1 or N storescu processes to:
- PAS durable (its default: file fsync, directory fsync, the index commit's WAL flush);
- PAS without its spool's fsyncs (``storage.fsync = false``; the WAL still flushes);
- DCMTK storescp (``--fork`` for several senders), which never flushes.
For each: wall time per instance, the receiver's CPU per instance (from /proc/PID/stat, all
its threads), the senders' CPU per instance (getrusage of the storescu children). With one
sender the exchange is a ping-pong, so the wall time is about the sum of the two CPUs and
the flushes' waits; that is what bounds the ratio of `bench/ingest.py`
(docs/benchmarks.md, "Where an instance's time goes"). storescp's forked children are its
own, not this script's: their CPU is not read (shown as -).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import with_copies  # noqa: E402

from tests.support.peers import CT_DIR, DCMTK_ENV, MR_DIR, PasProcess, StoreSCP  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and its threads, ended ones included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def send(files: list[Path], port: int, called: str, senders: int) -> tuple[float, float]:
    """Wall seconds and the senders' CPU seconds for the whole set."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    processes = [subprocess.Popen(["storescu", "-aec", called, "-aet", "BENCH", "127.0.0.1",
                                   str(port), *map(str, files[i::senders])], env=DCMTK_ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(senders)]
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"storescu exited with {process.returncode}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def measure_pas(files: list[Path], senders: int, home: Path, fsync: bool) -> tuple[float, ...]:
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
                            "PAS_STORAGE__FSYNC": str(fsync).lower(),
                            "PAS_STUDY__STABLE_AFTER_S": "3600"}).start()
    try:
        assert pas.proc is not None
        before = cpu_seconds(pas.proc.pid)
        wall, senders_cpu = send(files, pas.port, "PAS", senders)
        return wall, cpu_seconds(pas.proc.pid) - before, senders_cpu
    finally:
        pas.stop()


def measure_storescp(files: list[Path], senders: int, folder: Path) -> tuple[float, ...]:
    scp = StoreSCP(folder).start(["--fork"] if senders > 1 else [])
    try:
        assert scp.proc is not None
        before = cpu_seconds(scp.proc.pid)
        wall, senders_cpu = send(files, scp.port, "STORESCP", senders)
        return wall, cpu_seconds(scp.proc.pid) - before, senders_cpu
    finally:
        scp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--ct-copies", type=int, default=8)
    parser.add_argument("--mr-copies", type=int, default=2)
    args = parser.parse_args()
    print("| set, senders | receiver | wall ms / instance | receiver CPU ms / instance "
          "| storescu CPU ms / instance |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="pas-bench-cpu-") as tmp:
        work = Path(tmp)
        for name, folder, copies in (("CT", CT_DIR, args.ct_copies),
                                     ("MR", MR_DIR, args.mr_copies)):
            files = with_copies(sorted(folder.glob("*.dcm")), copies, work / name)
            count = len(files)
            runs = {"PAS durable": measure_pas(files, args.senders, work / f"{name}-d", True),
                    "PAS without spool fsync": measure_pas(files, args.senders,
                                                           work / f"{name}-n", False),
                    "storescp": measure_storescp(files, args.senders, work / f"{name}-scp")}
            for label, (wall, receiver, senders_cpu) in runs.items():
                receiver_ms = ("-" if label == "storescp" and args.senders > 1
                               else f"{receiver / count * 1e3:.2f}")
                print(f"| {name} ({count}), {args.senders} | {label} | "
                      f"{wall / count * 1e3:.2f} ({count / wall:.0f}/s) | {receiver_ms} | "
                      f"{senders_cpu / count * 1e3:.2f} |")


if __name__ == "__main__":
    main()
