"""A clean stop of the daemon during an attempt does not count that attempt; a crash does.

The attempt was counted at its claim and kept at the next start: over a long outage with
restarts (an upgrade, a reboot during a PACS's maintenance, a hub that holds every answer),
the job failed after ``queue.max_attempts`` restarts, when the outage alone never fails it
(review s41, F-B). ``Dispatcher.stop`` now puts this process's jobs back to pending, the
attempt given back. kill -9 still counts it (``cache.release_host_leases``: a job whose
sending crashes the daemon must not be retried for ever).

Real peers: the daemon (``pas run``, stopped by SIGTERM), DCMTK's storescu as the CT, and as
the PACS a TCP server that accepts the association's connection and never answers (the
attempt is inside its A-ASSOCIATE when the daemon stops).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.store.jobs import WORKER_DIED
from tests.support.configs import ct1_to
from tests.support.peers import PasProcess, read_rows, storescu, wait_for
from tests.support.silent_peer import SilentPeer
from tests.test_routing import CT_PATIENT


def test_a_clean_stop_gives_the_attempt_back_and_a_kill_does_not(tmp_path: Path) -> None:
    peer = SilentPeer()
    config = ct1_to(tmp_path / "appliance.toml", peer, queue="max_attempts = 1\n", timeout_s=120)
    pas = PasProcess(tmp_path / "pas", {"PAS_CONFIG": str(config),
                                        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_STUDY__STABLE_AFTER_S": "0.5"})
    database = pas.home / "pas.sqlite"

    def job() -> dict[str, Any]:
        return dict(read_rows(database, "SELECT * FROM jobs")[0])

    def in_attempt(connections: int) -> bool:
        rows = read_rows(database, "SELECT state, attempts FROM jobs")
        return bool(rows) and rows[0]["state"] == "running" and len(peer.held) >= connections

    try:
        pas.start()
        storescu(CT_PATIENT, pas.port, calling="CT1")
        # More restarts during an attempt than max_attempts: none of them counts.
        for life in range(1, 3):
            if life > 1:
                pas.start()
            wait_for(lambda life=life: in_attempt(life), 60,
                     what=f"attempt in progress against the silent PACS (life {life})")
            assert job()["attempts"] == 1
            pas.stop(timeout=60)  # SIGTERM: the daemon's clean stop
            after = job()
            assert after["state"] == "pending", after
            assert after["attempts"] == 0, after
            assert after["lease_owner"] is None, after
            assert after["last_error"] == "the daemon stopped during attempt 1: not counted", after
            assert "being sent when the daemon stopped" in pas.log()

        # A crash keeps counting it (crash-loop protection): with its one attempt spent,
        # the next start fails the job.
        pas.start()
        wait_for(lambda: in_attempt(3), 60, what="attempt in progress (before the kill)")
        pas.kill()
        killed = job()
        assert killed["state"] == "running" and killed["attempts"] == 1, killed
        pas.start()
        wait_for(lambda: job()["state"] == "failed", 60, what="the job failed after the kill")
        assert "no attempt left (1 of 1)" in job()["last_error"], job()
        assert WORKER_DIED in job()["last_error"], job()
    finally:
        pas.stop(timeout=60)
        peer.close()
