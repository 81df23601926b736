"""An older version of an instance, adopted by start-up recovery beside the current one, then
sent again by the modality: it serves from its own study and series, on a real SQLite index.

Found in review (s38): recovery keeps an adopted older version in the CURRENT version's
study and series (its header's study must not be touched by bytes older than a correction).
Sent again (the correction taken back), it became current but stayed filed there: C-FIND
showed it in the corrected study and series, routing sent it as part of that study, and its
own study got a row holding no instance at all.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from appliance.store import index, query
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile

SOP = "1.2.826.0.1.3680043.8.498.1001"
FIRST_STUDY, FIRST_SERIES = "1.2.826.0.1.3680043.8.498.91", "1.2.826.0.1.3680043.8.498.81"
CORRECTED_STUDY, CORRECTED_SERIES = ("1.2.826.0.1.3680043.8.498.92",
                                     "1.2.826.0.1.3680043.8.498.82")


def _record(study: str, series: str, modality: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=SOP, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", study_uid=study, series_uid=series,
        patient_id="P-1001", patient_name="DOE^J", modality=modality)


def _stored(tag: str) -> StoredFile:
    sha = hashlib.sha256(tag.encode()).hexdigest()
    return StoredFile(f"{sha[:2]}/{sha}.dcm", 100, sha)


def test_an_adopted_older_version_sent_again_serves_from_its_own_study_and_series(
        tmp_path: Path) -> None:
    """Version B (the correction: another study, series and modality) is current; recovery
    adopts A, written a minute before B; the modality sends A again. Before: A was current
    but still under B's study and series (C-FIND found it there, MR), its own study was an
    empty row, and it would have been routed with B's study."""
    db = Database(tmp_path / "pas.sqlite")
    index.record_instance(db, _record(CORRECTED_STUDY, CORRECTED_SERIES, "MR"), _stored("B"))
    adopted = index.record_instance(db, _record(FIRST_STUDY, FIRST_SERIES, "CT"),
                                    _stored("A"), received_at=time.time() - 60)
    assert not db.query_one("SELECT is_current FROM instances WHERE id = ?",
                            (adopted.instance_id,))["is_current"]
    again = index.record_instance(db, _record(FIRST_STUDY, FIRST_SERIES, "CT"), _stored("A"))
    assert (again.instance_id, again.duplicate) == (adopted.instance_id, False)

    assert list(query.find(db, "IMAGE", {"StudyInstanceUID": "", "SeriesInstanceUID": "",
                                         "Modality": "", "SOPInstanceUID": SOP})) == [
        {"StudyInstanceUID": FIRST_STUDY, "SeriesInstanceUID": FIRST_SERIES,
         "Modality": "CT", "SOPInstanceUID": SOP}]
    assert list(query.find(db, "STUDY", {"StudyInstanceUID": "", "ModalitiesInStudy": "",
                                         "NumberOfStudyRelatedInstances": ""})) == [
        {"StudyInstanceUID": FIRST_STUDY, "ModalitiesInStudy": "CT",
         "NumberOfStudyRelatedInstances": 1}]
    # No study row without an instance row, no instance in another study's series.
    assert db.query("SELECT study_uid FROM studies s WHERE NOT EXISTS "
                    "(SELECT 1 FROM instances i WHERE i.study_fk = s.id)") == []
    assert db.query("SELECT i.id FROM instances i JOIN series se ON se.id = i.series_fk "
                    "WHERE se.study_fk != i.study_fk") == []
    # Routed again, as part of its own study.
    first_fk = db.query_one("SELECT id FROM studies WHERE study_uid = ?",
                            (FIRST_STUDY,))["id"]
    assert [r["sop_instance_uid"] for r in index.unrouted_instances(db, first_fk)] == [SOP]
    db.close()
