"""A retried delivery job is a ``retry`` row of the audit trail, written in the retry's own
transaction: who, from where, the study, the job and its destination
(appliance/store/jobs.py ``retry``; ``pas queue retry`` and the status page's button).

Found in review: a retry wrote no row, though docs/operations.md says every operator action
is one, and it sends the study's patient data again; with ``serving.auth = "none"`` anyone
on the network could trigger a resend, untraced. (The button's row: tests/test_ops_web.py
and tests/test_ops_web_auth.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from appliance.cli.common import login_name
from appliance.store import index
from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from tests.support.peers import run_pas

STUDY = "1.2.3"


def failed_job(db: Database) -> int:
    """One study of patient P routed to ``pacs``, its job failed after 3 attempts."""
    record = InstanceRecord("1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            STUDY, "1.2.3.9", patient_id="P")
    instance = index.record_instance(db, record, StoredFile("f1", 1, "1" * 64)).instance_id
    job_store.route_study(db, 1, [instance], [job_store.NewJob("dicom", "pacs", 2, "r",
                                                                [instance])])
    with db.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'failed', attempts = 3")
    return int(db.query_one("SELECT id FROM jobs")["id"])


def _retry_rows(db: Database) -> list[dict[str, object]]:
    return [dict(r) for r in db.query("SELECT * FROM audit WHERE event = 'retry' ORDER BY id")]


def test_a_retry_is_audited_with_the_change_and_a_refused_one_is_not(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    try:
        job_id = failed_job(db)
        assert job_store.retry(db, job_id, actor="anonymous", source="10.1.2.3")
        [row] = _retry_rows(db)
        assert (row["actor"], row["source"], row["target"], row["outcome"], row["patient"]) == (
            "anonymous", "10.1.2.3", STUDY, "success", "P")
        assert row["detail"] == (f"job {job_id} (dicom) to pacs, failed after 3 attempts: due "
                                 "now, attempts reset")
        # Claimed by a worker: not retried, nothing written.
        assert job_store.claim_next(db, "worker", lease_s=60) is not None
        assert not job_store.retry(db, job_id, actor="anonymous")
        assert not job_store.retry(db, job_id + 1, actor="anonymous")  # no such job
        assert len(_retry_rows(db)) == 1
    finally:
        db.close()


def test_pas_queue_retry_names_the_operator(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    db = Database(home / "pas.sqlite")
    job_id = failed_job(db)
    db.close()
    env = {**os.environ, "PAS_HOME": str(home)}
    env.pop("PAS_CONFIG", None)
    retried = run_pas(["queue", "retry", str(job_id)], env)
    assert retried.returncode == 0, retried.stderr
    shown = run_pas(["audit", "--event", "retry", "--json"], env)
    [row] = json.loads(shown.stdout)
    assert (row["actor"], row["target"], row["patient"]) == (
        f"operator:{login_name()}", STUDY, "P")
    assert f"job {job_id} (dicom) to pacs" in row["detail"]
