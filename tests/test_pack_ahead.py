"""The uplink's packing window (``appliance.dispatch.pack_ahead``): plan order, the memory
bound, and a failure stopping the rest.

Plain functions stand in for packing and sending (the real ones are exercised end to end by
``test_uplink_hub.py`` against a real hub); what is tested here is the scheduling itself,
which no peer could observe: how many packed items are alive at once, held by weak
references so that any stray reference (a kept list of futures) shows up as a live item.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, wait
from dataclasses import dataclass

import pytest

from appliance.dispatch.pack_ahead import Cancelled, PackAhead


@dataclass(frozen=True)
class Plan:
    index: int


class Blob:
    """A packed item (weak-referenceable, 1 MB, so a leak would also show in memory)."""

    def __init__(self, index: int):
        self.index = index
        self.data = bytearray(1 << 20)


def test_at_most_senders_plus_ahead_items_live_and_each_sent_once() -> None:
    alive: weakref.WeakSet[Blob] = weakref.WeakSet()
    lock = threading.Lock()
    most_alive = 0
    packed_order: list[int] = []
    sent: list[int] = []
    gate = threading.Semaphore(0)  # sends finish one at a time, as the test allows

    def pack(plan: Plan) -> Blob:
        blob = Blob(plan.index)
        with lock:
            alive.add(blob)
            packed_order.append(plan.index)
        return blob

    def send(plan: Plan, blob: Blob) -> int:
        nonlocal most_alive
        assert blob.index == plan.index
        gate.acquire()
        with lock:
            most_alive = max(most_alive, len(alive))
            sent.append(plan.index)
        return plan.index

    plans = [Plan(i) for i in range(60)]
    with PackAhead(pack, send, senders=4, ahead=2, packers=2) as ahead:
        pending = ahead.submit_all(plans)
        for _ in plans:
            gate.release()
        done, _ = wait(pending, timeout=60)
    assert sorted(f.result() for f in done) == list(range(60))
    assert sorted(packed_order) == list(range(60))  # each packed once
    assert sorted(sent) == list(range(60))
    assert 1 <= most_alive <= 4 + 2, most_alive
    del done, pending
    assert len(alive) == 0  # nothing holds a packed item once its send is done


def test_a_prepacked_item_is_sent_without_being_packed_again() -> None:
    packed: list[int] = []
    early: Future[Blob] = Future()
    early.set_result(Blob(0))
    with PackAhead(lambda p: packed.append(p.index) or Blob(p.index),
                   lambda p, b: (p.index, b.index), senders=2, ahead=1, packers=1) as ahead:
        given = {0: early}
        pending = ahead.submit_all([Plan(0), Plan(1), Plan(2)], given)
        assert given == {}  # taken out: the caller keeps no reference to the packed bucket
        results = sorted(f.result(timeout=30) for f in pending)
    assert results == [(0, 0), (1, 1), (2, 2)]
    assert packed == [1, 2]


def test_a_failed_send_stops_what_has_not_started_and_frees_every_item() -> None:
    alive: weakref.WeakSet[Blob] = weakref.WeakSet()
    started: list[int] = []

    def pack(plan: Plan) -> Blob:
        blob = Blob(plan.index)
        alive.add(blob)
        return blob

    def send(plan: Plan, blob: Blob) -> int:
        started.append(plan.index)
        if plan.index == 3:
            ahead.failed.set()  # what the uplink does on the first error it sees
            raise OSError("link down")
        return plan.index

    with PackAhead(pack, send, senders=1, ahead=1, packers=1) as ahead:
        pending = ahead.submit_all([Plan(i) for i in range(40)])
        wait(pending, timeout=60)
    errors = [f.exception() for f in pending]
    assert sum(isinstance(e, OSError) and not isinstance(e, Cancelled) for e in errors) == 1
    assert sum(isinstance(e, Cancelled) for e in errors) == 40 - 4
    assert started == [0, 1, 2, 3]
    del errors, pending
    assert len(alive) == 0


def test_an_error_inside_the_with_block_cancels_the_rest() -> None:
    sent: list[int] = []
    release = threading.Event()

    def send(plan: Plan, blob: Blob) -> int:
        release.wait(10)
        sent.append(plan.index)
        return plan.index

    def pack(plan: Plan) -> Blob:
        return Blob(plan.index)

    with pytest.raises(KeyboardInterrupt), PackAhead(pack, send, senders=1, ahead=0,
                                                     packers=1) as ahead:
        ahead.submit_all([Plan(i) for i in range(20)])
        try:
            raise KeyboardInterrupt
        finally:
            release.set()
    assert len(sent) <= 2  # the one under way (and at most one already packed) went out
