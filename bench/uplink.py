"""`make bench-uplink`: the appliance's two uplink kinds next to a modality's plain C-STORE, on
this machine (no WAN: the link is bench/wan's business), plus the throughput cap's accuracy.

For the real CT and MR sets, in the same run, into one real Orthanc (DICOMweb plugin, in a
network namespace) emptied between runs:
- peer: DCMTK storescu straight to Orthanc (TCP_NODELAY=1): what a modality does without PAS;
- PAS ``stowrs`` destination (STOW-RS, 16 instances per request);
- PAS ``hub`` destination: pack (JPEG-LS / zstd), seal, PUT 4 buckets in flight over mutual
  TLS 1.3 to ``pas hub run``, whose commit rebuilds, checks and STOW-RSes into Orthanc;
  signed receipt; every instance confirmed.
PAS's time runs from the first job's creation to the last job's end (both in its own
database), i.e. from "study stable" to "region holds it"; storescu's is its wall time.
Then the MR set through the hub with ``hub.max_mbps`` = 20: the wire rate the hub saw (sum of
the sealed buckets over first-to-last bucket arrival, from the hub's database) against 20.

Every run checks that every instance arrived in Orthanc with the SHA-256 PAS stored.
Root (Orthanc runs in a network namespace). Owns nothing but its printout.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.archived import orthanc_hashes  # noqa: E402
from tests.support.hub import HubProcess, enroll  # noqa: E402
from tests.support.peers import (  # noqa: E402
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    Orthanc,
    PasProcess,
    storescu,
    wait_for,
)
from tests.support.peers import read_rows as rows

SETS = {"CT": CT_DIR, "MR": MR_DIR}
CAP_MBPS = 8
PARALLEL = 4  # hub.parallel_buckets default
BASE_ENV = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_QUEUE__WORKERS": "4",
            "PAS_STUDY__STABLE_AFTER_S": "2", "PAS_PREFETCH__ON_ARRIVAL": "false"}




def empty(orthanc: Orthanc) -> None:
    with httpx.Client(base_url=orthanc.url, timeout=120) as http:
        for orthanc_id in http.get("/studies").json():
            http.delete(f"/studies/{orthanc_id}")


def study_bytes(folder: Path) -> int:
    """Bytes of the distinct instances (the CT set's two re-sent copies count once)."""
    seen: dict[str, int] = {}
    from pydicom import dcmread

    for path in folder.glob("*.dcm"):
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        seen[uid] = path.stat().st_size
    return sum(seen.values())


def run_storescu(orthanc: Orthanc, folder: Path) -> float:
    empty(orthanc)
    start = time.perf_counter()
    subprocess.run(["storescu", "-aec", "ORTHANC", "-aet", "BENCH", "+sd", "+r", orthanc.host,
                    str(orthanc.dicom_port), str(folder)], env=DCMTK_ENV, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def run_pas(orthanc: Orthanc, folder: Path, home: Path, env: dict[str, str]) -> dict[str, Any]:
    """storescu -> PAS -> (env's destination) -> Orthanc; PAS's routed-to-delivered time."""
    empty(orthanc)
    pas = PasProcess(home, {**BASE_ENV, **env}).start()
    try:
        storescu(folder, pas.port)
        db = home / "pas.sqlite"
        count = len(rows(db, "SELECT id FROM instances"))

        def settled() -> bool:
            row = rows(db, "SELECT count(*) AS n, count(routed_at) AS r FROM instances")[0]
            busy = rows(db, "SELECT count(*) AS n FROM jobs WHERE state IN "
                        "('pending', 'running')")[0]["n"]
            return bool(row["n"] == row["r"] == count and busy == 0)

        wait_for(settled, 600, interval=0.1, what="PAS delivered everything")
        jobs = rows(db, "SELECT * FROM jobs")
        failed = [j["last_error"] for j in jobs if j["state"] != "done"]
        if failed:
            raise RuntimeError(f"jobs failed: {failed[:3]}")
        seconds = max(j["finished_at"] for j in jobs) - min(j["created_at"] for j in jobs)
        stored = {r["sop_instance_uid"]: r["sha256"] for r in
                  rows(db, "SELECT sop_instance_uid, sha256 FROM instances")}
        if orthanc_hashes(orthanc) != stored:
            raise RuntimeError("Orthanc does not hold every instance bit-exact")
        import json

        progress = [json.loads(j["progress"]) for j in jobs if j["progress"]]
        wire = sum(p.get("bytes_sent", 0) for p in progress)
        return {"seconds": seconds, "wire": wire, "instances": count}
    finally:
        pas.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="CT,MR")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-uplink-"))
    orthanc = Orthanc(scratch / "orthanc").start()
    hub = HubProcess(scratch / "hub", {"PAS_HUB_ARCHIVE__KIND": "dicomweb",
                                       "PAS_HUB_ARCHIVE__URL": orthanc.dicomweb})
    hub.init().start()
    results: list[tuple[str, str, float, float, str]] = []
    cap_line = ""
    try:
        for name in [n for n in args.sets.split(",") if n]:
            folder = SETS[name]
            size = study_bytes(folder)
            peer = run_storescu(orthanc, folder)
            results.append((name, "storescu -> Orthanc (peer)", peer, size / peer / 1e6, "-"))
            stow = run_pas(orthanc, folder, scratch / f"stow-{name}", {
                "PAS_DESTINATIONS__REGION__KIND": "stowrs",
                "PAS_DESTINATIONS__REGION__URL": orthanc.dicomweb,
                # Orthanc's http:// in its namespace (198.18.x.x): the opt-in of invariant 5.
                "PAS_DESTINATIONS__REGION__ALLOW_CLEARTEXT": "true",
                "PAS_ROUTING__FALLBACK__DESTINATIONS": '["region"]'})
            results.append((name, "PAS stowrs -> Orthanc", stow["seconds"],
                            size / stow["seconds"] / 1e6, f"{peer / stow['seconds']:.2f}x"))
            home = scratch / f"hub-{name}"
            enroll(hub, home, f"BENCH-{name}")
            via_hub = run_pas(orthanc, folder, home, {})
            results.append((name, "PAS hub -> hub -> Orthanc", via_hub["seconds"],
                            size / via_hub["seconds"] / 1e6,
                            f"{peer / via_hub['seconds']:.2f}x (wire "
                            f"{size / max(via_hub['wire'], 1):.1f}x smaller)"))
        # The cap: MR through the hub at CAP Mbit/s; the rate the hub saw on the wire.
        home = scratch / "hub-capped"
        enroll(hub, home, "BENCH-CAP")
        run_pas(orthanc, MR_DIR, home, {"PAS_HUB__MAX_MBPS": str(CAP_MBPS),
                                        "PAS_HUB__BUCKET_MB": "1"})
        buckets = rows(hub.home / "hub.sqlite", "SELECT b.size, b.received_at FROM buckets b "
                       "JOIN transfers t ON t.id = b.transfer_id WHERE t.site = 'BENCH-CAP' "
                       "ORDER BY b.received_at")
        # The first PARALLEL arrivals carry the initial burst and bytes sent before the first
        # stamp: measure from the last of them.
        steady = buckets[PARALLEL - 1:]
        span = steady[-1]["received_at"] - steady[0]["received_at"]
        mbps = sum(b["size"] for b in steady[1:]) * 8 / span / 1e6
        cap_line = (f"cap {CAP_MBPS} Mbit/s, MR via hub: {len(buckets)} buckets over "
                    f"{span:.1f} s steady, {mbps:.2f} Mbit/s of sealed buckets = "
                    f"{mbps / CAP_MBPS:.2f}x the cap")
    finally:
        hub.kill()
        orthanc.stop()
    print(f"\nbench-uplink {datetime.date.today()} on {platform.node()} "
          f"({platform.processor() or platform.machine()}), loopback + netns, no WAN")
    print(f"{'set':4} {'path':28} {'seconds':>8} {'MB/s':>7}  vs peer (time ratio)")
    for name, path, seconds, rate, ratio in results:
        print(f"{name:4} {path:28} {seconds:8.2f} {rate:7.2f}  {ratio}")
    print(cap_line)


if __name__ == "__main__":
    main()
