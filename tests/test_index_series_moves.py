"""A SeriesInstanceUID the index already holds, arriving under another study: each study gets
a series row of its own (schema migration 26), on a real SQLite index.

Found in review (s38): series were unique on their UID alone. A correction re-sending an
instance with a new StudyInstanceUID and the same series (or a modality reusing a series UID
across studies) filed the instance under the new study but in the OLD study's series row.
C-FIND listed the new study with no series and no modality; ``pas cache purge --force`` of
the old study failed ("FOREIGN KEY constraint failed"); and the cache policy, which evicts
that empty old study first, failed EVERY pass on the same IntegrityError: nothing was
evicted any more and the disk filled.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.ops.cache_policy import CachePolicy
from appliance.store import eviction, index, query, retrieve
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from appliance.store.schema import MIGRATIONS
from appliance.store.spool import Spool

OLD, NEW, OTHER = "1.2.826.0.1.3680043.8.498.91", "1.2.826.0.1.3680043.8.498.92", \
    "1.2.826.0.1.3680043.8.498.99"
SERIES = "1.2.826.0.1.3680043.8.498.81"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DAY_S = 86400.0


def _record(sop: str, study: str, series: str = SERIES, **attributes: object) -> InstanceRecord:
    return InstanceRecord(**{  # type: ignore[arg-type]
        "sop_instance_uid": sop, "sop_class_uid": CT_IMAGE,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "study_uid": study,
        "series_uid": series, "patient_id": "P-81", "patient_name": "DOE^J",
        "modality": "CT", **attributes})


def _stored(tag: str, size: int = 100) -> StoredFile:
    sha = hashlib.sha256(tag.encode()).hexdigest()
    return StoredFile(f"{sha[:2]}/{sha}.dcm", size, sha)


def _cross_linked(db: Database) -> list[tuple[str, str, str]]:
    """(SOP Instance UID, its study, its series' study) of every row whose series is
    another study's: none, ever."""
    return [tuple(r) for r in db.query(
        "SELECT i.sop_instance_uid, s.study_uid, o.study_uid FROM instances i "
        "JOIN series se ON se.id = i.series_fk JOIN studies s ON s.id = i.study_fk "
        "JOIN studies o ON o.id = se.study_fk WHERE se.study_fk != i.study_fk")]


def _corrected(db: Database) -> None:
    """Two instances of study OLD, series SERIES; then both re-sent as a correction filed
    under study NEW, the same series UID."""
    for sop in ("1.1", "1.2"):
        index.record_instance(db, _record(sop, OLD), _stored(f"{sop} in old"))
    for sop in ("1.1", "1.2"):
        index.record_instance(db, _record(sop, NEW), _stored(f"{sop} in new"))


def test_a_correction_to_another_study_files_its_series_under_that_study(
        tmp_path: Path) -> None:
    """Before: STUDY level listed NEW with 0 series and no ModalitiesInStudy, SERIES level
    under NEW listed nothing, and the series still showed under OLD (whose row it was)."""
    db = Database(tmp_path / "pas.sqlite")
    _corrected(db)
    assert _cross_linked(db) == []
    studies = list(query.find(db, "STUDY", {
        "StudyInstanceUID": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": ""}))
    assert studies == [{"StudyInstanceUID": NEW, "ModalitiesInStudy": "CT",
                        "NumberOfStudyRelatedSeries": 1, "NumberOfStudyRelatedInstances": 2}]
    assert list(query.find(db, "SERIES", {
        "StudyInstanceUID": NEW, "SeriesInstanceUID": "",
        "NumberOfSeriesRelatedInstances": ""})) == [
        {"StudyInstanceUID": NEW, "SeriesInstanceUID": SERIES,
         "NumberOfSeriesRelatedInstances": 2}]
    assert list(query.find(db, "SERIES", {"StudyInstanceUID": OLD,
                                          "SeriesInstanceUID": ""})) == []
    plan = retrieve.retrieve_plan(db, "SERIES", {"StudyInstanceUID": NEW,
                                                 "SeriesInstanceUID": SERIES})
    current = [r["id"] for r in db.query("SELECT id FROM instances WHERE is_current = 1 "
                                         "ORDER BY id")]
    assert sorted(plan.instance_ids) == current and plan.study_uids == [NEW]
    db.close()


def test_a_series_uid_reused_by_two_studies_is_listed_and_retrieved_in_each(
        tmp_path: Path) -> None:
    """A modality that reuses a series UID across studies: each study lists the series with
    its own instances, a retrieve of one study's series sends that study's only, and one by
    the series UID alone sends both. Before: study NEW listed no series."""
    db = Database(tmp_path / "pas.sqlite")
    index.record_instance(db, _record("2.1", OLD, series_description="OLD SERIES"),
                          _stored("2.1"))
    index.record_instance(db, _record("2.2", NEW, series_description="NEW SERIES"),
                          _stored("2.2"))
    index.record_instance(db, _record("2.3", NEW), _stored("2.3"))
    assert _cross_linked(db) == []
    for study, count, description in ((OLD, 1, "OLD SERIES"), (NEW, 2, "NEW SERIES")):
        assert list(query.find(db, "SERIES", {
            "StudyInstanceUID": study, "SeriesInstanceUID": "", "SeriesDescription": "",
            "NumberOfSeriesRelatedInstances": ""})) == [
            {"StudyInstanceUID": study, "SeriesInstanceUID": SERIES,
             "SeriesDescription": description, "NumberOfSeriesRelatedInstances": count}]
    plan = retrieve.retrieve_plan(db, "SERIES", {"StudyInstanceUID": OLD,
                                                 "SeriesInstanceUID": SERIES})
    assert plan.study_uids == [OLD] and len(plan.instance_ids) == 1
    plan = retrieve.retrieve_plan(db, "SERIES", {"SeriesInstanceUID": SERIES})
    assert plan.study_uids == [OLD, NEW] and len(plan.instance_ids) == 3
    db.close()


def test_the_old_study_of_a_moved_series_can_be_purged(tmp_path: Path) -> None:
    """Before: ``pas cache purge --force OLD`` raised "FOREIGN KEY constraint failed"."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    _corrected(db)
    gone = eviction.evict_study(db, spool, OLD, force=True, actor="operator")
    assert gone.instances == 2
    assert [r["study_uid"] for r in db.query("SELECT study_uid FROM studies")] == [NEW]
    assert db.query("PRAGMA foreign_key_check") == []
    assert len(list(query.find(db, "IMAGE", {"StudyInstanceUID": NEW,
                                             "SOPInstanceUID": ""}))) == 2
    db.close()


def _settings(quota_mb: int) -> Settings:
    return Settings.model_validate({"storage": {"quota_mb": quota_mb},
                                    "cache": {"min_retention_days": 1}})


def _all_confirmed(db: Database, at: float) -> None:
    """Test set-up standing in for routing and the region's receipts: every row routed and
    confirmed, every study last used at ``at``."""
    with db.transaction() as conn:
        conn.execute("UPDATE instances SET routed_at = ?, confirmed_at = ?", (at, at))
        conn.execute("UPDATE studies SET last_received_at = ?, last_accessed_at = ?",
                     (at, at))


def test_an_eviction_pass_is_not_stopped_by_the_old_study_of_a_moved_series(
        tmp_path: Path) -> None:
    """The corrected instance's old study (versions only) is the least recently used: the
    pass evicts it first. Before: every pass raised IntegrityError and evicted nothing."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    mib = 1024 * 1024
    for n in range(3):  # another confirmed study, used later
        index.record_instance(db, _record(f"3.{n}", OTHER, series=f"{SERIES}.9"),
                              _stored(f"other {n}", 10 * mib))
    index.record_instance(db, _record("1.1", OLD), _stored("old", 10 * mib))
    index.record_instance(db, _record("1.1", NEW), _stored("new", 10 * mib))
    long_ago = time.time() - 40 * DAY_S
    _all_confirmed(db, long_ago)
    with db.transaction() as conn:
        conn.execute("UPDATE studies SET last_accessed_at = ? WHERE study_uid = ?",
                     (long_ago + 100, OTHER))
    policy = CachePolicy(_settings(40), db, spool)
    done = policy.evict_if_needed()
    assert (done.evicted, done.skipped) == ([OLD, NEW], {})
    assert [r["study_uid"] for r in db.query("SELECT study_uid FROM studies")] == [OTHER]
    db.close()


def test_evicting_a_study_whose_series_another_study_names_gives_those_their_own(
        tmp_path: Path) -> None:
    """Rows cross-linked as a build before this fix filed them (written here by hand: the
    migration repairs those of an upgrade): OLD's series row named by NEW's instance. Its
    eviction moves that instance to a series row of NEW and evicts OLD. Before: "FOREIGN KEY
    constraint failed", OLD and NEW kept."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    index.record_instance(db, _record("4.1", OLD, series_number=7), _stored("4.1"))
    index.record_instance(db, _record("4.2", NEW, series=f"{SERIES}.2"), _stored("4.2"))
    with db.transaction() as conn:  # what _upsert_series did before: OLD's row
        conn.execute("UPDATE instances SET series_fk = (SELECT id FROM series WHERE "
                     "series_uid = ?) WHERE sop_instance_uid = '4.2'", (SERIES,))
        conn.execute("DELETE FROM series WHERE series_uid = ?", (f"{SERIES}.2",))
    assert _cross_linked(db) == [("4.2", NEW, OLD)]
    eviction.evict_study(db, spool, OLD, force=True, actor="operator")
    assert _cross_linked(db) == [] and db.query("PRAGMA foreign_key_check") == []
    assert list(query.find(db, "SERIES", {"StudyInstanceUID": "", "SeriesInstanceUID": "",
                                          "SeriesNumber": ""})) == [
        {"StudyInstanceUID": NEW, "SeriesInstanceUID": SERIES, "SeriesNumber": 7}]
    db.close()


def test_a_pass_skips_a_study_whose_eviction_the_index_refuses_and_evicts_the_next(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A study whose deletion breaks a constraint of the index (a trigger stands in for
    whatever rows a bug left) is skipped, named in the pass's result and in an error line,
    and the next study evicted. Before: the IntegrityError ended the pass, the same study
    came first in the next one, and nothing was ever evicted again."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    mib = 1024 * 1024
    index.record_instance(db, _record("5.1", OLD), _stored("5.1", 24 * mib))
    index.record_instance(db, _record("5.2", NEW, series=f"{SERIES}.2"),
                          _stored("5.2", 10 * mib))
    long_ago = time.time() - 40 * DAY_S
    _all_confirmed(db, long_ago)
    with db.transaction() as conn:
        conn.execute("UPDATE studies SET last_accessed_at = ? WHERE study_uid = ?",
                     (long_ago + 100, NEW))
        conn.execute(f"CREATE TRIGGER refuse BEFORE DELETE ON studies WHEN "
                     f"OLD.study_uid = '{OLD}' BEGIN SELECT RAISE(ABORT, "
                     f"'FOREIGN KEY constraint failed'); END")
    policy = CachePolicy(_settings(25), db, spool)  # 136% used, 96% without NEW
    with caplog.at_level(logging.INFO, logger="pas.cache"):
        done = policy.evict_if_needed()
        again = policy.evict_if_needed()
    assert done.evicted == [NEW] and list(done.skipped) == [OLD]
    assert "FOREIGN KEY constraint failed" in done.skipped[OLD]
    assert (again.evicted, list(again.skipped)) == ([], [OLD])  # still above: tried again
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
              and OLD in r.getMessage()]
    assert len(errors) == 1, errors  # once, not every pass
    assert [r["study_uid"] for r in db.query("SELECT study_uid FROM studies")] == [OLD]
    db.close()


def test_the_upgrade_gives_cross_linked_instances_a_series_of_their_own_study(
        tmp_path: Path) -> None:
    """Migration 26 on rows an older build cross-linked (written here as it wrote them):
    the instance gets a series row of its own study, a copy of the old one's attributes;
    every other row keeps its id; the foreign keys hold; the (series UID, study) key is
    unique. Before: no migration, NEW listed with no series."""
    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:25])
    with old.transaction() as conn:
        conn.execute("INSERT INTO patients (id, patient_id) VALUES (1, 'P-81')")
        for study_id, uid in ((1, OLD), (2, NEW)):
            conn.execute("INSERT INTO studies (id, study_uid, patient_fk, first_received_at, "
                         "last_received_at) VALUES (?, ?, 1, 1, 1)", (study_id, uid))
        conn.execute("INSERT INTO series (id, series_uid, study_fk, series_number, modality, "
                     "description) VALUES (5, ?, 1, 3, 'CT', 'AXIAL')", (SERIES,))
        for n, (study_id, current) in enumerate(((1, 0), (2, 1), (2, 1)), 1):
            conn.execute(
                "INSERT INTO instances (id, sop_instance_uid, series_fk, study_fk, "
                "sop_class_uid, transfer_syntax_uid, path, size, sha256, received_at, "
                "is_current) VALUES (?, ?, 5, ?, ?, '1.2.840.10008.1.2.1', ?, 1, ?, 1, ?)",
                (n, f"6.{n}", study_id, CT_IMAGE, f"aa/{n}.dcm", f"{n:064d}", current))
    old.close()
    new = Database(path)
    assert new.schema_version() == len(MIGRATIONS) >= 26
    assert _cross_linked(new) == []
    assert new.query("PRAGMA foreign_key_check") == []
    rows = [tuple(r) for r in new.query(
        "SELECT i.id, se.id = 5, s.study_uid, se.series_uid, se.series_number, se.modality, "
        "se.description FROM instances i JOIN series se ON se.id = i.series_fk "
        "JOIN studies s ON s.id = se.study_fk ORDER BY i.id")]
    assert rows == [(1, 1, OLD, SERIES, 3, "CT", "AXIAL"),
                    (2, 0, NEW, SERIES, 3, "CT", "AXIAL"),
                    (3, 0, NEW, SERIES, 3, "CT", "AXIAL")]
    assert list(query.find(new, "STUDY", {"StudyInstanceUID": "",
                                           "NumberOfStudyRelatedSeries": ""})) == [
        {"StudyInstanceUID": NEW, "NumberOfStudyRelatedSeries": 1}]
    with pytest.raises(sqlite3.IntegrityError), new.transaction() as conn:
        conn.execute("INSERT INTO series (series_uid, study_fk) VALUES (?, 2)", (SERIES,))
    index.record_instance(new, _record("6.4", NEW), _stored("6.4"))  # filed in NEW's row
    assert _cross_linked(new) == []
    new.close()
