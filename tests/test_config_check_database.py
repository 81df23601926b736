"""``pas config check`` reads the home's database schema, read only, never migrating.

``pas-upgrade install`` runs the new version's check before it stops PAS and switches: the
check never looked at the database, so an older build, installed on a database a newer one
had migrated, passed it, was switched in, and its ``pas run`` refused the database ("newer
than this software knows"): PAS down, restarted by systemd every 5 s. ``pas hub config
check`` had this check for the hub's database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

from appliance.store.db import Database
from appliance.store.schema import MIGRATIONS
from tests.support.old_schema import user_version
from tests.support.peers import run_pas

KNOWN = len(MIGRATIONS)


def _check(home: Path, *options: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    return run_pas(["config", "check", *options], {**clean, "PAS_HOME": str(home)},
                   timeout=60)


def _said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def test_a_database_newer_than_this_version_is_refused_naming_both(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = home / "pas.sqlite"
    Database(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {KNOWN + 1}")  # what the next version migrated
    conn.close()
    result = _check(home)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (f"config error home: the index database {db} has schema {KNOWN + 1}, newer than "
            f"this version knows ({KNOWN}): a newer PAS wrote it, and this version's pas run "
            "refuses it; run that version or a later one") in _said(result)
    assert "configuration OK" not in result.stdout
    answer = _check(home, "--json")
    assert answer.returncode == 2
    assert [f"schema {KNOWN + 1}, newer" in p for p in json.loads(answer.stdout)["problems"]] \
        == [True]
    # The copy a rollback puts back is what --database checks.
    older = tmp_path / "saved.sqlite"
    Database(older, MIGRATIONS[:KNOWN - 1]).close()
    assert _check(home, "--database", str(older)).returncode == 0
    assert user_version(db) == KNOWN + 1


def test_an_older_database_is_fine_and_left_as_it_is(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = home / "pas.sqlite"
    Database(db, MIGRATIONS[:KNOWN - 2]).close()
    result = _check(home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"database schema {KNOWN - 2} of {KNOWN} (older: pas run migrates it at its "
            "start)") in _said(result)
    assert user_version(db) == KNOWN - 2  # never migrated
    assert sorted(p.name for p in home.iterdir()) == ["pas.sqlite"]  # nothing created
    answer = json.loads(_check(home, "--json").stdout)
    assert answer["ok"] is True and answer["database"].startswith(f"database schema {KNOWN-2}")


def test_another_builds_tables_are_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = Database(home / "pas.sqlite")
    with db.transaction() as conn:
        conn.execute("ALTER TABLE audit ADD COLUMN extra TEXT")
    db.close()
    result = _check(home)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "schema differs from this version's (table audit has columns" in _said(result)
