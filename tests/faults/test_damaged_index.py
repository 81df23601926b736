"""A damaged index database (appliance/store/damage.py; docs/reliability.md).

Found by trying it (2026-12-05): with one page of ``pas.sqlite`` torn (what a failing disk or
a controller that lied about a flush leaves), ``pas doctor`` said "database ok", and ``pas
run`` said "PAS ready", then logged a traceback every 2 s from its routing loop while the
modalities' C-STOREs failed. There was no way back but by hand.

Now the daemon refuses to start naming the damage and the fix, doctor fails its database
check, and ``pas cache rebuild-index`` sets the damaged file aside (kept, byte for byte) so
that start-up recovery indexes the spool again: every instance back, the version received
last serving (a correction is not undone by an older version adopted after it), none lost.
Real daemon, DCMTK storescu as the modality.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread

from appliance.ingest.receive import Receiver
from appliance.ops.recovery import startup_recovery
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.support.hub import HubProcess
from tests.support.peers import CT_DIR, PasProcess, read_rows, run_pas, storescu

CORRECTED = "CORRECTED^PATIENT"


def _versions(db: Path, sop_uid: str) -> list[sqlite3.Row]:
    return read_rows(db, "SELECT path, sha256, is_current FROM instances "
                         "WHERE sop_instance_uid = ? ORDER BY version", (sop_uid,))


def _tear_the_root_page_of(db: Path, table: str) -> None:
    """What a failing disk leaves: ``table``'s root page overwritten (after a checkpoint,
    so that the page is in the file and not only in the WAL)."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                            (table,)).fetchone()[0]
    with open(db, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xa5" * page_size)


def _original_and_correction() -> list[bytes]:
    """A CT file's bytes, and those of its correction (the same SOP Instance UID, the
    patient renamed)."""
    original = dcmread(sorted(CT_DIR.glob("*.dcm"))[0])
    correction = dcmread(sorted(CT_DIR.glob("*.dcm"))[0])
    correction.PatientName = CORRECTED
    buffers = []
    for dataset in (original, correction):
        buffer = BytesIO()
        dataset.save_as(buffer)
        buffers.append(buffer.getvalue())
    return buffers


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_damaged_index_is_refused_then_rebuilt_from_the_spool(tmp_path: Path) -> None:
    home = tmp_path / "pas"
    db = home / "pas.sqlite"
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_PREFETCH__ENABLED": "false", "PAS_HTTP__ENABLED": "false"})
    pas.start()
    first = sorted(CT_DIR.glob("*.dcm"))[0]
    study = dcmread(first, stop_before_pixels=True).StudyInstanceUID
    files = [f for f in sorted(CT_DIR.glob("*.dcm"))
             if dcmread(f, stop_before_pixels=True).StudyInstanceUID == study][:3]
    try:
        storescu(files, pas.port)
        # A correction of the first instance (same SOP Instance UID, the patient renamed),
        # sent again until its file's name sorts before the original's: start-up recovery
        # adopts in name order, so the older original is adopted after it.
        corrected = dcmread(files[0])
        sop_uid = str(corrected.SOPInstanceUID)
        for attempt in range(40):
            corrected.PatientName = CORRECTED
            corrected.StudyDescription = f"corrected {attempt}"
            corrected.save_as(tmp_path / "corrected.dcm")
            storescu([tmp_path / "corrected.dcm"], pas.port)
            versions = _versions(db, sop_uid)
            if versions[-1]["path"] < versions[0]["path"]:
                break
        assert versions[-1]["is_current"] and versions[-1]["path"] < versions[0]["path"]
    finally:
        pas.stop()
    current = {row["sop_instance_uid"]: row["path"] for row in read_rows(
        db, "SELECT sop_instance_uid, path FROM instances WHERE is_current = 1")}
    assert len(current) == 3
    spool_before = {p.relative_to(home): _sha256(p) for p in (home / "spool").glob("??/*.dcm")}
    _tear_the_root_page_of(db, "instances")
    damaged_sha = _sha256(db)

    # pas doctor fails the database check, naming the fix.
    doctor = pas.cli("doctor", "--json", check=False)
    check = {c["name"]: c for c in json.loads(doctor.stdout)}["database"]
    assert check["verdict"] == "fail", check
    assert check["detail"].startswith(f"{db} is damaged: ")
    assert "pas cache rebuild-index" in check["fix"]

    # A command that meets the damage says so, and where to look.
    listed = pas.cli("studies", check=False)
    assert listed.returncode == 1
    assert ("the index is damaged; pas doctor says what to do (pas cache rebuild-index)"
            in " ".join(listed.stderr.split())), listed.stderr

    # pas run refuses to start: one line, no traceback, the DICOM port never opened.
    run = run_pas(["run"], pas.env, timeout=60)
    said = run.stdout + run.stderr
    assert run.returncode == 1, said
    assert f"cannot start: the index database {db} is damaged (" in " ".join(said.split())
    assert "Traceback" not in said and "PAS ready" not in said

    # Set aside byte for byte; the new index's first audit row says where it went.
    rebuilt = pas.cli("cache", "rebuild-index")
    [aside] = home.glob("pas.sqlite.damaged-*Z")  # with its -wal and -shm beside it
    assert aside.name in " ".join(rebuilt.stdout.split())
    assert f"{len(spool_before)} files of the spool" in " ".join(rebuilt.stdout.split())
    assert _sha256(aside) == damaged_sha
    [row] = read_rows(db, "SELECT event, outcome, detail FROM audit")
    assert (row["event"], row["outcome"]) == ("recovery", "success")
    assert row["detail"].startswith(f"index set aside as {aside.name} (")

    # The next start indexes the spool again: each instance back, the correction serving,
    # the study under the corrected patient, no file changed or lost.
    pas.start()
    try:
        again = {row["sop_instance_uid"]: row["path"] for row in read_rows(
            db, "SELECT sop_instance_uid, path FROM instances WHERE is_current = 1")}
        assert again == current
        assert len(_versions(db, sop_uid)) == len(versions)
        [patient] = read_rows(db, "SELECT p.name FROM studies s JOIN patients p "
                                  "ON p.id = s.patient_fk WHERE s.study_uid = ?", (str(study),))
        assert patient["name"] == CORRECTED
    finally:
        pas.stop()
    assert {p.relative_to(home): _sha256(p)
            for p in (home / "spool").glob("??/*.dcm")} == spool_before

    # A sound index is not set aside without --force.
    refused = pas.cli("cache", "rebuild-index", check=False)
    assert refused.returncode == 1
    assert "quick_check ok" in refused.stdout + refused.stderr
    assert len(list(home.glob("pas.sqlite.damaged-*Z"))) == 1


def test_a_file_adopted_older_than_the_current_version_does_not_undo_it(
        tmp_path: Path) -> None:
    """Start-up recovery adopting an orphan older than the version the index serves (its
    commit was lost, then a correction of the same instance was received and committed):
    the orphan is kept beside it, not current, and leaves the study's patient as the
    correction filed it. Without its time on disk it took over as the newest."""
    db = Database(tmp_path / "pas.sqlite")
    receiver = Receiver(db, Spool(tmp_path / "spool", fsync=False))
    buffers = _original_and_correction()
    served = receiver.receive_file(buffers[1], source="CT1")
    adopted = receiver.receive_file(buffers[0], source="recovery",
                                    received_at=time.time() - 3600)
    assert adopted.conflict and not adopted.duplicate
    rows = db.query("SELECT id, is_current FROM instances WHERE sop_instance_uid = ? "
                    "ORDER BY version", (served.sop_instance_uid,))
    assert [(r["id"], r["is_current"]) for r in rows] == [
        (served.instance_id, 1), (adopted.instance_id, 0)]
    [patient] = db.query("SELECT name FROM patients")
    assert patient["name"] == CORRECTED
    db.close()


def test_an_orphan_indexed_meanwhile_then_corrected_does_not_undo_the_correction(
        tmp_path: Path) -> None:
    """``pas verify --repair`` beside a live daemon: the walk sees a file whose receive has
    not committed yet (an orphan, adopted only after the whole walk); meanwhile the daemon
    commits it, then receives a correction of the same instance. Adopting the file (bytes
    of the older version, now indexed) made that version current again and routed it again:
    the region and the viewers got the original back over the correction."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    receiver = Receiver(db, spool)
    buffers = _original_and_correction()
    spool.write([buffers[0]])                     # the live receive's file, its row to come
    live: list[Any] = []

    def live_daemon_meanwhile(message: str) -> None:
        if "indexing files without a row" in message and not live:   # the walk is over
            live.append(receiver.receive_file(buffers[0], source="CT1"))  # its commit
            live.append(receiver.receive_file(buffers[1], source="CT1"))  # the correction

    startup_recovery(db, spool, receiver, progress=live_daemon_meanwhile, progress_every_s=0)
    rows = db.query("SELECT id, is_current, routed_at FROM instances "
                    "WHERE sop_instance_uid = ? ORDER BY version", (live[0].sop_instance_uid,))
    assert [(r["id"], r["is_current"]) for r in rows] == [
        (live[0].instance_id, 0), (live[1].instance_id, 1)]
    [patient] = db.query("SELECT name FROM patients")
    assert patient["name"] == CORRECTED
    db.close()


def test_an_adopted_instance_older_than_its_studys_last_does_not_refile_it(
        tmp_path: Path) -> None:
    """Start-up recovery adopts a file whose commit was lost, its time on disk as its time
    of receipt; the study has received a later instance since, under the right PatientID
    (the modality's correction). The older file moved the study back to the wrong patient
    and set its last receipt back an hour, as if it were the study's last word."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False)
    receiver = Receiver(db, spool)
    first, later = (dcmread(p) for p in sorted(CT_DIR.glob("*.dcm"))[:2])
    later.StudyInstanceUID = first.StudyInstanceUID               # one study
    later.SeriesInstanceUID = first.SeriesInstanceUID
    first.PatientID, later.PatientID = "WRONG-1", "RIGHT-1"
    buffers = []
    for dataset in (first, later):
        buffer = BytesIO()
        dataset.save_as(buffer)
        buffers.append(buffer.getvalue())
    lost, _ = spool.write([buffers[0]])                     # its commit lost
    an_hour_ago = time.time() - 3600
    os.utime(spool.root / lost.path, (an_hour_ago, an_hour_ago))
    served = receiver.receive_file(buffers[1], source="CT1")
    report = startup_recovery(db, spool, receiver)
    assert report.orphans_adopted == 1
    [study] = db.query("SELECT p.patient_id, s.last_received_at FROM studies s "
                       "JOIN patients p ON p.id = s.patient_fk")
    assert study["patient_id"] == "RIGHT-1"
    received = db.query_one("SELECT received_at FROM instances WHERE id = ?",
                            (served.instance_id,))["received_at"]
    assert study["last_received_at"] == received
    assert db.query_one("SELECT count(*) AS n FROM instances WHERE is_current = 1")["n"] == 2
    db.close()


def test_a_damaged_hub_database_stops_the_hub_before_it_writes(tmp_path: Path) -> None:
    """The hub's database holds the sites' enrolments and the transfers under way: damaged,
    ``pas hub run`` refuses to start, naming it, and leaves it byte for byte (before, it
    started as if the file were sound and wrote to it)."""
    hub = HubProcess(tmp_path / "hub").init()
    hub.token("SITE-A")  # a row in enrol_tokens, so that the table has a page of its own
    db = hub.home / "hub.sqlite"
    _tear_the_root_page_of(db, "enrol_tokens")
    damaged = _sha256(db)
    run = run_pas(["hub", "run"], hub.env, timeout=60)
    said = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 1, said
    assert f"cannot start the hub: the hub database {db} is damaged (" in said
    assert "Traceback" not in said and "hub serving" not in said
    assert _sha256(db) == damaged
    # A hub command meeting the damage points to the hub's backup, not to the appliance's
    # rebuild-index (which would tell regional ops to run a command meaningless here).
    token = run_pas(["hub", "token", "SITE-B"], hub.env, timeout=60)
    said = " ".join((token.stdout + token.stderr).split())
    assert token.returncode == 1, said
    assert "the hub's database is damaged" in said and "Backing up the hub" in said, said
    assert "rebuild-index" not in said and "Traceback" not in said
    assert _sha256(db) == damaged


def test_a_damaged_index_is_not_backed_up(tmp_path: Path) -> None:
    """``pas backup`` of a damaged index wrote a backup that looked whole (the online backup
    copies pages as they are), then wrote its ``export`` audit row into the damaged file.
    It refuses, naming the damage, writes nothing, and leaves the index byte for byte."""
    from appliance.store import audit

    pas = PasProcess(tmp_path / "pas")
    db = pas.home / "pas.sqlite"
    index = Database(db)
    audit.record(index, "export", actor="operator:test", target="an earlier backup")
    index.close()
    _tear_the_root_page_of(db, "audit")
    damaged = _sha256(db)
    destination = tmp_path / "backups"
    destination.mkdir()
    refused = pas.cli("backup", str(destination), check=False)
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 1, said
    assert f"refused: {db} is damaged (" in said and "no backup written" in said
    assert "Traceback" not in said
    assert list(destination.iterdir()) == [] and _sha256(db) == damaged


def test_a_damaged_hub_database_is_not_backed_up(tmp_path: Path) -> None:
    """SQLite's online backup copies pages as they are: ``pas hub backup`` of a damaged
    ``hub.sqlite`` wrote a backup that looked whole, the newest, the one regional ops would
    restore. It refuses, naming the damage, and writes nothing."""
    hub = HubProcess(tmp_path / "hub").init()
    hub.token("SITE-A")
    db = hub.home / "hub.sqlite"
    _tear_the_root_page_of(db, "enrol_tokens")
    damaged = _sha256(db)
    destination = tmp_path / "backups"
    destination.mkdir()
    refused = hub.cli("backup", str(destination), check=False)
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 1, said
    assert f"refused: {db} is damaged (" in said and "no backup written" in said
    assert "Traceback" not in said
    assert list(destination.iterdir()) == [] and _sha256(db) == damaged


def test_a_second_set_aside_in_the_same_second_keeps_the_first(tmp_path: Path) -> None:
    """``pas cache rebuild-index`` names the file set aside by the second; run again within
    it (``--force`` on the fresh index, from a script), the rename replaced the damaged
    database set aside a moment before (its jobs, confirmations and audit trail) with the
    fresh empty one: the one copy of what the index alone knew, deleted. Each is kept."""
    from appliance.store.damage import set_aside

    path = tmp_path / "pas.sqlite"
    at = time.time()
    set_aside_as = []
    for label in ("the damaged one", "the fresh one"):
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE what (label TEXT)")
        conn.execute("INSERT INTO what VALUES (?)", (label,))
        conn.commit()
        conn.close()
        set_aside_as.append(set_aside(path, at=at))
    assert set_aside_as[0] != set_aside_as[1] and not path.exists()
    kept = []
    for moved in set_aside_as:
        conn = sqlite3.connect(moved)
        kept.append(conn.execute("SELECT label FROM what").fetchone()[0])
        conn.close()
    assert kept == ["the damaged one", "the fresh one"]
