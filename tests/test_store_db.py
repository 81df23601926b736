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
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from appliance.store.db import IDLE_CONNECTIONS, Database
from tests.support.peers import CT_DIR, DCMTK_ENV, storescu, wait_for


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


CLOSE_UNDER_A_STATEMENT = """
import sys, threading, time
from pathlib import Path
from appliance.store.db import Database
db = Database(Path(sys.argv[1]) / "pas.sqlite")
started, outcome = threading.Event(), []
def change():
    with db.transaction() as conn:
        started.set()  # a statement that runs a while inside SQLite, the GIL released
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                     "WHERE i < 1500000) SELECT count(*) FROM n").fetchone()
        conn.execute("PRAGMA user_version = 77")
    outcome.append("committed")
thread = threading.Thread(target=change)
thread.start()
started.wait()
time.sleep(0.1)
db.close()  # the daemon's stop: a part still busy past its budget
thread.join()
print("outcome", outcome)
"""


def test_closing_the_database_leaves_another_threads_statement_whole(tmp_path: Path) -> None:
    """``Database.close()`` while another thread is inside a transaction (the daemon's stop
    leaves a part blocked past its budget to end with the process): that thread's change
    commits and the process lives. CI saw the process die (SIGSEGV in a commitment
    delivery's COMMIT as its database was closed); before, the change was lost with
    "Cannot operate on a closed database", or the process died."""
    for run in range(3):
        home = tmp_path / str(run)
        home.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", CLOSE_UNDER_A_STATEMENT, str(home)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert "outcome ['committed']" in done.stdout, done.stderr[-2000:]
        version = sqlite3.connect(home / "pas.sqlite").execute("PRAGMA user_version")
        assert version.fetchone()[0] == 77


def test_the_daemon_holds_no_more_descriptors_after_many_associations(pas) -> None:
    """Stores, queries (C-FIND, its own association each, as a viewer makes them) and
    DICOMweb requests, each served by threads that come and go."""
    one = CT_DIR / "A002304_axial_19001231-076.dcm"
    study_uid = dcmread(one, stop_before_pixels=True).StudyInstanceUID
    qido = f"http://127.0.0.1:{pas.http_port}/dicom-web/studies?StudyInstanceUID={study_uid}"

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{pas.proc.pid}/fd"))

    def one_of_each() -> None:
        storescu([one], pas.port)
        found = subprocess.run(
            ["findscu", "-S", "-aec", "PAS", "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(pas.port)],
            env=DCMTK_ENV, capture_output=True, text=True, check=True)
        assert study_uid in found.stderr + found.stdout
        answer = httpx.get(qido, timeout=30)
        assert answer.status_code == 200 and len(answer.json()) == 1

    for _ in range(3):  # the idle pool and the first threads' connections
        one_of_each()
    before = descriptors()
    for _ in range(30):
        one_of_each()
    # Threads end just after the peer saw the release: wait for them, not a fixed time.
    wait_for(lambda: descriptors() <= before + 3, 10, what="descriptors back to their level")
    assert pas.status()["instances"] == 1


def _summed(db: Database) -> dict[str, int]:
    """What the triggers keep, computed the slow way (every instance row)."""
    row = db.query_one(
        """SELECT count(*) AS files, coalesce(sum(size), 0) AS bytes,
                  coalesce(sum(is_current), 0) AS instances,
                  coalesce(sum(version > 1), 0) AS conflicts,
                  coalesce(sum(confirmed_at IS NOT NULL AND is_current = 1), 0) AS confirmed
           FROM instances""")
    return dict(row)


def _kept(db: Database) -> dict[str, int]:
    return dict(db.query_one("SELECT files, bytes, instances, conflicts, confirmed "
                             "FROM instance_totals"))


def test_the_totals_row_follows_every_change_of_the_instances(tmp_path: Path) -> None:
    """index.totals reads one row that triggers keep (the status page, the heartbeat and the
    metrics once summed every instance). Through the real code paths (receive, a duplicate, a
    conflicting version, the region's confirmations, routing, an eviction) it always equals
    the sum over the rows."""
    from io import BytesIO

    from appliance.ingest.receive import Receiver
    from appliance.store import eviction, index
    from appliance.store import jobs as job_store
    from appliance.store.spool import Spool

    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    receiver = Receiver(db, spool)
    assert _kept(db) == _summed(db) == {"files": 0, "bytes": 0, "instances": 0,
                                         "conflicts": 0, "confirmed": 0}
    sources = sorted(CT_DIR.glob("*.dcm"))[:6]
    received = [receiver.receive_file(p.read_bytes()) for p in sources]
    receiver.receive_file(sources[0].read_bytes())                 # a duplicate
    assert _kept(db) == _summed(db) and _kept(db)["files"] == 6
    changed = dcmread(sources[1])
    changed.PatientName = "OTHER^BYTES"                             # same UID, other bytes
    out = BytesIO()
    changed.save_as(out, enforce_file_format=True)
    assert receiver.receive_file(out.getvalue()).conflict
    assert _kept(db) == _summed(db)
    assert (_kept(db)["files"], _kept(db)["instances"], _kept(db)["conflicts"]) == (7, 6, 1)
    rows = db.query("SELECT sop_instance_uid, sha256, study_fk, id FROM instances")
    job_store.confirm_instances(db, [(r["sop_instance_uid"], r["sha256"]) for r in rows])
    assert _kept(db) == _summed(db) and _kept(db)["confirmed"] == 6
    job_store.route_study(db, rows[0]["study_fk"], [r["id"] for r in rows], [])
    assert _kept(db) == _summed(db)
    study_uid = received[0].study_uid
    eviction.evict_study(db, spool, study_uid, force=True)
    assert _kept(db) == _summed(db)
    totals = index.totals(db)
    assert (totals["files"], totals["bytes"]) == (_summed(db)["files"], _summed(db)["bytes"])
    assert index.spool_bytes(db) == _summed(db)["bytes"]


# --- transaction(): a failed COMMIT, an error SQLite already rolled back ------------------------


def _patients_seen_by_another_connection(path: Path) -> list[str]:
    other = sqlite3.connect(path)
    try:
        return [row[0] for row in other.execute("SELECT patient_id FROM patients ORDER BY 1")]
    finally:
        other.close()


def test_a_failed_commit_is_rolled_back_and_never_joined_by_the_next_transaction(
        tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    # A deferred foreign-key violation fails the COMMIT itself, and SQLite keeps the
    # transaction open (as it may on SQLITE_BUSY at COMMIT).
    with pytest.raises(sqlite3.IntegrityError), db.transaction() as conn:
        conn.execute("PRAGMA defer_foreign_keys=ON")
        conn.execute("INSERT INTO patients (patient_id, issuer) VALUES ('LOST', '')")
        conn.execute("INSERT INTO series (series_uid, study_fk) VALUES ('1.2.3', 999)")
    assert not db.connection().in_transaction
    # The next state change on this thread commits (it once joined the open transaction
    # and returned without committing: a C-STORE answered success, its row never written).
    with db.transaction() as conn:
        conn.execute("INSERT INTO patients (patient_id, issuer) VALUES ('KEPT', '')")
    assert _patients_seen_by_another_connection(db.path) == ["KEPT"]
    db.close()


def test_the_caller_sees_sqlite_full_not_the_failed_rollback(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    conn = db.connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages + 2}")  # a real SQLITE_FULL, soon
    with pytest.raises(sqlite3.OperationalError) as raised, db.transaction() as conn:
        for n in range(1000):
            conn.execute("INSERT INTO patients (patient_id, issuer, name) VALUES (?, '', ?)",
                         (f"P{n}", "x" * 500))
    # SQLite rolled the transaction back itself; the ROLLBACK that followed failed ("no
    # transaction is active") and its error used to reach the caller instead.
    assert raised.value.sqlite_errorcode == sqlite3.SQLITE_FULL
    conn.execute("PRAGMA max_page_count=1073741823")
    with db.transaction() as conn:
        conn.execute("INSERT INTO patients (patient_id, issuer) VALUES ('AFTER', '')")
    assert _patients_seen_by_another_connection(db.path) == ["AFTER"]
    db.close()


def test_a_transaction_not_opened_by_transaction_is_refused_not_joined(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    db.connection().execute("BEGIN")
    db.connection().execute("INSERT INTO patients (patient_id, issuer) VALUES ('STRAY', '')")
    with pytest.raises(RuntimeError, match="did not open"), db.transaction():
        pass
    assert not db.connection().in_transaction
    with db.transaction() as conn:  # nesting still joins the transaction this method opened
        with db.transaction() as inner:
            inner.execute("INSERT INTO patients (patient_id, issuer) VALUES ('INNER', '')")
        conn.execute("INSERT INTO patients (patient_id, issuer) VALUES ('OUTER', '')")
    assert _patients_seen_by_another_connection(db.path) == ["INNER", "OUTER"]
    db.close()


def test_metric_counters_never_go_down_when_the_cache_evicts(tmp_path: Path) -> None:
    """pas_received_*_total and the upload counters were sums over instance and job rows, so
    an eviction or a purge made them go down (Prometheus: a reset, rate() a false spike).
    They are now rows that triggers add to in the transaction of the change."""
    from appliance.ingest.receive import Receiver
    from appliance.store import eviction
    from appliance.store import jobs as job_store
    from appliance.store import ops as ops_store
    from appliance.store.spool import Spool

    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    receiver = Receiver(db, spool)
    sources = sorted(CT_DIR.glob("*.dcm"))[:4]
    received = [receiver.receive_file(p.read_bytes(), calling_ae="CT1") for p in sources]
    size = sum(p.stat().st_size for p in sources)
    rows = db.query("SELECT id, study_fk FROM instances")
    job_store.route_study(db, rows[0]["study_fk"], [r["id"] for r in rows],
                          [job_store.NewJob("hub", "region", 0, "r", [r["id"] for r in rows])])
    (job,) = db.query("SELECT id FROM jobs")
    job_store.save_progress(db, job["id"], {"bytes_sent": 1000, "original_bytes_sent": 3000})
    job_store.save_progress(db, job["id"], {"bytes_sent": 1500, "original_bytes_sent": 4000})
    job_store.confirm_instances(db, [(r["sop_instance_uid"], r["sha256"]) for r in db.query(
        "SELECT sop_instance_uid, sha256 FROM instances")])
    before = (ops_store.received_by_calling_ae(db), ops_store.hub_upload_totals(db))
    assert before == ([{"calling_ae": "CT1", "instances": 4, "bytes": size}],
                      {"wire": 1500, "original": 4000})
    for study_uid in {r.study_uid for r in received}:
        eviction.evict_study(db, spool, study_uid, force=True)
    assert [tuple(r) for r in db.query("SELECT (SELECT count(*) FROM instances), "
                                       "(SELECT count(*) FROM jobs)")] == [(0, 0)]
    assert (ops_store.received_by_calling_ae(db), ops_store.hub_upload_totals(db)) == before
    receiver.receive_file(sources[0].read_bytes(), calling_ae="CT1")  # received again: counts
    assert ops_store.received_by_calling_ae(db)[0]["instances"] == 5


def test_a_hub_job_held_back_by_an_earlier_one_of_its_study_says_so(tmp_path: Path) -> None:
    """A study's hub jobs go in routing order (jobs.claim_next); the later one showed as
    pending and due, with no reason, while it did not start. pas queue list now says what
    it waits for; the claim and the list read one condition."""
    from appliance.ingest.receive import Receiver
    from appliance.store import jobs as job_store
    from appliance.store.spool import Spool
    from tests.support.peers import run_pas

    home = tmp_path / "home"
    db = Database(home / "pas.sqlite")
    receiver = Receiver(db, Spool(home / "spool", fsync=False))
    one_study = dcmread(sorted(CT_DIR.glob("*.dcm"))[0], stop_before_pixels=True)
    for path in sorted(CT_DIR.glob(f"{one_study.PatientID}_*.dcm")):
        if dcmread(path, stop_before_pixels=True).StudyInstanceUID == \
                one_study.StudyInstanceUID:
            receiver.receive_file(path.read_bytes())
    first, second = [r["id"] for r in db.query("SELECT id FROM instances ORDER BY id")][:2]
    (study,) = {r["study_fk"] for r in db.query("SELECT study_fk FROM instances")}
    job_store.route_study(db, study, [first], [job_store.NewJob("hub", "hub", 2, "r", [first])])
    job_store.route_study(db, study, [second],
                          [job_store.NewJob("hub", "hub", 2, "r", [second])])
    earlier, later = sorted(r["id"] for r in db.query("SELECT id FROM jobs"))
    waits = {r["id"]: r["waits_for_job"] for r in job_store.list_jobs(db)}
    assert waits == {earlier: None, later: earlier}
    listed = run_pas(["queue", "list"],
                     {**os.environ, "PAS_HOME": str(home), "COLUMNS": "200"}, timeout=60)
    assert listed.returncode == 0, listed.stderr
    cells = {row[0]: row for row in ([c.strip() for c in line.split("│")[1:-1]]
                                     for line in listed.stdout.splitlines() if "│" in line)}
    assert cells[str(later)][7] == f"after job {earlier}", listed.stdout
    assert cells[str(earlier)][7] != f"after job {later}", listed.stdout
    # A retry of the later one said "will be retried now" while it waited its turn. Never
    # tried, it is a retry that changes nothing: it says so, and what it waits for.
    retried = run_pas(["queue", "retry", str(later)], {**os.environ, "PAS_HOME": str(home)},
                      timeout=60)
    assert retried.returncode == 0, retried.stderr
    assert " ".join(retried.stdout.split()) == (
        f"job {later} was already pending and due once job {earlier} is over (it goes to hub "
        "first), with no attempt counted: nothing changed")
    claimed = job_store.claim_next(db, "test", 60)
    assert claimed is not None and claimed.id == earlier
    assert job_store.claim_next(db, "test", 60) is None  # the later one waits its turn
    job_store.finish(db, earlier, "test")
    assert {r["id"]: r["waits_for_job"] for r in job_store.list_jobs(db)}[later] is None
    claimed = job_store.claim_next(db, "test", 60)
    assert claimed is not None and claimed.id == later


def test_a_transaction_that_need_not_be_durable_leaves_the_connection_durable(
        tmp_path: Path) -> None:
    """``transaction(durable=False)`` (the readers' rows) commits without waiting for the
    disk; the connection is back to ``synchronous=FULL`` after it, committed or rolled back,
    for the C-STORE whose commit comes next on it (invariant 1)."""
    db = Database(tmp_path / "pas.sqlite")
    synchronous = "PRAGMA synchronous"
    with db.transaction() as conn:
        conn.execute("CREATE TABLE worth_nothing (x)")
    with db.transaction(durable=False) as conn:
        assert conn.execute(synchronous).fetchone()[0] == 1  # NORMAL
        conn.execute("INSERT INTO worth_nothing VALUES (1)")
    assert db.connection().execute(synchronous).fetchone()[0] == 2  # FULL
    with pytest.raises(ZeroDivisionError), db.transaction(durable=False):
        raise ZeroDivisionError
    assert db.connection().execute(synchronous).fetchone()[0] == 2
    with db.transaction() as conn:
        assert conn.execute(synchronous).fetchone()[0] == 2
        with db.transaction(durable=False):  # nested: the outer one's durability
            assert conn.execute(synchronous).fetchone()[0] == 2
    assert db.query("SELECT count(*) FROM worth_nothing")[0][0] == 1
    db.close()
