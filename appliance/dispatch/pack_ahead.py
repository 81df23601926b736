"""Packing ahead of sending, in a bounded window, in plan order.

Owns: the threads that pack (``pack(plan)``) and the threads that send (``send(plan,
packed)``), and the bound on how many packed items exist at once. May not touch: what
packing or sending mean (the caller's functions), the network, the database.

Why apart from the uplink: the bound is the uplink's memory guarantee (a 2 GB study must not
sit in memory), and it is easy to lose: a first version kept the list of the packers' futures,
and each future keeps its result, so every sealed bucket lived until the study was sent (RSS
752 MB). Here the only reference to a packed item is the send task that consumes it; the
tests hold the bound with weak references.

Deadlock-free by order: both pools take their work in plan order, so a sender only ever
waits for an item that holds a window slot or will get one when an earlier send ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

Packed = TypeVar("Packed")
Sent = TypeVar("Sent")


class Cancelled(RuntimeError):
    """Not packed or not sent: another item failed first (``failed`` was set)."""


class _Handover:
    """A packed item passed from its packer to its sender once. The packer's future keeps
    this box, not the item: the item goes as soon as its send is done, before the window slot
    is given back. (A future keeps its result until the pool drops the send task, a moment
    after the slot was released: the next item could be packed meanwhile, and up to
    ``senders`` items more than the bound were alive at once; the tests saw 8 of 6.)"""

    __slots__ = ("item",)

    def __init__(self, item: Any):
        self.item = item

    def take(self) -> Any:
        item, self.item = self.item, None
        return item


class PackAhead(Generic[Packed, Sent]):
    """``senders`` sends at once, fed by ``packers`` threads that keep at most
    ``senders + ahead`` packed items (being packed, ready, or being sent). Items given as
    ``prepacked`` futures are outside that count. Use as a context manager; set ``failed``
    to stop packing and sending what has not started."""

    def __init__(self, pack: Callable[[Any], Packed], send: Callable[[Any, Packed], Sent], *,
                 senders: int, ahead: int, packers: int, name: str = "pack-ahead"):
        self._pack, self._send = pack, send
        self._window = threading.BoundedSemaphore(senders + ahead)
        self.failed = threading.Event()
        self._packers = ThreadPoolExecutor(max(1, packers), thread_name_prefix=f"{name}-pack")
        self._senders = ThreadPoolExecutor(senders, thread_name_prefix=name)

    def __enter__(self) -> PackAhead[Packed, Sent]:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.failed.set()
        self._senders.shutdown(wait=True)  # senders first: they release the packers' slots
        self._packers.shutdown(wait=True)

    def submit_all(self, plans: Iterable[Any],
                   prepacked: dict[int, Future[Packed]] | None = None) -> set[Future[Sent]]:
        """One send future per plan (``plan.index`` keys ``prepacked``). The futures used are
        taken out of ``prepacked``: once sent, nothing here or in the caller holds them."""
        prepacked = prepacked if prepacked is not None else {}
        pending: set[Future[Sent]] = set()
        for plan in plans:
            early = prepacked.pop(plan.index, None)
            ready: Future[Any] = (early if early is not None
                                  else self._packers.submit(self._packed, plan))
            pending.add(self._senders.submit(self._sent, plan, ready, early is None))
        return pending

    def _packed(self, plan: Any) -> _Handover:
        self._window.acquire()
        try:
            if self.failed.is_set():
                raise Cancelled("cancelled: another item failed")
            return _Handover(self._pack(plan))
        except BaseException:
            self._window.release()
            raise

    def _sent(self, plan: Any, ready: Future[Any], holds_slot: bool) -> Sent:
        # On a packing error its packer released the slot. Items packed here come in a
        # handover box (taken out: nothing else keeps them); prepacked ones as they are.
        packed = ready.result().take() if holds_slot else ready.result()
        try:
            if self.failed.is_set():
                raise Cancelled("cancelled: another item failed")
            return self._send(plan, packed)
        finally:
            del packed
            if holds_slot:
                self._window.release()
