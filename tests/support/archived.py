"""Reading back what a real Orthanc holds, for the uplink tests: SOP Instance UID -> SHA-256
of the file Orthanc serves (/instances/{id}/file), over one keep-alive connection."""

from __future__ import annotations

import hashlib

import httpx

from tests.support.peers import Orthanc


def orthanc_hashes(orthanc: Orthanc) -> dict[str, str]:
    hashes: dict[str, str] = {}
    with httpx.Client(base_url=orthanc.url, timeout=60, auth=orthanc.auth) as http:
        listing = http.get("/instances", params={"expand": ""})
        listing.raise_for_status()
        for instance in listing.json():
            uid = instance["MainDicomTags"]["SOPInstanceUID"]
            data = http.get(f"/instances/{instance['ID']}/file")
            data.raise_for_status()
            hashes[uid] = hashlib.sha256(data.content).hexdigest()
    return hashes
