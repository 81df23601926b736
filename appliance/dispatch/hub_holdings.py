"""The holdings question a ``hub`` destination asks before a new transfer of adopted instances.

Owns: what the uplink (``dispatch/target_types/hub.py``) does with instances start-up recovery
adopted (an index rebuilt or restored: the region's confirmations were lost with the old
one) before it cuts them into a transfer: asking the hub which of them, and of the study's
adopted older versions, the region holds with the same bytes; confirming those from the
signed statement and marking them sent, in one transaction with the job's
``progress["holdings"]``; a prior (the region's from another site) confirmed and never sent.
May not touch: SQL (through ``appliance.store.jobs``), the statement's format and signature
check (``appliance.transfer.holdings``, the client's ``verify``), the transfer itself.

Why apart from the uplink: the question is an economy, never a condition of sending, and
runs once per adopted study; the transfer's identity, buckets, commit and receipt are the
uplink's. Logged under the uplink's logger (``pas.dispatch.hub``), as it was.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from appliance.dispatch.target_types.base import SendContext
from appliance.store import jobs as job_store
from appliance.store.jobs import Job
from appliance.transfer.client import HubClient, HubRefused
from appliance.transfer.link_failures import trust_problem
from appliance.words import counted

log = logging.getLogger("pas.dispatch.hub")


def prior_line(study_uid: str, priors: int, regional: bool) -> str:
    """The log line and audit detail for a study's instances the region holds from another
    site (a prior fetched here, adopted again after a rebuilt index)."""
    if regional:
        return (f"study {study_uid}: {counted(priors, 'instance')} "
                f"{'is' if priors == 1 else 'are'} the region's (a prior): filed as regional, "
                "not sent")
    return (f"study {study_uid}: {counted(priors, 'instance')} "
            f"{'is' if priors == 1 else 'are'} the region's, sent by another site: confirmed, "
            "not sent; the study stays this site's (it holds instances of its own)")


def settle_holdings(client: HubClient, job: Job, context: SendContext,
                    rows: list[Any]) -> tuple[Job, list[Any]]:
    """Before a new transfer of instances start-up recovery adopted (an index rebuilt or
    restored: the region's confirmations were lost with the old one), ask the hub which
    of them the region holds with the same bytes; confirm those from its signed
    statement and mark them sent. Returns the job (its progress updated) and the rows
    the transfer carries. The job's ``progress["holdings"]`` is the state: present, the
    question was answered (in the transaction that confirmed), and a resumed attempt
    sends exactly the rows not sent; absent with a transfer, a transfer from before this
    step, sent as it was. No question at all in the normal path (nothing adopted).

    The same question asks about the study's adopted older versions (a correction
    superseded them: never sent, so no receipt would ever confirm them again, and the
    study would never be evictable); those held are confirmed, not sent.

    Pairs the statement lists as the region's from another site (``region_instances``:
    a prior this site fetched) are confirmed and never sent, whatever else the study
    holds; in the same transaction the study is filed regional again when they are all
    of it, and they leave the study's jobs to local nodes (which waited for this)."""
    from appliance.transfer import holdings

    if "holdings" in job.progress:
        return job, [r for r in rows if r["sent_at"] is None]
    candidates = holdings.may_be_held(rows)
    if job.progress.get("transfer_id") or not candidates:
        return job, rows
    extra = {"JOB_ID": job.id, "STUDY_UID": job.study_uid}
    older = job_store.older_adopted_versions(context.db, job.id)
    asked = holdings.question(job.study_uid, [*candidates, *older])
    try:
        statement = client.holdings(asked)
    except HubRefused as exc:
        if trust_problem(exc) is not None:
            raise
        # The question is an economy, never a condition of sending: send it all.
        log.warning("study %s: the hub refused the holdings question (%s): sending "
                    "every instance", job.study_uid, exc, extra=extra)
        statement, state = None, f"refused: {exc}"
    else:
        state = "answered" if statement is not None else "the hub has no holdings call"
    pairs: dict[tuple[str, str], bool] = {}  # held -> the region's last word on its UID
    elsewhere: set[tuple[str, str]] = set()  # held, sent by another site: priors
    if statement is not None:
        try:
            pairs = holdings.held_pairs(statement, asked, client.verify)
            elsewhere = holdings.region_pairs(statement, asked)
        except holdings.StatementInvalid as exc:
            raise RuntimeError(str(exc)) from None
    # A prior (another site's study this one fetched from the region, adopted again):
    # confirmed and never uploaded as this site's, whatever else the study holds.
    priors = [r for r in candidates if (r["sop_instance_uid"], r["sha256"]) in elsewhere]
    pairs.update({pair: True for pair in elsewhere})
    # Confirmed: every pair held. Not sent: those that are also the region's last word
    # (a correction the region holds under an older version sent after it goes again).
    held = [r for r in candidates if pairs.get((r["sop_instance_uid"], r["sha256"]))]
    unsent = [r for r in rows if r["sent_at"] is None]
    held_ids = {r["id"] for r in held}
    rest = [r for r in unsent if r["id"] not in held_ids]
    settled: dict[str, Any] = {"state": state, "asked": len(candidates), "held": len(held)}
    if priors:
        settled["region_held"] = len(priors)
    older_held = sum(1 for r in older if (r["sop_instance_uid"], r["sha256"]) in pairs)
    not_last = sum(1 for r in candidates
                   if pairs.get((r["sop_instance_uid"], r["sha256"])) is False)
    also = ""
    if older:
        settled.update(older_asked=len(older), older_held=older_held)
        also = f" and {counted(older_held, 'older version')}"
    if not_last:
        settled.update(not_last=not_last)
        also += (f" ({not_last} more held, but another version of each came after: "
                 "sent again)")
    progress = {**job.progress, "holdings": settled}
    said = (f"the region already holds {len(held)} of {len(unsent)} instances of study "
            f"{job.study_uid}{also}: confirmed from its signed statement, "
            f"sending {len(rest)}"
            if statement is not None else
            f"the hub could not say which of the {counted(len(candidates), 'adopted instance')}"
            f" of study {job.study_uid} the region holds ({state}): sending {len(rest)}")
    told: list[str] = []

    def prior_said(regional: bool) -> str:
        told.append(prior_line(job.study_uid, len(priors), regional))
        return told[-1]

    context.still_ours(job, ask=True)  # the hub may have held its answer: still this job's?
    confirmed, _regional = job_store.confirm_held(
        context.db, job.id, sorted(pairs), sorted(held_ids), progress,
        job.study_uid, said, [r["id"] for r in priors], prior_said if priors else None)
    if told:  # the last: a transaction retried after a busy database told it again
        log.info("%s", told[-1], extra=extra)
    log.info("%s (%d newly confirmed)", said, confirmed, extra=extra)
    return dataclasses.replace(job, progress=progress), rest
