"""Which job waits for which: the order in which a study's deltas and a corrected
instance's versions reach a destination.

Owns: :func:`holding_back`, the SQL the claim (``jobs.claim_next``) and the queue's listing
(``jobs.list_jobs``) share to find the jobs that hold another back. May not touch: rows
(it only reads); the claim itself stays in :mod:`appliance.store.jobs`.

Why its own module: the rules grew one by one (a delta behind its study's running job, a hub
job behind the earlier ones of its study, a job behind the holdings question, a correction
that moved an instance to another study, 2026-12-07 for the hub) and each is a paragraph of
why; beside the queue's transitions they made jobs.py hard to read.
"""

from __future__ import annotations


def holding_back(job: str) -> str:
    """SQL ``FROM ... WHERE ...`` over the jobs (``other``) that hold back the job aliased
    ``job`` (see ``jobs.claim_next``), with two parameters: now, now. Shared by the claim,
    which skips such a job, and ``jobs.list_jobs``, which says what it waits for: a job held
    back showed as pending and due, with no reason, while it did not start."""
    return f"""FROM jobs other WHERE other.id != {job}.id
            AND ((other.study_fk = {job}.study_fk
                  AND ((other.destination = {job}.destination
                        AND ((other.state = 'running' AND other.lease_until >= ?)
                             OR ({job}.kind = 'hub' AND other.id < {job}.id
                                 AND other.state IN ('pending', 'running'))))
                       OR ({job}.kind != 'hub' AND {_HUB_ASKS_FIRST})))
                 OR ({job}.kind != 'hub' AND other.study_fk != {job}.study_fk
                     AND other.destination = {job}.destination
                     AND other.state = 'running' AND other.lease_until >= ?
                     AND {_OTHER_VERSION_THERE.format(job=job)})
                 OR ({job}.kind = 'hub' AND other.id IN ({_EARLIER_HUB_VERSION.format(job=job)})
                     AND other.kind = 'hub' AND other.study_fk != {job}.study_fk
                     AND other.destination = {job}.destination AND other.id < {job}.id
                     AND +other.state IN ('pending', 'running')))"""


# A job being sent to the same node from another study that holds another version of one of
# this job's unsent instances (a correction that moved an instance to another study, same
# SOP Instance UID): that job may still send its version (its list of instances was read
# when its attempt began; routing this one took the stale version out of its rows only), so
# this one waits, as a delta of the same study does, and its version arrives last.
_OTHER_VERSION_THERE = """EXISTS (
    SELECT 1 FROM job_instances mine_ji
    JOIN instances mine ON mine.id = mine_ji.instance_fk
    JOIN instances theirs ON theirs.sop_instance_uid = mine.sop_instance_uid
                         AND theirs.id != mine.id
    WHERE mine_ji.job_id = {job}.id AND mine_ji.sent_at IS NULL
      AND theirs.study_fk = other.study_fk)"""


# A hub job also waits for every earlier hub job to its destination, of ANOTHER study,
# pending or running, that holds (unsent) another version of one of its unsent instances (a
# correction that moved an instance to another study, same SOP Instance UID): as it waits for
# the earlier hub jobs of its own study, and for the same reason. A transfer's manifest is
# fixed once it began (routing cannot take the stale version out of it) and the region keeps
# the version it archived last: the correction, committed first beside an earlier job in
# backoff, was followed by the stale version (until 2026-12-07). A hub job's instance is
# "sent" once a receipt named it (or the region's holdings statement settled it): until
# then the earlier job may still commit its version.
# Cheap on every claim: of two versions at most one is current, so one of the two jobs holds
# a non-current version. Those (the UIDs of the non-current instances unsent in pending or
# running hub jobs: ``jobs_ready``, ``instances_study``) are read once per statement; a job
# whose study holds no version of one of them stops at ``gate``, and the others look from
# those UIDs (``instances_sop``), never through their own instances (65,000 for a large
# study); the jobs found are read by id (``+other.state``: not among every job queued). The
# CROSS JOINs and the unary + keep SQLite on that order.
_STALE_IN_HUB_JOBS = """SELECT stale.sop_instance_uid FROM jobs stale_job
    JOIN instances stale ON stale.study_fk = stale_job.study_fk AND stale.is_current = 0
    JOIN job_instances stale_ji ON stale_ji.job_id = stale_job.id
                               AND stale_ji.instance_fk = stale.id
    WHERE stale_job.kind = 'hub' AND stale_job.state IN ('pending', 'running')
      AND stale_ji.sent_at IS NULL"""
_EARLIER_HUB_VERSION = f"""SELECT theirs_ji.job_id
    FROM (SELECT 1 WHERE {{job}}.study_fk IN (
              SELECT involved.study_fk FROM instances involved
              WHERE involved.sop_instance_uid IN ({_STALE_IN_HUB_JOBS})) LIMIT 1) gate
    CROSS JOIN instances mine
    CROSS JOIN job_instances mine_ji ON mine_ji.job_id = {{job}}.id
                                    AND mine_ji.instance_fk = mine.id
    JOIN instances theirs ON theirs.sop_instance_uid = mine.sop_instance_uid
                         AND theirs.study_fk != mine.study_fk
    JOIN jobs theirs_job ON theirs_job.study_fk = theirs.study_fk
    JOIN job_instances theirs_ji ON theirs_ji.job_id = theirs_job.id
                                AND theirs_ji.instance_fk = theirs.id
    WHERE mine.sop_instance_uid IN ({_STALE_IN_HUB_JOBS})
      AND +mine.study_fk = {{job}}.study_fk
      AND mine_ji.sent_at IS NULL AND theirs_ji.sent_at IS NULL"""


# A hub job of the study that will ask the holdings question (instances start-up recovery
# adopted, not sent, no transfer begun, no answer yet: ``dispatch/hub_holdings.py``): the
# study's other jobs wait for the answer, which says whether its instances are a prior (the
# region's, from another site), never forwarded as a new study (:func:`confirm_held`).
_HUB_ASKS_FIRST = """other.kind = 'hub' AND other.state IN ('pending', 'running')
    AND json_extract(coalesce(other.progress, '{}'), '$.holdings') IS NULL
    AND json_extract(coalesce(other.progress, '{}'), '$.transfer_id') IS NULL
    AND EXISTS (SELECT 1 FROM job_instances oji JOIN instances oi ON oi.id = oji.instance_fk
                WHERE oji.job_id = other.id AND oji.sent_at IS NULL
                  AND oi.source_address = 'recovery')"""
