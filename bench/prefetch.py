"""``make bench-prefetch``: from ORM received to every CT prior on site, over the emulated WAN.

Owns: one run of the prefetch over ``bench.wan`` (20 Mbit/s, 70 ms RTT, 0.1 % loss by default):
the older CT study of each of the 10 ct-covid19-ny-sbu patients in a regional Orthanc behind a
real hub (region namespace), a real ``pas run`` enrolled with it (site namespace), ten ORM^O01
over MLLP, and the clock from the first ORM sent to the last request ``fetched``. PAS runs
twice: by the hub's bucketed download (``prefetch.bucketed``, the default) and by per-instance
WADO-RS through the hub's proxy. Beside them, in the same run and over the same link: DCMTK
``getscu`` (C-GET of the same studies from the
regional Orthanc into the site namespace, what a site does without PAS), and the two ideal
times: the original bytes and the losslessly packed bytes (``appliance.transfer.pack``) at the
link rate. Creates and deletes its own namespaces and processes; touches nothing else.

    python bench/prefetch.py [--mbit 20 --rtt 70 --loss 0.001] [--set ct|mr]

With PAS_BENCH_PYSPY=<folder>, py-spy samples the appliance and the hub during each PAS run
(``python -m bench.wan.profile`` summarises the collapsed stacks).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from hl7.client import MLLPClient  # noqa: E402
from pydicom import dcmread  # noqa: E402

from appliance.transfer.pack import PackItem, pack_bucket, plan_buckets  # noqa: E402
from bench.wan.link import LinkSpec, WanLink  # noqa: E402
from bench.wan.pas import Hub, SiteAppliance, _profile, _stop  # noqa: E402
from bench.wan.peers import regional_orthanc  # noqa: E402
from tests.support.peers import (  # noqa: E402
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    Orthanc,
    port_open,
    read_rows,
    wait_for,
)


def older_studies(folder: Path = CT_DIR) -> dict[str, tuple[str, list[Path]]]:
    """PatientID -> (StudyInstanceUID, files) of the older study."""
    studies: dict[str, dict[str, tuple[str, list[Path]]]] = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        by_date = studies.setdefault(str(ds.PatientID), {})
        by_date.setdefault(str(ds.StudyDate), (str(ds.StudyInstanceUID), []))[1].append(path)
    return {patient: by_date[min(by_date)] for patient, by_date in studies.items()}


def packed_bytes(files: list[Path]) -> int:
    """What the bucketed, compressed path would carry for these files (default level)."""
    import hashlib

    seen: dict[str, PackItem] = {}
    for path in files:
        data = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        seen[uid] = PackItem(uid, path, len(data), hashlib.sha256(data).hexdigest())
    return sum(len(pack_bucket(plan)[0]) for plan in plan_buckets(list(seen.values())))


def orm(control: str, patient: str, order: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||ORM^O01|{control}|P|2.5",
        f"PID|1||{patient}^^^^MR", f"ORC|NW|{order}|||SC",
        f"OBR|1|{order}||CT^CT||||||||||||||ACC-{order}||||||CT"])


def run_pas(link: WanLink, scratch: Path, priors: dict[str, tuple[str, list[Path]]],
            parallel: int, bucketed: bool, warm: bool = True) -> tuple[float, int, int]:
    """Seconds from the first ORM to all fetched, instances fetched, bytes down the link."""
    scratch = scratch / ("pas-bucketed" if bucketed else "pas-wado")
    regional = regional_orthanc(link, scratch / "region")
    profilers: list[subprocess.Popen[bytes]] = []
    hub = appliance = None
    try:
        with httpx.Client(timeout=60) as client:  # over the unshaped control veth
            for _, files in priors.values():
                for path in files:
                    client.post(f"{regional.url}/instances",
                                content=path.read_bytes()).raise_for_status()
        hub = Hub(link, scratch / "hub", "http://127.0.0.1:8042/dicom-web").start()
        appliance = SiteAppliance(link, scratch / "appliance", {
            "PAS_HL7__HOST": "0.0.0.0", "PAS_PREFETCH__ENABLED": "true",
            "PAS_PREFETCH__PARALLEL": str(parallel),
            "PAS_PREFETCH__BUCKETED": str(bucketed).lower(),
            # The line's rate, as the site's IT writes it (bench-wan does the same).
            "PAS_HUB__LINK_MBPS": f"{link.spec.mbit_s:g}",
            **{k: v for k, v in os.environ.items() if k.startswith(("PAS_PREFETCH__",
                                                                    "PAS_HUB__"))},
            "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2"})
        appliance.enroll(hub)
        appliance.start()
        hl7_host, hl7_port = link.site.inner_address, int(appliance.env["PAS_HL7__PORT"])
        wait_for(lambda: port_open(hl7_host, hl7_port), 30, what="the HL7 listener")
        if warm and bucketed:  # a PAS that has been running: its hub connection is open
            wait_for(lambda: "hub connection open" in (scratch / "appliance" / "pas.log")
                     .read_text(errors="replace"), 30, interval=0.05,
                     what="the appliance's kept-alive connection to the hub")
        profilers = _profile({f"appliance-{'bucketed' if bucketed else 'wado'}": appliance.proc,
                              f"hub-{'bucketed' if bucketed else 'wado'}": hub.proc})
        link.reset()
        start = time.time()  # the wall clock: the appliance stamps finished_at with it
        with MLLPClient(hl7_host, hl7_port) as client:
            for n, patient in enumerate(sorted(priors)):
                answer = client.send_message(orm(f"B{n}", patient, f"O{n}")).decode()
                assert "MSA|AA|" in answer, answer

        def fetched() -> list[dict] | None:
            # Read-only from the appliance's index (cheaper than a `pas prefetch list`
            # process per poll, which stole CPU from the run).
            rows = read_rows(scratch / "appliance" / "pas.sqlite",
                             "SELECT state, last_error, instances_fetched, finished_at "
                             "FROM prefetch_requests")
            failed = [r for r in rows if r["state"] == "failed"]
            if failed:
                raise RuntimeError(f"prefetch failed: {failed[0]['last_error']}")
            return rows if len(rows) == len(priors) and all(
                r["state"] == "fetched" for r in rows) else None

        rows = wait_for(fetched, 600, interval=0.05, what="all priors fetched")
        # From the first ORM sent to the last request's finished_at as the appliance stamped
        # it: the poll's own period does not count.
        seconds = max(r["finished_at"] for r in rows) - start
        for profiler in profilers:
            _stop(profiler, signal.SIGINT)
        audits = (scratch / "appliance" / "pas.log").read_text(errors="replace")
        if bucketed and "(bucketed download)" not in audits:
            raise RuntimeError("the bucketed run did not use the bucketed download")
        stats = link.stats()
        print(f"{scratch.name}: {seconds:.2f} s, down offered {stats.down_in / 1e6:.2f} MB, "
              f"delivered {stats.down_out / 1e6:.2f} MB", file=sys.stderr)
        return seconds, sum(r["instances_fetched"] for r in rows), stats.down_in
    except Exception:
        log = scratch / "appliance" / "pas.log"
        if log.exists():
            print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if appliance:
            appliance.stop()
        if hub:
            hub.stop()
        regional.stop()


_SOURCE = """
import socket, sys, threading
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
streams, size = int(sys.argv[4]), int(sys.argv[3])
print("ready", flush=True)
def send(conn, left):
    block = bytes(65536)
    while left > 0:
        left -= conn.send(block[:min(left, len(block))])
    conn.close()
threads = [threading.Thread(target=send, args=(server.accept()[0], size // streams))
           for _ in range(streams)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""
_SINK = """
import socket, sys, threading, time
got = []
def read():
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    while chunk := conn.recv(262144):
        got.append(len(chunk))
start = time.monotonic()
threads = [threading.Thread(target=read) for _ in range(int(sys.argv[3]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(sum(got), time.monotonic() - start)
"""


def run_tcp_reference(link: WanLink, size: int, streams: int = 1) -> float:
    """Fresh TCP connections (``streams`` at once) carrying ``size`` bytes in all, region ->
    site (connect to last byte): what the link and TCP make of that many bytes, with no
    application at all."""
    port = 9099
    size -= size % streams
    source = subprocess.Popen(link.in_region([sys.executable, "-c", _SOURCE, link.region_ip,
                                              str(port), str(size), str(streams)]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert source.stdout is not None and source.stdout.readline().strip() == "ready"
        out = subprocess.run(link.in_site([sys.executable, "-c", _SINK, link.region_ip,
                                           str(port), str(streams)]), capture_output=True,
                             text=True, check=True, timeout=300).stdout.split()
        assert int(out[0]) == size, out
        return float(out[1])
    finally:
        source.wait(30)


def run_getscu(link: WanLink, scratch: Path,
               priors: dict[str, tuple[str, list[Path]]]) -> tuple[float, int, int]:
    """DCMTK getscu, one C-GET per study, one after the other, from the site namespace."""
    # Orthanc answers C-GET only to a modality it knows.
    regional = Orthanc(scratch / "region-getscu", ae_title="REGION", ns=link.region,
                       modalities={"site": ["SITE", link.site_ip, 104]}).start()
    try:
        with httpx.Client(timeout=60) as client:
            for _, files in priors.values():
                for path in files:
                    client.post(f"{regional.url}/instances",
                                content=path.read_bytes()).raise_for_status()
        out = scratch / "getscu"
        out.mkdir()
        link.reset()
        start = time.monotonic()
        for study_uid, _ in priors.values():
            subprocess.run(link.in_site([
                "getscu", "-aet", "SITE", "-aec", "REGION", "-S", "-od", str(out),
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                link.region_ip, "4242"]), env=DCMTK_ENV, check=True, capture_output=True,
                timeout=600)  # stored files land in ``out``
        seconds = time.monotonic() - start
        return seconds, len(list(out.iterdir())), link.stats().down_in
    finally:
        regional.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbit", type=float, default=20)
    parser.add_argument("--rtt", type=float, default=70)
    parser.add_argument("--loss", type=float, default=0.001)
    parser.add_argument("--parallel", type=int, default=8, help="prefetch.parallel")
    parser.add_argument("--set", choices=["ct", "mr"], default="ct",
                        help="ct: 10 patients' older CT; mr: the one MR study (520 x 86 kB)")
    parser.add_argument("--skip", choices=["wado", "getscu"], action="append", default=[],
                        help="leave a path out (to profile one alone)")
    parser.add_argument("--cold", action="store_true",
                        help="send the orders as soon as PAS listens, before its kept-alive "
                        "connection to the hub is open (default: once it is)")
    parser.add_argument("--keep", type=Path, help="scratch folder kept (logs) instead of a "
                        "temporary one")
    args = parser.parse_args(argv)
    spec = LinkSpec("bench", args.mbit, args.rtt, args.loss)
    priors = older_studies(CT_DIR if args.set == "ct" else MR_DIR)
    files = sorted({p for _, fs in priors.values() for p in fs})
    distinct = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    original = sum(p.stat().st_size for p in distinct.values())
    packed = packed_bytes(files)
    ideal_original = original / spec.bytes_per_s
    ideal_packed = packed / spec.bytes_per_s
    with tempfile.TemporaryDirectory(prefix="pas-bench-prefetch-") as tmp, WanLink(spec) as link:
        scratch = args.keep or Path(tmp)
        load = [os.getloadavg()[0]]
        runs = [("PAS prefetch, bucketed download via the hub (JPEG-LS + zstd stream)",
                 run_pas(link, scratch, priors, args.parallel, True, not args.cold))]
        load.append(os.getloadavg()[0])
        if "wado" not in args.skip:
            runs.append((f"PAS prefetch, WADO-RS via the hub ({args.parallel} in flight)",
                         run_pas(link, scratch, priors, args.parallel, False)))
            load.append(os.getloadavg()[0])
        tcp_s = run_tcp_reference(link, packed)
        tcp8_s = run_tcp_reference(link, packed, 8)
        if "getscu" not in args.skip:
            runs.append(("DCMTK getscu, C-GET per study (peer)",
                         run_getscu(link, scratch, priors)))
            load.append(os.getloadavg()[0])
    lines = [
        f"Prefetch bench, {datetime.date.today()}, {platform.node()} ({_cores()} cores), "
        f"link {spec.label()}, {len(priors)} {args.set.upper()} priors, {len(distinct)} instances, "
        f"{original / 1e6:.1f} MB original, {packed / 1e6:.1f} MB packed "
        f"({original / packed:.2f}x)",
        "",
        "| path | seconds | instances | MB down the link | vs packed at link rate | "
        "vs original at link rate |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {sec:.1f} | {count} | {down / 1e6:.1f} | {sec / ideal_packed:.2f}x | "
          f"{sec / ideal_original:.2f}x |" for name, (sec, count, down) in runs],
        f"| reference: one TCP stream of the packed bytes, no application | {tcp_s:.1f} | | "
        f"{packed / 1e6:.1f} | {tcp_s / ideal_packed:.2f}x | |",
        f"| reference: 8 TCP streams at once, the packed bytes shared | {tcp8_s:.1f} | | "
        f"{packed / 1e6:.1f} | {tcp8_s / ideal_packed:.2f}x | |",
        f"| ideal: packed bytes at link rate | {ideal_packed:.1f} | | {packed / 1e6:.1f} | "
        "1.00x | |",
        f"| ideal: original bytes at link rate | {ideal_original:.1f} | | "
        f"{original / 1e6:.1f} | | 1.00x |",
        "",
        f"Load average (1 min) before and after each run: "
        f"{', '.join(f'{x:.1f}' for x in load)}.",
    ]
    print("\n".join(lines))
    return 0


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
