"""Start-up recovery, ``pas verify``, the rate-limited background scrub, and setting a
damaged index aside (``pas cache rebuild-index``: :func:`set_index_aside`).

Owns: deciding what a mismatch between the spool and the index means and what to do about
it. Nothing is silently dropped: every problem is logged, written to the audit trail and
flagged in ``integrity_issues`` until resolved. May not touch: SQL or spool files directly
(it calls :mod:`appliance.store.cache`, :mod:`appliance.store.spool` and the receive path).

What start-up does, before the DICOM port opens (so nothing races it), in one pass over index
and spool side by side (:func:`appliance.store.cache.reconcile`, bounded memory):

- temp files in ``spool/tmp``: writes that never finished; no sender was told success. Removed.
- ``<name>.dcm.evicting-<pid>`` of a dead process: an eviction's file renamed aside, then a
  crash before its unlink (or its rename back). Renamed back if a row names the path and the
  file is not in place (the same bytes were filed again), else removed
  (:func:`appliance.store.eviction.sweep_eviction_leftovers`).
- a file with no row: its index commit was lost (kill between rename and commit), so no
  sender was told success either, but the bytes are whole (the name is their SHA-256).
  Adopted back into the index through the normal receive path. A file whose content does not
  match its name, or that does not parse, is moved to ``spool/quarantine`` and flagged. An
  orphan left by an interrupted eviction (journalled) is deleted: it was confirmed.
- a row whose file is missing or has another size: flagged (``missing``/``size_mismatch``),
  never deleted; a later re-send of the same bytes restores the file and clears the flag.
- jobs leased by a previous process on this host: released at once (not after the lease);
  never while another process holds the home's lock (a live daemon: ``pas verify --repair``
  runs this beside it, and its workers' leases are live, :func:`_release_leases`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.config import Settings
from appliance.logs import LoopFailures
from appliance.ops import index_check
from appliance.store import audit, eviction
from appliance.store import cache as cache_store
from appliance.store.db import Database
from appliance.store.spool import Spool, SpoolFull
from appliance.words import counted

log = logging.getLogger("pas.recovery")

HASH_CHUNK = 1024 * 1024
# Files found missing or of another size by one walk, flagged in one transaction per this
# many: one each (a commit waiting for the disk, ~1-3 ms) made the start of a home whose
# disk lost 20,000 files last 18 s to a minute, before the DICOM port opened.
FLAG_BATCH = 500


@dataclass
class RecoveryReport:
    temp_files_removed: int = 0
    orphans_adopted: int = 0
    orphans_quarantined: int = 0
    evictions_finished: int = 0
    eviction_leftovers_renamed_back: int = 0
    eviction_leftovers_removed: int = 0
    missing: int = 0
    size_mismatch: int = 0
    leases_released: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class Progress:
    """Tells whoever waits for start-up (systemd) that recovery is still going, and how far:
    at once, then at most every ``every_s``. A rebuilt index makes recovery adopt every file
    of the spool (hours for a large one), past the unit's ``TimeoutStartSec``: systemd then
    killed the start and began again, each time from further on."""

    def __init__(self, tell: Callable[[str], object] | None, every_s: float = 5.0):
        self.tell = tell
        self.every_s = every_s
        self.next_at = 0.0

    def tick(self, what: Callable[[], str]) -> None:
        if self.tell is None or time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.every_s
        self.tell(what())


def _sha256_file(path: Path, throttle: RateLimiter | None = None) -> str:
    return _hash_file(path, throttle)[0]


def _hash_file(path: Path,
               throttle: RateLimiter | None = None) -> tuple[str, cache_store.FileIdentity]:
    """The file's SHA-256 and the identity (st_dev, st_ino) of the very file hashed: by the
    time the hash is known (seconds at the scrub's rate), a receive may have renamed another
    copy into place under the name (see :func:`appliance.store.cache.quarantine`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            if throttle is not None:
                throttle.consume(len(chunk))
    return digest.hexdigest(), (st.st_dev, st.st_ino)


def _name_hash(relative: str) -> str:
    return Path(relative).stem


def startup_recovery(db: Database, spool: Spool, receiver: object | None,
                     host: str | None = None,
                     progress: Callable[[str], object] | None = None,
                     progress_every_s: float = 5.0,
                     in_flight_since: float | None = None,
                     actor: str = "system",
                     release_leases: bool = True) -> RecoveryReport:
    """Reconcile spool and index, then release this host's stale leases. Idempotent.

    ``receiver`` is the ingest :class:`~appliance.ingest.receive.Receiver` used to adopt
    orphans; None leaves orphans flagged instead (``pas verify`` without ``--repair``).
    ``progress``: told where recovery is, at once and then every few seconds
    (:class:`Progress`; the daemon extends systemd's start timeout with it).
    ``in_flight_since``: a daemon receives beside this run (``pas verify --repair``): a file
    without a row written since then may be a receive still filing it, and its row is waited
    for (:func:`_row_arrives`) before it is adopted as an orphan. Adopted first, its row
    had no calling AE (what routing rules match) and its receive found it a duplicate.
    ``release_leases``: False beside a live daemon (``pas verify --repair``); leases are
    kept anyway while another process holds the home's lock (:func:`_release_leases`).
    """
    report = RecoveryReport()
    ticks = Progress(progress, progress_every_s)
    ticks.tick(lambda: "start-up recovery: comparing the spool with the index")
    report.temp_files_removed = spool.remove_temp_files()
    # Before the walk: a file renamed back is in place, not "missing".
    leftovers = eviction.sweep_eviction_leftovers(spool, db)
    for leftover in leftovers:
        log.info("start-up recovery: %s %s (an eviction stopped by a crash left it aside)",
                 leftover.action, leftover.aside)
    report.eviction_leftovers_renamed_back = sum(
        1 for x in leftovers if x.action == "renamed back")
    report.eviction_leftovers_removed = len(leftovers) - report.eviction_leftovers_renamed_back
    if leftovers:
        log.warning("start-up recovery: eviction leftovers: %d renamed back, %d removed",
                    report.eviction_leftovers_renamed_back, report.eviction_leftovers_removed)
    evicting = {i["path"] for i in cache_store.open_issues(db, ("evicting",))}
    flagged = cache_store.open_issue_paths(db, ("missing", "size_mismatch"))
    # One pass over index and spool side by side, in bounded memory (millions of files);
    # orphans adopted after it, oldest first (cache_store.OrphansByAge says why).
    orphans = cache_store.OrphansByAge(db)
    found: list[_Found] = []  # missing and size_mismatch flags, written FLAG_BATCH at a time
    for walked, item in enumerate(cache_store.reconcile(db, spool), start=1):
        relative = item.path
        ticks.tick(lambda walked=walked: f"start-up recovery: {counted(walked, 'file')} "
                                         "compared with the index")
        if item.indexed_size is None and relative in evicting:
            _handle_orphan(db, spool, receiver, relative, True, report)
        elif item.indexed_size is None:
            orphans.add(spool, relative)
        elif item.size_on_disk is None:
            report.missing += 1
            found.append(_Found("missing", relative, item.instance_id,
                                f"indexed file missing ({item.indexed_size} bytes expected)"))
        elif item.size_on_disk != item.indexed_size:
            report.size_mismatch += 1
            found.append(_Found(
                "size_mismatch", relative, item.instance_id,
                f"file has {item.size_on_disk} bytes, the index says {item.indexed_size}"))
        elif relative in flagged:
            cache_store.resolve_issues(db, relative, "file present again",
                                       ("missing", "size_mismatch"))
        if len(found) >= FLAG_BATCH:
            _flag_found(db, found, report)
    _flag_found(db, found, report)
    deadline = time.monotonic() + IN_FLIGHT_S
    try:
        for done, (relative, written_at) in enumerate(orphans.oldest_first()):
            ticks.tick(lambda done=done: f"start-up recovery: indexing files without a row, "
                                         f"{done} of {orphans.count}")
            if in_flight_since is not None and _row_arrives(db, spool, relative,
                                                            in_flight_since, deadline):
                continue  # a receive's, filed meanwhile
            _handle_orphan(db, spool, receiver, relative, False, report, written_at)
    finally:
        orphans.close()
    # Flags on paths no row names any more: the scrub raised "missing" for files an eviction
    # had just deleted with their rows (until 2026-12-05), and nothing ever resolved them.
    stale = cache_store.resolve_unindexed(
        db, ("missing", "size_mismatch", "hash_mismatch"), "no longer indexed (evicted or "
        "purged)")
    if stale:
        log.info("start-up recovery: %s on files no longer indexed resolved",
                 counted(stale, "integrity flag"))
    for relative in evicting:  # eviction finished deleting before the crash
        if cache_store.file_size(spool, relative) is None:
            cache_store.resolve_issues(db, relative, "deleted", ("evicting",))
    report.leases_released = _release_leases(db, host, release_leases)
    summary = {k: v for k, v in report.as_dict().items() if v and k != "problems"}
    if summary:
        found = ", ".join(f"{k}={v}" for k, v in summary.items())
        log.warning("start-up recovery: %s", found)
        audit.record(db, "recovery", actor=actor, outcome="success", detail=found)
    return report


def _release_leases(db: Database, host: str | None, wanted: bool) -> int:
    """Release the jobs leased by a previous process on this host, unless a live daemon
    holds them: ``wanted`` is False (``pas verify --repair`` found one beside it), or
    another process holds the home's lock now (``$PAS_HOME/pas.lock``, beside the index; a
    daemon started while a long verify walked the spool). Its workers' leases name this host
    too, and released they were claimed again at once by a second worker while the first was
    still sending: the destination received the same study twice at once (262 C-STOREs for
    150 instances, 2026-12-07). The daemon releases its dead predecessor's at its own start,
    holding the lock itself."""
    from appliance.ops.home_lock import lock_file
    from appliance.ops.listeners import lock_holder

    holder = lock_holder(lock_file(db.path.parent))
    if not wanted or (holder is not None and holder != os.getpid()):
        log.info("start-up recovery: job leases left as they are (a pas run%s holds this "
                 "home: they are its workers')", f", pid {holder}," if holder else "")
        return 0
    return cache_store.release_host_leases(db, host or os.uname().nodename)


def _handle_orphan(db: Database, spool: Spool, receiver: object | None, relative: str,
                   evicting: bool, report: RecoveryReport,
                   written_at: float | None = None) -> None:
    path = spool.root / relative
    if evicting:
        if eviction.finish_evicted_file(db, spool, relative):  # unless filed again since
            report.evictions_finished += 1
        return
    try:
        digest, identity = _hash_file(path)
    except FileNotFoundError:
        # Gone since the walk saw it (orphans are adopted after the whole walk): beside a
        # live daemon (pas verify --repair), its eviction unlinked it after deleting the
        # rows, or a receive whose commit failed discarded it. Nothing to adopt.
        return
    if digest != _name_hash(relative):
        try:  # only the file hashed: beside a live daemon a receive may have written the
            # right bytes under that name since (and filed them)
            moved = cache_store.quarantine(spool, relative, identity)
        except FileNotFoundError:
            return
        if moved is None:
            return
        report.orphans_quarantined += 1
        _flag(db, "orphan_corrupt", moved, None,
              f"{relative}: content does not match its name; quarantined", report)
        return
    if receiver is None:
        _flag(db, "orphan", relative, None, "file without an index row", report)
        return
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return  # gone meanwhile, as above
    try:
        receiver.receive_file(content, source="recovery",  # type: ignore[attr-defined]
                              received_at=written_at)
    except SpoolFull as exc:  # whole bytes, no room to index them now: leave them, flagged
        _flag(db, "orphan", relative, None, f"not adopted yet: {exc}", report)
        return
    except Exception as exc:  # unparseable or no room: keep it aside, say so
        moved = cache_store.quarantine(spool, relative)
        report.orphans_quarantined += 1
        _flag(db, "orphan_unreadable", moved, None, f"{relative}: {exc}", report)
        return
    report.orphans_adopted += 1
    cache_store.resolve_issues(db, relative, "adopted", ("orphan",))
    log.info("start-up recovery: adopted %s (its index commit had been lost)", relative)


@dataclass(frozen=True)
class _Found:
    """A flag the walk found to raise (its arguments to :func:`_flag`)."""

    kind: str
    relative: str
    instance_id: int | None
    detail: str


def _flag_found(db: Database, found: list[_Found], report: RecoveryReport) -> None:
    """Raise the flags ``found`` in one transaction (each with its audit row, as
    :func:`_flag` does), log the new ones once it committed, and empty the list. A crash
    before the commit loses the batch's flags, which the next start finds again."""
    if not found:
        return
    with db.transaction():
        new = [cache_store.flag_issue(db, f.kind, f.relative, f.instance_id, f.detail)
               for f in found]
    for f, is_new in zip(found, new, strict=True):
        if is_new:
            log.error("integrity: %s %s: %s", f.kind, f.relative, f.detail)
        report.problems.append(f"{f.kind} {f.relative}: {f.detail}")
    found.clear()


def _flag(db: Database, kind: str, relative: str, instance_id: int | None, detail: str,
          report: RecoveryReport | None = None) -> None:
    # A new flag's ``integrity`` audit row commits with it (in the store).
    if cache_store.flag_issue(db, kind, relative, instance_id, detail):
        log.error("integrity: %s %s: %s", kind, relative, detail)
    if report is not None:
        report.problems.append(f"{kind} {relative}: {detail}")


# --- verify and scrub -------------------------------------------------------------------------


class RateLimiter:
    """Token bucket over bytes: the scrub must never starve ingest of disk bandwidth."""

    def __init__(self, bytes_per_s: float, stop: threading.Event | None = None):
        self.bytes_per_s = bytes_per_s
        self.stop = stop
        self._started = time.monotonic()
        self._consumed = 0

    def consume(self, n: int) -> None:
        if self.bytes_per_s <= 0:
            return
        self._consumed += n
        ahead = self._consumed / self.bytes_per_s - (time.monotonic() - self._started)
        if ahead > 0:
            if self.stop is not None:
                self.stop.wait(ahead)
            else:
                time.sleep(ahead)


@dataclass
class VerifyReport:
    files: int = 0
    bytes: int = 0
    ok: int = 0
    missing: int = 0
    hash_mismatch: int = 0
    repaired: int = 0
    restored_from_region: int = 0
    problems: list[str] = field(default_factory=list)


class RegionSource(Protocol):
    """What a repair needs of the region: one instance's original file (transfer/region.py's
    RegionClient through the hub, or a plain DICOMweb root)."""

    def retrieve_instance(self, instance: Any) -> bytes: ...


def restore_from_region(db: Database, spool: Spool, item: cache_store.IndexedFile,
                        region: RegionSource, report: VerifyReport) -> bool:
    """Fetch the region's copy of a missing or damaged instance and put it back, if and only
    if its SHA-256 is the one the index recorded (the region holds the original bytes)."""
    from appliance.transfer.region import RegionInstance

    identity = cache_store.instance_identity(db, item.instance_id)
    if identity is None:
        return False
    try:
        content = region.retrieve_instance(RegionInstance(*identity))
    except Exception as exc:  # the region unreachable or not holding it: stays flagged
        report.problems.append(f"region fetch of {identity[2]} failed: {exc}")
        return False
    digest = hashlib.sha256(content).hexdigest()
    if digest != item.sha256:
        report.problems.append(f"region copy of {identity[2]} differs from the recorded bytes "
                               f"(SHA-256 {digest[:16]}…): not restored")
        return False
    stored, _ = spool.write([content])
    if stored.path != item.path:  # content-addressed: the same bytes land on the same name
        report.problems.append(f"restored {identity[2]} under {stored.path}, not {item.path}")
        return False
    # The flags resolved and the ``repair`` row: one transaction. A crash before it leaves
    # the restored file with its flag open, which the next verify or scrub finds whole and
    # resolves as "verified": never a repair row for a file not restored.
    cache_store.resolve_restored(db, item.path, identity[2],
                                 f"{item.path} restored from the region, SHA-256 verified")
    report.restored_from_region += 1
    return True


def check_file(db: Database, spool: Spool, item: cache_store.IndexedFile, report: VerifyReport,
               throttle: RateLimiter | None = None, repair: bool = False,
               region: RegionSource | None = None, set_aside: bool = False) -> None:
    """Re-hash one indexed file against its row; flag it, and with ``repair`` quarantine a
    damaged copy and, when a ``region`` is given and the region confirmed the instance,
    restore the original bytes from there.

    ``set_aside`` (the daemon's scrub): a damaged copy is quarantined too, and its row
    flagged ``missing`` besides ``hash_mismatch``. Left in place it was served as it was (a
    C-MOVE, C-GET or WADO-RS sent the wrong bytes, a forward to a local node too) until an
    operator ran ``pas verify --repair``, and the modality's re-send was taken for a
    duplicate (a same-size file under its name counts as held). Flagged missing, its study
    is served as one with a lost file: fetched from the region when it confirmed it, else
    the rest with a warning; a re-send writes the right bytes and clears the flag."""
    report.files += 1
    path = spool.root / item.path
    try:
        digest, identity = _hash_file(path, throttle)
    except FileNotFoundError:
        if not cache_store.still_indexed(db, item.instance_id):
            # Its row went since the batch was read (an eviction or a purge deletes the
            # rows, then the files): not damage. Flagged "missing", it stayed open for ever
            # (no row left for a later pass to find the path whole again).
            report.files -= 1
            return
        if repair and region is not None and item.confirmed and restore_from_region(
                db, spool, item, region, report):
            report.repaired += 1
            return
        report.missing += 1
        _flag(db, "missing", item.path, item.instance_id, "indexed file missing")
        report.problems.append(f"missing {item.path} (instance row {item.instance_id}): "
                               f"{_what_to_do(db, item, repair)}")
        return
    report.bytes += item.size
    if digest == item.sha256:
        report.ok += 1
        cache_store.resolve_issues(db, item.path, "verified", ("missing", "size_mismatch",
                                                                "hash_mismatch"))
        return
    found = f"SHA-256 {digest[:16]}… differs from the index {item.sha256[:16]}…"
    detail, moved = found, None
    if repair or set_aside:
        # Moving the damaged copy aside lets a re-send (or a fetch from the region) write
        # the right bytes again: the spool treats an existing same-size file as already held.
        # Only the copy hashed: one a re-send renamed into place meanwhile stays.
        try:
            moved = cache_store.quarantine(spool, item.path, identity)
        except FileNotFoundError:  # evicted, purged or set aside meanwhile: as it is
            moved = None
        else:
            if moved is None:  # rewritten while hashed: not checked here, the next pass does
                log.info("%s was written again (a re-send) while its damaged copy was "
                         "hashed: left in place", item.path)
                report.files -= 1
                report.bytes -= item.size
                return
            detail += f"; damaged copy moved to {moved}"
    report.hash_mismatch += 1
    report.problems.append(f"hash_mismatch {item.path}: {found}; "
                           f"{_what_to_do(db, item, repair)}")
    if repair:
        report.repaired += 1
        if region is not None and item.confirmed and restore_from_region(
                db, spool, item, region, report):
            report.hash_mismatch -= 1
            report.problems.pop()  # repaired: no longer a problem
            return
    _flag(db, "hash_mismatch", item.path, item.instance_id, detail)
    if set_aside and moved is not None:
        _flag(db, "missing", item.path, item.instance_id,
              f"damaged copy set aside by the scrub ({moved}): served as a lost file")


def _what_to_do(db: Database, item: cache_store.IndexedFile, repaired: bool) -> str:
    """Which instance a lost or damaged file is, and what gets it back: a spool path alone
    told IT nothing (which study? the only copy?). The region holds what it confirmed (``pas
    verify --repair`` fetches it, or did when it could); what it never confirmed only the
    modality can send again."""
    identity = cache_store.instance_identity(db, item.instance_id)
    which = (f"instance {identity[2]} of study {identity[0]}" if identity is not None
             else f"instance row {item.instance_id}")
    if item.confirmed:
        return (f"{which}, confirmed by the region: "
                + ("the region could not give it back now; try again" if repaired
                   else "pas verify --repair fetches it back"))
    return (f"{which}, not confirmed by the region (this was its only copy): send the study "
            "again from its modality")


def verify(db: Database, spool: Spool, *, repair: bool = False, receiver: object | None = None,
           bytes_per_s: float = 0, region: RegionSource | None = None,
           beside_daemon: bool = False, actor: str = "operator") -> VerifyReport:
    """Re-hash every indexed file; report orphans too. ``repair`` adopts whole orphans,
    quarantines damaged files, and restores missing or damaged instances the region confirmed
    from the region (``region``), checking each against its recorded SHA-256.
    ``beside_daemon``: a ``pas run`` holds this home, so a file without a row may be a
    receive still under way (:func:`_orphans`), and the running jobs' leases are its
    workers' (never released here: :func:`_release_leases`)."""
    started = time.time()
    in_flight_since = started - IN_FLIGHT_S if beside_daemon else started
    recovery = startup_recovery(
        db, spool, receiver, in_flight_since=in_flight_since, actor=actor,
        release_leases=not beside_daemon) if repair else None
    report = VerifyReport()
    throttle = RateLimiter(bytes_per_s) if bytes_per_s else None
    for item in cache_store.every_indexed_file(db):
        check_file(db, spool, item, report, throttle, repair, region)
    if recovery is not None:
        report.repaired += recovery.orphans_adopted + recovery.orphans_quarantined
        report.problems.extend(recovery.problems)
    else:
        report.problems.extend(f"orphan {path}: file without an index row"
                               for path in _orphans(db, spool, in_flight_since))
    audit.record(db, "verify", actor=actor, outcome="success" if not report.problems
                 else f"failure: {counted(len(report.problems), 'problem')}",
                 detail=f"files={report.files} ok={report.ok} missing={report.missing} "
                        f"hash_mismatch={report.hash_mismatch} repaired={report.repaired}")
    return report


# How long ``pas verify`` waits for the row of a file a receive may still be filing: longer
# than the daemon's busy timeout (30 s), the most a commit waits for the write lock before it
# fails (and a failed commit removes the file it had written).
IN_FLIGHT_S = 35.0


def _orphans(db: Database, spool: Spool, in_flight_since: float) -> list[str]:
    """The spool's files without an index row, as ``pas verify`` (without ``--repair``)
    reports them. The receive path writes an instance's file, then commits its row
    (invariant 1): the walk can see the file before the row. Reported as they were, a verify
    run during ingest named 1 or 2 such files "orphan" in 68 of 89 runs (exit 1, an alert
    for nothing). Each candidate is looked up again once the walk is done, and one a receive
    may still be filing is waited for (:func:`_row_arrives`); only one that still has no row
    then is an orphan.

    Which files a receive may still be filing (``in_flight_since``): beside a running
    daemon, any written less than ``IN_FLIGHT_S`` before this verify began. Until 2026-12-05
    only those written after it began were waited for, and CI once saw an orphan reported
    anyway: a file written just before the verify began, whose row was still behind its
    fsyncs and the write lock. With no daemon nothing receives: a crash's leftover is
    reported at once, not after 35 s (only a file written after the verify began is waited
    for, as before)."""
    candidates = [found.path for found in cache_store.reconcile(db, spool)
                  if found.indexed_size is None]
    deadline = time.monotonic() + IN_FLIGHT_S
    return [path for path in candidates
            if not _row_arrives(db, spool, path, in_flight_since, deadline)]


def _row_arrives(db: Database, spool: Spool, path: str, in_flight_since: float,
                 deadline: float) -> bool:
    """Whether ``path`` has an index row, or gets one by ``deadline`` (monotonic) when it
    was written at or after ``in_flight_since``: its receive's commit, in milliseconds, at
    most the daemon's busy timeout. A file gone meanwhile counts as arrived: its receive
    discarded it (a failed commit) or an eviction removed it, nothing to report."""
    while not cache_store.is_indexed(db, path):
        try:
            written = spool.path(path).stat().st_mtime
        except FileNotFoundError:
            return True
        if written < in_flight_since or time.monotonic() >= deadline:
            return False
        time.sleep(0.02)  # another process's commit: nothing to wait on but the index
    return True


class Scrubber:
    """Background re-hash of the spool, a batch at a time, at most ``bytes_per_s``.

    Its position survives restarts (scrub_state), so a daemon that restarts often still
    covers the whole spool eventually.
    """

    def __init__(self, db: Database, spool: Spool, bytes_per_s: float, batch: int = 64):
        self.db = db
        self.spool = spool
        self.bytes_per_s = bytes_per_s
        self.batch = batch
        self.last_report = VerifyReport()

    def step(self, stop: threading.Event) -> int:
        """Check one batch; returns how many files were checked (0: a pass just ended)."""
        position = cache_store.scrub_position(self.db)
        items = cache_store.indexed_files(self.db, after_id=position, limit=self.batch)
        if not items:
            cache_store.save_scrub_position(self.db, 0, pass_done=True)
            return 0
        throttle = RateLimiter(self.bytes_per_s, stop)
        for item in items:
            if stop.is_set():
                break
            check_file(self.db, self.spool, item, self.last_report, throttle, set_aside=True)
            position = item.instance_id
        cache_store.save_scrub_position(self.db, position)
        return len(items)

    def run(self, stop: threading.Event, idle_s: float = 60.0) -> None:
        failures = LoopFailures(log, "scrub step failed")
        while not stop.is_set():
            try:
                done = self.step(stop)
                failures.worked()
                if done == 0:
                    stop.wait(idle_s)
            except Exception as exc:
                failures.failed(exc)
                index_check.suspect(exc)  # SQLITE_CORRUPT: the index is checked soon
                stop.wait(idle_s)


class IndexSound(Exception):
    """``pas cache rebuild-index`` without ``--force`` on an index SQLite finds sound."""


@dataclass
class IndexSetAside:
    moved_to: Path
    finding: str           # what quick_check found, or that it was set aside by force
    spool_files: int       # what the next start-up recovery will index again


def set_index_aside(settings: Settings, actor: str, force: bool = False) -> IndexSetAside:
    """Set the index database aside (appliance.store.damage.set_aside) so that the next
    start indexes the spool again, and write the new index's first audit row saying where
    the old one went (the audit trail before this moment is in that file). Holds the home's
    lock meanwhile: raises ``HomeInUse`` while a daemon runs, :class:`IndexSound` when
    SQLite finds the index sound and ``force`` is not given."""
    from appliance.ops.home_lock import hold_home_lock
    from appliance.store.damage import damage_of, set_aside

    path = settings.db_path
    lock = hold_home_lock(settings.home)
    try:
        thorough = index_check.found_damaged(settings.home)
        finding = damage_of(path, thorough=thorough)
        if finding is None and not force:
            checked = "integrity_check" if thorough else "quick_check"
            raise IndexSound(f"SQLite finds {path} sound ({checked} ok): nothing to rebuild "
                             "(--force sets it aside anyway)")
        finding = finding or "sound, --force"
        moved = set_aside(path)
        index_check.forget(settings.home)  # what the daemon found described the old file
        fresh = Database(path)
        try:
            audit.record(fresh, "recovery", actor=actor, outcome="success",
                         detail=f"index set aside as {moved.name} ({finding}); the spool is "
                                "indexed again at the next start")
        finally:
            fresh.close()
    finally:
        lock.close()
    return IndexSetAside(moved, finding, cache_store.spool_file_count(
        Spool(settings.spool_dir, create=False)))
