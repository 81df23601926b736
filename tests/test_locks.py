"""appliance/locks.py: locks by key (the hub's per-transfer locks, fetch-through's per-study
ones), the same lock for every caller while one holds it, none kept after."""

from __future__ import annotations

import threading

from appliance.locks import KeyedLocks


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
