"""Locks by key (a transfer id, a study UID), kept only while someone holds them.

Owns: :class:`KeyedLocks`. May not touch anything else. Why: a hub sees millions of transfers
in its life and an appliance fetches through thousands of studies; a dict of one lock per key
ever seen grew without end (invariant 8: bounded memory).
"""

from __future__ import annotations

import threading
import weakref


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
