"""What the hub receives and commits, as Prometheus families for its ``/metrics``.

Owns: the hub's transfer counters since it started (:class:`TransferCounters`: bucket bytes
received, buckets stored, transfers and instances committed, per site) and the open
transfers read from the store at scrape time (:func:`open_transfer_families`). May not
touch: transfers themselves; the routes and the commit tell it what happened.

Why: the fleet families said what each appliance reports of itself, nothing of what the hub
does. Regional ops could not see the hub receiving (bytes per site), committing (transfers,
instances), nor a transfer left open for hours, without reading its journal.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from appliance.store import hub as store
from appliance.store.db import Database

__all__ = ["TransferCounters", "open_transfer_families"]


class TransferCounters:
    """Counters since the hub started, per site (Prometheus' ``rate()`` takes restarts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Family name -> site -> count.
        self._counts: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int))

    def _add(self, site: str, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._counts[f"pas_hub_{name}"][site] += amount

    def bucket_received(self, site: str, size: int, stored: bool) -> None:
        """An authenticated bucket body arrived (``stored``: new, not one already held)."""
        self._add(site, bucket_bytes_received=size, buckets_stored=int(stored))

    def committed(self, site: str, instances: int) -> None:
        """A transfer got its receipt (once per transfer: a repeated commit is not one)."""
        self._add(site, transfers_committed=1, instances_committed=instances)

    def families(self, sites: Iterable[str]) -> Iterator[Metric]:
        """``sites``: the fleet's, each with a series from 0 (a ``rate()`` alert sees it
        before it rises), and any other that sent something since the start. (Each family
        is written out with its name: tests/support/docs.py reads the names from here.)"""
        families = [
            CounterMetricFamily("pas_hub_bucket_bytes_received", "Bytes of authenticated "
                                "bucket bodies the hub received, held already or not, since "
                                "it started", labels=["site"]),
            CounterMetricFamily("pas_hub_buckets_stored", "Buckets the hub stored (new ones), "
                                "since it started", labels=["site"]),
            CounterMetricFamily("pas_hub_transfers_committed", "Transfers the hub committed "
                                "(archived and receipt signed), since it started",
                                labels=["site"]),
            CounterMetricFamily("pas_hub_instances_committed", "Instances in the transfers "
                                "the hub committed, since it started", labels=["site"]),
        ]
        with self._lock:
            counts = {name: dict(by_site) for name, by_site in self._counts.items()}
        every = sorted(set(sites).union(*counts.values()))
        for family in families:
            for site in every:
                family.add_metric([site], counts.get(family.name, {}).get(site, 0))
            yield family


def open_transfer_families(db: Database, sites: Iterable[str],
                           now: float | None = None) -> Iterator[Metric]:
    """Transfers begun and neither committed nor expired, per site, and the age of the
    oldest: one open for hours is an upload stuck, or a site that went away mid-study."""
    now = time.time() if now is None else now
    opened = store.open_transfers_by_site(db)
    count = GaugeMetricFamily("pas_hub_transfers_open", "Transfers begun and neither "
                              "committed nor expired", labels=["site"])
    oldest = GaugeMetricFamily("pas_hub_transfer_oldest_open_age_seconds", "Age of the "
                               "site's oldest open transfer (absent: none open)",
                               labels=["site"])
    for site in sorted(set(sites) | set(opened)):
        number, first_created = opened.get(site, (0, None))
        count.add_metric([site], number)
        if first_created is not None:
            oldest.add_metric([site], max(0.0, now - first_created))
    yield count
    yield oldest
