"""The heartbeat: a compact status posted to the hub every ``ops.heartbeat_interval_s``.

Owns: what an appliance tells the fleet dashboard (:func:`build_heartbeat`, the one format,
also validated by the hub in :mod:`appliance.hub.fleet`) and the thread that posts it over
mutual TLS with the enrolment's certificate. A heartbeat is idempotent per ``(site,
sent_at)``. May not touch: state; it reads the store and records only the link state: in
the daemon (:func:`appliance.ops.metrics.note_hub_contact`, the status page and
``pas_hub_link_up``) and in the store (``uplink_state`` of the ``hub`` destination, what
``pas status`` shows from another process).

Why the store too: only the uplink recorded the hub's link there, once a request had spent
its retries. With the WAN black-holed and nothing to send, ``pas status`` said ``up`` for
as long as the outage lasted; with an upload under way, for minutes (each attempt waits for
its timeout). The heartbeat goes whatever there is to send, so the link's state is at most
one interval and one timeout old. Its first success after a failure makes the uploads that
waited for the link due at once (``jobs.wake_waiting_for_link``): during a long outage each
tries only every few minutes (``routing.backoff.link_delay``).

A damaged index (:mod:`appliance.ops.index_check`) is the heartbeat's first error, and a store
that cannot be read no longer stops the heartbeat: it goes with the last figures read.

A hub that refuses a heartbeat as too frequent (429, ``Retry-After``: its per-site rate,
``appliance/hub/fleet_gate.py``; another appliance posting with this site's certificate, or
one configured faster than the hub takes) answered, so the link is up: the sender waits what
the hub asks (at most :data:`MAX_RETRY_AFTER_S`) before the next one, says so once, and once
more when a heartbeat is taken again. Before, each refusal marked the hub's link down, as an
unreachable hub: "hub link down" logged, the status page and ``pas_hub_link_up`` wrong.
"""

from __future__ import annotations

import logging
import math
import shutil
import sqlite3
import threading
import time
from typing import Any

import httpx

from appliance import __version__
from appliance.config import Settings
from appliance.logs import LoopFailures
from appliance.ops import certificates, disk_alert, files_missing, index_check, metrics
from appliance.ops.status import collect
from appliance.store import commitment as commitment_store
from appliance.store import jobs as job_store
from appliance.store import ops as ops_store
from appliance.store import uplink as uplink_store
from appliance.store.db import Database
from appliance.transfer.client import wan_timeout
from appliance.transfer.enrolment import EnrolmentError, load_enrolment
from appliance.transfer.http import http_client, hub_proxy, proxy_words, without_userinfo
from appliance.words import counted

log = logging.getLogger("pas.ops.heartbeat")

HEARTBEAT_PATH = "/api/v1/heartbeat"
MAX_ERRORS = 5
MAX_ERROR_CHARS = 1000
# The enrolled hub's destination name (the daemon's default route; dispatch/target_types/hub):
# the heartbeat and the uploads share one link state.
HUB_DESTINATION = "hub"
# The longest a hub's Retry-After holds the heartbeat back: a hub asking more (a wrong
# header) must not silence the site for longer than the dashboard's "down" (5 min) and more.
MAX_RETRY_AFTER_S = 300.0


def build_heartbeat(settings: Settings, db: Database, started_at: float,
                    site: str | None = None,
                    last_known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compact status (about 0.5 kB of JSON). An index that cannot be read (a damaged
    page) still gets a heartbeat out, saying so in its errors, with the figures of
    ``last_known`` (the last heartbeat read from the store; zeros without one): before, the
    heartbeat failed with the store and the fleet saw the site only as silent.
    ``started_at`` is a :func:`time.monotonic` reading (the uptime ignores clock steps)."""
    errors: list[str] = []
    checked = index_check.latest()
    if checked is not None and checked.damaged:  # first: the one to act on
        errors.append(checked.message())
    # A listener's certificate expired turns every modality (or the RIS) away: said after
    # the store's files and disk lines, before the failed jobs (the errors are capped), and
    # at most the CERTIFICATE_LINES most urgent (ops/certificates.py; none when all sound).
    tls_lines = certificates.heartbeat_errors(settings)[:CERTIFICATE_LINES]
    try:
        figures = _from_store(settings, db, errors, tls_lines)
    except sqlite3.DatabaseError as exc:
        index_check.suspect(exc)  # SQLITE_CORRUPT: the index is checked soon
        errors.append(f"{UNREADABLE} ({exc}): "
                      + ("figures from the last heartbeat that could read it"
                         if last_known else "figures unknown"))
        errors.extend(tls_lines)
        figures = _unknown_figures(settings)
        if last_known:  # the store's figures as last read; the disk, not in it, as it is
            figures.update({key: value for key, value in last_known.items() if key != "disk"})
    try:
        cert_days = metrics.certificate_days_left(settings.home)
    except (OSError, ValueError):
        cert_days = None
        errors.append("client certificate unreadable")
    return {
        "site": site or settings.site,
        "sent_at": round(time.time(), 3),
        "version": __version__,
        # started_at is time.monotonic()'s: a step of the clock does not move the uptime.
        "uptime_s": round(max(time.monotonic() - started_at, 0.0), 1),
        **figures,
        "cert_days_left": None if cert_days is None else round(cert_days, 2),
        # Each cut well below the hub's limit (hub/fleet.MAX_ERROR_CHARS, 2,000): a heartbeat
        # over it is refused whole, and the site would look silent.
        # Userinfo in a URL taken out (transfer.http.without_userinfo): the hub shows these
        # on its fleet pages, and a job failed before the configuration refused
        # ``user:password@`` kept the password in its last_error.
        "errors": [without_userinfo(error)[:MAX_ERROR_CHARS]
                   for error in errors[:MAX_ERRORS + 1]],
    }


UNREADABLE = index_check.UNREADABLE
# Certificate lines a heartbeat carries at most (the most urgent first): a CA that reissued
# every certificate on one day must not push the disk alert or the failed jobs out.
CERTIFICATE_LINES = 2
STORE_FIGURES = ("backlog", "jobs", "disk", "received", "confirmed_instances", "last_backup_at")


def _from_store(settings: Settings, db: Database, errors: list[str],
                before_jobs: list[str]) -> dict[str, Any]:
    """The heartbeat's figures read from the store (:data:`STORE_FIGURES`); the problems
    found there added to ``errors``, ``before_jobs`` among them after the disk's."""
    snapshot = collect(settings, db)
    backlog = snapshot["backlog"]
    # Before the failed jobs (the errors are capped): files lost here are the one problem
    # no job, alert or refusal of the hub shows regional ops (hub: pas_fleet_site_files_missing).
    issues = snapshot["cache"]["integrity_issues"]
    missing = issues.get("missing", 0)
    if missing:
        errors.append(files_missing.heartbeat_error(missing))
    damaged = issues.get("size_mismatch", 0) + issues.get("hash_mismatch", 0)
    if damaged:  # said to regional ops as the missing ones are
        errors.append(files_missing.damaged_error(damaged))
    # The daemon's own disk judgement, not the file system's figure (ops/disk_alert.py);
    # before the failed jobs too: C-STOREs may be refused.
    if snapshot["cache"]["disk_alert"]:
        errors.append(disk_alert.heartbeat_error(snapshot["cache"]["disk_alert"]))
    errors.extend(before_jobs)
    by_priority = ops_store.backlog_by_priority(db)
    urgent = [row["oldest_age_s"] for row in by_priority if row["priority"] == 0]
    routine = [row["oldest_age_s"] for row in by_priority if row["priority"] == 2]
    for job in job_store.list_jobs(db, "failed", MAX_ERRORS):
        errors.append(f"job {job['id']} to {job['destination']}: "
                      f"{(job['last_error'] or 'failed')[:120]}")
    for refused in snapshot["credentials_refused"]:  # they never fail: said here instead
        errors.append(f"{refused['destination']}: "
                      f"{counted(refused['waiting'], refused['what'])} waiting for "
                      f"credentials: {refused['error'][:120]}")
    for unconfigured in snapshot.get("unconfigured_destinations") or []:  # never fail either
        if unconfigured["queued"]:
            errors.append(f"{unconfigured['destination']}: "
                          f"{counted(unconfigured['queued'], 'job')} waiting for the "
                          "configuration: the destination is not configured (renamed or "
                          "removed?)")
    errors.extend(commitment_errors(snapshot["commitment"]))
    disk = snapshot["disk"]
    return {
        "backlog": {
            "studies": snapshot["backlog_studies"],  # each once, whatever its destinations
            "bytes": sum(row["bytes"] for row in backlog),
            # At 0 at least: after a step back of the clock a job's created_at is in the
            # future (store/jobs.py's ages are not clamped), and the hub refused the whole
            # heartbeat for a negative age.
            "oldest_age_s": max([0.0, *(row["oldest_age_s"] for row in backlog)]),
            "urgent_oldest_age_s": max([0.0, *urgent]),
            "routine_oldest_age_s": max([0.0, *routine]),
        },
        "jobs": {state: snapshot["jobs"].get(state, 0)
                 for state in ("pending", "running", "failed")},
        "disk": {"used_percent": disk["used_percent"], "free_bytes": disk["free_bytes"]},
        # What the site received since its index was created (pas_received_*_total): the
        # hub's "N instances received" and its throughput chart, from the deltas. It was the
        # cache's content (files, bytes), which eviction lowers: 0 received after a purge.
        "received": ops_store.received_totals(db),
        "confirmed_instances": snapshot["confirmed_instances"],
        # When the newest pas backup was written (None: never; ops/backup.py): the fleet
        # dashboard warns past two days. Optional in the format: the hub reads it only when
        # present (older appliances do not send it), and older hubs ignore keys they do not
        # know (hub/fleet.validate_heartbeat checks only its own).
        "last_backup_at": snapshot["backup"]["last_at"],
    }


def _unknown_figures(settings: Settings) -> dict[str, Any]:
    """Zeros where the store could not be read (the hub's format wants numbers); the disk,
    which does not come from the store, as it is."""
    usage = shutil.disk_usage(settings.home if settings.home.exists() else ".")
    return {
        "backlog": {"studies": 0, "bytes": 0, "oldest_age_s": 0.0, "urgent_oldest_age_s": 0.0,
                    "routine_oldest_age_s": 0.0},
        "jobs": {"pending": 0, "running": 0, "failed": 0},
        "disk": {"used_percent": round(100 * (usage.total - usage.free) / usage.total, 1),
                 "free_bytes": usage.free},
        "received": {"instances": 0, "bytes": 0},
        "confirmed_instances": 0,
        "last_backup_at": None,
    }


def commitment_errors(reports: dict[str, Any]) -> list[str]:
    """Storage Commitment reports stuck (per modality, past
    :data:`appliance.store.commitment.STUCK_AFTER_S`) or given up in the last 24 h: what
    ``pas doctor`` warns of, told to the fleet dashboard too, since a modality that never
    hears PAS committed keeps every study and fills its disk, and the hospital's IT may
    first hear of it from regional ops."""
    errors = [f"storage commitment: {counted(row['pending'], 'report')} to "
              f"{row['calling_ae']} waiting {row['oldest_age_s'] / 60:.0f} min: "
              f"{(row['last_error'] or 'not tried yet')[:120]}"
              for row in reports["by_ae"]
              if row["oldest_age_s"] > commitment_store.STUCK_AFTER_S]
    if reports["given_up_24h"]:
        errors.append(f"storage commitment: {counted(reports['given_up_24h'], 'report')} "
                      "given up in the last 24 h")
    return errors


class HeartbeatSender:
    """Posts a heartbeat now and then every interval, while the appliance is enrolled.

    Not enrolled: nothing is sent (checked again each period, so enrolling while running
    starts the heartbeats). A failure is logged once per change of link state, not every 30 s.
    """

    def __init__(self, settings: Settings, db: Database, interval_s: float):
        self.settings = settings
        self.db = db
        self.interval_s = interval_s
        self.started_at = time.monotonic()
        self.sent = 0
        self._client: httpx.Client | None = None
        self._client_key: tuple[str, float] | None = None
        # The figures of the last heartbeat that could read the store (build_heartbeat).
        self._last_figures: dict[str, Any] | None = None
        # The hub's last 429: how long it asked to wait (the next wait is the longer of it
        # and the interval), and how many were refused in a row (logged at the first only).
        self.retry_after_s = 0.0
        self.refused = 0

    def _http(self, url: str, context: Any, cert_mtime: float) -> httpx.Client:
        key = (url, cert_mtime)
        if self._client is None or self._client_key != key:
            if self._client is not None:
                self._client.close()
            self._client = http_client(base_url=url, verify=context,
                                       timeout=wan_timeout(15.0),
                                       proxy=hub_proxy(self.settings.hub))
            self._client_key = key
        return self._client

    def send_once(self) -> bool:
        try:
            enrolment = load_enrolment(self.settings.home)
        except EnrolmentError as exc:
            self._note(False, str(exc))
            return False
        if enrolment is None:
            return False
        beat = build_heartbeat(self.settings, self.db, self.started_at, enrolment.site,
                               self._last_figures)
        if not any(error.startswith(UNREADABLE) for error in beat["errors"]):
            self._last_figures = {key: beat[key] for key in STORE_FIGURES}
        try:
            client = self._http(enrolment.url, enrolment.ssl_context(),
                                enrolment.client_cert.stat().st_mtime)
            response = client.post(HEARTBEAT_PATH, json=beat)
        except (httpx.HTTPError, OSError) as exc:
            self._note(False, f"hub unreachable{proxy_words(hub_proxy(self.settings.hub))} "
                       f"(heartbeat): {type(exc).__name__}: {exc}")
            return False
        if response.status_code == 429:
            self._refused(response)
            return False
        if response.status_code not in (200, 201):
            self._note(False, f"hub answered {response.status_code}: {response.text[:200]}")
            return False
        self.sent += 1
        if self.refused:
            log.info("the hub takes heartbeats again, after %s refused as too frequent",
                     counted(self.refused, "heartbeat"))
        self.refused, self.retry_after_s = 0, 0.0
        self._note(True)
        return True

    def _refused(self, response: httpx.Response) -> None:
        """The hub answered 429: the link is up; the next heartbeat waits its Retry-After
        (seconds; a date or nothing: the interval). Logged once per run of refusals."""
        try:
            wait = float(response.headers.get("retry-after", ""))
        except ValueError:
            wait = 0.0
        if math.isnan(wait):
            wait = 0.0
        self.retry_after_s = min(max(wait, 0.0), MAX_RETRY_AFTER_S)
        self.refused += 1
        if self.refused == 1:
            log.warning("the hub refused a heartbeat as too frequent (429: %s); the next "
                        "waits %.0f s. Is another appliance enrolled as this site, or its "
                        "certificate copied?", response.text[:200], self.next_wait_s())
        self._note(True, accepted=False)

    def next_wait_s(self) -> float:
        """How long the loop waits before the next heartbeat: the interval, or longer when
        the hub asked for it (429's Retry-After)."""
        return max(self.interval_s, self.retry_after_s)

    def _note(self, ok: bool, error: str | None = None, accepted: bool = True) -> None:
        was = metrics.HUB_LINK.up
        metrics.note_hub_contact(ok, error)
        try:
            uplink_store.record_contact(self.db, HUB_DESTINATION, ok, error)
        except Exception:  # the link state is informative; never stop the heartbeats on it
            log.exception("recording the hub's link state failed")
        if ok and was is not True:
            log.info("hub link up (%s)", "heartbeat accepted" if accepted
                     else "the hub answered, refusing the heartbeat as too frequent")
            try:  # the uploads that waited for the link go now, not at their backoff's end
                woken = job_store.wake_waiting_for_link(self.db, "hub")
            except Exception:
                log.exception("waking the uploads that waited for the link failed")
            else:
                if woken:
                    log.info("%d uploads waiting for the link are due now", woken)
        elif not ok and was is not False:
            log.warning("hub link down: %s", error)

    def run(self, stopping: threading.Event) -> None:
        failures = LoopFailures(log, "heartbeat failed")
        while not stopping.is_set():
            try:
                self.send_once()
                failures.worked()
            except Exception as exc:  # the heartbeat must never take the daemon down
                failures.failed(exc)
            stopping.wait(self.next_wait_s())
        if self._client is not None:
            self._client.close()
