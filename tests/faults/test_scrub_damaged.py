"""A file the scrub finds damaged is set aside, not served, and healed by a re-send.

The daemon's background scrub re-hashes the spool against the index. A file whose bytes are
no longer those received (a failing disk, silent corruption) was only flagged: it stayed in
place and was served as it was, a C-GET or C-MOVE sending the wrong bytes to the viewer,
until an operator ran ``pas verify --repair``. The modality's re-send did not heal it either
(a same-size file under its name counts as held). Only missing files were exported to
Prometheus. Now the scrub moves the damaged copy to ``spool/quarantine`` and flags the row
missing as well as damaged: its study is served as one with a lost file (the rest, and the
lost one named as failed), ``pas_spool_files_damaged`` counts it, and a re-send writes the
right bytes back.

Real peers: ``pas run`` with its scrub, DCMTK storescu as the modality, pynetdicom's C-GET
as the viewer (its final response and what it received), /metrics over HTTP.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.support.peers import MR_DIR, PasProcess, read_rows, storescu, wait_for
from tests.test_serving_partly_lost import _metric, _retrieve


def _open_flags(home: Path) -> set[tuple[str, str]]:
    return {(r["kind"], r["path"]) for r in read_rows(
        home / "pas.sqlite", "SELECT kind, path FROM integrity_issues "
                             "WHERE resolved_at IS NULL AND kind != 'evicting'")}


def test_a_damaged_file_is_set_aside_served_as_lost_and_healed_by_a_resend(
        tmp_path: Path) -> None:
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:3]
    home = tmp_path / "pas"
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_CACHE__SCRUB_MB_PER_S": "0",
           "PAS_PREFETCH__ENABLED": "false"}
    pas = PasProcess(home, env).start()
    try:
        storescu(files, pas.port)
    finally:
        pas.stop()
    rows = read_rows(home / "pas.sqlite",
                     "SELECT sop_instance_uid, path, study_fk FROM instances ORDER BY id")
    assert len(rows) == 3
    damaged = rows[1]
    stored = home / "spool" / damaged["path"]
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # one bit of the pixel data, the size unchanged
    stored.write_bytes(bytes(data))

    pas = PasProcess(home, {**env, "PAS_CACHE__SCRUB_MB_PER_S": "50"}).start()
    try:
        wait_for(lambda: _open_flags(home) == {("hash_mismatch", damaged["path"]),
                                               ("missing", damaged["path"])}, 60,
                 what="the damaged file flagged and set aside")
        assert not stored.exists()
        assert [p.name for p in (home / "spool" / "quarantine").iterdir()] == [
            damaged["path"].replace("/", "_")]
        assert _metric(pas, "pas_spool_files_damaged") == 1.0
        assert _metric(pas, "pas_spool_files_missing") == 1.0
        page = httpx.get(f"http://127.0.0.1:{pas.http_port}/", timeout=10).text
        assert '<span class="state warn" id="files-damaged">1 file damaged</span>' in page
        # Not enrolled, no region configured: the page does not promise a fetch from one.
        assert "no region to fetch them from: send their studies again from the modality" \
            in page and "fetches the confirmed ones from the region" not in page

        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study
        final, failed, received = _retrieve(pas.port, "get", identifier)
        # The two sound instances, and the damaged one named as failed: not its wrong bytes.
        assert received == {rows[0]["sop_instance_uid"], rows[2]["sop_instance_uid"]}
        assert int(final.Status) == 0xB000 and failed == {damaged["sop_instance_uid"]}

        # The modality sends the study again: the right bytes are back, served whole.
        storescu(files, pas.port)
        final, failed, received = _retrieve(pas.port, "get", identifier)
        assert int(final.Status) == 0x0000 and failed == set()
        assert received == {r["sop_instance_uid"] for r in rows}
        assert stored.exists()
        assert _open_flags(home) == {("hash_mismatch", damaged["path"])}  # seen so far
        # Re-hashed (pas verify here; the scrub's next pass, a minute after this one ended,
        # does the same): sound, every flag resolved.
        assert pas.cli("verify").returncode == 0
        assert _open_flags(home) == set()
        assert _metric(pas, "pas_spool_files_damaged") == 0.0
    finally:
        pas.stop()
