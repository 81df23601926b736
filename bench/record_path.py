"""Micro-benchmark of the C-STORE success path's CPU share: the header read that makes an
instance's index record (``read_dataset_record``: the quick walk, the raw values decoded, the
pixel-length check) and the index write (``index.record_instance``, one transaction each, as
each C-STORE commits its own).

Why: a change to what the index keeps (schema 18 added Rows, Columns, BitsAllocated and
NumberOfFrames) costs on every received instance; this shows how much, on the real CT and MR
sets, with many iterations so that the difference is above the noise. The index lives on
/dev/shm by default: the fsync the disk adds is the same before and after such a change and
would hide it. Run it on two checkouts on the same machine, one after the other:

    PYTHONPATH=. .venv/bin/python bench/record_path.py --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.filereader import read_file_meta_info  # noqa: E402

from appliance.ingest.reading import _dataset_offset, read_dataset_record  # noqa: E402
from appliance.store import index  # noqa: E402
from appliance.store.db import Database  # noqa: E402
from appliance.store.index import StoredFile  # noqa: E402
from tests.support.peers import CT_DIR, MR_DIR  # noqa: E402


def _datasets(folder: Path) -> list[tuple[bytes, str]]:
    """(dataset bytes as they arrive in a C-STORE, transfer syntax) of each file."""
    found = []
    for path in sorted(folder.rglob("*.dcm")):
        data = path.read_bytes()
        start = _dataset_offset(data)
        assert start is not None, path
        found.append((data[start:], str(read_file_meta_info(path).TransferSyntaxUID)))
    return found


def header_us(datasets: list[tuple[bytes, str]], repeat: int) -> float:
    """Microseconds per instance to read its index record, best of the passes."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for data, syntax in datasets:
            read_dataset_record(b"", data, syntax)
        best = min(best, (time.perf_counter() - started) / len(datasets))
    return best * 1e6


def index_us(datasets: list[tuple[bytes, str]], count: int, folder: Path) -> float:
    """Microseconds per instance to file ``count`` records, one transaction each, in a
    fresh database in ``folder`` (new SOP Instance UIDs, the set's studies and series)."""
    records = [read_dataset_record(b"", data, syntax) for data, syntax in datasets]
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        db = Database(Path(scratch) / "pas.sqlite")
        try:
            started = time.perf_counter()
            for n in range(count):
                record = dataclasses.replace(records[n % len(records)],
                                             sop_instance_uid=f"1.2.826.0.1.3680043.9.{n}")
                index.record_instance(db, record, StoredFile(f"aa/{n}.dcm", 1000, f"{n:064x}"),
                                      calling_ae="BENCH")
            return (time.perf_counter() - started) / count * 1e6
        finally:
            db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each measure")
    parser.add_argument("--repeat", type=int, default=40, help="passes over a set per run")
    parser.add_argument("--writes", type=int, default=5000, help="records filed per run")
    parser.add_argument("--folder", type=Path, default=Path("/dev/shm"),
                        help="where the scratch database lives")
    args = parser.parse_args()
    sets = {"CT": _datasets(CT_DIR), "MR": _datasets(MR_DIR)}
    for name, datasets in sets.items():
        runs = [header_us(datasets, args.repeat) for _ in range(args.rounds)]
        print(f"header read {name} ({len(datasets)} files x {args.repeat}): "
              f"median {statistics.median(runs):.1f} us, min {min(runs):.1f} us per instance")
    runs = [index_us(sets["MR"], args.writes, args.folder) for _ in range(args.rounds)]
    print(f"index write ({args.writes} instances, one transaction each, {args.folder}): "
          f"median {statistics.median(runs):.1f} us, min {min(runs):.1f} us per instance")


if __name__ == "__main__":
    main()
