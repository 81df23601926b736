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
