"""The studies the daemon's retrieves are reading, as rows the other processes see.

Owns: the ``study_readers`` rows (schema 20) and the count of ``delete`` rows a retrieve
compares before and after its plan. May not touch: who reads what (the daemon's
:class:`appliance.locks.StudyReaders` decides, and calls :class:`SharedReaders`), or the
eviction itself (:mod:`appliance.store.eviction` reads :func:`live_readers` inside its own
transaction and refuses).

Why rows, not a question to the daemon: ``pas cache evict`` and ``pas cache purge`` run in
their own process and already take the index's write lock for every eviction; a row read
inside that transaction, written by the daemon in a transaction of its own, is ordered
against it by SQLite itself, with no channel to the daemon to secure, keep up or wait for
(a busy or hung daemon would block the operator). The cost is two small transactions per
retrieve of a study nobody else reads (none while it is read already), committed without
waiting for the disk: the rows are worth nothing after a power loss, and every start
clears them (:func:`clear`).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

from appliance.store.db import Database
from appliance.store.spool import process_alive


@dataclass(frozen=True)
class Reader:
    study_uid: str
    pid: int
    reader: str   # 'C-GET by VIEWER at 127.0.0.1'
    since: float  # read without a break since then


class SharedReaders:
    """The daemon's side (:meth:`appliance.locks.StudyReaders.share`): its readers written
    where ``pas cache evict``/``purge`` look, and the count of deletions they commit."""

    def __init__(self, db: Database, pid: int | None = None):
        self.db = db
        self.pid = os.getpid() if pid is None else pid

    def write(self, reading: dict[str, tuple[str, float]], gone: list[str]) -> None:
        """One transaction: ``reading`` (study -> (reader, since)) shown, ``gone`` removed."""
        with self.db.transaction(durable=False) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO study_readers (study_uid, pid, reader, since) "
                "VALUES (?, ?, ?, ?)",
                [(uid, self.pid, who, since) for uid, (who, since) in reading.items()])
            conn.executemany("DELETE FROM study_readers WHERE study_uid = ? AND pid = ?",
                             [(uid, self.pid) for uid in gone])

    def deletions(self) -> int:
        """The newest ``delete`` row's id: whichever process deleted a study since the last
        look (a refused purge's row counts too: a plan made again for nothing, harmless)."""
        row = self.db.query_one("SELECT coalesce(max(id), 0) FROM audit "
                                "WHERE event = 'delete'")
        return int(row[0]) if row else 0


def clear(db: Database) -> int:
    """At the daemon's start (the home lock held: no other daemon runs): the rows a daemon
    left when it was killed or crashed. Returns how many."""
    with db.transaction() as conn:
        return conn.execute("DELETE FROM study_readers").rowcount


def live_readers(conn: sqlite3.Connection, study_uid: str) -> list[Reader]:
    """Inside an eviction's transaction: who reads the study now. Rows of a process that is
    gone (a daemon killed, not started again: its next start clears them) do not count."""
    rows = conn.execute("SELECT study_uid, pid, reader, since FROM study_readers "
                        "WHERE study_uid = ? ORDER BY since", (study_uid,)).fetchall()
    return [Reader(r[0], int(r[1]), r[2], float(r[3])) for r in rows
            if process_alive(int(r[1]))]
