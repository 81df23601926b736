"""Prometheus metrics of the appliance, every family named ``pas_...``.

Owns: the metric names and how each is computed. Most families are read from the store at
scrape time by :class:`ApplianceCollector` (so no component has to remember to count, and a
restart loses nothing); the few things the store does not keep are process-wide hooks that
components call: :func:`observe_cstore`, :func:`add_wan_bytes`, :func:`count_retrieve`,
:func:`count_refusal` and :func:`note_hub_contact`. May not
touch: any state; a hook only moves a counter.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.config import Settings
from appliance.ops import certificates, disk_alert, index_check
from appliance.store import cache as cache_store
from appliance.store import commitment as commitment_store
from appliance.store import index
from appliance.store import jobs as job_store
from appliance.store import ops as ops_store
from appliance.store import prefetch as prefetch_store
from appliance.store import uplink as uplink_store
from appliance.store.db import Database

log = logging.getLogger("pas.ops.metrics")

# --- hooks: process-wide, not registered globally; ApplianceCollector yields them ----------

CSTORE_SECONDS = Histogram(
    "pas_cstore_duration_seconds",
    "Time from a C-STORE request to its response (durable write included), by outcome",
    ["outcome"], registry=None,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WAN_BYTES = Counter("pas_wan_bytes", "Bytes on the WAN link to the hub, by direction",
                    ["direction"], registry=None)
# channel: "dicom" (C-MOVE, C-GET) or "wado-rs" (a study, series or instance retrieve). A
# label added to the one family (no dashboard or alert reads it, and the hooks start from 0
# at every start anyway): sum without (channel) is the figure before it.
RETRIEVE_CHANNELS = ("dicom", "wado-rs")
RETRIEVES = Counter("pas_retrieve_requests", "Retrieve requests by channel (dicom: C-MOVE and "
                    "C-GET; wado-rs) and cache result (hit, miss)", ["channel", "result"],
                    registry=None)
for _channel in RETRIEVE_CHANNELS:  # at 0 from the start: increase() counts the first one
    for _result in ("hit", "miss"):
        RETRIEVES.labels(_channel, _result)
# What the uplink handed to the network, every attempt included (a PUT the link cut half-way,
# each retry): minus one copy of each bucket (the hub's bytes_stored) it is what was sent again.
UPLOAD_PUT_BYTES = Counter("pas_upload_put_bytes", "Sealed bucket bytes handed to the network "
                           "in PUT bodies to the hub, every attempt included", registry=None)
UPLOAD_INFLIGHT = Gauge("pas_upload_inflight_bytes", "Sealed bucket bytes of the PUTs to the "
                        "hub under way", registry=None)
# Which code read and answered each C-STORE: "direct" (appliance/dicomnet/direct_receive.py)
# or "pynetdicom" (dicom.direct_receive = false, or a request the direct path left alone).
CSTORE_PATHS = Counter("pas_cstore_requests", "C-STORE requests filed, by the code path that "
                       "read and answered them (direct, pynetdicom)", ["path"], registry=None)
ACCESS_REFUSED = Counter("pas_access_refused", "Access attempts refused, by channel and "
                         "reason (dicom: unknown-ae, unknown-called-ae, rate-limit, "
                         "unaccepted-context, tls-certificate...; http: bearer-token, "
                         "host-header; hl7: unknown-source, tls-certificate)",
                         ["channel", "reason"], registry=None)
# Every channel and reason exported at 0 from the start: Prometheus's increase() does not count
# a series' first value, and a child made at the first refusal appeared at 1 (or at 40, a burst
# between two scrapes): PasApplianceDicomTurningAway (increase(...[10m]) > 0) never fired for
# it. The reasons of docs/operations.md's table; one named nowhere here still counts (lazily).
REFUSAL_REASONS = {"dicom": ("unknown-ae", "unknown-called-ae", "rate-limit",
                             "unaccepted-context", "invalid-pdu", "tls-certificate",
                             "too-many-associations", "too-many-connections"),
                   "http": ("bearer-token", "host-header"),
                   "hl7": ("unknown-source", "tls-certificate")}
for _channel, _reasons in REFUSAL_REASONS.items():
    for _reason in _reasons:
        ACCESS_REFUSED.labels(_channel, _reason)
# Connections open on the DICOM port (appliance/dicomnet/server.py: bounded by
# dicom.max_connections); read from the listener at scrape time, 0 when it is not running.
DICOM_CONNECTIONS = Gauge("pas_dicom_connections", "Connections open on the DICOM port, those "
                          "that have not sent an A-ASSOCIATE-RQ yet included (bound: "
                          "dicom.max_connections)", registry=None)
# Storage Commitment reports (N-EVENT-REPORT) to modalities: sent (the modality answered
# success), failed (an attempt that will be retried), given-up (past the deadline).
COMMITMENT_REPORTS = Counter("pas_storage_commitment_reports", "Storage Commitment reports "
                             "to modalities, by outcome (sent, failed, given-up)",
                             ["outcome"], registry=None)
# SOP classes of images an association could not send at all: every presentation context
# proposed for the class refused at negotiation. Nothing else counts them: no C-STORE is
# made, so the received counters and the C-STORE histogram never see those images.
# sop-class: a storage class PAS does not take (a private one not in
# dicom.extra_storage_sop_classes); transfer-syntax: PAS reads none of the syntaxes proposed
# (JPEG XL, a private syntax). The journal's warning names the AE, the class and the syntaxes.
IMAGE_CLASS_REFUSAL_REASONS = ("sop-class", "transfer-syntax")
IMAGE_CLASSES_REFUSED = Counter("pas_dicom_image_classes_refused",
                                "SOP classes of images an association proposed and could not "
                                "send (no presentation context accepted for the class), by "
                                "reason (sop-class, transfer-syntax)", ["reason"],
                                registry=None)
for _reason in IMAGE_CLASS_REFUSAL_REASONS:  # at 0 from the start, as ACCESS_REFUSED
    IMAGE_CLASSES_REFUSED.labels(_reason)
_HOOKS: list[Any] = [CSTORE_SECONDS, CSTORE_PATHS, RETRIEVES, UPLOAD_PUT_BYTES,
                     UPLOAD_INFLIGHT, ACCESS_REFUSED, COMMITMENT_REPORTS, DICOM_CONNECTIONS,
                     IMAGE_CLASSES_REFUSED]
# The calling_ae label of pas_received_*_total for a title not in dicom.known_aes.
OTHER_AE = "other"
LEAD_WINDOW_S = 7 * 86400


class HubLink:
    """What the last contact with the hub said (heartbeat or uplink): up or down, and when
    it last succeeded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.up: bool | None = None  # None: never tried (e.g. not enrolled)
        self.last_success: float | None = None
        self.last_error: str | None = None

    def note(self, ok: bool, error: str | None = None) -> None:
        with self._lock:
            self.up = ok
            if ok:
                self.last_success = time.time()
                self.last_error = None
            else:
                self.last_error = error


HUB_LINK = HubLink()


def observe_cstore(seconds: float, status: int, path: str = "pynetdicom") -> None:
    CSTORE_SECONDS.labels("success" if status == 0 else "failure").observe(seconds)
    CSTORE_PATHS.labels(path).inc()


def add_wan_bytes(direction: str, count: int) -> None:
    """``direction`` is ``up`` (to the hub) or ``down`` (from it). Uploads are already
    counted from the hub jobs' progress; this is for the other traffic (fetch-through,
    prefetch downloads)."""
    WAN_BYTES.labels(direction).inc(count)


def add_upload_put_bytes(count: int) -> None:
    """Bucket body bytes the uplink just handed to httpx (any attempt)."""
    UPLOAD_PUT_BYTES.inc(count)


def add_upload_inflight(delta: int) -> None:
    """A PUT of ``delta`` bytes starts (positive) or ends (negative)."""
    UPLOAD_INFLIGHT.inc(delta)


def watch_dicom_connections(count: Callable[[], float] | None) -> None:
    """What ``pas_dicom_connections`` reads at scrape time (None: the listener stopped)."""
    DICOM_CONNECTIONS.set_function(count if count is not None else lambda: 0.0)


def count_refusal(channel: str, reason: str) -> None:
    ACCESS_REFUSED.labels(channel, reason).inc()


def count_image_classes_refused(reason: str, classes: int) -> None:
    """``classes`` SOP classes of images one association could not send, for ``reason``
    (one of :data:`IMAGE_CLASS_REFUSAL_REASONS`)."""
    IMAGE_CLASSES_REFUSED.labels(reason).inc(classes)


def count_commitment_report(outcome: str) -> None:
    COMMITMENT_REPORTS.labels(outcome=outcome).inc()


def count_retrieve(hit: bool, channel: str = "dicom") -> None:
    """One retrieve served (``channel``: dicom or wado-rs): a hit when the cache alone
    served all of it, a miss when the region was needed (fetched, or asked and not got)."""
    RETRIEVES.labels(channel, "hit" if hit else "miss").inc()


def note_hub_contact(ok: bool, error: str | None = None) -> None:
    HUB_LINK.note(ok, error)


def _sample_value(metric: Any, labels: dict[str, str]) -> float:
    """The sum of the ``_total`` samples whose labels include ``labels`` (every channel of
    a result, say)."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and \
                    labels.items() <= sample.labels.items():
                total += float(sample.value)
    return total


LEAD_QUANTILES = (0.1, 0.5, 0.9)


def lead_time_families(leads: list[float]) -> list[GaugeMetricFamily]:
    """The prefetch's lead times of the last 7 days as gauges: how many priors were fetched,
    how many late (after the exam's time), and the lead time's quantiles (nearest rank).

    Gauges, not a histogram: a histogram's buckets and count are cumulative counters, and
    these were computed over a sliding window, so they fell as requests aged out of it, which
    ``rate()`` and ``histogram_quantile()`` read as counter resets (found by the review of
    the operations surface)."""
    fetched = GaugeMetricFamily("pas_prefetch_fetched_7d", "Prefetch requests whose priors "
                                "were fetched in the last 7 days", value=len(leads))
    late = GaugeMetricFamily("pas_prefetch_late_7d", "Of those, fetched after the exam's "
                             "scheduled time", value=sum(1 for lead in leads if lead < 0))
    quantiles = GaugeMetricFamily("pas_prefetch_lead_time_7d_seconds", "How long before the "
                                  "scheduled exam priors were on site, fetched in the last 7 "
                                  "days (below 0: late), by quantile", labels=["quantile"])
    ordered = sorted(leads)
    for q in LEAD_QUANTILES if ordered else ():
        rank = max(1, math.ceil(q * len(ordered)))
        quantiles.add_metric([str(q)], ordered[rank - 1])
    return [fetched, late, quantiles]


def certificate_days_left(home: Path) -> float | None:
    """Days until the enrolment's client certificate expires; None when not enrolled."""
    path = home / "pki" / "client.crt"
    if not path.exists():
        return None
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return (cert.not_valid_after_utc - datetime.now(UTC)).total_seconds() / 86400


class ApplianceCollector(Collector):
    """Reads the store, the disk and the certificate at scrape time."""

    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect_store()
            error = 0.0
        except Exception as exc:  # a scrape must answer even if the database is busy or broken
            log.exception("metrics: reading the store failed")
            index_check.suspect(exc)  # SQLITE_CORRUPT: the index is checked soon
            error = 1.0
        yield GaugeMetricFamily("pas_scrape_store_error",
                                "1 when reading the store for this scrape failed", value=error)
        yield from self._collect_index_check()
        yield from self._collect_host()
        for hook in _HOOKS:
            yield from hook.collect()

    def _collect_store(self) -> Iterator[Metric]:
        instances = CounterMetricFamily("pas_received_instances",
                                        "Instances received, by calling AE", labels=["calling_ae"])
        received_bytes = CounterMetricFamily("pas_received_bytes",
                                             "Bytes received, by calling AE", labels=["calling_ae"])
        for calling_ae, (count, size) in self._received_by_ae().items():
            instances.add_metric([calling_ae], count)
            received_bytes.add_metric([calling_ae], size)
        yield instances
        yield received_bytes

        studies = GaugeMetricFamily("pas_backlog_studies",
                                    "Studies waiting for delivery, by destination and priority",
                                    labels=["destination", "priority"])
        oldest = GaugeMetricFamily("pas_backlog_oldest_age_seconds",
                                   "Age of the oldest undelivered job, by destination and priority",
                                   labels=["destination", "priority"])
        names = {0: "urgent", 1: "high", 2: "routine"}
        for row in ops_store.backlog_by_priority(self.db):
            labels = [row["destination"], names.get(row["priority"], str(row["priority"]))]
            studies.add_metric(labels, row["studies"])
            oldest.add_metric(labels, row["oldest_age_s"])
        yield studies
        yield oldest
        backlog_bytes = GaugeMetricFamily("pas_backlog_bytes",
                                          "Bytes not yet delivered, by destination",
                                          labels=["destination"])
        for row in job_store.backlog_by_destination(self.db):
            backlog_bytes.add_metric([row["destination"]], row["bytes"])
        yield backlog_bytes

        jobs = GaugeMetricFamily("pas_jobs", "Jobs by kind and state", labels=["kind", "state"])
        for kind, states in job_store.counts_by_state(self.db).items():
            for state, count in states.items():
                jobs.add_metric([kind, state], count)
        yield jobs
        failed = GaugeMetricFamily("pas_jobs_failed", "Jobs that gave up, by destination",
                                   labels=["destination"])
        for destination, count in ops_store.failed_jobs_by_destination(self.db).items():
            failed.add_metric([destination], count)
        yield failed
        refused = GaugeMetricFamily(
            "pas_jobs_waiting_for_credentials",
            "Jobs waiting for credentials to be put right (a certificate or password the "
            "destination refuses), by destination", labels=["destination"])
        for row in job_store.waiting_for_credentials(self.db):
            refused.add_metric([row["destination"]], row["jobs"])
        yield refused
        prefetch_refused = prefetch_store.waiting_for_credentials(self.db)
        yield GaugeMetricFamily(
            "pas_prefetch_waiting_for_credentials",
            "Prefetch requests waiting for the hub to accept this appliance's certificate "
            "again (they never fail)",
            value=prefetch_refused["requests"] if prefetch_refused else 0)
        # The region unreachable for the prefetch, and exams whose priors are not on site:
        # pas status said both, /metrics neither, so no alert could catch a region outage.
        summary = ops_store.prefetch_summary(self.db) or {}
        yield GaugeMetricFamily(
            "pas_prefetch_waiting_for_link",
            "Prefetch requests waiting for the region to be reachable (tried again for as "
            "long as the outage lasts, never failed)",
            value=summary.get("waiting_for_link") or 0)
        yield GaugeMetricFamily(
            "pas_prefetch_late",
            "Prefetch requests pending or running whose exam time has passed (the priors not "
            "on site)", value=summary.get("late") or 0)

        uploads = ops_store.hub_upload_totals(self.db)
        wan = CounterMetricFamily("pas_wan_bytes", "Bytes on the WAN link, by direction "
                                  "(up: sealed buckets from the hub jobs, plus other traffic "
                                  "components report)", labels=["direction"])
        wan.add_metric(["up"], uploads["wire"] + _sample_value(WAN_BYTES, {"direction": "up"}))
        wan.add_metric(["down"], _sample_value(WAN_BYTES, {"direction": "down"}))
        yield wan
        yield CounterMetricFamily("pas_upload_original_bytes",
                                  "Original study bytes carried to the hub",
                                  value=uploads["original"])
        if uploads["wire"] > 0:
            yield GaugeMetricFamily("pas_compression_ratio",
                                    "Original study bytes / bytes on the wire to the hub",
                                    value=uploads["original"] / uploads["wire"])
        leads = ops_store.prefetch_lead_times(self.db, time.time() - LEAD_WINDOW_S)
        if leads is not None:
            yield from lead_time_families(leads)
        link_up = GaugeMetricFamily("pas_destination_link_up",
                                    "1 when the last delivery contact with the destination "
                                    "succeeded (store/uplink.py)", labels=["destination"])
        last_ok = GaugeMetricFamily("pas_destination_last_ok_timestamp_seconds",
                                    "Unix time of the last successful delivery contact",
                                    labels=["destination"])
        for destination, link in uplink_store.link_states(self.db).items():
            link_up.add_metric([destination], 1 if link["state"] == "up" else 0)
            if link["last_ok_at"]:
                last_ok.add_metric([destination], link["last_ok_at"])
        yield link_up
        yield last_ok
        yield from self._collect_commitment()
        totals = index.totals(self.db)
        yield GaugeMetricFamily("pas_cache_studies", "Studies in the local cache",
                                value=totals["studies"])
        yield GaugeMetricFamily("pas_cache_instances", "Current instances in the local cache",
                                value=totals["instances"])
        yield GaugeMetricFamily("pas_confirmed_instances",
                                "Instances the region confirmed",
                                value=totals["confirmed_instances"])
        yield GaugeMetricFamily("pas_spool_bytes", "Bytes of DICOM files in the spool",
                                value=totals["bytes"])
        # Index rows whose file is gone (a lost disk under a restored index, a file removed
        # by hand): their retrieves are served partly (0xB000, WADO-RS 206) until the region
        # gives them back (pas verify --repair) or they are sent again.
        yield GaugeMetricFamily("pas_spool_files_missing", "Indexed files flagged missing from "
                                "the spool and not resolved (pas cache status; pas verify "
                                "--repair fetches the confirmed ones back from the region)",
                                value=cache_store.files_missing_count(self.db))
        # The daemon's disk alert (ops/disk_alert.py): the file system's figure alone is no
        # problem, the cache fills it to between its watermarks by design.
        yield GaugeMetricFamily("pas_disk_alert", "The daemon's disk alert: 0 none, 1 above "
                                "cache.high_watermark_percent with nothing left to evict, 2 "
                                "the quota or storage.min_free_mb near, C-STOREs refused with "
                                "0xA700 (pas status names it)",
                                value=disk_alert.level_of(
                                    (cache_store.raised_disk_alert(self.db) or {}).get("detail")))
        # Files whose bytes are no longer those received (the scrub or pas verify re-hashed
        # them: a failing disk, silent corruption): only the missing ones were exported.
        yield GaugeMetricFamily("pas_spool_files_damaged", "Indexed files flagged damaged "
                                "(size or SHA-256 no longer the received bytes') and not "
                                "resolved (pas cache status; pas verify --repair quarantines "
                                "them and fetches the confirmed ones back from the region)",
                                value=cache_store.files_damaged_count(self.db))

    def _tls_certificates(self) -> Metric:
        """Days left of each certificate or CA file the configuration uses
        (appliance/ops/certificates.py), by the key naming it. A file that cannot be read
        has no sample: ``pas doctor`` and the heartbeat's errors name it. A file renewed
        since the daemon loaded it counts from the one served until the restart
        (certificates.in_service), so the alert stays until the restart serves it."""
        family = GaugeMetricFamily("pas_tls_certificate_days_left",
                                   "Days until the first certificate of a TLS certificate or "
                                   "CA file the configuration uses expires (negative: "
                                   "expired), by the setting naming the file",
                                   labels=["certificate"])
        for used in certificates.in_use(self.settings):
            try:
                family.add_metric([used.key], certificates.days_in_service(used))
            except (OSError, ValueError) as exc:
                log.debug("metrics: %s: %s", used.key, exc)
        return family

    def _received_by_ae(self) -> dict[str, tuple[int, int]]:
        """(instances, bytes) received per ``calling_ae`` label: a title of
        ``dicom.known_aes``, ``""`` (fetched from the region), or :data:`OTHER_AE` for any
        other title. With ``dicom.accept_unknown`` a sender chooses its title freely, and
        each one it made up was a series for ever (the counters are durable): a label's
        values must stay bounded. Adding a title to ``known_aes`` moves its count from
        ``other`` to its own series (``other`` goes down once: a counter reset to rate())."""
        known = {ae.title for ae in self.settings.dicom.known_aes}
        folded: dict[str, tuple[int, int]] = {}
        for row in ops_store.received_by_calling_ae(self.db):
            ae = row["calling_ae"]
            label = ae if ae == "" or ae in known else OTHER_AE
            count, size = folded.get(label, (0, 0))
            folded[label] = (count + int(row["instances"]), size + int(row["bytes"]))
        return folded

    def _collect_commitment(self) -> Iterator[Metric]:
        """Storage Commitment reports waiting, per modality: the counter of reports sent
        says nothing of a modality that never gets one (no address, switched off), whose
        disk fills with the studies it keeps until PAS has committed them."""
        reports = commitment_store.backlog(self.db)
        pending = GaugeMetricFamily("pas_storage_commitment_pending",
                                    "Storage Commitment reports not yet delivered, by the "
                                    "modality waiting for them (other: any title not in "
                                    "dicom.known_aes)", labels=["calling_ae"])
        oldest = GaugeMetricFamily("pas_storage_commitment_oldest_age_seconds",
                                   "Age of the oldest Storage Commitment report not yet "
                                   "delivered, by modality", labels=["calling_ae"])
        # A title not in dicom.known_aes is OTHER_AE, as in the received counters: with
        # dicom.accept_unknown each made-up calling AE that asked and went away was a series
        # of each for the 24 h its report waits (40 titles, 40 series). Summed, the oldest.
        known = {ae.title for ae in self.settings.dicom.known_aes}
        folded: dict[str, tuple[int, float]] = {}
        for row in reports["by_ae"]:
            label = row["calling_ae"] if row["calling_ae"] in known else OTHER_AE
            count, age = folded.get(label, (0, 0.0))
            folded[label] = (count + int(row["pending"]), max(age, float(row["oldest_age_s"])))
        for label, (count, age) in sorted(folded.items()):
            pending.add_metric([label], count)
            oldest.add_metric([label], age)
        yield pending
        yield oldest
        yield GaugeMetricFamily("pas_storage_commitment_given_up_24h",
                                "Storage Commitment reports given up in the last 24 h (the "
                                "modality keeps its copies)", value=reports["given_up_24h"])

    def _collect_index_check(self) -> Iterator[Metric]:
        """What the daemon's last integrity check of the index found (ops/index_check.py):
        outside the store's families, which a damaged page may keep from being read."""
        checked = index_check.latest()
        if checked is None:  # not the daemon's process (a test's registry, a command)
            return
        yield GaugeMetricFamily("pas_index_damaged", "1 when the last integrity check of the "
                                "index database (SQLite quick_check) found it damaged",
                                value=int(checked.damaged))
        yield GaugeMetricFamily("pas_index_check_timestamp_seconds", "Unix time the last "
                                "integrity check of the index database ended",
                                value=checked.checked_at)
        yield GaugeMetricFamily("pas_index_check_duration_seconds", "How long the last "
                                "integrity check of the index database took",
                                value=checked.duration_s)

    def _collect_host(self) -> Iterator[Metric]:
        home = self.settings.home
        disk = shutil.disk_usage(home if home.exists() else ".")
        yield GaugeMetricFamily("pas_disk_total_bytes", "Size of the spool's filesystem",
                                value=disk.total)
        yield GaugeMetricFamily("pas_disk_free_bytes", "Free bytes on the spool's filesystem",
                                value=disk.free)
        yield GaugeMetricFamily("pas_disk_used_ratio", "Used fraction of the spool's filesystem",
                                value=(disk.total - disk.free) / disk.total if disk.total else 0)
        try:
            days = certificate_days_left(home)
        except (OSError, ValueError) as exc:
            log.warning("metrics: cannot read the client certificate: %s", exc)
            days = None
        if days is not None:
            yield GaugeMetricFamily("pas_certificate_days_left",
                                    "Days until the hub client certificate expires", value=days)
        yield self._tls_certificates()
        enrolled = (home / "pki" / "hub.json").exists()
        yield GaugeMetricFamily("pas_enrolled", "1 when enrolled with a hub", value=int(enrolled))
        if HUB_LINK.up is not None:
            yield GaugeMetricFamily("pas_hub_link_up", "1 when the last hub contact succeeded",
                                    value=int(HUB_LINK.up))
        if HUB_LINK.last_success is not None:
            yield GaugeMetricFamily("pas_hub_last_contact_timestamp_seconds",
                                    "Unix time of the last successful hub contact",
                                    value=HUB_LINK.last_success)
        hits = _sample_value(RETRIEVES, {"result": "hit"})
        misses = _sample_value(RETRIEVES, {"result": "miss"})
        if hits + misses > 0:
            yield GaugeMetricFamily("pas_retrieve_cache_hit_ratio",
                                    "Retrieves served from the local cache / all retrieves",
                                    value=hits / (hits + misses))
        info = GaugeMetricFamily("pas_info", "Version and identity of this appliance",
                                 labels=["version", "site", "ae_title"])
        info.add_metric([__version__, self.settings.site, self.settings.dicom.ae_title], 1)
        yield info


def build_registry(settings: Settings, db: Database) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ApplianceCollector(settings, db))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
