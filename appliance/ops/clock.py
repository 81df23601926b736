"""Wall-clock steps: detect them while the daemon runs and re-base stored deadlines.

Owns: noticing that the wall clock (``store.db.now()``) moved differently from the monotonic
clock, and asking :func:`appliance.store.cache.shift_for_clock_step` to keep every stored
deadline's remaining time. May not touch: SQL (the store does it) or the clock itself.

Why not store monotonic times: they mean nothing across a restart or to a person reading
``pas queue list``; the database keeps wall time, and this watch corrects the rare step
(an appliance booting with a dead RTC battery, then NTP correcting it by years).
"""

from __future__ import annotations

import logging
import threading
import time

from appliance.store import cache as cache_store
from appliance.store import ops as ops_store
from appliance.store.db import Database, now

log = logging.getLogger("pas.clock")


class ClockWatch:
    def __init__(self, db: Database, threshold_s: float = 5.0,
                 prefetch_lead_s: float | None = None):
        """``prefetch_lead_s``: ``prefetch.lead_time_h`` in seconds, so that the re-base
        tells a prefetch due at its exam's time less the lead time (not moved) from one due
        "now" (moved with the step; see
        :func:`appliance.store.prefetch.shift_for_clock_step_in`)."""
        self.db = db
        self.threshold_s = threshold_s
        self.prefetch_lead_s = prefetch_lead_s
        self._wall = now()
        self._mono = time.monotonic()
        self.steps: list[float] = []

    def check(self) -> float:
        """The step since the last check (0 when below the threshold); re-bases if any."""
        wall, mono = now(), time.monotonic()
        expected = self._wall + (mono - self._mono)  # where the old clock would be now
        step = wall - expected
        self._wall, self._mono = wall, mono
        if abs(step) < self.threshold_s:
            return 0.0
        # Forward: rows written after the step carry new-clock times, above the midpoint.
        cut = expected + step / 2 if step > 0 else None
        # Its ``clock`` audit row commits with the re-basing (one transaction).
        shifted = cache_store.shift_for_clock_step(self.db, step, written_before=cut,
                                                   prefetch_lead_s=self.prefetch_lead_s)
        self.steps.append(step)
        log.warning("wall clock stepped by %+.1f s: stored deadlines re-based (%s)", step,
                    shifted)
        return step

    def check_since_stopped(self) -> float:
        """At the daemon's start: a clock set back while PAS was stopped (NTP correcting a
        clock that ran days ahead, at the next boot) left every stored deadline that far in
        the future, and the watch above compares only with its own start: nothing routed and
        no job was claimed for days (review s41). When the index's newest time is ahead of
        the clock by more than the threshold, deadlines are re-based as for a step back of
        that size (the time PAS was stopped counted as none). Returns the step (0: none)."""
        newest = ops_store.newest_stored_time(self.db)
        wall = now()
        if newest is None or newest - wall < self.threshold_s:
            return 0.0
        step = wall - newest
        shifted = cache_store.shift_for_clock_step(self.db, step, written_before=None,
                                                   prefetch_lead_s=self.prefetch_lead_s)
        self.steps.append(step)
        log.warning("wall clock is %.1f s behind the newest time the index holds (set back "
                    "while PAS was stopped): stored deadlines re-based (%s)", -step, shifted)
        return step

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        while not stop.wait(interval_s):
            try:
                self.check()
            except Exception:
                log.exception("clock check failed")
