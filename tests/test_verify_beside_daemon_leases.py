"""``pas verify --repair`` beside a running daemon leaves the daemon's job leases alone
(appliance/ops/recovery.py, ``_release_leases``).

``verify --repair`` runs start-up recovery, whose last step released every running job
leased from this host as a dead worker's (``cache.release_host_leases``). Beside a live
daemon those leases are its workers': the job sending a study went back to ``pending`` ("the
worker died while sending it"), a second worker claimed it while the first was still
sending, and the destination received the same study twice at once (262 C-STOREs for 150
instances, reproduced with a real daemon, storescp behind a slow proxy and storescu).

The first test is that, with a destination that accepts the connection and never answers:
the job stays ``running`` under the same lease through ``pas verify --repair``. The second
covers a daemon that starts while a long ``verify --repair`` walks the spool (it found no
daemon when it began): recovery keeps the leases while another process holds the home's
lock, and releases them once nobody does.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

from appliance.ingest.receive import Receiver
from appliance.ops.home_lock import lock_file
from appliance.ops.listeners import lock_holder
from appliance.ops.recovery import startup_recovery
from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.support.configs import everything_to
from tests.support.peers import PasProcess, read_rows, storescu, wait_for
from tests.test_routing import CT_PATIENT


def _running_job(db_path: Path) -> dict[str, object] | None:
    rows = read_rows(db_path, "SELECT id, state, attempts, lease_owner, lease_until "
                              "FROM jobs WHERE state = 'running'")
    return dict(rows[0]) if rows else None


def test_verify_repair_beside_a_daemon_keeps_its_running_jobs_lease(tmp_path: Path) -> None:
    """Failed before: right after ``pas verify --repair`` the job was ``pending`` with no
    lease owner, "the worker died while sending it (the daemon stopped during attempt 1)",
    while the daemon's worker was still in the middle of sending it."""
    # A node that takes the connection (the kernel's backlog) and never answers: the job's
    # association waits, its lease held, for as long as the test needs.
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)
    node = SimpleNamespace(ae_title="SILENT", port=silent.getsockname()[1])
    config = everything_to(tmp_path / "appliance.toml", node, timeout_s=120)
    pas = PasProcess(tmp_path / "pas", {"PAS_CONFIG": str(config),
                                        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false",
                                        "PAS_HTTP__ENABLED": "false"})
    db_path = tmp_path / "pas" / "pas.sqlite"
    try:
        pas.start()
        storescu(CT_PATIENT, pas.port)
        before = wait_for(lambda: _running_job(db_path), 30, what="the job running")
        result = pas.cli("verify", "--repair", "--json", check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        after = read_rows(db_path, "SELECT id, state, attempts, lease_owner, lease_until, "
                                   "last_error FROM jobs")
    finally:
        silent.close()  # the waiting association is reset: the daemon stops at once
        pas.stop()
    assert [(r["id"], r["state"], r["attempts"], r["lease_owner"], r["last_error"])
            for r in after] == [(before["id"], "running", 1, before["lease_owner"], None)]
    recovery = read_rows(db_path, "SELECT detail FROM audit WHERE event = 'recovery'")
    assert not any("leases_released" in (r["detail"] or "") for r in recovery)


def test_recovery_keeps_leases_while_another_process_holds_the_home_lock(
        tmp_path: Path) -> None:
    """Failed before: recovery released a lease of this host whatever held the home (a
    daemon started during a long ``verify --repair`` lost its sending job the same way)."""
    home = tmp_path / "home"
    home.mkdir()
    db = Database(home / "pas.sqlite")
    spool = Spool(home / "spool", fsync=False)
    receiver = Receiver(db, spool)
    stored = receiver.receive_file(CT_PATIENT[0].read_bytes())
    study_fk = db.query_one("SELECT study_fk FROM instances WHERE id = ?",
                            (stored.instance_id,))["study_fk"]
    job_store.route_study(db, study_fk, [stored.instance_id], [
        job_store.NewJob("dicom", "pacs", 2, "r", [stored.instance_id])])
    # The daemon: another process holding the home's lock, as pas run does (flock(2)).
    daemon = subprocess.Popen(["flock", "--exclusive", str(lock_file(home)), "cat"],
                              stdin=subprocess.PIPE)
    try:
        wait_for(lambda: lock_holder(lock_file(home)) is not None, 10,
                 what="the home's lock taken")
        owner = f"{os.uname().nodename}:{lock_holder(lock_file(home))}:abc123:0"
        job = job_store.claim_next(db, owner, lease_s=3600)
        assert job is not None
        report = startup_recovery(db, spool, receiver)
        assert report.leases_released == 0
        row = db.query_one("SELECT state, lease_owner FROM jobs WHERE id = ?", (job.id,))
        assert (row["state"], row["lease_owner"]) == ("running", owner)
    finally:
        assert daemon.stdin is not None
        daemon.stdin.close()  # cat ends, flock with it: the lock is dropped
        daemon.wait(10)
    # The daemon gone (its lock with it): the lease is a dead process's, released at once.
    assert startup_recovery(db, spool, receiver).leases_released == 1
    row = db.query_one("SELECT state, lease_owner FROM jobs WHERE id = ?", (job.id,))
    assert (row["state"], row["lease_owner"]) == ("pending", None)
    db.close()
