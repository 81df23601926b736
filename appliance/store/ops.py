"""Read-only queries for operations: metrics at scrape time and the local status page.

Owns: the SQL the ops package needs that the index and job modules do not already offer.
May not touch: any write. Operations read the store; the only change they make (the status
page's retry button) goes through :func:`appliance.store.jobs.retry`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from appliance.store.db import Database, now


def received_by_calling_ae(db: Database) -> list[dict[str, Any]]:
    """Instances (every version) and bytes received since the database was created, per
    calling AE, from the counters the triggers keep (never down: eviction deletes instance
    rows, not these). Fetched studies (no calling AE) count as ``""``."""
    rows = db.query(
        """SELECT label AS calling_ae,
                  sum(CASE WHEN name = 'received_instances' THEN value ELSE 0 END) AS instances,
                  sum(CASE WHEN name = 'received_bytes' THEN value ELSE 0 END) AS bytes
           FROM counters WHERE name IN ('received_instances', 'received_bytes')
           GROUP BY label"""
    )
    return [dict(r) for r in rows]


def received_totals(db: Database) -> dict[str, int]:
    """Instances (every version) and bytes received since the database was created, every
    calling AE together: the sums of :func:`received_by_calling_ae`'s counters, which
    eviction and purge never lower (the cache's own figures, ``index.totals``, they do)."""
    row = db.query_one(
        """SELECT coalesce(sum(CASE WHEN name = 'received_instances' THEN value END), 0)
                      AS instances,
                  coalesce(sum(CASE WHEN name = 'received_bytes' THEN value END), 0) AS bytes
           FROM counters WHERE name IN ('received_instances', 'received_bytes')""")
    return {"instances": int(row["instances"]) if row else 0,
            "bytes": int(row["bytes"]) if row else 0}


def failed_jobs_by_destination(db: Database) -> dict[str, int]:
    rows = db.query("SELECT destination, count(*) AS n FROM jobs WHERE state = 'failed' "
                    "GROUP BY destination")
    return {r["destination"]: int(r["n"]) for r in rows}


def backlog_by_priority(db: Database) -> list[dict[str, Any]]:
    """Per destination and priority: studies waiting and the age of the oldest job. The
    alert rules treat urgent (0) and routine (2) backlogs with different patience."""
    rows = db.query(
        """SELECT destination, priority, count(DISTINCT study_fk) AS studies,
                  min(created_at) AS oldest_created_at
           FROM jobs WHERE state IN ('pending', 'running') GROUP BY destination, priority"""
    )
    at = now()
    # At 0 at least: after the clock stepped back a job's created_at is in the future (the
    # hub refused the heartbeat's negative age whole, and showed the site down).
    return [{**dict(r), "oldest_age_s": round(max(at - r["oldest_created_at"], 0.0), 1)}
            for r in rows]


def recent_studies(db: Database, limit: int = 20) -> list[dict[str, Any]]:
    """The newest studies with what the status page shows about their delivery:

    ``received`` (instances not yet routed: the study is not quiet yet), ``stable`` (routed,
    nothing queued, not confirmed), ``sending`` (a job pending or running), ``failed`` (a job
    gave up), ``confirmed`` (the region's receipt named every instance).
    """
    rows = db.query(
        """SELECT s.id, s.study_uid, p.patient_id, s.patient_name, s.description,
                  s.last_received_at,
                  (SELECT group_concat(DISTINCT se.modality) FROM series se
                     WHERE se.study_fk = s.id) AS modalities,
                  (SELECT count(*) FROM instances i
                     WHERE i.study_fk = s.id AND i.is_current = 1) AS instances,
                  (SELECT count(*) FROM instances i WHERE i.study_fk = s.id
                     AND i.is_current = 1 AND i.confirmed_at IS NOT NULL) AS confirmed,
                  (SELECT count(*) FROM instances i WHERE i.study_fk = s.id
                     AND i.routed_at IS NULL) AS unrouted,
                  (SELECT count(*) FROM jobs j WHERE j.study_fk = s.id
                     AND j.state IN ('pending', 'running')) AS active_jobs,
                  (SELECT count(*) FROM jobs j WHERE j.study_fk = s.id
                     AND j.state = 'failed') AS failed_jobs,
                  (SELECT count(*) FROM jobs j WHERE j.study_fk = s.id
                     AND j.state = 'done') AS done_jobs
           FROM studies s JOIN patients p ON p.id = s.patient_fk
           ORDER BY s.last_received_at DESC LIMIT ?""",
        (limit,),
    )
    result = []
    for row in rows:
        study = dict(row)
        study["state"] = study_state(study)
        result.append(study)
    return result


def study_state(study: dict[str, Any]) -> str:
    if study["instances"] and study["confirmed"] >= study["instances"]:
        return "confirmed"
    if study["failed_jobs"]:
        return "failed"
    if study["active_jobs"]:
        return "sending"
    if study["unrouted"]:
        return "received"
    return "delivered" if study["done_jobs"] else "stable"


def prefetch_queue(db: Database, limit: int = 20) -> list[dict[str, Any]] | None:
    """The prefetch engineer's requests, newest first; None when that part is not installed
    (its tables are absent)."""
    try:
        from appliance.store import prefetch
    except ImportError:
        return None
    try:
        return prefetch.list_requests(db, None)[:limit]
    except (sqlite3.OperationalError, TypeError):
        return None


def schema_version_of(path: Path, *, untouched: bool = False) -> int:
    """The schema version of an existing database file, opened read-only (``pas doctor``
    must not create or migrate anything). ``untouched``: not even the ``-wal``/``-shm``
    files SQLite creates beside a WAL database it reads (:func:`read_only_uri`)."""
    uri = read_only_uri(path, untouched=untouched)
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # fails if not SQLite
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def schema_drift_of(path: Path, migrations: list[str]) -> list[str]:
    """How an existing database's schema differs from the one ``migrations`` make, in words
    (empty: it does not), read only (:mod:`appliance.store.schema_drift`: what the next
    start puts right, or refuses for a table)."""
    from appliance.store.schema_drift import find

    with contextlib.closing(sqlite3.connect(read_only_uri(path), uri=True, timeout=5)) as conn:
        drift = find(conn, migrations)
    return drift.tables + drift.derived_words()


def read_only_uri(path: Path, *, untouched: bool = False) -> str:
    """The URI that opens ``path`` read-only. SQLite reading a WAL database creates its
    ``-wal`` and ``-shm`` files when they are absent and the folder is writable (a stopped
    hub's or daemon's database; as root, for the file's owner), even with ``mode=ro``:
    ``untouched`` then opens it ``immutable`` (nothing created; safe because no process has
    it open, or those files would exist). With them present it is read as usual."""
    uri = f"{path.absolute().as_uri()}?mode=ro"
    if untouched and not any(Path(f"{path}{side}").exists() for side in ("-wal", "-shm")):
        uri += "&immutable=1"
    return uri


def hub_upload_totals(db: Database) -> dict[str, int]:
    """Bytes the uplink put on the wire (sealed buckets) and the original study bytes they
    carried, since the database was created: counters that the hub jobs' progress updates
    add to (a trigger), so a job deleted with its study never takes its bytes back. A
    transfer restarted from scratch counts what it sends again (it crossed the link again)."""
    rows = db.query("SELECT name, value FROM counters WHERE name IN "
                    "('upload_wire_bytes', 'upload_original_bytes')")
    values = {r["name"]: int(r["value"]) for r in rows}
    return {"wire": values.get("upload_wire_bytes", 0),
            "original": values.get("upload_original_bytes", 0)}


def prefetch_lead_times(db: Database, since: float) -> list[float] | None:
    """Lead times (seconds before the scheduled exam; negative: late) of the prefetch requests
    fetched since ``since``; None when the prefetch tables are absent."""
    try:
        rows = db.query(
            """SELECT scheduled_at - finished_at AS lead FROM prefetch_requests
               WHERE state = 'fetched' AND scheduled_at IS NOT NULL
                 AND finished_at IS NOT NULL AND finished_at >= ?""",
            (since,),
        )
    except sqlite3.OperationalError:
        return None
    return [float(r["lead"]) for r in rows]


def prefetch_summary(db: Database, day_s: float = 86400.0) -> dict[str, Any] | None:
    """What ``pas status`` says of the prefetch (None when its tables are absent): requests
    pending and running, those waiting for the link (the region unreachable: tried again
    for as long as the outage lasts, never failed), those failed for good in the last
    ``day_s`` with the newest one's error, and those still not fetched whose exam time has
    passed (late). ``pas status`` said nothing of the prefetch but a certificate refused:
    an outage of the region or requests given up were seen only by ``pas prefetch list``."""
    at = now()
    try:
        row = db.query_one(
            """SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
                      count(*) FILTER (WHERE state = 'running') AS running,
                      count(*) FILTER (WHERE state IN ('pending', 'running')
                                       AND last_error LIKE 'waiting for the link:%')
                          AS waiting_for_link,
                      min(created_at) FILTER (WHERE state IN ('pending', 'running')
                                              AND last_error LIKE 'waiting for the link:%')
                          AS waiting_since,
                      count(*) FILTER (WHERE state = 'failed' AND finished_at >= ?)
                          AS failed_24h,
                      count(*) FILTER (WHERE state IN ('pending', 'running')
                                       AND scheduled_at IS NOT NULL AND scheduled_at < ?)
                          AS late
               FROM prefetch_requests""", (at - day_s, at))
        failed = db.query_one(
            "SELECT last_error FROM prefetch_requests WHERE state = 'failed' AND "
            "finished_at >= ? ORDER BY finished_at DESC LIMIT 1", (at - day_s,))
        link = db.query_one(  # a request tried again meanwhile (running) still waits
            "SELECT last_error FROM prefetch_requests WHERE state IN ('pending', 'running') "
            "AND last_error LIKE 'waiting for the link:%' ORDER BY updated_at DESC LIMIT 1")
    except sqlite3.OperationalError:
        return None
    summary = dict(row) if row is not None else {}
    summary["last_failure"] = failed["last_error"] if failed is not None else None
    summary["link_error"] = link["last_error"].removeprefix("waiting for the link: ") \
        if link is not None else None
    return summary


def newest_stored_time(db: Database) -> float | None:
    """The newest wall time the index holds: its last audit row's or last receipt's (both
    indexed). Ahead of the clock at a start, the clock was set back while PAS was stopped
    (:meth:`appliance.ops.clock.ClockWatch.check_since_stopped`)."""
    row = db.query_one("SELECT max(newest) AS newest FROM ("
                       "SELECT max(at) AS newest FROM audit UNION ALL "
                       "SELECT max(last_received_at) FROM studies)")
    return None if row is None or row["newest"] is None else float(row["newest"])
