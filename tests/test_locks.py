"""appliance/locks.py: locks by key (the hub's per-transfer locks, fetch-through's per-study
ones), the same lock for every caller while one holds it, none kept after; the studies being
read, and as the index shows them to pas cache evict/purge (appliance/store/readers.py)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.ingest.receive import Receiver
from appliance.locks import KeyedLocks, StudyBeingRead, StudyReaders
from appliance.store import audit, eviction
from appliance.store import readers as shared_readers
from appliance.store.db import Database
from appliance.store.eviction import BeingRead
from appliance.store.readers import SharedReaders
from appliance.store.spool import Spool
from tests.support.peers import CT_DIR


def test_keyed_locks_are_shared_while_held_exclusive_and_gone_after() -> None:
    locks = KeyedLocks()
    first = locks("T1")
    assert locks("T1") is first and locks("T2") is not first
    inside: list[int] = []
    overlaps: list[int] = []

    def work() -> None:
        for _ in range(200):
            with locks("T1"):
                inside.append(1)
                overlaps.append(len(inside))
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 800 and max(overlaps) == 1
    del first
    for number in range(1000):  # a hub's transfers, one after the other
        with locks(f"transfer-{number}"):
            pass
    assert len(locks) == 0


def test_a_retrieve_plan_an_eviction_may_predate_is_made_again() -> None:
    """An eviction that commits between a retrieve's plan and its registration: the plan
    (which may name the rows just deleted) is made again, registered; a later eviction of
    the study is refused until the retrieve releases it."""
    readers = StudyReaders()
    made: list[int] = []

    def make_plan() -> SimpleNamespace:
        made.append(1)
        if len(made) == 1:  # the eviction of another study commits meanwhile
            readers.evicting("2.25.2").committed()
        return SimpleNamespace(study_uids=["2.25.1", "2.25.1"])

    plan, reading = readers.planned(make_plan)
    assert len(made) == 2 and reading == ["2.25.1"] and readers.read_now("2.25.1")
    with pytest.raises(StudyBeingRead, match="being read"):
        readers.evicting("2.25.1")
    readers.evicting("2.25.3").release()  # others are not held up
    readers.release(reading)
    assert not readers.read_now("2.25.1")
    readers.evicting("2.25.1").committed()
    assert readers.generation == 2


def test_readers_shown_in_the_index_stop_another_process_evicting(tmp_path: Path) -> None:
    """The daemon's readers as the index shows them (appliance.store.readers) to the
    processes that evict beside it (pas cache evict/purge: here a Database of their own on
    the same file). While read, their eviction is refused naming the reader; once released
    it goes through. A deletion another process commits between a retrieve's plan and its
    registration makes the plan be made again (the plan may name its deleted rows). The row
    of a daemon that is gone counts for nothing and is cleared at the next start."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool")
    first, second = (Receiver(db, spool).receive_file(path.read_bytes())
                     for path in (CT_DIR / "A002304_axial_19001231-076.dcm",
                                  CT_DIR / "A027284_axial_19000925-116.dcm"))
    study = first.study_uid
    assert second.study_uid != study
    with db.transaction() as conn:  # standing in for the region's receipt
        conn.execute("UPDATE instances SET confirmed_at = 1, routed_at = coalesce(routed_at, 1)")
    readers = StudyReaders()
    readers.share(SharedReaders(db))
    cli = Database(tmp_path / "pas.sqlite")
    made: list[int] = []

    def make_plan() -> SimpleNamespace:
        made.append(1)
        if len(made) == 1:  # pas cache purge of another study commits meanwhile
            audit.record(cli, "delete", actor="operator:it", target="2.25.9")
        return SimpleNamespace(study_uids=[study])

    plan, reading = readers.planned(make_plan, "C-GET by VIEWER at 127.0.0.1")
    assert len(made) == 2 and reading == [study]
    with pytest.raises(BeingRead, match=f"study {study} is being read by the running daemon "
                                        r"\(pid \d+\): C-GET by VIEWER at 127.0.0.1 since"):
        eviction.evict_study(cli, spool, study)
    readers.register([study], "WADO-RS by anonymous at 127.0.0.1")  # a second reader
    readers.release(reading)
    with pytest.raises(BeingRead, match="C-GET by VIEWER"):  # the spell's first reader
        eviction.evict_study(cli, spool, study)
    readers.release([study])
    assert cli.query("SELECT * FROM study_readers") == []

    dead = subprocess.Popen(["true"])  # a process that has ended
    dead.wait()
    with cli.transaction() as conn:  # a daemon killed while a viewer read
        conn.execute("INSERT INTO study_readers VALUES (?, ?, 'C-GET by X at 10.0.0.1', 1)",
                     (study, dead.pid))
    assert eviction.evict_study(cli, spool, study).instances == 1
    assert shared_readers.clear(db) == 1  # the next start

    # pas cache purge --force: the trail says whose retrieve it cut short.
    readers.register([study := second.study_uid], "C-MOVE to WS1 by VIEWER at 127.0.0.1")
    eviction.evict_study(cli, spool, study, force=True, actor="operator:it",
                         reason="forced purge by the operator")
    (row,) = cli.query("SELECT detail FROM audit WHERE event = 'delete' AND target = ?",
                       (study,))
    assert row["detail"].startswith("forced purge by the operator, while being read by the "
                                    "running daemon (pid "), row["detail"]
    assert "C-MOVE to WS1 by VIEWER at 127.0.0.1 since" in row["detail"]
    readers.release([study])
    readers.share(None)
    cli.close()
    db.close()
