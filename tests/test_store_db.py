"""The database layer's connections: one per thread, handed on when the thread ends.

pynetdicom runs every association in two threads of its own and the HTTP apps run requests in
worker threads that come and go; each touches the index. These tests hold the layer to a
bounded number of open connections however many threads it has served (it once kept every
thread's connection open: four file descriptors per association, until the daemon hit its
descriptor limit), and to releasing the write lock of a thread that ended inside a
transaction.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from appliance.store.db import IDLE_CONNECTIONS, Database
from tests.support.peers import CT_DIR, storescu, wait_for


def _in_a_thread(target) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


def test_connections_of_ended_threads_are_reused_not_kept(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    seen: set[int] = set()

    def query() -> None:
        seen.add(id(db.connection()))
        assert db.query_one("SELECT count(*) AS n FROM instances")["n"] == 0

    for _ in range(200):
        _in_a_thread(query)
    # The main thread's connection (migrations) and one handed from thread to thread.
    assert db.open_connections() == 2
    assert len(seen) == 1

    # Many at once: each its own; afterwards only the idle pool stays open.
    started, release = threading.Barrier(21), threading.Event()

    def hold() -> None:
        db.connection()
        started.wait()
        release.wait()

    threads = [threading.Thread(target=hold) for _ in range(20)]
    for thread in threads:
        thread.start()
    started.wait()
    assert db.open_connections() == 21
    release.set()
    for thread in threads:
        thread.join()
    assert db.open_connections() == 1 + IDLE_CONNECTIONS
    db.close()
    assert db.open_connections() == 0


def test_a_thread_that_ends_inside_a_transaction_releases_the_write_lock(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")

    def abandon() -> None:
        conn = db.connection()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO patients (patient_id, issuer) VALUES ('LOST', '')")

    _in_a_thread(abandon)
    started = time.monotonic()
    with db.transaction() as conn:  # would wait the busy timeout (30 s) for a held lock
        conn.execute("INSERT INTO patients (patient_id, issuer) VALUES ('KEPT', '')")
    assert time.monotonic() - started < 5
    names = [row["patient_id"] for row in db.query("SELECT patient_id FROM patients")]
    assert names == ["KEPT"]


def test_the_daemon_holds_no_more_descriptors_after_many_associations(pas) -> None:
    one = CT_DIR / "A002304_axial_19001231-076.dcm"

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{pas.proc.pid}/fd"))

    for _ in range(3):  # the idle pool and the first threads' connections
        storescu([one], pas.port)
    before = descriptors()
    for _ in range(40):
        storescu([one], pas.port)
    # Threads end just after the sender saw the release: wait for them, not a fixed time.
    wait_for(lambda: descriptors() <= before + 3, 10, what="descriptors back to their level")
    assert pas.status()["instances"] == 1
