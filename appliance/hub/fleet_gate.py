"""How often one site may post a heartbeat: a token bucket per site, refusals counted.

Owns: the per-site rate of ``POST /api/v1/heartbeat`` (:class:`HeartbeatGate`, asked by
:mod:`appliance.hub.fleet` before the body is read), the numbers that bound the fleet's
history (:data:`HISTORY_EVERY_S`), the refusals' log line and counts (``/metrics``), and
how often a site's refusals are logged (:class:`LogPace`, which the client-certificate
gate's refusals use too). May not touch: SQL, the network, the PKI.

Why: the hub took every heartbeat with a new ``sent_at``. An enrolled site that misbehaves
(a bug, a loop, or its certificate in other hands) could post thousands a second, each a
history row and a synchronous commit: the hub's disk grew without bound for the history's
8 days, and that site's page read them all. The history is bounded by its windows
(:mod:`appliance.store.fleet`); this bounds the writes and says who does it.

The numbers come from the appliance's own ``ops.heartbeat_interval_s`` (its default and its
smallest allowed value, read from :class:`appliance.config_sections.OpsSection`): an
appliance posts one heartbeat, waits for its answer, then waits the interval, so it never
sends faster than one per :data:`MIN_INTERVAL_S`. A site may spend :data:`BURST` at once
(what the default interval is in seconds: room for network jitter bunching two or three
together and for an operator's test posts) and one per :data:`MIN_INTERVAL_S` after that;
past it, 429 with ``Retry-After`` (when the next one will be taken), before the body is read.

The buckets live in the hub's memory, one small entry per site that ever posted (sites are
enrolled certificates: a bounded set); a hub restart refills them, which the bound allows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.config_sections import OpsSection
from appliance.words import counted

log = logging.getLogger("pas.hub.fleet")

_INTERVAL = OpsSection.model_fields["heartbeat_interval_s"]
# The appliance's default interval (30 s) and the smallest it accepts (1 s).
DEFAULT_INTERVAL_S = float(_INTERVAL.default)
MIN_INTERVAL_S = float(next(m.ge for m in _INTERVAL.metadata
                             if getattr(m, "ge", None) is not None))
# One history row per site per window this long (store.fleet.record_heartbeat): half the
# default interval, so a site on the default keeps a row per heartbeat; faster ones fold.
HISTORY_EVERY_S = DEFAULT_INTERVAL_S / 2
RATE_PER_S = 1.0 / MIN_INTERVAL_S
BURST = DEFAULT_INTERVAL_S / MIN_INTERVAL_S
# A site refused again and again is logged once a minute, with how many since the last line.
LOG_EVERY_S = 60.0


@dataclass
class LogPace:
    """One site's refusals said in the journal: the first at once, then one line per
    ``every_s`` at most, saying how many were refused meanwhile.

    The heartbeat gate's, and the client-certificate gate's too
    (:mod:`appliance.hub.fleet_refused`): a revoked or unknown certificate's requests were
    logged one WARNING each, 11 to 18 a minute for one site (~20,000 a day), pushing out of
    the journal what regional ops look for."""

    every_s: float = LOG_EVERY_S
    unsaid: int = 0               # counted since the last line
    said_at: float = -math.inf    # clock time of the last line; never said yet

    @property
    def said_before(self) -> bool:
        return self.said_at > -math.inf

    def count(self, at: float) -> int | None:
        """Count one more. When a line is due (the first, or ``every_s`` after the last
        one), how many it says (this one included), and the count starts again; else None."""
        self.unsaid += 1
        if at - self.said_at < self.every_s:
            return None
        said, self.unsaid, self.said_at = self.unsaid, 0, at
        return said



# Keys a PacedWarnings remembers at most; past it they are forgotten all at once (a flood
# from ever new keys is then said once a minute per key at worst, as before the bound).
PACED_KEYS = 4096


@dataclass
class PacedWarnings:
    """Warnings about requests nobody authenticated (a refused enrolment, a refused TLS
    handshake), paced per key (its source address, its alert): the first at once, then one
    line a minute at most per key, saying how many were refused meanwhile.

    Why: each was one WARNING line, and anyone who reaches the hub (every hospital of the
    region, by design) could write a line per request into the journal, the hub's only
    record of the tokens it issued and the sites it revoked (200 bad enrolments: 200 lines;
    a security review, 2026-12-07)."""

    _paces: dict[str, LogPace] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def due(self, key: str) -> int | None:
        """Count one refusal of ``key``: how many the line due now says, else None."""
        with self._lock:
            if key not in self._paces and len(self._paces) >= PACED_KEYS:
                self._paces.clear()
            return self._paces.setdefault(key, LogPace()).count(time.monotonic())

@dataclass
class _Site:
    tokens: float
    at: float                     # clock time of the last refill
    pace: LogPace                 # the refusals' log lines
    refused: int = 0              # since the hub started: pas_fleet_heartbeats_refused_total


class HeartbeatGate:
    """A token bucket per site: :meth:`admit` takes one heartbeat's token or says how long
    to wait. Thread-safe (the route asks from the event loop, ``/metrics`` reads from a
    worker thread)."""

    def __init__(self, rate_per_s: float = RATE_PER_S, burst: float = BURST,
                 log_every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.rate_per_s, self.burst, self.log_every_s = rate_per_s, burst, log_every_s
        self.clock = clock
        self._sites: dict[str, _Site] = {}
        self._lock = threading.Lock()

    def admit(self, site: str) -> int | None:
        """None: the heartbeat may go on. Else the whole seconds until the site's next one
        will be taken (at least 1): the refusal's ``Retry-After``."""
        with self._lock:
            at = self.clock()
            state = self._sites.get(site)
            if state is None:
                state = self._sites[site] = _Site(self.burst, at, LogPace(self.log_every_s))
            state.tokens = min(self.burst, state.tokens + (at - state.at) * self.rate_per_s)
            state.at = at
            if state.tokens >= 1.0:
                state.tokens -= 1.0
                return None
            state.refused += 1
            retry_after = max(1, math.ceil((1.0 - state.tokens) / self.rate_per_s))
            again = state.pace.said_before
            said = state.pace.count(at)
            if said is not None:
                log.warning(
                    "site %r posts heartbeats faster than one every %g s (more than %g at "
                    "once): %s refused (429) %s; a bug or a loop at the site, or its "
                    "certificate in other hands (pas hub revoke)", site, 1 / self.rate_per_s,
                    self.burst, counted(said, "heartbeat"),
                    "since the last such line" if again else "so far",
                    extra={"SITE": site, "REFUSED": said})
            return retry_after

    def refused(self) -> dict[str, int]:
        """Heartbeats refused per site since the hub started."""
        with self._lock:
            return {site: state.refused for site, state in self._sites.items()}
