"""pas-upgrade: what an install is named by, and a rollback that loses nothing for good.

A hospital IT admin's walkthrough found: every build is pas_appliance-0.1.0 (the package's
version never changes), so ``pas-upgrade install`` said "0.1.0 is already running" and
upgraded nothing; ``rollback`` copied the pre-upgrade database over the live one (the audit
rows and jobs written since the upgrade gone for ever), stopped PAS before checking it had
what it needed (a missing backup left PAS stopped), never restored the configuration the
older version took, and could be run twice.

The script runs as shipped in a temporary root, with the stand-ins of test_upgrade_env.py
(systemctl, runuser, python3 -m venv and each version's pas); the database is a real one of
today's schema.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.store import audit as audit_store
from appliance.store import index
from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from tests.image.test_upgrade_env import identity, make_upgrade_root

WHEEL = "pas_appliance-0.1.0-py3-none-any.whl"


def _run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
           "PAS_SITE": "FROM-THE-SHELL"}
    return subprocess.run(["bash", str(root / "usr/local/sbin/pas-upgrade"), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def _install(root: Path) -> subprocess.CompletedProcess[str]:
    return _run(root, "install", str(root / "wheels"))


def _said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join(result.stdout.split())


def _stops(root: Path) -> list[str]:
    log = root / "systemctl.log"
    return log.read_text().splitlines() if log.exists() else []


def _count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def _file(db: Database, n: int) -> int:
    record = InstanceRecord(f"1.2.9.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            "1.2.9", "1.2.9.100", patient_id="P1", modality="CT")
    return index.record_instance(db, record, StoredFile(f"aa/{n}.dcm", 100, f"{n:064d}"),
                                 calling_ae="CT2").instance_id


@pytest.fixture
def upgraded(tmp_path: Path) -> Path:
    """1.0 running on a real database (one instance, its job, one audit row), then
    ``pas-upgrade install`` of a 2.0 wheel."""
    root = make_upgrade_root(tmp_path)
    live = root / "var/lib/pas/pas.sqlite"
    live.unlink()
    db = Database(live)
    first = _file(db, 0)
    job_store.route_study(db, 1, [first], [job_store.NewJob("dicom", "pacs", 2, "r", [first])])
    audit_store.record(db, "store", actor="CT2", target="1.2.9")
    db.close()
    live.chmod(0o640)
    result = _install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def _upgraded_to(root: Path) -> str:
    """What the install named the version it switched to (test_each_build_... says how)."""
    return os.readlink(root / "opt/pas/current")


def test_each_build_is_installed_under_its_wheels_hash(tmp_path: Path) -> None:
    root = make_upgrade_root(tmp_path, running="0.1.0", wheels=(WHEEL,))
    result = _install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    first = identity(root, WHEEL)
    assert first.startswith("0.1.0-") and len(first) == len("0.1.0-") + 12
    assert os.readlink(root / "opt/pas/current") == first
    assert (root / "opt/pas/previous").read_text() == "0.1.0\n"
    assert (root / "etc/pas-release").read_text() == f"PAS_VERSION={first}\nPAS_COMMIT=abc\n"
    assert _count(root / f"var/lib/pas/pas.sqlite.before-{first}", "t") == 0  # the copy
    assert (root / f"etc/pas/appliance.toml.before-{first}").read_text() == 'site = "CH-B"\n'
    assert _stops(root) == ["stop pas.service", "start pas.service"]
    # That very wheel is installed (its dependencies from the same folder, nothing from an
    # index), in an environment that sees Debian's python3-systemd as image/build.sh's does.
    assert (root / "pip.log").read_text().split() == [
        "install", "--quiet", "--no-index", "--find-links", str(root / "wheels"),
        str(root / "wheels" / WHEEL)]
    assert "--system-site-packages" in (root / "venv.log").read_text().split()
    assert f"0.1.0 -> {first} (database saved as " in _said(result)

    # The same wheel again: nothing to do, nothing stopped.
    again = _install(root)
    assert again.returncode == 0
    assert f"{first} is already running" in _said(again)
    assert len(_stops(root)) == 2

    # Another build of the same version is another install.
    (root / "wheels" / WHEEL).write_bytes(b"the next build")
    result = _install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    second = identity(root, WHEEL)
    assert second != first and os.readlink(root / "opt/pas/current") == second
    assert (root / "opt/pas/previous").read_text() == f"{first}\n"
    assert (root / f"var/lib/pas/pas.sqlite.before-{second}").exists()


def test_two_pas_wheels_are_refused_by_name(tmp_path: Path) -> None:
    root = make_upgrade_root(tmp_path, wheels=("pas_appliance-2.0-py3-none-any.whl",
                                               "pas_appliance-2.1-py3-none-any.whl"))
    result = _install(root)
    assert result.returncode == 2, result.stdout + result.stderr
    said = _said(result)
    assert "pas_appliance-2.0-py3-none-any.whl" in said
    assert "pas_appliance-2.1-py3-none-any.whl" in said
    assert "nothing was changed" in said
    assert not (root / "venv.log").exists() and _stops(root) == []
    assert os.readlink(root / "opt/pas/current") == "1.0"


def test_a_database_that_cannot_be_saved_leaves_the_running_version_started(
        tmp_path: Path) -> None:
    root = make_upgrade_root(tmp_path)
    (root / "var/lib/pas/pas.sqlite").write_bytes(b"not a database" * 100)
    result = _install(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing was switched, 1.0 started again" in _said(result)
    assert _stops(root) == ["stop pas.service", "start pas.service"]
    assert os.readlink(root / "opt/pas/current") == "1.0"
    assert not (root / "opt/pas/previous").exists()
    assert not (root / f"var/lib/pas/pas.sqlite.before-{identity(root)}").exists()


def test_a_rollback_keeps_the_upgraded_database_aside(upgraded: Path) -> None:
    root = upgraded
    new = _upgraded_to(root)
    live = root / "var/lib/pas/pas.sqlite"
    # Since the upgrade: two studies' instances and their job, the first job done, and
    # three audit rows, the last ones still in the WAL (a power loss: never checkpointed).
    db = Database(live)
    ids = [_file(db, n) for n in (1, 2)]
    job_store.route_study(db, 1, ids, [job_store.NewJob("dicom", "pacs", 2, "r", ids)])
    with db.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'done', finished_at = 1 WHERE id = 1")
    audit_store.record(db, "store", actor="CT2", target="1.2.9")
    db.close()
    subprocess.run([sys.executable, "-c", """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint = 0")
for n in range(2):
    conn.execute("INSERT INTO audit (at, event, actor, outcome) "
                 "VALUES (2e9, 'query', 'WS1', 'success')")
os._exit(0)
""", str(live)], check=True)
    assert (root / "var/lib/pas/pas.sqlite-wal").stat().st_size > 0
    before = _count(live, "audit")

    result = _run(root, "rollback")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _stops(root)[2:] == ["stop pas.service", "start pas.service"]
    assert os.readlink(root / "opt/pas/current") == "1.0"
    assert (root / "etc/pas-release").read_text() == "PAS_VERSION=1.0\nPAS_COMMIT=abc\n"
    # The pre-upgrade database runs, owned and readable as the live one was.
    assert (_count(live, "instances"), _count(live, "audit"), _count(live, "jobs")) == (1, 1, 1)
    assert not (root / "var/lib/pas/pas.sqlite-wal").exists()
    assert stat.S_IMODE(live.stat().st_mode) == 0o640
    # The upgraded one is kept whole, its WAL's rows included.
    kept = root / f"var/lib/pas/pas.sqlite.after-{new}"
    assert kept.exists()
    assert (_count(kept, "instances"), _count(kept, "audit"), _count(kept, "jobs")) == (
        3, before, 2)
    assert (root / f"var/lib/pas/pas.sqlite.before-{new}").exists()
    said = _said(result)
    assert f"rolled back {new} -> 1.0" in said
    assert f"the upgraded database is kept as {kept} (sqlite3 reads it)" in said
    assert (f"{before - 1} audit rows and 1 job written and 2 instances received since the "
            "upgrade are not in the running index; 1 job done since then is not done there "
            "(those sends run again)") in said


def test_a_rollback_goes_back_once(upgraded: Path) -> None:
    """/opt/pas/previous named 1.0 still after the rollback to 1.0: a second one stopped PAS,
    found no pas.sqlite.before-1.0 and left it stopped."""
    root = upgraded
    first = _run(root, "rollback")
    assert first.returncode == 0, first.stdout + first.stderr
    assert not (root / "opt/pas/previous").exists()
    live = (root / "var/lib/pas/pas.sqlite").read_bytes()
    again = _run(root, "rollback")
    assert again.returncode == 1, again.stdout + again.stderr
    assert "nothing to roll back to" in _said(again)
    assert "PAS was not stopped, nothing was changed" in _said(again)
    assert len(_stops(root)) == 4  # the install's and the first rollback's
    assert os.readlink(root / "opt/pas/current") == "1.0"
    assert (root / "var/lib/pas/pas.sqlite").read_bytes() == live


@pytest.mark.parametrize("missing", ["previous", "backup", "older version", "environment"])
def test_a_rollback_that_cannot_be_done_is_refused_with_pas_running(
        upgraded: Path, missing: str) -> None:
    root = upgraded
    new = _upgraded_to(root)
    if missing == "previous":
        (root / "opt/pas/previous").unlink()
        expected = "nothing to roll back to"
    elif missing == "backup":
        (root / f"var/lib/pas/pas.sqlite.before-{new}").unlink()
        expected = f"the database saved before the upgrade to {new}"
    elif missing == "older version":
        (root / "opt/pas/1.0/venv/bin/pas").unlink()
        expected = "1.0, to roll back to, is not installed"
    else:
        (root / "unit.files").write_text(f"{root / 'absent.env'} (ignore_errors=no)\n")
        expected = "cannot read the environment pas.service runs with"
    live = (root / "var/lib/pas/pas.sqlite").read_bytes()
    result = _run(root, "rollback")
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in _said(result)
    assert "PAS was not stopped, nothing was changed" in _said(result)
    assert len(_stops(root)) == 2  # the install's
    assert os.readlink(root / "opt/pas/current") == new
    assert (root / "var/lib/pas/pas.sqlite").read_bytes() == live
    assert not list((root / "var/lib/pas").glob("pas.sqlite.after-*"))


def test_a_rollback_puts_back_the_configuration_the_older_version_takes(
        upgraded: Path) -> None:
    root = upgraded
    new = _upgraded_to(root)
    conf = root / "etc/pas/appliance.toml"
    conf.write_text('site = "CH-B"\nnew_key = 1\n')  # edited for the new version
    (root / "refuse.1.0").write_text("new_key")
    result = _run(root, "rollback")
    assert result.returncode == 0, result.stdout + result.stderr
    # Checked by the older version, as pas.service runs it, the current file then the copy.
    assert (root / "checks.log").read_text().splitlines()[-2:] == [
        f"1.0 {conf}", f"1.0 {conf}.before-{new}"]
    env = json.loads((root / "check.json").read_text())["env"]
    assert env["PAS_SITE"] == "CH Exemple"  # the unit's, not the shell's
    assert conf.read_text() == 'site = "CH-B"\n'
    assert (root / f"etc/pas/appliance.toml.after-{new}").read_text() == (
        'site = "CH-B"\nnew_key = 1\n')
    said = _said(result)
    assert f"config error unknown key new_key (in {conf})" in said
    assert (f"1.0 refused {conf} (above): the copy saved before the upgrade is back in its "
            f"place; the refused one is kept as {conf}.after-{new}") in said
    assert os.readlink(root / "opt/pas/current") == "1.0"


@pytest.mark.parametrize("saved", [True, False])
def test_a_configuration_the_older_version_refuses_in_both_copies_stops_the_rollback(
        upgraded: Path, saved: bool) -> None:
    root = upgraded
    new = _upgraded_to(root)
    conf = root / "etc/pas/appliance.toml"
    conf.write_text('site = "CH-B"\nnew_key = 1\n')
    if saved:
        (root / "refuse.1.0").write_text("site")  # in the saved copy too
        expected = "and the copy saved before the upgrade"
    else:
        (root / "refuse.1.0").write_text("new_key")
        (root / f"etc/pas/appliance.toml.before-{new}").unlink(missing_ok=True)
        expected = "no copy of it was saved before the upgrade"
    result = _run(root, "rollback")
    assert result.returncode == 1, result.stdout + result.stderr
    said = _said(result)
    assert "config error unknown key" in said
    assert expected in said and "PAS was not stopped, nothing was changed" in said
    assert len(_stops(root)) == 2
    assert os.readlink(root / "opt/pas/current") == new
    assert conf.read_text() == 'site = "CH-B"\nnew_key = 1\n'
    assert (root / "opt/pas/previous").exists()
