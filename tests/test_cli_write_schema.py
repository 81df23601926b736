"""A command that writes never migrates the database: only the daemon does, at its start.

A review found: the read-only commands refused a database older than the CLI ("... migrates
it at its start"), but the writing ones (``pas hub token``, ``pas queue retry``, ``pas cache
pin``...) migrated it. Run between the switch of versions and the restart (docs/operations.md,
"Upgrading the hub"), the newer ``pas hub token`` migrated the live hub.sqlite under the older
hub still serving on it: that hub then ran on a schema it does not know, and refused the
database once restarted, with no copy taken before. A newer schema was a traceback.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import typer

from appliance.cli.common import write_database
from appliance.store.db import Database
from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.store.schema import MIGRATIONS
from tests.support.old_schema import user_version
from tests.support.peers import run_pas


def test_the_hubs_older_database_is_refused_not_migrated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hub.sqlite"
    Database(path, HUB_MIGRATIONS[:-1]).close()  # the older hub's, still serving
    with pytest.raises(typer.Exit) as refused:
        write_database(path, HUB_MIGRATIONS)
    assert refused.value.exit_code == 1
    said = " ".join(capsys.readouterr().err.split())
    assert (f"{path}: database schema {len(HUB_MIGRATIONS) - 1} is older than this "
            f"software's ({len(HUB_MIGRATIONS)}); it was left as it is: the hub (pas hub run, "
            "systemctl restart pas-hub) migrates it at its start") in said, said
    assert user_version(path) == len(HUB_MIGRATIONS) - 1
    # A new home's database is still made whole (pas hub init), and a current one opens.
    new = tmp_path / "new" / "hub.sqlite"
    write_database(new, HUB_MIGRATIONS, create=True).close()
    assert user_version(new) == len(HUB_MIGRATIONS)
    write_database(new, HUB_MIGRATIONS).close()


def test_an_appliance_write_command_refuses_an_older_or_newer_index(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = home / "pas.sqlite"
    Database(db, MIGRATIONS[:-1]).close()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PAS_")},
           "PAS_HOME": str(home)}
    result = run_pas(["queue", "retry", "1"], env, timeout=60)
    said = " ".join(result.stderr.split())
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("it was left as it is: the daemon (pas run, systemctl restart pas) migrates it "
            "at its start") in said, said
    assert user_version(db) == len(MIGRATIONS) - 1
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    result = run_pas(["queue", "retry", "1"], env, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert (f"database schema {len(MIGRATIONS) + 1} is newer than this software knows "
            f"({len(MIGRATIONS)})") in " ".join(result.stderr.split())
