"""``pas backup`` (appliance/ops/backup.py; docs/operations.md, "Backup and restore").

Hospital IT's first question of an appliance is what to back up; PAS had no answer: a copy
of ``pas.sqlite`` taken with ``cp`` while the daemon writes can be torn (WAL), and nothing
said that the enrolment's key must be kept or that unconfirmed images are the spool's alone.

A real daemon and DCMTK storescu sending meanwhile: the backup is a consistent index, the
enrolment with its modes, the configuration, a manifest whose SHA-256s match, an ``export``
audit row; restored onto the same spool after the index and the enrolment are lost, every
instance is there again (those received after the backup adopted from the spool).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import stat
import threading
from pathlib import Path

from tests.support.peers import CT_DIR, PasProcess, read_rows, storescu


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_backup_taken_while_pas_receives_restores_the_index_and_enrolment(
        tmp_path: Path) -> None:
    home = tmp_path / "pas"
    (home / "pki").mkdir(parents=True)
    key = home / "pki" / "client.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a real key\n")
    key.chmod(0o600)
    config = tmp_path / "appliance.toml"
    config.write_text('site = "SITE-B"\n[dicom]\naccept_unknown = true\n')
    destination = tmp_path / "backups"
    destination.mkdir()
    pas = PasProcess(home, {"PAS_CONFIG": str(config), "PAS_PREFETCH__ENABLED": "false",
                            "PAS_HTTP__ENABLED": "false"})
    files = sorted(CT_DIR.glob("*.dcm"))
    pas.start()
    try:
        storescu(files[:10], pas.port)
        # More instances arrive while the backup is taken.
        sending = threading.Thread(target=storescu, args=(files[10:30], pas.port))
        sending.start()
        made = pas.cli("backup", str(destination), "--json")
        sending.join(120)
        manifest = json.loads(made.stdout)
    finally:
        pas.stop()
    folder = Path(manifest["folder"])
    assert folder.parent == destination and folder.name.startswith("pas-backup-SITE-B-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not list(destination.glob(".*partial"))
    # Every file the manifest names, with its SHA-256; nothing else.
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*")
               if p.is_file() and p.name != "MANIFEST.json"}
    assert on_disk == set(manifest["files"]) == {"pas.sqlite", "pki/client.key",
                                                 "appliance.toml"}
    for name, entry in manifest["files"].items():
        assert _sha256(folder / name) == entry["sha256"], name
    assert stat.S_IMODE((folder / "pki" / "client.key").stat().st_mode) == 0o600
    assert (folder / "appliance.toml").read_bytes() == config.read_bytes()
    # A consistent index of one moment: sound, one file, its counts those of the manifest.
    with sqlite3.connect(folder / "pas.sqlite") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        held = copy.execute("SELECT count(*) FROM instances WHERE is_current = 1"
                            ).fetchone()[0]
    assert 10 <= held == manifest["instances"] <= 30
    assert manifest["instances_not_confirmed_by_the_region"] == held  # no hub here
    assert manifest["site"] == "SITE-B" and manifest["schema"] >= 16
    [row] = read_rows(home / "pas.sqlite", "SELECT actor, target, detail FROM audit "
                                           "WHERE event = 'export'")
    assert row["target"] == str(folder) and row["actor"].startswith("operator")
    assert row["detail"].startswith(f"pas backup: the index ({held} instances")

    # The index and the enrolment lost (a reinstalled system disk), the spool kept: put the
    # backup back, start. Instances received after the backup are adopted from the spool.
    for lost in home.glob("pas.sqlite*"):
        lost.unlink()
    shutil.rmtree(home / "pki")
    shutil.copy2(folder / "pas.sqlite", home / "pas.sqlite")
    shutil.copytree(folder / "pki", home / "pki")
    pas.start()
    try:
        rows = read_rows(home / "pas.sqlite", "SELECT count(*) AS n FROM instances "
                                              "WHERE is_current = 1")
        assert rows[0]["n"] == 30
        assert pas.cli("verify", check=False).returncode == 0
    finally:
        pas.stop()
    assert _sha256(home / "pki" / "client.key") == manifest["files"]["pki/client.key"]["sha256"]


def test_an_index_of_another_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    """The package upgraded (a new migration) while the daemon, not restarted yet or stopped,
    left the index at the schema before: ``pas backup`` (the nightly timer's) ended in a
    traceback naming the temporary folder's copy, removed by then. An older ``pas`` on a
    newer index: the same. Refused in one line naming the live index and the way out,
    nothing written, the index as it was."""
    from appliance.store.db import Database
    from appliance.store.schema import MIGRATIONS

    known = len(MIGRATIONS)
    destination = tmp_path / "backups"
    destination.mkdir()
    for step in (-1, 1):
        home = tmp_path / f"home{step}"
        Database(home / "pas.sqlite", MIGRATIONS[:-1]).close()
        if step > 0:
            with sqlite3.connect(home / "pas.sqlite") as conn:
                conn.execute(f"PRAGMA user_version = {known + 1}")
            conn.close()
        refused = PasProcess(home).cli("backup", str(destination), check=False)
        assert refused.returncode == 1, refused.stdout
        said = " ".join(refused.stderr.split())
        index = home / "pas.sqlite"
        if step < 0:
            assert said == (
                f"refused: the index {index} is at schema {known - 1}, older than this "
                f"software's ({known}): the pas service is the version before the upgrade (or "
                "stopped); restart it (systemctl restart pas: it migrates the database at its "
                "start), then back up again. No backup written"), refused.stderr
        else:
            assert said == (
                f"refused: the index {index} is at schema {known + 1}, newer than this "
                f"software knows ({known}): run the pas backup of the version the pas service "
                "runs. No backup written"), refused.stderr
        assert list(destination.iterdir()) == []
        with sqlite3.connect(index) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == known + step
        conn.close()


def test_a_destination_inside_the_home_is_refused(tmp_path: Path) -> None:
    """A backup written in PAS's own home is lost with it (the spool's disk): refused, naming
    both, nothing written."""
    from appliance.store.db import Database

    home = tmp_path / "home"
    Database(home / "pas.sqlite").close()
    inside = home / "backups"
    inside.mkdir()
    refused = PasProcess(home).cli("backup", str(inside), check=False)
    assert refused.returncode == 1, refused.stdout
    assert " ".join(refused.stderr.split()) == (
        f"refused: {inside} is inside PAS's home {home}: a backup there is lost with the home "
        "(the spool's disk); write it on another disk or a share")
    assert list(inside.iterdir()) == []
