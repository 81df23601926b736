"""`make bench-hub`: what the hub costs on the regional side, on loopback (no WAN: the link
is bench/wan's business). For the real CT and MR sets, in the same run:

- hub, embedded archive: PUT every sealed bucket (4 in flight, TLS 1.3, mutual TLS) + commit
  (open, unpack, rebuild, SHA-256 check, file + index, signed receipt);
- hub, dicomweb archive: the same, the commit STOW-RS'ing into a real Orthanc;
- the peer: the same files STOW-RS'ed straight into that Orthanc (16 per request, plain HTTP),
  what a regional platform would do without a hub.

Owns nothing but its printout. Every run checks the receipt covers every instance; Orthanc is
emptied between runs. Root (Orthanc runs in a network namespace).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.hub import HubProcess, Shipment, client, enroll, pack_items, ship  # noqa: E402
from tests.support.peers import CT_DIR, MR_DIR, Orthanc  # noqa: E402

SETS = {"CT": CT_DIR, "MR": MR_DIR}
PARALLEL = 4


def phases(hub: HubProcess, transfer_id: str) -> tuple[float, float]:
    """(rebuild s, archive s) of a commit, from the hub's own log line."""
    for line in hub.log().splitlines():
        if transfer_id in line and "committed" in line:
            found = re.search(r"rebuild ([0-9.]+) s, archive ([0-9.]+) s", line)
            if found:
                return float(found[1]), float(found[2])
    return float("nan"), float("nan")


def upload_and_commit(http: httpx.Client, shipment: Shipment) -> float:
    start = time.perf_counter()
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
    with ThreadPoolExecutor(PARALLEL) as pool:
        codes = list(pool.map(lambda i: http.put(shipment.bucket_url(i),
                                                 content=shipment.buckets[i]).status_code,
                              range(len(shipment.buckets))))
    assert codes == [201] * len(codes), codes
    answer = http.post(shipment.url + "/commit")
    elapsed = time.perf_counter() - start
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["instances"]) == len(shipment.originals)
    return elapsed


def stow_direct(orthanc: Orthanc, files: list[Path], per_request: int = 16) -> float:
    start = time.perf_counter()
    with httpx.Client(timeout=300) as http:
        for first in range(0, len(files), per_request):
            boundary = uuid.uuid4().hex
            body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                            + path.read_bytes() + b"\r\n"
                            for path in files[first:first + per_request])
            body += f"--{boundary}--\r\n".encode()
            answer = http.post(f"{orthanc.dicomweb}/studies", content=body, headers={
                "Content-Type": f'multipart/related; type="application/dicom"; '
                                f"boundary={boundary}", "Accept": "application/dicom+json"})
            assert answer.status_code == 200, answer.text[:300]
    return time.perf_counter() - start


def empty(orthanc: Orthanc) -> None:
    for study in orthanc.get("/studies").json():
        httpx.delete(f"{orthanc.url}/studies/{study}", timeout=60)


def main() -> None:
    rows = []
    breakdown: list[tuple[str, float, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        root = Path(tmp)
        orthanc = Orthanc(root / "orthanc").start()
        embedded = HubProcess(root / "hub-embedded").init().start()
        dicomweb = HubProcess(root / "hub-dicomweb", {
            "PAS_HUB_ARCHIVE__KIND": "dicomweb",
            "PAS_HUB_ARCHIVE__URL": orthanc.dicomweb}).init().start()
        try:
            site_e = enroll(embedded, root / "site-e", "BENCH")
            site_d = enroll(dicomweb, root / "site-d", "BENCH")
            for name, folder in SETS.items():
                files = sorted(p for p in folder.rglob("*") if p.is_file())
                items = list({i.sop_instance_uid: i for i in pack_items(files)}.values())
                unique = [i.path for i in items]
                original = sum(i.size for i in items)
                start = time.perf_counter()
                ship_e = ship(items, site_e.hub_transfer_key, 6 << 20)
                pack_s = time.perf_counter() - start
                ship_d = ship(items, site_d.hub_transfer_key, 6 << 20)
                sealed = sum(map(len, ship_e.buckets))
                with client(site_e) as http:
                    embedded_s = upload_and_commit(http, ship_e)
                empty(orthanc)
                with client(site_d) as http:
                    hub_stow_s = upload_and_commit(http, ship_d)
                empty(orthanc)
                direct_s = stow_direct(orthanc, unique)
                empty(orthanc)
                rows.append((name, len(items), original, sealed, pack_s, embedded_s,
                             hub_stow_s, direct_s))
                breakdown.append((name, *phases(embedded, ship_e.transfer_id),
                                  *phases(dicomweb, ship_d.transfer_id)))
        finally:
            embedded.stop()
            dicomweb.stop()
            orthanc.stop()

    print("\nHub on loopback (2 cores shared; MB = 10^6 bytes of original DICOM)\n")
    head = ("set", "inst", "orig MB", "sealed MB", "pack+seal s", "hub embedded s",
            "hub->Orthanc s", "STOW direct s", "embedded MB/s", "hub->Orthanc / direct")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for name, count, original, sealed, pack_s, emb, hub_stow, direct in rows:
        print(" | ".join([
            name, str(count), f"{original / 1e6:.1f}", f"{sealed / 1e6:.1f}", f"{pack_s:.2f}",
            f"{emb:.2f}", f"{hub_stow:.2f}", f"{direct:.2f}", f"{original / 1e6 / emb:.0f}",
            f"{hub_stow / direct:.2f}x time"]))
    print("\nCommit phases (from the hub's log): set | embedded rebuild s | embedded archive s |"
          " dicomweb rebuild s | dicomweb STOW s")
    for name, e_rebuild, e_archive, d_rebuild, d_archive in breakdown:
        print(f"{name} | {e_rebuild:.2f} | {e_archive:.2f} | {d_rebuild:.2f} | {d_archive:.2f}")
    print("\n'hub->Orthanc / direct' > 1: the hub's receive, rebuild and SHA-256 check cost "
          "that much time on top of the STOW-RS it then does itself.")


if __name__ == "__main__":
    main()
