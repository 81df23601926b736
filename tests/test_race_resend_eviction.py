"""A re-send of a confirmed instance racing the cache's eviction of its study (invariants 1,
3, 7): the receive has put its file in place (content-addressed: the name the evicted row
named too) and waits for the write lock to commit its row; the eviction meanwhile notes
that file, deletes the study's rows, and unlinks the file, finding no row naming it.

Found in review (2026-12-07): the receive checked for its file only after its COMMIT. A
spilled C-STORE (its bytes only in that file) then answered failure with its row committed,
naming no file; an in-memory one had its row live with no file until it wrote the bytes
again (a kill -9 there: a row for ever without its file, which the scrub flags "missing").
Now the check is inside the commit's transaction, right after the instance's row, the write
lock held: the file is written again (fsynced) before the COMMIT, or a spilled instance's
row is rolled back and it alone fails.

Each interleaving is forced in process: the receive is held just before its commit
(``GroupCommit.record``) while the eviction runs whole. ``grouped``: the instance commits
with others in one transaction (``GroupCommit``'s savepoint per instance), not alone.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from appliance.ingest.receive import Received, Receiver, StorageFailure
from appliance.store import eviction
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.support.peers import CT_DIR, wait_for
from tests.test_ingest import dataset_part

SOURCES = sorted(CT_DIR.glob("*.dcm"))[:3]  # the re-sent one, and two others (grouped)


def _spilled(receiver: Receiver, source: Path) -> Received:
    """``source`` as a C-STORE over dicom.spill_above_mb: its dataset written to a spill
    file as it arrives (dicomnet/direct_receive.py), then filed from there."""
    ds = dcmread(source, stop_before_pixels=True)
    ts, cls, uid = (str(ds.file_meta.TransferSyntaxUID), str(ds.SOPClassUID),
                    str(ds.SOPInstanceUID))
    data = dataset_part(source)
    header, digest = Receiver.prepare(cls, uid, ts)
    spill = receiver.open_spill(header)
    spill.write(data)
    digest.update(data)
    return receiver.receive_dataset(spill, transfer_syntax_uid=ts, sop_class_uid=cls,
                                    sop_instance_uid=uid, calling_ae="MOD",
                                    prepared=(header, digest))


def _in_memory(receiver: Receiver, source: Path) -> Received:
    return receiver.receive_file(source.read_bytes(), calling_ae="MOD")


class _Race:
    """One confirmed instance filed, its study evictable; a committed-state reader."""

    def __init__(self, home: Path, spilled: bool):
        self.db = Database(home / "pas.sqlite")
        self.spool = Spool(home / "spool")
        self.receiver = Receiver(self.db, self.spool)
        self.send: Callable[[Receiver, Path], Received] = _spilled if spilled else _in_memory
        first = self.send(self.receiver, SOURCES[0])
        self.uid, self.study_uid = first.sop_instance_uid, first.study_uid
        self.sha256 = first.sha256
        self.path = self.db.query_one("SELECT path FROM instances WHERE id = ?",
                                      (first.instance_id,))["path"]
        with self.db.transaction() as conn:  # standing in for the region's receipt
            conn.execute("UPDATE instances SET confirmed_at = 1, routed_at = 1")
        # Sees committed rows only; used from the committing thread, whichever it is.
        self.reader = sqlite3.connect(home / "pas.sqlite", check_same_thread=False)
        # Rows naming the re-sent file, committed while the file was not in place.
        self.committed_without_file: list[int] = []

    def look_at_committed_rows(self) -> None:
        """What a kill -9 at this instant would leave: a committed row naming a missing file
        (invariant 1) is noted."""
        if not (self.spool.root / self.path).exists():
            (count,) = self.reader.execute("SELECT count(*) FROM instances WHERE path = ?",
                                           (self.path,)).fetchone()
            if count:
                self.committed_without_file.append(count)

    def watch_rewrites(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each spool write from now on (the receive writing the evicted file again) first
        looks at what is committed."""
        real_write = self.spool.write

        def write(*args: Any, **kwargs: Any) -> Any:
            self.look_at_committed_rows()
            return real_write(*args, **kwargs)

        monkeypatch.setattr(self.spool, "write", write)

    def evict(self) -> None:
        eviction.evict_study(self.db, self.spool, self.study_uid, actor="system",
                             reason="evicted (LRU)")
        assert not (self.spool.root / self.path).exists()  # the interleaving under test

    def check_outcome(self, outcome: Received | BaseException, spilled: bool) -> None:
        self.look_at_committed_rows()
        assert self.committed_without_file == []
        rows = self.db.query("SELECT path, sha256 FROM instances WHERE sop_instance_uid = ?",
                             (self.uid,))
        if spilled:  # its bytes went with the evicted file: failure, and nothing of it left
            assert isinstance(outcome, StorageFailure), outcome
            assert "send it again" in str(outcome)
            assert rows == []
            assert not (self.spool.root / self.path).exists()
        else:  # success, its row and its file, byte for byte
            assert isinstance(outcome, Received), outcome
            assert [(r["path"], r["sha256"]) for r in rows] == [(self.path, self.sha256)]
        # Every row has its file, with the SHA-256 it names; no temp file with bytes left.
        for row in self.db.query("SELECT path, sha256 FROM instances"):
            file = self.spool.root / row["path"]
            assert hashlib.sha256(file.read_bytes()).hexdigest() == row["sha256"], row["path"]
        assert [p for p in self.spool.tmp.glob("*.part") if p.stat().st_size] == []

    def close(self) -> None:
        self.reader.close()
        self.db.close()


@pytest.mark.parametrize("spilled", [True, False], ids=["spilled", "in-memory"])
def test_a_resend_whose_file_is_evicted_before_its_commit_leaves_no_row_without_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spilled: bool) -> None:
    """Alone in its commit: the eviction runs whole between the receive's spool write and
    its commit. Before the fix, spilled: StorageFailure answered, its row committed with no
    file; in memory: its row committed while the file was missing, written only after."""
    race = _Race(tmp_path, spilled)
    real_record = race.receiver._commits.record

    def evict_then_record(record, stored, **options):  # type: ignore[no-untyped-def]
        race.evict()
        race.watch_rewrites(monkeypatch)
        return real_record(record, stored, **options)

    monkeypatch.setattr(race.receiver._commits, "record", evict_then_record)
    try:
        outcome: Received | BaseException = race.send(race.receiver, SOURCES[0])
    except StorageFailure as exc:
        outcome = exc
    race.check_outcome(outcome, spilled)
    race.close()


@pytest.mark.parametrize("spilled", [True, False], ids=["spilled", "in-memory"])
def test_a_resend_whose_file_is_evicted_fails_or_is_rewritten_alone_in_a_group_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spilled: bool) -> None:
    """Three receives at once: A commits alone (it found no commit under way), the re-send
    R (its file evicted meanwhile) and C are committed together, a savepoint each. R alone
    fails (spilled) or has its file written again before the COMMIT; A and C succeed."""
    race = _Race(tmp_path, spilled)
    commits = race.receiver._commits
    real_record = commits.record
    placed, go = threading.Event(), threading.Event()

    def hold_the_resend(record, stored, **options):  # type: ignore[no-untyped-def]
        if record.sop_instance_uid == race.uid:
            placed.set()
            assert go.wait(10)
        return real_record(record, stored, **options)

    monkeypatch.setattr(commits, "record", hold_the_resend)
    real_commit, batches = commits._commit, []

    def commit(batch):  # type: ignore[no-untyped-def]
        batches.append(sorted(item.record.sop_instance_uid == race.uid for item in batch))
        return real_commit(batch)

    monkeypatch.setattr(commits, "_commit", commit)
    outcomes: dict[str, Received | BaseException] = {}

    def receive(name: str, send: Callable[[Receiver, Path], Received], source: Path) -> None:
        try:
            outcomes[name] = send(race.receiver, source)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcomes[name] = exc

    resend = threading.Thread(target=receive, args=("R", race.send, SOURCES[0]))
    resend.start()
    assert placed.wait(10)  # R's file is in place, R waits before its commit
    race.evict()
    race.watch_rewrites(monkeypatch)
    blocker = sqlite3.connect(tmp_path / "pas.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the write lock, as another writer holding it
    first = threading.Thread(target=receive, args=("A", _in_memory, SOURCES[1]))
    first.start()
    wait_for(lambda: commits._committing, 10, interval=0.005, what="A's commit under way")
    go.set()
    other = threading.Thread(target=receive, args=("C", _in_memory, SOURCES[2]))
    other.start()
    wait_for(lambda: len(commits._queue) == 2, 10, interval=0.005,
             what="R and C queued behind A's commit")
    blocker.execute("ROLLBACK")
    for thread in (resend, first, other):
        thread.join(20)
    blocker.close()
    assert batches == [[False], [False, True]]  # A alone, then R and C together
    assert isinstance(outcomes["A"], Received) and isinstance(outcomes["C"], Received), outcomes
    race.check_outcome(outcomes["R"], spilled)
    race.close()
