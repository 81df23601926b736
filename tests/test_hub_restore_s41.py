"""Review s41 of sealed hub backups (appliance/hub/restore.py, appliance/hub/backup.py):

- a sealed restore whose ``archive/`` is its own filesystem (EXDEV on the move) completes;
- a restore killed half-way leaves a marker: ``pas hub run`` and ``pas hub backup`` refuse in
  one line until ``pas hub restore`` runs again, which completes it;
- a sealed backup with no room in the home says so (not "cannot be read whole");
- the start-up room check counts the WAL and says sizes as people read them;
- a full disk after the opening is a refusal with the home as it was, never a restore
  stopped half-way (the naming step is done on the opened copy before anything is replaced).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from appliance.store.db import Database
from tests.support.hub import HubProcess
from tests.support.peers import run_pas, small_disk_at, wait_for

RESTORE_MARKER = ".hub-restore-under-way"  # appliance.hub.restore.RESTORE_MARKER
PKI = ("ca.key", "ca.crt", "server.key", "server.crt", "transfer.key", "transfer.pub")


def _new_key(path: Path) -> str:
    result = run_pas(["backup-key", str(path)],
                     {**os.environ, "PAS_HOME": str(path.parent / "unused")})
    assert result.returncode == 0, result.stderr
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("recipient = ")]
    return line.split('"')[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(home: Path) -> dict[str, str]:
    return {str(p.relative_to(home)): _sha256(p) for p in sorted(home.rglob("*"))
            if p.is_file() and p.name not in ("hub.log", "hub.lock")
            and not p.name.endswith("-shm")}


def _said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def _rows(database: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return [line for line in conn.iterdump()
                if not line.startswith('INSERT INTO "hub_backup"')]
    finally:
        conn.close()


def _sealed_hub(tmp_path: Path, home: Path | None = None) -> tuple[HubProcess, Path, Path]:
    """A stopped hub with the embedded archive's index (a few rows), sealed backups; its
    home, one sealed backup of it, the backup key's file."""
    vault = tmp_path / "vault"
    vault.mkdir(exist_ok=True)
    key = vault / "hub-backup.pem"
    recipient = _new_key(key)
    hub = HubProcess(home or tmp_path / "hub").init()
    hub.token("SITE-A")
    (hub.home / "hub.toml").write_text(f'[backup]\nrecipient = "{recipient}"\n')
    (hub.home / "archive").mkdir(mode=0o700)
    Database(hub.home / "archive" / "pas.sqlite").close()
    with sqlite3.connect(hub.home / "archive" / "pas.sqlite") as conn:
        conn.execute("CREATE TABLE s41_filler (x BLOB)")
        conn.executemany("INSERT INTO s41_filler VALUES (randomblob(2000))", [()] * 20)
    conn.close()
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    made = hub.cli("backup", str(share))
    assert "sealed for the backup key" in made.stdout, made.stdout
    [folder] = share.glob("pas-hub-backup-*")
    return hub, folder, key


def test_a_sealed_restore_completes_when_the_archive_is_its_own_filesystem(
        tmp_path: Path) -> None:
    hub, folder, key = _sealed_hub(tmp_path)
    archive_rows = _rows(hub.home / "archive" / "pas.sqlite")
    # In place: home/archive a mount of its own, holding what it held.
    held = tmp_path / "archive-held"
    shutil.move(hub.home / "archive", held)
    with small_disk_at(hub.home / "archive", 16) as archive:
        shutil.copytree(held, archive, dirs_exist_ok=True)
        assert os.stat(archive).st_dev != os.stat(hub.home).st_dev
        done = hub.cli("restore", str(folder), "--key", str(key), check=False)
        assert done.returncode == 0, _said(done)
        assert "embedded archive's index" in _said(done)
        assert _rows(archive / "pas.sqlite") == archive_rows
        [aside] = archive.glob("pas.sqlite.before-restore-*Z")
        assert _rows(aside) == archive_rows
        assert not (hub.home / RESTORE_MARKER).exists()
        assert not [p for p in hub.home.rglob("*") if "restoring" in p.name
                    or p.name == ".backup-opening"]

    # A rebuilt host: an empty home whose archive/ storage is mounted.
    rebuilt = HubProcess(tmp_path / "rebuilt")
    with small_disk_at(rebuilt.home / "archive", 16) as archive:
        done = rebuilt.cli("restore", str(folder), "--key", str(key), check=False)
        assert done.returncode == 0, _said(done)
        assert _rows(archive / "pas.sqlite") == archive_rows
        assert {name: _sha256(rebuilt.home / name) for name in PKI} == \
            {name: _sha256(hub.home / name) for name in PKI}
        assert not (rebuilt.home / RESTORE_MARKER).exists()


KILLER = """
import os, sys
from pathlib import Path
import appliance.hub.restore as restore
from appliance.ops.backup_seal import load_key

placed = []
real = restore._place

def place(*args, **kwargs):
    placed.append(args[1])
    if args[1] == sys.argv[4]:
        os._exit(9)  # killed in the middle of putting the files back
    return real(*args, **kwargs)

restore._place = place
restore.restore_hub_backup(Path(sys.argv[1]), Path(sys.argv[2]), "operator",
                           key=load_key(Path(sys.argv[3]), None))
"""


def test_a_restore_killed_half_way_is_refused_by_run_and_backup_until_run_again(
        tmp_path: Path) -> None:
    hub, folder, key = _sealed_hub(tmp_path)
    # Killed as it comes to hub.sqlite: the keys were the home's own (kept), the archive's
    # index was replaced (its old one set aside), the hub's database is the old one.
    killed = subprocess.run([sys.executable, "-c", KILLER, str(hub.home), str(folder),
                             str(key), "hub.sqlite"], env=hub.env, capture_output=True,
                            text=True, check=False)
    assert killed.returncode == 9, killed.stderr
    assert (hub.home / RESTORE_MARKER).is_file()

    refused = run_pas(["hub", "run"], hub.env)
    assert refused.returncode == 1, _said(refused)
    said = _said(refused)
    assert said == (f"cannot start the hub: a hub restore into {hub.home} did not finish "
                    f"({RESTORE_MARKER}, of {folder}): the home is half restored; run pas "
                    f"hub restore {folder} again (with its --key if sealed)"), said
    share = tmp_path / "share2"
    share.mkdir()
    backup = hub.cli("backup", str(share), check=False)
    assert backup.returncode == 1
    assert f"did not finish ({RESTORE_MARKER}, of {folder})" in _said(backup), _said(backup)
    assert list(share.iterdir()) == []

    again = hub.cli("restore", str(folder), "--key", str(key), check=False)
    assert again.returncode == 0, _said(again)
    assert not (hub.home / RESTORE_MARKER).exists()

    # No marker: the copies a stopped restore left beside their places go at the start.
    leftovers = [hub.home / ".hub.sqlite.restoring", hub.home / "archive" / ".pas.sqlite.restoring"]
    for leftover in leftovers:
        leftover.write_bytes(b"a stopped restore's copy")
    hub.start()
    try:
        wait_for(lambda: all(f"start-up: removed {p}" in hub.log() for p in leftovers),
                 what="the leftovers' removal")
        assert not any(p.exists() for p in leftovers)
    finally:
        hub.stop()


def _fill(disk: Path, leave: int) -> None:
    """Leave ``leave`` bytes free on ``disk`` (a tmpfs: counted in pages)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(disk).free
    if free > leave:
        with open(filler, "wb") as handle:
            handle.truncate(0)
            handle.write(b"\0" * (free - leave))
    assert abs(shutil.disk_usage(disk).free - leave) < 8192


def test_a_sealed_backup_without_room_in_the_home_says_so(tmp_path: Path) -> None:
    with small_disk_at(tmp_path / "disk", 4) as disk:
        hub, _, _ = _sealed_hub(tmp_path, disk / "home")
        size = (hub.home / "hub.sqlite").stat().st_size
        _fill(disk, size // 2)
        share = tmp_path / "share-full"
        share.mkdir()
        refused = hub.cli("backup", str(share), check=False)
        said = _said(refused)
        assert refused.returncode == 1, said
        assert "cannot be read whole" not in said, said
        assert f"cannot make the copy to seal in {hub.home} (" in said, said
        assert list(share.iterdir()) == []
        assert not list(hub.home.glob(".backup-staging-*"))


def test_the_start_up_room_check_counts_the_wal(tmp_path: Path) -> None:
    from appliance.hub.backup import backup_sealing
    from appliance.hub.config import load_hub_settings

    with small_disk_at(tmp_path / "disk", 8) as disk:
        hub, _, _ = _sealed_hub(tmp_path, disk / "home")
        conn = sqlite3.connect(hub.home / "hub.sqlite")
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("CREATE TABLE s41_wal (x BLOB)")
            with conn:
                conn.executemany("INSERT INTO s41_wal VALUES (randomblob(4000))", [()] * 500)
            wal = (hub.home / "hub.sqlite-wal").stat().st_size
            assert wal > 1_500_000
            database = (hub.home / "hub.sqlite").stat().st_size
            _fill(disk, database + 1_000_000)
            settings = load_hub_settings(environ={**os.environ, "PAS_HUB_HOME": str(hub.home)})
            verdict, said = backup_sealing(settings, None)
        finally:
            conn.close()
    assert verdict == "warn", said
    assert " MiB" not in said and " MB free in" in said and " MB (its databases" in said, said


def test_a_full_disk_after_the_opening_refuses_with_the_home_as_it_was(
        tmp_path: Path) -> None:
    hub, folder, key = _sealed_hub(tmp_path)
    for name in ("buckets", "work", "downloads"):
        shutil.rmtree(hub.home / name, ignore_errors=True)
    template = tmp_path / "template"
    shutil.copytree(hub.home, template)
    opened = sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*.sealed"))
    outcomes = set()
    with small_disk_at(tmp_path / "disk", 4) as disk:
        home = disk / "home"
        env = {**hub.env, "PAS_HUB_HOME": str(home)}
        for leave in range(opened - 4 * 4096, opened + 24 * 4096, 4096):
            shutil.rmtree(home, ignore_errors=True)
            (disk / "filler").unlink(missing_ok=True)
            shutil.copytree(template, home)
            _fill(disk, leave)
            before = _tree(home)
            done = run_pas(["hub", "restore", str(folder), "--key", str(key)], env)
            said = _said(done)
            assert "not finished" not in said, (leave, said)
            if done.returncode == 0:
                outcomes.add("restored")
                assert not (home / RESTORE_MARKER).exists()
                break
            outcomes.add("refused")
            assert said.startswith("refused: "), (leave, said)
            assert said.endswith("nothing restored") or \
                said.endswith("nothing restored, the home is as it was"), (leave, said)
            assert "Nothing restored" not in said, said
            assert _tree(home) == before, (leave, said)
    assert outcomes == {"refused", "restored"}, outcomes


COPY_KILLER = """
import os, sys, shutil
from pathlib import Path
import appliance.hub.restore as restore
def copy(*args, **kwargs):
    os._exit(9)  # killed (kill -9, a power cut) while it copies the first file it replaces
restore.shutil.copyfile = copy
restore.restore_hub_backup(Path(sys.argv[1]), Path(sys.argv[2]), "operator:test")
"""


def test_a_restore_killed_before_it_replaced_anything_leaves_the_hub_startable(
        tmp_path: Path) -> None:
    """The marker was written before the first file's copy (most of a restore's time), not
    before the first file is replaced: a restore killed while it copied left the home as it
    was and a marker saying it was half restored, and the hub refused to start on it (review
    s41 of eec8663). The marker comes with the first replacement now."""
    hub = HubProcess(tmp_path / "hub").init()
    hub.token("SITE-A")
    (hub.home / "archive").mkdir(mode=0o700)
    Database(hub.home / "archive" / "pas.sqlite").close()
    share = tmp_path / "share"
    share.mkdir()
    hub.cli("backup", str(share))
    [folder] = share.glob("pas-hub-backup-*")
    before = _tree(hub.home)
    killed = subprocess.run([sys.executable, "-c", COPY_KILLER, str(hub.home), str(folder)],
                            env=hub.env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    assert not (hub.home / RESTORE_MARKER).exists()
    assert {name: sha for name, sha in _tree(hub.home).items()
            if not name.endswith(".restoring")} == before
    hub.start()  # it serves: nothing was replaced
    hub.stop()
