"""Disk policy: LRU eviction of confirmed studies only, pins, retention, alert, forced purge.

Four real CT studies go through the real receive path. The test marks what the region
confirmed (the uplink does that in production: ``instances.confirmed_at``) and orders the
studies by last use, then runs eviction passes against a quota the spool exceeds.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.ingest.reading import read_record
from appliance.ingest.receive import Receiver
from appliance.ops.cache_policy import CachePolicy, pin, purge, unpin
from appliance.store import cache as cache_store
from appliance.store import eviction, index
from appliance.store.db import Database
from appliance.store.eviction import NotEvictable
from appliance.store.spool import Spool
from tests.faults.helpers import assert_consistent, spool_state
from tests.support.peers import CT_DIR, run_pas


def _confirm(db: Database, study_uid: str) -> None:
    # Test set-up standing in for the uplink's receipt handling.
    with db.transaction() as conn:
        conn.execute("UPDATE instances SET confirmed_at = 1, routed_at = coalesce(routed_at, 1) "
                     "WHERE study_fk = "
                     "(SELECT id FROM studies WHERE study_uid = ?)", (study_uid,))


def _last_used(db: Database, study_uid: str, at: float) -> None:
    with db.transaction() as conn:
        conn.execute("UPDATE studies SET last_received_at = ?, last_accessed_at = ? "
                     "WHERE study_uid = ?", (at, at, study_uid))


def _studies(db: Database) -> set[str]:
    return {r["study_uid"] for r in db.query("SELECT study_uid FROM studies")}


@pytest.fixture
def four_studies(tmp_path: Path):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    db = Database(home / "pas.sqlite")
    spool = Spool(home / "spool")
    receiver = Receiver(db, spool)
    by_study: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(CT_DIR.glob("*.dcm")):
        from pydicom import dcmread

        by_study[str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)].append(path)
    chosen = sorted(by_study)[:4]
    for uid in chosen:
        for path in by_study[uid]:
            receiver.receive_file(path.read_bytes())
    yield home, db, spool, chosen
    db.close()


def _policy(home: Path, db: Database, spool: Spool, **cache: str) -> CachePolicy:
    used = spool_state(home)
    total = sum(r["size"] for r in used["by_sop"].values())
    environ = {"PAS_HOME": str(home),
               "PAS_STORAGE__QUOTA_MB": str(max(1, total // (1024 * 1024))),
               **{f"PAS_CACHE__{k.upper()}": v for k, v in cache.items()}}
    return CachePolicy(load_settings(environ=environ), db, spool)


def test_eviction_takes_only_confirmed_unpinned_lru(four_studies) -> None:  # type: ignore[no-untyped-def]
    home, db, spool, (s1, s2, s3, s4) = four_studies
    for n, uid in enumerate((s1, s2, s3, s4)):
        _last_used(db, uid, 1000.0 + n)  # s1 least recently used
    patients = {r["study_uid"]: r["patient_id"] for r in db.query(
        "SELECT s.study_uid, p.patient_id FROM studies s JOIN patients p ON p.id = s.patient_fk")}
    for uid in (s1, s2, s3):
        _confirm(db, uid)                # s4 is NOT confirmed at the region
    assert pin(db, s2, None, "test")

    policy = _policy(home, db, spool, high_watermark_percent="50", low_watermark_percent="1")
    result = policy.evict_if_needed()
    assert result.evicted == [s1, s3]
    assert _studies(db) == {s2, s4}
    assert result.still_above_high and policy.alert is not None
    assert_consistent(home)  # files went with their rows: no orphan, nothing missing

    assert unpin(db, s2, "test")
    assert policy.evict_if_needed().evicted == [s2]
    assert _studies(db) == {s4}  # never the unconfirmed one, whatever the pressure

    with pytest.raises(NotEvictable, match="not confirmed"):
        purge(db, spool, s4, "operator:test", force=False)
    assert _studies(db) == {s4}
    events = [(r["event"], r["target"], r["outcome"]) for r in
              db.query("SELECT * FROM audit ORDER BY id")]
    assert ("delete", s1, "success") in events and ("alert", None, "failure: disk") in events
    # Each delete row keeps whose study it was, though the study's rows are gone
    # (pas audit --patient finds it).
    deleted = {r["target"]: r["patient"] for r in db.query(
        "SELECT target, patient FROM audit WHERE event = 'delete'")}
    assert deleted == {uid: patients[uid] for uid in (s1, s3, s2, s4)}
    assert any(e[0] == "delete" and e[1] == s4 and e[2].startswith("failure") for e in events)


def test_retention_keeps_recent_confirmed_studies(four_studies) -> None:  # type: ignore[no-untyped-def]
    home, db, spool, uids = four_studies
    for uid in uids:
        _confirm(db, uid)  # received just now, all confirmed
    policy = _policy(home, db, spool, high_watermark_percent="50", low_watermark_percent="1",
                     min_retention_days="1")
    assert policy.evict_if_needed().evicted == []
    assert _studies(db) == set(uids)


def test_forced_purge_from_the_cli_is_audited_and_alert_clears(four_studies) -> None:  # type: ignore[no-untyped-def]
    home, db, spool, uids = four_studies
    env = {**os.environ, "PAS_HOME": str(home)}
    refused = run_pas(["cache", "purge", uids[0]], env, timeout=60)
    assert refused.returncode == 1 and "not confirmed" in refused.stderr
    assert _studies(db) == set(uids)
    policy = _policy(home, db, spool, high_watermark_percent="50", low_watermark_percent="1")
    policy.evict_if_needed()
    assert policy.alert is not None  # nothing confirmed: nothing may go, operator warned
    for uid in uids:
        done = run_pas(["cache", "purge", uid, "--force"], env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "unconfirmed" in done.stdout
    assert _studies(db) == set()
    assert_consistent(home)
    assert spool_state(home)["files"] == 0
    policy.evict_if_needed()
    assert policy.alert is None
    forced = db.query("SELECT * FROM audit WHERE event = 'delete' AND outcome = 'success'")
    assert len(forced) == 4 and all("forced purge" in r["detail"] for r in forced)
    assert all(r["actor"].startswith("operator") for r in forced)


def test_the_disk_alert_steps_down_from_the_hard_limit_when_room_is_made(four_studies) -> None:  # type: ignore[no-untyped-def]
    """The alert's audit row was written when raised and when it became the hard limit, never
    when it went back to the watermark's: after purges made room, ``pas status``, ``pas
    doctor``, ``/metrics`` and the fleet (which read the last alert row) went on saying
    C-STOREs were refused with 0xA700 while modalities stored again."""
    from appliance.store.cache import raised_disk_alert

    home, db, spool, uids = four_studies
    sizes = {uid: sum(r["size"] for r in db.query(
        "SELECT i.size FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ?", (uid,))) for uid in uids}
    total, largest = sum(sizes.values()), max(sizes, key=lambda u: sizes[u])
    mib = 1024 * 1024
    assert sizes[largest] > mib  # the purge below takes the spool out of the hard limit
    # Over the quota's headroom with every study; under it without the largest one.
    quota_mb = (total - sizes[largest] + 4 * mib) // mib + 1
    environ = {"PAS_HOME": str(home), "PAS_STORAGE__QUOTA_MB": str(quota_mb),
               "PAS_CACHE__HIGH_WATERMARK_PERCENT": "50",
               "PAS_CACHE__LOW_WATERMARK_PERCENT": "1"}
    policy = CachePolicy(load_settings(environ=environ), db, spool)
    policy.evict_if_needed()  # nothing confirmed: nothing may go
    assert (policy.alert or "").startswith("hard limit")
    assert raised_disk_alert(db)["detail"].startswith("hard limit")  # type: ignore[index]

    purge(db, spool, largest, "operator:test", force=True)
    policy.evict_if_needed()
    assert policy.hard_limit_near() is None
    assert "above the high watermark" in (policy.alert or "")
    assert "above the high watermark" in raised_disk_alert(db)["detail"]  # type: ignore[index]
    policy.evict_if_needed()  # unchanged: not written again
    assert len(db.query("SELECT 1 FROM audit WHERE event = 'alert'")) == 2


def test_purge_of_an_unknown_study_names_it_and_suggests_no_force(four_studies) -> None:  # type: ignore[no-untyped-def]
    """``pas cache purge UID --force`` of a study not in the cache said "(use --force to
    purge anyway)": --force was given, and cannot help. Refused, nothing changed."""
    home, db, _spool, uids = four_studies
    env = {**os.environ, "PAS_HOME": str(home)}
    for extra in ([], ["--force"]):
        refused = run_pas(["cache", "purge", "1.2.3.4", *extra], env, timeout=60)
        assert refused.returncode == 1
        assert "study 1.2.3.4 is not in the cache" in refused.stderr
        assert "--force" not in refused.stderr, refused.stderr
    assert _studies(db) == set(uids)


# --- eviction racing a re-send of the same bytes ---------------------------------------------


def _one_confirmed_instance(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(db, spool)
    content = sorted(CT_DIR.glob("*.dcm"))[0].read_bytes()
    first = receiver.receive_file(content)
    _confirm(db, first.study_uid)
    return db, spool, receiver, content, first


def _file_sha(spool: Spool, relative: str) -> str | None:
    path = spool.root / relative
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_a_resend_filed_while_eviction_runs_keeps_its_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole re-send (spool write and index commit, answered success) lands after the
    eviction's rows are gone and before its files are unlinked: the new row's file stays."""
    db, spool, receiver, content, first = _one_confirmed_instance(tmp_path)
    resent = []
    real_delete = eviction.delete_evicted_files

    def resend_then_delete(*args, **kwargs):  # type: ignore[no-untyped-def]
        resent.append(receiver.receive_file(content))
        return real_delete(*args, **kwargs)

    monkeypatch.setattr(eviction, "delete_evicted_files", resend_then_delete)
    eviction.evict_study(db, spool, first.study_uid)
    (again,) = resent
    assert not again.duplicate  # the old row was gone: a new, unconfirmed row
    row = db.query_one("SELECT path, sha256, confirmed_at FROM instances WHERE id = ?",
                       (again.instance_id,))
    assert row["confirmed_at"] is None
    assert _file_sha(spool, row["path"]) == row["sha256"] == first.sha256
    assert cache_store.open_issues(db, ("evicting",)) == []  # resolved ("kept")


def test_a_resend_written_during_eviction_and_committed_after_keeps_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-send's spool write finds the file still there ("already held") before the
    unlink, and its index commit comes only after the eviction finished: the file stays."""
    db, spool, receiver, content, first = _one_confirmed_instance(tmp_path)
    written = []
    real_delete = eviction.delete_evicted_files

    def write_then_delete(*args, **kwargs):  # type: ignore[no-untyped-def]
        written.append(spool.write([content]))  # the receive path's first half
        return real_delete(*args, **kwargs)

    monkeypatch.setattr(eviction, "delete_evicted_files", write_then_delete)
    eviction.evict_study(db, spool, first.study_uid)
    ((stored, created),) = written
    assert not created  # the same bytes were there: a failed commit must not discard them
    # The receive path's second half, after the eviction returned: the success it answers.
    outcome = index.record_instance(db, read_record(content), stored)
    assert not outcome.duplicate
    assert _file_sha(spool, stored.path) == stored.sha256 == first.sha256


def test_a_resend_written_before_eviction_and_committed_after_is_written_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-send's spool write comes before the eviction starts, its index commit after
    the eviction unlinked the file (the receive lost the database lock to both of the
    eviction's transactions): the receive path sees the file gone once its row is
    committed, and writes it again before answering."""
    db, spool, receiver, content, first = _one_confirmed_instance(tmp_path)
    real_record = receiver._commits.record
    evicted = []

    def evict_then_record(record, stored, **options):  # type: ignore[no-untyped-def]
        evicted.append(eviction.evict_study(db, spool, first.study_uid))
        assert not spool.holds(stored)  # the interleaving under test: the file went
        return real_record(record, stored, **options)

    monkeypatch.setattr(receiver._commits, "record", evict_then_record)
    again = receiver.receive_file(content)
    assert len(evicted) == 1 and not again.duplicate
    row = db.query_one("SELECT path, sha256 FROM instances WHERE id = ?", (again.instance_id,))
    assert _file_sha(spool, row["path"]) == row["sha256"] == first.sha256


def test_a_lost_file_sent_again_while_its_study_is_evicted_is_written_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file of a confirmed instance is lost (or set aside by the scrub); the modality
    sends it again, so this write creates the file. An eviction of the study then looks at
    that new file and unlinks it before the receive commits. The receive checked its file
    after the commit only when it had found it held: it answered success with no file
    behind its row (found in review, 2026-12-07). Now it writes it again."""
    db, spool, receiver, content, first = _one_confirmed_instance(tmp_path)
    path = db.query_one("SELECT path FROM instances WHERE id = ?", (first.instance_id,))["path"]
    (spool.root / path).unlink()
    real_record = receiver._commits.record

    def evict_then_record(record, stored, **options):  # type: ignore[no-untyped-def]
        eviction.evict_study(db, spool, first.study_uid)
        assert not spool.holds(stored)  # the interleaving under test: the new file went
        return real_record(record, stored, **options)

    monkeypatch.setattr(receiver._commits, "record", evict_then_record)
    again = receiver.receive_file(content)
    row = db.query_one("SELECT path, sha256 FROM instances WHERE id = ?", (again.instance_id,))
    assert _file_sha(spool, row["path"]) == row["sha256"] == first.sha256


def test_a_failed_commit_leaves_the_file_another_receive_filed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same instance on two associations: the first writes the file, the second finds it
    held and commits (success told to its sender), then the first's commit fails. The first
    discarded the file it had created, and the second's row named nothing (found in review,
    2026-12-07). Now a file is discarded only when no row names it."""
    import sqlite3

    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool")
    first_receiver, second_receiver = Receiver(db, spool), Receiver(db, spool)
    content = sorted(CT_DIR.glob("*.dcm"))[0].read_bytes()
    second = []

    def failing_commit() -> None:  # a real SQLite error (its code set, as the commit's)
        sqlite3.connect(":memory:").execute("SELECT * FROM the_commit_failed")

    def other_association_then_fail(record, stored, **options):  # type: ignore[no-untyped-def]
        second.append(second_receiver.receive_file(content))
        failing_commit()

    monkeypatch.setattr(first_receiver._commits, "record", other_association_then_fail)
    with pytest.raises(Exception, match="index commit failed: no such table: the_commit_failed"):
        first_receiver.receive_file(content)
    (filed,) = second
    row = db.query_one("SELECT path, sha256 FROM instances WHERE id = ?", (filed.instance_id,))
    assert _file_sha(spool, row["path"]) == row["sha256"] == filed.sha256

    # And a file nobody indexed is still discarded when its own commit fails.
    other = sorted(CT_DIR.glob("*.dcm"))[1].read_bytes()
    monkeypatch.setattr(first_receiver._commits, "record", lambda *a, **k: failing_commit())
    with pytest.raises(Exception, match="index commit failed"):
        first_receiver.receive_file(other)
    assert sorted(p.name for p in spool.root.glob("*/*.dcm")) == [Path(row["path"]).name]


def test_eviction_still_deletes_files_nobody_filed_again(tmp_path: Path) -> None:
    db, spool, _receiver, _content, first = _one_confirmed_instance(tmp_path)
    path = db.query_one("SELECT path FROM instances WHERE id = ?", (first.instance_id,))["path"]
    eviction.evict_study(db, spool, first.study_uid)
    assert not (spool.root / path).exists()
    assert list((spool.root / path).parent.iterdir()) == []  # nothing renamed aside left
    assert cache_store.open_issues(db, ("evicting",)) == []


def test_a_study_whose_local_delivery_failed_is_evicted_last_and_says_so(
        four_studies, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A confirmed study whose job to the hospital's PACS failed went first when least
    recently used, its failed job deleted with it: the PACS never got the study and the
    failed-jobs signals forgot it, silently. Now it goes last, and its delete row and the
    log name the delivery dropped with it."""
    from appliance.store import jobs as job_store

    home, db, spool, (s1, s2, s3, s4) = four_studies
    for n, uid in enumerate((s1, s2, s3, s4)):
        _last_used(db, uid, 1000.0 + n)  # s1 least recently used
        _confirm(db, uid)
    study_fk = db.query("SELECT id FROM studies WHERE study_uid = ?", (s1,))[0]["id"]
    ids = [r["id"] for r in db.query("SELECT id FROM instances WHERE study_fk = ?",
                                     (study_fk,))]
    job_store.route_study(db, study_fk, ids, [job_store.NewJob("dicom", "pacs", 2, "r", ids)])
    with db.transaction() as conn:  # standing in for the worker giving up on it
        conn.execute("UPDATE jobs SET state = 'failed', last_error = 'association rejected'")
    (job_id,) = [r["id"] for r in db.query("SELECT id FROM jobs")]

    policy = _policy(home, db, spool, high_watermark_percent="50", low_watermark_percent="1")
    with caplog.at_level("WARNING", logger="pas"):
        assert policy.evict_if_needed().evicted == [s2, s3, s4, s1]
    (row,) = db.query("SELECT detail FROM audit WHERE event = 'delete' AND target = ?", (s1,))
    assert row["detail"].endswith(f"; its failed delivery to pacs (job {job_id}) dropped "
                                  "with it"), row["detail"]
    assert [r.getMessage() for r in caplog.records if s1 in r.getMessage()
            and "failed delivery to pacs" in r.getMessage()], caplog.text
    others = db.query("SELECT detail FROM audit WHERE event = 'delete' AND target != ?", (s1,))
    assert len(others) == 3 and not any("failed delivery" in r["detail"] for r in others)
