"""Locks by key (a transfer id, a study UID), kept only while someone holds them.

Owns: :class:`KeyedLocks`, and :class:`StudyReaders` (the studies a retrieve of this process
is reading, which the cache's eviction leaves alone; shown to other processes through what the
daemon hands :meth:`StudyReaders.share`, the index's rows). May not touch anything else. Why
KeyedLocks: a hub sees millions of transfers in its life and an appliance fetches through
thousands of studies; a dict of one lock per key ever seen grew without end (invariant 8:
bounded memory). StudyReaders likewise holds a study only while it is read.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Protocol, TypeVar

log = logging.getLogger("pas.cache")


class _HasStudies(Protocol):
    @property
    def study_uids(self) -> list[str]: ...


_Plan = TypeVar("_Plan", bound=_HasStudies)


class _Shared(Protocol):
    """Where the readers are shown to other processes (``appliance.store.readers``)."""

    def write(self, reading: dict[str, tuple[str, float]], gone: list[str]) -> None: ...

    def deletions(self) -> int: ...


def reading_since(who: str, since: float) -> str:
    """How a reader is named in a refusal: 'C-GET by VIEWER at 127.0.0.1 since ...'."""
    return f"{who or 'a retrieve'} since {datetime.fromtimestamp(since):%Y-%m-%d %H:%M:%S}"


class KeyedLocks:
    """``locks(key)``: the key's lock. Callers keep the reference while they use it (a
    ``with locks(key):`` block does), which keeps it the same lock for every concurrent
    caller; once none does, it goes."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = (
            weakref.WeakValueDictionary())
        self._guard = threading.Lock()

    def __call__(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def __len__(self) -> int:
        return len(self._locks)


class StudyBeingRead(Exception):
    """A study a retrieve is reading right now: the cache's own eviction leaves it alone."""


class StudyReaders:
    """Which studies a retrieve of this process (C-MOVE, C-GET, WADO-RS) is reading now, so
    that the cache's eviction does not delete rows and files from under a viewer.

    Why: a retrieve plans its instance ids first and reads each row and file as its
    sub-operation goes; eviction, above the high watermark, may take any confirmed study
    down to the low one, the one being read included (the retrieve touches it, which only
    makes it the last pick). A viewer of a 20-image study got 1 completed, 19 failed.

    The order that makes the check hold: eviction takes :meth:`evicting` (this lock), the
    database's write lock already held, from its look at the readers until its rows'
    deletion is committed, and counts a ``generation`` then (a retrieve never holds the
    write lock while it registers: no deadlock). A retrieve reads the generation before its
    plan and registers after it (:meth:`planned`); a changed generation means an eviction
    committed in between, which the plan may predate: the plan is made again, registered
    as it is.
    An eviction that looks after the registration sees the reader and skips the study."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reading: dict[str, int] = {}
        # Who began the present spell of reading of each study, and when (a refusal names
        # them): the first reader, kept while any reads it.
        self._first: dict[str, tuple[str, float]] = {}
        self.generation = 0
        # Shown to the other processes that evict (pas cache evict/purge): see share().
        self._shared: _Shared | None = None
        self._shared_lock = threading.Lock()  # taken before _lock, never while it is held
        self._shown: dict[str, tuple[str, float]] = {}

    def share(self, shared: _Shared | None) -> None:
        """Show the studies being read to the other processes that evict (the daemon's:
        ``appliance.store.readers.SharedReaders``, rows in the index that ``pas cache
        evict``/``purge`` read inside their transaction). Why: those run in a process of
        their own, where this object is empty, and deleted a study under a viewer.

        The order that makes their check hold is the one :meth:`planned` keeps for this
        process's eviction, with the count of ``delete`` rows for the generation: read before
        the plan, and again once the study's row is committed (a row written when the first
        reader comes, removed when the last goes: nothing written for a study read already)."""
        self._shared = shared

    def _generation(self) -> tuple[int, int]:
        shared = self._shared
        return self.generation, shared.deletions() if shared is not None else 0

    def register(self, study_uids: list[str], who: str = "") -> tuple[int, int]:
        """Count a reader of each study (``who``: 'C-GET by VIEWER at 127.0.0.1'); returns
        the generation once they are shown (this process's evictions, and the others')."""
        at = time.time()
        with self._lock:
            for uid in study_uids:
                self._reading[uid] = self._reading.get(uid, 0) + 1
                self._first.setdefault(uid, (who, at))
        try:
            self._show(study_uids)
        except BaseException:  # not shown: not registered (the retrieve fails, as it must)
            self.release(study_uids)
            raise
        return self._generation()

    def _show(self, study_uids: list[str]) -> None:
        """The shared rows of these studies brought to what this process holds now (under
        ``_shared_lock``: whatever order threads come in, the last look writes the state)."""
        shared = self._shared
        if shared is None:
            return
        with self._shared_lock:
            with self._lock:
                now = {u: self._first[u] for u in study_uids if u in self._reading}
            reading = {u: v for u, v in now.items() if self._shown.get(u) != v}
            gone = [u for u in dict.fromkeys(study_uids) if u not in now and u in self._shown]
            if not reading and not gone:
                return
            shared.write(reading, gone)
            self._shown.update(reading)
            for uid in gone:
                del self._shown[uid]

    def planned(self, make_plan: Callable[[], _Plan],
                who: str = "") -> tuple[_Plan, list[str]]:
        """``make_plan()`` with a reader registered for each of its studies, valid as made:
        made again while an eviction committed between the plan and the registration.
        Returns the plan and the studies to :meth:`release` when the retrieve ends."""
        before = self._generation()
        plan = make_plan()
        registered = list(dict.fromkeys(plan.study_uids))
        at = self.register(registered, who)
        try:
            while at != before:  # rare: an eviction committed meanwhile; these stay held
                before = at
                plan = make_plan()
                new = [u for u in dict.fromkeys(plan.study_uids) if u not in registered]
                if not new:
                    break  # every study of the new plan was registered before it was made
                at = self.register(new, who)
                registered += new
        except BaseException:
            self.release(registered)
            raise
        return plan, registered

    @contextlib.contextmanager
    def holding(self, study_uids: list[str], who: str = "") -> Iterator[None]:
        """Readers of these studies for the block: a fetch-through filing a study's
        instances (each confirmed as it is filed: the region served it) before the retrieve
        that asked for it plans and registers its own."""
        self.register(study_uids, who)
        try:
            yield
        finally:
            self.release(study_uids)

    def release(self, study_uids: list[str]) -> None:
        """The retrieve is over: its studies may be evicted again. Never raises (it runs as
        a retrieve ends, however): a row the index would not take off now is logged, and
        taken off by the next reader of the study, or at the next start."""
        with self._lock:
            for uid in study_uids:
                left = self._reading.get(uid, 0) - 1
                if left > 0:
                    self._reading[uid] = left
                else:
                    self._reading.pop(uid, None)
                    self._first.pop(uid, None)
        try:
            self._show(study_uids)
        except Exception as exc:
            log.warning("the index still shows %s as being read (%s): pas cache evict and "
                        "purge leave it until it is read again or the daemon restarts",
                        ", ".join(study_uids), exc)

    def settle(self) -> None:
        """What the index shows brought to what is read (a row a failed :meth:`release` left
        behind taken off); the eviction pass calls it each time round. Writes nothing when
        they agree, the usual case."""
        with self._shared_lock:
            shown = list(self._shown)
        try:
            self._show(shown)
        except Exception as exc:
            log.warning("the index's readers not brought up to date: %s", exc)

    def read_now(self, study_uid: str) -> bool:
        return study_uid in self._reading

    def evicting(self, study_uid: str) -> EvictionGuard:
        """Held from the look at the readers to the commit of the rows' deletion: raises
        :class:`StudyBeingRead` (the lock released) when a retrieve reads the study."""
        self._lock.acquire()
        if study_uid in self._reading:
            who, since = self._first.get(study_uid, ("", time.time()))
            self._lock.release()
            raise StudyBeingRead(f"study {study_uid} is being read ({reading_since(who, since)})")
        return EvictionGuard(self)


class EvictionGuard:
    """:meth:`StudyReaders.evicting`'s hold: :meth:`committed` once the eviction's
    transaction is over (a new generation: a retrieve that planned meanwhile plans again,
    needlessly after a rollback, harmlessly), :meth:`release` alone otherwise; idempotent."""

    def __init__(self, readers: StudyReaders):
        self._readers = readers
        self._held = True

    def committed(self) -> None:
        if self._held:
            self._readers.generation += 1
            self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._readers._lock.release()


# The daemon's retrieves and its eviction pass share this one (one per process).
READERS = StudyReaders()
