"""`make bench-associations`: one association per image, PAS next to DCMTK storescp.

Some modalities (and many scripts and routers) open an association for each image: each C-STORE
then pays a TCP connection, the association's negotiation and its release. This sends N files of
the MR set that way (one `storescu` per file, TCP_NODELAY=1, from 1 and from 4 concurrent
senders) to PAS (durable) and to storescp in the same run, and prints images/s, the ratio, and
the CPU each server spent per association (storescp forks a child per association with
`--fork`: its children's CPU is counted through their exit; from one sender it runs in
process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.peers import DCMTK_ENV, MR_DIR, PasProcess, StoreSCP  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and of its children that ended (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def send_each(files: list[Path], port: int, called: str, senders: int) -> float:
    """Seconds to send every file in its own association, ``senders`` at a time."""
    def one(path: Path) -> None:
        subprocess.run(["storescu", "-aec", called, "-aet", "BENCH", "127.0.0.1", str(port),
                        str(path)], env=DCMTK_ENV, check=True, capture_output=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(one, files))
    return time.perf_counter() - start


def run(files: list[Path], senders: int, work: Path) -> dict[str, tuple[float, float]]:
    """{server: (seconds, CPU seconds)} for PAS and storescp."""
    results = {}
    home = work / f"pas-{senders}"
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
                            "PAS_STUDY__STABLE_AFTER_S": "3600"}).start()
    try:
        before = cpu_seconds(pas.proc.pid)
        elapsed = send_each(files, pas.port, "PAS", senders)
        results["PAS"] = (elapsed, cpu_seconds(pas.proc.pid) - before)
        assert pas.status()["instances"] == len(files), pas.status()
    finally:
        pas.stop()
        shutil.rmtree(home, ignore_errors=True)
    folder = work / f"scp-{senders}"
    scp = StoreSCP(folder).start(["--fork"] if senders > 1 else [])
    try:
        before = cpu_seconds(scp.proc.pid)
        elapsed = send_each(files, scp.port, "STORESCP", senders)
        results["storescp"] = (elapsed, cpu_seconds(scp.proc.pid) - before)
    finally:
        scp.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200, help="MR files sent, one each")
    parser.add_argument("--rounds", type=int, default=2, help="best of N per cell")
    args = parser.parse_args()
    files = sorted(MR_DIR.rglob("*.dcm"))[:args.files]
    print(f"{len(files)} MR files, one association each (storescu per file)")
    print("| senders | PAS images/s | storescp images/s | PAS / storescp | PAS CPU ms per "
          "association | storescp CPU ms per association |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as scratch:
        for senders in (1, 4):
            best: dict[str, tuple[float, float]] = {}
            for _ in range(args.rounds):
                for server, result in run(files, senders, Path(scratch)).items():
                    if server not in best or result[0] < best[server][0]:
                        best[server] = result
            pas, scp = best["PAS"], best["storescp"]
            print(f"| {senders} | {len(files) / pas[0]:.0f} | {len(files) / scp[0]:.0f} | "
                  f"{scp[0] / pas[0]:.2f}x | {1000 * pas[1] / len(files):.1f} | "
                  f"{1000 * scp[1] / len(files):.1f} |", flush=True)


if __name__ == "__main__":
    main()
