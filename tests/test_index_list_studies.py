"""``pas studies`` (index.list_studies) lists and counts what C-FIND does after corrections,
on a real SQLite index.

Found in review (s38): list_studies counted every series row of a study and every modality
of those, and listed every study row; C-FIND (appliance/store/query.py) lists and counts a
study or series only while it holds a current instance. After a correction moving an
instance to another series (modality OT fixed to CT) the study showed 2 series and
"OT,CT"; after one moving an instance to another study, the old study was listed with 0
instances.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from appliance.store import index, query
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile

ROOT = "1.2.826.0.1.3680043.8.498"


def _file(db: Database, sop: str, study: str, series: str, modality: str, tag: str) -> None:
    sha = hashlib.sha256(tag.encode()).hexdigest()
    index.record_instance(db, InstanceRecord(
        sop_instance_uid=f"{ROOT}.{sop}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", study_uid=f"{ROOT}.{study}",
        series_uid=f"{ROOT}.{series}", patient_id="P-11", modality=modality),
        StoredFile(f"{sha[:2]}/{sha}.dcm", 100, sha))


def test_pas_studies_counts_and_lists_only_what_holds_a_current_instance(
        tmp_path: Path) -> None:
    """Before: study 91 listed with 2 series and modalities OT,CT; study 93 (its only
    instance moved to study 94) listed with 0 instances."""
    db = Database(tmp_path / "pas.sqlite")
    _file(db, "1", "91", "81", "OT", "first")
    _file(db, "1", "91", "82", "CT", "modality fixed: another series")
    _file(db, "2", "93", "83", "MR", "second")
    _file(db, "2", "94", "84", "MR", "filed under another study")
    listed = {r["study_uid"]: (r["series"], r["instances"], r["modalities"])
              for r in index.list_studies(db)}
    assert listed == {f"{ROOT}.91": (1, 1, "CT"), f"{ROOT}.94": (1, 1, "MR")}
    found = {r["StudyInstanceUID"]: (r["NumberOfStudyRelatedSeries"],
                                     r["NumberOfStudyRelatedInstances"], r["ModalitiesInStudy"])
             for r in query.find(db, "STUDY", {
                 "StudyInstanceUID": "", "NumberOfStudyRelatedSeries": "",
                 "NumberOfStudyRelatedInstances": "", "ModalitiesInStudy": ""})}
    assert found == listed  # pas studies and C-FIND agree
    assert [r["study_uid"] for r in index.list_studies(db, "P-11")] == \
        [f"{ROOT}.94", f"{ROOT}.91"]  # one patient's: the same rule
    db.close()
