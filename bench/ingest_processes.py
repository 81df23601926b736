"""Upper bound of ingest in several processes, next to storescp, before building it.

N independent ``pas run`` daemons (each its own home and database: nothing shared, so a
bound no shared-database design could beat) listen on one port with SO_REUSEPORT
(bench/reuseport/sitecustomize.py); 4 concurrent storescu processes send each real set.
Durable, as in ``make bench-ingest``. Prints instances/s per N and storescp --fork's in the
same run, with the ratios; best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import run_storescp, send_all  # noqa: E402

from tests.support.peers import CT_DIR, MR_DIR, PasProcess, wait_for  # noqa: E402

SHIM = Path(__file__).resolve().parent / "reuseport"


def run_daemons(files: list[Path], daemons: int, work: Path, senders: int = 4) -> float:
    """Seconds to send ``files`` to ``daemons`` PAS processes sharing one port."""
    started: list[PasProcess] = []
    try:
        for number in range(daemons):
            pas = PasProcess(work / f"pas-{daemons}-{number}", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
                "PAS_STUDY__STABLE_AFTER_S": "3600", "PAS_BENCH_REUSEPORT": "1",
                "PYTHONPATH": str(SHIM)})
            if started:  # the first one's port
                pas.port = started[0].port
                pas.env["PAS_DICOM__PORT"] = str(pas.port)
            started.append(pas.start())
            wait_for(lambda p=pas: "DICOM listener" in p.log(), 30, what="its listener")
        elapsed = send_all(files, started[0].port, "PAS", senders)
        # The CT set's two re-sent copies may reach another daemon than their first copy.
        held = sum(p.status()["files"] for p in started)
        assert len(files) - 2 <= held <= len(files), held
        return elapsed
    finally:
        for pas in started:
            pas.stop()
            shutil.rmtree(pas.home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--daemons", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pas-bench-processes-"))
    print("| set | senders | storescp inst/s | " + " | ".join(
        f"{n} PAS inst/s (ratio)" for n in args.daemons) + " |")
    print("|---|---|---|" + "---|" * len(args.daemons))
    try:
        for name, folder in (("CT", CT_DIR), ("MR", MR_DIR)):
            files = sorted(folder.glob("*.dcm"))
            best: dict[object, float] = {}
            for _round in range(args.rounds):
                for daemons in args.daemons:
                    elapsed = run_daemons(files, daemons, work)
                    best[daemons] = min(best.get(daemons, elapsed), elapsed)
                elapsed = run_storescp(files, 4, work)
                best["scp"] = min(best.get("scp", elapsed), elapsed)
            rate = {key: len(files) / seconds for key, seconds in best.items()}
            print(f"| {name} | 4 | {rate['scp']:.0f} | " + " | ".join(
                f"{rate[n]:.0f} ({rate[n] / rate['scp']:.2f}x)" for n in args.daemons) + " |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
