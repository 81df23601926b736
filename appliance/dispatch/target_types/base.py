"""The one small interface every destination kind implements.

A target receives a leased :class:`~appliance.store.jobs.Job` and a :class:`SendContext`
and delivers the job's instances. It raises :class:`PermanentError` when retrying cannot
help (the peer refused the data for good), :class:`LinkDown` when the peer could not be
reached at all in this attempt (retried for as long as the outage lasts), any other exception
for a transient failure (retried with backoff, up to ``queue.max_attempts``). It reports
progress through the context so that a retry resumes.

Which kinds raise :class:`LinkDown`, and when: ``hub`` for a transport error (no connection,
or one that went silent); ``dicom`` when no TCP connection to the node opened before
anything else in the attempt (an association rejected or aborted by the node, or one lost
mid-study, is the node answering: counted); ``stowrs`` when the attempt's first request got
no connection after its in-request retries (a 5xx is counted).

:class:`DestinationBusy` (``hub``: still busy after the client's retries, each after the
hub's ``Retry-After``) waits uncounted for the time the destination asked.

:class:`NoRoomForCopy` (``dicom``, when an instance must be re-encoded and the spool has no
room for the copy) also waits uncounted: the cause is the appliance's, not the job's.

:class:`NotConfigured` (a job naming a destination the configuration no longer has: renamed
or removed) waits uncounted for a configuration that names it again (a restart).

:class:`TrustRefused` (``hub`` and ``stowrs``: a certificate refused at either end of the TLS
link, or the hub answering that it no longer accepts this appliance's) waits uncounted too,
and is logged as an error: it is not an outage and needs a person.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.spool import Spool

log = logging.getLogger("pas.dispatch")


class PermanentError(Exception):
    """Delivery cannot succeed by retrying; the job fails at once with this message."""


class LinkDown(Exception):
    """The destination could not be reached at all (no connection, or it went silent): the
    job waits for the link, and the attempt does not count towards ``queue.max_attempts``
    (an outage longer than the attempts' backoff, a WAN cut or a hospital PACS down for a
    weekend's maintenance, must not fail every study queued). Only for a peer that did not
    answer: one that answered with a refusal says something about the job or the peer, and
    is counted. The message becomes the job's ``last_error`` after ``waiting for the link: ``
    (``pas queue list``, the status page): the dicom and stowrs kinds start it with
    ``<destination> unreachable:`` so that its first words say what is going on."""


class TrustRefused(LinkDown):
    """The destination and this appliance do not trust each other: a certificate refused at
    the TLS handshake (expired, revoked, from another CA, a hostname it does not carry), the
    hub answering 403 ``certificate_revoked``, or an archive answering 401/403 to the
    configured password or token. Retrying cannot cure it, and failing the job for it would
    fail every study queued (they all meet it): the job waits, its attempts not counted,
    with the cause in ``last_error`` after ``waiting for credentials: ``, until someone puts
    the credentials right (``pas enroll --replace``, a corrected configuration) and restarts
    PAS, which makes the waiting jobs due at once. A :class:`LinkDown` so that any code
    waiting for the link treats it as such; the dispatcher tells the two apart."""


class NotConfigured(Exception):
    """The job names a destination the configuration in force does not have (renamed or
    removed from the TOML while jobs to it were queued). Not the job's fault, and retrying
    cannot cure it before the configuration names it again, which takes a restart: the job
    waits, its attempts not counted, with the cause in ``last_error`` after ``waiting for
    the configuration: ``; the next start makes such jobs due at once, and they go if that
    configuration names the destination. It failed the job for good at once, and ``pas
    queue retry`` failed it again the same way (review s41). ``pas config check`` says how
    many queued jobs name a destination it does not have."""


class DestinationBusy(Exception):
    """The destination answered that it is busy and named when to come back (the hub's 503
    with ``Retry-After``: it holds as many bucket bodies as its memory allows, every site
    together). Neither the job's fault nor an outage: the job waits ``retry_after_s``, the
    attempt not counted (a hub busy with forty sites' backlog must not fail a study), with
    the cause in ``last_error`` after ``waiting for the destination to free up: ``; a
    transfer then resumes with the buckets the hub does not hold."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoRoomForCopy(Exception):
    """A copy this delivery needs cannot be made now for lack of room on the appliance's
    own disk: a compressed instance re-encoded for a node that does not take its syntax,
    refused below ``storage.min_free_mb`` or past ``storage.quota_mb``. The job waits, and
    the attempt does not count towards ``queue.max_attempts``: room comes back by itself
    (eviction of confirmed studies, the region confirming a backlog, other copies let go),
    and a node without JPEG must not lose its studies (``failed`` after hours of a full
    disk, a WAN outage that left nothing confirmed to evict) to PAS's own disk pressure.
    The message becomes the job's ``last_error`` after ``waiting for room on the spool: ``."""


@dataclass
class SendContext:
    db: Database
    spool: Spool
    owner: str
    lease_s: float
    # Set once the lease is lost, while the attempt runs inside :meth:`renewing` (a target
    # that runs its whole attempt there gives it to its steps: ``dataclasses.replace``).
    lease_lost: threading.Event | None = None

    def files(self, job: job_store.Job) -> list[Any]:
        """The job's instances not yet delivered (a retry resumes where it stopped)."""
        return job_store.job_files(self.db, job.id, unsent_only=True)

    def mark_sent(self, job: job_store.Job, instance_ids: list[int]) -> None:
        job_store.mark_sent(self.db, job.id, instance_ids)

    def left_out(self, job: job_store.Job, rows: list[Any]) -> set[int]:
        """Just before sending ``rows`` (a ``dicom`` instance, a ``stowrs`` batch): the ids
        of those replaced by a correction since the attempt began, taken out of the job and
        counted for its done ``last_error`` (:func:`job_store.leave_out_if_replaced`); the
        caller sends the others. The attempt's start leaves out those replaced by then."""
        ids = job_store.leave_out_if_replaced(self.db, job.id, [int(r["id"]) for r in rows],
                                              self.owner)
        if ids:
            uids = [str(r["sop_instance_uid"]) for r in rows if int(r["id"]) in ids]
            log.warning("job %d to %s: %s", job.id, job.destination, job_store.left_out_said(
                {"count": len(uids), "uids": uids[:3]}),
                extra={"JOB_ID": job.id, "STUDY_UID": job.study_uid})
        return set(ids)

    def keep_alive(self, job: job_store.Job) -> None:
        """Renew the lease; raise if the job was taken over (our lease had expired)."""
        if not job_store.renew_lease(self.db, job.id, self.owner, self.lease_s):
            raise RuntimeError(f"job {job.id}: lease lost, another worker owns it now")

    def still_ours(self, job: job_store.Job, ask: bool = False) -> None:
        """Raise when the job's lease was lost (another worker took the job): a step that
        writes the job's progress or the region's confirmations, or that commits, must not
        follow. The event :meth:`renewing` sets says it within a third of ``lease_s``;
        ``ask``: the database is asked now (the lease renewed if still ours), for the steps
        where "within a third of the lease" is too late (a commit, the confirmations)."""
        if self.lease_lost is not None and self.lease_lost.is_set():
            raise RuntimeError(f"job {job.id}: lease lost, another worker owns it now")
        if ask:
            self.keep_alive(job)

    @contextmanager
    def renewing(self, job: job_store.Job) -> Iterator[threading.Event]:
        """Renew the job's lease every third of ``lease_s`` from a helper thread while the
        block runs, however long one step of it blocks (a C-STORE of a 1 GB instance to a
        slow node). Yields an event set once the lease is lost (another worker took the
        job): the block checks it between steps and stops."""
        lost = threading.Event()
        done = threading.Event()

        def renew() -> None:
            while not done.wait(max(0.1, self.lease_s / 3)):
                try:
                    if not job_store.renew_lease(self.db, job.id, self.owner, self.lease_s):
                        lost.set()
                        return
                except Exception:  # a busy database: the next turn tries again
                    log.exception("job %d: renewing the lease failed", job.id)

        thread = threading.Thread(target=renew, name=f"pas-lease-{job.id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            done.set()
            thread.join()


class TargetType(Protocol):
    kind: str

    def send(self, job: job_store.Job, context: SendContext) -> None: ...
