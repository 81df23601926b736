"""Start-up recovery, ``pas verify [--repair]`` and the scrub on a spool damaged on purpose.

Real files (the CT set) go through the real receive path into a real SQLite index; then the
test deletes, truncates and flips bytes in them, and drops garbage and temp files in the
spool, as a failing disk or a crash would.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from appliance.ingest.receive import Receiver
from appliance.ops.recovery import Scrubber, startup_recovery
from appliance.store import cache as cache_store
from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.faults.helpers import spool_state
from tests.support.peers import CT_DIR, PAS_BIN


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
    return subprocess.run([str(PAS_BIN), *args], env=env, capture_output=True, text=True,
                          timeout=60)


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

    # 3. --repair moves damaged copies aside; the modality re-sends; verify is clean again.
    result = _pas(home, "verify", "--repair", "--json")
    assert json.loads(result.stdout)["repaired"] == 2
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
