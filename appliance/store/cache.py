"""Cache lifecycle storage: integrity flags, stale leases, scrub position, eviction, pinning.

Owns: the SQL (and the few spool file moves) behind start-up recovery, ``pas verify``, the
background scrub and the disk policy of :mod:`appliance.ops.recovery` and
:mod:`appliance.ops.cache_policy`. May not touch: the network, or policy decisions (which
study to evict and when is decided by the caller; this module only refuses what would break
invariant 2 unless the operator forces it).

Why eviction is journalled: rows are deleted in one transaction, files after the commit. A
crash in between would leave files without rows, which start-up recovery adopts back into
the index (an orphan usually means a commit was lost). So the eviction transaction also
writes one ``evicting`` integrity row per file; recovery deletes an orphan that has one,
and adopts any other. The unlink itself goes through a name aside (``<name>.evicting-<pid>``);
what a crash leaves under that name is settled at start-up by
:func:`sweep_eviction_leftovers`.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.store import index
from appliance.store.db import Database, now
from appliance.store.jobs import WORKER_DIED
from appliance.store.spool import Spool, fsync_dir, process_alive

QUARANTINE_DIR = "quarantine"


@dataclass(frozen=True)
class IndexedFile:
    instance_id: int
    path: str
    size: int
    sha256: str
    confirmed: bool


def indexed_files(db: Database, after_id: int = 0, limit: int | None = None) -> list[IndexedFile]:
    """Every instance row (all versions) with its file, in id order."""
    sql = ("SELECT id, path, size, sha256, confirmed_at FROM instances WHERE id > ? "
           "ORDER BY id")
    params: tuple[Any, ...] = (after_id,)
    if limit is not None:
        sql += " LIMIT ?"
        params = (after_id, limit)
    return [IndexedFile(r["id"], r["path"], r["size"], r["sha256"], r["confirmed_at"] is not None)
            for r in db.query(sql, params)]


@dataclass(frozen=True)
class Reconciled:
    """One path of :func:`reconcile`: what the index says of it (None: no row) and the size
    of the file on disk (None: no file)."""

    path: str
    indexed_size: int | None
    instance_id: int | None
    size_on_disk: int | None


RECONCILE_PAGE = 5000


def every_indexed_file(db: Database) -> Iterator[IndexedFile]:
    """:func:`indexed_files`, all of them, read a page at a time (bounded memory)."""
    position = 0
    while True:
        page = indexed_files(db, after_id=position, limit=RECONCILE_PAGE)
        yield from page
        if len(page) < RECONCILE_PAGE:
            return
        position = page[-1].instance_id


def reconcile(db: Database, spool: Spool) -> Iterator[Reconciled]:
    """Every path that is indexed or on disk, in path order, index and spool side by side.

    A merge of two sorted walks: the index a page of rows at a time (by ``instances_path``)
    and the spool one directory listing at a time, so memory stays bounded however many
    millions of files the cache holds (start-up recovery once held every row and every path:
    ~0.7 kB per file). The caller may add rows for the paths it is given (an orphan adopted):
    those are never read again, because a page is read only after every path before it has
    been given, and no page is read after a short one."""
    rows = _indexed_by_path(db)
    files = _spool_sorted(spool)
    row, file = next(rows, None), next(files, None)
    while row is not None or file is not None:
        if file is None or (row is not None and row[0] < file[0]):
            assert row is not None
            yield Reconciled(row[0], row[1], row[2], None)
            row = next(rows, None)
        elif row is None or file[0] < row[0]:
            yield Reconciled(file[0], None, None, file[1])
            file = next(files, None)
        else:
            yield Reconciled(row[0], row[1], row[2], file[1])
            row, file = next(rows, None), next(files, None)


def _indexed_by_path(db: Database) -> Iterator[tuple[str, int, int]]:
    """(path, size, first instance id) of each indexed file, in path order (SQLite's binary
    order: UTF-8 bytes, which is Python's order of the same strings)."""
    last = ""
    while True:
        page = db.query(
            "SELECT path, max(size) AS size, min(id) AS id FROM instances WHERE path > ? "
            "GROUP BY path ORDER BY path LIMIT ?", (last, RECONCILE_PAGE))
        for r in page:
            yield r["path"], r["size"], r["id"]
        if len(page) < RECONCILE_PAGE:
            return
        last = page[-1]["path"]


def _spool_sorted(spool: Spool) -> Iterator[tuple[str, int]]:
    """(relative path, size) of every kept file (``*.dcm``; ``tmp`` and ``quarantine``
    excluded), in path order: each directory's entries sorted with a directory's name read as
    ``name/``, the way its files' paths compare. Any depth: the fan-out layout (``ab/<sha>.dcm``
    or ``ab/cd/<sha>.dcm``) may differ between versions, and both may coexist on an upgraded
    appliance."""

    def walk(directory: str, prefix: str) -> Iterator[tuple[str, int]]:
        entries = []
        with os.scandir(directory) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    if not prefix and entry.name in ("tmp", QUARANTINE_DIR):
                        continue
                    entries.append((entry.name + "/", entry.path, True))
                elif entry.name.endswith(".dcm"):
                    entries.append((entry.name, entry.path, False))
        entries.sort()
        for name, path, is_dir in entries:
            if is_dir:
                yield from walk(path, prefix + name)
                continue
            try:
                yield prefix + name, os.stat(path).st_size
            except FileNotFoundError:
                continue  # removed meanwhile (an eviction): not on disk

    yield from walk(str(spool.root), "")


# --- integrity flags -------------------------------------------------------------------------


def flag_issue(db: Database, kind: str, path: str, instance_id: int | None,
               detail: str) -> bool:
    """Record a problem once: an identical open flag is not duplicated. True if new."""
    with db.transaction() as conn:
        existing = conn.execute(
            "SELECT id FROM integrity_issues WHERE resolved_at IS NULL AND kind = ? AND path = ?",
            (kind, path),
        ).fetchone()
        if existing:
            return False
        conn.execute(
            "INSERT INTO integrity_issues (found_at, kind, path, instance_fk, detail) "
            "VALUES (?, ?, ?, ?, ?)",
            (now(), kind, path, instance_id, detail),
        )
        return True


def resolve_issues(db: Database, path: str, resolution: str,
                   kinds: tuple[str, ...] | None = None) -> int:
    kind_filter, params = "", [now(), resolution, path]
    if kinds:
        kind_filter = f"AND kind IN ({','.join('?' * len(kinds))})"
        params.extend(kinds)
    # Nearly always nothing is open for the path (the scrub and verify call this for every
    # good file): a read says so without taking the write lock that ingest waits for.
    if db.query_one(f"SELECT 1 FROM integrity_issues WHERE path = ? AND resolved_at IS NULL "
                    f"{kind_filter} LIMIT 1", tuple(params[2:])) is None:
        return 0
    with db.transaction() as conn:
        cursor = conn.execute(
            f"UPDATE integrity_issues SET resolved_at = ?, resolution = ? "
            f"WHERE path = ? AND resolved_at IS NULL {kind_filter}",
            params,
        )
        return cursor.rowcount


def open_issue_paths(db: Database, kinds: tuple[str, ...]) -> set[str]:
    """The paths with an open flag of these kinds (a handful: each is a problem a human or a
    re-send must resolve)."""
    rows = db.query(
        f"SELECT DISTINCT path FROM integrity_issues WHERE resolved_at IS NULL "
        f"AND kind IN ({','.join('?' * len(kinds))})", kinds)
    return {r["path"] for r in rows}


def open_issues(db: Database, kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    kind_filter, params = "", []
    if kinds:
        kind_filter = f"AND kind IN ({','.join('?' * len(kinds))})"
        params = list(kinds)
    rows = db.query(
        f"SELECT * FROM integrity_issues WHERE resolved_at IS NULL {kind_filter} ORDER BY id",
        tuple(params),
    )
    return [dict(r) for r in rows]


def quarantine(spool: Spool, relative: str) -> str:
    """Move a damaged or unexplained file aside (never delete it): returns its new path."""
    source = spool.root / relative
    target = spool.root / QUARANTINE_DIR / relative.replace("/", "_")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
    return str(target.relative_to(spool.root))


# --- leases ------------------------------------------------------------------------------------


def release_host_leases(db: Database, host: str) -> int:
    """Start-up: jobs leased by a previous process on this host can be taken again at once.

    Lease owners are ``host:pid:tag:n`` (see dispatch.worker); at start-up no worker of this
    daemon runs yet, so every running job leased from this host belongs to a dead process.
    The attempt the dead process counted stays counted (it was given back once: a job whose
    sending crashes the daemon was then retried at every restart, for ever); the job is due
    at once, and ``jobs.claim_next`` fails it when no attempt is left. One kill -9 costs one
    attempt of ``queue.max_attempts`` (10 by default): the job resumes.
    """
    at = now()
    with db.transaction() as conn:
        cursor = conn.execute(
            f"""UPDATE jobs SET state = 'pending', next_attempt_at = ?, updated_at = ?,
                   last_error = '{WORKER_DIED} (the daemon stopped during attempt '
                       || attempts || ')',
                   lease_owner = NULL, lease_until = NULL
               WHERE state = 'running' AND lease_owner LIKE ? ESCAPE '\\'""",
            (at, at, host.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ":%"),
        )
        return cursor.rowcount


# --- scrub position ------------------------------------------------------------------------------


def scrub_position(db: Database) -> int:
    row = db.query_one("SELECT last_instance_id FROM scrub_state WHERE id = 1")
    return int(row["last_instance_id"]) if row else 0


def save_scrub_position(db: Database, last_instance_id: int, pass_done: bool = False) -> None:
    with db.transaction() as conn:
        conn.execute(
            """INSERT INTO scrub_state (id, last_instance_id, pass_started_at, passes)
               VALUES (1, ?, ?, 0)
               ON CONFLICT (id) DO UPDATE SET last_instance_id = excluded.last_instance_id,
                   passes = passes + ?,
                   pass_started_at = CASE WHEN ? THEN excluded.pass_started_at
                                          ELSE pass_started_at END""",
            (last_instance_id, now(), int(pass_done), int(pass_done)),
        )


# --- disk policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvictionCandidate:
    study_uid: str
    bytes: int
    instances: int
    last_used_at: float


def eviction_candidates(db: Database, received_before: float,
                        limit: int = 100) -> list[EvictionCandidate]:
    """Studies the cache may drop on its own, least recently used first.

    All of: every instance row (every version) confirmed at the region (invariant 2); not
    pinned (or the pin expired); no job still pending or running for it; last received
    before ``received_before`` (the minimum retention).
    """
    at = now()
    rows = db.query(
        """SELECT s.study_uid, coalesce(s.last_accessed_at, s.last_received_at) AS used_at,
                  count(i.id) AS n, coalesce(sum(i.size), 0) AS bytes
           FROM studies s JOIN instances i ON i.study_fk = s.id
           WHERE (s.pinned_until IS NULL OR s.pinned_until < ?)
             AND s.last_received_at < ?
             AND NOT EXISTS (SELECT 1 FROM instances u WHERE u.study_fk = s.id
                             AND u.confirmed_at IS NULL)
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_fk = s.id
                             AND j.state IN ('pending', 'running'))
           GROUP BY s.id ORDER BY used_at, s.id LIMIT ?""",
        (at, received_before, limit),
    )
    return [EvictionCandidate(r["study_uid"], int(r["bytes"]), int(r["n"]), r["used_at"])
            for r in rows]


class NotEvictable(Exception):
    """The study may not be dropped (unconfirmed instances, pinned, or unknown)."""


@dataclass(frozen=True)
class Evicted:
    study_uid: str
    instances: int
    bytes: int
    unconfirmed: int


def evict_study(db: Database, spool: Spool, study_uid: str, *, force: bool = False) -> Evicted:
    """Drop a study from the index and the spool, rows first (one transaction), then files.

    Without ``force`` a study with any unconfirmed instance, a live pin or an active job is
    refused: the cache never breaks invariant 2 on its own. ``force`` is the operator's purge.

    The same bytes may be received again while this runs (a modality re-sends the study):
    the receive finds the content-addressed file, commits a new row naming it and answers
    success, so the file must survive. An unlink after the commit used to delete it. Now a
    file is deleted only if, with the write lock held (no index commit can interleave), no
    row names it and it is still the very file (device and inode) seen before the rows were
    deleted: :meth:`Spool.write` always renames its own copy into place, even when the same
    bytes are already held, so a receive that wrote after that look left another inode
    there and its row may still be coming. Why this rather than a lock by path shared with
    the receive path: ``pas cache purge`` runs in another process than the daemon's
    receives; the SQLite write lock and the file's identity are seen by both.
    What this cannot see: a receive that wrote its file before this function looked, and
    commits its row only after the deletion, having lost the write lock to both of its
    transactions meanwhile. Closing that needs the receive path to check its file after its
    own commit (ingest's code).
    """
    at = now()
    # The files as they are before any row goes (see above); rows that arrive before the
    # transaction below are looked at there.
    seen = _file_identities(spool, (r["path"] for r in db.query(
        "SELECT i.path FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ?", (study_uid,))))
    with db.transaction() as conn:
        study = conn.execute("SELECT id, pinned_until FROM studies WHERE study_uid = ?",
                             (study_uid,)).fetchone()
        if study is None:
            raise NotEvictable(f"study {study_uid} is not in the cache")
        rows = conn.execute("SELECT id, path, size, confirmed_at FROM instances "
                            "WHERE study_fk = ?", (study["id"],)).fetchall()
        unconfirmed = sum(1 for r in rows if r["confirmed_at"] is None)
        if not force:
            if unconfirmed:
                raise NotEvictable(f"study {study_uid}: {unconfirmed} instances not confirmed "
                                   f"at the region")
            if study["pinned_until"] is not None and study["pinned_until"] >= at:
                raise NotEvictable(f"study {study_uid} is pinned")
            active = conn.execute("SELECT count(*) FROM jobs WHERE study_fk = ? AND state IN "
                                  "('pending', 'running')", (study["id"],)).fetchone()[0]
            if active:
                raise NotEvictable(f"study {study_uid}: {active} jobs still to run")
        ids = [r["id"] for r in rows]
        marks = ",".join("?" * len(ids))
        if ids:
            conn.execute(f"DELETE FROM job_instances WHERE instance_fk IN ({marks})", ids)
        conn.execute("DELETE FROM job_instances WHERE job_id IN "
                     "(SELECT id FROM jobs WHERE study_fk = ?)", (study["id"],))
        conn.execute("DELETE FROM jobs WHERE study_fk = ?", (study["id"],))
        if ids:
            conn.execute(f"DELETE FROM instances WHERE id IN ({marks})", ids)
        conn.execute("DELETE FROM series WHERE study_fk = ?", (study["id"],))
        conn.execute("DELETE FROM studies WHERE id = ?", (study["id"],))
        paths = sorted({r["path"] for r in rows})
        still_used = _paths_in_use(conn, paths)
        doomed = [p for p in paths if p not in still_used]
        seen.update(_file_identities(spool, (p for p in doomed if p not in seen)))
        conn.executemany(
            "INSERT INTO integrity_issues (found_at, kind, path, detail) "
            "VALUES (?, 'evicting', ?, ?)",
            [(at, p, f"study {study_uid}") for p in doomed],
        )
    delete_evicted_files(db, spool, {p: seen[p] for p in doomed})
    return Evicted(study_uid, len(rows), sum(int(r["size"]) for r in rows), unconfirmed)


EVICT_FILES_PER_TRANSACTION = 256  # the write lock is held while they are unlinked

_FileIdentity = tuple[int, int]  # (st_dev, st_ino)


def _file_identities(spool: Spool, paths: Iterable[str]) -> dict[str, _FileIdentity | None]:
    identities: dict[str, _FileIdentity | None] = {}
    for relative in paths:
        try:
            st = os.stat(spool.root / relative)
        except FileNotFoundError:
            identities[relative] = None
        else:
            identities[relative] = (st.st_dev, st.st_ino)
    return identities


def _paths_in_use(conn: sqlite3.Connection, paths: list[str]) -> set[str]:
    used: set[str] = set()
    for start in range(0, len(paths), 500):
        part = paths[start:start + 500]
        used.update(r["path"] for r in conn.execute(
            f"SELECT DISTINCT path FROM instances WHERE path IN ({','.join('?' * len(part))})",
            part))
    return used


def delete_evicted_files(db: Database, spool: Spool,
                         doomed: dict[str, _FileIdentity | None]) -> list[str]:
    """The second half of :func:`evict_study`: unlink each file whose rows are gone, unless
    it was filed again meanwhile; resolve its ``evicting`` flag (``deleted`` or ``kept``).
    Returns the paths kept. Each batch is one transaction holding the write lock, so no
    index commit lands between the look at the rows and the unlink."""
    kept: list[str] = []
    paths = sorted(doomed)
    for start in range(0, len(paths), EVICT_FILES_PER_TRANSACTION):
        batch = paths[start:start + EVICT_FILES_PER_TRANSACTION]
        with db.transaction() as conn:
            in_use = _paths_in_use(conn, batch)
            resolved = []
            for relative in batch:
                if relative in in_use or not _unlink_if_same(spool, relative, doomed[relative]):
                    kept.append(relative)
                    resolved.append(("kept", relative))
                else:
                    resolved.append(("deleted", relative))
            at = now()
            conn.executemany(
                "UPDATE integrity_issues SET resolved_at = ?, resolution = ? "
                "WHERE kind = 'evicting' AND path = ? AND resolved_at IS NULL",
                [(at, resolution, relative) for resolution, relative in resolved],
            )
    return kept


EVICTING_ASIDE = ".evicting-"  # <name>.dcm.evicting-<pid>: a file an eviction is unlinking


def _unlink_if_same(spool: Spool, relative: str, identity: _FileIdentity | None) -> bool:
    """Unlink the file if it is still the one identified by ``identity`` (True: gone).
    The file is first renamed aside (atomic), so the look and the unlink are about the same
    inode; another one (a receive rewrote the same bytes) is renamed back. A crash between
    the rename and the unlink (or the rename back) leaves the name aside:
    :func:`sweep_eviction_leftovers` settles it at the next start."""
    final = spool.root / relative
    aside = final.with_name(f"{final.name}{EVICTING_ASIDE}{os.getpid()}")
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        return True  # not there: nothing to delete
    st = os.stat(aside)
    if (st.st_dev, st.st_ino) == identity:
        os.unlink(aside)
        return True
    os.replace(aside, final)  # a newer copy meanwhile holds the same bytes: either will do
    if spool.fsync:
        fsync_dir(final.parent)
    return False


@dataclass(frozen=True)
class EvictionLeftover:
    aside: str  # relative path of the name aside
    path: str  # the file's own relative path
    action: str  # "renamed back" or "removed"


def sweep_eviction_leftovers(spool: Spool, db: Database) -> list[EvictionLeftover]:
    """Settle the files an eviction renamed aside and a crash kept from unlinking (or from
    renaming back): ``<name>.dcm.evicting-<pid>`` of a process that no longer runs.

    By then the eviction's first transaction had committed: the rows were gone and the
    ``evicting`` flag written. If a row names the path again (the same bytes were filed again
    by a receive: the case the rename back is for) and the file is not in place, the one
    aside is renamed back and the flag resolved ``kept``; with the file in place, or no row
    naming it, the copy aside goes (the evicted bytes were confirmed, or an older version of
    the same bytes). Each under the write lock, so no index commit lands between the look at
    the rows and the move. Names of a live evictor (``pas cache purge`` running beside the
    daemon, or the daemon beside ``pas verify --repair``) are left to it: a process that
    runs under that pid and holds this home's database open (:func:`_evictor_alive`; a pid
    taken over by another program after a crash and a reboot is not one).
    Costs one listing of the spool's directories (no stat per file)."""
    settled: list[EvictionLeftover] = []
    for aside_relative, pid in _eviction_asides(spool):
        if pid != os.getpid() and _evictor_alive(pid, db.path):
            continue
        relative = aside_relative[:aside_relative.rindex(EVICTING_ASIDE)]
        aside, final = spool.root / aside_relative, spool.root / relative
        with db.transaction() as conn:
            named = conn.execute("SELECT 1 FROM instances WHERE path = ? LIMIT 1",
                                 (relative,)).fetchone() is not None
            try:
                if named and not final.exists():
                    os.rename(aside, final)
                    action = "renamed back"
                else:
                    os.unlink(aside)
                    action = "removed"
            except FileNotFoundError:
                continue  # settled meanwhile by another sweep
            if named:
                conn.execute(
                    "UPDATE integrity_issues SET resolved_at = ?, resolution = 'kept' "
                    "WHERE kind = 'evicting' AND path = ? AND resolved_at IS NULL",
                    (now(), relative))
        if spool.fsync:
            fsync_dir(final.parent)
        settled.append(EvictionLeftover(aside_relative, relative, action))
    return settled


def _evictor_alive(pid: int, database: Path) -> bool:
    """Whether ``pid`` may still be the process that renamed a file aside: it runs and holds
    ``database`` open (every evictor does, from its eviction transaction to the unlink).
    Whoever took the pid over after a crash does not. Where that cannot be seen (another
    user's process, no /proc), a running process is assumed to be the evictor."""
    if not process_alive(pid):
        return False
    if not os.path.isdir("/proc/self/fd"):
        return True  # no /proc: cannot tell
    try:
        wanted = os.stat(database)
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # ended meanwhile
        return False
    except OSError:  # PermissionError: another user's process
        return True
    for fd in descriptors:
        try:
            held = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile, or not a file
            continue
        if (held.st_dev, held.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
    return False


def _eviction_asides(spool: Spool) -> Iterator[tuple[str, int]]:
    """(relative path, pid) of each ``*.dcm.evicting-<pid>`` in the spool (``tmp`` and
    ``quarantine`` excluded)."""
    for directory, subdirectories, names in os.walk(spool.root):
        if Path(directory) == spool.root:
            subdirectories[:] = [d for d in subdirectories if d not in ("tmp", QUARANTINE_DIR)]
        for name in names:
            stem, mark, pid = name.rpartition(EVICTING_ASIDE)
            if mark and stem.endswith(".dcm") and pid.isdigit():
                yield os.path.relpath(os.path.join(directory, name), spool.root), int(pid)


def set_pin(db: Database, study_uid: str, until: float | None) -> bool:
    """Pin a study until ``until`` (epoch seconds), or unpin it with None. False if unknown."""
    with db.transaction() as conn:
        cursor = conn.execute("UPDATE studies SET pinned_until = ? WHERE study_uid = ?",
                              (until, study_uid))
        return cursor.rowcount == 1


def study_state(db: Database, study_uid: str) -> dict[str, Any] | None:
    row = db.query_one(
        """SELECT s.study_uid, s.pinned_until, s.last_received_at, s.last_accessed_at,
                  count(i.id) AS instances, coalesce(sum(i.size), 0) AS bytes,
                  coalesce(sum(i.confirmed_at IS NOT NULL), 0) AS confirmed
           FROM studies s LEFT JOIN instances i ON i.study_fk = s.id
           WHERE s.study_uid = ? GROUP BY s.id""",
        (study_uid,),
    )
    return dict(row) if row else None


def disk_usage(spool: Spool, db: Database, quota_bytes: int) -> tuple[int, int]:
    """(used, capacity) in bytes: the spool against its quota when one is set, else the
    spool's file system."""
    if quota_bytes:
        return index.spool_bytes(db), quota_bytes
    # The spool's file system; a read-only command may meet a home without a spool yet.
    usage = shutil.disk_usage(next(p for p in (spool.root, *spool.root.parents) if p.exists()))
    return usage.total - usage.free, usage.total


def is_locked_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def file_size(spool: Spool, relative: str) -> int | None:
    try:
        return (spool.root / relative).stat().st_size
    except FileNotFoundError:
        return None


def open_spool_file(spool: Spool, relative: str) -> Path:
    return spool.root / relative


# --- wall-clock steps ---------------------------------------------------------------------------


def shift_for_clock_step(db: Database, step: float,
                         written_before: float | None = None) -> dict[str, int]:
    """Re-base the stored wall-clock deadlines after the clock stepped by ``step`` seconds.

    Deadlines written before a step keep their *remaining* time: a backward step would
    otherwise postpone every retry and every stability check by the size of the step (hours,
    after a bad NTP source is corrected), a forward step would expire every running lease at
    once (another worker would take a job still being sent). Studies still waiting to be
    routed keep their quiet period. ``written_before`` (forward steps) leaves alone rows
    already written on the new clock (``updated_at``/``last_received_at`` at or after it).
    One transaction.
    """
    at = now()
    cut = written_before if written_before is not None else float("inf")
    with db.transaction() as conn:
        pending = conn.execute(
            "UPDATE jobs SET next_attempt_at = next_attempt_at + ? WHERE state = 'pending' "
            "AND updated_at < ?", (step, cut)).rowcount
        leases = conn.execute(
            "UPDATE jobs SET lease_until = lease_until + ? WHERE state = 'running' "
            "AND lease_until IS NOT NULL AND updated_at < ?", (step, cut)).rowcount
        if step < 0:  # written on the old clock, now in the future
            studies = conn.execute(
                "UPDATE studies SET last_received_at = last_received_at + ? "
                "WHERE last_received_at > ?", (step, at)).rowcount
        else:  # waiting to be routed: keep the quiet period they had left
            studies = conn.execute(
                "UPDATE studies SET last_received_at = last_received_at + ? "
                "WHERE last_received_at < ? AND id IN "
                "(SELECT DISTINCT study_fk FROM instances WHERE routed_at IS NULL)",
                (step, cut)).rowcount
    return {"pending_jobs": pending, "leases": leases, "studies": studies}


def health(db: Database) -> dict[str, Any]:
    """What ``pas status``, the status page and the heartbeat show of the cache's health:
    open integrity issues by kind (``evicting`` is bookkeeping, not a problem) and whether
    the disk alert is raised (the latest ``alert`` audit row, so every process sees it)."""
    issues: dict[str, int] = {}
    for row in db.query("SELECT kind, count(*) AS n FROM integrity_issues "
                        "WHERE resolved_at IS NULL AND kind != 'evicting' GROUP BY kind"):
        issues[row["kind"]] = int(row["n"])
    alert = db.query_one("SELECT at, outcome, detail FROM audit WHERE event = 'alert' "
                         "ORDER BY id DESC LIMIT 1")
    raised = alert is not None and alert["outcome"] != "success"
    return {"integrity_issues": issues, "disk_alert": alert["detail"] if raised else None,
            "disk_alert_since": alert["at"] if raised else None}


def instance_identity(db: Database, instance_id: int) -> tuple[str, str, str] | None:
    """(study, series, SOP Instance UID) of an instance row: what a region fetch needs."""
    row = db.query_one(
        """SELECT s.study_uid, se.series_uid, i.sop_instance_uid FROM instances i
           JOIN series se ON se.id = i.series_fk JOIN studies s ON s.id = i.study_fk
           WHERE i.id = ?""", (instance_id,))
    return (row["study_uid"], row["series_uid"], row["sop_instance_uid"]) if row else None
