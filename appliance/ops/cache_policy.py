"""The cache's disk policy: watermarks, LRU eviction of confirmed studies, pins, forced purge.

Owns: when to evict and how much, the disk alert, and the operator's pin/unpin/purge. May
not touch: SQL or files (``appliance.store.cache`` does both, and refuses on its own to drop
an unconfirmed study unless the operator forces it).

The hard limit itself is enforced where bytes arrive (``Spool.check_room``: the free-space
floor and the quota make a C-STORE answer 0xA700 with nothing written; ``Spool.open_temp``
holds a temporary copy in another transfer syntax to both). This module raises
the alert when that point is near and clears it by itself once space is back; it never
deletes anything the region has not confirmed (invariant 2).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.config import Settings
from appliance.locks import READERS, StudyBeingRead, StudyReaders
from appliance.logs import LoopFailures
from appliance.ops import index_check
from appliance.store import audit, eviction
from appliance.store import cache as cache_store
from appliance.store.db import Database, now
from appliance.store.spool import Spool
from appliance.words import counted

log = logging.getLogger("pas.cache")

DAY_S = 86400.0
PRUNE_INTERVAL_S = 3600.0  # settled eviction rows: how often the loop forgets the old ones
# Alert a little before the floor/quota, so the operator hears of it before senders do.
HARD_LIMIT_HEADROOM = 4 * 1024 * 1024


@dataclass
class EvictionPass:
    used_before: int
    used_after: int
    capacity: int
    evicted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    still_above_high: bool = False
    # Studies listed but left, and why (being read, changed since listed): pas cache evict
    # says so, where it used to say only how many went.
    skipped: dict[str, str] = field(default_factory=dict)


class CachePolicy:
    def __init__(self, settings: Settings, db: Database, spool: Spool,
                 readers: StudyReaders = READERS):
        self.settings = settings
        self.db = db
        self.spool = spool
        # The studies this process's retrieves are reading: never evicted from under them.
        self.readers = readers
        # The alert as last recorded (its audit row), not None: a daemon restarted once the
        # space was back never wrote "cleared" (only a process that had raised it did), and
        # pas status, the page and pas cache status showed the old alert for ever; one
        # restarted while it still held wrote the same alert again.
        self.alert: str | None = self._recorded_alert()
        # Studies whose eviction the index refused (an IntegrityError), logged once as errors.
        self._refused: set[str] = set()

    def _recorded_alert(self) -> str | None:
        try:
            alert = cache_store.raised_disk_alert(self.db)
            return alert["detail"] if alert else None
        except sqlite3.Error:  # an unreadable trail: the first pass raises it afresh
            return None

    def _usage(self) -> tuple[int, int]:
        quota = self.settings.storage.quota_mb * 1024 * 1024
        return cache_store.disk_usage(self.spool, self.db, quota)

    def usage_percent(self) -> float:
        used, capacity = self._usage()
        return 100.0 * used / capacity if capacity else 0.0

    def evict_if_needed(self) -> EvictionPass:
        """One pass: above the high watermark, evict LRU evictable studies down to low."""
        policy = self.settings.cache
        used, capacity = self._usage()
        result = EvictionPass(used, used, capacity)
        if not capacity or 100.0 * used / capacity < policy.high_watermark_percent:
            self._update_alert(result)
            return result
        target = capacity * policy.low_watermark_percent / 100.0
        # Never a study still arriving, whatever the retention (0 by default): an urgent one
        # is confirmed batch by batch while it arrives, and evicted then, its next image began
        # a new partial study (review s41). Quiet for stable_after_s, it is whole.
        received_before = now() - max(policy.min_retention_days * DAY_S,
                                      self.settings.study.stable_after_s)
        while used > target:
            candidates = eviction.eviction_candidates(self.db, received_before, limit=50)
            if not candidates:
                break
            evicted_before = len(result.evicted)
            for candidate in candidates:
                if used <= target:
                    break
                try:  # its ``delete`` audit row commits with the rows' deletion
                    evicted = eviction.evict_study(
                        self.db, self.spool, candidate.study_uid, actor="system",
                        reason="evicted (LRU, confirmed at the region)",
                        hold=self._readers_hold(candidate.study_uid))
                except (StudyBeingRead, eviction.BeingRead) as exc:  # a viewer's retrieve
                    # (this process's, or the daemon's seen from pas cache evict): files stay
                    log.info("not evicted: %s", exc, extra={"STUDY_UID": candidate.study_uid})
                    result.skipped[candidate.study_uid] = str(exc)
                    continue
                except eviction.NotEvictable as exc:  # changed since listed: skip it
                    log.info("not evicted: %s", exc)
                    result.skipped[candidate.study_uid] = str(exc)
                    continue
                except sqlite3.IntegrityError as exc:  # its rows broke a constraint
                    self._skip_inconsistent(result, candidate.study_uid, exc)
                    continue
                result.evicted.append(candidate.study_uid)
                result.freed_bytes += evicted.bytes
                if evicted.failed_jobs:  # the last resort: nothing else could go
                    log.warning("evicted study %s with its failed delivery to %s (nothing "
                                "else could go): the node never got it from here; the "
                                "region holds it",
                                candidate.study_uid, ", ".join(evicted.failed_jobs),
                                extra={"STUDY_UID": candidate.study_uid})
                log.info("evicted study %s (%s, %s)", candidate.study_uid,
                         counted(evicted.instances, "instance"), counted(evicted.bytes, "byte"),
                         extra={"STUDY_UID": candidate.study_uid})
                used, capacity = self._usage()
            if len(result.evicted) == evicted_before:
                break  # each skipped (being read, or changed since listed): the same list again
        result.used_after = used
        self._update_alert(result)
        return result

    def _skip_inconsistent(self, result: EvictionPass, study_uid: str,
                           exc: sqlite3.IntegrityError) -> None:
        """A study whose eviction broke a constraint of the index (rolled back: nothing
        changed) is skipped, the others evicted. The error used to end the whole pass, and
        the same study, first in line again, ended every pass after it: nothing was
        evicted any more and the disk filled (a study whose series another study's
        instances named, before schema migration 26). Logged as an error the first time in
        this process (the operator's to look at: ``pas cache purge --force``, ``pas
        doctor``), then at info level: every pass meets it again."""
        reason = f"the index refused its deletion ({exc}): skipped, the index needs a look"
        result.skipped[study_uid] = reason
        first = study_uid not in self._refused
        self._refused.add(study_uid)
        log.log(logging.ERROR if first else logging.INFO, "study %s not evicted: %s",
                study_uid, reason, extra={"STUDY_UID": study_uid})

    def _readers_hold(self, study_uid: str) -> Callable[[], Callable[[], None]]:
        """For :func:`eviction.evict_study`: the study's readers looked at and held (none
        may register) until its rows' deletion is over; StudyBeingRead when one reads it."""
        return lambda: self.readers.evicting(study_uid).committed

    def hard_limit_near(self) -> str | None:
        """Why new instances are (or are about to be) refused with 0xA700, or None."""
        storage = self.settings.storage
        free = shutil.disk_usage(self.spool.root).free
        floor = storage.min_free_mb * 1024 * 1024
        if free < floor + HARD_LIMIT_HEADROOM:
            return (f"hard limit: {free // (1024 * 1024)} MB free, floor "
                    f"storage.min_free_mb={storage.min_free_mb}: C-STORE refused with 0xA700")
        if storage.quota_mb:
            used, capacity = self._usage()
            if used + HARD_LIMIT_HEADROOM > capacity:
                return (f"hard limit: spool {used // (1024 * 1024)} MB of its quota "
                        f"storage.quota_mb={storage.quota_mb}: C-STORE refused with 0xA700")
        return None

    def _update_alert(self, result: EvictionPass) -> None:
        policy = self.settings.cache
        percent = 100.0 * result.used_after / result.capacity if result.capacity else 0.0
        hard = self.hard_limit_near()
        if percent >= policy.high_watermark_percent or hard:
            result.still_above_high = percent >= policy.high_watermark_percent
            message = hard or (f"disk {percent:.1f}% used, above the high watermark "
                               f"({policy.high_watermark_percent}%), nothing more may be "
                               f"evicted (unconfirmed, pinned, within retention or being read)")
            # Raised once, not on every pass; again whenever its level changes: the hard
            # limit after the watermark's (modalities refused: a worse state, said as such),
            # and the watermark's after the hard limit (status, doctor, /metrics and the
            # fleet read the last alert row: they went on saying C-STOREs were refused after
            # purges had made room, while modalities stored again).
            stepped_down = (self.alert or "").startswith("hard limit") and not hard
            changed = self.alert is None or stepped_down or (
                bool(hard) and not (self.alert or "").startswith("hard limit"))
            self.alert = message
            if changed:
                log.error("ALERT %s%s", message,
                          " (no longer the hard limit: C-STOREs accepted)" if stepped_down
                          else "")
                self._audit_alert("failure: disk", message)
        elif self.alert is not None:
            self.alert = None
            log.warning("disk alert cleared: %.1f%% used", percent)
            self._audit_alert("success", f"disk alert cleared at {percent:.1f}%")

    def _audit_alert(self, outcome: str, detail: str) -> None:
        """Best effort: with the disk full the database may not take the row (found by
        tests/faults/test_disk_full.py); the alert itself must not depend on it."""
        try:
            audit.record(self.db, "alert", actor="system", outcome=outcome, detail=detail)
        except sqlite3.Error as exc:
            log.error("alert not written to the audit trail: %s", exc)

    def snapshot(self) -> dict[str, Any]:
        used, capacity = self._usage()
        return {"used_bytes": used, "capacity_bytes": capacity,
                "used_percent": round(100.0 * used / capacity, 1) if capacity else 0.0,
                "high_watermark_percent": self.settings.cache.high_watermark_percent,
                "low_watermark_percent": self.settings.cache.low_watermark_percent,
                "alert": self.alert,
                "integrity_issues": len(cache_store.open_issues(self.db))}

    def prune_settled_evictions(self) -> int:
        """Forget the ``evicting`` rows settled over SETTLED_EVICTIONS_KEPT_DAYS ago (each
        evicted file leaves one); logged when some went."""
        pruned = eviction.prune_settled_evictions(
            self.db, now() - eviction.SETTLED_EVICTIONS_KEPT_DAYS * DAY_S)
        if pruned:
            log.info("forgot %s settled over %d days ago", counted(pruned, "evicted file's row"),
                     eviction.SETTLED_EVICTIONS_KEPT_DAYS)
        return pruned

    def run(self, stop: threading.Event) -> None:
        failures = LoopFailures(log, "eviction pass failed")
        next_prune = 0.0  # at the first pass, then hourly
        while not stop.is_set():
            try:
                self.readers.settle()  # a reader's row the index kept by mistake taken off
                self.evict_if_needed()
                if now() >= next_prune:
                    next_prune = now() + PRUNE_INTERVAL_S
                    self.prune_settled_evictions()
                failures.worked()
            except Exception as exc:
                failures.failed(exc)
                index_check.suspect(exc)  # SQLITE_CORRUPT: the index is checked soon
            stop.wait(self.settings.cache.evict_interval_s)


# --- operator actions (the CLI calls these) --------------------------------------------------


def pin(db: Database, study_uid: str, days: float | None,
        actor: str) -> cache_store.PinChange | None:
    """Pin a study for ``days`` (None: until unpinned). The ``pin`` row commits with it.
    None: no such study."""
    until = now() + days * DAY_S if days else cache_store.PINNED_FOR_EVER
    return cache_store.set_pin(
        db, study_uid, until, actor=actor,
        detail=f"pinned for {counted(days, 'day')}" if days else "pinned until unpinned")


def unpin(db: Database, study_uid: str, actor: str) -> cache_store.PinChange | None:
    """Unpin a study. The ``unpin`` row commits with it. None: no such study."""
    return cache_store.set_pin(db, study_uid, None, actor=actor)


def purge(db: Database, spool: Spool, study_uid: str, actor: str,
          force: bool) -> eviction.Evicted:
    """The operator's purge. Without ``force`` it obeys the same rules as eviction. Its
    ``delete`` row commits with the deletion of the rows (:func:`eviction.evict_study`); a
    refusal, which changes nothing, is recorded on its own."""
    try:
        evicted = eviction.evict_study(
            db, spool, study_uid, force=force, actor=actor,
            reason=f"{'forced ' if force else ''}purge by the operator")
    except eviction.NotEvictable as exc:
        audit.record(db, "delete", actor=actor, target=study_uid,
                     outcome=f"failure: {exc}", detail="purge refused")
        raise
    log.warning("study %s purged by %s (%s, %d unconfirmed)", study_uid, actor,
                counted(evicted.instances, "instance"), evicted.unconfirmed,
                extra={"STUDY_UID": study_uid})
    return evicted
