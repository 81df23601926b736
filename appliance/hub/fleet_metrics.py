"""The fleet's and the hub's own Prometheus families, read at each scrape of ``/metrics``.

Owns: :class:`FleetCollector`: the ``pas_fleet_*`` families (each site's last heartbeat, as
:func:`appliance.hub.fleet.site_rows` reads it; revoked sites left out; a site refused for a
certificate the hub does not know is ``pas_fleet_site_up`` 0 with
``pas_fleet_site_certificate_refused``, its last figures from before left out), the heartbeats
refused per site (:class:`appliance.hub.fleet_gate.HeartbeatGate`), the hub's own last
backup, its bucket budget (:mod:`appliance.hub.bucket_bodies`) and what it receives and
commits (:mod:`appliance.hub.transfer_metrics`). May not touch: SQL (the stores), the
routes (``/metrics`` is served by :func:`appliance.hub.fleet.fleet_routes`).

Taken out of ``fleet.py`` (651 lines) so that the dashboard's module holds the heartbeats
and the pages, and this one what Prometheus reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.hub.bucket_bodies import families as bucket_body_families
from appliance.hub.fleet import hub_backup_state, site_rows
from appliance.hub.fleet_gate import HeartbeatGate
from appliance.hub.transfer_metrics import open_transfer_families
from appliance.ops.certificates import days_said as certificate_days_said
from appliance.ops.disk_alert import level_said as disk_alert_said
from appliance.ops.files_missing import count_said as files_missing_said
from appliance.ops.files_missing import damaged_said as files_damaged_said
from appliance.ops.index_check import says_index_trouble
from appliance.store.hub import hub_backup_record, revoked_sites

if TYPE_CHECKING:
    from appliance.hub.app import Hub

__all__ = ["FleetCollector"]


class FleetCollector(Collector):
    """Fleet families read from the hub's store at scrape time."""

    def __init__(self, hub: Hub, gate: HeartbeatGate | None = None):
        self.hub = hub
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        rows = [r for r in site_rows(self.hub.db, None, self.hub.refused_certificates.problems())
                if r["state"] != "revoked"]
        families = {
            "up": GaugeMetricFamily("pas_fleet_site_up",
                                    "1 when the site's last heartbeat is under 5 min old",
                                    labels=["site"]),
            "seen": GaugeMetricFamily("pas_fleet_site_last_seen_timestamp_seconds",
                                      "Hub time of the site's last heartbeat", labels=["site"]),
            "backlog": GaugeMetricFamily("pas_fleet_site_backlog_studies",
                                         "Studies waiting for delivery at the site",
                                         labels=["site"]),
            "oldest": GaugeMetricFamily("pas_fleet_site_backlog_oldest_age_seconds",
                                        "Age of the site's oldest undelivered job, by priority",
                                        labels=["site", "priority"]),
            "disk": GaugeMetricFamily("pas_fleet_site_disk_used_ratio",
                                      "Used fraction of the site's spool filesystem",
                                      labels=["site"]),
            # The site's own disk alert (its heartbeat's error line, ops/disk_alert.py): the
            # file system's figure alone is no problem, the cache fills it by design.
            "disk_alert": GaugeMetricFamily(
                "pas_fleet_site_disk_alert",
                "The site's disk alert as its last heartbeat says it: 0 none, 1 above its "
                "cache's high watermark with nothing left to evict, 2 its quota or free-space "
                "floor near, C-STOREs refused with 0xA700", labels=["site"]),
            "cert": GaugeMetricFamily("pas_fleet_site_certificate_days_left",
                                      "Days until the site's client certificate expires",
                                      labels=["site"]),
            # The site's TLS certificates and CAs expired or expiring within 30 days (its
            # heartbeat's error lines, ops/certificates.py): absent while they are sound.
            "tls": GaugeMetricFamily(
                "pas_fleet_site_tls_certificate_days_left",
                "Days left of a certificate or CA file the site's configuration uses, as its "
                "last heartbeat says, for those expired (negative) or expiring within 30 "
                "days, by the setting naming it", labels=["site", "certificate"]),
            "failed": GaugeMetricFamily("pas_fleet_site_failed_jobs",
                                        "Jobs that gave up at the site", labels=["site"]),
            "info": GaugeMetricFamily("pas_fleet_site_info", "Software version of the site",
                                      labels=["site", "version"]),
            "backup": GaugeMetricFamily(
                "pas_fleet_site_backup_age_seconds",
                "Seconds since the site's last pas backup (never backed up: since its first "
                "heartbeat); absent for appliances too old to report it", labels=["site"]),
            # The site keeps sending heartbeats (not silent), with the last figures it read:
            # only this says its index is damaged or unreadable (ops/index_check.py).
            # Indexed files missing from the site's spool (its heartbeat's error line,
            # ops/files_missing.py): its retrieves of those studies are served partly.
            "missing": GaugeMetricFamily("pas_fleet_site_files_missing",
                                         "Files the site's last heartbeat says are flagged "
                                         "missing from its spool (0: none)", labels=["site"]),
            "damaged": GaugeMetricFamily("pas_fleet_site_files_damaged",
                                         "Files the site's last heartbeat says are flagged "
                                         "damaged in its spool (their bytes no longer those "
                                         "received; 0: none)", labels=["site"]),
            "index": GaugeMetricFamily("pas_fleet_site_index_damaged",
                                       "1 when the site's last heartbeat says its index "
                                       "database is damaged or could not be read",
                                       labels=["site"]),
            # A site enrolled after the backup this hub was restored from: its requests
            # were refused with nothing but a log line (hub/fleet_refused.py).
            "cert_refused": GaugeMetricFamily(
                "pas_fleet_site_certificate_refused",
                "Requests of the site the hub refused (403) for a certificate its fleet CA "
                "signed but it does not know (enrolled after the backup it was restored "
                "from: enrol it again), since the first such refusal; 0: none",
                labels=["site"]),
        }
        # Heartbeats answered 429 (hub/fleet_gate.py), since the hub started: 0 for a site
        # that never posted too fast, so a rate() alert sees the series before it rises.
        refused = CounterMetricFamily(
            "pas_fleet_heartbeats_refused", "Heartbeats the hub refused (429) because the "
            "site posted them faster than it allows, since the hub started", labels=["site"])
        refused_by_site = self.gate.refused() if self.gate is not None else {}
        for r in rows:
            site = [r["site"]]
            refused.add_metric(site, refused_by_site.get(r["site"], 0))
            families["up"].add_metric(site, 1 if r["state"] == "up" else 0)
            families["seen"].add_metric(site, r["last_seen_at"])
            families["cert_refused"].add_metric(site, r["refusal"].count if "refusal" in r
                                                else 0)
            families["info"].add_metric([r["site"], r["version"] or ""], 1)
            if r.get("not_current"):  # refused, or never heard: no figure is current
                continue
            families["backlog"].add_metric(site, r["backlog_studies"])
            families["oldest"].add_metric([r["site"], "any"], r["backlog_oldest_s"])
            families["oldest"].add_metric([r["site"], "urgent"], r["urgent_oldest_s"])
            if r["routine_oldest_s"] is not None:
                families["oldest"].add_metric([r["site"], "routine"], r["routine_oldest_s"])
            if r["disk_used_percent"] is not None:
                families["disk"].add_metric(site, r["disk_used_percent"] / 100)
            if r["cert_days_left"] is not None:
                families["cert"].add_metric(site, r["cert_days_left"])
            families["failed"].add_metric(site, r["failed_jobs"])
            if r["backup_age_s"] is not None:
                families["backup"].add_metric(site, r["backup_age_s"])
            families["index"].add_metric(
                site, int(any(says_index_trouble(e) for e in r["errors"] or [])))
            families["disk_alert"].add_metric(
                site, max((disk_alert_said(e) for e in r["errors"] or []), default=0))
            # One sample per setting, however often a heartbeat says it (a second sample of
            # a series would make Prometheus refuse the whole scrape).
            told = dict(filter(None, map(certificate_days_said, r["errors"] or [])))
            for key, days in told.items():
                families["tls"].add_metric([r["site"], key], days)
            families["missing"].add_metric(
                site, max((files_missing_said(e) for e in r["errors"] or []), default=0))
            families["damaged"].add_metric(
                site, max((files_damaged_said(e) for e in r["errors"] or []), default=0))
        yield GaugeMetricFamily("pas_fleet_sites", "Sites that ever sent a heartbeat, "
                                "enrolled or refused, revoked ones left out", value=len(rows))
        yield from families.values()
        yield refused
        yield from self._bucket_bodies({r["site"] for r in rows})
        fleet = {r["site"] for r in rows}
        yield from self.hub.transfer_counters.families(fleet)
        yield from open_transfer_families(self.hub.db, fleet)
        backup = hub_backup_state(hub_backup_record(self.hub.db), time.time())
        if backup["age_s"] is not None:  # None: no record (the next backup writes one)
            yield GaugeMetricFamily(
                "pas_hub_backup_age_seconds",
                "Seconds since the hub's own last pas hub backup (never backed up: since the "
                "hub began being watched, its install or upgrade)", value=backup["age_s"])
        if backup["written_at"] is not None:
            yield GaugeMetricFamily("pas_hub_last_backup_timestamp_seconds",
                                    "Time of the hub's own last pas hub backup",
                                    value=backup["written_at"])
        # Requests to the dashboard and /metrics refused (dashboard.auth = "basic",
        # hub/dashboard_auth.py): guessed passwords show as a rise of wrong-password.
        dashboard = CounterMetricFamily(
            "pas_hub_dashboard_refused", "Requests to the fleet dashboard and /metrics the "
            "hub refused (dashboard.auth = basic), by reason, since the hub started",
            labels=["reason"])
        for reason, count in self.hub.dashboard_refusals.snapshot().items():
            dashboard.add_metric([reason], count)
        yield dashboard

    def _bucket_bodies(self, fleet: set[str]) -> Iterator[Metric]:
        """The hub's busy refusals per site and the bucket bodies it holds now
        (hub/bucket_bodies.py). The sites: the fleet's (0 for one never refused), and a site
        refused before its first heartbeat unless revoked since, as the fleet leaves a
        revoked one out."""
        now = self.hub.bucket_bodies.now()
        others = set(now.refused) - fleet
        if others:
            others -= revoked_sites(self.hub.db)
        yield from bucket_body_families(now, fleet | others)
