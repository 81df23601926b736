"""Sealed backups when something goes wrong (review s41 of appliance/ops/backup_seal.py):
a restore beside a running daemon, a backup or restore killed half-way (a clear copy of the
index left in the home), a full share, a full vault, a manifest that lies, a key given for
a backup in clear, ``pas doctor`` on backups written before the key was set. Each is refused
in one line, or cleaned up, with nothing else changed. Real ``pas run`` daemons, real
tmpfs disks (root, as CI runs).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from unittest import mock

import pytest

from appliance.config import load_settings
from appliance.ops import backup_seal
from appliance.ops.home_lock import HomeInUse
from appliance.ops.restore import RestoreRefused, restore_backup
from appliance.store.db import Database
from tests.support.peers import PasProcess, run_pas, small_disk_at


def _key(path: Path) -> str:
    result = run_pas(["backup-key", str(path)], {**os.environ, "PAS_HOME": str(path.parent)})
    assert result.returncode == 0, result.stderr
    return next(ln for ln in result.stdout.splitlines()
                if ln.startswith("recipient = ")).split('"')[1]


def _site(home: Path, recipient: str | None) -> PasProcess:
    env = {"PAS_SITE": "SITE-A"}
    if recipient:
        env["PAS_BACKUP__RECIPIENT"] = recipient
    pas = PasProcess(home, env)
    if not (home / "pas.sqlite").exists():
        Database(home / "pas.sqlite").close()
    return pas


def _backup(pas: PasProcess, share: Path) -> Path:
    share.mkdir(exist_ok=True)
    return Path(json.loads(pas.cli("backup", str(share), "--json").stdout)["folder"])


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "pas.lock"}


def _words(text: str) -> str:
    return " ".join(text.split())


def test_a_sealed_restore_beside_a_running_daemon_opens_nothing(tmp_path: Path) -> None:
    """Refused as a clear one is, before anything is opened: it unsealed the whole index
    into the home of the running daemon (the disk it receives on), then was refused."""
    key = tmp_path / "k.pem"
    recipient = _key(key)
    folder = _backup(_site(tmp_path / "site", recipient), tmp_path / "share")
    running = _site(tmp_path / "running", recipient).start()
    try:
        before = _tree(running.home)
        settings = load_settings(None, environ={**os.environ, "PAS_HOME": str(running.home),
                                            "PAS_SITE": "SITE-A",
                                            "PAS_BACKUP__RECIPIENT": recipient})
        with mock.patch("appliance.ops.restore.open_folder",
                        side_effect=AssertionError("opened beside a running daemon")), \
                pytest.raises(HomeInUse):
            restore_backup(settings, folder, "operator:test", key=backup_seal.load_key(key))
        assert not (running.home / ".backup-opening").exists()
        assert _tree(running.home).keys() >= before.keys()
    finally:
        running.stop()


def test_the_daemon_removes_the_clear_copies_a_killed_backup_or_restore_left(
        tmp_path: Path) -> None:
    """A sealed restore killed while it opened the backup left ``.backup-opening/`` (the
    index in clear) for ever, a backup killed while it staged ``.backup-staging-<pid>-…``
    until a sealed backup a day later: the daemon's start removes both; a staging folder of
    a backup still running (its process alive) is left to it."""
    pas = _site(tmp_path / "home", None)
    leftovers = {
        ".backup-opening/pas.sqlite": True,
        ".backup-staging-999999999-1/pas.sqlite": True,  # no such process
        f".backup-staging-{os.getpid()}-1/pas.sqlite": False,  # alive: a backup running
    }
    for name in leftovers:
        (pas.home / name).parent.mkdir(mode=0o700)
        (pas.home / name).write_bytes(b"SQLite format 3\0 a clear copy")
    pas.start()
    try:
        for name, removed in leftovers.items():
            assert (pas.home / name).parent.exists() is not removed, name
        assert "removed " in pas.log() and ".backup-opening, a clear copy of the index" \
            in pas.log()
    finally:
        pas.stop()


def test_a_sealed_backup_to_a_full_share_is_refused_in_one_line(tmp_path: Path) -> None:
    recipient = _key(tmp_path / "k.pem")
    pas = _site(tmp_path / "home", recipient)
    with small_disk_at(tmp_path / "share", 1) as share:
        filler = share / "filler"
        with open(filler, "wb", buffering=0) as handle, pytest.raises(OSError):
            while True:
                handle.write(b"\0" * 4096)
        refused = pas.cli("backup", str(share), check=False)
        assert refused.returncode == 1
        said = _words(refused.stderr)
        assert "refused:" in said and "No space left on device: no backup written" in said, \
            said
        assert "Traceback" not in refused.stderr + refused.stdout
        assert sorted(p.name for p in share.iterdir()) == ["filler"]
    assert not list(pas.home.glob(".backup-staging-*"))


def test_a_backup_key_on_a_full_disk_leaves_no_file(tmp_path: Path) -> None:
    """It left an empty key file, which then blocked its name ("exists: a key replaced...")."""
    with small_disk_at(tmp_path / "vault", 1) as vault:
        filler = vault / "filler"
        with open(filler, "wb", buffering=0) as handle, pytest.raises(OSError):
            while True:
                handle.write(b"\0" * 512)
        result = run_pas(["backup-key", str(vault / "k.pem")],
                         {**os.environ, "PAS_HOME": str(tmp_path / "h")})
        assert result.returncode == 1
        assert "No space left on device (nothing left there)" in _words(result.stderr)
        assert "Traceback" not in result.stderr
        assert not (vault / "k.pem").exists()


@pytest.mark.parametrize("config_file", [5, ["a"], ""])
def test_a_manifest_whose_config_file_is_not_a_path_is_refused_before_anything(
        tmp_path: Path, config_file: object) -> None:
    """It was read once the index had been put back: a restore that had succeeded ended in
    a traceback, and the opened configuration was removed with it."""
    key = tmp_path / "k.pem"
    recipient = _key(key)
    folder = _backup(_site(tmp_path / "site", recipient), tmp_path / "share")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["config_file"] = config_file
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    new = _site(tmp_path / "new", recipient)
    before = _tree(new.home)
    refused = new.cli("restore", str(folder), "--key", str(key), check=False)
    assert refused.returncode == 1
    assert f"config_file {config_file!r} is not a file's path: the manifest is damaged; " \
           "nothing restored" in _words(refused.stderr)
    assert _tree(new.home) == before


def test_a_key_given_for_a_backup_in_clear_is_refused(tmp_path: Path) -> None:
    """Someone expecting a sealed backup is told it is in clear, not restored silently."""
    key = tmp_path / "k.pem"
    _key(key)
    folder = _backup(_site(tmp_path / "site", None), tmp_path / "share")
    new = _site(tmp_path / "new", None)
    before = _tree(new.home)
    refused = new.cli("restore", str(folder), "--key", str(key), check=False)
    assert refused.returncode == 1
    assert "is not sealed (written in clear), and a key was given: restore it without --key" \
        in _words(refused.stderr)
    assert _tree(new.home) == before
    new.cli("restore", str(folder))  # without --key: restored
    assert len(list(new.home.glob("pas.sqlite.before-restore-*"))) == 1


def test_doctor_warns_while_the_last_backup_is_in_clear_or_for_another_key(
        tmp_path: Path) -> None:
    first = _key(tmp_path / "first.pem")
    second = _key(tmp_path / "second.pem")
    home, share = tmp_path / "home", tmp_path / "share"
    _backup(_site(home, None), share)  # before the recipient was set

    def sealing(recipient: str) -> dict[str, str]:
        checks = json.loads(_site(home, recipient).cli("doctor", "--json",
                                                        check=False).stdout)
        return next(c for c in checks if c["name"] == "backup sealing")

    check = sealing(first)
    assert check["verdict"] == "warn"
    assert "is in clear (written before backup.recipient was set)" in check["detail"]
    _backup(_site(home, first), tmp_path / "share-2")  # another folder: the same second
    assert sealing(first)["verdict"] == "ok"
    check = sealing(second)  # the recipient changed since the last backup
    fingerprint = backup_seal.fingerprint(backup_seal.parse_recipient(first))
    assert check["verdict"] == "warn"
    assert f"is sealed for the backup key {fingerprint}, not" in check["detail"]
    assert f"keep the private key of {fingerprint}" in check["fix"]


def test_a_restore_refused_for_a_damaged_sealed_file_leaves_no_clear_copy(
        tmp_path: Path) -> None:
    """In process, the refusal as the CLI gets it, and no opened folder left behind."""
    key = tmp_path / "k.pem"
    recipient = _key(key)
    folder = _backup(_site(tmp_path / "site", recipient), tmp_path / "share")
    sealed = folder / "pas.sqlite.sealed"
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 1
    sealed.write_bytes(bytes(data))
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"]["pas.sqlite.sealed"]["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    home = tmp_path / "new"
    settings = load_settings(None, environ={**os.environ, "PAS_HOME": str(home),
                                        "PAS_SITE": "SITE-A"})
    with pytest.raises(RestoreRefused, match="part 0 does not open"):
        restore_backup(settings, folder, "operator:test", key=backup_seal.load_key(key))
    assert not (home / ".backup-opening").exists()
    assert not (home / "pas.sqlite").exists()


def test_a_file_removed_with_its_manifest_line_is_refused(tmp_path: Path) -> None:
    """The manifest is in clear: a sealed file deleted together with its line left a
    backup whose every other file opened, and the restore went on without it (the
    enrolment's key, the hub's transfer key: review s41). Each file is bound to the
    backup's whole list of files: with one gone, none opens."""
    key = tmp_path / "k.pem"
    recipient = _key(key)
    site = _site(tmp_path / "site", recipient)
    (site.home / "pki").mkdir(mode=0o700)
    (site.home / "pki" / "client.key").write_bytes(b"the enrolment's key, as a stand-in")
    folder = _backup(site, tmp_path / "share")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert "pki/client.key.sealed" in manifest["files"]
    (folder / "pki" / "client.key.sealed").unlink()
    del manifest["files"]["pki/client.key.sealed"]
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    new = _site(tmp_path / "new", recipient)
    before = _tree(new.home)
    refused = new.cli("restore", str(folder), "--key", str(key), check=False)
    assert refused.returncode == 1
    assert "the backup's list of files changed (a file removed with its manifest line)" in \
        _words(refused.stderr), refused.stderr
    assert _tree(new.home) == before
    assert not (new.home / ".backup-opening").exists()
