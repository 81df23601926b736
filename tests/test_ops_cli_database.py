"""What ``pas`` commands do to a home's database: the read-only ones create, migrate and
change nothing (not even SQLite's side files, nor another user's), see a daemon that starts
meanwhile, and the write ones say "busy" within seconds of a locked database and create
nothing where there is no database. Real daemons, real homes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.peers import (
    CT_DIR,
    MR_DIR,
    PasProcess,
    storescu,
)
from tests.test_ops_cli import _pas

READ_ONLY_COMMANDS = [("status",), ("status", "--json"), ("studies",), ("queue", "list"),
                      ("prefetch", "list"), ("cache", "status"), ("audit",)]


def _tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder``: size, mtime in ns and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_read_only_commands_create_nothing_where_there_is_no_database(tmp_path: Path) -> None:
    """``pas status`` on a home that does not exist (a typo, or an admin's shell without
    PAS_HOME) created the home and an empty database, ran the migrations, and showed zeros
    as if the appliance held nothing."""
    home = tmp_path / "nowhere"
    for args in READ_ONLY_COMMANDS:
        result = _pas(home, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stdout == "", args
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"no database at {home / 'pas.sqlite'} ("), (args, line)
        assert "PAS_HOME" in line and "/etc/pas/appliance.toml" in line, line
    hub_home = tmp_path / "no-hub"
    for args in (("hub", "sites"), ("hub", "transfers")):
        result = _pas(home, *args, env={"PAS_HUB_HOME": str(hub_home)})
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"no database at {hub_home / 'hub.sqlite'} (") and (
            "PAS_HUB_HOME" in line), line
    assert not home.exists() and not hub_home.exists()


def _sidecars_left(home: Path, before: dict[str, tuple[int, int, bytes]]) -> None:
    """Every file of ``before`` as it was; the only new ones SQLite's empty -wal and its -shm
    (a reader taking part in WAL locking), with the database file's owner and mode."""
    after = _tree(home)
    assert {k: v for k, v in after.items() if k in before} == before
    new = set(after) - set(before)
    assert new <= {"pas.sqlite-wal", "pas.sqlite-shm"}, new
    assert "pas.sqlite-wal" not in new or after["pas.sqlite-wal"][0] == 0
    database = (home / "pas.sqlite").stat()
    for name in new:
        info = (home / name).stat()
        assert (info.st_uid, info.st_gid, info.st_mode) == (
            database.st_uid, database.st_gid, database.st_mode), name


def test_read_only_commands_change_nothing_and_never_migrate(tmp_path: Path) -> None:
    """On an existing database the read-only commands leave every byte and every mtime of
    the home's files as they were; what SQLite adds to read under its WAL locks (an empty
    -wal, the -shm) belongs to the database's owner. A database older than the software is
    said so, not migrated."""
    from appliance.store.db import Database
    from appliance.store.schema import MIGRATIONS

    home = tmp_path / "home"
    Database(home / "pas.sqlite").close()
    before = _tree(home)
    for args in READ_ONLY_COMMANDS:
        result = _pas(home, *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert json.loads(_pas(home, "status", "--json").stdout)["instances"] == 0
    _sidecars_left(home, before)

    old = tmp_path / "old"
    Database(old / "pas.sqlite", MIGRATIONS[:-1]).close()
    before = _tree(old)
    for args in READ_ONLY_COMMANDS:
        result = _pas(old, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"{old / 'pas.sqlite'}: database schema {len(MIGRATIONS) - 1} is older than "
            f"this software's ({len(MIGRATIONS)}); it was left as it is: the daemon (pas run, "
            "systemctl restart pas) migrates it at its start"], args
    _sidecars_left(old, before)

    # The hub's database names the hub's service: it said the appliance's.
    from appliance.store.hub_schema import HUB_MIGRATIONS

    old_hub = tmp_path / "old-hub"
    Database(old_hub / "hub.sqlite", HUB_MIGRATIONS[:-1]).close()
    for args in (("hub", "sites"), ("hub", "transfers")):
        result = _pas(old, *args, env={"PAS_HUB_HOME": str(old_hub)})
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"{old_hub / 'hub.sqlite'}: database schema {len(HUB_MIGRATIONS) - 1} is older "
            f"than this software's ({len(HUB_MIGRATIONS)}); it was left as it is: the hub "
            "(pas hub run, systemctl restart pas-hub) migrates it at its start"], args


def test_a_read_only_reader_sees_a_daemon_that_starts_and_ingests_meanwhile(
        tmp_path: Path) -> None:
    """The read-only connection of ``pas status`` / ``studies`` / ``queue list``, opened while
    no daemon ran (no -wal, no -shm), read the file with ``immutable=1``: no lock, pages cached
    for ever. A daemon that started meanwhile, took a study from storescu and checkpointed
    changed the file under it: the reader kept saying 60 instances (the CT), then "database
    disk image is malformed". Now it takes part in WAL locking and sees what was committed."""
    from appliance.store import index, jobs
    from appliance.store.db import Database

    home = tmp_path / "home"
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}
    pas = PasProcess(home, env).start()
    try:
        # A few images each time: the stale reader (immutable=1 forced) fails on as few as
        # those; the whole CT and MR sets cost 3 s more and proved nothing more.
        storescu(sorted(CT_DIR.glob("*.dcm"))[:6], pas.port)
        first = pas.status()["instances"]
    finally:
        pas.stop()
    assert not (home / "pas.sqlite-wal").exists()  # a clean stop checkpointed and removed it
    reader = Database(home / "pas.sqlite", readonly=True)  # as the CLI's read_database
    try:
        assert index.totals(reader)["instances"] == first
        studies = len(index.list_studies(reader, None))
        pas = PasProcess(home, env).start()
        try:
            storescu(sorted(MR_DIR.glob("*.dcm"))[:6], pas.port)
            now = pas.status()["instances"]
        finally:
            pas.stop()  # the last connection checkpoints the WAL into the file
        assert now > first
        assert index.totals(reader)["instances"] == now
        assert len(index.list_studies(reader, None)) > studies
        jobs.list_jobs(reader, None)
        assert reader.query("PRAGMA integrity_check")[0][0] == "ok"
    finally:
        reader.close()


def test_root_reading_a_home_owned_by_another_user_leaves_that_users_files(
        tmp_path: Path) -> None:
    """Root's ``pas status`` on a home that belongs to the daemon's user (the appliance's
    /var/lib/pas, owned by ``pas``): whatever SQLite adds for the read is that user's, with
    the database's mode, so the daemon can open it next."""
    from appliance.store.db import Database

    if os.geteuid() != 0:
        pytest.skip("needs root (the administrator's sudo pas status)")
    home = tmp_path / "home"
    Database(home / "pas.sqlite").close()
    for path in (home, *home.iterdir()):
        os.chown(path, 65534, 65534)
    before = _tree(home)
    for args in READ_ONLY_COMMANDS:
        result = _pas(home, *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    _sidecars_left(home, before)
    assert {(p.stat().st_uid, p.stat().st_gid) for p in home.iterdir()} == {(65534, 65534)}


def test_an_interactive_write_on_a_locked_database_says_busy_within_seconds(
        tmp_path: Path) -> None:
    """``pas queue retry`` (and every interactive write) waited SQLite's 30 s busy timeout on
    a write lock held by another process, then said "database error: database is locked".
    Now an interactive command waits 5 s and says what is going on; the daemon keeps 30 s
    (its writes must ride over a long transaction: tests/faults/test_link_and_lock.py)."""
    import sqlite3
    import time

    from appliance.store import db as store_db

    home = tmp_path / "home"
    store_db.Database(home / "pas.sqlite").close()
    holder = sqlite3.connect(home / "pas.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        # The three at once (each waits its own 5 s; one after the other took 18 s).
        commands = (("queue", "retry", "1"), ("cache", "pin", "1.2.3"),
                    ("prefetch", "patient", "P1"))
        with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
            def timed(args: tuple[str, ...]) -> tuple[subprocess.CompletedProcess[str], float]:
                started = time.monotonic()
                return _pas(home, *args, timeout=60), time.monotonic() - started
            outcomes = list(pool.map(timed, commands))
        for args, (result, waited) in zip(commands, outcomes, strict=True):
            assert result.returncode == 1, (args, result.stdout, result.stderr)
            assert result.stderr.strip().splitlines() == [
                "database busy: another pas process holds a write lock; try again"], args
            assert 4 < waited < 15, (args, waited)
        # Reads do not wait for the write lock at all.
        assert _pas(home, "queue", "list", timeout=60).returncode == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store_db.BUSY_TIMEOUT_MS == 30_000  # the daemon's connections (Database default)
    assert _pas(home, "queue", "retry", "1").returncode == 1  # no such job, not busy


def test_write_commands_on_a_home_without_database_create_nothing(tmp_path: Path) -> None:
    """``pas queue retry 1`` or ``pas cache pin`` on a mistyped home created an empty
    database there, then said the job or the study did not exist: the admin looked for a
    missing job, not for the wrong home. Only ``pas hub init`` (and ``pas run``) create."""
    home = tmp_path / "nowhere"
    for args in (("queue", "retry", "1"), ("cache", "pin", "1.2.3"), ("cache", "unpin", "1.2.3"),
                 ("cache", "evict"), ("prefetch", "patient", "P1")):
        result = _pas(home, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"no database at {home / 'pas.sqlite'} ("), (args, line)
    hub_home = tmp_path / "hub"
    revoke = _pas(home, "hub", "revoke", "SITE-A", env={"PAS_HUB_HOME": str(hub_home)})
    assert revoke.returncode == 1 and "pas hub init creates it" in revoke.stderr, revoke.stderr
    assert not home.exists() and not hub_home.exists()
    init = _pas(home, "hub", "init", env={"PAS_HUB_HOME": str(hub_home)})
    assert init.returncode == 0, init.stderr
    assert (hub_home / "hub.sqlite").exists()
    token = _pas(home, "hub", "token", "SITE-A", env={"PAS_HUB_HOME": str(hub_home)})
    assert token.returncode == 0 and token.stdout.strip(), token.stderr
