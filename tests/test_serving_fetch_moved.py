"""Fetch-through does not download again, at every retrieve, the region's copy of an
instance the sender moved to another study.

A correction that puts an image's Study Instance UID right leaves the region listing it
under the old study (the region keeps what it was sent). PAS holds it under the new study
and files the region's copy of the old study as an older version, never served there; yet
fetch-through took it for missing from the old study and downloaded it again at each
retrieve of that study: one instance's WAN cost each time, a whole study's for a study
moved whole (the session notes' carried "fetch-through re-downloads a moved instance").

Real peers: Orthanc as the region (plain DICOMweb, ``prefetch.dicomweb_url``), DCMTK's
storescu as the modality and getscu as the viewer, httpx as the DICOMweb one, a real ``pas run``.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from appliance.hub.archive import EmbeddedArchive, RebuiltInstance
from appliance.ingest.receive import Receiver
from appliance.store import index, retrieve
from appliance.store import prefetch as prefetch_store
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from appliance.store.spool import Spool
from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, Orthanc, PasProcess, read_rows, storescu

pytestmark = pytest.mark.root
CT_IMAGE, EXPLICIT_LE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"


def _retrieve(pas: PasProcess, study: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{study}",
                     headers={"Accept": 'multipart/related; type="application/dicom"'},
                     timeout=60)


def _c_get(pas: PasProcess, study: str, out: Path) -> set[str]:
    """DCMTK getscu of the study: the SOP Instance UIDs received."""
    out.mkdir(parents=True)
    result = subprocess.run(["getscu", "-S", "-aet", "VIEWER", "-aec", "PAS",
                             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                             "-od", str(out), "127.0.0.1", str(pas.port)],
                            env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}


def _fetched_lines(pas: PasProcess, study: str) -> int:
    return sum(f"of {study} from the region" in line and "fetched" in line
               for line in pas.log().splitlines())


def test_an_instance_moved_to_another_study_is_not_fetched_again(
        tmp_path: Path, orthanc_factory: Any) -> None:
    region: Orthanc = orthanc_factory()
    old_study, moved_whole, new_study = generate_uid(), generate_uid(), generate_uid()
    stays = tiny_ct(old_study, PatientID="PIDMV", InstanceNumber=1)
    moves = tiny_ct(old_study, PatientID="PIDMV", InstanceNumber=2)
    alone = tiny_ct(moved_whole, PatientID="PIDMV")  # its study's only image
    paths = {}
    for name, ds in (("stays", stays), ("moves", moves), ("alone", alone)):
        paths[name] = tmp_path / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    storescu(list(paths.values()), region.dicom_port, host=region.host, called="ORTHANC")

    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": region.dicomweb, "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
        "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "10"}).start()
    try:
        storescu(list(paths.values()), pas.port)
        # The QA workstation's correction: both images of the wrong study, to the right one.
        for name in ("moves", "alone"):
            ds = tiny_ct(new_study, PatientID="PIDMV")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
                moves if name == "moves" else alone).SOPInstanceUID
            corrected = tmp_path / f"{name}-corrected.dcm"
            ds.save_as(corrected, enforce_file_format=True)
            storescu([corrected], pas.port)
        current = {r["sop_instance_uid"]: r["study_uid"] for r in read_rows(
            pas.home / "pas.sqlite", "SELECT i.sop_instance_uid, s.study_uid FROM instances "
            "i JOIN studies s ON s.id = i.study_fk WHERE i.is_current = 1")}
        assert current == {str(stays.SOPInstanceUID): old_study,
                           str(moves.SOPInstanceUID): new_study,
                           str(alone.SOPInstanceUID): new_study}

        for attempt in range(2):  # each retrieve asked the region, and downloaded again
            # A C-GET of the study held in part (the image that stayed), as a viewer does.
            got = _c_get(pas, old_study, tmp_path / f"get-{attempt}")
            assert got == {str(stays.SOPInstanceUID)}
            gone = _retrieve(pas, moved_whole)  # every image of it moved: nothing to serve
            assert gone.status_code == 404, gone.text
        assert _fetched_lines(pas, old_study) == 0, pas.log()[-3000:]
        assert _fetched_lines(pas, moved_whole) == 0, pas.log()[-3000:]
        rows = read_rows(pas.home / "pas.sqlite",
                         "SELECT count(*) AS n FROM instances WHERE calling_ae = 'REGION'")
        assert rows[0]["n"] == 0
    finally:
        pas.stop()


def test_a_bucketed_download_is_told_the_moved_instances_are_here(tmp_path: Path) -> None:
    """The hub's bucketed download of a study skips what the appliance says it has: the
    study's current instances, and now those moved from it to another study here."""
    db = Database(tmp_path / "pas.sqlite")
    try:
        def record(sop: str, study: str, sha: str) -> None:
            index.record_instance(db, InstanceRecord(sop, CT_IMAGE, EXPLICIT_LE, study,
                                                     study + ".1", patient_id="P"),
                                  StoredFile(f"f-{sha}", 1, sha * 64))

        record("1.9.1", "1.9", "a")  # stays in 1.9
        record("1.9.2", "1.9", "b")  # moved: its correction names study 1.8
        record("1.9.2", "1.8", "c")
        assert retrieve.study_sop_uids(db, "1.9") == {"1.9.1"}
        assert retrieve.moved_out_of(db, "1.9") == {"1.9.2"}
        assert retrieve.moved_out_of(db, "1.8") == set()
        assert retrieve.current_elsewhere(db, "1.9", ["1.9.1", "1.9.2", "1.7.1"]) == {"1.9.2"}
        assert retrieve.current_elsewhere(db, "1.8", ["1.9.2"]) == set()
        # The prefetch of a prior asks the hub for what is not held, moved ones left out.
        assert prefetch_store.held_instance_uids(db, "1.9") == {"1.9.1", "1.9.2"}
        assert prefetch_store.held_instance_uids(db, "1.8") == {"1.9.2"}
    finally:
        db.close()


def test_the_regions_copy_of_a_moved_instance_never_moves_it_back(tmp_path: Path) -> None:
    """Review s43: the region's copy of an instance moved here to another study, filed as
    current once the region had confirmed the correction, moved it back to the old study
    (served there again, the correction undone). A bucketed download after the old study's
    rows were evicted still brings that copy. It is kept as an older version now, in the
    current version's study, whichever path brought it."""
    db = Database(tmp_path / "pas.sqlite")
    try:
        def record(sop: str, study: str, sha: str, origin: str = "local") -> Any:
            return index.record_instance(
                db, InstanceRecord(sop, CT_IMAGE, EXPLICIT_LE, study, study + ".1",
                                   patient_id="P"),
                StoredFile(f"f-{sha}", 1, sha * 64), origin=origin,
                keep_local_moves=origin == "regional")  # as the appliance's Receiver files

        def current(sop: str) -> list[tuple[str, str]]:
            return [(r["study_uid"], r["sha256"][0]) for r in db.query(
                "SELECT s.study_uid, i.sha256 FROM instances i JOIN studies s "
                "ON s.id = i.study_fk WHERE i.sop_instance_uid = ? AND i.is_current = 1",
                (sop,))]

        record("1.9.2", "1.9", "a")  # sent to the region under 1.9
        record("1.9.2", "1.8", "c")  # the correction: study 1.8
        with db.transaction() as conn:  # the region confirmed both
            conn.execute("UPDATE instances SET routed_at = 1, confirmed_at = 1")
        fetched = record("1.9.2", "1.9", "a", origin="regional")  # the old copy, fetched
        assert fetched.duplicate and not fetched.conflict
        assert current("1.9.2") == [("1.8", "c")]

        # The old study evicted here (its rows gone): the copy comes again, other bytes.
        record("2.9.2", "2.8", "d")
        with db.transaction() as conn:
            conn.execute("UPDATE instances SET routed_at = 1, confirmed_at = 1")
        kept = record("2.9.2", "2.9", "e", origin="regional")
        assert current("2.9.2") == [("2.8", "d")]
        row = db.query_one("SELECT is_current, study_fk FROM instances WHERE id = ?",
                           (kept.instance_id,))
        assert row is not None and row["is_current"] == 0

        # Bytes this index saw replaced, in the same study: stale too (review s43b).
        record("4.9.2", "4.9", "h")
        record("4.9.2", "4.9", "i")  # the correction, same study
        with db.transaction() as conn:
            conn.execute("UPDATE instances SET routed_at = 1, confirmed_at = 1")
        stale = record("4.9.2", "4.9", "h", origin="regional")
        assert stale.duplicate and current("4.9.2") == [("4.9", "i")]

        # Within its own study the region's newer bytes still serve (unchanged).
        record("3.9.2", "3.9", "f")
        with db.transaction() as conn:
            conn.execute("UPDATE instances SET routed_at = 1, confirmed_at = 1")
        record("3.9.2", "3.9", "g", origin="regional")
        assert current("3.9.2") == [("3.9", "g")]
    finally:
        db.close()


def test_the_hubs_archive_follows_a_sites_correction_to_another_study(
        tmp_path: Path) -> None:
    """Review s43b: the hub's embedded archive files every site upload as a regional copy;
    the rule above (a regional copy never moves an instance here) made the archive keep a
    site's correction to another study as an older version: the region served the old
    study with the old bytes, nothing under the new one, and its holdings missed the pair.
    The archive follows the site's word; only the appliance's own copies keep moves."""
    archive = EmbeddedArchive(tmp_path / "archive")
    ds = tiny_ct("1.2.3.9", PatientID="P")
    sop = str(ds.SOPInstanceUID)

    def upload(study: str, name: str) -> str:
        ds.StudyInstanceUID = study
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        archive.store([RebuiltInstance(sop, path, len(data), sha)], "CHU-A")
        return sha

    upload("1.2.3.9", "v1.dcm")  # the site's first upload
    corrected = upload("1.2.3.8", "v2.dcm")  # its correction: another study
    assert retrieve.study_sop_uids(archive.db, "1.2.3.8") == {sop}
    assert retrieve.study_sop_uids(archive.db, "1.2.3.9") == set()
    assert retrieve.held_versions(archive.db, "1.2.3.8", [(sop, corrected)]) == {
        (sop, corrected)}


def test_the_receiver_keeps_the_regions_copy_of_a_moved_instance_behind(
        tmp_path: Path) -> None:
    """What fetch-through and the prefetch call (Receiver.receive_file, origin="regional")
    asks for the rule: the region's copy of the old study never moves the instance back."""
    db = Database(tmp_path / "pas.sqlite")
    try:
        receiver = Receiver(db, Spool(tmp_path / "spool"))
        old = tiny_ct("1.2.9", PatientID="P")
        moved = tiny_ct("1.2.8", PatientID="P")
        moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = old.SOPInstanceUID

        def part10(ds: Any) -> bytes:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            return buffer.getvalue()

        receiver.receive_file(part10(old))
        receiver.receive_file(part10(moved))  # the correction
        with db.transaction() as conn:  # the region confirmed both
            conn.execute("UPDATE instances SET routed_at = 1, confirmed_at = 1")
        receiver.receive_file(part10(old), calling_ae="REGION", source="region",
                              origin="regional")
        assert [tuple(r) for r in db.query(
            "SELECT s.study_uid FROM instances i JOIN studies s ON s.id = i.study_fk "
            "WHERE i.is_current = 1")] == [("1.2.8",)]
    finally:
        db.close()
