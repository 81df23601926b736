"""The prefetch service: triggers in, requests scheduled, priors fetched into the local cache.

Owns: turning triggers (an HL7 message, a new local study, a worklist poll, ``pas prefetch
patient``) into durable requests; the scheduler thread that claims the due ones and runs them
side by side (at most ``parallel`` resolving their priors at once, the slots freed as each
hands its studies to the download batcher); the worklist poller and the thread that keeps the
hub connection warm; and the region's clients (the hub's bucketed download, else a plain
DICOMweb region), made once when first needed and closed at stop. What happens to one claimed
request -- WAN window, priors chosen, instances brought into the cache, pinned and pushed, a
failure's fate -- is ``fetcher.py``'s. May not touch: SQL (that is
:mod:`appliance.store.prefetch`), files (the Receiver writes them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from appliance.config import Settings
from appliance.ingest.receive import Receiver
from appliance.prefetch import orders
from appliance.prefetch.acks import msh_alone
from appliance.prefetch.fetcher import PriorsFetcher
from appliance.store import prefetch as store
from appliance.store import prefetch_retention as retention
from appliance.store.db import Database, now
from appliance.transfer.download import WARM_EVERY_S, HubDownloads
from appliance.transfer.http import hub_proxy
from appliance.transfer.region import RegionClient
from appliance.words import counted

log = logging.getLogger("pas.prefetch")

_MAX_WAITING = 4  # requests in flight (resolving or waiting on a download) per ``parallel``


def _metric(hook: str, *args: Any) -> None:
    """Move a process-wide metric if the ops metrics module offers the hook."""
    try:
        from appliance.ops import metrics

        getattr(metrics, hook)(*args)
    except Exception:  # metrics are never a reason to fail a fetch
        pass


class PrefetchService:
    def __init__(self, settings: Settings, db: Database, receiver: Receiver,
                 on_jobs_created: Callable[[], None] = lambda: None,
                 region_factory: Callable[[], RegionClient | None] | None = None,
                 downloads_factory: Callable[[], HubDownloads | None] | None = None):
        self.settings = settings
        self.config = settings.prefetch
        self.db = db
        self.receiver = receiver
        self.region_factory = region_factory or self._default_region
        self._region: RegionClient | None = None
        self._region_lock = threading.Lock()
        self.downloads_factory = downloads_factory or self._default_downloads
        self._downloads: HubDownloads | None = None
        self._downloads_lock = threading.Lock()  # taken before _region_lock, never inside it
        self._bucketed = self.config.bucketed  # off for good once the hub said it has none
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._mwl_thread: threading.Thread | None = None
        # Requests run side by side (each is mostly round trips: QIDO, then small studies),
        # and their instances share the fetcher's pool, so the link stays busy on a long RTT.
        # At most ``parallel`` resolve their priors at once; one that handed its studies to
        # the batcher waits without a slot (up to ``_MAX_WAITING`` x parallel in all).
        self._resolving: set[int] = set()
        self._maybe_more_due = False
        self._slots_lock = threading.Lock()
        self._requests = ThreadPoolExecutor(self.config.parallel * _MAX_WAITING,
                                            thread_name_prefix="pas-prefetch-req")
        self.fetcher = PriorsFetcher(
            settings, db, receiver, self.stopping, region=self.region,
            downloads=self.downloads, bucketed_unavailable=self._no_bucketed_download,
            others_coming=self._others_coming, resolved=self._resolved,
            on_jobs_created=on_jobs_created)
        self._warm_thread: threading.Thread | None = None

    # --- triggers ----------------------------------------------------------------------------

    def handle_hl7(self, text: str, source: str = "") -> str:
        """One HL7 message in, its ACK out (:func:`appliance.prefetch.orders.handle`): the
        request is committed before the ACK exists, so an ACKed order is never lost."""
        ack, scheduled = orders.handle(self.db, text, source, self._due_at,
                                       self.config.issuer_map.keys(),
                                       self.settings.hl7.processing_ids,
                                       encoding=self.settings.hl7.encoding)
        if scheduled:
            self.wake.set()
        return ack

    def refused_hl7(self, source: str, reason: str, msh: str) -> None:
        """A message the MLLP listener refused before it was read (not framed, too large,
        not finished): audited as the others are (it was only logged), named by its MSH
        when that came whole up to MSH-10."""
        orders.audit_refusal(self.db, source, reason, msh_alone(msh) if msh else None)

    def _due_at(self, scheduled_at: float | None) -> float:
        """As soon as the exam is within ``lead_time_h`` (now if it already is)."""
        if scheduled_at is None:
            return now()
        return max(now(), scheduled_at - self.config.lead_time_h * 3600)

    def request_patient(self, patient_id: str, issuer: str = "", modality: str | None = None,
                        accession: str | None = None) -> store.Scheduled:
        """``pas prefetch patient``: a request now, each call a new one."""
        key = f"manual:{patient_id}|{issuer}|{time.time_ns()}"
        scheduled = store.schedule(self.db, store.NewRequest(
            key, "manual", patient_id, issuer, accession, modality))
        self.wake.set()
        return scheduled

    def on_study_stable(self, study_fk: int) -> None:
        """A local study became stable: fetch that patient's priors for the reading station."""
        if not (self.config.enabled and self.config.on_arrival):
            return
        if self.region() is None:
            return  # no hub enrolled and no DICOMweb region: nothing could be fetched
        study = store.study_patient(self.db, study_fk)
        if study is None or study["origin"] != "local" or not study["patient_id"]:
            return
        modality = (study["modalities"] or "").split(",")[0] or None
        store.schedule(self.db, store.NewRequest(
            f"arrival:{study['study_uid']}", "arrival", study["patient_id"], study["issuer"],
            study["accession_number"], modality))
        self.wake.set()

    # --- the scheduler -------------------------------------------------------------------------

    def start(self) -> None:
        recovered = store.recover(self.db)
        if recovered:
            log.warning("start-up: %d prefetch requests were interrupted; resuming", recovered)
        woken = store.wake_waiting_for_trust(self.db)
        if woken:  # a restart is how a new certificate takes effect
            log.info("start-up: %s waiting for credentials due now",
                     counted(woken, "prefetch request"))
        self._thread = threading.Thread(target=self._loop, name="pas-prefetch", daemon=True)
        self._thread.start()
        if self.config.mwl.enabled:
            self._mwl_thread = threading.Thread(target=self._mwl_loop, name="pas-mwl",
                                                daemon=True)
            self._mwl_thread.start()
        if self.config.enabled and self._bucketed:
            self._warm_thread = threading.Thread(target=self._keep_warm, name="pas-hub-warm",
                                                 daemon=True)
            self._warm_thread.start()

    def _keep_warm(self) -> None:
        """One connection to the hub stays open (a tiny request every WARM_EVERY_S): the first
        search and download of an order skip the TCP and TLS handshakes (two round trips)."""
        opened = False
        while not self.stopping.is_set():
            downloads = self.downloads()
            if downloads is None:
                return  # not enrolled, or no bucketed download: nothing to keep warm
            try:
                downloads.warm()
                if not opened:
                    log.info("hub connection open (kept warm for prefetch)")
                opened = True
            except Exception as exc:  # the hub may be away: try again later
                log.debug("keeping the hub connection warm: %s", exc)
                opened = False
            self.stopping.wait(WARM_EVERY_S)

    def poll_worklist(self) -> int:
        """One worklist poll; how many new requests it scheduled."""
        from appliance.prefetch.mwl import query_worklist, to_request

        created = 0
        for item in query_worklist(self.config.mwl, self.settings.dicom.ae_title):
            request = to_request(item, self.config.lead_time_h, now())
            created += store.schedule(self.db, request, count_repeat=False).created
        if created:
            self.wake.set()
        return created

    def _mwl_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                created = self.poll_worklist()
                if created:
                    log.info("worklist: %d new exams scheduled for prefetch", created)
            except Exception as exc:  # the RIS may be down; poll again later
                log.warning("worklist poll failed: %s", exc)
            self.stopping.wait(self.config.mwl.interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop scheduling; wait up to ``timeout`` in all for the scheduler and the worklist
        poller (fetches under way are told to stop and resume at the next start)."""
        self.stopping.set()
        self.wake.set()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._mwl_thread is not None:
            self._mwl_thread.join(max(0.0, min(self.config.mwl.timeout_s,
                                               deadline - time.monotonic())))
        self._requests.shutdown(wait=False, cancel_futures=True)
        self.fetcher.close()
        if self._region is not None:
            self._region.close()
        if self._downloads is not None:
            self._downloads.close()

    def forget_old(self) -> retention.Pruned:
        """Delete the finished requests, their priors' rows and the HL7 messages older than
        ``prefetch.keep_days`` (:mod:`appliance.store.prefetch_retention`): nothing else
        ever did, and the tables grew by every order for as long as the appliance ran."""
        # "Now" for the retention: never later than the newest row (a clock far ahead would
        # make every row look old; retention.newest_row_at).
        newest = retention.newest_row_at(self.db)
        reference = now() if newest is None else min(now(), newest)
        pruned = retention.prune_prefetch(self.db, reference - self.config.keep_days * 86400,
                                          max_batches=retention.BATCHES_PER_CALL)
        if pruned:
            log.info("forgot %s (%s) and %s over %g days old (prefetch.keep_days)",
                     counted(pruned.requests, "finished prefetch request"),
                     counted(pruned.studies, "prior"),
                     counted(pruned.messages, "HL7 message"), self.config.keep_days)
        return pruned

    def _loop(self) -> None:
        inflight: set[Future[None]] = set()
        # At the first pass, then hourly by the monotonic clock (a wall clock stepped back
        # stopped the pruning until it caught up); a prune that left rows (its batches
        # capped) goes on at the next pass. A wall clock far ahead at boot deletes nothing
        # more: the retention's "now" is the newest row's time at most (forget_old).
        next_prune = 0.0
        while not self.stopping.is_set():
            try:
                self.wake.clear()
                inflight = {f for f in inflight if not f.done()}
                # Resolving is one search (batched: one request for all of them) and
                # waiting holds nothing but a thread: only the total is bounded.
                free = self.config.parallel * _MAX_WAITING - len(inflight)
                if free > 0:
                    claimed = store.claim_due(self.db, limit=free)
                    self.fetcher.priors.expect(int(r["id"]) for r in claimed)
                    with self._slots_lock:
                        self._resolving.update(int(r["id"]) for r in claimed)
                        self._maybe_more_due = len(claimed) == free
                    for request in claimed:
                        inflight.add(self._requests.submit(self._process_then_wake, request))
                else:  # none can join before the gathering batch leaves and ends
                    with self._slots_lock:
                        self._maybe_more_due = False
                self.fetcher.batcher.poke()
                if time.monotonic() >= next_prune and not self.stopping.is_set():
                    more = self.forget_old().more
                    next_prune = time.monotonic() + (0.0 if more else
                                                     retention.RETENTION_INTERVAL_S)
            except Exception:
                log.exception("prefetch pass failed")
            self.wake.wait(self.config.check_interval_s)
        for future in inflight:
            future.cancel()

    def _process_then_wake(self, request: dict[str, Any]) -> None:
        try:
            self.fetcher.process(request)
        except Exception:
            log.exception("prefetch request %s failed", request.get("id"))
        finally:
            self._resolved(int(request["id"]))

    def _resolved(self, request_id: int) -> None:
        """The request no longer resolves its priors: its slot is free (claim the next now)."""
        self.fetcher.priors.not_joining(request_id)  # whatever its path, a batch no longer waits
        with self._slots_lock:
            if request_id not in self._resolving:
                return
            self._resolving.discard(request_id)
        self.wake.set()
        self.fetcher.batcher.poke()

    def _others_coming(self) -> bool:
        """Whether more studies may join the gathering batch: requests still resolving, or
        due requests the scheduler has not claimed yet."""
        with self._slots_lock:
            return bool(self._resolving) or self._maybe_more_due

    def _default_region(self) -> RegionClient | None:
        return RegionClient.from_home(
            self.settings.home, self.config.dicomweb_url, self.config.timeout_s,
            self.config.parallel, lambda n: _metric("add_wan_bytes", "down", n),
            prefetch=self.config, proxy=hub_proxy(self.settings.hub))

    def _default_downloads(self) -> HubDownloads | None:
        region = self.region()
        if self.config.dicomweb_url or region is None:
            return None  # a plain DICOMweb region: no hub to pack for us
        # Its own client: searches and downloads share the connection kept warm.
        downloads = HubDownloads.from_home(self.settings.home, self.config.timeout_s,
                                           lambda n: _metric("add_wan_bytes", "down", n),
                                           lanes=self.config.download_lanes,
                                           rate_bps=self.settings.hub.downlink_bps(),
                                           proxy=hub_proxy(self.settings.hub))
        if downloads is not None:  # a large instance is rebuilt in a spool temp file
            downloads.large_file = lambda: self.receiver.open_spill(b"")
            downloads.large_above = self.settings.dicom.spill_above_mb << 20
        return downloads

    def downloads(self) -> HubDownloads | None:
        """The hub's bucketed download, or None (not enrolled, turned off, not offered)."""
        if not self._bucketed:
            return None
        with self._downloads_lock:
            if self._downloads is None:
                self._downloads = self.downloads_factory()
                if self._downloads is None:
                    self._bucketed = False
            return self._downloads

    def _no_bucketed_download(self) -> None:
        """The hub said it has no bucketed download: WADO-RS from now on (and no keep-warm)."""
        self._bucketed = False

    def region(self) -> RegionClient | None:
        with self._region_lock:
            if self._region is None:
                self._region = self.region_factory()
            return self._region
