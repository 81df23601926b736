"""``pas backup --keep N`` and ``pas hub backup --keep N`` (appliance/ops/backup_folder.py:
prune_backups; docs/operations.md, "Backup and restore").

Each run wrote a new ``pas-backup-<site>-<UTC>/`` and nothing removed the old ones: a daily
timer filled the disk. ``--keep N`` removes the oldest whole backups of the same kind and
owner beyond N, and nothing else: not a folder PAS did not write (its MANIFEST.json must say
so), not another site's or the hub's backups, not the temporary folder of a backup being
written (only one where nothing changed for a day: a crashed run's leftover).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from appliance.ops.backup_folder import (
    BackupRefused,
    prune_backups,
    utc_stamp,
    write_backup_folder,
)
from appliance.store.db import Database
from tests.support.hub import HubProcess
from tests.support.peers import PasProcess, wait_for


def _digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256: a folder byte for byte."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _next_second(stamp: str) -> None:
    """Backup folders are named to the second: the next run waits for the next one."""
    wait_for(lambda: utc_stamp() != stamp, 5, what="the next UTC second")


def _appliance(tmp_path: Path, site: str = "SITE-K") -> PasProcess:
    """An appliance home with an index, not running: ``pas backup`` needs only the index."""
    home = tmp_path / "pas"
    home.mkdir()
    Database(home / "pas.sqlite").close()
    config = tmp_path / "appliance.toml"
    config.write_text(f'site = "{site}"\n')
    return PasProcess(home, {"PAS_CONFIG": str(config)})


def _backup(process: PasProcess | HubProcess, destination: Path, keep: int) -> dict:
    made = json.loads(process.cli("backup", str(destination), "--keep", str(keep),
                                  "--json").stdout)
    _next_second(Path(made["folder"]).name[-16:])
    return made


def test_keep_removes_only_the_sites_oldest_whole_backups(tmp_path: Path) -> None:
    pas = _appliance(tmp_path)
    destination = tmp_path / "backups"
    destination.mkdir()
    # What --keep must leave alone: a hub backup, a foreign folder, a folder named like an old
    # backup of this site but without a manifest saying so (one of another site's), and the
    # temporary folder of a backup being written now.
    hub = HubProcess(tmp_path / "hub").init()
    hub_backup = Path(json.loads(hub.cli("backup", str(destination), "--json").stdout)["folder"])
    foreign = destination / "scans"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a backup\n")
    no_manifest = destination / "pas-backup-SITE-K-20200101T000000Z"
    no_manifest.mkdir()
    (no_manifest / "pas.sqlite").write_bytes(b"whatever was copied here by hand")
    other_site = destination / "pas-backup-SITE-K-20200102T000000Z"
    other_site.mkdir()
    (other_site / "MANIFEST.json").write_text(json.dumps(
        {"kind": "pas backup", "site": "SITE-KX", "files": {}}))
    running = destination / ".pas-backup-SITE-K-20260101T000000Z.partial"
    running.mkdir()
    (running / "pas.sqlite").write_bytes(b"being copied")
    os.utime(running, (time.time() - 3 * 86400,) * 2)  # the folder old, its file written now
    crashed = destination / ".pas-backup-SITE-K-20250101T000000Z.partial"
    crashed.mkdir()
    (crashed / "pas.sqlite").write_bytes(b"left by a crash")
    for path in (crashed / "pas.sqlite", crashed):
        os.utime(path, (time.time() - 2 * 86400,) * 2)
    untouched = {p: _digests(p) for p in (hub_backup, foreign, no_manifest, other_site,
                                          running)}

    first = _backup(pas, destination, 2)
    assert first["kind"] == "pas backup" and first["site"] == "SITE-K"
    assert first["pruned"]["removed"] == []
    assert first["pruned"]["stale_partials_removed"] == [crashed.name]
    assert not crashed.exists()
    second = _backup(pas, destination, 2)
    kept_then = _digests(Path(second["folder"]))
    third = _backup(pas, destination, 2)

    names = [Path(made["folder"]).name for made in (first, second, third)]
    assert not (destination / names[0]).exists()
    assert third["pruned"]["removed"] == [names[0]]
    assert third["pruned"]["kept"] == [names[2], names[1]]
    assert sorted(third["pruned"]["left_alone"]) == [no_manifest.name, other_site.name]
    assert third["pruned"]["problems"] == []
    # The two newest stay byte for byte, each file as its manifest says.
    assert _digests(Path(second["folder"])) == kept_then
    for made in (second, third):
        digests = _digests(Path(made["folder"]))
        assert {name: digests[name] for name in made["files"]} == {
            name: entry["sha256"] for name, entry in made["files"].items()}
    for path, digests in untouched.items():
        assert _digests(path) == digests, path
    assert sorted(p.name for p in destination.iterdir()) == sorted(
        [hub_backup.name, foreign.name, no_manifest.name, other_site.name, running.name,
         names[1], names[2]])


def test_hub_keep_removes_only_this_hubs_older_backups(tmp_path: Path) -> None:
    destination = tmp_path / "backups"
    destination.mkdir()
    hub = HubProcess(tmp_path / "hub").init()
    other_hub = HubProcess(tmp_path / "other-hub").init()  # another fleet CA
    theirs = _backup(other_hub, destination, 1)
    appliance = Path(json.loads(_appliance(tmp_path).cli("backup", str(destination),
                                                         "--json").stdout)["folder"])
    first = _backup(hub, destination, 1)
    second = _backup(hub, destination, 1)
    assert second["kind"] == "pas hub backup"
    assert second["pruned"]["removed"] == [Path(first["folder"]).name]
    assert second["pruned"]["kept"] == [Path(second["folder"]).name]
    assert sorted(p.name for p in destination.iterdir()) == sorted(
        [Path(theirs["folder"]).name, appliance.name, Path(second["folder"]).name])


def test_keep_below_one_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    destination = tmp_path / "backups"
    destination.mkdir()
    hub = HubProcess(tmp_path / "hub").init()
    for process in (_appliance(tmp_path), hub):
        refused = process.cli("backup", str(destination), "--keep", "0", check=False)
        assert refused.returncode == 2, refused.stderr
        assert "--keep 0: keep at least 1 backup" in refused.stderr
        assert list(destination.iterdir()) == []


SAME_SITE = {"kind": "pas backup", "site": "SITE-K"}


def _whole(destination: Path, stamp: str) -> Path:
    """A whole backup of SITE-K named for ``stamp``, written the way every backup is."""
    def fill(folder: Path) -> dict:
        (folder / "pas.sqlite").write_bytes(f"the index at {stamp}".encode())
        return dict(SAME_SITE)
    return write_backup_folder(destination, f"pas-backup-SITE-K-{stamp}", fill)[0]


def test_a_run_never_removes_a_backup_newer_than_its_own(tmp_path: Path) -> None:
    """Two runs at once, each ``--keep 1``: the timer's (started at 03:00:00, its copy slowed)
    finishes after an operator's (started at 03:00:10). Each prune sees the other's whole
    folder; the timer's removed the operator's, the newer one, as "older than the N kept",
    and the operator's removed the timer's: when the two overlap (this order, or both
    listing the folder before either removed anything), not one backup was left. A backup
    stamped after the one just written (another run's, or one written while the clock was
    ahead) is not this run's to remove."""
    destination = tmp_path / "backups"
    destination.mkdir()
    older = _whole(destination, "20261204T030000Z")
    operators = _whole(destination, "20261205T030010Z")
    timers = _whole(destination, "20261205T030000Z")
    kept = _digests(operators)

    by_timer = prune_backups(timers, "pas-backup-SITE-K-", SAME_SITE, 1)
    assert by_timer.removed == [older.name]
    assert by_timer.kept == [timers.name]
    assert by_timer.newer_left_alone == [operators.name]
    by_operator = prune_backups(operators, "pas-backup-SITE-K-", SAME_SITE, 1)
    assert by_operator.removed == [timers.name]
    assert sorted(p.name for p in destination.iterdir()) == [operators.name]
    assert _digests(operators) == kept


def test_a_backup_of_the_same_name_being_written_is_not_removed_under_its_writer(
        tmp_path: Path) -> None:
    """Two runs started in the same second (the timer and an operator) name their folders
    alike. The second removed the first's temporary folder as a crash's leftover and built
    its own there: the first then wrote its MANIFEST.json into the second's folder and
    renamed it whole, holding whatever the second had copied so far. Now the second is
    refused, naming the other run, and the first's folder is untouched."""
    destination = tmp_path / "backups"
    destination.mkdir()
    name = "pas-backup-SITE-K-20261205T030000Z"
    running = destination / f".{name}.partial"
    running.mkdir()
    (running / "pas.sqlite").write_bytes(b"being copied by the first run")
    before = _digests(running)
    with pytest.raises(BackupRefused, match=f"{name} is being written by another run"):
        write_backup_folder(destination, name, lambda folder: dict(SAME_SITE))
    assert _digests(running) == before
    assert sorted(p.name for p in destination.iterdir()) == [running.name]
    # A crash's leftover of that name (nothing written in it for a day) is no other run's.
    for path in (running / "pas.sqlite", running):
        os.utime(path, (time.time() - 2 * 86400,) * 2)
    made, _ = write_backup_folder(destination, name, lambda folder: dict(SAME_SITE))
    assert sorted(p.name for p in destination.iterdir()) == [name]
    assert json.loads((made / "MANIFEST.json").read_text())["files"] == {}
