"""``pas restore`` puts the backup's index in place as the backup holds it, or changes nothing
(appliance/ops/restore.py; docs/operations.md, "Backup and restore").

A stale WAL: a home whose ``pas.sqlite`` is gone but whose ``pas.sqlite-wal`` and ``-shm``
stayed (the daemon killed, then the index moved aside by hand). The restore set the home's
index aside only when ``pas.sqlite`` existed; the orphan WAL stayed beside the backup's copy
and SQLite replayed it into it at the first open: "restored (9 instances)" said, and the
index was malformed, or silently the old one with 39 instances.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from appliance.store.db import Database
from tests.support.peers import PasProcess, read_rows

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
