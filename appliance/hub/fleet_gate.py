"""How often one site may post a heartbeat: a token bucket per site, refusals counted.

Owns: the per-site rate of ``POST /api/v1/heartbeat`` (:class:`HeartbeatGate`, asked by
:mod:`appliance.hub.fleet` before the body is read), the numbers that bound the fleet's
history (:data:`HISTORY_EVERY_S`), the refusals' log line and counts (``/metrics``). May
not touch: SQL, the network, the PKI.

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
from dataclasses import dataclass

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
class _Site:
    tokens: float
    at: float                     # clock time of the last refill
    refused: int = 0              # since the hub started: pas_fleet_heartbeats_refused_total
    unsaid: int = 0               # refused since the last log line
    said_at: float = -math.inf


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
                state = self._sites[site] = _Site(self.burst, at)
            state.tokens = min(self.burst, state.tokens + (at - state.at) * self.rate_per_s)
            state.at = at
            if state.tokens >= 1.0:
                state.tokens -= 1.0
                return None
            state.refused += 1
            state.unsaid += 1
            retry_after = max(1, math.ceil((1.0 - state.tokens) / self.rate_per_s))
            if at - state.said_at >= self.log_every_s:
                log.warning(
                    "site %r posts heartbeats faster than one every %g s (more than %g at "
                    "once): %s refused (429) %s; a bug or a loop at the site, or its "
                    "certificate in other hands (pas hub revoke)", site, 1 / self.rate_per_s,
                    self.burst, counted(state.unsaid, "heartbeat"),
                    "since the last such line" if state.said_at > -math.inf else "so far",
                    extra={"SITE": site, "REFUSED": state.unsaid})
                state.unsaid, state.said_at = 0, at
            return retry_after

    def refused(self) -> dict[str, int]:
        """Heartbeats refused per site since the hub started."""
        with self._lock:
            return {site: state.refused for site, state in self._sites.items()}
