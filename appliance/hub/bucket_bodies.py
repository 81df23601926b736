"""The bucket PUT bodies the hub holds at once, every site together, and what regional ops
see of it in ``/metrics``.

Owns: the budget of ``limits.bucket_bodies_bytes`` (:class:`BucketBodies`, asked by
:mod:`appliance.hub.transfers` before a PUT's body is read), the bucket reservations taken
out of it ahead of a PUT, the busy refusals it counts per site, and their metric families
(:func:`families`, exported by :class:`appliance.hub.fleet_metrics.FleetCollector`). May not touch:
SQL, the network, the PKI.

Why the metrics: past the budget a bucket PUT is answered ``503 busy`` with ``Retry-After``
and the appliance waits it out without failing the study, so nothing but the hub's log said
that the region's uploads were being held back, by how much, and whether a few slow sites
held the budget (few bodies, all of it) or the load outgrew it (many bodies).

Why reservations: the 503 is answered before the body is read, but httpx (the appliance's
client) does not implement ``Expect: 100-continue``, so the appliance sent the whole body
anyway and uvicorn read and discarded it: a refused 6 MiB bucket still crossed the site's
slow uplink and the hub's ingress, and 40 sites catching up after an outage filled the
hub's link with refused bodies exactly when it was overloaded. An appliance that met a
busy hub recently first asks for the bucket's bytes (``POST .../reservation``, a few hundred
bytes); refused, it sends nothing more; granted, the budget is its PUT's for
``limits.bucket_reservation_s``, and that PUT uses it instead of taking again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


@dataclass(frozen=True)
class BodiesNow:
    """One consistent reading of :class:`BucketBodies` (a scrape's)."""

    budget: int
    held: int  # bytes: the PUTs' and the reservations' together
    bodies: int
    refused: dict[str, int]  # buckets turned away busy, at their PUT or their reservation
    reservations: int = 0
    reserved: int = 0  # bytes of the reservations (part of ``held``)
    refused_reservations: dict[str, int] | None = None  # part of ``refused``


# A reservation's key: (site, transfer id, bucket index).
Key = tuple[str, str, int]
Reserved = Literal["reserved", "busy", "too_many"]


class BucketBodies:
    """The bytes of bucket PUT bodies the hub holds at once, every site together (invariant
    8): each PUT holds its bucket (up to ``limits.max_bucket_bytes``) while it is read,
    checked and stored, and 40 sites sending 48 MB buckets at once held ~2 GB. A PUT reserves
    its declared Content-Length (``max_bucket_bytes`` when chunked) before reading its body.

    Taken and given back on the server's event loop, read by ``/metrics`` from a worker
    thread: a lock, so that a scrape never sees the bytes of one PUT with the count of
    another (uncontended, it costs the loop well under a microsecond a PUT)."""

    def __init__(self, budget: int, reservation_s: float = 30.0, per_site: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.held = 0  # bytes reserved, by PUTs and by reservations
        self.bodies = 0  # PUTs holding a reservation
        self.reservation_s = reservation_s
        self.per_site = per_site
        self._clock = clock
        # Busy refusals per site since the hub started: a key per enrolled site at most (the
        # client certificate gate ran before), so bounded as the fleet is.
        self._refused: dict[str, int] = {}
        self._refused_reservations: dict[str, int] = {}
        # Reservations not yet used by their PUT, oldest deadline first (every one lasts
        # reservation_s, and a renewed one moves to the end): the lapsed ones are at the
        # front, so giving them back costs only their own count. At most per_site a site.
        self._reservations: OrderedDict[Key, tuple[int, float]] = OrderedDict()
        self._per_site: dict[str, int] = {}
        self._reserved = 0
        self._lock = threading.Lock()

    def take(self, size: int, site: str) -> bool:
        """Reserve ``size`` bytes for ``site``'s PUT, if the budget has them (then
        :meth:`give_back` them); else count the site's busy refusal."""
        with self._lock:
            self._lapse()
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

    def reserve(self, site: str, transfer_id: str, index: int, size: int) -> Reserved:
        """Hold ``size`` bytes for the PUT of ``site``'s bucket ``index`` of ``transfer_id``
        for :attr:`reservation_s`: ``"reserved"``; ``"busy"`` (counted as the site's busy
        refusal: a bucket turned away, its body never sent) when the budget has no room;
        ``"too_many"`` when the site holds :attr:`per_site` other reservations (a site's
        PUTs sending at once need one each, no more: none can hoard the budget). Asking
        again for the same bucket renews it (its old bytes given back first)."""
        key = (site, transfer_id, index)
        with self._lock:
            self._lapse()
            if key in self._reservations:
                self._drop(key)
            elif self._per_site.get(site, 0) >= self.per_site:
                return "too_many"
            if self.held + size > self.budget:
                self._refused[site] = self._refused.get(site, 0) + 1
                self._refused_reservations[site] = self._refused_reservations.get(site, 0) + 1
                return "busy"
            self._reservations[key] = (size, self._clock() + self.reservation_s)
            self._per_site[site] = self._per_site.get(site, 0) + 1
            self._reserved += size
            self.held += size
            return "reserved"

    def claim(self, site: str, transfer_id: str, index: int, size: int) -> bool:
        """The PUT of that bucket has come, declaring ``size`` bytes: True when its
        reservation (not lapsed) covers them, and the PUT now holds ``size`` of it (the rest
        given back; :meth:`give_back` it as any PUT's), with no second take and no busy
        refusal. False with no reservation or a smaller one (given back): the PUT takes
        as one without."""
        key = (site, transfer_id, index)
        with self._lock:
            self._lapse()
            if key not in self._reservations:
                return False
            reserved = self._drop(key)
            if size > reserved:
                return False
            self.held += size
            self.bodies += 1
            return True

    def now(self) -> BodiesNow:
        with self._lock:
            self._lapse()
            return BodiesNow(self.budget, self.held, self.bodies, dict(self._refused),
                             len(self._reservations), self._reserved,
                             dict(self._refused_reservations))

    def _drop(self, key: Key) -> int:
        """Give a reservation back (the lock held): its bytes."""
        size, _deadline = self._reservations.pop(key)
        self._reserved -= size
        self.held -= size
        left = self._per_site[key[0]] - 1
        if left:
            self._per_site[key[0]] = left
        else:
            del self._per_site[key[0]]
        return size

    def _lapse(self) -> None:
        """Give back the reservations whose PUT did not come in time (the lock held). Run
        before every take and every reading: a lapsed reservation is never counted against
        a PUT, nor shown as held."""
        at = self._clock()
        while self._reservations:
            key, (_size, deadline) = next(iter(self._reservations.items()))
            if deadline > at:
                return
            self._drop(key)


def families(now: BodiesNow, sites: Iterable[str]) -> Iterator[Metric]:
    """The hub's budget families: the refusals of each of ``sites`` (0 for one never
    refused, so that a ``rate()`` sees the series before it rises; the caller passes the
    sites the fleet exports plus the refused ones not revoked), and the gauges of what is
    held now (0 from the start)."""
    refused = CounterMetricFamily(
        "pas_hub_bucket_puts_refused_busy",
        "Bucket PUTs (or their reservations) the hub answered 503 busy (Retry-After) "
        "because the bodies it held, every site together, left no room under "
        "limits.bucket_bodies_bytes, since the hub started", labels=["site"])
    reservations = CounterMetricFamily(
        "pas_hub_bucket_reservations_refused_busy",
        "Of pas_hub_bucket_puts_refused_busy, the refusals answered to a reservation: the "
        "bucket's body never crossed the WAN", labels=["site"])
    refused_reservations = now.refused_reservations or {}
    for site in sorted(set(sites)):
        refused.add_metric([site], now.refused.get(site, 0))
        reservations.add_metric([site], refused_reservations.get(site, 0))
    yield refused
    yield reservations
    yield GaugeMetricFamily("pas_hub_bucket_bodies_held_bytes",
                            "Bytes of bucket PUT bodies the hub holds now (declared sizes "
                            "reserved) and of reservations awaiting their PUT, every site "
                            "together", value=now.held)
    yield GaugeMetricFamily("pas_hub_bucket_bodies_held",
                            "Bucket PUTs holding a reservation of their body now",
                            value=now.bodies)
    yield GaugeMetricFamily("pas_hub_bucket_reservations_held",
                            "Bucket reservations awaiting their PUT now (each lapses after "
                            "limits.bucket_reservation_s)", value=now.reservations)
    yield GaugeMetricFamily("pas_hub_bucket_reservations_held_bytes",
                            "Bytes of the bucket reservations awaiting their PUT now (part "
                            "of pas_hub_bucket_bodies_held_bytes)", value=now.reserved)
    yield GaugeMetricFamily("pas_hub_bucket_bodies_budget_bytes",
                            "limits.bucket_bodies_bytes: past it a bucket PUT is refused busy",
                            value=now.budget)
