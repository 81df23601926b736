"""Opening the SQLite database: WAL, full durability, migrations, one transaction helper.

Owns: connections and transactions. Every other module in ``appliance.store`` builds on
:func:`transaction`; nothing outside ``appliance.store`` writes SQL.

Each thread gets its own connection (pynetdicom serves each association in its own thread;
SQLite in WAL mode lets readers run beside the one writer). ``synchronous=FULL`` makes a
committed transaction survive power loss, which invariant 1 needs: a C-STORE success is
answered only after its row committed.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.store.schema import MIGRATIONS

BUSY_TIMEOUT_MS = 30_000


class Database:
    """A path plus one connection per thread. Cheap to share between threads."""

    def __init__(self, path: Path, migrations: list[str] = MIGRATIONS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._migrate(migrations)

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: one state change, all or nothing.

        IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading a
        read lock; the busy timeout makes the second one wait instead of failing.
        """
        conn = self.connection()
        if conn.in_transaction:  # nested: join the outer transaction
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def savepoint(self, name: str = "one") -> Iterator[sqlite3.Connection]:
        """Inside :meth:`transaction`: a part that fails rolls back alone (the rest of the
        transaction stays), e.g. one instance of a group commit."""
        conn = self.connection()
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield conn
        except BaseException:
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        return self.connection().execute(sql, params).fetchone()

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.ProgrammingError):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    def schema_version(self) -> int:
        return int(self.connection().execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, migrations: list[str]) -> None:
        conn = self.connection()
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) == len(migrations):
            # Up to date: a reader (``pas status``) must not wait for the write lock, which
            # a busy daemon or a long transaction may hold (tests/faults/test_link_and_lock).
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(migrations):
                raise RuntimeError(
                    f"{self.path}: database schema version {version} is newer than this "
                    f"software knows ({len(migrations)}); refusing to run an old version on it"
                )
            for number, script in enumerate(migrations[version:], start=version + 1):
                for statement in _split_statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _split_statements(script: str) -> list[str]:
    """Split a migration into statements (``executescript`` would commit our transaction)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return [s for s in statements if s]


def now() -> float:
    """The one clock the store uses (wall time, seconds since the epoch)."""
    return time.time()
