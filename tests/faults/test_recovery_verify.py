"""Start-up recovery, ``pas verify [--repair]`` and the scrub on a spool damaged on purpose.

Real files (the CT set) go through the real receive path into a real SQLite index; then the
test deletes, truncates and flips bytes in them, and drops garbage and temp files in the
spool, as a failing disk or a crash would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.ingest.receive import Receiver
from appliance.ops.recovery import Scrubber, startup_recovery
from appliance.store import cache as cache_store
from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.faults.helpers import spool_state
from tests.support.peers import CT_DIR, run_pas


@pytest.fixture
def filled(tmp_path: Path):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    db = Database(home / "pas.sqlite")
    spool = Spool(home / "spool")
    receiver = Receiver(db, spool)
    sources = sorted(CT_DIR.glob("*.dcm"))[:6]
    received = [receiver.receive_file(p.read_bytes()) for p in sources]
    yield home, db, spool, receiver, sources, received
    db.close()


def _pas(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PAS_HOME": str(home), "COLUMNS": "200"}
    return run_pas(list(args), env, timeout=60)


def test_verify_reports_then_recovery_flags_and_repair_restores(filled) -> None:  # type: ignore[no-untyped-def]
    home, db, spool, receiver, sources, received = filled
    missing, truncated, flipped = (
        spool.path(db.query_one("SELECT path FROM instances WHERE id = ?",
                                (r.instance_id,))["path"]) for r in received[:3])
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:1000])
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF
    flipped.write_bytes(bytes(data))
    garbage = spool.root / "ab" / "cd" / ("ab" + "cd" + "0" * 60 + ".dcm")
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"not what the name says")
    (spool.tmp / "interrupted.part").write_bytes(b"x" * 100)

    # 1. verify without --repair: reports every problem, exit 1, changes nothing.
    result = _pas(home, "verify", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert (report["files"], report["ok"], report["missing"], report["hash_mismatch"]) == \
        (6, 3, 1, 2)
    assert any("orphan" in p and garbage.name in p for p in report["problems"])
    assert garbage.exists() and flipped.exists()
    assert spool_state(home)["rows"] == 6

    # 2. start-up recovery: temp removed, garbage quarantined (not deleted), the missing and
    # the truncated file flagged; the flipped byte has the right size: the scrub finds it.
    recovery = startup_recovery(db, spool, receiver)
    assert recovery.temp_files_removed == 1
    assert recovery.orphans_quarantined == 1 and not garbage.exists()
    assert (spool.root / "quarantine").is_dir()
    assert (recovery.missing, recovery.size_mismatch) == (1, 1)
    assert cache_store.health(db)["integrity_issues"] == {
        "hash_mismatch": 2, "missing": 1, "orphan_corrupt": 1, "size_mismatch": 1}
    kinds = sorted(i["kind"] for i in cache_store.open_issues(db))
    # verify (step 1) flagged the two hash mismatches and the missing file already; flags
    # are not duplicated.
    assert kinds == ["hash_mismatch", "hash_mismatch", "missing", "orphan_corrupt",
                     "size_mismatch"]
    scrubber = Scrubber(db, spool, bytes_per_s=50e6, batch=4)
    stop = threading.Event()
    while scrubber.step(stop):
        pass
    assert scrubber.last_report.hash_mismatch == 2 and scrubber.last_report.missing == 1
    assert "hash_mismatch" in {i["kind"] for i in cache_store.open_issues(db)}
    assert spool_state(home)["rows"] == 6  # nothing was dropped from the index
    # The scrub set the two damaged copies aside (never served again) and flagged them
    # missing too: their studies are served as ones with a lost file.
    assert not truncated.exists() and not flipped.exists()
    assert len(cache_store.study_files_missing(db, str(received[1].study_uid))) >= 1
    assert sorted(p.name for p in (spool.root / "quarantine").iterdir()
                  if p.name.endswith(".dcm") and not p.name.endswith(garbage.name)) == sorted(
        str(p.relative_to(spool.root)).replace("/", "_") for p in (truncated, flipped))

    # 3. --repair has nothing left to set aside (it moved damaged copies aside itself when
    # the scrub had not); the modality re-sends; verify is clean again.
    result = _pas(home, "verify", "--repair", "--json")
    assert json.loads(result.stdout)["repaired"] == 0
    assert json.loads(result.stdout)["missing"] == 3
    for source in sources[:3]:
        again = receiver.receive_file(source.read_bytes())
        assert again.duplicate  # the row was there all along: only the file comes back
    result = _pas(home, "verify", "--json")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["ok"] == 6
    open_kinds = {i["kind"] for i in cache_store.open_issues(db)}
    assert open_kinds == {"orphan_corrupt"}  # the quarantined garbage stays for a human
    audit_events = {r["event"] for r in db.query("SELECT event FROM audit")}
    assert {"verify", "integrity", "recovery"} <= audit_events


def test_startup_releases_only_this_hosts_leases(filled) -> None:  # type: ignore[no-untyped-def]
    _home, db, spool, receiver, _sources, received = filled
    study_fk = db.query_one("SELECT study_fk FROM instances WHERE id = ?",
                            (received[0].instance_id,))["study_fk"]
    job_store.route_study(db, study_fk, [received[0].instance_id], [
        job_store.NewJob("dicom", "a", 2, "r", [received[0].instance_id]),
        job_store.NewJob("dicom", "b", 2, "r", [received[0].instance_id]),
    ])
    mine = job_store.claim_next(db, "thishost:111:abc:0", lease_s=3600)
    theirs = job_store.claim_next(db, "otherhost:222:def:0", lease_s=3600)
    assert mine is not None and theirs is not None
    report = startup_recovery(db, spool, receiver, host="thishost")
    assert report.leases_released == 1
    states = {r["lease_owner"]: (r["state"], r["attempts"])
              for r in db.query("SELECT * FROM jobs")}
    # The dead process's attempt stays counted (a job that crashes the daemon must run out
    # of attempts), and the job is due at once.
    assert states[None] == ("pending", 1)
    assert db.query_one("SELECT last_error FROM jobs WHERE id = ?", (mine.id,))["last_error"] == (
        "the worker died while sending it (the daemon stopped during attempt 1)")
    assert states["otherhost:222:def:0"] == ("running", 1)
    again = job_store.claim_next(db, "thishost:333:new:0", lease_s=60)
    assert again is not None and again.id == mine.id


def test_reconcile_walks_index_and_spool_side_by_side_in_pages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up recovery's single pass (cache.reconcile): the index a page of rows at a time,
    the spool one directory at a time, merged in path order. With pages of 3 rows and a
    spool of every shape (fan-out and nested directories, a root-level file, names that sort
    around a directory's), it gives exactly what comparing the two complete sets gives, and
    recovery adopts orphans met during the walk, each once."""
    monkeypatch.setattr(cache_store, "RECONCILE_PAGE", 3)
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    receiver = Receiver(db, spool)
    received = [receiver.receive_file(p.read_bytes()) for p in sorted(CT_DIR.glob("*.dcm"))[:12]]
    rows = {r["path"]: r["size"] for r in db.query("SELECT path, size FROM instances")}
    paths = sorted(rows)
    (spool.root / paths[0]).unlink()                            # missing
    (spool.root / paths[1]).write_bytes(b"short")               # size mismatch
    with db.transaction() as conn:                              # four orphans: lost commits
        for path in paths[2:6]:
            conn.execute("DELETE FROM instances WHERE path = ?", (path,))
    extra = {"ab/cd/" + "0" * 64 + ".dcm": b"nested", "ab.dcm": b"root-level",
             "ab/" + "f" * 64 + ".dcm": b"fan-out", "0" * 64 + ".dcm": b"root"}
    for relative, content in extra.items():
        (spool.root / relative).parent.mkdir(parents=True, exist_ok=True)
        (spool.root / relative).write_bytes(content)

    indexed = {r["path"]: r["size"] for r in db.query("SELECT path, size FROM instances")}
    on_disk = {str(p.relative_to(spool.root)): p.stat().st_size
               for p in spool.root.rglob("*.dcm") if p.parent != spool.tmp}
    walked = list(cache_store.reconcile(db, spool))
    assert [w.path for w in walked] == sorted(set(indexed) | set(on_disk))
    assert {w.path: (w.indexed_size, w.size_on_disk) for w in walked} == {
        p: (indexed.get(p), on_disk.get(p)) for p in set(indexed) | set(on_disk)}

    report = startup_recovery(db, spool, receiver)
    assert (report.missing, report.size_mismatch) == (1, 1)
    assert report.orphans_adopted == 4                   # the lost commits, each once
    assert report.orphans_quarantined == len(extra)      # names that are not their content
    assert db.query_one("SELECT count(*) AS n FROM instances")["n"] == len(received)
    again = startup_recovery(db, spool, receiver)        # idempotent: nothing new to do
    assert (again.orphans_adopted, again.orphans_quarantined, again.missing,
            again.size_mismatch) == (0, 0, 1, 1)


def _by_study(count: int) -> list[list[Path]]:
    from pydicom import dcmread

    studies: dict[str, list[Path]] = {}
    for path in sorted(CT_DIR.glob("*.dcm")):
        uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        studies.setdefault(uid, []).append(path)
    return [studies[uid] for uid in sorted(studies)[:count]]


def _two_studies_then_kill(tmp_path: Path) -> tuple[Any, int, str, list[Any], list[Any]]:
    """A real ``pas run`` receives two studies from storescu and is killed (-9): the
    daemon, its dead pid, the first study's UID (to be evicted), and the index rows of each
    study (the first, and the other one, to be filed again)."""
    from pydicom import dcmread

    from tests.support.peers import PasProcess, read_rows, storescu

    evicted_files, refiled_files = _by_study(2)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_HTTP__ENABLED": "false"}).start()
    storescu([*evicted_files, *refiled_files], pas.port)
    rows = read_rows(pas.home / "pas.sqlite",
                     "SELECT s.study_uid, i.path, i.sha256 FROM instances i "
                     "JOIN studies s ON s.id = i.study_fk ORDER BY i.path")
    assert len(rows) == len(evicted_files) + len(refiled_files)
    assert pas.proc is not None
    dead_pid = pas.proc.pid
    pas.kill()  # kill -9: the pid in the leftovers' names is a dead process's
    evicted_uid = str(dcmread(evicted_files[0], stop_before_pixels=True).StudyInstanceUID)
    return (pas, dead_pid, evicted_uid, [r for r in rows if r["study_uid"] == evicted_uid],
            [r for r in rows if r["study_uid"] != evicted_uid])


def _leave_eviction_asides(home: Path, evicted_uid: str, evicted: list[Any],
                           refiled: list[Any], aside: str) -> None:
    """The disk and index as a kill -9 leaves them in the middle of evictions, under the
    name suffix ``aside`` (``.evicting-<pid>``). Evicted: a second name for each file, then
    the real purge (rows deleted, flags written, files unlinked under their own names), then
    the flags reopened, as the transaction that resolves them never committed. Filed again
    (``refiled``): their eviction's flag is open, their rows are there, each file is renamed
    aside."""
    spool = home / "spool"
    for row in evicted:
        os.link(spool / row["path"], spool / (row["path"] + aside))
    purged = _pas(home, "cache", "purge", evicted_uid, "--force")
    assert purged.returncode == 0, purged.stderr
    db = Database(home / "pas.sqlite")
    with db.transaction() as conn:
        conn.executemany("UPDATE integrity_issues SET resolved_at = NULL, resolution = NULL "
                         "WHERE kind = 'evicting' AND path = ?", [(r["path"],) for r in evicted])
        conn.executemany("INSERT INTO integrity_issues (found_at, kind, path, detail) "
                         "VALUES (1, 'evicting', ?, 'study x')", [(r["path"],) for r in refiled])
    db.close()
    for row in refiled:
        os.rename(spool / row["path"], spool / (row["path"] + aside))


def test_start_up_sweeps_files_an_eviction_left_renamed_aside(tmp_path: Path) -> None:
    """An eviction renames each file to ``<name>.dcm.evicting-<pid>`` and then unlinks it
    (store.eviction._unlink_if_same). A kill -9 between the two left that name for ever: never
    swept, its bytes counted nowhere, and the file missing for any row that names it again.
    The state is made on disk and in the index as such a crash leaves it, for the two cases:

    - evicted: the rows' deletion and the ``evicting`` flags committed, the file renamed aside
      and not unlinked (the flags' resolution rolled back with the crash): removed.
    - filed again: the index names the path again (the same bytes re-received meanwhile), the
      file renamed aside and not renamed back: renamed back. A third copy beside a file in
      place is removed.

    Then ``pas run`` starts on that home; before its port opens, the leftovers are gone."""
    from tests.support.peers import read_rows

    pas, dead_pid, evicted_uid, evicted, refiled = _two_studies_then_kill(tmp_path)
    home, db_path = pas.home, pas.home / "pas.sqlite"
    spool = home / "spool"
    aside = f".evicting-{dead_pid}"

    _leave_eviction_asides(home, evicted_uid, evicted, refiled, aside)
    # The first one filed again also has a copy back in place.
    os.link(spool / (refiled[0]["path"] + aside), spool / refiled[0]["path"])
    leftovers = sorted(p.name for p in spool.rglob("*.evicting-*"))
    assert len(leftovers) == len(evicted) + len(refiled)

    pas.start()
    try:
        assert sorted(p.name for p in spool.rglob("*.evicting-*")) == []
        for row in evicted:
            assert not (spool / row["path"]).exists()
        for row in refiled:
            assert _sha256(spool / row["path"]) == row["sha256"]
        assert pas.status()["instances"] == len(refiled)
        issues = read_rows(db_path, "SELECT kind, path FROM integrity_issues "
                                    "WHERE resolved_at IS NULL")
        assert [dict(i) for i in issues] == []  # no "missing", no "evicting" left open
        log = pas.log()
        assert f"eviction leftovers: {len(refiled) - 1} renamed back" in log
        assert f"{len(evicted) + 1} removed" in log
    finally:
        pas.stop()


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_start_up_sweeps_leftovers_whose_pid_another_process_took(tmp_path: Path) -> None:
    """The pid in ``<name>.dcm.evicting-<pid>`` is the evicting process's; the sweep leaves
    the names of a live one to it. After a crash (power loss, kill -9) and a reboot, that pid
    is soon another program's: the leftovers were then skipped at every start for as long as
    that program ran, the bytes of an evicted file uncounted on the disk and an instance
    filed again reported missing with its bytes lying beside it under the other name.

    The crash state is made as in the test above; the pid in the names is that of a process
    started after the crash (``sleep``, standing in for whatever took the pid over). It is
    alive, but it is no PAS process and does not hold this home's database: the leftovers are
    settled at the next start."""
    from tests.support.peers import read_rows

    pas, _, evicted_uid, evicted, refiled = _two_studies_then_kill(tmp_path)
    home, db_path = pas.home, pas.home / "pas.sqlite"
    spool = home / "spool"
    other = subprocess.Popen(["sleep", "600"])  # the dead evictor's pid, taken over
    # A live evictor (pas cache purge beside the daemon): its name aside is left to it.
    evictor = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
         "db.execute('SELECT 1').fetchall(); print('open', flush=True); sys.stdin.read()",
         str(db_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert evictor.stdout is not None and evictor.stdout.readline() == "open\n"
        live_aside = spool / (refiled[0]["path"] + f".evicting-{evictor.pid}")
        aside = f".evicting-{other.pid}"
        _leave_eviction_asides(home, evicted_uid, evicted, refiled, aside)
        os.link(spool / (refiled[0]["path"] + aside), live_aside)

        pas.start()
        try:
            assert other.poll() is None and evictor.poll() is None  # both pids still run
            assert sorted(spool.rglob("*.evicting-*")) == [live_aside]
            for row in evicted:
                assert not (spool / row["path"]).exists()
            for row in refiled:
                assert _sha256(spool / row["path"]) == row["sha256"]
            issues = read_rows(db_path, "SELECT kind, path FROM integrity_issues "
                                        "WHERE resolved_at IS NULL")
            assert [dict(i) for i in issues] == []  # no instance missing, no flag left open
        finally:
            pas.stop()
    finally:
        for process in (other, evictor):
            process.kill()
            process.communicate()


def test_an_orphan_gone_before_its_adoption_is_skipped_and_the_others_adopted(
        tmp_path: Path) -> None:
    """``pas verify --repair`` runs recovery beside a live daemon, and orphans are adopted
    only after the whole walk (oldest first): a file the walk saw without a row may be gone
    by its turn (the daemon's eviction unlinks its files after deleting the rows; a receive
    whose commit failed discards its file). Recovery raised FileNotFoundError there and
    stopped, the orphans after it left unadopted; it skips that one and goes on."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    receiver = Receiver(db, spool)
    received = [receiver.receive_file(p.read_bytes()) for p in sorted(CT_DIR.glob("*.dcm"))[:3]]
    paths = sorted(r["path"] for r in db.query("SELECT path FROM instances"))
    with db.transaction() as conn:                              # three lost commits
        conn.execute("DELETE FROM instances")
    first = min(paths, key=lambda p: (spool.root / p).stat().st_mtime)

    def live_daemon_meanwhile(message: str) -> None:
        if "indexing files without a row" in message:           # the walk is over
            (spool.root / first).unlink(missing_ok=True)        # e.g. an eviction's unlink

    report = startup_recovery(db, spool, receiver, progress=live_daemon_meanwhile,
                              progress_every_s=0)
    assert report.orphans_adopted == 2
    assert sorted(r["path"] for r in db.query("SELECT path FROM instances")) == \
        sorted(set(paths) - {first})
    assert len(received) == 3 and not (spool.root / first).exists()
    assert cache_store.open_issues(db) == []


def test_a_resend_filed_while_recovery_finishes_an_eviction_keeps_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pas verify --repair`` (start-up recovery beside a live daemon) meets a file an
    eviction had not unlinked yet (its rows gone, its ``evicting`` flag open). A modality
    re-sends the same bytes, and the receive commits its row after the walk read the rows
    of that page: recovery unlinked the file anyway, under a row answered Success (a missing
    file, unconfirmed). Now the unlink looks at the rows under the write lock: kept."""
    from appliance.store import eviction

    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(db, spool)
    content = sorted(CT_DIR.glob("*.dcm"))[0].read_bytes()
    first = receiver.receive_file(content)
    with db.transaction() as conn:  # the region's receipt (the uplink does it)
        conn.execute("UPDATE instances SET confirmed_at = 1, routed_at = coalesce(routed_at, 1)")
    path = db.query_one("SELECT path FROM instances WHERE id = ?",
                        (first.instance_id,))["path"]
    # The eviction's rows and flag committed; its files not unlinked yet.
    monkeypatch.setattr(eviction, "delete_evicted_files", lambda *args, **kwargs: [])
    eviction.evict_study(db, spool, first.study_uid)
    monkeypatch.undo()
    assert (spool.root / path).exists() and db.query("SELECT id FROM instances") == []
    real_reconcile = cache_store.reconcile
    resent = []

    def reconcile_then_resend(*args, **kwargs):  # type: ignore[no-untyped-def]
        for item in real_reconcile(*args, **kwargs):
            if item.path == path:  # the walk read this page's rows before the re-send
                resent.append(receiver.receive_file(content))
            yield item

    monkeypatch.setattr(cache_store, "reconcile", reconcile_then_resend)
    report = startup_recovery(db, spool, receiver)
    (again,) = resent
    row = db.query_one("SELECT path, sha256, confirmed_at FROM instances WHERE id = ?",
                       (again.instance_id,))
    assert row["path"] == path and row["confirmed_at"] is None
    assert (spool.root / path).exists(), "the re-sent instance's file was unlinked"
    assert hashlib.sha256((spool.root / path).read_bytes()).hexdigest() == row["sha256"]
    assert report.evictions_finished == 0
    assert cache_store.open_issues(db, ("evicting",)) == []  # resolved: kept
    db.close()


def test_start_up_resolves_flags_on_files_no_row_names_any_more(filled) -> None:  # type: ignore[no-untyped-def]
    """A "missing" flag whose instance was purged since (or evicted: the scrub raised such
    flags for files an eviction had just deleted with their rows) stayed open for ever: no
    row is left for a pass to find the path whole again, and `pas status`, the status page
    and the heartbeat kept counting it. Start-up recovery resolves it; a flag on a path a
    row still names stays open."""
    from appliance.store import eviction

    home, db, spool, receiver, sources, received = filled
    gone, kept = (db.query_one("SELECT path FROM instances WHERE id = ?",
                               (r.instance_id,))["path"] for r in received[:2])
    (spool.root / gone).unlink()
    (spool.root / kept).unlink()
    startup_recovery(db, spool, None)
    assert cache_store.health(db)["integrity_issues"] == {"missing": 2}
    study = db.query_one("SELECT s.study_uid FROM studies s JOIN instances i ON "
                         "i.study_fk = s.id WHERE i.path = ?", (gone,))["study_uid"]
    assert study != db.query_one("SELECT s.study_uid FROM studies s JOIN instances i ON "
                                 "i.study_fk = s.id WHERE i.path = ?", (kept,))["study_uid"]
    eviction.evict_study(db, spool, study, force=True, actor="operator:test")
    startup_recovery(db, spool, None)
    assert cache_store.health(db)["integrity_issues"] == {"missing": 1}
    assert [i["path"] for i in cache_store.open_issues(db, ("missing",))] == [kept]
