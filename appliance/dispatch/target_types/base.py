"""The one small interface every destination kind implements.

A target receives a leased :class:`~appliance.store.jobs.Job` and a :class:`SendContext`
and delivers the job's instances. It raises :class:`PermanentError` when retrying cannot
help (the peer refused the data for good), any other exception for a transient failure
(retried with backoff). It reports progress through the context so that a retry resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.spool import Spool


class PermanentError(Exception):
    """Delivery cannot succeed by retrying; the job fails at once with this message."""


@dataclass
class SendContext:
    db: Database
    spool: Spool
    owner: str
    lease_s: float

    def files(self, job: job_store.Job) -> list[Any]:
        """The job's instances not yet delivered (a retry resumes where it stopped)."""
        return job_store.job_files(self.db, job.id, unsent_only=True)

    def mark_sent(self, job: job_store.Job, instance_ids: list[int]) -> None:
        job_store.mark_sent(self.db, job.id, instance_ids)

    def keep_alive(self, job: job_store.Job) -> None:
        """Renew the lease; raise if the job was taken over (our lease had expired)."""
        if not job_store.renew_lease(self.db, job.id, self.owner, self.lease_s):
            raise RuntimeError(f"job {job.id}: lease lost, another worker owns it now")


class TargetType(Protocol):
    kind: str

    def send(self, job: job_store.Job, context: SendContext) -> None: ...
