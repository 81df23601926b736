"""The prefetch service: triggers in, priors fetched from the region into the local cache.

Owns: turning triggers (an HL7 message, a new local study, ``pas prefetch patient``) into
durable requests, and the scheduler thread that works them: when due and inside a WAN window,
QIDO-RS the region for the patient's studies, choose priors by the rules, skip what is already
complete on site, bring the missing instances into the cache through the ingest Receiver
(origin "regional") -- by the hub's bucketed download when it offers one (one streamed request
per study, JPEG-LS + zstd buckets, every file's SHA-256 checked), else by WADO-RS, several
in flight -- pin each study for ``pin_days``, and optionally queue a
C-STORE of the priors to the workstations a rule names. May not touch: SQL (that is
:mod:`appliance.store.prefetch`), files (the Receiver writes them).

Downloads share the link with uploads: before each instance, the fetch steps aside while an
urgent upload to the hub is waiting, so a stroke CT never queues behind a prior.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from appliance.config import PrefetchRule, Settings
from appliance.ingest.receive import Receiver
from appliance.prefetch import orders
from appliance.prefetch import rules as prefetch_rules
from appliance.prefetch.batch import DownloadBatcher, SearchBatcher, Ticket
from appliance.prefetch.priors import PriorsBatcher, PriorsRefused, PriorsUnavailable, patient_key
from appliance.prefetch.rules import Candidate
from appliance.store import jobs as job_store
from appliance.store import prefetch as store
from appliance.store.db import Database, now
from appliance.transfer.client import TRUST_HINT, credentials_refused, link_down, trust_problem
from appliance.transfer.download import WARM_EVERY_S, DownloadUnavailable, HubDownloads
from appliance.transfer.download_frames import UID, RebuiltFile
from appliance.transfer.enrolment import load_enrolment
from appliance.transfer.region import RegionClient, RegionError, RegionInstance
from appliance.words import counted

log = logging.getLogger("pas.prefetch")

_MAX_WAITING = 4  # requests in flight (resolving or waiting on a download) per ``parallel``
# Held instances a priors request may name for one patient (~70 bytes each); a patient with
# more held on site takes the two-step path, which names only the studies chosen.
MAX_HELD_INSTANCES = 5000
# At least this long between the tries of a request whose credentials the hub refuses: only
# a person cures it, and the restart after the cure makes such requests due at once.
TRUST_RETRY_S = 60.0


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
        self.on_jobs_created = on_jobs_created
        self.region_factory = region_factory or self._default_region
        self._region: RegionClient | None = None
        self._region_lock = threading.Lock()
        self._trust_refused = False  # logged as an error once, until a request succeeds
        self.downloads_factory = downloads_factory or self._default_downloads
        self._downloads: HubDownloads | None = None
        self._downloads_lock = threading.Lock()  # taken before _region_lock, never inside it
        self._streams = threading.Semaphore(self.config.download_streams)
        self._bucketed = self.config.bucketed  # off for good once the hub said it has none
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._mwl_thread: threading.Thread | None = None
        # How many instance fetches waited for an urgent upload (tests and status read it).
        self.stepped_aside = 0
        # Requests run side by side (each is mostly round trips: QIDO, then small studies),
        # and their instances share one pool, so the link stays busy on a long RTT. At most
        # ``parallel`` resolve their priors at once; one that handed its studies to the
        # batcher waits without a slot (up to ``_MAX_WAITING`` x parallel in all).
        self._resolving: set[int] = set()
        self._maybe_more_due = False
        self._slots_lock = threading.Lock()
        self._requests = ThreadPoolExecutor(self.config.parallel * _MAX_WAITING,
                                            thread_name_prefix="pas-prefetch-req")
        self.batcher = DownloadBatcher(
            self.downloads, self._file_regional, self._record_bucket, self._others_coming,
            self._wait_for_urgent_uploads, self._streams, self.config.download_bucket_kb * 1024,
            self.stopping)
        self.searcher = SearchBatcher(self.downloads)
        self.priors = PriorsBatcher(self.downloads, self.batcher)
        # The hub's priors route (search, choice and download in one round trip) is asked when it
        # offers one; off for good once the hub said it has none.
        self.priors_route = True
        self._batched_search = True  # off for good once the hub said it has none
        self._warm_thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(self.config.parallel * 2,
                                        thread_name_prefix="pas-prefetch")

    # --- triggers ----------------------------------------------------------------------------

    def handle_hl7(self, text: str, source: str = "") -> str:
        """One HL7 message in, its ACK out (:func:`appliance.prefetch.orders.handle`): the
        request is committed before the ACK exists, so an ACKed order is never lost."""
        ack, scheduled = orders.handle(self.db, text, source, self._due_at,
                                       self.config.issuer_map.keys())
        if scheduled:
            self.wake.set()
        return ack

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
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._region is not None:
            self._region.close()
        if self._downloads is not None:
            self._downloads.close()

    def _loop(self) -> None:
        inflight: set[Future[None]] = set()
        while not self.stopping.is_set():
            try:
                self.wake.clear()
                inflight = {f for f in inflight if not f.done()}
                # Resolving is one search (batched: one request for all of them) and
                # waiting holds nothing but a thread: only the total is bounded.
                free = self.config.parallel * _MAX_WAITING - len(inflight)
                if free > 0:
                    claimed = store.claim_due(self.db, limit=free)
                    self.priors.expect(int(r["id"]) for r in claimed)
                    with self._slots_lock:
                        self._resolving.update(int(r["id"]) for r in claimed)
                        self._maybe_more_due = len(claimed) == free
                    for request in claimed:
                        inflight.add(self._requests.submit(self._process_then_wake, request))
                else:  # none can join before the gathering batch leaves and ends
                    with self._slots_lock:
                        self._maybe_more_due = False
                self.batcher.poke()
            except Exception:
                log.exception("prefetch pass failed")
            self.wake.wait(self.config.check_interval_s)
        for future in inflight:
            future.cancel()

    def _process_then_wake(self, request: dict[str, Any]) -> None:
        try:
            self.process(request)
        except Exception:
            log.exception("prefetch request %s failed", request.get("id"))
        finally:
            self._resolved(int(request["id"]))

    def _resolved(self, request_id: int) -> None:
        """The request no longer resolves its priors: its slot is free (claim the next now)."""
        self.priors.not_joining(request_id)  # whatever its path, a batch no longer waits
        with self._slots_lock:
            if request_id not in self._resolving:
                return
            self._resolving.discard(request_id)
        self.wake.set()
        self.batcher.poke()

    def _others_coming(self) -> bool:
        """Whether more studies may join the gathering batch: requests still resolving, or
        due requests the scheduler has not claimed yet."""
        with self._slots_lock:
            return bool(self._resolving) or self._maybe_more_due

    def _default_region(self) -> RegionClient | None:
        return RegionClient.from_home(
            self.settings.home, self.config.dicomweb_url, self.config.timeout_s,
            self.config.parallel, lambda n: _metric("add_wan_bytes", "down", n))

    def _default_downloads(self) -> HubDownloads | None:
        region = self.region()
        if self.config.dicomweb_url or region is None:
            return None  # a plain DICOMweb region: no hub to pack for us
        # Its own client: searches and downloads share the connection kept warm.
        downloads = HubDownloads.from_home(self.settings.home, self.config.timeout_s,
                                           lambda n: _metric("add_wan_bytes", "down", n),
                                           lanes=self.config.download_lanes,
                                           rate_bps=self.settings.hub.downlink_bps())
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

    def region(self) -> RegionClient | None:
        with self._region_lock:
            if self._region is None:
                self._region = self.region_factory()
            return self._region

    def process(self, request: dict[str, Any]) -> None:
        request_id = int(request["id"])
        moment = dt.datetime.now()
        if not prefetch_rules.in_window(self.config.windows, moment):
            opens = prefetch_rules.next_window_start(self.config.windows, moment)
            store.defer(self.db, request_id, opens.timestamp(),
                        f"outside the WAN windows: waits for {opens:%Y-%m-%d %H:%M}")
            return
        try:
            self._fetch(request)
        except Exception as exc:  # any failure is an attempt: the request never stays running
            problem = self._credentials_refused(exc)
            if problem is not None:
                # The hub refuses this appliance's certificate (revoked, expired): every
                # order would meet it and none is at fault. Counted, an afternoon's wait
                # for a new enrolment failed every order received meanwhile for good.
                store.wait_for_trust(self.db, request_id,
                                     now() + max(self.config.retry_after_s, TRUST_RETRY_S),
                                     f"the region: {problem}; {TRUST_HINT}")
                first = not self._trust_refused
                self._trust_refused = True
                log.log(logging.ERROR if first else logging.INFO,
                        "prefetch %d for %s waits for its credentials to be put right (not "
                        "counted as an attempt): %s; %s", request_id, request["patient_id"],
                        problem, TRUST_HINT)
                return
            if link_down(exc):
                # The region could not be reached at all: nothing to hold against this
                # request. Counted, a WAN outage of a few minutes (max_attempts x
                # retry_after_s) failed every order received meanwhile for good.
                store.defer(self.db, request_id, now() + self.config.retry_after_s,
                            f"waiting for the link: {exc}"[:500])
                log.warning("prefetch %d for %s: the region is unreachable, waiting for the "
                            "link (next try in %.0f s, not counted as an attempt): %s",
                            request_id, request["patient_id"], self.config.retry_after_s, exc)
                return
            state = store.fail_attempt(self.db, request_id, str(exc), self.config.max_attempts,
                                       now() + self.config.retry_after_s)
            log.warning("prefetch %d for %s: %s (%s)", request_id, request["patient_id"], exc,
                        state)
            return
        # The lead time achieved is read from prefetch_requests by the metrics collector.
        store.finish(self.db, request_id)
        self._trust_refused = False  # the next refusal is news again: logged as an error

    def _credentials_refused(self, exc: BaseException) -> str | None:
        """Why the hub refuses this appliance's credentials, if that failed the request (its
        own certificate's dates read only then)."""
        enrolment = None
        if link_down(exc):
            try:
                enrolment = load_enrolment(self.settings.home)
            except Exception:  # a damaged enrolment is the start-up check's to report
                enrolment = None
        return credentials_refused(exc, enrolment)

    def _fetch(self, request: dict[str, Any]) -> None:
        request_id = int(request["id"])
        rule = prefetch_rules.rule_for(self.config.rules, request["modality"])
        if rule is None or rule.priors == 0:
            store.record_found(self.db, request_id, rule.name if rule else "-", [])
            return
        region = self.region()
        if region is None:
            raise RegionError("not enrolled with a hub and no prefetch.dicomweb_url set")
        issuer = (self.config.region_issuer(request["issuer"]) or "") if request["issuer"] \
            else ""
        current = request["dedup_key"].removeprefix("arrival:") \
            if request["trigger"] == "arrival" else None
        try:
            resolved = self._priors_in_one_request(request, rule, issuer, current)
        finally:
            self.priors.not_joining(request_id)  # joined and answered, or the two-step path
        if resolved is not None:
            chosen, tickets = resolved
        else:
            chosen, tickets = self._search_then_submit(request, rule, region, issuer, current)
        self._resolved(request_id)
        store.record_found(self.db, request_id, rule.name, [
            {"study_uid": c.study_uid, "study_date": c.study_date,
             "modalities": ",".join(sorted(c.modalities)), "instances_expected": c.instances}
            for c in chosen])
        failures = []
        link_errors = []  # the failures that were the link's (each study's own cause kept)
        refused: list[RegionError] = []  # those where the hub refused our certificate
        for candidate in chosen:
            if self.stopping.is_set():
                raise RegionError("stopping: the fetch resumes at the next start")
            if candidate.study_uid in tickets and tickets[candidate.study_uid] is None:
                store.set_study_state(self.db, request_id, candidate.study_uid, "on_site")
                log.info("prior %s already complete on site", candidate.study_uid)
                self._pin_and_push(candidate.study_uid, rule.push_to, rule.name)
                continue
            try:
                self._fetch_study(request_id, region, candidate,
                                  tickets.get(candidate.study_uid))
            except RegionError as exc:
                store.set_study_state(self.db, request_id, candidate.study_uid, "failed")
                failures.append(f"{candidate.study_uid}: {exc}")
                if trust_problem(exc) is not None:
                    refused.append(exc)
                elif link_down(exc):
                    link_errors.append(exc)
                continue
            self._pin_and_push(candidate.study_uid, rule.push_to, rule.name)
        if failures:
            error = RegionError("; ".join(failures)[:400])
            if refused:  # credentials refused: none of the studies is at fault
                raise error from refused[0]
            if len(link_errors) == len(failures):  # only the link failed them: not counted
                raise error from link_errors[0]
            raise error

    def _priors_in_one_request(
            self, request: dict[str, Any], rule: PrefetchRule, issuer: str,
            current: str | None) -> tuple[list[Candidate], dict[str, Ticket | None]] | None:
        """The chosen priors and their tickets by the hub's priors route (search, choice and
        download in one round trip), or None when this request takes the two-step path: an
        older hub, a rule that needs series-level attributes, more held instances than a
        request should carry, a batch the hub refused, or a download of this patient's
        studies on its way down (the hub would send again what that one is bringing; the
        two-step path joins it)."""
        downloads = self.downloads()
        if (not self.priors_route or downloads is None or not downloads.hub_has_priors
                or rule.same == "body_part"
                or any(len(request[key] or "") > 64 for key in ("modality",
                                                                 "accession_number"))):
            return None
        if self.batcher.downloading_for(patient_key(request["patient_id"], issuer)):
            log.info("prefetch %s: a download for patient %s is under way: a search, then "
                     "its priors join it", request["id"], request["patient_id"])
            return None
        held = store.held_by_patient(self.db, request["patient_id"], MAX_HELD_INSTANCES)
        if held is None:
            return None
        patient = {"patient_id": request["patient_id"], "issuer": issuer,
                   "rule": {"priors": rule.priors, "max_age_days": rule.max_age_days,
                            "same": rule.same},
                   "modality": request["modality"], "accession": request["accession_number"],
                   "current_study_uid": current if current and UID.match(current) else None,
                   "held": {study: uids for study, uids in held.items() if UID.match(study)}}
        try:
            return self.priors.resolve(int(request["id"]), patient, self.stopping)
        except PriorsRefused:
            return None
        except PriorsUnavailable as exc:
            log.info("%s: a search, then a download, from now on", exc)
            self.priors_route = False
            return None
        except InterruptedError as exc:
            raise RegionError(str(exc)) from None

    def _search_then_submit(
            self, request: dict[str, Any], rule: PrefetchRule, region: RegionClient,
            issuer: str, current: str | None,
    ) -> tuple[list[Candidate], dict[str, Ticket | None]]:
        """The two-step path: search (the hub's batched search, else QIDO-RS), choose here,
        hand the studies to download to the batcher (tickets; None: complete on site)."""
        request_id = int(request["id"])
        rows = self._search_studies(region, request["patient_id"], issuer)
        candidates = [c for c in map(prefetch_rules.candidate_from_qido, rows) if c]
        if rule.same == "body_part":
            candidates = [self._with_body_parts(region, c) for c in candidates]
        chosen = prefetch_rules.choose_priors(
            rule, candidates, modality=request["modality"], body_part=request["body_part"],
            accession=request["accession_number"], current_study_uid=current)
        # Every study to download is handed to the batcher at once (it joins the priors other
        # requests want now in one stream), before this request's bookkeeping commits; then
        # the request no longer counts as resolving.
        tickets: dict[str, Ticket | None] = {}
        downloads = self.downloads()
        patient = patient_key(request["patient_id"], issuer)
        for candidate in chosen:
            local = store.local_instance_count(self.db, candidate.study_uid)
            if candidate.instances is not None and local >= candidate.instances > 0:
                tickets[candidate.study_uid] = None  # complete on site
            elif downloads is not None:
                held = store.held_instance_uids(self.db, candidate.study_uid)
                tickets[candidate.study_uid] = self.batcher.submit(
                    request_id, candidate.study_uid, held, patient)
        return chosen, tickets

    def _search_studies(self, region: RegionClient, patient_id: str,
                        issuer: str) -> list[dict[str, Any]]:
        """The patient's studies at the region: by the hub's batched search when it offers
        one (orders arriving together share one round trip), else QIDO-RS."""
        if self._batched_search and self.downloads() is not None:
            try:
                return self.searcher.search(patient_id, issuer)
            except DownloadUnavailable as exc:
                log.info("the hub offers no batched search (%s): QIDO-RS from now on", exc)
                self._batched_search = False
        return region.search_studies(patient_id, issuer)

    def _with_body_parts(self, region: RegionClient,
                         candidate: prefetch_rules.Candidate) -> prefetch_rules.Candidate:
        parts = {str(row.get("00180015", {}).get("Value", [""])[0]).upper()
                 for row in region.series_of(candidate.study_uid)}
        return prefetch_rules.Candidate(candidate.study_uid, candidate.study_date,
                                        candidate.accession_number, candidate.modalities,
                                        candidate.instances, frozenset(parts - {""}))

    def _fetch_study(self, request_id: int, region: RegionClient,
                     candidate: prefetch_rules.Candidate, ticket: Ticket | None) -> None:
        held = store.held_instance_uids(self.db, candidate.study_uid)
        filed = None
        if ticket is not None:
            # The hub lists the study itself: no instance-level QIDO first (one round trip
            # fewer on a long link); it sends only what is not in ``held``. A cut raises
            # DownloadError (a RegionError): what was filed stays, the retry asks for the rest.
            try:
                ticket.wait(self.stopping)
            except InterruptedError as exc:
                raise RegionError(str(exc)) from None
            if ticket.unavailable:
                self._bucketed = False
            elif ticket.error is not None:
                if isinstance(ticket.error, RegionError):
                    raise ticket.error
                raise RegionError(f"{type(ticket.error).__name__}: {ticket.error}") \
                    from ticket.error
            else:
                filed = ticket.filed
        if filed is not None:
            how, total, missing = "bucketed download", len(filed), []
        else:
            how = "WADO-RS"
            missing = [i for i in region.instances_of(candidate.study_uid)
                       if i.sop_instance_uid not in held]
            total = len(missing)
        # One WADO-RS request per instance, several in flight: measured faster than one
        # streamed request per series (region.stream_series): single-instance answers came
        # gzip-compressed from the archive, the series stream did not (docs/benchmarks.md).
        results = self._pool.map(lambda item: self._fetch_one(request_id, region, item),
                                 missing)
        errors = [r for r in results if r]
        if errors:
            raise RegionError(f"{len(errors)} of {counted(len(missing), 'instance')} failed, "
                              f"first: {errors[0]}")
        store.study_fetched(self.db, request_id, candidate.study_uid,
                            f"request {request_id}: {counted(total, 'instance')} from the "
                            f"region ({how})")
        log.info("prior %s fetched: %s (%s)", candidate.study_uid, counted(total, "instance"),
                 how, extra={"STUDY_UID": candidate.study_uid})

    def _file_regional(self, uid: str, content: bytes | RebuiltFile) -> tuple[int, int]:
        """A downloaded file into the cache. Not checked against ``uid`` (the hub's label, read
        from the file meta): the bytes are the region's file, SHA-256 checked; the Receiver
        reads the dataset. A large one comes already in a spool temp file (RebuiltFile)."""
        if isinstance(content, RebuiltFile):
            received = self.receiver.receive_spilled_file(
                content.file, content.digest, source=store.REGION_SOURCE, origin="regional")
            return received.instance_id, received.size
        received = self.receiver.receive_file(content, source=store.REGION_SOURCE,
                                              origin="regional")
        return received.instance_id, received.size

    def _record_bucket(self, request_id: int, filed: list[tuple[int, int]]) -> None:
        store.record_fetched(self.db, request_id, [i for i, _ in filed],
                             sum(size for _, size in filed))

    def _wait_for_urgent_uploads(self) -> None:
        if store.urgent_uploads_waiting(self.db):
            self.stepped_aside += 1  # urgent uploads keep the link
            while store.urgent_uploads_waiting(self.db) and not self.stopping.is_set():
                self.stopping.wait(0.5)

    def _fetch_one(self, request_id: int, region: RegionClient,
                   instance: RegionInstance) -> str | None:
        """One instance from the region into the cache; an error string, or None."""
        self._wait_for_urgent_uploads()
        try:
            content = region.retrieve_instance(instance)
            received = self.receiver.receive_file(
                content, source=store.REGION_SOURCE, origin="regional",
                expect_sop_instance_uid=instance.sop_instance_uid)
        except Exception as exc:  # one bad instance must not stop the others
            return f"{instance.sop_instance_uid}: {exc}"
        store.mark_fetched_routed(self.db, received.instance_id)
        store.add_progress(self.db, request_id, 1, received.size)
        return None

    def _pin_and_push(self, study_uid: str, push_to: list[str], rule_name: str) -> None:
        store.pin_study(self.db, study_uid, now() + self.config.pin_days * 86400)
        if not push_to:
            return
        study_fk, ids = store.instance_ids_of_study(self.db, study_uid)
        if not ids:
            return
        jobs = [job_store.NewJob(self.settings.destinations[name].kind, name, 2,
                                 f"prefetch:{rule_name}", ids) for name in push_to]
        job_store.route_study(self.db, study_fk, ids, jobs)
        self.on_jobs_created()
