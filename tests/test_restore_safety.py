"""``pas restore`` puts the backup's index in place as the backup holds it, or changes nothing
(appliance/ops/restore.py; docs/operations.md, "Backup and restore").

A stale WAL: a home whose ``pas.sqlite`` is gone but whose ``pas.sqlite-wal`` and ``-shm``
stayed (the daemon killed, then the index moved aside by hand). The restore set the home's
index aside only when ``pas.sqlite`` existed; the orphan WAL stayed beside the backup's copy
and SQLite replayed it into it at the first open: "restored (9 instances)" said, and the
index was malformed, or silently the old one with 39 instances.

All or nothing: the restore set the home's index aside before it copied the backup's in (and
the enrolment the same way); a full disk in between left the home with no index and a
traceback. A stale ``index-check.json`` kept ``pas status`` saying "index damaged" of the
restored index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.store.db import Database
from tests.support.peers import PasProcess, read_rows, small_disk_at

SITE = {"PAS_SITE": "SITE-A"}


def _audit_details(db: Path, like: str) -> int:
    return int(read_rows(db, "SELECT count(*) FROM audit WHERE detail LIKE ?", (like,))[0][0])


def _index_with_rows(path: Path, detail: str, rows: int) -> None:
    """An index holding ``rows`` audit rows saying ``detail`` (padded: many pages)."""
    Database(path).close()
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO audit (at, event, actor, outcome, detail) VALUES "
                         "(0, 'config', 'operator:test', 'success', ?)",
                         [(f"{detail} {n} " + "x" * 400,) for n in range(rows)])
    conn.close()


def _backup(tmp_path: Path) -> Path:
    """A real ``pas backup`` of a home of site SITE-A holding 50 'backup-row' audit rows."""
    site = tmp_path / "site"
    _index_with_rows(site / "pas.sqlite", "backup-row", 50)
    destination = tmp_path / "backups"
    destination.mkdir()
    return Path(json.loads(PasProcess(site, SITE).cli(
        "backup", str(destination), "--json").stdout)["folder"])


def _wal_left_without_its_index(home: Path) -> None:
    """The home's index written, its last transactions only in the WAL (the daemon killed
    before a checkpoint), then ``pas.sqlite`` moved away by hand: the ``-wal`` and ``-shm``
    stay."""
    index = home / "pas.sqlite"
    _index_with_rows(index, "home-before", 10)
    conn = sqlite3.connect(index, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.executemany("INSERT INTO audit (at, event, actor, outcome, detail) VALUES "
                     "(0, 'config', 'operator:test', 'success', ?)",
                     [(f"home-before wal {n} " + "y" * 400,) for n in range(300)])
    kept = home.parent / "kept-by-hand"
    kept.mkdir()
    for side in ("-wal", "-shm"):  # as kill -9 leaves them: copied while still open
        shutil.copy2(f"{index}{side}", kept / f"pas.sqlite{side}")
    conn.close()  # checkpoints and removes the WAL: put the killed process's back
    index.rename(kept / "pas.sqlite")
    for side in ("-wal", "-shm"):
        shutil.copy2(kept / f"pas.sqlite{side}", f"{index}{side}")


def test_restore_sets_a_wal_left_without_its_index_aside(tmp_path: Path) -> None:
    """Failed before: the restored index was read through the old WAL ("database disk image
    is malformed", or the old index's rows), though the restore said it was done."""
    backup = _backup(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    _wal_left_without_its_index(home)
    stale_wal = (home / "pas.sqlite-wal").read_bytes()

    done = PasProcess(home, SITE).cli("restore", str(backup), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    index = home / "pas.sqlite"
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    assert _audit_details(index, "backup-row %") == 50
    assert _audit_details(index, "home-before %") == 0
    # The stale WAL is set aside, never deleted, and said where.
    [aside] = home.glob("pas.sqlite.before-restore-*-wal")
    assert aside.read_bytes() == stale_wal
    [row] = read_rows(index, "SELECT detail FROM audit WHERE event = 'recovery'")
    assert f"set aside as {aside.name}" in row["detail"], row["detail"]


# --- all or nothing ----------------------------------------------------------------------------
#
# The restore set the home's index aside, then copied the backup's in; the enrolment the
# same way. A failure in between (the disk full, kill -9) left the home with no index at all
# and a traceback, where docs/operations.md promised "exit 1, the home as it was".

PKI_FILES = {"client.key": 0o600, "client.crt": 0o644, "hub-ca.crt": 0o644}


def _backup_with_enrolment(tmp_path: Path) -> Path:
    """A real ``pas backup`` of a site with an index of many pages and an enrolment."""
    site = tmp_path / "site"
    _index_with_rows(site / "pas.sqlite", "backup-row", 1200)
    (site / "pki").mkdir(mode=0o700)
    for name, mode in PKI_FILES.items():
        (site / "pki" / name).write_text(f"the backup's {name}\n" * 40)
        (site / "pki" / name).chmod(mode)
    destination = tmp_path / "backups"
    destination.mkdir()
    return Path(json.loads(PasProcess(site, SITE).cli(
        "backup", str(destination), "--json").stdout)["folder"])


def _home_with_index_and_enrolment(home: Path) -> None:
    home.mkdir(parents=True)
    _index_with_rows(home / "pas.sqlite", "home-before", 10)
    (home / "pki").mkdir(mode=0o700)
    (home / "pki" / "client.key").write_text("the home's own key\n")
    (home / "pki" / "client.key").chmod(0o600)


def _tree(home: Path) -> dict[str, str | None]:
    """Every entry of a home (a file with its SHA-256): what a refused restore must leave
    as it was. The lock file is the restore's own."""
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else None
            for p in sorted(home.rglob("*")) if p.name != "pas.lock"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 8 MiB of its own, unmounted after the test."""
    with small_disk_at(tmp_path / "disk", 8) as disk:
        yield disk


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all the room of ``disk`` but ``leave`` bytes."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, stats.f_bavail * stats.f_frsize - leave)
    return filler


@pytest.mark.parametrize("room", ["half the index", "the index and one page",
                                  "the index and the enrolment"])
def test_a_restore_that_runs_out_of_room_leaves_the_home_as_it_was(
        tmp_path: Path, small_disk: Path, room: str) -> None:
    """The disk fills up while the backup's index is copied in, then while its enrolment
    is, then while the restore's row is written in the copy: each time one line, exit 1,
    and the home as it was. Failed before: an ``OSError`` traceback, the home's index set
    aside and none in its place (``pas status``: "no database at ..."), or the home's
    enrolment set aside and the backup's half copied."""
    backup = _backup_with_enrolment(tmp_path)
    index_bytes = (backup / "pas.sqlite").stat().st_size
    home = small_disk / "home"
    _home_with_index_and_enrolment(home)
    before = _tree(home)
    # The enrolment's files take a page each (4 KiB on this tmpfs); the row needs SQLite's
    # -shm (32 KiB) and WAL besides.
    leave = {"half the index": index_bytes // 2,
             "the index and one page": index_bytes + 4096,
             "the index and the enrolment": index_bytes + 40 * 1024}[room]
    filler = _fill(small_disk, leave)
    pas = PasProcess(home, SITE)

    refused = pas.cli("restore", str(backup), check=False)
    assert refused.returncode == 1, refused.stdout
    assert "Traceback" not in refused.stderr, refused.stderr
    said = " ".join(refused.stderr.split())
    assert said.startswith(f"refused: cannot copy {backup} into {home} ("), said
    assert said.endswith("free some room there, then run pas restore again): nothing "
                         "restored, the home as it was"), said
    assert _tree(home) == before
    assert _audit_details(home / "pas.sqlite", "home-before %") == 10

    filler.unlink()  # room made: the same restore goes through
    pas.cli("restore", str(backup))
    assert _audit_details(home / "pas.sqlite", "backup-row %") == 1200
    for name, mode in PKI_FILES.items():
        assert (home / "pki" / name).read_bytes() == (backup / "pki" / name).read_bytes()
        assert stat.S_IMODE((home / "pki" / name).stat().st_mode) == mode
    [pki_aside] = home.glob("pki.before-restore-*")
    assert (pki_aside / "client.key").read_text() == "the home's own key\n"
    assert not list(home.glob(".*.restoring*"))


def test_a_swap_that_fails_half_way_is_undone(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The renames that put the copies in place: one failing (the enrolment's here) undoes
    those done before it; the home's index and enrolment are back where they were."""
    from appliance.config import load_settings
    from appliance.ops import restore

    backup = _backup_with_enrolment(tmp_path)
    home = tmp_path / "home"
    _home_with_index_and_enrolment(home)
    before = _tree(home)
    rename = Path.rename

    def failing(self: Path, target: Path) -> Path:  # type: ignore[override]
        if self.name == restore.INCOMING_PKI:
            raise OSError(5, "Input/output error", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    monkeypatch.setenv("PAS_HOME", str(home))
    monkeypatch.setenv("PAS_SITE", "SITE-A")
    with pytest.raises(restore.RestoreRefused) as refused:
        restore.restore_backup(load_settings(), backup, "operator:test")
    assert str(refused.value) == (
        f"cannot put the backup in place in {home} (Input/output error: {home}/"
        f"{restore.INCOMING_PKI}): nothing restored, the home as it was")
    assert _tree(home) == before


def test_restore_clears_a_damage_finding_of_the_index_it_replaced(tmp_path: Path) -> None:
    """The daemon's check had found the home's index damaged (``index-check.json``); the
    operator restores the last backup, as the message says. Failed before: ``pas status``
    still said "index damaged" of the restored index (the file described the old one;
    ``pas cache rebuild-index`` cleared it, the restore did not), and ``pas doctor`` ran its
    long check. A restore killed before (its temporary copies left) changes nothing to
    this one."""
    from appliance.ops import index_check

    backup = _backup_with_enrolment(tmp_path)
    home = tmp_path / "home"
    _home_with_index_and_enrolment(home)
    index_check.record(home, index_check.IndexCheck(
        path=str(home / "pas.sqlite"), checked_at=0, duration_s=0.1,
        finding="*** in database main *** Page 67: btreeInitPage() returns error code 11"))
    (home / ".pas.sqlite.restoring").write_bytes(b"half a copy")
    (home / ".pki.restoring").mkdir()
    (home / ".pki.restoring" / "client.key").write_bytes(b"half")
    pas = PasProcess(home, SITE)
    assert "index damaged" in pas.cli("status").stderr
    pas.cli("restore", str(backup))
    status = pas.cli("status")
    assert "index damaged" not in status.stderr, status.stderr
    assert pas.status()["index_check"] is None
    assert _audit_details(home / "pas.sqlite", "backup-row %") == 1200
    assert not list(home.glob(".*.restoring*"))
