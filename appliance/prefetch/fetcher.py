"""Working one prefetch request: from the WAN window to the priors pinned in the cache.

Owns: what happens to a request the scheduler (``service.py``) claimed: deferred outside the
WAN windows; its priors chosen, by the hub's priors route (search, choice and download in one
round trip, ``priors.py``) or a search (the hub's batched one, else QIDO-RS) then the rules
here; the missing instances brought into the cache through the ingest Receiver (origin
"regional") -- by the hub's bucketed download (``batch.py``: one streamed request for the
studies wanted together, every file's SHA-256 checked), else by WADO-RS, several in flight --;
each prior pinned for ``pin_days`` and queued to the workstations its rule names; and what a
failure becomes (an attempt counted, a wait for the link, a wait for credentials). May not
touch: SQL (that is :mod:`appliance.store.prefetch`), files (the Receiver writes them), the
scheduler's threads and slots (told through ``resolved``), the region's clients (made and
closed by the service; given here as ``region`` and ``downloads``).

Downloads share the link with uploads: before each instance, the fetch steps aside while an
urgent upload to the hub is waiting, so a stroke CT never queues behind a prior.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from appliance.config import PrefetchRule, Settings
from appliance.ingest.receive import Receiver
from appliance.prefetch import rules as prefetch_rules
from appliance.prefetch.batch import (
    DownloadBatcher,
    SearchBatcher,
    Ticket,
    Unsearchable,
    refuse_unsearchable,
)
from appliance.prefetch.priors import PriorsBatcher, PriorsRefused, PriorsUnavailable, patient_key
from appliance.prefetch.rules import Candidate
from appliance.store import jobs as job_store
from appliance.store import prefetch as store
from appliance.store.db import Database, now
from appliance.transfer.download import DownloadUnavailable, HubDownloads
from appliance.transfer.download_frames import UID, RebuiltFile
from appliance.transfer.enrolment import load_enrolment
from appliance.transfer.link_failures import (
    TRUST_HINT,
    credentials_refused,
    link_down,
    trust_problem,
)
from appliance.transfer.region import RegionClient, RegionError, RegionInstance
from appliance.words import counted

log = logging.getLogger("pas.prefetch")

# Held instances a priors request may name for one patient (~70 bytes each); a patient with
# more held on site takes the two-step path, which names only the studies chosen.
MAX_HELD_INSTANCES = 5000
# At least this long between the tries of a request whose credentials the hub refuses: only
# a person cures it, and the restart after the cure makes such requests due at once.
TRUST_RETRY_S = 60.0


class PriorsFetcher:
    """Works the requests the scheduler claims, each on a thread of its own (``process``)."""

    def __init__(self, settings: Settings, db: Database, receiver: Receiver,
                 stopping: threading.Event,
                 region: Callable[[], RegionClient | None],
                 downloads: Callable[[], HubDownloads | None],
                 bucketed_unavailable: Callable[[], None],
                 others_coming: Callable[[], bool],
                 resolved: Callable[[int], None],
                 on_jobs_created: Callable[[], None]):
        self.settings = settings
        self.config = settings.prefetch
        self.db = db
        self.receiver = receiver
        self.stopping = stopping
        # The region's clients, made when first asked for and closed by the service, which
        # ``bucketed_unavailable`` tells that the hub said it has no bucketed download.
        self.region, self.downloads = region, downloads
        self.bucketed_unavailable = bucketed_unavailable
        # The request no longer resolves its priors: the scheduler frees its slot.
        self.resolved = resolved
        self.on_jobs_created = on_jobs_created
        self._trust_refused = False  # logged as an error once, until a request succeeds
        # How many instance fetches waited for an urgent upload (tests and status read it).
        self.stepped_aside = 0
        self.batcher = DownloadBatcher(
            downloads, self._file_regional, self._record_bucket, others_coming,
            self._wait_for_urgent_uploads, threading.Semaphore(self.config.download_streams),
            self.config.download_bucket_kb * 1024, stopping)
        self.searcher = SearchBatcher(downloads)
        self.priors = PriorsBatcher(downloads, self.batcher)
        # The hub's priors route (search, choice and download in one round trip) is asked when it
        # offers one; off for good once the hub said it has none.
        self.priors_route = True
        self._batched_search = True  # off for good once the hub said it has none
        self._pool = ThreadPoolExecutor(self.config.parallel * 2,
                                        thread_name_prefix="pas-prefetch")

    def close(self) -> None:
        """Drop the instance fetches not started yet (those under way see ``stopping``)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, request: dict[str, Any]) -> None:
        """One claimed request to its end or its next try: it never stays running, whatever
        fails (a failure is counted as an attempt unless the link or the credentials were)."""
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
                if not store.defer(self.db, request_id, now() + self.config.retry_after_s,
                                   f"waiting for the link: {exc}"[:500]):
                    log.info("prefetch %d for %s: cancelled while it ran (%s): not tried "
                             "again", request_id, request["patient_id"], exc)
                    return
                log.warning("prefetch %d for %s: the region is unreachable, waiting for the "
                            "link (next try in %.0f s, not counted as an attempt): %s",
                            request_id, request["patient_id"], self.config.retry_after_s, exc)
                return
            # An ID that names no one patient, or that the region cannot be searched by,
            # fails for good: another try searches the same (an ADT merge or a corrected
            # order makes the request pending again).
            attempts = 0 if isinstance(exc, Unsearchable) else self.config.max_attempts
            state = store.fail_attempt(self.db, request_id, str(exc), attempts,
                                       now() + self.config.retry_after_s, request)
            log.warning("prefetch %d for %s: %s (%s)", request_id, request["patient_id"], exc,
                        state)
            return
        # The lead time achieved is read from prefetch_requests by the metrics collector.
        if not store.finish(self.db, request_id, request):
            log.info("prefetch %d for %s: its order changed while it ran (the patient merged "
                     "into another, the procedure changed or the exam moved): pending again, "
                     "for what it now asks", request_id, request["patient_id"])
            return
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
            # Refused here, alone (and a priors request gathering this burst waits for it no
            # longer): in a batched search or priors request the hub's 422 failed every
            # patient of the burst with it (a wildcard, an ID over 64 characters), and
            # QIDO-RS would match other patients.
            refuse_unsearchable(request["patient_id"], issuer)
            resolved = self._priors_in_one_request(request, rule, issuer, current)
        finally:
            self.priors.not_joining(request_id)  # joined and answered, or the two-step path
        if resolved is not None:
            chosen, tickets = resolved
        else:
            chosen, tickets = self._search_then_submit(request, rule, region, issuer, current)
        self.resolved(request_id)
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
                self.bucketed_unavailable()
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
            # Moved here to another study since (evicted from this one): not this prior's.
            moved = store.current_elsewhere(self.db, candidate.study_uid,
                                            [i.sop_instance_uid for i in missing])
            missing = [i for i in missing if i.sop_instance_uid not in moved]
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
                content.file, content.digest, source=store.REGION_SOURCE, origin="regional",
                pin_until=self._pin_until())
            return received.instance_id, received.size
        received = self.receiver.receive_file(content, source=store.REGION_SOURCE,
                                              origin="regional", pin_until=self._pin_until())
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
                expect_sop_instance_uid=instance.sop_instance_uid, pin_until=self._pin_until())
        except Exception as exc:  # one bad instance must not stop the others
            return f"{instance.sop_instance_uid}: {exc}"
        store.mark_fetched_routed(self.db, received.instance_id)
        store.add_progress(self.db, request_id, 1, received.size)
        return None

    def _pin_until(self) -> float:
        """Until when a prior is pinned: from the filing of its first fetched instance on
        (each is confirmed as it is filed: unpinned, the eviction pass took a prior half
        fetched), and again once the whole study is on site (:meth:`_pin_and_push`)."""
        return now() + self.config.pin_days * 86400

    def _pin_and_push(self, study_uid: str, push_to: list[str], rule_name: str) -> None:
        """Pin the prior, and queue its ``push_to`` jobs. It routes nothing: the fetched
        instances were filed routed (held by the region), and an instance of the site's own
        not routed yet (a late delta of a study already "complete on site") is the stability
        pass's to route to the hub. Marked routed here, as it was, it had no hub job ever,
        and never reached the region (review s41)."""
        store.pin_study(self.db, study_uid, self._pin_until())
        if not push_to:
            return
        study_fk, ids = store.instance_ids_of_study(self.db, study_uid)
        if not ids:
            return
        jobs = [job_store.NewJob(self.settings.destinations[name].kind, name, 2,
                                 f"prefetch:{rule_name}", ids) for name in push_to]
        job_store.route_study(self.db, study_fk, [], jobs)
        self.on_jobs_created()
