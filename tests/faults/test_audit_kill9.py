"""kill -9 in the middle of a state change: the audit trail and the index never disagree.

Health-data hosting requires that the trail never miss a deletion. Real CT studies go
through the real receive path into a real SQLite index; then the real ``pas cache purge``,
``pas cache evict`` or ``pas cache pin`` runs in a child process that is killed with SIGKILL
at one point of its way (:mod:`tests.faults.crash_at`): inside the eviction's transaction,
right after it committed, while a file renamed aside is being unlinked, once everything is
done but the command has not returned. The database the crash left is then opened and the
invariant read from it: the study's rows are gone if and only if a ``delete`` row says so
(a pin is in the index if and only if a ``pin`` row says so). Start-up recovery then runs
on that home, as the next ``pas run`` would, and the files agree with both.

The audit row used to be written in its own transaction after the change had committed and
the files were gone: a kill between the two left a study evicted with no ``delete`` row.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from appliance.ingest.receive import Receiver
from appliance.ops.recovery import startup_recovery
from appliance.store import audit
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.faults.helpers import assert_consistent, spool_state
from tests.support.peers import CT_DIR, read_rows

REPO = Path(__file__).resolve().parents[2]

# (patched function, when): each point of an eviction a crash may fall on.
EVICTION_CRASH_POINTS = {
    # Before its COMMIT: the rows' deletion must roll back, and no delete row survive.
    "inside the eviction transaction": ("appliance.store.eviction", "_paths_in_use", "before"),
    # Committed, no file touched yet: the window the row written afterwards was lost in.
    "eviction committed, files not deleted": ("appliance.store.eviction",
                                              "delete_evicted_files", "before"),
    # A file renamed aside (<name>.dcm.evicting-<pid>), the unlink not done.
    "a file renamed aside, not unlinked": ("os", "unlink", "before-aside-unlink"),
    # Rows and files gone; the old code's delete row was still to be written.
    "eviction done, not returned": ("appliance.store.eviction", "evict_study", "after"),
}


def _studies_by_uid() -> dict[str, list[Path]]:
    from pydicom import dcmread

    studies: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(CT_DIR.glob("*.dcm")):
        studies[str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)].append(path)
    return studies


@pytest.fixture
def two_studies(tmp_path: Path) -> tuple[Path, str, str]:
    """A home holding two CT studies (each several files), both confirmed at the region,
    the first least recently used: (home, the one to go, the one to stay)."""
    home = tmp_path / "home"
    db = Database(home / "pas.sqlite")
    receiver = Receiver(db, Spool(home / "spool"))
    studies = _studies_by_uid()
    chosen = [uid for uid in sorted(studies) if len(studies[uid]) > 1][:2]
    for uid in chosen:
        for path in studies[uid]:
            receiver.receive_file(path.read_bytes())
    with db.transaction() as conn:  # test set-up standing in for the uplink's receipts
        conn.execute("UPDATE instances SET confirmed_at = 1, routed_at = coalesce(routed_at, 1)")
        for n, uid in enumerate(chosen):
            conn.execute("UPDATE studies SET last_received_at = ?, last_accessed_at = ? "
                         "WHERE study_uid = ?", (1000.0 + n, 1000.0 + n, uid))
    db.close()
    return home, chosen[0], chosen[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PAS_HOME": str(home), "PAS_HTTP__ENABLED": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            **extra}


def _crash(home: Path, point: tuple[str, str, str], *pas_args: str,
           **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``pas pas_args`` in a child killed by SIGKILL at ``point``."""
    module, attribute, when = point
    return subprocess.run(
        [sys.executable, "-m", "tests.faults.crash_at", module, attribute, when, *pas_args],
        cwd=REPO, env=_env(home, **env), capture_output=True, text=True, timeout=120)


def _indexed(home: Path, study_uid: str) -> bool:
    return bool(read_rows(home / "pas.sqlite", "SELECT 1 FROM studies WHERE study_uid = ?",
                          (study_uid,)))


def _deleted(home: Path, study_uid: str) -> list[Any]:
    return read_rows(home / "pas.sqlite", "SELECT * FROM audit WHERE event = 'delete' AND "
                     "outcome = 'success' AND target = ?", (study_uid,))


def _files_of(home: Path, study_uid: str) -> list[str]:
    return [r["path"] for r in read_rows(
        home / "pas.sqlite", "SELECT i.path FROM instances i JOIN studies s "
        "ON s.id = i.study_fk WHERE s.study_uid = ?", (study_uid,))]


def _assert_trail_agrees(home: Path, study_uid: str) -> bool:
    """Index rows gone ⇔ one delete row present. Returns whether the study is gone."""
    indexed, deleted = _indexed(home, study_uid), _deleted(home, study_uid)
    assert indexed != bool(deleted), (
        f"study {study_uid}: {'indexed' if indexed else 'gone from the index'} and "
        f"{len(deleted)} delete rows in the audit trail")
    assert len(deleted) <= 1
    return not indexed


def _recover_and_check(home: Path, study_uid: str, files: list[str]) -> None:
    """What the next start does with what the crash left; then index, files and trail agree:
    a study gone has no file left (not even aside), one kept has all of them."""
    db = Database(home / "pas.sqlite")
    spool = Spool(home / "spool")
    try:
        startup_recovery(db, spool, Receiver(db, spool))
    finally:
        db.close()
    gone = _assert_trail_agrees(home, study_uid)
    assert_consistent(home)  # no orphan adopted back, nothing missing
    on_disk = [f for f in files if (home / "spool" / f).exists()]
    assert on_disk == ([] if gone else files)
    assert sorted((home / "spool").rglob("*.evicting-*")) == []
    assert read_rows(home / "pas.sqlite", "SELECT * FROM integrity_issues "
                                          "WHERE resolved_at IS NULL") == []


@pytest.mark.parametrize("point", list(EVICTION_CRASH_POINTS))
def test_kill9_during_forced_purge_trail_agrees_with_index(
        two_studies: tuple[Path, str, str], point: str) -> None:
    home, doomed, kept = two_studies
    files = _files_of(home, doomed)
    assert len(files) > 1
    done = _crash(home, EVICTION_CRASH_POINTS[point], "cache", "purge", doomed, "--force")
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)

    gone = _assert_trail_agrees(home, doomed)
    assert gone == (point != "inside the eviction transaction")
    if gone:
        row = _deleted(home, doomed)[0]
        assert row["actor"].startswith("operator") and "forced purge" in row["detail"]
        assert row["patient"]  # whose study it was, though the index no longer tells
    assert _indexed(home, kept) and not _deleted(home, kept)
    _recover_and_check(home, doomed, files)


@pytest.mark.parametrize("point", list(EVICTION_CRASH_POINTS))
def test_kill9_during_lru_eviction_trail_agrees_with_index(
        two_studies: tuple[Path, str, str], point: str) -> None:
    home, doomed, kept = two_studies
    files = _files_of(home, doomed)
    total = spool_state(home)["by_sop"].values()
    quota_mb = max(1, sum(r["size"] for r in total) // (1024 * 1024))
    done = _crash(home, EVICTION_CRASH_POINTS[point], "cache", "evict",
                  PAS_STORAGE__QUOTA_MB=str(quota_mb), PAS_CACHE__HIGH_WATERMARK_PERCENT="50",
                  PAS_CACHE__LOW_WATERMARK_PERCENT="1")
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)

    gone = _assert_trail_agrees(home, doomed)  # the least recently used goes first
    assert gone == (point != "inside the eviction transaction")
    if gone:
        row = _deleted(home, doomed)[0]
        assert row["actor"] == "system" and "LRU" in row["detail"]
    assert _indexed(home, kept) and not _deleted(home, kept)  # killed before its turn
    _recover_and_check(home, doomed, files)


def test_kill9_after_pin_trail_shows_it(two_studies: tuple[Path, str, str]) -> None:
    """The pin committed, the command killed before it returned: the pin row is there."""
    home, study, _ = two_studies
    done = _crash(home, ("appliance.store.cache", "set_pin", "after"), "cache", "pin", study)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)
    pinned = read_rows(home / "pas.sqlite", "SELECT pinned_until FROM studies "
                                            "WHERE study_uid = ?", (study,))[0][0]
    rows = read_rows(home / "pas.sqlite", "SELECT * FROM audit WHERE event = 'pin' AND "
                                          "target = ?", (study,))
    assert pinned is not None
    assert [(r["outcome"], r["detail"]) for r in rows] == [("success", "pinned until unpinned")]


# --- the sinks see committed rows only --------------------------------------------------------


def test_sinks_get_a_row_once_committed_never_one_rolled_back(tmp_path: Path) -> None:
    """A row written inside a state change's transaction reaches the sinks (journald,
    syslog) after the COMMIT, and not at all when the transaction rolls back (a whole one,
    or the savepoint it was written in)."""
    db = Database(tmp_path / "pas.sqlite")
    seen: list[tuple[str | None, int]] = []

    def sink(entry: dict[str, Any]) -> None:
        # What another connection reads when the sink runs: committed or not.
        reader = sqlite3.connect(tmp_path / "pas.sqlite")
        try:
            committed = reader.execute("SELECT count(*) FROM audit WHERE id = ?",
                                       (entry["id"],)).fetchone()[0]
        finally:
            reader.close()
        seen.append((entry["target"], committed))

    audit.add_sink(sink)
    try:
        with pytest.raises(RuntimeError, match="boom"), db.transaction() as conn:
            audit.record_in(conn, "pin", actor="t", target="1.2.1")
            raise RuntimeError("boom")
        with db.transaction() as conn:
            audit.record_in(conn, "pin", actor="t", target="1.2.2")
            with pytest.raises(RuntimeError), db.savepoint() as part:
                audit.record_in(part, "pin", actor="t", target="1.2.3")
                raise RuntimeError("one part fails")
            audit.record(db, "unpin", actor="t", target="1.2.4")  # nested: joins it
            assert seen == []  # nothing before the COMMIT
        assert seen == [("1.2.2", 1), ("1.2.4", 1)]
        assert [r["target"] for r in audit.recent(db)] == ["1.2.4", "1.2.2"]
        audit.record(db, "query", actor="t", target="1.2.5")  # a transaction of its own
        assert seen[-1] == ("1.2.5", 1)
    finally:
        audit.remove_sink(sink)
        db.close()


def test_record_in_refuses_a_connection_outside_a_transaction(tmp_path: Path) -> None:
    """Outside a transaction there is no commit for the row to be part of: refused, rather
    than written alone under a name that promises it commits with a change."""
    db = Database(tmp_path / "pas.sqlite")
    try:
        with pytest.raises(RuntimeError, match="outside a Database.transaction"):
            audit.record_in(db.connection(), "pin", actor="t", target="1.2.1")
        assert audit.recent(db) == []
    finally:
        db.close()
