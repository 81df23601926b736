"""Cache lifecycle storage: integrity flags, stale leases, scrub position, eviction, pinning.

Owns: the SQL (and the few spool file moves) behind start-up recovery, ``pas verify``, the
background scrub and the disk policy of :mod:`appliance.ops.recovery` and
:mod:`appliance.ops.cache_policy`. May not touch: the network, or policy decisions (which
study to evict and when is decided by the caller; this module only refuses what would break
invariant 2 unless the operator forces it).

Eviction itself (rows, then files, and what a crash leaves of it) is in
:mod:`appliance.store.eviction`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.store import audit, index
from appliance.store import prefetch as prefetch_store
from appliance.store.commitment import shift_for_clock_step_in
from appliance.store.db import Database, now
from appliance.store.jobs import WORKER_DIED, keeping_earlier
from appliance.store.spool import Spool, fsync_dir

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


def is_indexed(db: Database, path: str) -> bool:
    """Whether a row names ``path`` now: a file :func:`reconcile` gave as unindexed may have
    been an instance in flight (the spool writes its file, then the index commits its row)."""
    return db.query_one("SELECT 1 FROM instances WHERE path = ? LIMIT 1", (path,)) is not None


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


def spool_file_count(spool: Spool) -> int:
    """How many files the spool keeps (what a re-index would adopt), walked as reconcile
    walks it."""
    return sum(1 for _ in _spool_sorted(spool)) if spool.root.is_dir() else 0


# --- integrity flags -------------------------------------------------------------------------


class OrphansByAge:
    """Orphans the walk found, kept in a temporary table of this thread's connection (on
    disk, not in memory: a whole spool is orphans after ``pas cache rebuild-index``) and
    handed back oldest file first. Adopted in the order they were written, they are indexed
    as they were received: the last version of an instance serves, and a study's patient
    and description are those of its last instance, as before the index was lost (in name
    order an original adopted after its correction undid it)."""

    def __init__(self, db: Database):
        self.db = db
        self.conn = db.connection()
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS orphans_found "
                          "(written_at REAL NOT NULL, path TEXT NOT NULL)")
        # Each page a range of this index, not a sort of every orphan (millions of them).
        self.conn.execute("CREATE INDEX IF NOT EXISTS temp.orphans_found_order "
                          "ON orphans_found (written_at, path)")
        self.conn.execute("DELETE FROM temp.orphans_found")
        self.count = 0

    def add(self, spool: Spool, relative: str) -> None:
        try:
            written_at = (spool.root / relative).stat().st_mtime
        except FileNotFoundError:
            return  # gone since the walk saw it (nothing to adopt)
        self.conn.execute("INSERT INTO temp.orphans_found VALUES (?, ?)", (written_at, relative))
        self.count += 1

    def oldest_first(self, page: int = 1000) -> Iterator[tuple[str, float]]:
        """``(path, written_at)``, a page at a time (the caller writes between pages)."""
        after: tuple[float, str] = (float("-inf"), "")
        while True:
            rows = self.conn.execute(
                "SELECT written_at, path FROM temp.orphans_found "
                "WHERE (written_at, path) > (?, ?) ORDER BY written_at, path LIMIT ?",
                (*after, page)).fetchall()
            if not rows:
                break
            for row in rows:
                yield row[1], row[0]
            after = (rows[-1][0], rows[-1][1])

    def close(self) -> None:
        self.conn.execute("DROP TABLE IF EXISTS temp.orphans_found")


def flag_issue(db: Database, kind: str, path: str, instance_id: int | None,
               detail: str) -> bool:
    """Record a problem once: an identical open flag is not duplicated. True if new.

    A new flag's ``integrity`` audit row is written in the same transaction: written after
    it, a crash in between left the flag open with no row, and no later pass would write one
    (the flag is not new any more)."""
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
        audit.record_in(conn, "integrity", actor="system", outcome=f"failure: {kind}",
                        target=path, detail=detail)
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


def resolve_restored(db: Database, path: str, sop_instance_uid: str, detail: str) -> int:
    """An instance's file restored from the region (``pas verify --repair``): its
    ``missing``/``size_mismatch``/``hash_mismatch`` flags resolved and the ``repair`` audit
    row written, one transaction (a crash between the two left a repair without its row, or
    a row for a flag still open). Returns how many flags were resolved."""
    with db.transaction() as conn:
        cursor = conn.execute(
            "UPDATE integrity_issues SET resolved_at = ?, resolution = ? WHERE path = ? "
            "AND resolved_at IS NULL AND kind IN ('missing', 'size_mismatch', 'hash_mismatch')",
            (now(), "restored from the region", path))
        audit.record_in(conn, "repair", actor="operator", target=sop_instance_uid,
                        detail=detail)
        return cursor.rowcount


def resolve_unindexed(db: Database, kinds: tuple[str, ...], resolution: str) -> int:
    """Resolve the open flags of these kinds on paths no instance row names any more (the
    study was evicted or purged since): nothing is left to repair or to find whole again,
    so no later pass would ever resolve them. Returns how many."""
    with db.transaction() as conn:
        return conn.execute(
            f"UPDATE integrity_issues SET resolved_at = ?, resolution = ? "
            f"WHERE resolved_at IS NULL AND kind IN ({','.join('?' * len(kinds))}) "
            f"AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.path = integrity_issues.path)",
            (now(), resolution, *kinds)).rowcount


def study_files_missing(db: Database, study_uid: str) -> list[sqlite3.Row]:
    """The current instances of a study whose file is flagged ``missing`` (an open flag):
    ``id``, ``sop_instance_uid``, ``path``, ``confirmed_at``. After a lost disk and a
    restored index every row is such a one: fetch-through counts them as not on site (the
    region holds the confirmed ones) instead of serving a file that is not there. The flag
    is looked up by its path, all three columns of ``integrity_open``: one probe per row,
    however many flags are open."""
    return db.query(
        "SELECT i.id, i.sop_instance_uid, i.path, i.confirmed_at FROM instances i "
        "JOIN studies s ON s.id = i.study_fk WHERE s.study_uid = ? AND i.is_current = 1 "
        "AND EXISTS (SELECT 1 FROM integrity_issues x WHERE x.resolved_at IS NULL "
        "AND x.kind = 'missing' AND x.path = i.path)", (study_uid,))


def any_file_missing(db: Database) -> bool:
    """Whether any file is flagged ``missing`` and not resolved: nearly never (a lost disk, a
    file removed by hand), so a retrieve looks at its instances' files only then (one probe
    of ``integrity_open``)."""
    return db.query_one("SELECT 1 FROM integrity_issues WHERE resolved_at IS NULL "
                        "AND kind = 'missing' LIMIT 1") is not None


def files_missing_count(db: Database) -> int:
    """How many files are flagged ``missing`` and not resolved (``pas_spool_files_missing``):
    read at every scrape, so counted on ``integrity_open`` alone, the open flags' range of
    the index (no row of ``instances`` read). Measured: 0.07 s with a million open flags (a
    whole disk lost under a million-instance index), nothing with none. Their bytes are not
    counted here: the size is on the instance row, one probe per flag (0.5 s for a
    million)."""
    row = db.query_one("SELECT count(*) AS n FROM integrity_issues WHERE resolved_at IS NULL "
                       "AND kind = 'missing'")
    return int(row["n"]) if row is not None else 0


def files_damaged_count(db: Database) -> int:
    """How many files are flagged damaged (``size_mismatch``, ``hash_mismatch``: their bytes
    are no longer what was received) and not resolved (``pas_spool_files_damaged``), counted
    as :func:`files_missing_count` counts the missing ones."""
    row = db.query_one("SELECT count(*) AS n FROM integrity_issues WHERE resolved_at IS NULL "
                       "AND kind IN ('size_mismatch', 'hash_mismatch')")
    return int(row["n"]) if row is not None else 0


def job_files_missing(db: Database, job_id: int) -> list[sqlite3.Row]:
    """:func:`study_files_missing` for the current instances a job still has to send (not
    marked sent): a job carries its study's delta only, and an instance another job already
    delivered is no concern of this one's."""
    return db.query(
        "SELECT i.id, i.sop_instance_uid, i.path, i.confirmed_at FROM job_instances ji "
        "JOIN instances i ON i.id = ji.instance_fk WHERE ji.job_id = ? "
        "AND ji.sent_at IS NULL AND i.is_current = 1 "
        "AND EXISTS (SELECT 1 FROM integrity_issues x WHERE x.resolved_at IS NULL "
        "AND x.kind = 'missing' AND x.path = i.path)", (job_id,))


def files_still_missing(db: Database, spool: Spool, study_uid: str,
                        resolution: str = "file present again") -> list[sqlite3.Row]:
    """:func:`study_files_missing`, less those whose file is back in the spool (the same
    bytes sent again, or fetched from the region: content-addressed, they land under the
    name the row gives), whose flags are resolved here with ``resolution``. Left open, a
    file sent again was still taken for lost until the next ``pas verify`` or start."""
    return _still_missing(db, spool, study_files_missing(db, study_uid), resolution)


def job_files_still_missing(db: Database, spool: Spool, job_id: int,
                            resolution: str = "file present again") -> list[sqlite3.Row]:
    """:func:`job_files_missing`, less those whose file is back (as
    :func:`files_still_missing`)."""
    return _still_missing(db, spool, job_files_missing(db, job_id), resolution)


def _still_missing(db: Database, spool: Spool, rows: list[sqlite3.Row],
                   resolution: str) -> list[sqlite3.Row]:
    still = []
    for row in rows:
        if spool.path(row["path"]).is_file():
            resolve_issues(db, row["path"], resolution, ("missing",))
        else:
            still.append(row)
    return still


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


FileIdentity = tuple[int, int]  # (st_dev, st_ino)
QUARANTINE_ASIDE = ".setting-aside-"  # quarantine/<name>.setting-aside-<pid>: being looked at


def quarantine(spool: Spool, relative: str, identity: FileIdentity | None = None) -> str | None:
    """Move a damaged or unexplained file aside (never delete it): returns its new path.

    ``identity``: the file found damaged (``fstat`` of the descriptor it was hashed
    through). Only that very file is moved; None is returned, and nothing moved, when the
    name holds another by now: a receive of the same bytes (a modality's re-send, answered
    success) renames a new, good copy into place, and the scrub that had hashed the damaged
    one for seconds moved that good copy to the quarantine and flagged its row missing
    (found in review, 2026-12-07). The file is first renamed into the quarantine folder
    under a name of its own (atomic), so the look and the move are about the same inode
    (as eviction's ``_unlink_if_same``); another one is put back, unless a newer copy
    holds the name already (the same bytes, content-addressed: either will do). A crash
    in between leaves the file in the quarantine folder under that name: set aside, never
    deleted; its row is found missing by the next check."""
    source = spool.root / relative
    target = spool.root / QUARANTINE_DIR / relative.replace("/", "_")
    target.parent.mkdir(parents=True, exist_ok=True)
    if identity is None:
        os.replace(source, target)
        return str(target.relative_to(spool.root))
    aside = target.with_name(f"{target.name}{QUARANTINE_ASIDE}{os.getpid()}")
    os.rename(source, aside)  # FileNotFoundError: gone meanwhile, nothing moved
    st = os.stat(aside)
    if (st.st_dev, st.st_ino) == identity:
        os.replace(aside, target)
        return str(target.relative_to(spool.root))
    with contextlib.suppress(FileExistsError):  # back under its name, not over a newer copy
        os.link(aside, source)
    os.unlink(aside)
    if spool.fsync:
        fsync_dir(source.parent)
    return None


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
                   last_error = {keeping_earlier(
                       f"'{WORKER_DIED} (the daemon stopped during attempt ' || attempts || ')'")},
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


# What "pinned until unpinned" is stored as (SQLite REAL compares it as expected).
PINNED_FOR_EVER = 1e18


def pin_words(until: float) -> str:
    """A pin's end as the operator and the trail read it: "until unpinned", or its UTC date
    and time (the trail is read elsewhere too: the ATNA repository, the fleet's ops)."""
    if until >= PINNED_FOR_EVER:
        return "until unpinned"
    return "until " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(until))


@dataclass(frozen=True)
class PinChange:
    """A pin set or lifted: the pin the study had before (``pinned_until``, None or in the
    past: none), for the operator to see what changed (a timed pin over a permanent one
    shortened it without a word)."""

    before: float | None
    after: float | None  # the pin set (None: lifted)
    at: float

    @property
    def was_pinned(self) -> bool:
        return self.before is not None and self.before >= self.at


def set_pin(db: Database, study_uid: str, until: float | None, *, actor: str,
            detail: str | None = None) -> PinChange | None:
    """Pin a study until ``until`` (epoch seconds), or unpin it with None. None if unknown.

    The operator's ``pin``/``unpin`` audit row (by ``actor``, a failure for an unknown study)
    is written in the same transaction, so the trail shows every pin the index holds. A pin
    or unpin that changes nothing (the same pin again, an unpin of a study not pinned, or
    whose pin ran out) writes no row and leaves the study as it is: each wrote a "success"
    row, pin changes the trail showed and that never happened."""
    at = now()
    change = None
    with db.transaction() as conn:
        row = conn.execute("SELECT pinned_until FROM studies WHERE study_uid = ?",
                           (study_uid,)).fetchone()
        if row is not None:
            change = PinChange(row["pinned_until"], until, at)
            if (change.before if change.was_pinned else None) == until:
                return change  # nothing changed: no row
            conn.execute("UPDATE studies SET pinned_until = ? WHERE study_uid = ?",
                         (until, study_uid))
        audit.record_in(conn, "pin" if until is not None else "unpin", actor=actor,
                        target=study_uid,
                        outcome="success" if row is not None else "failure: unknown study",
                        detail=detail)
        return change


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


def shift_for_clock_step(db: Database, step: float, written_before: float | None = None,
                         prefetch_lead_s: float | None = None) -> dict[str, int]:
    """Re-base the stored wall-clock deadlines after the clock stepped by ``step`` seconds.

    Deadlines written before a step keep their *remaining* time: a backward step would
    otherwise postpone every retry, every stability check and every prefetch by the size of
    the step (hours, after a bad NTP source is corrected), a forward step would expire every
    running lease at once (another worker would take a job still being sent). Studies still
    waiting to be routed keep their quiet period. ``written_before`` (forward steps) leaves
    alone rows already written on the new clock (``updated_at``/``last_received_at`` at or
    after it). Prefetch requests: :func:`appliance.store.prefetch.shift_for_clock_step_in`
    (``prefetch_lead_s``: ``prefetch.lead_time_h`` in seconds, to tell a due time anchored to
    the exam's time from one that was "now").

    Running leases, by direction (``at``: now on the new clock, read once this transaction
    holds the write lock, so that every lease already committed was written at or before it):

    - forward: a lease written on the old clock is in the past of the new one by the step
      (taken at once by another worker) and moves; one claimed or renewed on the new clock
      between the step and its detection (at most the watch's 0.5 s) is past the midpoint
      ``written_before`` and stays. Claims and renewals stamp ``updated_at``
      (:func:`appliance.store.jobs.renew_lease`): a renewal left it from the claim, and that
      renewed lease was pushed on by the step as well.
    - back: every row written on the old clock looks in the future, so there is no cut
      (``written_before`` None). But a lease claimed or renewed on the new clock in that same
      window holds ``new now + lease_s``: moved back by the step it lay hours in the past,
      and another worker took the job while it was being sent. A lease written on the new
      clock ends at most ``lease_s`` after ``at``; one written on the old clock during the
      last renewal period (``lease_s / 3``) ends about ``step`` more than that. So only leases
      with ``lease_until > at + lease_s`` move, each with its own ``lease_s``: since a claim
      and a renewal write ``lease_until = t + lease_s`` with ``updated_at = t`` (a later
      write, progress, only raises ``updated_at``), that is ``updated_at > at``: last
      written at a time the new clock has not shown yet, hence on the old clock. A lease
      last written on the old clock at or before ``at`` (a step back no longer than
      the time since its renewal) is left: it then ends at most ``lease_s`` after ``at``,
      as a fresh lease does, so it is held at most the step longer (a live worker renews it
      anyway; a dead one's job waits at most ``lease_s``), and never taken early.

    A shifted row's ``updated_at`` moves with it (as commitment reports' do), so that a
    second step soon after compares it on the clock its deadline is now on. One transaction,
    with its ``clock`` audit row (a crash between the two left the deadlines re-based and no
    row: the next start does not see that step again).
    """
    cut = written_before if written_before is not None else float("inf")
    with db.transaction() as conn:
        at = now()  # after BEGIN IMMEDIATE: no lease committed later than this is seen
        pending = conn.execute(
            "UPDATE jobs SET next_attempt_at = next_attempt_at + ?, updated_at = updated_at + ? "
            "WHERE state = 'pending' AND updated_at < ?", (step, step, cut)).rowcount
        # Back: only leases last written on the old clock (see above); forward: before the cut.
        lease_cut = at if step < 0 else float("-inf")
        leases = conn.execute(
            "UPDATE jobs SET lease_until = lease_until + ?, updated_at = updated_at + ? "
            "WHERE state = 'running' AND lease_until IS NOT NULL AND updated_at < ? "
            "AND updated_at > ?", (step, step, cut, lease_cut)).rowcount
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
        reports = shift_for_clock_step_in(conn, step, cut)
        prefetches = prefetch_store.shift_for_clock_step_in(conn, step, cut, prefetch_lead_s)
        shifted = {"pending_jobs": pending, "leases": leases, "studies": studies,
                   "commitment_reports": reports, "prefetch_requests": prefetches}
        audit.record_in(conn, "clock", actor="system", outcome="success",
                        detail=f"wall clock stepped by {step:+.1f} s; re-based {shifted}")
    return shifted


def health(db: Database) -> dict[str, Any]:
    """What ``pas status``, the status page and the heartbeat show of the cache's health:
    open integrity issues by kind (``evicting`` is bookkeeping, not a problem) and whether
    the disk alert is raised (the latest ``alert`` audit row, so every process sees it)."""
    issues: dict[str, int] = {}
    for row in db.query("SELECT kind, count(*) AS n FROM integrity_issues "
                        "WHERE resolved_at IS NULL AND kind != 'evicting' GROUP BY kind"):
        issues[row["kind"]] = int(row["n"])
    alert = raised_disk_alert(db)
    return {"integrity_issues": issues, "disk_alert": alert["detail"] if alert else None,
            "disk_alert_since": alert["at"] if alert else None}


def raised_disk_alert(db: Database) -> dict[str, Any] | None:
    """The disk alert's latest audit row (``at``, ``detail``) while it is raised, else None:
    the one read its readers need (the cache policy at start, ``/metrics`` at each scrape,
    ``pas doctor``), without :func:`health`'s count of the integrity issues."""
    alert = db.query_one("SELECT at, outcome, detail FROM audit WHERE event = 'alert' "
                         "ORDER BY id DESC LIMIT 1")
    return dict(alert) if alert is not None and alert["outcome"] != "success" else None


def still_indexed(db: Database, instance_id: int) -> bool:
    """Whether an instance row is still there (the scrub read it a batch ago)."""
    return db.query_one("SELECT 1 FROM instances WHERE id = ?", (instance_id,)) is not None


def instance_identity(db: Database, instance_id: int) -> tuple[str, str, str] | None:
    """(study, series, SOP Instance UID) of an instance row: what a region fetch needs."""
    row = db.query_one(
        """SELECT s.study_uid, se.series_uid, i.sop_instance_uid FROM instances i
           JOIN series se ON se.id = i.series_fk JOIN studies s ON s.id = i.study_fk
           WHERE i.id = ?""", (instance_id,))
    return (row["study_uid"], row["series_uid"], row["sop_instance_uid"]) if row else None
