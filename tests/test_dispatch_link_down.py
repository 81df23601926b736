"""Local destinations that cannot be reached at all wait for their link, uncounted.

A hospital PACS down for a weekend's maintenance (nothing listening on its port), or a
DICOMweb archive not started yet: the jobs to it must stay ``pending`` with their attempts
given back, however many tries that takes, and go through once the peer is there, with no
``pas queue retry``. They used to end ``failed`` after ``queue.max_attempts``. A peer that
answers and rejects the association still counts (tests/test_routing.py,
``test_rejecting_destination_counts_attempts_fails_then_retries``).

Real peers only: DCMTK storescp started late on the port the jobs aim at, Orthanc started
late in its namespace, and in-process the real dicom target against a closed port.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_settings
from appliance.dispatch.target_types import make_target
from appliance.dispatch.worker import Dispatcher
from appliance.store import index
from appliance.store import jobs as job_store
from appliance.store import uplink as uplink_store
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from appliance.store.jobs import WAITING_FOR_LINK
from appliance.store.spool import Spool
from tests.support.archived import orthanc_hashes
from tests.support.configs import everything_to
from tests.support.peers import (
    NetNamespace,
    Orthanc,
    PasProcess,
    StoreSCP,
    free_port,
    read_rows,
    run_pas,
    storescu,
    wait_for,
)
from tests.test_dispatch_dicom import write_config
from tests.test_ingest import dataset_part, index_rows, sop_uid
from tests.test_routing import CT_PATIENT

MAX_ATTEMPTS = 2  # write_config's, and the stowrs test's


def _job(pas: PasProcess) -> sqlite3.Row:
    [job] = read_rows(pas.home / "pas.sqlite", "SELECT * FROM jobs")
    return job


def _tries(pas: PasProcess, destination: str) -> int:
    """Attempts that found the destination unreachable (the dispatcher's log lines)."""
    return pas.log().count(f"to {destination}: destination unreachable")


def _waited_uncounted(pas: PasProcess, destination: str) -> sqlite3.Row:
    """Await more tries than ``MAX_ATTEMPTS`` (or the job's end: the old behaviour), then the
    job back to pending between two tries; checks it waits for the link, uncounted."""
    wait_for(lambda: _tries(pas, destination) > MAX_ATTEMPTS
             or _job(pas)["state"] in ("failed", "done"), 90,
             what=f"more than {MAX_ATTEMPTS} tries to reach {destination}")
    job = wait_for(lambda: (lambda j: j if j["state"] != "running" else None)(_job(pas)), 30,
                   what="the job between two tries")
    assert job["state"] == "pending", (job["state"], job["attempts"], job["last_error"])
    assert job["attempts"] == 0, job["last_error"]
    assert job["last_error"].startswith(f"{WAITING_FOR_LINK}{destination} unreachable: "), \
        job["last_error"]
    link = pas.status()["links"][destination]
    assert link["state"] == "down" and "unreachable" in link["last_error"], link
    return job


def test_unreachable_dicom_node_waits_uncounted_then_gets_the_study(pas_factory,
                                                                    tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "late", ae_title="PACS")  # its port chosen, nothing listening
    pas: PasProcess = pas_factory({
        "PAS_CONFIG": str(write_config(tmp_path / "appliance.toml", scp)),
        "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    storescu(CT_PATIENT, pas.port)
    job = _waited_uncounted(pas, "pacs")
    assert f"no connection to PACS@127.0.0.1:{scp.port}" in job["last_error"]
    # The journal of an outage: one warning when it begins, each later try as information,
    # and none of pynetdicom's per-try connect errors (which name no destination).
    log_text = pas.log()
    tries = [line for line in log_text.splitlines() if "to pacs: destination unreachable" in line]
    assert len(tries) > MAX_ATTEMPTS
    assert [" WARNING " in line for line in tries].count(True) == 1, tries
    assert "unable to connect to remote" not in log_text
    assert "TCP Initialisation Error" not in log_text
    # What an operator reads (a terminal wide enough for the table not to wrap its cells).
    listing = run_pas(["queue", "list"], {**pas.env, "COLUMNS": "200"}, timeout=60).stdout
    # Pending between two tries, or running one (the tries come every fraction of a second
    # here): never failed, and the last error says why it waits.
    assert re.search(r"│ (pending|running) ", listing) and "failed" not in listing, listing
    assert "waiting for the link: pacs unreachable" in listing, listing
    assert "│ routine " in listing, listing  # the rule's priority, not its rank (2)

    scp.start()  # the PACS is back from maintenance, on the same port
    try:
        wait_for(lambda: _job(pas)["state"] == "done", 30, what="the job delivered")
        assert _job(pas)["attempts"] == 1
        received = {sop_uid(p): hashlib.sha256(dataset_part(p)).hexdigest()
                    for p in scp.files()}
        # What PAS stored and sent, from the dataset on (storescp writes its own file meta).
        sent = {r["sop_instance_uid"]: hashlib.sha256(
                    dataset_part(pas.home / "spool" / r["path"])).hexdigest()
                for r in index_rows(pas.home)}
        assert len(scp.files()) == len(CT_PATIENT) == 3
        assert set(sent) == {sop_uid(p) for p in CT_PATIENT}
        assert received == sent  # each instance once, bit for bit
        assert pas.status()["links"]["pacs"]["state"] == "up"
        assert re.search(r" WARNING .*destination pacs reachable again: \d+ jobs? waiting",
                         pas.log()), pas.log()[-2000:]
    finally:
        scp.stop()


def _outage_start(pas: PasProcess) -> float | None:
    """When the dispatcher dated the destination's outage, as ``pas status --json`` says."""
    return pas.status()["links"]["pacs"].get("unreachable_since")


def _delays_since(pas: PasProcess, at: float) -> list[float]:
    """The waits the job was given by the tries logged after ``at`` (epoch seconds)."""
    delays = []
    for line in pas.log().splitlines():
        found = re.search(r"to pacs: destination unreachable for [\d.]+s, the job waits for it "
                          r"\(next try in ([\d.]+)s", line)
        logged = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if found and logged >= at:
            delays.append(float(found.group(1)))
    return delays


def test_an_outage_outlives_a_restart_of_the_daemon(pas_factory, tmp_path: Path) -> None:
    """The start of a local destination's outage was kept in memory: a restart in the
    middle of a weekend's PACS maintenance (an upgrade, a power cut) set the waits back to
    ``backoff_initial_s`` and logged the outage's warning again. It is kept with the link's
    state now: the restarted daemon goes on from the same start (the long wait), says once
    that the outage continues, and the study arrives bit-exact once the PACS is back."""
    scp = StoreSCP(tmp_path / "late", ae_title="PACS")  # its port chosen, nothing listening
    config = everything_to(tmp_path / "appliance.toml", scp, timeout_s=10, before=f"""
        [queue]
        max_attempts = {MAX_ATTEMPTS}
        backoff_initial_s = 0.2
        backoff_max_s = 60
        """)
    pas: PasProcess = pas_factory({"PAS_CONFIG": str(config),
                                   "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    storescu(CT_PATIENT, pas.port)
    wait_for(lambda: _tries(pas, "pacs") >= 1, 30, what="the first try")
    began = _outage_start(pas)
    assert began is not None and began <= time.time()
    # Four seconds of outage: the waits grow to a second (a quarter of it).
    wait_for(lambda: time.time() - began > 4 and _delays_since(pas, began)[-1] >= 0.75, 30,
             what="the waits grown with the outage")
    pas.stop()
    job = _job(pas)
    assert (job["state"], job["attempts"]) == ("pending", 0), dict(job)

    restarted = time.time()
    pas.start()
    wait_for(lambda: _delays_since(pas, restarted), 30, what="a try after the restart")
    assert _outage_start(pas) == began  # the same outage, not a new one
    # The wait after the restart follows the outage (a quarter of its 5 s and more), where
    # it started again from backoff_initial_s (0.2 s and its jitter: at most 0.4 s).
    first = _delays_since(pas, restarted)[0]
    assert first >= (restarted - began) / 4 - 0.01, (first, restarted - began)
    job = wait_for(lambda: (lambda j: j if j["state"] == "pending" else None)(_job(pas)), 30,
                   what="the job between two tries")
    assert job["attempts"] == 0 and job["next_attempt_at"] - job["updated_at"] >= 1.0, \
        dict(job)
    # The journal: the outage's warning once in all, and the restart says it continues.
    tries = [line for line in pas.log().splitlines() if "to pacs: destination unreachable" in line]
    assert [" WARNING " in line for line in tries].count(True) == 1, tries
    continues = [line for line in pas.log().splitlines() if "outage continues" in line]
    assert len(continues) == 1 and " INFO " in continues[0], continues
    shown = run_pas(["status"], {**pas.env, "COLUMNS": "200"}, timeout=60).stdout
    assert time.strftime("unreachable since %Y-%m-%d %H:%M:%S", time.localtime(began)) \
        in shown, shown

    scp.start()  # back from maintenance, on the same port
    try:
        wait_for(lambda: _job(pas)["state"] == "done", 90, what="the job delivered")
        assert _job(pas)["attempts"] == 1
        received = {sop_uid(p): hashlib.sha256(dataset_part(p)).hexdigest()
                    for p in scp.files()}
        sent = {r["sop_instance_uid"]: hashlib.sha256(
                    dataset_part(pas.home / "spool" / r["path"])).hexdigest()
                for r in index_rows(pas.home)}
        assert len(scp.files()) == 3 and set(sent) == {sop_uid(p) for p in CT_PATIENT}
        assert received == sent  # each instance once, bit for bit
        link = pas.status()["links"]["pacs"]
        assert link["state"] == "up" and link["unreachable_since"] is None, link
        assert re.search(r" WARNING .*destination pacs reachable again", pas.log())
    finally:
        scp.stop()


@pytest.fixture
def late_orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc whose namespace is up (its address answers: connection refused) but which
    is not started: the test starts it."""
    if os.geteuid() != 0:
        pytest.fail("Orthanc runs in a network namespace: the tests must run as root")
    ns = NetNamespace("orthanc").create()
    orthanc = Orthanc(tmp_path / "orthanc", ns=ns)
    try:
        yield orthanc
    finally:
        orthanc.stop()
        ns.delete()


def test_unreachable_stowrs_archive_waits_uncounted_then_gets_the_study(
        pas_factory, late_orthanc: Orthanc) -> None:
    pas: PasProcess = pas_factory({
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_DESTINATIONS__ARCHIVE__KIND": "stowrs",
        "PAS_DESTINATIONS__ARCHIVE__URL": late_orthanc.dicomweb,
        "PAS_DESTINATIONS__ARCHIVE__ALLOW_CLEARTEXT": "true",  # http:// in its namespace
        "PAS_ROUTING__FALLBACK__DESTINATIONS": '["archive"]',
        "PAS_QUEUE__MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "PAS_QUEUE__BACKOFF_INITIAL_S": "0.2",
        "PAS_QUEUE__BACKOFF_MAX_S": "0.5",
    })
    storescu(CT_PATIENT, pas.port)
    job = _waited_uncounted(pas, "archive")
    assert "ConnectError" in job["last_error"], job["last_error"]

    late_orthanc.start()
    wait_for(lambda: _job(pas)["state"] == "done", 60, what="the job delivered")
    assert _job(pas)["attempts"] == 1
    stored = {r["sop_instance_uid"]: r["sha256"] for r in read_rows(
        pas.home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances")}
    assert len(stored) == 3
    assert orthanc_hashes(late_orthanc) == stored  # each instance once, bit for bit


def _dispatcher(tmp_path: Path, port: int) -> tuple[Dispatcher, Database, list[int]]:
    """A dispatcher in this process, a dicom destination at ``port``, two jobs to it (their
    files need not exist: nothing is read before the connection opens)."""
    settings = load_settings(environ={
        "PAS_HOME": str(tmp_path),
        "PAS_DESTINATIONS__PACS__KIND": "dicom", "PAS_DESTINATIONS__PACS__AE_TITLE": "PACS",
        "PAS_DESTINATIONS__PACS__HOST": "127.0.0.1",
        "PAS_DESTINATIONS__PACS__PORT": str(port),
        "PAS_QUEUE__MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "PAS_QUEUE__BACKOFF_INITIAL_S": "0.1", "PAS_QUEUE__BACKOFF_MAX_S": "60"})
    db = Database(tmp_path / "pas.sqlite")
    jobs = []
    for n in (1, 2):
        record = InstanceRecord(f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", f"1.2.3.{n}0", f"1.2.3.{n}00",
                                patient_id="P")
        instance = index.record_instance(db, record, StoredFile(f"f{n}", 1, f"{n}" * 64))
        study = db.query("SELECT id FROM studies WHERE study_uid = ?", (record.study_uid,))
        job_store.route_study(db, int(study[0]["id"]), [instance.instance_id], [
            job_store.NewJob("dicom", "pacs", 2, "r", [instance.instance_id])])
        jobs.append(int(db.query("SELECT max(id) AS id FROM jobs")[0]["id"]))
    spool = Spool(tmp_path / "spool", fsync=False)
    return Dispatcher(settings, db, spool, lambda name: make_target(name, settings)), db, jobs


def _row(db: Database, job_id: int) -> Any:
    return db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))[0]


def test_link_delay_grows_with_the_outage_and_its_end_wakes_the_waiting_jobs(
        tmp_path: Path) -> None:
    """With no heartbeat for a local node, the delay stayed at ``backoff_initial_s``: a
    weekend of tries every few seconds per job. It now grows with how long the node has been
    unreachable (a quarter of it, between the backoff bounds); the first job through ends
    the outage and makes the jobs waiting for it due at once."""
    dispatcher, db, (first, second) = _dispatcher(tmp_path, free_port())
    delays: list[float] = []
    started = time.time()
    while time.time() - started < 2.5:
        wait_for(lambda: dispatcher.run_one("w", max_priority=None), 10, interval=0.02,
                 what="a job due")
        job = db.query("SELECT * FROM jobs WHERE updated_at = (SELECT max(updated_at) "
                       "FROM jobs)")[0]
        assert job["state"] == "pending" and job["attempts"] == 0, dict(job)
        assert job["last_error"].startswith(f"{WAITING_FOR_LINK}pacs unreachable")
        delays.append(job["next_attempt_at"] - job["updated_at"])
    assert len(delays) > MAX_ATTEMPTS * 2  # two jobs, never failed
    assert delays[0] <= 0.2 + 1e-6  # backoff_initial_s + its jitter, at the outage's start
    assert delays[-1] >= 0.5, delays  # a quarter of the 2 s and more it has lasted

    # The first job's instance was delivered (by an attempt before the outage, say): its next
    # try ends it, which ends the outage; the second, waiting a minute more, is due at once.
    job_store.mark_sent(db, first, [r["id"] for r in job_store.job_files(db, first)])
    with db.transaction() as conn:
        conn.execute("UPDATE jobs SET next_attempt_at = CASE id WHEN ? THEN 0 ELSE ? END",
                     (first, time.time() + 60))
    assert dispatcher.run_one("w")
    assert _row(db, first)["state"] == "done"
    assert _row(db, second)["next_attempt_at"] <= time.time()
    assert dispatcher.wake.is_set()
    assert uplink_store.link_states(db)["pacs"]["unreachable_since"] is None
