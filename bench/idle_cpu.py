"""CPU an idle appliance uses: ``pas run`` with its defaults (HTTP on) beside Orthanc, idle.

An appliance waits most of the day; what it burns then is the hospital's power and, in the
test suite, the CPU that several idle daemons take from the tests on two cores. Both peers
are started with an empty home, left alone for a settling pause, then their CPU time
(``/proc/PID/stat``, user + system, all threads) is read over the same window, in the same
run. ``--threads`` adds PAS's threads by kernel thread id (``py-spy dump --pid`` names them).

Usage: ``python bench/idle_cpu.py [--seconds 30] [--rounds 3] [--threads]``
(``make bench-idle``). Results: docs/benchmarks.md, "Idle CPU".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.peers import Orthanc, PasProcess  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def thread_seconds(pid: int) -> dict[str, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / HZ
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--threads", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pas-idle-"))
    # The appliance's own defaults: the test harness's fast polling (0.2 s) put back.
    pas = PasProcess(root / "pas", {"PAS_STUDY__CHECK_INTERVAL_S": "2",
                                    "PAS_QUEUE__POLL_INTERVAL_S": "1",
                                    "PAS_STUDY__STABLE_AFTER_S": "60"})
    orthanc = Orthanc(root / "orthanc")
    try:
        pas.start()
        orthanc.start()
        time.sleep(args.settle)
        print(f"idle CPU over {args.seconds:g} s, {args.rounds} rounds (CPU-s per minute)")
        for round_no in range(1, args.rounds + 1):
            pas_pid, orthanc_pid = pas.proc.pid, orthanc.proc.pid  # type: ignore[union-attr]
            before = cpu_seconds(pas_pid), cpu_seconds(orthanc_pid)
            threads_before = thread_seconds(pas_pid)
            time.sleep(args.seconds)
            after = cpu_seconds(pas_pid), cpu_seconds(orthanc_pid)
            per_min = [(a - b) * 60 / args.seconds for a, b in zip(after, before, strict=True)]
            ratio = per_min[0] / per_min[1] if per_min[1] else float("inf")
            print(f"round {round_no}: pas run {per_min[0]:.2f}  Orthanc {per_min[1]:.2f}  "
                  f"ratio {ratio:.1f}x")
            if args.threads:
                threads_after = thread_seconds(pas_pid)
                for tid, spent in sorted(threads_after.items(),
                                         key=lambda kv: threads_before.get(kv[0], 0) - kv[1]):
                    used = (spent - threads_before.get(tid, 0)) * 60 / args.seconds
                    if used > 0:
                        print(f"    thread {tid}: {used:.2f}")
    finally:
        pas.stop()
        orthanc.stop()


if __name__ == "__main__":
    main()
