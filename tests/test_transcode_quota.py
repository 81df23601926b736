"""A copy in another transfer syntax counts against ``storage.quota_mb``, and each sender
turns its refusal into the answer its protocol has for "not now, no room".

Found in review: ``Spool.open_temp`` checked a temporary copy (a compressed instance
decompressed for a peer without its syntax, appliance/store/transcode.py) against the
free-space floor only. On a spool sharing a large disk, with a quota set, a viewer asking
for a large compressed object in Explicit VR Little Endian took the spool past its quota by
the decoded size. Here the quota is just too small for the copy (4 MiB; the object is 4 MiB
decoded, ~70 kB stored): WADO-RS answers 503 naming the quota before its first byte, a C-GET
by a viewer accepting only uncompressed syntaxes gets 0xA702 with the sub-operation failed,
the routing job to a node without RLE waits for room without using up its attempts (it was
counted, and failed for good after queue.max_attempts: hours of a full disk lost a node
without RLE its studies), each saying why, and no copy is left behind; with a larger quota
after a restart the job delivers the decoded copy. What needs no copy (the stored syntax) is
served as before.

Real peers: DCMTK storescu (the modality), getscu (the viewer), storescp (a LAN node
without RLE), httpx (the web viewer).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

import httpx
from pydicom import dcmread

from tests.support.configs import everything_to
from tests.support.peers import DCMTK_ENV, PasProcess, StoreSCP, storescu, wait_for
from tests.test_routing import jobs_of
from tests.test_serving_retrieve_audit import final_counts
from tests.test_transcode_memory import SIDE, _copies_held, _rle_object

QUOTA_MB = 4
FRAMES = 4  # 1 MiB each decoded: the copy is the quota and the file's ~70 kB more
EXPLICIT = "1.2.840.10008.1.2.1"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


def _retrieves(pas: PasProcess) -> list[sqlite3.Row]:
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM audit WHERE event = 'retrieve' ORDER BY id")\
            .fetchall()
    finally:
        conn.close()


def test_a_copy_past_the_quota_is_refused_by_every_sender(tmp_path: Path) -> None:
    node = StoreSCP(tmp_path / "node", ae_title="OLDPACS").start()  # uncompressed only
    config = everything_to(tmp_path / "appliance.toml", node)
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_STORAGE__QUOTA_MB": str(QUOTA_MB),
           "PAS_CONFIG": str(config), "PAS_QUEUE__MAX_ATTEMPTS": "2",
           "PAS_QUEUE__BACKOFF_INITIAL_S": "0.2", "PAS_QUEUE__BACKOFF_MAX_S": "0.5"}
    pas = PasProcess(tmp_path / "pas", env).start()
    try:
        source = _rle_object(tmp_path / "rle.dcm", frames=FRAMES)
        header = dcmread(source, stop_before_pixels=True)
        storescu([source], pas.port, extra=["-xr"])  # RLE proposed: kept RLE
        (stored,) = list((pas.home / "spool").rglob("??/*.dcm"))
        quota, held = QUOTA_MB << 20, stored.stat().st_size
        needed = held + FRAMES * SIDE * SIDE  # the copy's room: the file and its pixels
        assert quota < held + needed < quota + (1 << 20)  # a MB too small for the copy
        refusal = (f"spool quota reached: {needed} bytes needed for a temporary copy, "
                   f"{held} in use, quota {quota}")

        # WADO-RS in Explicit VR LE: refused before the first byte, the viewer told why.
        url = (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{header.StudyInstanceUID}"
               f"/series/{header.SeriesInstanceUID}/instances/{header.SOPInstanceUID}")
        before = len(_retrieves(pas))
        answer = httpx.get(url, headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax="
                                                   f"{EXPLICIT}"}, timeout=60)
        assert answer.status_code == 503, answer.text[:500]
        assert answer.json()["detail"].startswith(refusal), answer.text
        row = wait_for(lambda: _retrieves(pas)[before:], 10, what="the WADO-RS audit row")[0]
        assert row["outcome"].startswith(f"failure: {refusal}"), row["outcome"]
        assert row["outcome"].endswith(", after 0 of 1 instance"), row["outcome"]
        # The stored syntax needs no copy: the stored bytes, as before.
        whole = httpx.get(url, headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax=*"},
                          timeout=60)
        assert whole.status_code == 200
        assert stored.read_bytes() in whole.content

        # C-GET by a viewer proposing only uncompressed syntaxes: the sub-operation fails,
        # the C-GET is 0xA702 (unable to perform sub-operations), the audit says why.
        out = tmp_path / "get"
        out.mkdir()
        before = len(_retrieves(pas))
        got = subprocess.run(
            ["getscu", "-d", "-aet", "VIEWER", "-aec", "PAS", "-S", "-od", str(out),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={header.StudyInstanceUID}",
             "127.0.0.1", str(pas.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
        assert re.search(r"DIMSE Status\s*:\s*0xa702", got.stderr, re.IGNORECASE), \
            got.stderr[-3000:]
        assert final_counts(got.stderr, "Get") == {"completed": 0, "failed": 1, "warning": 0}
        assert not [p for p in out.rglob("*") if p.is_file()]
        row = wait_for(lambda: _retrieves(pas)[before:], 10, what="the C-GET audit row")[0]
        assert row["outcome"].startswith(
            "failure: 1 of 1 instances not stored by VIEWER (copy in another transfer syntax "
            f"not made: {refusal}"), row["outcome"]

        # Routed to a node without RLE: the job waits for room, naming the quota, its tries
        # (one every half second here) not counted: never failed, whatever max_attempts (2).
        def tries() -> int:
            return pas.log().count("waits for room on the spool")

        wait_for(lambda: tries() >= 4, 60, what="four tries of the routing job")
        [job] = jobs_of(pas.home)
        assert job["state"] in ("pending", "running") and job["attempts"] <= 1, dict(job)
        assert job["last_error"].startswith("waiting for room on the spool: pacs: "), job
        assert refusal in job["last_error"], job["last_error"]
        assert not node.files()
        # The first try is the warning, the others information.
        lines = [line for line in pas.log().splitlines() if "waits for room" in line]
        assert "WARNING" in lines[0] and all("WARNING" not in line for line in lines[1:])

        wait_for(lambda: not _copies_held(pas), 10, what="no temp copy left")
    finally:
        pas.stop()
    # Room again (the operator raised the quota): the study reaches the node, decoded.
    pas = PasProcess(tmp_path / "pas", {**env, "PAS_STORAGE__QUOTA_MB": "64"}).start()
    try:
        [received] = wait_for(node.files, 60, what="the study at the node")
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done"], 30,
                 what="the job done")
        copy, original = dcmread(received), dcmread(source)
        assert copy.file_meta.TransferSyntaxUID != original.file_meta.TransferSyntaxUID
        assert copy.SOPInstanceUID == original.SOPInstanceUID
        assert copy.pixel_array.tobytes() == original.pixel_array.tobytes()
    finally:
        pas.stop()
        node.stop()
