"""The job queue as operators see it: read-only views of jobs and job_instances for
``pas queue``, ``pas status``, the status page, the metrics and ``pas config check``.

Owns: those SELECTs. May not touch: any write (every change of a job is jobs.py's, one
transaction each). Split from jobs.py (past 700 lines); jobs.py names these too.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from appliance.store.db import Database, now
from appliance.store.job_order import holding_back


def list_jobs(db: Database, state: str | None = None, limit: int = 200, *,
              job_id: int | None = None) -> list[dict[str, Any]]:
    """Newest first (only ``job_id``, when given); ``waits_for_job``: for a pending job held
    back by another job to the same destination (of its study, or of another study holding
    another version of one of its instances: :func:`claim_next`), the first such job, else
    None."""
    conditions, params = [], []
    if state:
        conditions, params = ["j.state = ?"], [state]
    if job_id is not None:
        conditions.append("j.id = ?")
        params.append(job_id)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = db.query(
        f"""SELECT j.id, j.kind, j.destination, s.study_uid, j.priority, j.state, j.attempts,
                   j.next_attempt_at, j.last_error, j.rule, j.created_at, j.finished_at,
                   (SELECT count(*) FROM job_instances ji WHERE ji.job_id = j.id) AS instances,
                   (SELECT count(*) FROM job_instances ji WHERE ji.job_id = j.id
                      AND ji.sent_at IS NOT NULL) AS sent,
                   CASE WHEN j.state = 'pending'
                        THEN (SELECT min(other.id) {holding_back('j')}) END AS waits_for_job
            FROM jobs j JOIN studies s ON s.id = j.study_fk
            {where} ORDER BY j.id DESC LIMIT ?""",
        (now(), now(), *params, limit),
    )
    return [dict(r) for r in rows]


def count_jobs(db: Database, state: str | None = None) -> int:
    """How many jobs (in ``state``, when given): what :func:`list_jobs` shows a part of."""
    where, params = ("WHERE state = ?", (state,)) if state else ("", ())
    return int(db.query(f"SELECT count(*) FROM jobs {where}", params)[0][0])


def counts_by_state(db: Database) -> dict[str, dict[str, int]]:
    """``{kind: {state: count}}``."""
    result: dict[str, dict[str, int]] = {}
    for row in db.query("SELECT kind, state, count(*) AS n FROM jobs GROUP BY kind, state"):
        result.setdefault(row["kind"], {})[row["state"]] = int(row["n"])
    return result


def waiting_for_credentials(db: Database) -> list[dict[str, Any]]:
    """Per destination whose jobs wait for credentials to be put right (``TrustRefused``):
    how many, and the latest refusal, as the job recorded it (without its prefix). Such jobs
    never fail, so the "failed jobs" signals (the status page, ``pas_jobs_failed``, the
    hub's dashboard) no longer show them: this does."""
    from appliance.store.jobs import WAITING_FOR_TRUST  # jobs.py imports this module

    rows = db.query(
        """SELECT destination, count(*) AS jobs, max(updated_at) AS since_latest,
                  (SELECT last_error FROM jobs latest WHERE latest.destination = j.destination
                     AND latest.state IN ('pending', 'running') AND latest.last_error LIKE ?
                   ORDER BY latest.updated_at DESC LIMIT 1) AS last_error
           FROM jobs j WHERE state IN ('pending', 'running') AND last_error LIKE ?
           GROUP BY destination ORDER BY destination""",
        (WAITING_FOR_TRUST + "%", WAITING_FOR_TRUST + "%"))
    return [{"destination": r["destination"], "jobs": int(r["jobs"]),
             "error": (r["last_error"] or "")[len(WAITING_FOR_TRUST):]} for r in rows]


def naming_unconfigured(conn: sqlite3.Connection, configured: list[str]
                        ) -> list[dict[str, Any]]:
    """Per destination the jobs name that is not among ``configured`` (renamed or removed
    from the configuration; ``hub`` aside: the enrolment makes it): how many jobs are
    queued (pending or running: they wait for a configuration naming it again) and how many
    failed (an older version failed them at once; ``pas queue retry`` sends them once it is
    named again). On a connection of its own (``pas config check`` reads the home's database
    read only, with no :class:`Database`)."""
    rows = conn.execute(_UNCONFIGURED, (json.dumps(configured),)).fetchall()
    return [{"destination": r[0], "queued": int(r[1]), "failed": int(r[2])} for r in rows]


_UNCONFIGURED = """SELECT destination, sum(state IN ('pending', 'running')) AS queued,
                          sum(state = 'failed') AS failed
                   FROM jobs WHERE destination != 'hub'
                         AND destination NOT IN (SELECT value FROM json_each(?))
                         AND state IN ('pending', 'running', 'failed')
                   GROUP BY destination ORDER BY destination"""


def waiting_for_configuration(db: Database, configured: list[str]) -> list[dict[str, Any]]:
    """:func:`naming_unconfigured` on the daemon's (or a command's) :class:`Database`: per
    destination the jobs name and ``configured`` does not, how many are queued (they wait,
    uncounted, for a configuration naming it again: ``NotConfigured``) and how many failed.
    Such jobs never fail, and only ``pas config check`` said so: ``pas status`` (its JSON's
    ``unconfigured_destinations``), ``pas doctor`` and the heartbeat's errors show them now
    (review s41, F-C), as :func:`waiting_for_credentials` those refused credentials."""
    rows = db.query(_UNCONFIGURED, (json.dumps(configured),))
    return [{"destination": r["destination"], "queued": int(r["queued"]),
             "failed": int(r["failed"])} for r in rows]


def backlog_studies(db: Database) -> int:
    """Studies with a job not yet delivered, each once whatever its destinations: the sum of
    :func:`backlog_by_destination`'s ``studies`` counts a study routed to two destinations
    twice."""
    row = db.query_one("SELECT count(DISTINCT study_fk) AS n FROM jobs "
                       "WHERE state IN ('pending', 'running')")
    return int(row["n"]) if row else 0


def backlog_by_destination(db: Database) -> list[dict[str, Any]]:
    """Per destination: studies and bytes not yet delivered, and the age of the oldest job."""
    rows = db.query(
        """SELECT j.destination, j.kind, count(DISTINCT j.study_fk) AS studies,
                  min(j.created_at) AS oldest_created_at,
                  coalesce(sum((SELECT coalesce(sum(i.size), 0) FROM job_instances ji
                       JOIN instances i ON i.id = ji.instance_fk
                       WHERE ji.job_id = j.id AND ji.sent_at IS NULL)), 0) AS bytes
           FROM jobs j WHERE j.state IN ('pending', 'running')
           GROUP BY j.destination, j.kind"""
    )
    at = now()
    # At 0 at least, as backlog_by_priority: after the clock stepped back a job's created_at
    # is in the future (the status page and `pas status` showed a negative age).
    return [
        {**dict(r), "oldest_age_s": round(max(at - r["oldest_created_at"], 0.0), 1)}
        for r in rows
    ]
