"""Eviction's storage side: which studies may go, deleting their rows and then their files,
and settling at start-up what a crash left half-unlinked.

Owns: the SQL and the file moves of evicting a study (:func:`evict_study`,
:func:`delete_evicted_files`) and the sweep of ``<name>.dcm.evicting-<pid>`` leftovers
(:func:`sweep_eviction_leftovers`). May not touch: the policy (which study, when: decided by
:mod:`appliance.ops.cache_policy`), or any file a row still names: invariant 2 (nothing deleted
before the region confirmed it) is refused here unless the operator forces it.

Why eviction is journalled: rows are deleted in one transaction, files after the commit. A
crash in between would leave files without rows, which start-up recovery adopts back into
the index (an orphan usually means a commit was lost). So the eviction transaction also
writes one ``evicting`` integrity row per file (:mod:`appliance.store.cache`); recovery
deletes an orphan that has one, and adopts any other. The unlink itself goes through a name
aside (``<name>.evicting-<pid>``); what a crash leaves under that name is settled at start-up
by :func:`sweep_eviction_leftovers`. Split from cache.py (which keeps the integrity flags,
leases, scrub and pinning) to keep each under ~600 lines.

Why the ``delete`` audit row is written in that same first transaction, not after the files
are gone: a deletion the trail does not show is what health-data hosting forbids, and the
study leaves the index at that commit. After a crash at any instant the trail and the index
agree: before the commit, the study is indexed, its files untouched and no row says it was
deleted; from the commit on, the rows are gone and the ``delete`` row is there, and what the
crash cut short of the file deletion is finished at the next start (journalled as above).
The row used to be written by the caller in a transaction of its own once the files were
gone: a crash in between (the unlinks of a large study take a while) left a study gone
from the index with no ``delete`` row, for ever.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.locks import reading_since
from appliance.store import audit, index
from appliance.store.cache import QUARANTINE_DIR
from appliance.store.db import Database, now
from appliance.store.readers import live_readers
from appliance.store.spool import Spool, fsync_dir, process_alive
from appliance.words import counted


@dataclass(frozen=True)
class EvictionCandidate:
    study_uid: str
    bytes: int
    instances: int
    last_used_at: float


# An instance row the region does not hold yet, for the cache's own choices (invariant 2):
# - not routed: a delta the study's stability has not handed to routing. A receipt can
#   confirm it before (the bytes of an older job: A, then B, then A again, and A's receipt
#   arrives), but the sender's last word has not gone up yet; evicted now, it never would;
# - not confirmed, unless it is a superseded version whose instance's current version is
#   confirmed: a version the sender replaced never travels once its replacement is routed
#   (routing sends the current one only), so no receipt would ever come for it, and its
#   study stayed in the cache for good. The region holds the sender's last word.
_NOT_YET_HELD = """(u.routed_at IS NULL OR (u.confirmed_at IS NULL AND NOT (
    u.is_current = 0 AND EXISTS (SELECT 1 FROM instances c
                                 WHERE c.sop_instance_uid = u.sop_instance_uid
                                   AND c.is_current = 1 AND c.confirmed_at IS NOT NULL))))"""


def eviction_candidates(db: Database, received_before: float,
                        limit: int = 100) -> list[EvictionCandidate]:
    """Studies the cache may drop on its own, least recently used first.

    All of: every instance row held at the region (:data:`_NOT_YET_HELD`, invariant 2); not
    pinned (or the pin expired); no job still pending or running for it; last received
    before ``received_before`` (the minimum retention).

    A study whose delivery to a local node failed comes after every other, whatever its
    last use: its job goes with it (the node never gets the study from this cache, and the
    failed-jobs signals forget it), so it is the last resort, not the first LRU pick.
    """
    at = now()
    rows = db.query(
        f"""SELECT s.study_uid, coalesce(s.last_accessed_at, s.last_received_at) AS used_at,
                  count(i.id) AS n, coalesce(sum(i.size), 0) AS bytes
           FROM studies s JOIN instances i ON i.study_fk = s.id
           WHERE (s.pinned_until IS NULL OR s.pinned_until < ?)
             AND s.last_received_at < ?
             AND NOT EXISTS (SELECT 1 FROM instances u WHERE u.study_fk = s.id
                             AND {_NOT_YET_HELD})
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_fk = s.id
                             AND j.state IN ('pending', 'running'))
           GROUP BY s.id
           ORDER BY EXISTS (SELECT 1 FROM jobs f WHERE f.study_fk = s.id
                            AND f.state = 'failed'), used_at, s.id LIMIT ?""",
        (at, received_before, limit),
    )
    return [EvictionCandidate(r["study_uid"], int(r["bytes"]), int(r["n"]), r["used_at"])
            for r in rows]


class NotEvictable(Exception):
    """The study may not be dropped (unconfirmed instances, pinned, or unknown)."""


class UnknownStudy(NotEvictable):
    """No such study in the cache: ``--force`` changes nothing to that."""


class BeingRead(NotEvictable):
    """The running daemon's retrieve reads the study (a viewer's C-MOVE, C-GET or WADO-RS):
    deleting it now fails the viewer for every instance it has not received yet."""


@dataclass(frozen=True)
class Evicted:
    study_uid: str
    instances: int
    bytes: int
    unconfirmed: int
    # Whose study it was (the ``delete`` audit row records it; the index no longer can).
    patient_id: str | None = None
    # Failed deliveries dropped with the study, as "destination (job N)".
    failed_jobs: tuple[str, ...] = ()
    # The pin a forced purge overrode (None: not pinned).
    pinned_until: float | None = None


def evict_study(db: Database, spool: Spool, study_uid: str, *, force: bool = False,
                actor: str = "system", reason: str = "evicted",
                hold: Callable[[], Callable[[], None]] | None = None) -> Evicted:
    """Drop a study from the index and the spool, rows first (one transaction), then files.

    Without ``force`` a study with any unconfirmed instance, a live pin or an active job is
    refused: the cache never breaks invariant 2 on its own. So is one the running daemon's
    retrieve reads (:class:`BeingRead`, from its ``study_readers`` rows: the caller may be
    ``pas cache evict`` or ``purge``, in a process of its own). ``force`` is the operator's
    purge.

    The ``delete`` audit row (by ``actor``; its detail ``reason`` and the counts) is part of
    the transaction that deletes the rows (see the module's docstring for why there). A
    refusal writes nothing: the caller records it if it wants to (nothing changed).

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
    transactions meanwhile. The receive path closes that: it checks its file inside its own
    commit's transaction, right after its row (``ingest.receive.GroupCommit``), and writes
    it again (or fails, rolled back) before the COMMIT.

    ``hold`` is called inside the transaction, the write lock held, before anything is
    deleted: it may refuse (raise: nothing changed) and returns what ends the hold, called
    once the transaction is over (committed or not), before the files go. The cache policy
    holds the study's readers there (:class:`appliance.locks.StudyReaders`): taken with the
    write lock already held, never the other way round (a retrieve registering never holds
    the write lock), and given back before the unlinks of a large study.
    """
    at = now()
    # The files as they are before any row goes (see above); rows that arrive before the
    # transaction below are looked at there.
    seen = _file_identities(spool, (r["path"] for r in db.query(
        "SELECT i.path FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ?", (study_uid,))))
    # The hold ends after the transaction (the stack exits last), committed or not.
    with contextlib.ExitStack() as held, db.transaction() as conn:
        if hold is not None:
            held.callback(hold())
        study = conn.execute("SELECT s.id, s.pinned_until, s.patient_fk, p.patient_id "
                             "FROM studies s "
                             "JOIN patients p ON p.id = s.patient_fk WHERE s.study_uid = ?",
                             (study_uid,)).fetchone()
        if study is None:
            raise UnknownStudy(f"study {study_uid} is not in the cache")
        rows = conn.execute("SELECT id, path, size, confirmed_at FROM instances "
                            "WHERE study_fk = ?", (study["id"],)).fetchall()
        unconfirmed = sum(1 for r in rows if r["confirmed_at"] is None)
        # (not confirmed, or excused; confirmed but received again since it was routed)
        not_held = conn.execute(
            "SELECT coalesce(sum(u.confirmed_at IS NULL), 0), "
            "coalesce(sum(u.confirmed_at IS NOT NULL), 0) "
            f"FROM instances u WHERE u.study_fk = ? AND {_NOT_YET_HELD}",
            (study["id"],)).fetchone()
        readers = live_readers(conn, study_uid)
        being_read = (f"being read by the running daemon (pid {readers[0].pid}): " + "; ".join(
            reading_since(r.reader, r.since) for r in readers)) if readers else ""
        if force and readers:  # the trail says whose retrieve the operator cut short
            reason = f"{reason}, while {being_read}"
        pinned_until = study["pinned_until"] if (study["pinned_until"] is not None
                                                 and study["pinned_until"] >= at) else None
        if force and pinned_until is not None:  # and that it was kept on purpose
            from appliance.store.cache import pin_words

            reason = f"{reason}, while pinned {pin_words(pinned_until)}"
        if not force:
            if readers:
                raise BeingRead(f"study {study_uid} is {being_read}")
            if not_held[0]:
                raise NotEvictable(f"study {study_uid}: {counted(not_held[0], 'instance')} not "
                                   "confirmed at the region")
            if not_held[1]:
                raise NotEvictable(f"study {study_uid}: {counted(not_held[1], 'instance')} "
                                   "received again since the study was routed, not sent yet")
            if study["pinned_until"] is not None and study["pinned_until"] >= at:
                raise NotEvictable(f"study {study_uid} is pinned")
            active = conn.execute("SELECT count(*) FROM jobs WHERE study_fk = ? AND state IN "
                                  "('pending', 'running')", (study["id"],)).fetchone()[0]
            if active:
                raise NotEvictable(f"study {study_uid}: {counted(active, 'job')} still to run")
        failed_jobs = tuple(f"{j['destination']} (job {j['id']})" for j in conn.execute(
            "SELECT id, destination FROM jobs WHERE study_fk = ? AND state = 'failed' "
            "ORDER BY id", (study["id"],)))
        ids = [r["id"] for r in rows]
        marks = ",".join("?" * len(ids))
        if ids:
            conn.execute(f"DELETE FROM job_instances WHERE instance_fk IN ({marks})", ids)
        conn.execute("DELETE FROM job_instances WHERE job_id IN "
                     "(SELECT id FROM jobs WHERE study_fk = ?)", (study["id"],))
        conn.execute("DELETE FROM jobs WHERE study_fk = ?", (study["id"],))
        if ids:
            conn.execute(f"DELETE FROM instances WHERE id IN ({marks})", ids)
        _drop_series(conn, int(study["id"]))
        conn.execute("DELETE FROM studies WHERE id = ?", (study["id"],))
        index.forget_patient_if_unused(conn, int(study["patient_fk"]))
        paths = sorted({r["path"] for r in rows})
        still_used = _paths_in_use(conn, paths)
        doomed = [p for p in paths if p not in still_used]
        seen.update(_file_identities(spool, (p for p in doomed if p not in seen)))
        conn.executemany(
            "INSERT INTO integrity_issues (found_at, kind, path, detail) "
            "VALUES (?, 'evicting', ?, ?)",
            [(at, p, f"study {study_uid}") for p in doomed],
        )
        evicted = Evicted(study_uid, len(rows), sum(int(r["size"]) for r in rows), unconfirmed,
                          study["patient_id"], failed_jobs, pinned_until)
        audit.record_in(conn, "delete", actor=actor, target=study_uid,
                        patient=evicted.patient_id, detail=_deleted(reason, evicted, force))
    delete_evicted_files(db, spool, {p: seen[p] for p in doomed})
    return evicted


def _drop_series(conn: sqlite3.Connection, study_fk: int) -> None:
    """Delete the series rows of a study whose instance rows are gone, in the eviction's
    transaction: only rows no instance names any more.

    A row of the study that instance rows of another study still name (filed so before
    schema migration 26 gave each study its own row of a series UID, by a correction moving
    an instance to another study under the same series) is not deleted from under them:
    those instances get a row of their own study first (a copy of this one, or the row
    that study already holds). Deleting it failed on a foreign key, and since the cache
    policy evicts the empty old study first, every eviction pass failed and the disk
    filled. Whatever still names one of its rows after that makes the study's own delete
    fail (``sqlite3.IntegrityError``, nothing changed), which the cache policy skips."""
    named = conn.execute(
        "SELECT DISTINCT se.id, se.series_uid, i.study_fk FROM series se "
        "JOIN instances i ON i.series_fk = se.id WHERE se.study_fk = ? "
        "AND i.study_fk != se.study_fk", (study_fk,)).fetchall()
    for series_id, series_uid, other_study in named:
        own = conn.execute("SELECT id FROM series WHERE series_uid = ? AND study_fk = ?",
                           (series_uid, other_study)).fetchone()
        own_id = own[0] if own is not None else conn.execute(
            "INSERT INTO series (series_uid, study_fk, series_number, modality, description, "
            "body_part) SELECT series_uid, ?, series_number, modality, description, "
            "body_part FROM series WHERE id = ?", (other_study, series_id)).lastrowid
        conn.execute("UPDATE instances SET series_fk = ? WHERE series_fk = ? AND study_fk = ?",
                     (own_id, series_id, other_study))
    conn.execute("DELETE FROM series WHERE study_fk = ? AND NOT EXISTS "
                 "(SELECT 1 FROM instances i WHERE i.series_fk = series.id)", (study_fk,))


def _deleted(reason: str, evicted: Evicted, force: bool) -> str:
    """The ``delete`` row's detail: why, and what went (the unconfirmed count when forced:
    what the region may not hold)."""
    unconfirmed = f" ({evicted.unconfirmed} unconfirmed)" if force else ""
    dropped = (f"; its failed delivery to {', '.join(evicted.failed_jobs)} dropped with it"
               if evicted.failed_jobs else "")
    return (f"{reason}: {counted(evicted.instances, 'instance')}{unconfirmed}, "
            f"{counted(evicted.bytes, 'byte')}{dropped}")


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


def finish_evicted_file(db: Database, spool: Spool, relative: str) -> bool:
    """Start-up recovery's end of an eviction a crash (or a live evictor, beside ``pas verify
    --repair``) left with its file in place: unlink it unless a row names the path again,
    and resolve its ``evicting`` flag (``deleted at start-up`` or ``kept``). True: deleted.
    Under the write lock, so no index commit lands between the look at the rows and the
    unlink: the walk that found the orphan read its rows earlier, and a re-send of the same
    bytes committed since (beside a live daemon) lost its file to the unlink."""
    with db.transaction() as conn:
        kept = bool(_paths_in_use(conn, [relative]))
        if not kept:
            (spool.root / relative).unlink(missing_ok=True)
        conn.execute(
            "UPDATE integrity_issues SET resolved_at = ?, resolution = ? "
            "WHERE kind = 'evicting' AND path = ? AND resolved_at IS NULL",
            (now(), "kept" if kept else "deleted at start-up", relative))
    return not kept


# How long an eviction's settled ``evicting`` rows stay: each evicted file leaves one (the
# intent a crash is finished from), so a full cache evicting at its intake rate of, say,
# 5,000 files a day kept ~9 million rows (~2 GB) in five years, in every backup too. The
# ``delete`` audit row of the study stays; these only said which files went.
SETTLED_EVICTIONS_KEPT_DAYS = 30
PRUNE_ROWS_PER_TRANSACTION = 2000  # the write lock is short: C-STOREs commit in between


def prune_settled_evictions(db: Database, before: float) -> int:
    """Forget the ``evicting`` rows settled (deleted, kept) before ``before``; a batch per
    transaction, through migration 23's partial index (an open one is never touched: start-up
    recovery finishes those). Returns how many went."""
    pruned = 0
    while True:
        with db.transaction() as conn:
            gone = conn.execute(
                "DELETE FROM integrity_issues WHERE id IN (SELECT id FROM integrity_issues "
                "INDEXED BY integrity_issues_settled_evictions WHERE kind = 'evicting' "
                "AND resolved_at IS NOT NULL AND resolved_at < ? LIMIT ?)",
                (before, PRUNE_ROWS_PER_TRANSACTION)).rowcount
        pruned += gone
        if gone < PRUNE_ROWS_PER_TRANSACTION:
            return pruned


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
