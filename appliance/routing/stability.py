"""The stability pass: a study quiet for ``study.stable_after_s`` is routed.

A study is stable when no *new* instance arrived for ``stable_after_s`` seconds (a re-sent
duplicate does not reset the clock). Its unrouted instances are matched against the rules
and become one job per destination, in one transaction. Instances arriving later are a
delta: they wait for the study to be quiet again and are routed on their own. See
docs/routing.md for why this, and not series-level triggers.

An urgent study does not wait (``study.urgent_batch_s``): while it arrives, what has
arrived is routed in batches, each once its oldest instance is that old, each a delta of its
own (:meth:`Router.route_urgent_batches`). The emergency CT is at the region seconds after
its last slice, not ``stable_after_s`` later (DESIGN.md, "Sending need not wait for the
study to be stable"). Instances no destination takes
on an appliance not yet enrolled are filed for the hub its enrolment brings
(appliance/store/awaiting_hub.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

from appliance.config import Settings
from appliance.config_types import PRIORITY_RANK
from appliance.logs import LoopFailures
from appliance.ops import index_check
from appliance.routing.rules import routes_for
from appliance.store import index
from appliance.store import jobs as job_store
from appliance.store.db import Database, now
from appliance.words import counted

log = logging.getLogger("pas.routing")

# The default route of an appliance not enrolled yet, routed as a placeholder: an instance it
# would carry (no rule decided, no fallback) is filed for the hub, beside whatever additive
# (``continue``) rules also send it. Tested as "no route at all" before, an instance only
# ``continue`` rules matched went to their destinations and never to the region.
AFTER_ENROLMENT = "\x00the hub, once enrolled"
URGENT = PRIORITY_RANK["urgent"]

# SQLite's primary result codes that are about the database as a whole, not about one
# study's rows: its write lock held past the busy timeout (BUSY, LOCKED), no memory, a
# read-only file, an I/O error, a full disk, a file it cannot open. Every study fails the
# same way: passed over one by one, each waited the busy timeout in turn (30 s per study
# per pass) and logged its own traceback, then its own count every 5 min.
DATABASE_WIDE = {5, 6, 7, 8, 10, 13, 14}  # SQLITE_BUSY ... SQLITE_CANTOPEN
# Except a read that failed (a bad sector under one study's rows, as a torn page gives
# SQLITE_CORRUPT): that study is passed over, as the torn one is.
ONE_PAGE = {266, 522}  # SQLITE_IOERR_READ, SQLITE_IOERR_SHORT_READ


def is_database_wide(exc: BaseException) -> bool:
    """Whether ``exc`` says the database as a whole refused (not one study's rows)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (isinstance(exc, sqlite3.Error) and code is not None
            and code & 0xFF in DATABASE_WIDE and code not in ONE_PAGE)


class Router:
    def __init__(self, settings: Settings, db: Database,
                 default_destinations: Callable[[], list[str]] = lambda: []):
        self.settings = settings
        self.db = db
        self.default_destinations = default_destinations
        # Called with the study's id after each routing pass over it (e.g. the prefetch of
        # that patient's priors); a failing callback never stops routing.
        self.on_stable: list[Callable[[int], None]] = []
        # Studies whose routing failed at the last pass, by study row: each says its error
        # once, then counts (:class:`appliance.logs.LoopFailures`).
        self._failing: dict[int, LoopFailures] = {}
        self._failing_urgent: dict[int, LoopFailures] = {}  # the same, of urgent batches
        # Arriving studies found not urgent, by study row: the highest instance id the
        # rules were run on (each pass runs them on the instances received since only).
        self._not_urgent_upto: dict[int, int] = {}
        # Arriving studies an urgent batch was routed for: on_stable is told at the first
        # batch only (the priors of that patient fetched early), then at stability.
        self._urgent_told: set[int] = set()

    def kind_of(self, destination: str) -> str:
        configured = self.settings.destinations.get(destination)
        return configured.kind if configured is not None else destination  # "hub"

    def route_ready(self, stopping: threading.Event | None = None) -> int:
        """Route every study that became stable; return how many jobs were created.
        ``stopping`` set ends the pass between two studies: the ones after it are routed
        at the next start (each study's jobs are one transaction), and a stop does not wait
        for a pass over a long backlog (after an outage, thousands of studies).

        A study that cannot be routed (its rows unreadable: a torn page, text that is not
        UTF-8) is passed over, said in the log and tried again at the next pass: it stopped
        the pass, and every study after it waited, for as long as it stayed unreadable.
        What stops every study (the list itself unreadable, or the database refusing as a
        whole: :func:`is_database_wide`) still ends the pass: the routing loop says it."""
        quiet_since = now() - self.settings.study.stable_after_s
        created = self.route_urgent_batches(quiet_since, stopping)
        ready = index.studies_ready_to_route(self.db, quiet_since)
        for study_fk in ready:
            if stopping is not None and stopping.is_set():
                return created
            try:
                created += self.route_study(study_fk)
            except Exception as exc:
                if is_database_wide(exc):
                    raise  # the pass ends; the routing loop says it once, and counts it
                failures = self._failing.setdefault(study_fk, LoopFailures(
                    log, f"routing study {study_fk} (index row) failed; the others go on"))
                failures.failed(exc)
                index_check.suspect(exc)  # SQLITE_CORRUPT: the index is checked soon
                continue
            if (failures := self._failing.pop(study_fk, None)) is not None:
                failures.worked()
        for gone in set(self._failing) - set(ready):  # purged, or routed by an operator
            del self._failing[gone]
        for stable in set(ready):  # quiet now: the next arrival is a study arriving anew
            self._not_urgent_upto.pop(stable, None)
            self._urgent_told.discard(stable)
        self._tell_urgent_stable(quiet_since)
        return created

    def _tell_urgent_stable(self, quiet_since: float) -> None:
        """The studies urgent batches routed whole, quiet now: said stable, the on_stable
        callbacks told, forgotten (a delta an hour later is a study arriving anew). The last
        batch routed their last image before they were quiet, so the pass above never saw
        them: no "stable" line, on_stable told at the first batch alone, and the set grew
        with every urgent study (review s41)."""
        if not self._urgent_told:
            return
        states = index.studies_quiet_or_not(self.db, self._urgent_told, quiet_since)
        for study_fk, (study_uid, quiet) in states.items():
            if not quiet:
                continue
            for callback in self.on_stable:
                try:
                    callback(study_fk)
                except Exception:
                    log.exception("on-stable callback failed for study %d", study_fk)
            log.info("study %s stable: routed in urgent batches while it arrived", study_uid,
                     extra={"STUDY_UID": study_uid})
        # Forgotten once told, or purged meanwhile.
        self._urgent_told = {fk for fk, (_uid, quiet) in states.items() if not quiet}

    def route_urgent_batches(self, quiet_since: float,
                             stopping: threading.Event | None = None) -> int:
        """Route, before they are stable, the arriving studies an urgent rule takes: each
        study's unrouted instances once the oldest of them is ``study.urgent_batch_s`` old,
        all their destinations (one job each, a delta as a late series is). A study no rule
        makes urgent waits to be stable; its instances are matched once, as they arrive.
        Returns how many jobs were created. A failure is the study's, said once, as in
        :meth:`route_ready`."""
        batch_s = self.settings.study.urgent_batch_s
        if batch_s <= 0:
            return 0
        created = 0
        arriving = index.studies_arriving_with_a_batch(self.db, quiet_since, now() - batch_s)
        for study_fk in arriving:
            if stopping is not None and stopping.is_set():
                break
            try:
                # Urgent once, urgent until quiet: a later series no urgent rule takes (a
                # workstation's reconstruction) goes with the study's next batch.
                if study_fk not in self._urgent_told and not self._takes_urgent(study_fk):
                    continue
                if index.urgent_job_under_way(self.db, study_fk):
                    continue  # the next batch, once it is sent, holds what arrived meanwhile
                rows = index.unrouted_instances(self.db, study_fk)
                created += self.route_study(study_fk, rows=rows,
                                            tell=study_fk not in self._urgent_told)
                self._urgent_told.add(study_fk)
            except Exception as exc:
                if is_database_wide(exc):
                    raise
                self._failing_urgent.setdefault(study_fk, LoopFailures(
                    log, f"routing an urgent batch of study {study_fk} (index row) failed; "
                         "the others go on")).failed(exc)
                index_check.suspect(exc)
                continue
            if (failures := self._failing_urgent.pop(study_fk, None)) is not None:
                failures.worked()
        for gone in set(self._not_urgent_upto) - set(arriving):  # stable, routed, purged
            del self._not_urgent_upto[gone]
        for gone in set(self._failing_urgent) - set(arriving):
            del self._failing_urgent[gone]
        return created

    def _takes_urgent(self, study_fk: int) -> bool:
        """Whether a rule of priority urgent takes one of the study's unrouted instances.
        Each is matched once: only those filed since the last pass are read."""
        seen = self._not_urgent_upto.get(study_fk, 0)
        rows = index.unrouted_instances(self.db, study_fk, after_id=seen)
        defaults = self.default_destinations()
        for row in rows:
            if not row["is_current"]:
                continue
            routes = routes_for(self.settings.routing, self._attributes(row),
                                defaults or [AFTER_ENROLMENT])
            if any(route.priority == URGENT for route in routes
                   if route.destination != AFTER_ENROLMENT):
                return True
        self._not_urgent_upto[study_fk] = max((row["id"] for row in rows), default=seen)
        return False

    @staticmethod
    def _attributes(row: sqlite3.Row) -> dict[str, str | None]:
        return {
            "calling_ae": row["calling_ae"], "called_ae": row["called_ae"],
            "modality": row["modality"], "sop_class": row["sop_class_uid"],
            "study_description": row["study_description"], "body_part": row["body_part"],
        }

    def route_study(self, study_fk: int, rows: list[sqlite3.Row] | None = None,
                    tell: bool = True) -> int:
        """Route ``study_fk``'s unrouted instances (``rows``: read already), one job per
        destination, in one transaction; ``tell``: the on_stable callbacks are told."""
        urgent_batch = rows is not None
        rows = index.unrouted_instances(self.db, study_fk) if rows is None else rows
        if not rows:
            return 0
        defaults = self.default_destinations()
        grouped: dict[str, dict] = {}
        # No rule, no fallback and no hub yet (not enrolled): kept here until the enrolment
        # makes the default route (appliance/store/awaiting_hub.py).
        awaiting_hub: list[int] = []
        for row in rows:
            if not row["is_current"]:
                continue  # a newer version of this instance arrived: only that one travels
            routes = routes_for(self.settings.routing, self._attributes(row),
                                defaults or [AFTER_ENROLMENT])
            if any(route.destination == AFTER_ENROLMENT for route in routes):
                awaiting_hub.append(row["id"])
                routes = [r for r in routes if r.destination != AFTER_ENROLMENT]
            for route in routes:
                group = grouped.setdefault(route.destination,
                                           {"priority": route.priority, "rule": route.rule,
                                            "ids": []})
                group["priority"] = min(group["priority"], route.priority)
                group["ids"].append(row["id"])
        new_jobs = [
            job_store.NewJob(self.kind_of(name), name, group["priority"], group["rule"],
                             group["ids"])
            for name, group in grouped.items()
        ]
        job_store.route_study(self.db, study_fk, [r["id"] for r in rows], new_jobs,
                              awaiting_hub)
        for callback in self.on_stable if tell else []:
            try:
                callback(study_fk)
            except Exception:
                log.exception("on-stable callback failed for study %d", study_fk)
        study_uid = rows[0]["study_uid"]
        state = "arriving, urgent batch" if urgent_batch else "stable"
        if new_jobs:
            log.info("study %s %s: %s -> %s%s", study_uid, state, counted(len(rows), "instance"),
                     ", ".join(j.destination for j in new_jobs),
                     "; to the region once this appliance is enrolled" if awaiting_hub else "",
                     extra={"STUDY_UID": study_uid})
        else:
            log.info("study %s %s: %s, no destination (kept locally)%s",
                     study_uid, state, counted(len(rows), "instance"),
                     ": sent to the region once this appliance is enrolled" if awaiting_hub
                     else "", extra={"STUDY_UID": study_uid})
        return len(new_jobs)
