"""The daemon: wires configuration, store, ingest, routing and dispatch into one process.

Owns: start-up order (database and recovery before the ports open; the DICOM and HTTP ports
before READY, and either one that cannot be bound fails start-up), the background loops and an
orderly stop. Holds no business logic of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from typing import Any

from appliance.config import Settings, configured_site, with_enrolled_site
from appliance.dispatch.target_types import make_target
from appliance.dispatch.worker import Dispatcher
from appliance.ingest.receive import Receiver
from appliance.ingest.scp import DicomListener
from appliance.logs import LoopFailures
from appliance.ops import index_check
from appliance.ops.listeners import bind_refused
from appliance.ops.notify import Notifier, backlog_status
from appliance.ops.refusals import RefusalAudit
from appliance.routing.stability import Router
from appliance.store import audit, index
from appliance.store.db import Database
from appliance.store.spool import Spool
from appliance.transfer.http import hub_proxy, proxy_words
from appliance.words import counted

log = logging.getLogger("pas.daemon")

# The most ``stop()`` waits for busy parts, in all: under the unit's TimeoutStopSec (60 s,
# image/systemd/pas.service), so that systemd never has to kill the daemon.
STOP_BUDGET_S = 20.0


class PortUnavailable(OSError):
    """The DICOM or the HTTP port could not be opened (taken, no such address, not allowed)."""


# How the appliance's service gets CAP_NET_BIND_SERVICE (docs/operations.md).
PORT_104_DROP_IN = "install image/systemd/pas.service.d/port-104.conf"


class Daemon:
    def __init__(self, settings: Settings):
        # As load_settings does (a no-op then): a Settings built another way (in-process
        # tests) gets the same site, the enrolment's when the configuration names none.
        self.settings = settings = with_enrolled_site(settings)
        from appliance import dicomnet

        dicomnet.install(settings.dicom.event_driven)  # before any association exists
        from appliance.transfer.enrolment import check_site

        # First, before the home is locked or its index opened (nothing changed): the
        # configuration's site and the enrolment's certificate are the same site, or the
        # appliance would speak to the hub as one and audit as the other (SiteMismatch).
        check_site(settings.home, configured_site(settings))
        from appliance.ops.home_lock import hold_home_lock

        # Before the database opens and recovery runs: one daemon per home.
        self._home_lock = hold_home_lock(settings.home)
        # A damaged index is refused before anything reads or writes it (store/damage.py).
        created = not settings.db_path.exists()
        if not created:
            from appliance.store.damage import DatabaseDamaged, refusal

            # One SQLite call, no progress to tell: systemd is asked to wait long enough
            # for a large index read from a cold disk (12 s per GB measured here).
            Notifier().extend_start("checking the index database (SQLite quick_check)",
                                    seconds=900)
            # A file SQLite cannot open or lock raises, as it did before (not damage).
            checked = index_check.check(settings.db_path, raise_errors=True,
                                        thorough=index_check.found_damaged(settings.home))
            # The first of the daemon's checks: /metrics, the heartbeat and pas status
            # start from it (ops/index_check.py); pas status says a refusal too.
            index_check.record(settings.home, checked)
            if checked.finding is not None:
                raise DatabaseDamaged(refusal(settings.db_path, checked.finding))
        self.db = Database(settings.db_path)
        self.migrated = self.db.started(log, "index database")
        if created:  # nothing to refuse; checked all the same, so that the metric is there
            index_check.record(settings.home, index_check.check(settings.db_path))
        self.spool = Spool(
            settings.spool_dir, fsync=settings.storage.fsync,
            min_free_bytes=settings.storage.min_free_mb * 1024 * 1024,
            quota_bytes=settings.storage.quota_mb * 1024 * 1024,
            # A temporary copy (another transfer syntax) counts against the quota with what
            # the index says the spool holds.
            held_bytes=lambda: index.spool_bytes(self.db),
        )
        self.receiver = Receiver(self.db, self.spool)
        # Refused associations and HTTP requests, in the audit trail (coalesced per source).
        self.refusals = RefusalAudit(self.db)
        from appliance.ops import certificates

        # The TLS files noted before the listeners' contexts read them (the DICOM listener's
        # here, the others at start): one renewed on disk later counts from the one served
        # until a restart (/metrics, the heartbeat). Noted before, not after: a file renewed
        # in between reads as waiting for a restart (said once too often), never as served
        # when it is not.
        certificates.remember_loaded(settings)
        self.listener = DicomListener(settings.dicom, self.receiver, refusals=self.refusals)
        from appliance.serving.wiring import web_tls  # serving.auth = client_cert

        # Here, as the DICOM port's TLS context: a readable key stops start-up naming it
        # (in _start_web, its PermissionError read as a port that cannot be bound).
        self.web_tls = web_tls(settings) if settings.http.enabled else {}
        self.commitment: Any = None
        if settings.dicom.storage_commitment:  # Storage Commitment Push Model SCP
            from appliance.ingest.commitment import STORAGE_COMMITMENT_PUSH, StorageCommitmentScp

            self.commitment = StorageCommitmentScp(settings.dicom, self.db, self.spool,
                                                   settings.serving.move_destinations)
            self.listener.add_handlers(self.commitment.handlers(),
                                       contexts=[STORAGE_COMMITMENT_PUSH])
        self.router = Router(settings, self.db, self.default_destinations)
        self.extra_targets: dict[str, Any] = {}
        self.dispatcher = Dispatcher(
            settings, self.db, self.spool,
            lambda name: make_target(name, settings, self.extra_targets),
        )
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # Functions returning Starlette routes for the HTTP app (see appliance.web.app).
        self.route_providers: list[Any] = []
        # systemd: READY=1 at the end of start(), WATCHDOG=1 from run_forever's loop.
        self.notifier = Notifier()
        from appliance.ops.web import routes as ops_routes

        self.route_providers.append(ops_routes)  # / (status page), /metrics, retry
        self.web: Any = None
        self._wire_hub()
        if settings.serving.enabled:  # Q/R handlers on the ingest AE, /dicom-web routes
            from appliance.serving.wiring import wire_serving

            wire_serving(self)

    def _wire_hub(self) -> None:
        """Enrolled (``$PAS_HOME/pki/hub.json`` exists): the hub becomes a destination named
        "hub" (and under any configured name of kind "hub"), hence the default route."""
        from appliance.transfer.enrolment import load_enrolment

        enrolment = load_enrolment(self.settings.home)
        if enrolment is None:
            return
        from appliance.dispatch.target_types.hub import HubTarget

        target = HubTarget("hub", self.settings, enrolment, self.db)
        self.extra_targets["hub"] = target
        for name, destination in self.settings.destinations.items():
            if destination.kind == "hub":
                self.extra_targets[name] = target
        log.info("enrolled with hub %s as site %s%s", enrolment.url, enrolment.site,
                 proxy_words(hub_proxy(self.settings.hub)))

    def default_destinations(self) -> list[str]:
        """Where a study goes when no rule and no fallback names a destination."""
        return [name for name in self.extra_targets if name == "hub"]

    def start(self) -> None:
        # Recovery (temp files, orphans, missing files, stale leases) before the port opens.
        from appliance.ops.audit_trail import AuditTrail
        from appliance.ops.cache_policy import CachePolicy
        from appliance.ops.recovery import Scrubber, startup_recovery

        self.audit_trail = AuditTrail(self.settings, self.db)  # journald, syslog, config event
        self.audit_trail.install()
        from appliance.ops.security import tighten_secret_dir

        for fixed in tighten_secret_dir(self.settings.home / "pki"):  # keys 0600, dir 0700
            log.warning("permissions tightened: %s", fixed)
            audit.record(self.db, "security", actor="system", outcome="success",
                         detail=f"permissions tightened: {fixed}")
        from appliance.ops.backup_folder import remove_clear_leftovers

        for leftover in remove_clear_leftovers(self.settings.home):
            log.warning("start-up: removed %s, a clear copy of the index a sealed backup or "
                        "restore stopped before its end left", leftover)
        self.recovery_report = startup_recovery(self.db, self.spool, self.receiver,
                                                progress=self.notifier.extend_start)
        # A clock set back while PAS was stopped: re-based before anything is received or
        # claimed (a study received now, shifted with the others, would route at once).
        from appliance.ops.clock import ClockWatch

        ClockWatch(self.db, prefetch_lead_s=self.settings.prefetch.lead_time_h * 3600
                   ).check_since_stopped()
        # Here, not in startup_recovery (pas verify --repair runs that beside a live daemon):
        # the C-STORE associations the daemon's last end cut get their store rows.
        cut = audit.close_cut_associations(self.db)
        if cut:
            log.warning("start-up recovery: %s cut by the daemon's last end; their store "
                        "rows written from the index (pas audit --event store)",
                        counted(cut, "DICOM association"))
        # The studies its retrieves read, shown to pas cache evict/purge (their own process):
        # the rows a daemon killed left behind go first.
        from appliance.locks import READERS
        from appliance.store import readers as shared_readers

        left_behind = shared_readers.clear(self.db)
        if left_behind:
            log.info("start-up: %s left by the daemon's last end cleared",
                     counted(left_behind, "study reader"))
        READERS.share(shared_readers.SharedReaders(self.db))
        if "hub" in self.extra_targets:  # enrolled: what waited for a hub goes to it now
            self._release_awaiting_hub()
        self.cache_policy = CachePolicy(self.settings, self.db, self.spool)
        try:
            self.listener.start()
        except OSError as exc:
            raise PortUnavailable(bind_refused(
                "dicom.port", "dicom.host", self.settings.dicom.host, self.settings.dicom.port,
                exc, PORT_104_DROP_IN)) from None
        if self.settings.http.enabled:  # status page, /metrics, DICOMweb: bound before READY
            self._start_web()
        self._spawn("pas-cache", lambda: self.cache_policy.run(self.stopping))
        from appliance.ops.clock import ClockWatch  # wall-clock steps re-base deadlines

        clock_watch = ClockWatch(self.db,
                                 prefetch_lead_s=self.settings.prefetch.lead_time_h * 3600)
        self._spawn("pas-clock", lambda: clock_watch.run(self.stopping))
        if self.settings.cache.scrub_mb_per_s > 0:
            scrubber = Scrubber(self.db, self.spool, self.settings.cache.scrub_mb_per_s * 1e6)
            self._spawn("pas-scrub", lambda: scrubber.run(self.stopping,
                                                          self.settings.cache.scrub_pause_s))
        from appliance.ops.backfill import HeaderBackfill  # schema 18's rows from before

        backfill = HeaderBackfill(self.db, self.spool)
        self._spawn("pas-backfill", lambda: backfill.run(self.stopping))
        if self.settings.cache.index_check_interval_s > 0:
            from appliance.ops.index_check import IndexChecker

            checker = IndexChecker(self.settings.db_path, self.settings.home,
                                   self.settings.cache.index_check_interval_s)
            self._spawn("pas-index-check", lambda: checker.run(self.stopping))
        self.dispatcher.start()
        self._start_prefetch()
        self._spawn("pas-router", self._route_loop)
        if self.commitment is not None:  # reports not yet delivered, this start's and before
            from appliance.store.commitment import due_at_start

            due_at_start(self.db)
            self._spawn("pas-stgcmt", lambda: self.commitment.run(self.stopping))
        if self.settings.ops.heartbeat:
            from appliance.ops.heartbeat import HeartbeatSender

            self.heartbeat = HeartbeatSender(self.settings, self.db,
                                             self.settings.ops.heartbeat_interval_s)
            self._spawn("pas-heartbeat", lambda: self.heartbeat.run(self.stopping))
        from appliance.ops.doctor import check_open_hl7, check_open_http

        # pas doctor's rows, said at start too (as the hub says its open dashboard): the
        # image's first boot serves the HTTP port to every interface with no credential.
        open_ports = [check_open_http(self.settings) if self.web is not None else None,
                      check_open_hl7(self.settings) if self.hl7 is not None else None]
        for open_port in open_ports:
            if open_port is not None:
                log.warning("%s: %s: %s", open_port.name, open_port.detail, open_port.fix)
        # ATNA's Application Activity (Application Start, PS3.15 A.5.3.1): a stop and a
        # start were in no row, and a time the appliance was down (its database editable
        # offline) was invisible in the trail.
        from appliance import __version__

        audit.record(self.db, "start", actor="system", outcome="success",
                     detail=f"PAS {__version__} (index schema {self.db.schema_version()}), "
                            f"AE {self.settings.dicom.ae_title} on port {self.listener.port}"
                            + (f"; {self.migrated}" if self.migrated else ""))
        # Only now: the database is open, the SCP listens and the start is in the trail
        # (invariant for Type=notify). "PAS ready" comes after the start's audit row, so
        # whoever waits for it (an operator's tail, the tests) finds the row there.
        log.info("PAS ready: AE %s on %s:%d, home %s", self.settings.dicom.ae_title,
                 self.settings.dicom.host, self.listener.port, self.settings.home)
        self.notifier.ready(self.status_line())

    def _release_awaiting_hub(self) -> None:
        """The instances routed nowhere before this appliance was enrolled go back to
        routing, which sends them to the hub (appliance/store/awaiting_hub.py)."""
        from appliance.store import awaiting_hub

        instances, studies = awaiting_hub.release(self.db)
        if instances:
            log.warning("start-up: %s of %s received before this appliance was enrolled "
                        "routed again: they go to the hub now",
                        counted(instances, "instance"), counted(studies, "study", "studies"))
            audit.record(self.db, "recovery", actor="system", outcome="success",
                         detail=f"{counted(instances, 'instance')} of "
                                f"{counted(studies, 'study', 'studies')} received before the "
                                "enrolment routed again, to the hub")

    def _start_web(self) -> None:
        """Bind and serve the HTTP port; a port that cannot be bound fails start-up like the
        DICOM port (one line, exit 1, no READY) instead of leaving a daemon without its status
        page, metrics and DICOMweb."""
        from appliance.web.app import WebServer, build_app

        http = self.settings.http
        try:
            self.web = WebServer(build_app(self), http.host, http.port,
                                 max_connections=http.max_connections,
                                 request_timeout_s=http.request_timeout_s,
                                 send_timeout_s=http.send_timeout_s, **self.web_tls)
        except OSError as exc:
            self.listener.stop()
            raise PortUnavailable(bind_refused("http.port", "http.host", http.host, http.port,
                                               exc, PORT_104_DROP_IN)) from None
        try:
            self.web.start()
        except RuntimeError as exc:
            self.listener.stop()
            raise PortUnavailable(f"http.port {http.port} on {http.host}: {exc}") from None

    def status_line(self) -> str:
        """The STATUS= line systemd shows: the backlog per destination."""
        from appliance.store.jobs import backlog_by_destination

        try:
            return backlog_status(backlog_by_destination(self.db))
        except Exception as exc:  # a status line must never stop the daemon
            return f"status unavailable: {exc}"

    def _start_prefetch(self) -> None:
        """The HL7 listener and the prefetch scheduler (appliance/prefetch/); a new stable
        local study also triggers a prefetch of that patient's priors."""
        self.prefetch: Any = None
        self.hl7: Any = None
        if not self.settings.prefetch.enabled:
            return
        from appliance.prefetch.listener import Hl7Listener
        from appliance.prefetch.service import PrefetchService

        self.prefetch = PrefetchService(self.settings, self.db, self.receiver,
                                        on_jobs_created=self.dispatcher.wake.set)
        self.prefetch.start()
        self.router.on_stable.append(self.prefetch.on_study_stable)
        if self.settings.hl7.enabled:
            self.hl7 = Hl7Listener(
                self.settings.hl7, self.prefetch.handle_hl7, self.prefetch.refused_hl7,
                lambda address, kind, reason: self.refusals.refused(
                    channel="hl7", kind=kind, source=address, actor="-", reason=reason))
            try:
                self.hl7.start()
            except OSError as exc:
                # Images come first: the DICOM side keeps serving; the RIS feed is reported.
                log.error("%s; HL7 orders are not received", exc)
                self.hl7 = None

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _route_loop(self) -> None:
        failures = LoopFailures(log, "routing pass failed")
        while not self.stopping.is_set():
            try:
                if self.router.route_ready(self.stopping):
                    self.dispatcher.wake.set()
                failures.worked()
            except Exception as exc:
                failures.failed(exc)
                index_check.suspect(exc)  # SQLITE_CORRUPT: the index is checked soon
            self.stopping.wait(self.settings.study.check_interval_s)

    def stop(self, budget_s: float = STOP_BUDGET_S) -> None:
        """Stop every part, waiting at most ``budget_s`` in all for those still busy.

        Each part keeps its own limit (a C-STORE being filed gets 10 s to finish), but the
        waits share one deadline: with the hub black-holed, the associations blocked on a
        fetch-through, the workers blocked in a PUT and the heartbeat each waited their own
        limit one after the other (over 60 s, past systemd's TimeoutStopSec). What is still
        blocked at the deadline is left to end with the process: every state change is
        already committed (invariant 3) and resumes at the next start. The audit trail's
        flush comes after, with its own limits (the journal's 2 s, the collector's
        ``audit.stop_flush_s``, at most 30 s, and 2.5 s to close its connection): the whole
        stop stays under the unit's 60 s. What that flush leaves is sent after the next
        start (the audit outbox)."""
        deadline = time.monotonic() + budget_s

        def left(limit: float) -> float:
            return max(0.0, min(limit, deadline - time.monotonic()))

        self.stopping.set()
        if self.commitment is not None:
            self.commitment.stop()  # its loop sleeps on its own event, not on ``stopping``
        self.listener.stop(grace_s=left(10.0))
        if self.web is not None:
            self.web.stop(left(10.0))
        if getattr(self, "hl7", None) is not None:
            self.hl7.stop(left(5.0))
        if getattr(self, "prefetch", None) is not None:
            self.prefetch.stop(left(10.0))
        self.dispatcher.stop(left(10.0))
        self.refusals.flush()  # the counts of refusals not written yet
        with contextlib.suppress(Exception):  # a stop goes on whatever the trail says
            audit.record(self.db, "stop", actor="system", outcome="success",
                         detail="the daemon stopped")  # before the trail's last flush
        if getattr(self, "audit_trail", None) is not None:
            self.audit_trail.close()
        for thread in self._threads:
            thread.join(left(5.0))
        from appliance.locks import READERS

        READERS.share(None)  # what is still read ends with the process; the next start clears
        self.db.close()
        log.info("PAS stopped")

    def run_forever(self) -> None:
        def _on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %d: stopping", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        # The kernel hands a process's signal to any of its threads; Python runs the handler
        # in the main thread only once that thread is back in the interpreter. Blocked in
        # ``stopping.wait(tick)``, it heard SIGTERM only at the end of its tick: every stop
        # began up to a second late. The wakeup pipe, written by whichever thread took the
        # signal, ends the wait at once.
        woken, wake = os.pipe()
        os.set_blocking(woken, False)
        os.set_blocking(wake, False)
        previous_wakeup = signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
        self.start()
        watchdog_s = self.notifier.watchdog_interval_s
        tick = min(1.0, watchdog_s) if watchdog_s else 1.0
        try:
            while not self.stopping.is_set():
                if select.select([woken], [], [], tick)[0]:
                    with contextlib.suppress(BlockingIOError):
                        os.read(woken, 512)  # the handler has run, or runs next
                    continue
                if watchdog_s:
                    # From the main loop on purpose: a hung loop stops the pings and systemd
                    # restarts the service.
                    self.notifier.watchdog(self.status_line())
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            os.close(woken)
            os.close(wake)
            self.notifier.stopping()
            self.stop()
