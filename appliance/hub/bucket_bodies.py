"""The bucket PUT bodies the hub holds at once, every site together, and what regional ops
see of it in ``/metrics``.

Owns: the budget of ``limits.bucket_bodies_bytes`` (:class:`BucketBodies`, asked by
:mod:`appliance.hub.transfers` before a PUT's body is read), the busy refusals it counts per
site, and their metric families (:func:`families`, exported by
:class:`appliance.hub.fleet.FleetCollector`). May not touch: SQL, the network, the PKI.

Why the metrics: past the budget a bucket PUT is answered ``503 busy`` with ``Retry-After``
and the appliance waits it out without failing the study, so nothing but the hub's log said
that the region's uploads were being held back, by how much, and whether a few slow sites
held the budget (few bodies, all of it) or the load outgrew it (many bodies).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


@dataclass(frozen=True)
class BodiesNow:
    """One consistent reading of :class:`BucketBodies` (a scrape's)."""

    budget: int
    held: int
    bodies: int
    refused: dict[str, int]


class BucketBodies:
    """The bytes of bucket PUT bodies the hub holds at once, every site together (invariant
    8): each PUT holds its bucket (up to ``limits.max_bucket_bytes``) while it is read,
    checked and stored, and 40 sites sending 48 MB buckets at once held ~2 GB. A PUT reserves
    its declared Content-Length (``max_bucket_bytes`` when chunked) before reading its body.

    Taken and given back on the server's event loop, read by ``/metrics`` from a worker
    thread: a lock, so that a scrape never sees the bytes of one PUT with the count of
    another (uncontended, it costs the loop well under a microsecond a PUT)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0  # bytes reserved
        self.bodies = 0  # PUTs holding a reservation
        # Busy refusals per site since the hub started: a key per enrolled site at most (the
        # client certificate gate ran before), so bounded as the fleet is.
        self._refused: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, size: int, site: str) -> bool:
        """Reserve ``size`` bytes for ``site``'s PUT, if the budget has them (then
        :meth:`give_back` them); else count the site's busy refusal."""
        with self._lock:
            if self.held + size > self.budget:
                self._refused[site] = self._refused.get(site, 0) + 1
                return False
            self.held += size
            self.bodies += 1
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size
            self.bodies -= 1

    def now(self) -> BodiesNow:
        with self._lock:
            return BodiesNow(self.budget, self.held, self.bodies, dict(self._refused))


def families(now: BodiesNow, sites: Iterable[str]) -> Iterator[Metric]:
    """The hub's budget families: the refusals of each of ``sites`` (0 for one never
    refused, so that a ``rate()`` sees the series before it rises; the caller passes the
    sites the fleet exports plus the refused ones not revoked), and the gauges of what is
    held now (0 from the start)."""
    refused = CounterMetricFamily(
        "pas_hub_bucket_puts_refused_busy",
        "Bucket PUTs the hub answered 503 busy (Retry-After) because the bodies it held, "
        "every site together, left no room under limits.bucket_bodies_bytes, since the hub "
        "started", labels=["site"])
    for site in sorted(set(sites)):
        refused.add_metric([site], now.refused.get(site, 0))
    yield refused
    yield GaugeMetricFamily("pas_hub_bucket_bodies_held_bytes",
                            "Bytes of bucket PUT bodies the hub holds now (declared sizes "
                            "reserved), every site together", value=now.held)
    yield GaugeMetricFamily("pas_hub_bucket_bodies_held",
                            "Bucket PUTs holding a reservation of their body now",
                            value=now.bodies)
    yield GaugeMetricFamily("pas_hub_bucket_bodies_budget_bytes",
                            "limits.bucket_bodies_bytes: past it a bucket PUT is refused busy",
                            value=now.budget)
