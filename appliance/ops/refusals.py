"""Refused access attempts in the audit trail: a DICOM association from an AE that is not
known (or not from its pinned address), a node over its attempt limit, an HTTP request
without a valid bearer token.

Owns: turning each refusal into an audit ``security`` row (PS3.15 Security Alert), at most
one per channel, source address and reason per window, and the ``pas_access_refused``
counter. The reason without what the peer chose in it (a Host header, an AE title: the
caller's ``value``): one client naming a new Host in each request wrote a row per request
(300 in 1.7 s, unauthenticated), 40 associations each calling another AE title 40 rows.
May not touch: anything but the audit table, written through
:mod:`appliance.store.audit`.

Why in the trail: a privacy officer asked "who tried to reach the images?" finds the
accepted accesses there (store, query, retrieve) and, before this, none of the refused
ones: they were only journal lines, which rotate.

Why coalesced: a modality whose AE title was mistyped retries every few seconds for days, and
a scanner on the network probes a port hundreds of times a minute. One row per attempt
would grow the append-only table (never pruned) without bound and bury the rows an auditor
looks for. The first refusal of a window is written at once; the later ones in that window
are counted, and the count is written with the next row for the same source and reason,
or at the daemon's stop, with the first :data:`VALUES_LISTED` values the later attempts chose
other than the first's. The counter has every attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from appliance.ops.metrics import count_refusal
from appliance.store import audit
from appliance.store.db import Database
from appliance.words import counted

log = logging.getLogger("pas.security")

WINDOW_S = 60.0
# Sources remembered at once (invariant 8): a scan from many addresses fills it, and then the
# pending counts are written and it starts again empty.
REMEMBERED = 1024
# The peer's values named in a window's count (each cut at VALUE_CHARS): a few say what was
# tried, the count says how many; the row stays bounded.
VALUES_LISTED = 5
VALUE_CHARS = 100


@dataclass
class _Window:
    started: float          # monotonic
    started_wall: float     # for the row's text
    actor: str              # who the first attempt claimed to be
    reason: str             # the first attempt's words
    value: str | None       # what the first attempt's peer chose in them
    more: int = 0           # refusals after the first, not written yet
    values: list[str] = field(default_factory=list)  # the later ones' other values, a few
    other_values: int = 0   # the later attempts with a value not listed

    def saw(self, value: str | None) -> None:
        if value is None or value == self.value or value[:VALUE_CHARS] in self.values:
            return
        if len(self.values) < VALUES_LISTED:
            self.values.append(value[:VALUE_CHARS])
        else:
            self.other_values += 1

    def count(self, channel: str, window_s: float) -> str:
        """The detail that says what the window's later attempts were."""
        said = (f"{channel}; {counted(self.more, 'more attempt')} refused in the "
                f"{window_s:.0f} s from {_clock(self.started_wall)}")
        if self.values:
            said += f", also {', '.join(self.values)}"
            if self.other_values:
                said += f" and {counted(self.other_values, 'attempt')} naming others"
        return said


class RefusalAudit:
    """Writes refused attempts to the audit table, coalesced per ``window_s``."""

    def __init__(self, db: Database, window_s: float = WINDOW_S, remembered: int = REMEMBERED):
        self.db = db
        self.window_s = window_s
        self.remembered = remembered
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._lock = threading.Lock()

    def refused(self, *, channel: str, kind: str, source: str | None, actor: str,
                reason: str, target: str | None = None, value: str | None = None) -> None:
        """One refused attempt. ``kind``: the counter's short reason (``unknown-ae``);
        ``reason``: what the row says (the log line's words); ``actor``: who it claimed to
        be (a calling AE title, ``anonymous``); ``value``: what the peer chose in
        ``reason``, written as it is there (``'h1.example'``), so that attempts whose
        reasons differ only by it share a window (listed in its count). Never raises: a
        refusal must stay a refusal whatever happens to the audit write."""
        count_refusal(channel, kind)
        key = (channel, source or "-", reason.replace(value, "\0") if value else reason)
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.started < self.window_s:
                window.more += 1
                window.saw(value)
                return
            earlier = window.count(channel, self.window_s) if window and window.more else None
            if window is None and len(self._windows) >= self.remembered:
                self._flush_locked()
            self._windows[key] = _Window(now, time.time(), actor, reason, value)
        self._write(actor=actor, source=source, reason=reason, target=target,
                    detail=earlier or channel)

    def flush(self) -> None:
        """Write the counts not written yet (at the daemon's stop)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        pending = [(key, w) for key, w in self._windows.items() if w.more]
        self._windows.clear()
        for (channel, source, _key), window in pending:
            self._write(actor=window.actor, source=None if source == "-" else source,
                        reason=window.reason, target=None,
                        detail=window.count(channel, self.window_s))

    def _write(self, *, actor: str, source: str | None, reason: str, target: str | None,
               detail: str) -> None:
        try:
            audit.record(self.db, "security", actor=actor, source=source, target=target,
                         outcome=f"failure: {reason}"[:500], detail=detail)
        except Exception:
            log.exception("audit record of a refused access failed")


def _clock(wall: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) if wall else "-"
