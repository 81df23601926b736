"""`make bench-ingest`: C-STORE ingest rate of PAS (durable) next to DCMTK storescp.

Both real sets go from 1 and from 4 concurrent storescu processes (TCP_NODELAY=1) to:
- PAS, fsync of file and directory plus the SQLite commit before each success (invariant 1);
- DCMTK storescp on the same machine in the same run (--fork for concurrent senders), which
  writes files without fsync: the peer to beat, and a stricter one than it looks;
- the same storescp made durable by bench/durable_close.c (LD_PRELOAD: each file it writes is
  fsynced, and its directory, before it answers): what DCMTK's C code does with invariant 1's
  file flushes (PAS also commits its index: one flush more). Needs a C compiler (cc).
Prints instances/s, MB/s, PAS/storescp and PAS/durable storescp. Target: PAS >= 0.5x
storescp's MB/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.peers import (  # noqa: E402
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    StoreSCP,
    wait_for,
)


def send_all(files: list[Path], port: int, called: str, senders: int) -> float:
    groups = [files[i::senders] for i in range(senders)]

    def one(group: list[Path]) -> None:
        subprocess.run(["storescu", "-aec", called, "-aet", "BENCH", "127.0.0.1", str(port),
                        *map(str, group)], env=DCMTK_ENV, check=True, capture_output=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(one, groups))
    return time.perf_counter() - start


def run_pas(files: list[Path], senders: int, work: Path, fsync: bool,
            direct: bool = True) -> float:
    home = work / f"pas-{senders}-{fsync}-{direct}"
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
                            "PAS_STORAGE__FSYNC": str(fsync).lower(),
                            "PAS_DICOM__DIRECT_RECEIVE": str(direct).lower(),
                            "PAS_STUDY__STABLE_AFTER_S": "3600"}).start()
    try:
        elapsed = send_all(files, pas.port, "PAS", senders)
        held = pas.status()["files"]
        assert held == len({f.name for f in files}) or held > 0, held
        return elapsed
    finally:
        pas.stop()
        shutil.rmtree(home, ignore_errors=True)


def with_copies(files: list[Path], copies: int, folder: Path) -> list[Path]:
    """The set itself, then ``copies - 1`` more of it whose SOP Instance UIDs are new (saved
    by pydicom in the same transfer syntax): new instances to PAS, not re-sends."""
    if copies <= 1:
        return files
    folder.mkdir(parents=True)
    made = list(files)
    for copy in range(1, copies):
        for number, source in enumerate(files):
            dataset = dcmread(source)
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            target = folder / f"{copy:03d}-{number:05d}.dcm"
            dataset.save_as(target, enforce_file_format=True)
            made.append(target)
    return made


def build_durable_shim(work: Path) -> Path | None:
    """bench/durable_close.c compiled for this run; None (and why) without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("no C compiler: the durable storescp column is left out", file=sys.stderr)
        return None
    shim = work / "durable_close.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(shim),
                    str(Path(__file__).with_name("durable_close.c")), "-ldl"], check=True)
    return shim


def run_storescp(files: list[Path], senders: int, work: Path,
                 durable_shim: Path | None = None) -> float:
    folder = work / f"scp-{senders}"
    env = {"LD_PRELOAD": str(durable_shim)} if durable_shim else None
    scp = StoreSCP(folder).start(["--fork"] if senders > 1 else [], env=env)
    try:
        elapsed = send_all(files, scp.port, "STORESCP", senders)
        wait_for(lambda: len(scp.files()) >= len(files), 60, what="storescp files")
        return elapsed
    finally:
        scp.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="best of N per cell")
    parser.add_argument("--copies", type=int, default=1,
                        help="send each set N times over, each copy with new SOP Instance UIDs "
                             "(longer runs: the senders' start and association weigh less)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pas-bench-") as tmp:
        work = Path(tmp)
        shim = build_durable_shim(work)
        sets = {}
        for name, folder, size in (("CT", CT_DIR, "0.5 MB"), ("MR", MR_DIR, "86 kB")):
            files = with_copies(sorted(folder.glob("*.dcm")), args.copies, work / name)
            copies = f", {args.copies} copies" if args.copies > 1 else ""
            sets[f"{name} ({len(files)} x {size}{copies})"] = files
        for label, files in sets.items():
            size_mb = sum(f.stat().st_size for f in files) / 1e6
            for senders in (1, 4):
                pas_s = min(run_pas(files, senders, work, True) for _ in range(args.rounds))
                scp_s = min(run_storescp(files, senders, work) for _ in range(args.rounds))
                durable_s = (min(run_storescp(files, senders, work, shim)
                                 for _ in range(args.rounds)) if shim else None)
                # Reference only: what the same code does without its spool's fsyncs (never
                # a setting for an appliance; its index commit still flushes the WAL):
                # separates the cost of the file flushes from the rest.
                nosync_s = min(run_pas(files, senders, work, False) for _ in range(args.rounds))
                # And with every C-STORE through pynetdicom (dicom.direct_receive = false).
                pynetdicom_s = min(run_pas(files, senders, work, True, direct=False)
                                   for _ in range(args.rounds))
                rows.append((label, senders, len(files), size_mb, pas_s, scp_s, durable_s,
                             nosync_s, pynetdicom_s))
    print(f"\nmake bench-ingest  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
          f"{os.cpu_count()} cores  python {platform.python_version()}\n")
    print("| set | senders | PAS inst/s | PAS MB/s | storescp inst/s | storescp MB/s "
          "| PAS / storescp | durable storescp inst/s | durable storescp / storescp "
          "| PAS / durable storescp | PAS without spool fsync (reference) inst/s "
          "| PAS, C-STORE through pynetdicom (direct_receive = false), inst/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, senders, count, size_mb, pas_s, scp_s, durable_s, nosync_s,
         pynetdicom_s) in rows:
        durable = (f"{count / durable_s:.0f} | {scp_s / durable_s:.2f}x | "
                   f"{durable_s / pas_s:.2f}x" if durable_s else "- | - | -")
        print(f"| {label} | {senders} | {count / pas_s:.0f} | {size_mb / pas_s:.1f} | "
              f"{count / scp_s:.0f} | {size_mb / scp_s:.1f} | {scp_s / pas_s:.2f}x | "
              f"{durable} | {count / nosync_s:.0f} | {count / pynetdicom_s:.0f} |")


if __name__ == "__main__":
    main()
