"""appliance/locks.py: locks by key (the hub's per-transfer locks, fetch-through's per-study
ones), the same lock for every caller while one holds it, none kept after."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from appliance.locks import KeyedLocks, StudyBeingRead, StudyReaders


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
