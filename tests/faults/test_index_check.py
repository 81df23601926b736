"""The index's integrity checked while the daemon runs (appliance/ops/index_check.py).

Found by trying it (2026-12-05): a page of ``pas.sqlite`` torn under a running daemon was seen
only as the errors of the code that met it: C-STOREs touching it failed ("index commit
failed: database disk image is malformed") while ``/metrics`` said nothing (the daemon's
connections read the page from their cache: ``pas_scrape_store_error 0``), a heartbeat whose
reads met it was not sent at all (the hub saw the site as silent, not as damaged), and only
the next restart refused to start. Now the daemon's own
``quick_check`` finds it: ``pas_index_damaged 1``, the heartbeat's first error names the
damage and the fix, ``pas status`` and ``pas doctor`` say it, the log has it at ERROR.
Real daemon, real hub over mutual TLS, DCMTK storescu as the modality.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from appliance.store import fleet as fleet_store
from appliance.store.db import Database
from appliance.store.hub_schema import HUB_MIGRATIONS
from tests.faults.test_damaged_index import _tear_the_root_page_of
from tests.support.cleanup import started
from tests.support.hub import HubProcess, enroll
from tests.support.peers import CT_DIR, PasProcess, run_pas, storescu, wait_for
from tests.test_ops_fleet import metric

FIX = "systemctl stop pas; sudo -u pas pas cache rebuild-index; systemctl start pas"


def _one_study(count: int) -> list[Path]:
    files = sorted(CT_DIR.glob("*.dcm"))
    study = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    return [f for f in files if dcmread(f, stop_before_pixels=True).StudyInstanceUID
            == study][:count]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An enrolled appliance (heartbeat and index check every second) whose study the hub
    has confirmed: nothing writes to its instances any more."""
    with contextlib.ExitStack() as stack:  # a step that raises stops those started
        hub = started(stack, HubProcess(tmp_path / "hub").init())
        home = tmp_path / "pas"
        enroll(hub, home, "SITE-A")
        pas = started(stack, PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                               "PAS_PREFETCH__ENABLED": "false",
                                               "PAS_OPS__HEARTBEAT_INTERVAL_S": "1",
                                               "PAS_CACHE__INDEX_CHECK_INTERVAL_S": "1"}))
        files = _one_study(3)
        storescu(files, pas.port)
        wait_for(lambda: pas.status()["confirmed_instances"] == len(files), 30,
                 what="the study confirmed by the hub")
        yield {"hub": hub, "pas": pas}


def _scrape(pas: PasProcess) -> str:
    return httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text


def test_damage_under_a_running_daemon_is_found_and_told(site: dict[str, Any]) -> None:
    pas: PasProcess = site["pas"]
    db = pas.home / "pas.sqlite"
    hub_db = Database(site["hub"].home / "hub.sqlite", HUB_MIGRATIONS)

    # Sound: said so, and the check's time advances (it runs every second).
    first = metric(_scrape(pas), "pas_index_check_timestamp_seconds")
    assert first is not None and metric(_scrape(pas), "pas_index_damaged") == 0
    wait_for(lambda: metric(_scrape(pas), "pas_index_check_timestamp_seconds") > first, 10,
             what="a second check")
    checked = pas.status()["index_check"]
    assert checked["finding"] is None and checked["path"] == str(db)
    hub: HubProcess = site["hub"]
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30) as viewer:
        assert metric(viewer.get("/metrics").text, "pas_fleet_site_index_damaged",
                      site="SITE-A") == 0
    assert checked["checked_at"] > first and checked["duration_s"] >= 0
    assert "index database" not in " ".join(fleet_store.site_status(hub_db, "SITE-A")["errors"])

    _tear_the_root_page_of(db, "instances")

    # The metric. The daemon's own connections may go on reading the page from their
    # cache (the scrape of the store still answers here): only the check reads the file.
    wait_for(lambda: metric(_scrape(pas), "pas_index_damaged") == 1, 10,
             what="pas_index_damaged 1")
    # The heartbeat's first error: the damage and its fix.
    said = f"the index database {db} is damaged ("
    errors = wait_for(lambda: [e for e in fleet_store.site_status(hub_db, "SITE-A")["errors"]
                               if e.startswith(said)], 10, what="the damage in a heartbeat")
    assert FIX in errors[0]
    assert fleet_store.site_status(hub_db, "SITE-A")["errors"][0] == errors[0]
    hub_db.close()
    # The fleet's metrics say it too, for its alert: the site still sends heartbeats (it is
    # not silent) and their other figures may be the last ones read, so no other fleet alert
    # would fire (before, PasSiteSilent fired for a site whose heartbeat the damage stopped).
    hub: HubProcess = site["hub"]
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30) as viewer:
        scrape = viewer.get("/metrics").text
    assert metric(scrape, "pas_fleet_site_index_damaged", site="SITE-A") == 1
    assert metric(scrape, "pas_fleet_site_up", site="SITE-A") == 1
    # pas status says it first (stderr), before the store's own error.
    status = pas.cli("status", check=False)
    words = " ".join(status.stderr.split())
    assert f"index damaged: {said}" in words and FIX in words, status.stderr
    # pas doctor: the damage, when the daemon found it, and the fix.
    doctor = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json", check=False).stdout)}
    assert doctor["database"]["verdict"] == "fail"
    assert doctor["database"]["detail"].startswith(f"{db} is damaged: ")
    assert "the daemon's integrity check found it" in doctor["database"]["detail"]
    assert "pas cache rebuild-index" in doctor["database"]["fix"]
    # The log, at ERROR; the daemon keeps running (the operator decides when to stop it).
    wait_for(lambda: f"ERROR pas.ops.index_check: {said}" in " ".join(pas.log().split()), 5,
             what="the ERROR line")
    assert pas._alive()


def test_a_heartbeat_goes_when_the_store_cannot_be_read(tmp_path: Path) -> None:
    """A damaged page the heartbeat's reads meet (a fresh connection, no page cached): the
    heartbeat raised with the store and was never posted, so the fleet saw the site only
    as silent. It is built all the same, in the hub's format, saying why its figures are
    the last ones read (or unknown, zeros, when none was)."""
    from appliance.config import load_settings
    from appliance.hub.fleet import validate_heartbeat
    from appliance.ingest.receive import Receiver
    from appliance.ops.heartbeat import build_heartbeat
    from appliance.store.spool import Spool

    settings = load_settings(environ={"PAS_HOME": str(tmp_path)})
    db = Database(settings.db_path)
    Receiver(db, Spool(settings.spool_dir, fsync=False)).receive_file(
        _one_study(1)[0].read_bytes(), source="CT1")
    sound = build_heartbeat(settings, db, 0.0)
    db.close()
    assert sound["received"]["instances"] == 1 and sound["errors"] == []
    _tear_the_root_page_of(settings.db_path, "instance_totals")  # read by every status
    reader = Database(settings.db_path)
    try:
        blind = validate_heartbeat(build_heartbeat(settings, reader, 0.0))
        assert blind["received"]["instances"] == 0 and blind["backlog"]["studies"] == 0
        assert blind["errors"] == ["index database unreadable (database disk image is "
                                   "malformed): figures unknown"]
        last = {key: sound[key] for key in ("backlog", "jobs", "disk", "received",
                                            "confirmed_instances")}
        beat = validate_heartbeat(build_heartbeat(settings, reader, 0.0, last_known=last))
        assert beat["received"]["instances"] == 1
        assert beat["errors"] == ["index database unreadable (database disk image is "
                                  "malformed): figures from the last heartbeat that could "
                                  "read it"]
    finally:
        reader.close()


def test_a_cstore_meeting_the_damage_has_the_index_checked_at_once(tmp_path: Path) -> None:
    """The daily check (the default) is not waited for: a C-STORE whose commit meets
    SQLITE_CORRUPT (refused, as before) has the index checked within seconds."""
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false"})
    pas.start()
    try:
        files = _one_study(3)
        storescu(files[:2], pas.port)
        started = metric(_scrape(pas), "pas_index_check_timestamp_seconds")
        _tear_the_root_page_of(pas.home / "pas.sqlite", "studies")
        refused = storescu(files[2:], pas.port, check=False)  # a 0xC000-class status
        assert refused.returncode != 0
        assert "index commit failed: database disk image is malformed" in pas.log()
        wait_for(lambda: metric(_scrape(pas), "pas_index_damaged") == 1, 8,
                 what="pas_index_damaged 1 without waiting a day")
        assert metric(_scrape(pas), "pas_index_check_timestamp_seconds") > started
    finally:
        pas.stop()


def _drop_an_entry_from_index(db: Path, index: str, table: str) -> None:
    """What a lost write leaves behind: ``table``'s rows changed while ``index`` did not
    follow (detached from the schema while the rows changed, then put back as it was).
    ``quick_check`` says "ok" (it does not compare an index with its table); a DELETE or
    UPDATE of such a row fails with "database disk image is malformed"
    (SQLITE_CORRUPT_INDEX, extended code 779)."""
    with sqlite3.connect(db) as conn:
        name, tbl, root, sql = conn.execute(
            "SELECT name, tbl_name, rootpage, sql FROM sqlite_master WHERE name = ?",
            (index,)).fetchone()
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("DELETE FROM sqlite_master WHERE name = ?", (index,))
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE {table} SET last_received_at = last_received_at + 1")  # noqa: S608
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("INSERT INTO sqlite_master VALUES ('index', ?, ?, ?, ?)",
                     (name, tbl, root, sql))
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        assert "missing from index" in conn.execute("PRAGMA integrity_check(1)").fetchone()[0]


def test_an_index_out_of_step_with_its_table_is_found_when_a_cstore_meets_it(
        tmp_path: Path) -> None:
    """An index missing an entry of its table: quick_check (start-up, the daily check) sees
    nothing, and a C-STORE's commit fails with "database disk image is malformed" under the
    extended code SQLITE_CORRUPT_INDEX (779). Before, that code was not taken for
    corruption (only 11 and 26 were), and the check it would have asked for was
    quick_check again: the daemon's check kept saying the index was sound while every
    C-STORE of the study failed. The check a loop's corruption error asks for is SQLite's
    integrity_check, which compares each index with its table."""
    from appliance.ingest.receive import Receiver
    from appliance.store.spool import Spool

    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false"})
    db = pas.home / "pas.sqlite"
    files = _one_study(3)
    index = Database(db)
    receiver = Receiver(index, Spool(pas.home / "spool", fsync=False))
    for path in files[:2]:  # the study's first two instances, received before
        receiver.receive_file(path.read_bytes(), source="CT1")
    index.close()
    _drop_an_entry_from_index(db, "studies_last_received", "studies")
    pas.start()  # quick_check at start-up: sound
    try:
        started = metric(_scrape(pas), "pas_index_check_timestamp_seconds")
        assert metric(_scrape(pas), "pas_index_damaged") == 0
        refused = storescu(files[2:], pas.port, check=False)  # a 0xC000-class status
        assert refused.returncode != 0
        assert "index commit failed: database disk image is malformed" in pas.log()
        wait_for(lambda: metric(_scrape(pas), "pas_index_damaged") == 1, 8,
                 what="pas_index_damaged 1 after a C-STORE met SQLITE_CORRUPT_INDEX")
        assert metric(_scrape(pas), "pas_index_check_timestamp_seconds") > started
        finding = pas.status()["index_check"]["finding"]
        assert "missing from index studies_last_received" in finding, finding
    finally:
        pas.stop()
    # What the operator is told to do works: the daemon's finding makes the commands run
    # integrity_check too (before: quick_check said sound, doctor passed, rebuild-index
    # refused without --force, and the next start recorded the index sound again).
    doctor = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json", check=False).stdout)}
    assert doctor["database"]["verdict"] == "fail", doctor["database"]
    assert "missing from index studies_last_received" in doctor["database"]["detail"]
    run = run_pas(["run"], pas.env, timeout=60)
    said = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 1 and f"the index database {db} is damaged (" in said, said
    rebuilt = pas.cli("cache", "rebuild-index", check=False)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert len(list(pas.home.glob("pas.sqlite.damaged-*Z"))) == 1


def test_a_heartbeat_that_cannot_read_the_store_still_says_the_disk_as_it_is(
        tmp_path: Path) -> None:
    """The figures of the last heartbeat that could read the store stand in for those the
    store holds; the disk is not in the store. Before, the disk went as it was then too:
    a disk filling while the index was unreadable was sent as the old figure (here 1 % used)
    for as long as the damage lasted, and the fleet's disk alert (over 85 %) never came."""
    import shutil

    from appliance.config import load_settings
    from appliance.hub.fleet import validate_heartbeat
    from appliance.ingest.receive import Receiver
    from appliance.ops.heartbeat import build_heartbeat
    from appliance.store.spool import Spool

    settings = load_settings(environ={"PAS_HOME": str(tmp_path)})
    db = Database(settings.db_path)
    Receiver(db, Spool(settings.spool_dir, fsync=False)).receive_file(
        _one_study(1)[0].read_bytes(), source="CT1")
    db.close()
    _tear_the_root_page_of(settings.db_path, "instance_totals")
    last = {"backlog": {"studies": 2, "bytes": 10, "oldest_age_s": 5.0,
                        "urgent_oldest_age_s": 0.0, "routine_oldest_age_s": 5.0},
            "jobs": {"pending": 2, "running": 0, "failed": 0},
            "disk": {"used_percent": 1.0, "free_bytes": 1},
            "received": {"instances": 1, "bytes": 10}, "confirmed_instances": 0}
    reader = Database(settings.db_path)
    try:
        beat = validate_heartbeat(build_heartbeat(settings, reader, 0.0, last_known=last))
    finally:
        reader.close()
    assert beat["backlog"] == last["backlog"] and beat["received"] == last["received"]
    disk = shutil.disk_usage(tmp_path)
    assert beat["disk"]["used_percent"] == pytest.approx(
        100 * (disk.total - disk.free) / disk.total, abs=0.2)
    assert beat["disk"]["free_bytes"] == pytest.approx(disk.free, rel=0.01)


@pytest.fixture
def checker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A home with one confirmed study, and the daemon's index checker running on it (its
    schedule an hour away: only a suspicion makes it check)."""
    import threading

    from appliance.ingest.receive import Receiver
    from appliance.ops import index_check
    from appliance.store.spool import Spool

    monkeypatch.setattr(index_check, "_latest", None)  # this process's, not another test's
    index_check._suspected.clear()
    home = tmp_path / "home"
    db = Database(home / "pas.sqlite")
    spool = Spool(home / "spool", fsync=False)
    receiver = Receiver(db, spool)
    for path in _one_study(3):
        receiver.receive_file(path.read_bytes(), source="CT1")
    with db.transaction() as conn:  # confirmed at the region, received long ago: evictable
        conn.execute("UPDATE instances SET confirmed_at = 1, routed_at = coalesce(routed_at, 1)")
        conn.execute("UPDATE studies SET last_received_at = 1000, last_accessed_at = 1000")
    db.close()
    stop = threading.Event()
    checking = threading.Thread(target=index_check.IndexChecker(
        home / "pas.sqlite", home, 3600).run, args=(stop,), daemon=True)
    checking.start()
    try:
        yield {"home": home, "stop": stop, "spool": spool}
    finally:
        stop.set()
        checking.join(10)
        index_check._suspected.clear()


def _loop_meets_damage(run: Any, home: Path, stop: Any) -> str:
    """Run a loop in its own thread until the checker found the damage; its finding."""
    import threading

    from appliance.ops import index_check

    looping = threading.Thread(target=run, args=(stop,), daemon=True)
    looping.start()
    found = wait_for(lambda: (index_check.latest() or None) and index_check.latest().finding,
                     8, what="the index checked after the loop met the damage")
    assert index_check.load(home) is not None and index_check.load(home).damaged
    stop.set()
    looping.join(10)
    return str(found)


def test_an_eviction_pass_meeting_corruption_has_the_index_checked(
        checker: dict[str, Any]) -> None:
    """Eviction deletes rows, where an index missing one fails "database disk image is
    malformed" (SQLITE_CORRUPT_INDEX). The eviction loop logged it and tried again at its
    next pass, for ever, without asking for the check (only routing, C-STORE, the
    heartbeat and a scrape did): the daily check, a quick_check, would not have seen it."""
    from appliance.config import load_settings
    from appliance.ops.cache_policy import CachePolicy

    home: Path = checker["home"]
    _drop_an_entry_from_index(home / "pas.sqlite", "studies_last_received", "studies")
    settings = load_settings(environ={"PAS_HOME": str(home), "PAS_STORAGE__QUOTA_MB": "1",
                                      "PAS_CACHE__HIGH_WATERMARK_PERCENT": "50",
                                      "PAS_CACHE__LOW_WATERMARK_PERCENT": "1",
                                      "PAS_CACHE__EVICT_INTERVAL_S": "0.2"})
    db = Database(home / "pas.sqlite")
    try:
        policy = CachePolicy(settings, db, checker["spool"])
        found = _loop_meets_damage(policy.run, home, checker["stop"])
    finally:
        db.close()
    assert "missing from index studies_last_received" in found


def test_a_scrub_step_meeting_corruption_has_the_index_checked(
        checker: dict[str, Any]) -> None:
    """The scrub loop fails at most once per scrub_pause_s (an hour): before, a torn page
    it met waited for the daily check."""
    from appliance.ops.recovery import Scrubber

    home: Path = checker["home"]
    _tear_the_root_page_of(home / "pas.sqlite", "instances")
    db = Database(home / "pas.sqlite")
    try:
        scrubber = Scrubber(db, checker["spool"], 1e9)
        found = _loop_meets_damage(lambda stop: scrubber.run(stop, 3600), home,
                                   checker["stop"])
    finally:
        db.close()
    assert found


def test_the_daily_check_does_not_call_sound_what_integrity_check_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Damage only integrity_check sees (an index missing a row), found after a loop met
    it: the next scheduled check, a quick_check, would record the index sound again and
    clear pas_index_damaged until a loop met the damage once more."""
    import threading

    from appliance.ingest.receive import Receiver
    from appliance.ops import index_check
    from appliance.store.spool import Spool

    monkeypatch.setattr(index_check, "_latest", None)
    home = tmp_path / "home"
    db = Database(home / "pas.sqlite")
    Receiver(db, Spool(home / "spool", fsync=False)).receive_file(
        _one_study(1)[0].read_bytes(), source="CT1")
    db.close()
    _drop_an_entry_from_index(home / "pas.sqlite", "studies_last_received", "studies")
    found = index_check.check(home / "pas.sqlite", thorough=True)  # as a suspicion's check
    assert found.damaged
    index_check.record(home, found)
    stop = threading.Event()
    checking = threading.Thread(target=index_check.IndexChecker(
        home / "pas.sqlite", home, 0.5).run, args=(stop,), daemon=True)
    checking.start()
    try:
        again = wait_for(lambda: index_check.latest().checked_at > found.checked_at
                         and index_check.latest(), 5, what="the scheduled check")
    finally:
        stop.set()
        checking.join(10)
    assert again.finding == found.finding
    assert index_check.load(home).damaged
