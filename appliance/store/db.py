"""Opening the SQLite database: WAL, full durability, migrations, one transaction helper.

Owns: connections and transactions. Every other module in ``appliance.store`` builds on
:func:`transaction`; nothing outside ``appliance.store`` writes SQL.

Each thread gets its own connection (pynetdicom serves each association in its own thread;
SQLite in WAL mode lets readers run beside the one writer). Threads come and go (two per
association, the HTTP worker threads): when a thread ends, its connection goes back to a small
pool of idle ones for the next thread, or is closed, so a daemon that has served a hundred
thousand associations holds a handful of connections, not one per thread it ever ran (each
holds three file descriptors and its page cache). ``synchronous=FULL`` makes a
committed transaction survive power loss, which invariant 1 needs: a C-STORE success is
answered only after its row committed.

``Database(path, readonly=True)`` is how commands that only read (``pas status``, ``pas
studies``, ``pas queue list``...) open it: they change nothing in the database. A missing
file, or a schema older or newer than this software's, is :class:`DatabaseUnavailable` (never
created, never migrated: only ``pas run`` migrates). SQLite opens it with ``mode=ro`` and takes
part in WAL locking, so a daemon that starts, writes and checkpoints during the read cannot
change pages under it. With no daemon running that makes SQLite create an empty ``-wal`` and
the ``-shm`` beside the database; running as root, SQLite gives both the database file's owner
and mode (root's ``pas status`` on ``/var/lib/pas`` leaves files the ``pas`` user owns), so a
reader does this only as root or as the database's owner. Anyone else (a user who may read
the home but whose files the daemon could not write) reads with ``immutable=1`` when those
files are absent: no lock, no file created, and no protection against a daemon starting
during the read (a snapshot that may fail as "malformed"). ``immutable=1`` used to be taken
whenever the files were absent, also by root: a daemon that started and checkpointed during
the read left the reader with stale counts, then "database disk image is malformed".
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.store.schema import MIGRATIONS, data_step

BUSY_TIMEOUT_MS = 30_000  # the daemon's: its writes ride over another's long transaction

log = logging.getLogger("pas.store")


class _Connection(sqlite3.Connection):
    """A connection that can carry work to do once its transaction has committed.

    ``pending_after_commit`` is a list only inside a :meth:`Database.transaction` (None outside):
    :func:`after_commit` appends to it, the transaction runs it after its COMMIT succeeded
    and drops it when it rolls back. Kept on the connection, not on the Database, so that
    code holding only the connection of a transaction (``audit.record_in(conn, ...)``) can
    use it."""

    pending_after_commit: list[Callable[[], None]] | None = None


def after_commit(conn: sqlite3.Connection, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the transaction ``conn`` is in has committed, never if it rolls
    back (what may not see uncommitted state: the audit sinks, which copy each row to the
    journal and to syslog, must never copy a row that was rolled back). Refused outside a
    transaction :meth:`Database.transaction` opened: there is no commit to wait for, and a
    callback nobody runs would silently lose what it was for. A callback that raises is
    logged; the transaction has committed all the same."""
    pending = getattr(conn, "pending_after_commit", None)
    if pending is None:
        raise RuntimeError("after_commit() outside a Database.transaction(): nothing to wait "
                           "for")
    pending.append(callback)


def _run_after_commit(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # committed: the caller must not be told it failed
            log.exception("work after a commit failed")


class DatabaseUnavailable(Exception):
    """A read-only open found no database file, or a schema this software does not read as
    it is (older: ``pas run`` migrates it; newer: an older PAS was reinstalled)."""


def schema_refusal(path: Path, version: int, migrations: list[str]) -> str | None:
    """Why a command that does not migrate refuses a database of schema ``version`` (None:
    it is this software's). Older: only the daemon migrates, at its start (a newer ``pas``
    command migrating the database under an older daemon still running left that daemon on
    a schema it does not know, and the older version refusing it once restarted); newer:
    an older PAS on a newer database."""
    if version < len(migrations):
        # The hub's database is migrated by the hub's service, not the appliance's.
        daemon = ("the hub (pas hub run, systemctl restart pas-hub)"
                  if migrations is HUB_MIGRATIONS
                  else "the daemon (pas run, systemctl restart pas)")
        return (f"{path}: database schema {version} is older than this software's "
                f"({len(migrations)}); it was left as it is: {daemon} migrates it at its "
                "start")
    if version > len(migrations):
        return (f"{path}: database schema {version} is newer than this software knows "
                f"({len(migrations)}); an older PAS version is running on a newer database")
    return None


class SchemaTooNew(RuntimeError):
    """A database a newer PAS wrote (a downgrade, or a backup of a newer version restored):
    never migrated backwards nor written to. ``pas run`` says it in one line (it was a
    traceback)."""


WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes a reset WAL is truncated to (journal_size_limit)
IDLE_CONNECTIONS = 8  # kept open for the next threads; more are closed when their thread ends


class _ThreadConnection:
    """A thread's connection, held in the thread's local storage: when the thread ends,
    CPython drops that storage and this hands the connection back to its database."""

    __slots__ = ("conn", "db")

    def __init__(self, db: Database, conn: sqlite3.Connection):
        self.db, self.conn = db, conn

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also at interpreter exit
            self.db._give_back(self.conn)


class Database:
    """A path plus one connection per thread. Cheap to share between threads."""

    def __init__(self, path: Path, migrations: list[str] = MIGRATIONS, *,
                 readonly: bool = False, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        """``busy_timeout_ms``: how long a write waits for another process's write lock
        before SQLite says "database is locked" (the daemon: 30 s; interactive commands wait
        less, see :mod:`appliance.cli.common`)."""
        self.path = Path(path)
        self.readonly = readonly
        self.busy_timeout_ms = busy_timeout_ms
        if readonly:
            if not self.path.is_file():
                raise DatabaseUnavailable(f"no database at {self.path}")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._open: set[sqlite3.Connection] = set()  # every connection not closed yet
        self._idle: list[sqlite3.Connection] = []    # open, owned by no thread
        self._pool_lock = threading.Lock()
        self._closed = False
        # Set by a start that migrated: the schema it found, and what of the derived objects
        # (indexes, triggers) it had to bring to this version's definitions
        # (:mod:`appliance.store.schema_drift`); the daemon logs both and its start row says
        # them.
        self._migrations = migrations
        self.migrated_from: int | None = None
        self.schema_put_right: list[str] = []
        if readonly:
            self._check_schema(migrations)
        else:
            self._migrate(migrations)

    def connection(self) -> sqlite3.Connection:
        held = getattr(self._local, "held", None)
        if held is not None:
            return held.conn
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        self._local.held = _ThreadConnection(self, conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        target: str | Path = self.path
        if self.readonly:
            immutable = "" if self._may_lock_readonly() else "&immutable=1"
            target = f"{self.path.absolute().as_uri()}?mode=ro{immutable}"
        conn = sqlite3.connect(
            target, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
            check_same_thread=False, uri=self.readonly, factory=_Connection,
        )
        conn.row_factory = sqlite3.Row
        if self.readonly:
            conn.execute("PRAGMA query_only=ON")
        else:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # A WAL that grew (a long read kept SQLite from resetting it: 820 MiB once) is
            # cut back to this at its next reset; without it the file kept its largest size
            # until the next start, disk no check counted.
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        with self._pool_lock:
            self._open.add(conn)
        return conn

    def _may_lock_readonly(self) -> bool:
        """Whether a read-only connection can take part in SQLite's WAL locking: when the
        ``-wal``/``-shm`` files exist (a daemon has the database open, or one was killed), or
        when SQLite may create them for the daemon to use (we are root, and SQLite gives them
        the database's owner, or we own the database; and the directory is writable)."""
        if any(Path(f"{self.path}{suffix}").exists() for suffix in ("-wal", "-shm")):
            return True
        try:
            owner = self.path.stat().st_uid
        except OSError:
            return False
        return os.geteuid() in (0, owner) and os.access(self.path.parent, os.W_OK)

    def _give_back(self, conn: sqlite3.Connection) -> None:
        """A thread ended: its connection serves the next thread, or is closed. One left
        inside a transaction (a thread that died mid-way) is rolled back first."""
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        with self._pool_lock:
            if (not self._closed and conn in self._open and not conn.in_transaction
                    and len(self._idle) < IDLE_CONNECTIONS):
                self._idle.append(conn)
                return
            self._open.discard(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def open_connections(self) -> int:
        """How many connections are open, the threads' and the idle ones (tests check that
        it stays bounded)."""
        with self._pool_lock:
            return len(self._open)

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: one state change, all or nothing.

        ``durable=False``: committed without waiting for the disk (``synchronous=NORMAL`` for
        this one transaction; WAL keeps the database consistent, the next durable commit
        writes it out). Only for rows that a power loss may drop at no cost: the readers of
        a study (:mod:`appliance.store.readers`), cleared at every start anyway, written
        twice per retrieve (0.87 ms a pair with FULL, 0.016 ms without, measured here).
        Ignored when nested (the outer transaction's is what counts).

        IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading a
        read lock; the busy timeout makes the second one wait instead of failing.

        Nested calls on one thread are part of the outer transaction; the nesting is counted
        here, not guessed from ``conn.in_transaction``. That guess once joined a transaction
        left open by a failed COMMIT (SQLite keeps it open e.g. on a deferred foreign-key
        violation or SQLITE_BUSY): the next state change on that thread returned without
        committing anything, and held the write lock for ever. Now a failed COMMIT is rolled
        back, a transaction this method did not open is refused (and rolled back), and the
        caller always sees the original error: a ROLLBACK that fails because SQLite already
        rolled back (SQLITE_FULL, SQLITE_IOERR) no longer replaces SQLITE_FULL with "no
        transaction is active" (the receive path answers 0xA700 for SQLITE_FULL).

        Work registered with :func:`after_commit` inside (nested calls included) runs once
        the outermost COMMIT succeeded, after the write lock is released; it is dropped on a
        rollback.
        """
        conn = self.connection()
        depth = getattr(self._local, "depth", 0)
        if depth:  # nested in one this method opened on this thread: part of it
            if not conn.in_transaction:  # SQLite rolled it back (an error caught inside)
                raise _rolled_back_underneath(self.path)
            self._local.depth = depth + 1
            try:
                yield conn
            finally:
                self._local.depth = depth
            return
        if conn.in_transaction:
            _rollback(conn)
            raise RuntimeError(
                f"{self.path}: this thread's connection was inside a transaction that "
                f"Database.transaction() did not open; it was rolled back (never joined)")
        if not durable:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            if not durable:
                self._restore_durability(conn)
            raise
        self._local.depth = 1
        pending: list[Callable[[], None]] = []
        if isinstance(conn, _Connection):
            conn.pending_after_commit = pending
        try:
            try:
                yield conn
            except BaseException:
                _rollback(conn)
                raise
            if not conn.in_transaction:  # never run the rest in autocommit, never say done
                raise _rolled_back_underneath(self.path)
            try:
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)  # SQLite may leave a transaction open after a failed COMMIT
                raise
        finally:
            self._local.depth = 0
            if not durable:  # back to the durability every other transaction needs
                self._restore_durability(conn)
            if isinstance(conn, _Connection):
                conn.pending_after_commit = None
        _run_after_commit(pending)  # reached only once the COMMIT succeeded

    def _restore_durability(self, conn: sqlite3.Connection) -> None:
        """``synchronous=FULL`` again after a ``durable=False`` transaction; a connection
        where it cannot be (left inside a transaction SQLite would not roll back) is closed
        rather than serve a later C-STORE's commit without waiting for the disk. Never
        raises: the caller's own error, if any, is the one to see."""
        try:
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            log.warning("%s: a connection closed (its durability not restored: %s)",
                        self.path, exc)
            self._local.held = None  # this thread opens a new one when it needs one
            with self._pool_lock:
                self._open.discard(conn)
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    @contextmanager
    def savepoint(self, name: str = "one") -> Iterator[sqlite3.Connection]:
        """Inside :meth:`transaction`: a part that fails rolls back alone (the rest of the
        transaction stays), e.g. one instance of a group commit."""
        conn = self.connection()
        pending = getattr(conn, "pending_after_commit", None)
        mark = len(pending) if pending is not None else 0
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield conn
        except BaseException:
            if pending is not None:  # what the part rolled back must not run after commit
                del pending[mark:]
            if conn.in_transaction:  # else SQLite rolled back everything: keep the error
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"ROLLBACK TO {name}")
                    conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        return self.connection().execute(sql, params).fetchone()

    def close(self) -> None:
        """Close the idle connections and this thread's own; a connection another thread
        holds is closed when that thread ends (``_give_back`` sees the database closed), or
        with the process.

        Why not every connection at once: another thread may be inside a statement on its
        connection (the daemon's stop leaves a part blocked past its budget to end with the
        process), and closing an sqlite3 connection under it frees what that statement
        uses. CI saw the process die of it (SIGSEGV in a commitment delivery's COMMIT as
        its database was closed). Replacing the thread-local storage did the same from
        here: its other threads' connections were handed back, and closed, by this thread."""
        held = getattr(self._local, "held", None)
        with self._pool_lock:
            self._closed = True
            closing = list(self._idle)
            self._idle.clear()
            if held is not None:
                closing.append(held.conn)
            for conn in closing:
                self._open.discard(conn)
        if held is not None:
            del self._local.held  # its hand-back finds it closed: nothing more to do
        self._local.depth = 0
        for conn in closing:
            with contextlib.suppress(sqlite3.ProgrammingError):
                conn.close()

    def started(self, logger: logging.Logger, what: str) -> str | None:
        """A service's start on this database (the daemon's index, the hub's database):
        its derived objects brought to this version's definitions when they differ (done
        by a migration already when this open migrated; else checked now, a database
        migrated by a build that did not check), and what was done said in ``logger`` and
        returned in words for the start's audit row (None: nothing). An upgrade's
        migration used to leave no line anywhere."""
        if self.migrated_from is None:
            self._put_schema_right()
        words = []
        if self.migrated_from is not None:
            words.append(f"{what} migrated from schema {self.migrated_from} to "
                         f"{self.schema_version()}" if self.migrated_from else
                         f"{what} created, schema {self.schema_version()}")
            logger.info("%s", words[0])
        if self.schema_put_right:
            fixed = "; ".join(self.schema_put_right)
            logger.warning("%s: brought to this version's definitions (another build wrote "
                           "them): %s", what, fixed)
            words.append(f"{what} brought to this version's definitions: {fixed}")
        return ", ".join(words) or None

    def _put_schema_right(self) -> None:
        from appliance.store.schema_drift import find

        if not find(self.connection(), self._migrations):  # read only: the usual case
            return
        with self.transaction() as conn:
            self.schema_put_right = self._reconcile(conn)

    def schema_version(self) -> int:
        return int(self.connection().execute("PRAGMA user_version").fetchone()[0])

    def _check_schema(self, migrations: list[str]) -> None:
        """Read-only: the schema must be the one this software knows (nothing migrated)."""
        refusal = schema_refusal(self.path, self.schema_version(), migrations)
        if refusal is not None:
            raise DatabaseUnavailable(refusal)

    def _reconcile(self, conn: sqlite3.Connection) -> list[str]:
        """The derived objects brought to this version's definitions in the caller's
        transaction (:func:`appliance.store.schema_drift.put_right`), in words; a table
        that differs is refused, naming this database and the way out."""
        from appliance.store.schema_drift import SchemaDiffers, put_right

        try:
            return put_right(conn, self._migrations).derived_words()
        except SchemaDiffers as exc:
            raise SchemaDiffers(
                f"{self.path}: its schema differs from this version's ({exc}): another "
                "build of PAS wrote it; nothing was changed (restore a backup of this "
                "version, or set the index aside: pas cache rebuild-index)") from None

    def _migrate(self, migrations: list[str]) -> None:
        conn = self.connection()
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) == len(migrations):
            # Up to date: a reader (``pas status``) must not wait for the write lock, which
            # a busy daemon or a long transaction may hold (tests/faults/test_link_and_lock).
            return
        # Foreign keys off while the migrations run (a PRAGMA that only takes effect outside
        # a transaction), checked whole before the commit: a migration that rebuilds a
        # table others refer to (17, patients) drops it before the new one takes its name,
        # as SQLite's documented procedure for table changes does.
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(migrations):
                raise SchemaTooNew(
                    f"{self.path}: database schema version {version} is newer than this "
                    f"software knows ({len(migrations)}); refusing to run an old version on "
                    "it: a newer PAS wrote it (reinstall that version)")
            for number, script in enumerate(migrations[version:], start=version + 1):
                for statement in _split_statements(script):
                    conn.execute(statement)
                data_step(conn, script)  # what SQL cannot do (migration 30: SHA-256)
                conn.execute(f"PRAGMA user_version={number}")
            # A database a development build made may hold another definition of a
            # migration's index or trigger than this version's: brought to this version's,
            # or, for a table, refused here (nothing changed).
            put_right = self._reconcile(conn)
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"{self.path}: the migration left {len(broken)} rows "
                                   f"referring to no row (first: {tuple(broken[0])}); "
                                   "nothing was changed")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        finally:
            conn.execute("PRAGMA foreign_keys=ON")
        self.migrated_from = version
        self.schema_put_right = put_right


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open, without hiding the error being handled:
    SQLite rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR), and a
    ROLLBACK then, or one that fails, must not replace the original exception."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _rolled_back_underneath(path: Path) -> sqlite3.OperationalError:
    return sqlite3.OperationalError(
        f"{path}: SQLite rolled the transaction back after an error inside it (caught by "
        f"its caller); nothing of it was committed")


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


def copy_consistent(path: Path, target: Path) -> None:
    """A consistent copy of the database at ``path`` as of one moment, through SQLite's
    online backup API, while the daemon keeps writing (a file copy of a WAL database being
    written can be torn). In one step: in WAL mode that is one read transaction, which
    writers do not wait for (copied in several steps, a write landing between two would
    restart the copy, and under steady ingest it might never end). ``target`` is a new
    file, fsynced, in rollback-journal mode (one file)."""
    source = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                             timeout=BUSY_TIMEOUT_MS / 1000)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")
    finally:
        copy.close()
        source.close()
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())


def now() -> float:
    """The one clock the store uses (wall time, seconds since the epoch)."""
    return time.time()
