"""An interrupted attempt keeps the error the attempt before it ended with.

A clean stop gives the running attempt back ("the daemon stopped during attempt N: not
counted"), a start-up after a crash and an expired lease say "the worker died while sending
it (...)". Each of them replaced ``last_error``: a job failing against a PACS that refuses
it, stopped at an upgrade, showed only the stop in ``pas queue list``, and why it had been
failing was gone (the session notes' "a clean stop's give-back overwrites last_error").
Now the interruption comes first, then "; before it: " and the earlier error; interruptions
one after another keep the first real error, not a pile of stops.

The first test runs a real ``pas run`` against a PACS that closes the first connection
(a real error), then holds the next ones (an attempt in progress at the stop), with DCMTK's
storescu as the CT. The second walks each interruption through the jobs layer itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.store import cache
from appliance.store import jobs as job_store
from appliance.store.db import Database
from tests.support.configs import ct1_to
from tests.support.peers import PasProcess, read_rows, storescu, wait_for
from tests.support.silent_peer import SilentPeer
from tests.test_queue_retry_audit import failed_job
from tests.test_routing import CT_PATIENT


def test_a_stop_and_a_crash_keep_the_error_the_job_had(tmp_path: Path) -> None:
    peer = SilentPeer(close_first=1)  # a real error first, then an attempt held
    config = ct1_to(tmp_path / "appliance.toml", peer, timeout_s=120,
                    queue="max_attempts = 10\nbackoff_initial_s = 0.2\nbackoff_max_s = 0.5\n")
    pas = PasProcess(tmp_path / "pas", {"PAS_CONFIG": str(config),
                                        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_STUDY__STABLE_AFTER_S": "0.5"})

    def job() -> dict[str, Any]:
        return dict(read_rows(pas.home / "pas.sqlite", "SELECT * FROM jobs")[0])

    def in_attempt(connections: int) -> bool:
        rows = read_rows(pas.home / "pas.sqlite", "SELECT state FROM jobs")
        return bool(rows) and rows[0]["state"] == "running" and len(peer.held) >= connections

    try:
        pas.start()
        storescu(CT_PATIENT, pas.port, calling="CT1")
        wait_for(lambda: peer.connections >= 1 and read_rows(
            pas.home / "pas.sqlite", "SELECT 1 FROM jobs WHERE last_error IS NOT NULL"), 60,
            what="the first attempt's error recorded")
        first_error = job()["last_error"]
        assert first_error and "stopped" not in first_error, first_error

        wait_for(lambda: in_attempt(1), 60, what="the next attempt held by the PACS")
        pas.kill()
        pas.start()  # start-up releases the dead process's lease: the worker died
        wait_for(lambda: in_attempt(2), 60, what="an attempt in progress after the crash")
        crashed = job()["last_error"]
        assert crashed == (f"{job_store.WORKER_DIED} (the daemon stopped during attempt "
                           f"{job()['attempts'] - 1}); before it: {first_error}"), crashed

        pas.stop(timeout=60)  # SIGTERM: the attempt is given back, the first error kept
        stopped = job()
        assert stopped["state"] == "pending", stopped
        assert stopped["last_error"] == (
            f"the daemon stopped during attempt {stopped['attempts'] + 1}: not counted"
            f"; before it: {first_error}"), stopped
    finally:
        pas.stop(timeout=60)
        peer.close()


def test_each_interruption_keeps_the_first_real_error(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    try:
        job_id = failed_job(db)
        refused = "the PACS refused the association: called AE title not recognised"
        with db.transaction() as conn:
            conn.execute("UPDATE jobs SET state = 'pending', attempts = 1, last_error = ?, "
                         "next_attempt_at = 0", (refused,))

        def last_error() -> str:
            return str(db.query_one("SELECT last_error FROM jobs WHERE id = ?",
                                    (job_id,))["last_error"])

        assert job_store.claim_next(db, "host:1:w:0", lease_s=60) is not None
        assert last_error() == refused  # a claim keeps it
        assert job_store.give_back_stopped(db, "host:1:w") == 1
        assert last_error() == ("the daemon stopped during attempt 2: not counted"
                                f"; before it: {refused}")

        assert job_store.claim_next(db, "host:2:w:0", lease_s=60) is not None
        assert cache.release_host_leases(db, "host") == 1
        assert last_error() == ("the worker died while sending it (the daemon stopped during "
                                f"attempt 2); before it: {refused}")

        assert job_store.claim_next(db, "host:3:w:0", lease_s=-1) is not None  # expires at once
        assert job_store.claim_next(db, "host:4:w:0", lease_s=60) is not None
        assert last_error() == ("the worker died while sending it (its lease expired during "
                                f"attempt 3); before it: {refused}")

        # Its attempts spent by such deaths, the job fails naming both.
        with db.transaction() as conn:
            conn.execute("UPDATE jobs SET lease_until = 0")
        assert job_store.claim_next(db, "host:5:w:0", lease_s=60, max_attempts=4) is None
        assert last_error() == (
            "no attempt left (4 of 4); the last: the worker died while sending it (its lease "
            f"expired during attempt 4); before it: {refused}")

        # A job that had no error says the interruption alone; a long error is cut at 2,000.
        with db.transaction() as conn:
            conn.execute("UPDATE jobs SET state = 'running', lease_owner = 'host:6:w:0', "
                         "attempts = 1, last_error = NULL")
        job_store.give_back_stopped(db, "host:6:w")
        assert last_error() == "the daemon stopped during attempt 1: not counted"
        with db.transaction() as conn:
            conn.execute("UPDATE jobs SET state = 'running', lease_owner = 'host:7:w:0', "
                         "attempts = 1, last_error = ?", ("x" * 3000,))
        job_store.give_back_stopped(db, "host:7:w")
        assert len(last_error()) == 2000
        assert last_error().startswith("the daemon stopped during attempt 1: not counted"
                                       "; before it: xxx")
    finally:
        db.close()
