"""The durable job queue: one row per (study delta, destination), leased by workers.

Owns: the SQL of jobs and job_instances. A job is claimed with a lease; a worker that dies
leaves a lease that expires, and the job is claimed again. Every transition is one
transaction. May not touch: files or the network; the retry *policy* (backoff) is computed by
the caller and passed in.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from appliance.store import audit, awaiting_hub
from appliance.store.db import Database, now
from appliance.store.job_order import holding_back

# The queue as operators see it (read only: pas queue, pas status, the status page, the
# metrics, pas config check) lives in job_views.py; named here too, the queue's one door.
from appliance.store.job_views import backlog_by_destination as backlog_by_destination
from appliance.store.job_views import backlog_studies as backlog_studies
from appliance.store.job_views import count_jobs as count_jobs
from appliance.store.job_views import counts_by_state as counts_by_state
from appliance.store.job_views import list_jobs as list_jobs
from appliance.store.job_views import naming_unconfigured as naming_unconfigured
from appliance.store.job_views import waiting_for_configuration as waiting_for_configuration
from appliance.store.job_views import waiting_for_credentials as waiting_for_credentials
from appliance.words import counted


@dataclass(frozen=True)
class NewJob:
    kind: str
    destination: str
    priority: int
    rule: str
    instance_ids: list[int]


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    destination: str
    study_fk: int
    study_uid: str
    priority: int
    attempts: int
    progress: dict[str, Any]
    last_error: str | None = None  # the previous attempt's (a wait says what it waits for)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(row["id"], row["kind"], row["destination"], row["study_fk"],
                   row["study_uid"], row["priority"], row["attempts"],
                   json.loads(row["progress"]) if row["progress"] else {},
                   row["last_error"])


def route_study(db: Database, study_fk: int, routed_ids: list[int], jobs: list[NewJob],
                awaiting_hub_ids: list[int] = ()) -> None:  # type: ignore[assignment]
    """Mark instances routed and create their jobs, all in one transaction; the instances
    no destination took before the appliance was enrolled (``awaiting_hub_ids``) are filed
    for the hub (:mod:`appliance.store.awaiting_hub`) in the same one."""
    at = now()
    with db.transaction() as conn:
        conn.executemany("UPDATE instances SET routed_at = ? WHERE id = ? AND routed_at IS NULL",
                         [(at, i) for i in routed_ids])
        awaiting_hub.hold(conn, awaiting_hub_ids, at)
        for job in jobs:
            cursor = conn.execute(
                """INSERT INTO jobs (kind, destination, study_fk, priority, state, attempts,
                       next_attempt_at, rule, created_at, updated_at)
                   VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)""",
                (job.kind, job.destination, study_fk, job.priority, at, job.rule, at, at),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO job_instances (job_id, instance_fk) VALUES (?, ?)",
                [(cursor.lastrowid, i) for i in job.instance_ids],
            )
            if job.kind != "hub":
                _drop_superseded(conn, job.destination, int(cursor.lastrowid or 0),
                                 job.instance_ids)


def _drop_superseded(conn: sqlite3.Connection, destination: str, new_job: int,
                     instance_ids: list[int]) -> None:
    """Take the other versions of these instances out of the earlier jobs to the same
    destination that have not sent them yet: the new job carries the sender's last word.

    Why: a corrected version (same SOP Instance UID, other bytes) routed while the first
    version's job waited for a retry was delivered at once, and the older job sent the stale
    version after it, overwriting the correction at the node. Only for destinations that
    read a job's unsent instances at each attempt (``dicom``, ``stowrs``), not for the hub,
    whose transfer's manifest is fixed once it began."""
    # A job carries instances of its own study only: the jobs that may hold an older
    # version are found by that version's study (indexed), not among every job queued to
    # the destination (a weekend's backlog).
    pairs: list[tuple[int, int]] = []
    for instance_id in instance_ids:
        for old in conn.execute(
                """SELECT other.id, other.study_fk FROM instances this JOIN instances other
                       ON other.sop_instance_uid = this.sop_instance_uid AND other.id != this.id
                   WHERE this.id = ?""", (instance_id,)).fetchall():
            pairs.extend((job[0], old[0]) for job in conn.execute(
                "SELECT id FROM jobs WHERE study_fk = ? AND destination = ? AND id != ? "
                "AND state != 'done'", (old[1], destination, new_job)))
    conn.executemany(
        "DELETE FROM job_instances WHERE job_id = ? AND instance_fk = ? AND sent_at IS NULL",
        pairs)
    # A failed (or waiting) job left with nothing to send is over: the newer job delivers
    # what it had left. Kept failed, it stayed in the failed-jobs signals for nothing. A
    # running one finishes by itself.
    at = now()
    conn.executemany(
        """UPDATE jobs SET state = 'done', finished_at = ?, updated_at = ?, last_error = ?
           WHERE id = ? AND state IN ('failed', 'pending') AND NOT EXISTS (
               SELECT 1 FROM job_instances WHERE job_id = jobs.id AND sent_at IS NULL)""",
        [(at, at, f"what was left to send was superseded by newer versions (job {new_job})",
          job_id) for job_id in sorted({job_id for job_id, _ in pairs})])


_JOB_SELECT = """SELECT j.*, s.study_uid FROM jobs j JOIN studies s ON s.id = j.study_fk"""


WORKER_DIED = "the worker died while sending it"
STOPPED_DURING = "the daemon stopped during attempt "
EARLIER = "; before it: "


def keeping_earlier(message_sql: str) -> str:
    """A SQL expression: ``message_sql`` (an interrupted attempt: the daemon stopped, the
    worker died), then what the attempt before it ended with, from the row's ``last_error``.

    Why: an interruption's message took the place of the real problem: a job failing
    against a PACS that refuses it, given back at an upgrade's stop, said only "the daemon
    stopped during attempt 3: not counted" in ``pas queue list``, and the operator lost
    why it had been failing (until 2026-12-07). Interruptions do not pile up: one after
    another keeps the first real error only."""
    interrupted = (f"(last_error LIKE '{STOPPED_DURING}%' "
                   f"OR last_error LIKE '{WORKER_DIED}%')")
    return f"""substr({message_sql} || CASE
        WHEN last_error IS NULL OR last_error = '' THEN ''
        WHEN {interrupted} AND instr(last_error, '{EARLIER}') > 0
            THEN substr(last_error, instr(last_error, '{EARLIER}'))
        WHEN {interrupted} THEN ''
        ELSE '{EARLIER}' || last_error END, 1, 2000)"""


_EXPIRED = keeping_earlier(
    f"'{WORKER_DIED} (its lease expired during attempt ' || attempts || ')'")


def claim_next(db: Database, owner: str, lease_s: float,
               kinds: tuple[str, ...] | None = None,
               max_priority: int | None = None,
               max_attempts: int | None = None) -> Job | None:
    """Lease the most urgent job that is due: pending and ready, or running with an expired
    lease (its worker died). Urgent first, then oldest. ``max_priority`` (0 = urgent only)
    lets a dedicated worker take only urgent jobs, so a long routine upload never delays them.

    An attempt is counted when a job is claimed and is not given back when its worker dies
    (an expired lease here, a released one at start-up: ``cache.release_host_leases``).
    With ``max_attempts``, a job whose attempts are all spent that way is failed instead of
    claimed again: a job whose sending kills the daemon (a codec's segfault, the OOM killer)
    once made it crash at every restart, for ever. One kill -9 during a send costs one
    attempt; the job resumes.

    A job waits while another job of the same study to the same destination is being sent
    (a live lease): a study's delta, e.g. a corrected version of an instance, reaches the
    node after the first job's instances, never beside them (the node would keep whichever
    version came last). A job to the hub also waits for every earlier job of its study to
    the hub that is still pending (a retry's backoff, a link down): the region (the embedded
    archive, a DICOMweb archive that overwrites) keeps the version it archived last, and a
    hub transfer's manifest cannot drop a superseded instance as a local node's job does
    (:func:`_drop_superseded`). Jobs of the same study to the hub therefore go one after
    the other, in the order they were routed; a failed one no longer holds the next.
    A job to a local node also waits while a job of *another* study to that node is being
    sent that holds another version of one of its unsent instances (a correction that put
    the Study Instance UID right: the same instance, now another study's;
    ``job_order._OTHER_VERSION_THERE``). A job to the hub waits likewise, across studies, for
    every earlier job to the hub still pending or running that holds another version of one
    of its unsent instances (``job_order._EARLIER_HUB_VERSION``): a correction moved to another
    study was committed before the first study's job, in backoff, archived the stale
    version after it.
    A job to another destination also waits while the study's hub job has the holdings
    question to ask (``job_order._HUB_ASKS_FIRST``): its answer takes a prior's instances out of
    it (:func:`confirm_held`)."""
    at = now()
    kind_filter = ""
    params: list[Any] = [at, at]
    if kinds:
        kind_filter = f"AND kind IN ({','.join('?' * len(kinds))})"
        params.extend(kinds)
    if max_priority is not None:
        kind_filter += " AND priority <= ?"
        params.append(max_priority)
    # Nothing due, the usual answer to an idle worker's poll: read so, without the write
    # transaction below (its lock, its UPDATE). Polling 5 times a second (the tests'), each
    # idle worker used 12 ms of CPU a second that way, three on every appliance (measured
    # 2026-12-06). Something due that the transaction then finds held back, or another
    # worker claims first: as before.
    if not db.query(f"""SELECT 1 FROM jobs
                        WHERE ((state = 'pending' AND next_attempt_at <= ?)
                               OR (state = 'running' AND lease_until < ?)) {kind_filter}
                        LIMIT 1""", params):
        return None
    # One job at a time per study and destination: a delta (a correction among it) sent
    # beside the study's first job, still on its way, was overtaken by the stale version.
    # To the hub, also not before an earlier job of the study that is waiting (a retry, the
    # link): the region keeps the version it archived last, and the earlier job's transfer
    # cannot drop its stale version (its manifest is fixed once it began); nor before an
    # earlier one of another study holding another version of one of its instances.
    kind_filter += f" AND NOT EXISTS (SELECT 1 {holding_back('jobs')})"
    params.extend((at, at))
    with db.transaction() as conn:
        if max_attempts is not None:
            conn.execute(
                f"""UPDATE jobs SET state = 'failed', finished_at = ?, updated_at = ?,
                       last_error = 'no attempt left (' || attempts || ' of ' || ? || '); the '
                           || 'last: ' || CASE WHEN state = 'running' THEN {_EXPIRED}
                                               ELSE coalesce(last_error, '?') END,
                       lease_owner = NULL, lease_until = NULL
                   WHERE attempts >= ? AND ((state = 'running' AND lease_until < ?)
                                            OR (state = 'pending' AND next_attempt_at <= ?))""",
                (at, at, max_attempts, max_attempts, at, at),
            )
        row = conn.execute(
            f"""SELECT id FROM jobs
                WHERE ((state = 'pending' AND next_attempt_at <= ?)
                       OR (state = 'running' AND lease_until < ?)) {kind_filter}
                ORDER BY priority, created_at, id LIMIT 1""",
            params,
        ).fetchone()
        if row is None:
            return None
        conn.execute(
            f"""UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?,
                   last_error = CASE WHEN state = 'running' THEN {_EXPIRED}
                                     ELSE last_error END,
                   lease_until = ?, updated_at = ? WHERE id = ?""",
            (owner, at + lease_s, at, row["id"]),
        )
        claimed = conn.execute(f"{_JOB_SELECT} WHERE j.id = ?", (row["id"],)).fetchone()
        return Job.from_row(claimed)


def renew_lease(db: Database, job_id: int, owner: str, lease_s: float) -> bool:
    """Extend a lease; False if the job is no longer ours (it expired and was re-claimed).
    Stamps ``updated_at`` with the instant the lease runs from, as a claim does: the clock
    watch tells by it a lease written before a wall-clock step from one written after
    (:func:`appliance.store.cache.shift_for_clock_step`)."""
    with db.transaction() as conn:
        at = now()
        cursor = conn.execute(
            "UPDATE jobs SET lease_until = ?, updated_at = ? "
            "WHERE id = ? AND lease_owner = ? AND state = 'running'",
            (at + lease_s, at, job_id, owner),
        )
        return cursor.rowcount == 1


def save_progress(db: Database, job_id: int, progress: dict[str, Any],
                  owner: str | None = None) -> bool:
    """Save a job's progress; with ``owner``, only while that worker holds the job's lease
    (a worker whose lease another took must not write over the new owner's progress).
    Whether it was saved."""
    only = "" if owner is None else "AND lease_owner = ? AND state = 'running'"
    with db.transaction() as conn:
        cursor = conn.execute(f"UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? {only}",
                              (json.dumps(progress), now(), job_id,
                               *(() if owner is None else (owner,))))
        return cursor.rowcount == 1


def finish(db: Database, job_id: int, owner: str) -> None:
    """The job delivered. Its ``last_error`` is cleared, or says what its attempts left out
    (:func:`drop_replaced_versions` with ``remember``), as a job :func:`_drop_superseded`
    ended says why."""
    at = now()
    with db.transaction() as conn:
        row = conn.execute("SELECT progress FROM jobs WHERE id = ? AND lease_owner = ?",
                           (job_id, owner)).fetchone()
        if row is None:
            return
        left_out = json.loads(row[0]).get(LEFT_OUT) if row[0] else None
        if left_out:
            left_out = _still_replaced(conn, left_out)
        conn.execute(
            """UPDATE jobs SET state = 'done', finished_at = ?, updated_at = ?, last_error = ?,
                   lease_owner = NULL, lease_until = NULL
               WHERE id = ? AND lease_owner = ?""",
            (at, at, left_out_said(left_out) if left_out else None, job_id, owner),
        )


# A local node's or archive's job's progress: the versions its attempts left out (replaced
# by a correction since it was routed), {"count": n, "uids": the first few, "ids": all
# their instance ids}.
LEFT_OUT = "replaced_left_out"


def _still_replaced(conn: sqlite3.Connection, left_out: dict[str, Any]) -> dict[str, Any] | None:
    """The versions a job left out less those current again by its end (A, then its
    correction B, then A sent again: A is current again and routed anew, delivered by its
    own job). The done job's note said A was left out, replaced, when another job had
    just delivered it as the current version (review s41, F-E). None when none is left.
    A note written before the ids were kept (no ``ids``) is said as it is."""
    ids = [int(i) for i in left_out.get("ids", [])]
    if not ids:
        return left_out
    current = {int(r[0]) for r in conn.execute(
        "SELECT id FROM instances WHERE is_current = 1 AND id IN "
        "(SELECT value FROM json_each(?))", (json.dumps(ids),))}
    if not current:
        return left_out
    still = [i for i in ids if i not in current]
    if not still:
        return None
    uids = [str(r[0]) for r in conn.execute(
        "SELECT sop_instance_uid FROM instances WHERE id IN (SELECT value FROM json_each(?)) "
        "ORDER BY id", (json.dumps(still),))]
    return {"count": len(still), "uids": uids[:3], "ids": still}


def left_out_said(left_out: dict[str, Any]) -> str:
    """What a done job's ``last_error`` says of the replaced versions it left out."""
    count, uids = int(left_out.get("count", 0)), list(left_out.get("uids", []))
    return (f"{counted(count, 'version')} the sender replaced after this job was routed "
            "left out, not sent (a correction: the same SOP Instance UID, other bytes; the "
            f"current version goes where its own routing sends it): {', '.join(uids)}"
            f"{' ...' if count > len(uids) else ''}")


def fail_attempt(db: Database, job_id: int, owner: str, error: str, retry_at: float | None) -> str:
    """Record a failed attempt. ``retry_at`` None means no more attempts: the job is failed.
    Returns the new state."""
    at = now()
    state = "failed" if retry_at is None else "pending"
    with db.transaction() as conn:
        conn.execute(
            """UPDATE jobs SET state = ?, last_error = ?, next_attempt_at = ?, updated_at = ?,
                   finished_at = CASE WHEN ? = 'failed' THEN ? END,
                   lease_owner = NULL, lease_until = NULL
               WHERE id = ? AND lease_owner = ?""",
            (state, error[:2000], retry_at if retry_at is not None else at, at, state, at,
             job_id, owner),
        )
    return state


WAITING_FOR_LINK = "waiting for the link: "
WAITING_FOR_ROOM = "waiting for room on the spool: "
WAITING_FOR_TRUST = "waiting for credentials: "
WAITING_FOR_PEER = "waiting for the destination to free up: "
WAITING_FOR_CONFIG = "waiting for the configuration: "


def wait_for_link(db: Database, job_id: int, owner: str, error: str, retry_at: float) -> None:
    """An attempt that could not reach the destination: pending again at ``retry_at``, the
    attempt given back (a WAN outage of hours must not use up ``queue.max_attempts``), the
    error kept with the :data:`WAITING_FOR_LINK` prefix."""
    _wait(db, job_id, owner, WAITING_FOR_LINK + error, retry_at)


def wait_for_room(db: Database, job_id: int, owner: str, error: str, retry_at: float) -> None:
    """An attempt that found no room on the spool for a copy it needs: as
    :func:`wait_for_link` (the attempt given back), with the :data:`WAITING_FOR_ROOM`
    prefix."""
    _wait(db, job_id, owner, WAITING_FOR_ROOM + error, retry_at)


def wait_for_trust(db: Database, job_id: int, owner: str, error: str, retry_at: float) -> None:
    """An attempt that met a certificate refused at either end of its TLS link: as
    :func:`wait_for_link` (the attempt given back), with the :data:`WAITING_FOR_TRUST`
    prefix."""
    _wait(db, job_id, owner, WAITING_FOR_TRUST + error, retry_at)


def wait_for_peer(db: Database, job_id: int, owner: str, error: str, retry_at: float) -> None:
    """An attempt the destination turned away as busy, naming when to come back: as
    :func:`wait_for_link` (the attempt given back), with the :data:`WAITING_FOR_PEER`
    prefix."""
    _wait(db, job_id, owner, WAITING_FOR_PEER + error, retry_at)


def wait_for_configuration(db: Database, job_id: int, owner: str, error: str,
                           retry_at: float) -> None:
    """An attempt whose destination the configuration in force does not name (renamed or
    removed): as :func:`wait_for_link` (the attempt given back), with the
    :data:`WAITING_FOR_CONFIG` prefix."""
    _wait(db, job_id, owner, WAITING_FOR_CONFIG + error, retry_at)


def wake_waiting_for_trust(db: Database, prefix: str = WAITING_FOR_TRUST) -> int:
    """Every job waiting for credentials is due now: called at start-up, because a
    restart is how a new certificate or CA takes effect. How many. ``prefix``
    :data:`WAITING_FOR_CONFIG`: the jobs waiting for a configuration that names their
    destination (a restart is how a configuration takes effect too)."""
    at = now()
    with db.transaction() as conn:
        cursor = conn.execute(
            """UPDATE jobs SET next_attempt_at = ?, updated_at = ?
               WHERE state = 'pending' AND next_attempt_at > ? AND last_error LIKE ?""",
            (at, at, at, prefix + "%"))
        return cursor.rowcount


def _wait(db: Database, job_id: int, owner: str, error: str, retry_at: float) -> None:
    at = now()
    with db.transaction() as conn:
        conn.execute(
            """UPDATE jobs SET state = 'pending', attempts = max(attempts - 1, 0),
                   last_error = ?, next_attempt_at = ?, updated_at = ?,
                   lease_owner = NULL, lease_until = NULL
               WHERE id = ? AND lease_owner = ?""",
            (error[:2000], retry_at, at, job_id, owner),
        )


def give_back_stopped(db: Database, owner_prefix: str) -> int:
    """A clean stop (``Dispatcher.stop``): the jobs this process still holds (its workers'
    leases, ``owner_prefix:n``) are pending again, due at once, and the attempt each was in
    is given back (never below 0), with ``last_error`` saying so: "the daemon stopped during
    attempt N: not counted", then the earlier attempt's error (:func:`keeping_earlier`). One
    transaction, guarded by the owner (a job another process
    took is left alone). How many.

    Why: the attempt was counted at its claim and kept at the next start
    (``cache.release_host_leases``), so a long outage with restarts (an upgrade, a reboot
    during a PACS's weekend maintenance, a hub that holds every answer) failed the job after
    ``queue.max_attempts`` restarts, when the outage alone never fails it (until
    2026-12-07). A crash (kill -9, the OOM killer, a codec's segfault) never comes here:
    its attempt stays counted, and a job whose sending kills the daemon still fails once
    its attempts are spent."""
    at = now()
    pattern = owner_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ":%"
    with db.transaction() as conn:
        cursor = conn.execute(
            f"""UPDATE jobs SET state = 'pending', attempts = max(attempts - 1, 0),
                   last_error = {keeping_earlier(
                       f"'{STOPPED_DURING}' || attempts || ': not counted'")},
                   next_attempt_at = ?, updated_at = ?, lease_owner = NULL, lease_until = NULL
               WHERE state = 'running' AND lease_owner LIKE ? ESCAPE '\\'""",
            (at, at, pattern))
        return cursor.rowcount


def wake_waiting_for_link(db: Database, kind: str, destination: str | None = None) -> int:
    """The link of ``kind`` destinations (only ``destination``'s, when given) is back: every
    job waiting for it is due now (rather than at the end of its backoff, up to
    ``queue.backoff_max_s``). How many."""
    at = now()
    only = "" if destination is None else "AND destination = ?"
    with db.transaction() as conn:
        cursor = conn.execute(
            f"""UPDATE jobs SET next_attempt_at = ?, updated_at = ?
               WHERE state = 'pending' AND kind = ? AND next_attempt_at > ?
                     AND last_error LIKE ? {only}""",
            (at, at, kind, at, WAITING_FOR_LINK + "%",
             *(() if destination is None else (destination,))),
        )
        return cursor.rowcount


RETRIED = "retried"
ALREADY_DUE = "already due"


def retry(db: Database, job_id: int, *, actor: str, source: str | None = None
          ) -> Literal["retried", "already due"] | None:
    """Operator's retry: a failed (or waiting) job is due now, with its attempts reset, and
    its ``retry`` audit row in the same transaction: who (``actor``, from ``source``), the
    study, the job and its destination. A retry sends the study's patient data again, and
    none was in the trail (the status page's button answers anyone with ``serving.auth =
    "none"``).

    :data:`RETRIED` when it changed the job; :data:`ALREADY_DUE` when the job was already
    pending, due and with no attempt counted (a second ``pas queue retry``, a double click
    on the button): nothing changed and no row is written, which was a second "retry
    success" row, a resend the trail showed and that never happened. None: not retried
    (:func:`why_not_retried` says why)."""
    at = now()
    with db.transaction() as conn:
        before = conn.execute(
            "SELECT j.kind, j.destination, j.state, j.attempts, j.next_attempt_at, "
            "s.study_uid FROM jobs j "
            "JOIN studies s ON s.id = j.study_fk WHERE j.id = ?", (job_id,)).fetchone()
        if (before is not None and before["state"] == "pending" and before["attempts"] == 0
                and before["next_attempt_at"] <= at):
            return ALREADY_DUE
        cursor = conn.execute(
            """UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = ?,
                   updated_at = ?, finished_at = NULL
               WHERE id = ? AND state IN ('failed', 'pending')""",
            (at, at, job_id),
        )
        if cursor.rowcount != 1:
            return None
        audit.record_in(conn, "retry", actor=actor, source=source, target=before["study_uid"],
                        detail=f"job {job_id} ({before['kind']}) to {before['destination']}, "
                               f"{before['state']} after "
                               f"{counted(before['attempts'], 'attempt')}: due now, attempts "
                               "reset")
        return RETRIED


def why_not_retried(db: Database, job_id: int) -> str:
    """What to tell an operator whose retry of ``job_id`` changed nothing (:func:`retry` was
    False): the job's state, or that there is no such job and the likely reason. Was one
    sentence for every case ("is not failed or pending (or does not exist)"), which left a
    job done, one being sent and one gone with its study alike."""
    rows = db.query("SELECT state, lease_until FROM jobs WHERE id = ?", (job_id,))
    if not rows:
        return (f"job {job_id} does not exist (a study's jobs go with it when the cache "
                "evicts it or an operator purges it: pas audit shows the deletion)")
    state = rows[0]["state"]
    if state == "done":
        return f"job {job_id} is done: every instance of it was delivered, nothing to retry"
    if state == "running" and (rows[0]["lease_until"] or 0) < now():
        return (f"job {job_id} was being sent when its worker stopped (its lease expired): "
                "the daemon takes it up again by itself, where it stopped")
    if state == "running":
        return f"job {job_id} is being sent right now: nothing to retry"
    return f"job {job_id} is {state}: only a failed or pending job can be retried"


def job_files(db: Database, job_id: int, unsent_only: bool = True) -> list[sqlite3.Row]:
    """The instances a job carries, with their files, in a stable order."""
    sent = "AND ji.sent_at IS NULL" if unsent_only else ""
    return db.query(
        f"""SELECT i.id, i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.path,
                   i.size, i.sha256, i.source_address, ji.sent_at
            FROM job_instances ji JOIN instances i ON i.id = ji.instance_fk
            WHERE ji.job_id = ? {sent} ORDER BY i.series_fk, i.instance_number, i.id""",
        (job_id,),
    )


def older_adopted_versions(db: Database, job_id: int) -> list[sqlite3.Row]:
    """Versions of the job's study that start-up recovery adopted and that a correction
    superseded (not current, so never routed to a destination), still unconfirmed. The
    region may hold them from before the index was lost; nothing else ever confirms them
    again, and eviction takes a study only once every version is confirmed."""
    return db.query(
        """SELECT i.id, i.sop_instance_uid, i.sha256, i.source_address
           FROM instances i JOIN jobs j ON j.study_fk = i.study_fk
           WHERE j.id = ? AND i.is_current = 0 AND i.confirmed_at IS NULL
                 AND i.source_address = 'recovery'
                 AND NOT EXISTS (SELECT 1 FROM job_instances ji
                                 WHERE ji.job_id = j.id AND ji.instance_fk = i.id)
           ORDER BY i.id""",
        (job_id,),
    )


def drop_replaced_versions(db: Database, job_id: int, new_transfer: bool = True,
                           remember: bool = False) -> list[str]:
    """Take out of a job the versions it carries that the sender replaced since it was
    routed (same SOP Instance UID, other bytes: no longer current) and not yet sent (for a
    hub job: no receipt named yet). A local node's or STOW-RS archive's job (``new_transfer``
    true): all of them, at each attempt's start (``dispatch/worker.py``). A hub job: all of
    them before a new transfer is made of the job, and from a transfer begun, those whose
    current version the region already confirmed (that transfer is then left for a new
    one). Returns their SOP Instance UIDs. ``remember``: counted in the job's progress,
    in the same transaction, for the done job's ``last_error`` (:func:`finish`; an attempt
    that left them out may itself end waiting for the link, which says so instead).

    Why, for a local node or an archive: routing the correction takes the stale version
    out of the earlier jobs to the destinations the correction goes to
    (:func:`_drop_superseded`), not out of a job to a destination it does not go to (it
    came from another AE, or its new attributes match another rule). That job sent the
    stale version at its next attempt, and the node kept the version the sender had
    replaced (until 2026-12-07). Now the node keeps what the rules send it of the
    current version: nothing, unless the correction is routed there too.

    Why, for the hub: a hub job's manifest is fixed once its transfer began
    (``_drop_superseded`` leaves hub jobs alone), and the correction's own job waits behind
    it (``job_order.holding_back``) but not behind a failed one: ``pas queue retry`` of
    that job, after the correction went up, sent the stale version last and the region
    took it as the newer one. A transfer begun whose correction has not gone up yet keeps
    its versions: sent first, they are followed by the correction's job, and restarting it
    would send its delivered buckets again. The current version travels in its own job (or
    in the delta routing will make); a version it replaced needs no receipt (eviction
    excuses it once the current one is confirmed)."""
    with db.transaction() as conn:
        rows = conn.execute(
            """SELECT ji.instance_fk, i.sop_instance_uid FROM job_instances ji
               JOIN instances i ON i.id = ji.instance_fk
               WHERE ji.job_id = ? AND ji.sent_at IS NULL AND i.is_current = 0
                 AND (? OR EXISTS (SELECT 1 FROM instances c
                                   WHERE c.sop_instance_uid = i.sop_instance_uid
                                     AND c.is_current = 1 AND c.confirmed_at IS NOT NULL))
               ORDER BY i.id""", (job_id, int(new_transfer))).fetchall()
        conn.executemany("DELETE FROM job_instances WHERE job_id = ? AND instance_fk = ?",
                         [(job_id, r["instance_fk"]) for r in rows])
        uids = [str(r["sop_instance_uid"]) for r in rows]
        if remember and uids:
            _remember_left_out(conn, job_id, uids, [int(r["instance_fk"]) for r in rows])
    return uids


def _remember_left_out(conn: sqlite3.Connection, job_id: int, uids: list[str],
                       ids: list[int]) -> None:
    """Count ``uids`` (instance ``ids``) among the versions the job left out (its progress'
    :data:`LEFT_OUT`), for the done job's ``last_error`` (:func:`finish`, which passes over
    those current again by then)."""
    [saved] = conn.execute("SELECT progress FROM jobs WHERE id = ?", (job_id,)).fetchone()
    progress = json.loads(saved) if saved else {}
    before = progress.get(LEFT_OUT) or {"count": 0, "uids": []}
    progress[LEFT_OUT] = {"count": int(before["count"]) + len(uids),
                          "uids": [*before["uids"], *uids][:3],
                          "ids": [*before.get("ids", []), *ids]}
    conn.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))


def leave_out_if_replaced(db: Database, job_id: int, instance_ids: list[int],
                          owner: str) -> list[int]:
    """Just before a ``dicom`` target sends one of ``instance_ids`` (a ``stowrs`` target a
    batch of them): those that are no longer current (a correction filed since the
    attempt began) are taken out of the job, unsent, and counted in its progress as
    :func:`drop_replaced_versions` does at the attempt's start, in one transaction, while
    ``owner`` holds the job. Returns their ids (the caller sends the others).

    Why: the attempt's start left out the versions replaced by then; one replaced while
    the attempt ran (a slow PACS, a long study) was still sent, and the node kept the
    version the sender had replaced (review s41, F-D)."""
    if not instance_ids:
        return []
    with db.transaction() as conn:
        rows = conn.execute(
            f"""SELECT ji.instance_fk, i.sop_instance_uid FROM job_instances ji
                JOIN instances i ON i.id = ji.instance_fk
                JOIN jobs j ON j.id = ji.job_id
                WHERE ji.job_id = ? AND j.lease_owner = ? AND ji.sent_at IS NULL
                  AND i.is_current = 0
                  AND ji.instance_fk IN ({','.join('?' * len(instance_ids))})
                ORDER BY i.id""", (job_id, owner, *instance_ids)).fetchall()
        if not rows:
            return []
        conn.executemany("DELETE FROM job_instances WHERE job_id = ? AND instance_fk = ?",
                         [(job_id, r["instance_fk"]) for r in rows])
        _remember_left_out(conn, job_id, [str(r["sop_instance_uid"]) for r in rows],
                           [int(r["instance_fk"]) for r in rows])
        return [int(r["instance_fk"]) for r in rows]


def mark_sent(db: Database, job_id: int, instance_ids: list[int]) -> None:
    at = now()
    with db.transaction() as conn:
        conn.executemany(
            "UPDATE job_instances SET sent_at = ? WHERE job_id = ? AND instance_fk = ?",
            [(at, job_id, i) for i in instance_ids],
        )


def confirm_instances(db: Database, receipts: list[tuple[str, str]]) -> int:
    """Mark instances confirmed by the region. Each receipt names the SOP Instance UID *and*
    the SHA-256 of the bytes the region holds: only that exact version is confirmed."""
    at = now()
    with db.transaction() as conn:
        total = 0
        for sop_uid, sha in receipts:
            cursor = conn.execute(
                """UPDATE instances SET confirmed_at = ?
                   WHERE sop_instance_uid = ? AND sha256 = ? AND confirmed_at IS NULL""",
                (at, sop_uid, sha),
            )
            total += cursor.rowcount
        return total


def confirm_held(db: Database, job_id: int, pairs: list[tuple[str, str]],
                 instance_ids: list[int], progress: dict[str, Any], study_uid: str,
                 detail: str, priors: list[int] | None = None,
                 prior_detail: Callable[[bool], str] | None = None) -> tuple[int, bool]:
    """What the region's signed holdings statement settled for a job, in ONE transaction
    (invariant 3): its (UID, SHA-256) pairs confirmed, those instances marked sent, the job's
    progress saying the question is answered (a restart does not ask again: it sends the
    rest), and the ``recovery`` audit row. Returns how many instances were newly confirmed,
    and whether the study was filed regional.

    ``priors``: the ids (among ``instance_ids``) the region holds from another site, never
    sent by this one (a prior fetched from the region, adopted again after a rebuilt index).
    When they are every current instance of the study, the study is filed ``regional``
    again, as prefetch filed it; else it stays this site's (some instances are its own).
    ``prior_detail``: their own ``recovery`` audit row, told whether the study was filed
    regional (decided in this transaction: an instance received meanwhile counts)."""
    at = now()
    with db.transaction() as conn:
        regional = False
        if priors:
            own = conn.execute(
                "SELECT count(*) FROM instances i JOIN studies s ON s.id = i.study_fk "
                "WHERE s.study_uid = ? AND i.is_current = 1 AND i.id NOT IN "
                "(SELECT value FROM json_each(?))", (study_uid, json.dumps(sorted(set(priors))))
            ).fetchone()[0]
            regional = own == 0
            if regional:
                conn.execute("UPDATE studies SET origin = 'regional' WHERE study_uid = ?",
                             (study_uid,))
            if prior_detail is not None:
                audit.record_in(conn, "recovery", actor="system", target=study_uid,
                                detail=prior_detail(regional))
            _not_forwarded(conn, study_uid, sorted(set(priors)), at)
        confirmed = sum(conn.execute(
            "UPDATE instances SET confirmed_at = ? WHERE sop_instance_uid = ? AND sha256 = ? "
            "AND confirmed_at IS NULL", (at, uid, sha)).rowcount for uid, sha in pairs)
        conn.executemany(
            "UPDATE job_instances SET sent_at = ? WHERE job_id = ? AND instance_fk = ?",
            [(at, job_id, i) for i in instance_ids])
        conn.execute("UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ?",
                     (json.dumps(progress), at, job_id))
        audit.record_in(conn, "recovery", actor="system", target=study_uid, detail=detail)
        return confirmed, regional


PRIOR_NOT_FORWARDED = ("not forwarded: the region's instances, sent by another site (a prior "
                       "fetched from the region, adopted again after a rebuilt index)")


def _not_forwarded(conn: sqlite3.Connection, study_uid: str, priors: list[int],
                   at: float) -> None:
    """Take a prior's instances out of the study's jobs to other destinations (a local node,
    a STOW-RS archive) not yet running: never forwarded as a new study of this site, as
    they were not before the index was lost (prefetch files them routed). Those jobs waited
    for the hub's answer (``job_order._HUB_ASKS_FIRST``); one left with nothing to send is done,
    saying why."""
    jobs = [int(r[0]) for r in conn.execute(
        "SELECT j.id FROM jobs j JOIN studies s ON s.id = j.study_fk WHERE s.study_uid = ? "
        "AND j.kind != 'hub' AND j.state IN ('pending', 'failed')", (study_uid,))]
    if not jobs:
        return
    conn.executemany(
        "DELETE FROM job_instances WHERE job_id = ? AND instance_fk = ? AND sent_at IS NULL",
        [(job_id, instance_id) for job_id in jobs for instance_id in priors])
    conn.executemany(
        """UPDATE jobs SET state = 'done', finished_at = ?, updated_at = ?, last_error = ?
           WHERE id = ? AND state IN ('pending', 'failed') AND NOT EXISTS (
               SELECT 1 FROM job_instances WHERE job_id = jobs.id AND sent_at IS NULL)""",
        [(at, at, PRIOR_NOT_FORWARDED, job_id) for job_id in jobs])
