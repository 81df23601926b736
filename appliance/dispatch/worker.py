"""Workers: claim the most urgent due job, deliver it, record the outcome.

Every outcome is one transaction (finish, or fail with the next attempt's time). A worker
that dies mid-job leaves a lease that expires; another worker (or the restarted daemon) takes
the job again, and the target resumes from the instances not yet marked sent.

A certificate refused at either end of a destination's TLS link (``TrustRefused``) is not
an outage: the job waits uncounted too (every job would meet it; none may fail for it), the
first of each destination logged as an error, and a restart makes such jobs due at once.

A destination that answered it is busy (``DestinationBusy``: the hub's 503 with
Retry-After) does not use up attempts either: the job comes back after the time it asked.

A destination that could not be reached at all (``LinkDown``) does not use up attempts: the
job waits for the link, tried again after a delay that grows with how long the destination
has been unreachable (``routing/backoff.link_delay``). For the hub that length comes from the
heartbeat's link state; for a local destination (a ``dicom`` PACS, a ``stowrs`` archive) the
dispatcher dates its outage from the first try that found it unreachable, kept with its link
state in the database (``store/uplink.mark_unreachable``) until a job to it goes through, so
that a restart during the outage goes on from the same start. That success also makes every
job waiting for it due at once (the rest of the weekend's backlog goes when the PACS is back,
not up to ``queue.backoff_max_s`` later).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

from appliance.config import Settings
from appliance.dispatch.target_types.base import (
    DestinationBusy,
    LinkDown,
    NoRoomForCopy,
    NotConfigured,
    PermanentError,
    SendContext,
    TargetType,
    TrustRefused,
)
from appliance.routing.backoff import (
    busy_delay,
    link_delay,
    next_delay,
    room_delay,
    trust_delay,
)
from appliance.store import cache as cache_store
from appliance.store import jobs as job_store
from appliance.store import uplink as uplink_store
from appliance.store.db import Database, now
from appliance.store.spool import Spool
from appliance.words import counted

log = logging.getLogger("pas.dispatch")


def _refuse_lost_files(db: Database, spool: Spool, job: job_store.Job) -> None:
    """A job whose instances the region has not confirmed lost their files (flagged missing:
    a lost disk under a restored index) cannot be sent by any number of tries: each one
    failed on ``FileNotFoundError`` for ``queue.max_attempts`` tries, hours of backoff,
    before the job failed naming a spool path. It fails at once, saying what happened and
    what to do. A file sent again since by the modality is back (its flag resolved): the job
    goes on. Only the instances this job still has to send count: the whole study's were
    looked at, and a delta carrying a healthy late instance failed for good because an
    instance the first job had delivered lost its file."""
    lost = [r for r in cache_store.job_files_still_missing(db, spool, job.id)
            if r["confirmed_at"] is None]
    if lost:
        raise PermanentError(
            f"{counted(len(lost), 'instance')} of study {job.study_uid} not yet confirmed by "
            "the region lost their file on this appliance (flagged missing: pas cache "
            "status): this appliance held their only copy. Send the study again from its "
            f"modality (the files come back), then pas queue retry {job.id}")



def _leave_out_replaced(db: Database, job: job_store.Job) -> None:
    """At each attempt's start, a local node's or archive's job leaves out the versions
    the sender replaced since it was routed (same SOP Instance UID, other bytes: no longer
    current) that it has not sent: :func:`job_store.drop_replaced_versions`, remembered for
    the done job's ``last_error``. Routing the correction took them out of the jobs to its
    own destinations only; a job to another (the correction came from another AE, or
    matched another rule) sent the stale version at its next attempt (until 2026-12-07).
    The hub's target does it itself (a transfer begun keeps them until the region confirmed
    their correction)."""
    if job.kind == "hub":
        return
    replaced = job_store.drop_replaced_versions(db, job.id, remember=True)
    if replaced:
        log.warning("job %d to %s: %s", job.id, job.destination, job_store.left_out_said(
            {"count": len(replaced), "uids": replaced[:3]}),
            extra={"JOB_ID": job.id, "STUDY_UID": job.study_uid})


# The failures the destinations raise on purpose, each with a sentence that names the
# destination and what went wrong: their class name added nothing for the operator reading
# pas queue list, pas doctor, the status page or the fleet's errors
# ("ConnectionError: pacs: association with ...").
_SAID_IN_FULL: tuple[type[BaseException], ...] = (RuntimeError, ConnectionError, PermanentError)


def attempt_error(exc: BaseException) -> str:
    """A failed attempt's ``last_error``: the destination's own sentence, or, for anything
    else (a bug: ``KeyError: 'x'`` alone says nothing), the exception's class and text."""
    text = str(exc)
    if text and (type(exc) in _SAID_IN_FULL or isinstance(exc, PermanentError)):
        return text
    return f"{type(exc).__name__}: {text}"

class Dispatcher:
    def __init__(self, settings: Settings, db: Database, spool: Spool,
                 target_for: Callable[[str], TargetType]):
        self.settings = settings
        self.db = db
        self.spool = spool
        self.target_for = target_for
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.owner_prefix = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # Local destinations whose current outage this process has logged (its warning when
        # it began, or the line saying it continues from before this start): one line per
        # outage and process, not per try. The outage's start itself is in the database.
        self._outages_logged: set[str] = set()
        self._outages_lock = threading.Lock()
        # Destinations whose refused certificate this process has logged as an error.
        self._trust_logged: set[str] = set()
        # Destinations named by jobs and missing from the configuration, logged as a warning.
        self._unconfigured_logged: set[str] = set()
        self._started_at = now()

    def run_one(self, owner: str, kinds: tuple[str, ...] | None = None,
                max_priority: int | None = None) -> bool:
        """Claim and run one due job; False when none is due."""
        queue = self.settings.queue
        job = job_store.claim_next(self.db, owner, queue.lease_s, kinds, max_priority,
                                   max_attempts=queue.max_attempts)
        if job is None:
            return False
        context = SendContext(self.db, self.spool, owner, queue.lease_s)
        extra = {"JOB_ID": job.id, "STUDY_UID": job.study_uid}
        target: TargetType | None = None
        try:
            _leave_out_replaced(self.db, job)
            _refuse_lost_files(self.db, self.spool, job)
            target = self.target_for(job.destination)
            target.send(job, context)
        except PermanentError as exc:
            job_store.fail_attempt(self.db, job.id, owner, str(exc), retry_at=None)
            log.error("job %d to %s failed for good: %s", job.id, job.destination, exc,
                      extra=extra)
        except NotConfigured as exc:
            # Renamed or removed from the configuration: a person puts it back (and
            # restarts). Once per destination and process as a warning, then information.
            delay = trust_delay(queue)
            job_store.wait_for_configuration(self.db, job.id, owner, str(exc), now() + delay)
            with self._outages_lock:
                first = job.destination not in self._unconfigured_logged
                self._unconfigured_logged.add(job.destination)
            log.log(logging.WARNING if first else logging.INFO,
                    "job %d waits (next try in %.0fs, not counted as an attempt): %s",
                    job.id, delay, exc, extra=extra)
        except TrustRefused as exc:
            delay = trust_delay(queue)
            job_store.wait_for_trust(self.db, job.id, owner, str(exc), now() + delay)
            # An error, not an outage: it needs a person. Once per destination and process
            # (a backlog meets it once per job and minute), then information.
            with self._outages_lock:
                first = job.destination not in self._trust_logged
                self._trust_logged.add(job.destination)
            log.log(logging.ERROR if first else logging.INFO,
                    "job %d to %s waits for its credentials to be put right (next try in "
                    "%.0fs, not counted as an attempt; jobs to it go on queueing, none fails "
                    "for it): %s", job.id, job.destination, delay, exc, extra=extra)
        except LinkDown as exc:
            down_for, began = self._down_for(job, getattr(target, "name", job.destination))
            delay = link_delay(queue, down_for)
            job_store.wait_for_link(self.db, job.id, owner, str(exc), now() + delay)
            # A weekend's outage is hundreds of tries: the first of a local destination's
            # outage is the warning (once, whatever restarts come), the others are
            # information (``pas status`` shows the link down and the jobs waiting).
            level = logging.WARNING if job.kind == "hub" or began else logging.INFO
            log.log(level, "job %d to %s: destination unreachable for %.1fs, the job waits for "
                    "it (next try in %.1fs, not counted as an attempt): %s", job.id,
                    job.destination, down_for, delay, exc, extra=extra)
        except DestinationBusy as exc:
            delay = busy_delay(queue, exc.retry_after_s)
            job_store.wait_for_peer(self.db, job.id, owner, str(exc), now() + delay)
            log.info("job %d to %s: the destination is busy and asked to come back later (next "
                     "try in %.1fs, not counted as an attempt): %s", job.id, job.destination,
                     delay, exc, extra=extra)
        except NoRoomForCopy as exc:
            delay = room_delay(queue)
            job_store.wait_for_room(self.db, job.id, owner, str(exc), now() + delay)
            # A full disk can last hours (a try a minute): the wait's first try is the
            # warning, the others information (pas queue list shows the jobs waiting).
            waited = (job.last_error or "").startswith(job_store.WAITING_FOR_ROOM)
            log.log(logging.INFO if waited else logging.WARNING,
                    "job %d to %s waits for room on the spool (next try in %.0fs, not "
                    "counted as an attempt): %s", job.id, job.destination, delay, exc,
                    extra=extra)
        except Exception as exc:
            delay = next_delay(queue, job.attempts)
            retry_at = None if delay is None else now() + delay
            state = job_store.fail_attempt(self.db, job.id, owner, attempt_error(exc),
                                           retry_at)
            log.warning("job %d to %s attempt %d failed (%s): %s", job.id, job.destination,
                        job.attempts, f"next in {delay:.0f}s" if delay else state, exc,
                        extra=extra)
        else:
            job_store.finish(self.db, job.id, owner)
            log.info("job %d: study %s delivered to %s", job.id, job.study_uid,
                     job.destination, extra=extra)
            self._reached(job)
        return True

    def _down_for(self, job: job_store.Job, destination: str) -> tuple[float, bool]:
        """How long the destination has been unreachable (0: unknown, or just now), and
        whether this try began a local destination's outage.

        The hub's link state is kept by the heartbeat (``store/uplink.py``). A local
        destination has no heartbeat: its outage is dated from its first ``LinkDown`` since
        its last delivery, so that its jobs' delay grows with the outage instead of staying
        at ``backoff_initial_s`` (a weekend at 5 s per job and try). The start is kept in
        the database: it was in memory, and a restart during the outage set the delay back
        to its shortest and logged the outage's warning again."""
        if job.kind != "hub":
            at = now()
            since, began = uplink_store.mark_unreachable(self.db, job.destination, at)
            with self._outages_lock:  # keyed as _reached() clears it
                first_here = job.destination not in self._outages_logged
                self._outages_logged.add(job.destination)
            if first_here and not began and since < self._started_at:
                log.info("destination %s: outage continues since %s (begun before this "
                         "start); its jobs go on waiting for it", job.destination,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)))
            return max(0.0, at - since), began
        link = uplink_store.link_states(self.db).get(destination)
        if not link or link["state"] != "down" or not link["last_ok_at"]:
            return 0.0, False
        return max(0.0, now() - float(link["last_ok_at"])), False

    def _reached(self, job: job_store.Job) -> None:
        """A job to this destination went through: its outage (if any) is over, and the
        jobs that waited for it are due now."""
        with self._outages_lock:
            self._outages_logged.discard(job.destination)
            self._trust_logged.discard(job.destination)
        was_down = uplink_store.clear_unreachable(self.db, job.destination)
        if was_down:
            woken = job_store.wake_waiting_for_link(self.db, job.kind, job.destination)
            log.warning("destination %s reachable again: %s waiting for it due now",
                        job.destination, counted(woken, "job"))
            self.wake.set()

    def start(self) -> None:
        # A restart is how a new certificate (pas enroll --replace) or CA takes effect: the
        # jobs that waited for one try again now rather than up to a minute later.
        woken = job_store.wake_waiting_for_trust(self.db)
        if woken:
            log.info("%s waiting for credentials due now (start-up)",
                     counted(woken, "job"))
        # And a configuration: the jobs naming a destination it did not have try again (it
        # may name it now; if not, they wait on).
        woken = job_store.wake_waiting_for_trust(self.db, job_store.WAITING_FOR_CONFIG)
        if woken:
            log.info("%s waiting for their destination to be configured due now (start-up)",
                     counted(woken, "job"))
        for number in range(self.settings.queue.workers):
            thread = threading.Thread(target=self._loop, args=(f"{self.owner_prefix}:{number}",),
                                      name=f"pas-worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.settings.hub.urgent_worker:
            # Urgent jobs only: a stroke CT never waits behind long routine uploads.
            thread = threading.Thread(target=self._loop, args=(f"{self.owner_prefix}:urgent", 0),
                                      name="pas-worker-urgent", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the workers to stop and wait up to ``timeout`` in all (not per worker) for
        those still sending: one blocked on the WAN (a silent hub, a PACS that does not
        answer) is left to end with the process.

        Then the jobs this process still holds are pending again, the attempt they were in
        given back (:func:`job_store.give_back_stopped`: one transaction, only this
        process's leases; ``last_error`` "the daemon stopped during attempt N: not
        counted"). A clean stop is not the job's doing: counted, as it was until
        2026-12-07, a long outage with restarts failed the job after ``queue.max_attempts``
        of them. The worker still blocked writes nothing after that (its writes are guarded
        by its lease, which it no longer has). A crash (kill -9) never comes here: its
        attempt stays counted at the next start (``cache.release_host_leases``), the
        protection against a job whose sending kills the daemon."""
        self._stop.set()
        self.wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            given_back = job_store.give_back_stopped(self.db, self.owner_prefix)
        except Exception:  # a stop goes on: the next start releases them, counted
            log.exception("giving back the jobs being sent at the stop failed")
            return
        if given_back:
            log.info("%s being sent when the daemon stopped: pending again, the attempt "
                     "not counted", counted(given_back, "job"))

    def _loop(self, owner: str, max_priority: int | None = None) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_one(owner, max_priority=max_priority)
            except Exception:
                log.exception("worker %s: unexpected error", owner)
                busy = False
            if not busy:
                self.wake.wait(self.settings.queue.poll_interval_s)
                self.wake.clear()
