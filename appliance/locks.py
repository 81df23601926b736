"""Locks by key (a transfer id, a study UID), kept only while someone holds them.

Owns: :class:`KeyedLocks`, and :class:`StudyReaders` (the studies a retrieve of this process
is reading, which the cache's eviction leaves alone). May not touch anything else. Why
KeyedLocks: a hub sees millions of transfers in its life and an appliance fetches through
thousands of studies; a dict of one lock per key ever seen grew without end (invariant 8:
bounded memory). StudyReaders likewise holds a study only while it is read.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar


class _HasStudies(Protocol):
    @property
    def study_uids(self) -> list[str]: ...


_Plan = TypeVar("_Plan", bound=_HasStudies)


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
        self.generation = 0

    def register(self, study_uids: list[str]) -> int:
        """Count a reader of each study; returns the generation at that moment."""
        with self._lock:
            for uid in study_uids:
                self._reading[uid] = self._reading.get(uid, 0) + 1
            return self.generation

    def planned(self, make_plan: Callable[[], _Plan]) -> tuple[_Plan, list[str]]:
        """``make_plan()`` with a reader registered for each of its studies, valid as made:
        made again while an eviction committed between the plan and the registration.
        Returns the plan and the studies to :meth:`release` when the retrieve ends."""
        before = self.generation
        plan = make_plan()
        registered = list(dict.fromkeys(plan.study_uids))
        at = self.register(registered)
        try:
            while at != before:  # rare: an eviction committed meanwhile; these stay held
                before = at
                plan = make_plan()
                new = [u for u in dict.fromkeys(plan.study_uids) if u not in registered]
                if not new:
                    break  # every study of the new plan was registered before it was made
                registered += new
                at = self.register(new)
        except BaseException:
            self.release(registered)
            raise
        return plan, registered

    @contextlib.contextmanager
    def holding(self, study_uids: list[str]) -> Iterator[None]:
        """Readers of these studies for the block: a fetch-through filing a study's
        instances (each confirmed as it is filed: the region served it) before the retrieve
        that asked for it plans and registers its own."""
        self.register(study_uids)
        try:
            yield
        finally:
            self.release(study_uids)

    def release(self, study_uids: list[str]) -> None:
        with self._lock:
            for uid in study_uids:
                left = self._reading.get(uid, 0) - 1
                if left > 0:
                    self._reading[uid] = left
                else:
                    self._reading.pop(uid, None)

    def read_now(self, study_uid: str) -> bool:
        return study_uid in self._reading

    def evicting(self, study_uid: str) -> EvictionGuard:
        """Held from the look at the readers to the commit of the rows' deletion: raises
        :class:`StudyBeingRead` (the lock released) when a retrieve reads the study."""
        self._lock.acquire()
        if study_uid in self._reading:
            self._lock.release()
            raise StudyBeingRead(f"study {study_uid} is being read (a retrieve under way)")
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
