"""`make bench-forward`: PAS forwarding studies to the hospital's PACS, next to storescu.

A ``dicom`` destination (the hospital's own PACS, issue 2's first destination kind) is
DCMTK's storescp here. Each real set is first sent by storescu (``TCP_NODELAY=1``) straight
to that storescp: the peer's pace. Then it is sent to PAS, whose fallback rule routes every
study to the same storescp; the figure is PAS's forwarding time, from the first job's
creation (the study stable) to the last job's end, read from the jobs table. Same machine,
same run, best of ``--rounds``; the ratio is PAS's images/s over storescu's. storescp
receives every image each time (counted).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.configs import everything_to  # noqa: E402
from tests.support.peers import (  # noqa: E402
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    StoreSCP,
    wait_for,
)


def storescu_seconds(folder: Path, port: int, called: str) -> float:
    start = time.perf_counter()
    subprocess.run(["storescu", "-aec", called, "+sd", "+r", "127.0.0.1", str(port),
                    str(folder)], env=DCMTK_ENV, check=True, capture_output=True)
    return time.perf_counter() - start


def _jobs(database: Path) -> list[sqlite3.Row]:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute("SELECT state, created_at, finished_at FROM jobs").fetchall()
    finally:
        connection.close()


def forward_seconds(folder: Path, scp: StoreSCP, work: Path) -> float:
    """Seconds from the first forwarding job's creation to the last one's end."""
    config = everything_to(work / "appliance.toml", scp)
    pas = PasProcess(work / "pas", {
        "PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_HTTP__ENABLED": "false", "PAS_STUDY__STABLE_AFTER_S": "1"}).start()
    try:
        storescu_seconds(folder, pas.port, "PAS")
        studies = pas.status()["studies"]
        database = pas.home / "pas.sqlite"
        jobs = wait_for(lambda: (rows := _jobs(database)) and len(rows) == studies
                        and all(r["state"] == "done" for r in rows) and rows, 600,
                        interval=0.2, what="every forwarding job done")
        return max(r["finished_at"] for r in jobs) - min(r["created_at"] for r in jobs)
    finally:
        pas.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"bench-forward (code of {os.environ.get('BENCH_CODE', 'this checkout')})")
    print("| set | images | storescu -> storescp img/s | PAS -> storescp img/s | PAS / storescu |")
    print("|---|---|---|---|---|")
    for name, folder in (("CT", CT_DIR), ("MR", MR_DIR)):
        count = len(list(folder.rglob("*.dcm")))
        direct = forwarded = float("inf")
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="pas-bench-forward-") as tmp:
                work = Path(tmp)
                scp = StoreSCP(work / "scp-direct", ae_title="PACS").start()
                try:
                    direct = min(direct, storescu_seconds(folder, scp.port, "PACS"))
                    assert len(scp.files()) >= count - 2, len(scp.files())  # 2 duplicates
                finally:
                    scp.stop()
                scp = StoreSCP(work / "scp-pas", ae_title="PACS").start()
                try:
                    forwarded = min(forwarded, forward_seconds(folder, scp, work))
                    received = len(scp.files())
                    assert received >= count - 2, received
                finally:
                    scp.stop()
                shutil.rmtree(work / "pas", ignore_errors=True)
        print(f"| {name} | {count} | {count / direct:.0f} | {count / forwarded:.0f} | "
              f"{direct / forwarded:.2f}x |")


if __name__ == "__main__":
    main()
