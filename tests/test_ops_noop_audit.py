"""An operator action that changes nothing writes no audit row; the command still says so.

Found in review (invariant 6, the trail as the health-data record): ``pas queue retry`` of a
job already pending and due (run twice, or the status page's Retry button clicked twice)
wrote a second ``retry success`` row, a resend of patient data that never happened; ``pas
cache unpin`` of a study not pinned said "nothing changed" and wrote ``unpin success``; ``pas
cache pin`` twice answered ``"changed": false`` and wrote a second ``pin success``.
(appliance/store/jobs.py ``retry``, appliance/store/cache.py ``set_pin``.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from appliance.store import jobs as job_store
from appliance.store.db import Database
from tests.support.peers import run_pas
from tests.test_queue_retry_audit import failed_job

STUDY = "1.2.3"


def _home_with_a_failed_job(home: Path) -> int:
    home.mkdir()
    db = Database(home / "pas.sqlite")
    try:
        return failed_job(db)
    finally:
        db.close()


def _trail(home: Path) -> list[tuple[str, str]]:
    db = Database(home / "pas.sqlite")
    try:
        return [(r["event"], r["outcome"]) for r in db.query(
            "SELECT event, outcome FROM audit WHERE event IN ('retry', 'pin', 'unpin') "
            "ORDER BY id")]
    finally:
        db.close()


def test_retry_pin_and_unpin_that_change_nothing_write_no_row(tmp_path: Path) -> None:
    home = tmp_path / "home"
    job_id = _home_with_a_failed_job(home)
    env = {**os.environ, "PAS_HOME": str(home)}
    env.pop("PAS_CONFIG", None)

    def pas(*args: str) -> str:
        result = run_pas(list(args), env)
        assert result.returncode == 0, result.stdout + result.stderr
        return " ".join(result.stdout.split())

    assert pas("queue", "retry", str(job_id)) == f"job {job_id} will be retried now"
    assert pas("queue", "retry", str(job_id)) == (
        f"job {job_id} was already pending and due now, with no attempt counted: nothing "
        "changed")
    assert _trail(home) == [("retry", "success")]

    assert pas("cache", "unpin", STUDY) == f"study {STUDY} was not pinned: nothing changed"
    assert pas("cache", "pin", STUDY) == f"study {STUDY} pinned until unpinned"
    again = json.loads(pas("cache", "pin", STUDY, "--json"))
    assert again["changed"] is False and again["until_unpinned"], again
    assert pas("cache", "unpin", STUDY).startswith(f"study {STUDY} unpinned (was pinned")
    assert pas("cache", "unpin", STUDY) == f"study {STUDY} was not pinned: nothing changed"
    assert _trail(home) == [("retry", "success"), ("pin", "success"), ("unpin", "success")]

    # A retry that does change the job (waiting for its next attempt) is still a row.
    db = Database(home / "pas.sqlite")
    try:
        with db.transaction() as conn:
            conn.execute("UPDATE jobs SET attempts = 1, next_attempt_at = next_attempt_at + 600")
        assert job_store.retry(db, job_id, actor="anonymous") == job_store.RETRIED
        assert job_store.retry(db, job_id, actor="anonymous") == job_store.ALREADY_DUE
    finally:
        db.close()
    assert _trail(home)[3:] == [("retry", "success")]
