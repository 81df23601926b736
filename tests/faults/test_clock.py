"""The wall clock stepping back two hours, then forward again: deadlines keep their meaning.

Why in-process: stepping the machine's real clock would disturb every other test on the
machine, and libfaketime (tried) breaks ``time.sleep`` when it leaves the monotonic clock
alone (EINVAL from clock_nanosleep), which an NTP step does. So the test moves
``time.time`` only (``store.db.now()`` reads it; ``time.monotonic`` stays real) around the
real store, real jobs and real files, and asks what the daemon's queue would do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.ingest.receive import Receiver
from appliance.ops.clock import ClockWatch
from appliance.store import jobs as job_store
from appliance.store import ops as ops_store
from appliance.store.db import Database, now
from appliance.store.spool import Spool
from tests.support.peers import CT_DIR

HOURS_2 = 7200.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, float]]:
    real = time.time
    state = {"offset": 0.0}
    monkeypatch.setattr(time, "time", lambda: real() + state["offset"])
    yield state


def _store(tmp_path: Path) -> tuple[Database, Receiver, list[int]]:
    db = Database(tmp_path / "pas.sqlite")
    receiver = Receiver(db, Spool(tmp_path / "spool"))
    ids = [receiver.receive_file(p.read_bytes()).instance_id
           for p in sorted(CT_DIR.glob("*.dcm"))[:6]]
    return db, receiver, ids


def _study_fk(db: Database, instance_id: int) -> int:
    row = db.query_one("SELECT study_fk FROM instances WHERE id = ?", (instance_id,))
    assert row is not None
    return int(row["study_fk"])


def test_step_back_keeps_retry_and_quiet_period(tmp_path: Path, clock: dict[str, float]) -> None:
    db, _receiver, ids = _store(tmp_path)
    routed = ids[0]
    job_store.route_study(db, _study_fk(db, routed), [routed],
                          [job_store.NewJob("dicom", "node", 2, "r", [routed])])
    job = job_store.claim_next(db, "host:1:a:0", lease_s=60)
    assert job is not None
    job_store.fail_attempt(db, job.id, "host:1:a:0", "node down", retry_at=now() + 3)
    waiting_study = _study_fk(db, ids[-1])  # received just now, not routed yet
    watch = ClockWatch(db)

    clock["offset"] = -HOURS_2
    step = watch.check()
    assert -HOURS_2 - 2 < step < -HOURS_2 + 2
    retry = db.query_one("SELECT next_attempt_at FROM jobs WHERE id = ?", (job.id,))
    assert retry is not None and retry["next_attempt_at"] - now() < 5  # not 2 h + 3 s
    quiet = db.query_one("SELECT last_received_at FROM studies WHERE id = ?", (waiting_study,))
    assert quiet is not None and quiet["last_received_at"] - now() < 5  # not 2 h ahead
    # The queue really hands the job out once its 3 s are over, on the new clock.
    clock["offset"] -= 0  # no further step
    assert job_store.claim_next(db, "host:1:a:0", lease_s=60) is None  # not due yet
    clock["offset"] += 4  # 4 s later (also seen as a 4 s step: below the threshold)
    assert watch.check() == 0.0
    assert job_store.claim_next(db, "host:1:a:0", lease_s=60) is not None
    assert [r["event"] for r in db.query("SELECT event FROM audit")] == ["clock"]
    db.close()


def test_step_forward_does_not_expire_running_leases(tmp_path: Path,
                                                     clock: dict[str, float]) -> None:
    db, _receiver, ids = _store(tmp_path)
    for instance in ids[:2]:
        job_store.route_study(db, _study_fk(db, instance), [instance],
                              [job_store.NewJob("dicom", "node", 2, "r", [instance])])
    running = job_store.claim_next(db, "host:1:a:0", lease_s=60)
    other = job_store.claim_next(db, "host:1:b:0", lease_s=60)
    assert running is not None and other is not None and other.id != running.id
    watch = ClockWatch(db)

    clock["offset"] = HOURS_2
    # A worker fails the other job right after the step, before the watch runs (it checks
    # every 0.5 s): that deadline is already on the new clock and must not be pushed 2 h on.
    job_store.fail_attempt(db, other.id, "host:1:b:0", "node down", retry_at=now() + 3)
    assert HOURS_2 - 2 < watch.check() < HOURS_2 + 2
    # Without the re-base, every lease would look 2 h expired and be taken again.
    assert job_store.claim_next(db, "host:2:x:0", lease_s=60, kinds=("dicom",)) is None
    lease = db.query_one("SELECT lease_until FROM jobs WHERE id = ?", (running.id,))
    assert lease is not None and 50 < lease["lease_until"] - now() <= 61
    retry = db.query_one("SELECT next_attempt_at FROM jobs WHERE id = ?", (other.id,))
    assert retry is not None and retry["next_attempt_at"] - now() < 5
    db.close()


def test_step_forward_does_not_give_up_pending_commitment_reports(
        tmp_path: Path, clock: dict[str, float]) -> None:
    """A Storage Commitment report waiting for its modality (appliance/store/commitment.py)
    keeps its retry and its deadline across a forward step of two days: without the re-base
    it was given up at its next look, its 24 h apparently over."""
    from appliance.store import commitment

    db = Database(tmp_path / "pas.sqlite")
    item = [("1.2.840.10008.5.1.4.1.1.2", "1.2.9.1")]
    request, _ = commitment.record_request(db, "1.2.9.77", "CT1", None, item,
                                           lambda relative: True, 24 * 3600.0)
    commitment.mark_failed(db, request, "association refused", retry_in_s=30)
    watch = ClockWatch(db)

    clock["offset"] = 2 * 24 * 3600.0
    assert watch.check() > 2 * 24 * 3600.0 - 2
    row = db.query_one("SELECT next_attempt_at, give_up_at FROM commitment_requests")
    assert row is not None
    assert 25 < row["next_attempt_at"] - now() <= 31
    assert 24 * 3600.0 - 60 < row["give_up_at"] - now() <= 24 * 3600.0
    assert commitment.due(db) == []
    [clock_row] = db.query("SELECT detail FROM audit WHERE event = 'clock'")
    assert "'commitment_reports': 1" in clock_row["detail"]
    db.close()


def test_step_back_leaves_leases_written_on_the_new_clock(tmp_path: Path,
                                                          clock: dict[str, float]) -> None:
    """A lease claimed, or renewed, on the new clock between a step back and its detection
    (the watch looks every 0.5 s) already runs from the new now: moved back by the step it
    lay 2 h in the past and a second worker took the job while it was being sent. A lease
    written on the old clock still keeps its remaining time."""
    db, _receiver, ids = _store(tmp_path)
    for instance, node in zip(ids[:2], ("node-a", "node-b"), strict=True):
        job_store.route_study(db, _study_fk(db, instance), [instance],
                              [job_store.NewJob("dicom", node, 2, "r", [instance])])
    renewed = job_store.claim_next(db, "host:1:a:0", lease_s=60)
    old = job_store.claim_next(db, "host:1:b:0", lease_s=60)
    assert renewed is not None and old is not None
    watch = ClockWatch(db)

    clock["offset"] = -HOURS_2
    job_store.route_study(db, _study_fk(db, ids[2]), ids[2:3],
                          [job_store.NewJob("dicom", "node-c", 2, "r", ids[2:3])])
    claimed = job_store.claim_next(db, "host:1:c:0", lease_s=60)  # on the new clock
    assert claimed is not None and claimed.id not in (renewed.id, old.id)
    assert job_store.renew_lease(db, renewed.id, "host:1:a:0", 60)  # on the new clock too
    assert -HOURS_2 - 2 < watch.check() < -HOURS_2 + 2
    leases = {r["id"]: r["lease_until"] - now()
              for r in db.query("SELECT id, lease_until FROM jobs WHERE state = 'running'")}
    assert 55 < leases[claimed.id] <= 60 and 55 < leases[renewed.id] <= 60
    assert 50 < leases[old.id] <= 60  # re-based: not 2 h away
    assert job_store.claim_next(db, "host:2:x:0", lease_s=60) is None  # nobody takes them
    [clock_row] = db.query("SELECT detail FROM audit WHERE event = 'clock'")
    assert "'leases': 1" in clock_row["detail"]
    db.close()


def test_step_forward_does_not_push_a_lease_renewed_after_it(tmp_path: Path,
                                                             clock: dict[str, float]) -> None:
    """A renewal stamps ``updated_at``, as a claim does: renewed between a forward step and
    its detection, a lease is not pushed on by the step (it held the job 2 h longer)."""
    db, _receiver, ids = _store(tmp_path)
    job_store.route_study(db, _study_fk(db, ids[0]), ids[:1],
                          [job_store.NewJob("dicom", "node", 2, "r", ids[:1])])
    job = job_store.claim_next(db, "host:1:a:0", lease_s=60)
    assert job is not None
    watch = ClockWatch(db)

    clock["offset"] = HOURS_2
    assert job_store.renew_lease(db, job.id, "host:1:a:0", 60)
    assert HOURS_2 - 2 < watch.check() < HOURS_2 + 2
    lease = db.query_one("SELECT lease_until FROM jobs WHERE id = ?", (job.id,))
    assert lease is not None and 55 < lease["lease_until"] - now() <= 60
    db.close()


def test_step_keeps_prefetch_retries_and_exam_times(tmp_path: Path,
                                                    clock: dict[str, float]) -> None:
    """Prefetch requests are re-based with the rest: a step back of 2 h held a prior's 30 s
    retry 2 h 30 s and an arrival's prefetch (due "now") 2 h. A due time anchored to the
    exam's time (``scheduled_at`` less the lead time) is a real-world time and stays, back
    or forward (a step forward of 2 days moved it past the exam)."""
    from appliance.store import prefetch as pf

    lead_s = 24 * 3600.0
    db = Database(tmp_path / "pas.sqlite")
    [retry] = [pf.schedule(db, pf.NewRequest("retry", "arrival", "P1")).request_id]
    [claimed] = pf.claim_due(db)
    assert claimed["id"] == retry
    pf.fail_attempt(db, retry, "hub 500", max_attempts=5, retry_at=now() + 30)
    arrival = pf.schedule(db, pf.NewRequest("arrival", "arrival", "P2")).request_id
    exam = now() + 3 * 24 * 3600.0  # in 3 days: due in 2 days
    anchored = pf.schedule(db, pf.NewRequest("order", "hl7", "P3", scheduled_at=exam,
                                             due_at=exam - lead_s)).request_id
    soon = now() + 3600.0  # in 1 h: already within the lead time, due now
    within = pf.schedule(db, pf.NewRequest("soon", "hl7", "P4", scheduled_at=soon,
                                           due_at=max(now(), soon - lead_s))).request_id
    watch = ClockWatch(db, prefetch_lead_s=lead_s)

    def left() -> dict[int, tuple[float, float]]:  # (due_at, next_attempt_at) - now
        at = now()
        return {r["id"]: (r["due_at"] - at, r["next_attempt_at"] - at) for r in
                db.query("SELECT id, due_at, next_attempt_at FROM prefetch_requests")}

    def stored(request_id: int) -> tuple[float, float]:
        row = db.query_one("SELECT due_at, next_attempt_at FROM prefetch_requests "
                           "WHERE id = ?", (request_id,))
        assert row is not None
        return row["due_at"], row["next_attempt_at"]

    clock["offset"] = -HOURS_2
    assert -HOURS_2 - 2 < watch.check() < -HOURS_2 + 2
    times = left()
    assert 25 < times[retry][1] <= 30  # not 2 h 30 s
    assert times[arrival][0] <= 0 and times[arrival][1] <= 0  # not 2 h
    # The exam is where the RIS put it: its prefetch is due 24 h before it, 2 h more away.
    assert stored(anchored) == (exam - lead_s, exam - lead_s)
    assert times[anchored][0] > 2 * 24 * 3600.0 + HOURS_2 - 5
    # Received 2 h earlier than the old clock said, 3 h before the exam: still due now.
    assert times[within][0] <= 0 and times[within][1] <= 0
    assert {r["id"] for r in pf.claim_due(db)} == {arrival, within}
    [clock_row] = db.query("SELECT detail FROM audit WHERE event = 'clock'")
    assert "'prefetch_requests': 4" in clock_row["detail"]

    clock["offset"] += 2 * 24 * 3600.0  # then forward by 2 days
    assert watch.check() > 2 * 24 * 3600.0 - 2
    times = left()
    assert 25 < times[retry][1] <= 30
    assert stored(anchored) == (exam - lead_s, exam - lead_s)
    assert HOURS_2 - 5 < times[anchored][0] <= HOURS_2  # 2 days less the 2 h step back
    db.close()


def test_step_back_shows_no_negative_backlog_age(tmp_path: Path,
                                                 clock: dict[str, float]) -> None:
    """Before the watch re-bases (or for a job it leaves alone), a job created on the old
    clock lies in the future: the status page and ``pas status`` showed its age negative."""
    db, _receiver, ids = _store(tmp_path)
    job_store.route_study(db, _study_fk(db, ids[0]), [ids[0]],
                          [job_store.NewJob("dicom", "node", 2, "r", [ids[0]])])
    clock["offset"] = -HOURS_2
    by_destination = job_store.backlog_by_destination(db)
    assert [r["oldest_age_s"] for r in by_destination] == [0.0]
    assert [r["oldest_age_s"] for r in ops_store.backlog_by_priority(db)] == [0.0]
    clock["offset"] = 0.0
    assert job_store.backlog_by_destination(db)[0]["oldest_age_s"] >= 0.0
    db.close()


DAYS_3 = 3 * 86400.0


def test_a_clock_set_back_while_stopped_is_re_based_at_the_start(
        tmp_path: Path, clock: dict[str, float]) -> None:
    """PAS ran on a clock three days ahead, then stopped; the clock was put right (NTP at
    the next boot). The watch compares only with its own start: it saw no step, and
    nothing routed nor was claimed for three days (review s41). The start compares the
    index's newest time with the clock."""
    clock["offset"] = DAYS_3
    db, _receiver, ids = _store(tmp_path)
    job_store.route_study(db, _study_fk(db, ids[0]), [ids[0]],
                          [job_store.NewJob("dicom", "node", 2, "r", [ids[0]])])
    job = job_store.claim_next(db, "host:1:a:0", lease_s=60)
    assert job is not None
    job_store.fail_attempt(db, job.id, "host:1:a:0", "node down", retry_at=now() + 3)
    waiting_study = _study_fk(db, ids[-1])
    db.close()

    clock["offset"] = 0.0  # set right while stopped
    db = Database(tmp_path / "pas.sqlite")
    watch = ClockWatch(db)
    step = watch.check_since_stopped()
    assert -DAYS_3 - 5 < step < -DAYS_3 + 5
    retry = db.query_one("SELECT next_attempt_at FROM jobs WHERE id = ?", (job.id,))
    assert retry is not None and retry["next_attempt_at"] - now() < 5  # not 3 days + 3 s
    quiet = db.query_one("SELECT last_received_at FROM studies WHERE id = ?", (waiting_study,))
    assert quiet is not None and quiet["last_received_at"] - now() < 5
    assert [r["event"] for r in db.query("SELECT event FROM audit")] == ["clock"]
    # Idempotent: the next start finds nothing ahead.
    assert ClockWatch(db).check_since_stopped() == 0.0
    assert len(db.query("SELECT event FROM audit")) == 1
    db.close()


def test_a_start_on_a_clock_a_little_behind_changes_nothing(
        tmp_path: Path, clock: dict[str, float]) -> None:
    """Below the watch's threshold (NTP's slews, a second's difference): nothing re-based."""
    clock["offset"] = 2.0
    db, _receiver, _ids = _store(tmp_path)
    before = [dict(r) for r in db.query("SELECT id, last_received_at FROM studies")]
    clock["offset"] = 0.0
    assert ClockWatch(db).check_since_stopped() == 0.0
    assert [dict(r) for r in db.query("SELECT id, last_received_at FROM studies")] == before
    db.close()


def test_a_daemon_started_after_the_clock_was_set_back_routes_at_once(
        tmp_path: Path, clock: dict[str, float]) -> None:
    """The same, through a real ``pas run``: an index written on a clock three days ahead
    (here, in this process), then the daemon started on the real clock. Its studies are
    routed within seconds of their quiet period (``study.stable_after_s`` 1 s), not three
    days later."""
    from tests.support.peers import PasProcess, read_rows, wait_for

    clock["offset"] = DAYS_3
    db, _receiver, ids = _store(tmp_path)
    db.close()
    clock["offset"] = 0.0
    pas = PasProcess(tmp_path, {"PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        wait_for(lambda: all(r["routed_at"] is not None for r in read_rows(
            tmp_path / "pas.sqlite", "SELECT routed_at FROM instances")), 30,
            what="the studies routed")
        assert len(ids) == len(read_rows(tmp_path / "pas.sqlite", "SELECT id FROM instances"))
        assert "set back while PAS was stopped" in pas.log()
    finally:
        pas.stop()
