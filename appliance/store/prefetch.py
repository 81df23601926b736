"""Prefetch state: HL7 messages seen, prefetch requests, and the prior studies they fetch.

Owns: every SQL statement of the ``prefetch_*`` tables, plus the few reads and writes the
prefetch needs on the shared index (pinning a study, counting what is on site, marking fetched
instances as routed so that routing never sends a prior back to the region). Each state change
is one transaction (invariant 3). May not touch: files or the network.

Idempotence (invariant 6) lives here: a message is known by ``sending app|facility|control
id`` and a request by a ``dedup_key`` naming the order, appointment or visit it came from, so
the same order received five times schedules one prefetch. An HL7 order's requests are found
by their order (``order_key``) and requested procedure (``procedure_key``): one order number
may cover several procedures (IHE SWF), each a request of its own (see :func:`_order_row`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.store import audit, retrieve
from appliance.store.db import Database, now
from appliance.store.jobs import WAITING_FOR_TRUST
from appliance.store.prefetch_changes import (
    KNOWN_ACCESSION,
    accession_params,
    searched_changed,
    update_known,
)
from appliance.store.prefetch_messages import SEVERAL, claim_message

# Instances the prefetch stored carry this in instances.source_address.
REGION_SOURCE = "region:prefetch"
# The states a cancel from the RIS ends. A running request too: cancelling only pending
# ones lost a cancel that came while the fetch ran (its failed attempt made it pending
# again, retried until the link came back). The end of such an attempt (finish, defer,
# fail_attempt) changes only a request still running, so the cancel stays. A cancelled
# request's finished_at stays NULL while that attempt runs (set when it ends): an order
# revived meanwhile is that attempt's again ('running'), not a second one run beside it.
CANCELLABLE = "('pending', 'running')"
CANCEL_SET = ("state = 'cancelled', updated_at = ?, last_error = NULL, "  # a cancelled
              # request kept "waiting for the link: ..." as if it still waited
              "finished_at = CASE WHEN state = 'running' THEN NULL ELSE ? END")


def request_key(kind: str, *parts: str) -> str:
    """A request's ``dedup_key``: ``kind:part|part|...``, each part's ``\\`` and ``|``
    escaped with a backslash. Joined as they were, the identifiers of two patients could
    make one key (PID-3 ``X|Y`` of issuer ``Z`` and ``X`` of issuer ``Y|Z``, both order N1:
    the second patient's order counted as the first's, sent again). A part holding neither
    character is as it always was, so the requests stored before still match."""
    return f"{kind}:" + "|".join(part.replace("\\", "\\\\").replace("|", "\\|")
                                 for part in parts)


@dataclass(frozen=True)
class NewRequest:
    dedup_key: str
    trigger: str                  # hl7, arrival, manual, mwl
    patient_id: str
    issuer: str = ""
    accession_number: str | None = None
    modality: str | None = None
    body_part: str | None = None
    scheduled_at: float | None = None
    due_at: float | None = None   # None: now
    # An HL7 order: ``dedup_key`` names the order, this its requested procedure
    # ((accession, requested procedure ID), '' where not given; :func:`_order_row`).
    procedure: tuple[str, str] | None = None
    # Changes the request of that key, makes none (ADT^A08: an update of any patient's
    # record; see appliance/prefetch/messages.py).
    update_only: bool = False


@dataclass(frozen=True)
class Scheduled:
    request_id: int
    created: bool                 # False: the same order was already known (nothing new)


def message_seen(db: Database, message_key: str) -> dict[str, Any] | None:
    row = db.query_one("SELECT * FROM prefetch_messages WHERE message_key = ?", (message_key,))
    return dict(row) if row else None


@dataclass(frozen=True)
class Cancel:
    """An order the RIS cancelled: its pending request (by dedup key) is cancelled; with
    ``procedure`` (an HL7 order group), the order's pending requests of that procedure (those
    :func:`procedures_compatible` with it: all of them for a cancel naming none)."""

    dedup_key: str
    procedure: tuple[str, str] | None = None


@dataclass(frozen=True)
class Recorded:
    first: bool                   # False: this message key was already recorded (a resend)
    scheduled: Scheduled | None = None  # the first order's request
    reused_for: str | None = None  # the other order(s) an earlier message with this key named
    all_scheduled: tuple[Scheduled, ...] = ()  # every order's request, in message order


def _meaning(action: NewRequest | Cancel) -> str:
    return action.dedup_key if isinstance(action, NewRequest) else f"cancel {action.dedup_key}"


def record_message(db: Database, message_key: str, message_type: str, ack_code: str,
                   request: NewRequest | None = None,
                   cancel_key: str | None = None,
                   actions: Sequence[NewRequest | Cancel] = (),
                   audit_row: dict[str, Any] | None = None) -> Recorded:
    """Remember a message and (optionally) schedule or cancel its requests, in ONE
    transaction: the ACK is sent only after this commits, so a crash in between makes the RIS
    resend, and the resend is recognised. ``actions``: what each order of the message does,
    in its order (``request`` / ``cancel_key``: one order, as a message of one order said).
    Every order of a message of several is applied or none is (invariant 3).

    The message row is claimed first (``INSERT OR IGNORE`` on its primary key, under the
    write lock ``BEGIN IMMEDIATE`` takes), and the requests are touched only by the one that
    inserted it: the same message resent on several connections at once is counted once
    (a read before the transaction let two of them through).

    A key already recorded for different orders (a RIS whose control ids started again
    from 1 after a reinstall) is not a resend: that message is recorded under its key and
    the orders it names, and ``reused_for`` names the earlier ones. Taken for a resend, it
    was ACKed AA "already processed" and its orders silently dropped.

    What the message names (its meaning: the order's key, ``cancel <key>``, ``orders:
    ...``) is recorded with it (``prefetch_messages.detail``), and a resend is compared with
    that, not with its request's key now: a merge re-keys a request, an order's second
    procedure has a key of its own, and the resend was taken as new (a cancelled procedure
    pending again, a merged-away patient's order made again).

    ``audit_row``: the ``hl7`` audit row's ``actor``, ``detail`` and ``patient``, written in
    the same transaction when the message scheduled, changed or cancelled something."""
    at = now()
    actions = [*actions, *([request] if request is not None else []),
               *([Cancel(cancel_key)] if cancel_key is not None else [])]
    # Each order once: several procedures of one order mean that order, as the message meant
    # when they were one request (a resend recorded before migration 15 is still a resend).
    meanings = list(dict.fromkeys(map(_meaning, actions)))
    meaning = meanings[0] if len(meanings) == 1 else SEVERAL + "; ".join(meanings)
    with db.transaction() as conn:
        claimed, reused_for = claim_message(conn, message_key, message_type, ack_code,
                                            meaning, at)
        if claimed is None:
            return Recorded(first=False)
        message_key = claimed
        scheduled: list[Scheduled] = []
        for action in actions:
            if isinstance(action, NewRequest):
                made = _schedule(conn, action, at, revive=True)
                if made is not None:  # None: an update of a request there is not
                    scheduled.append(made)
            elif action.procedure is None:
                conn.execute(
                    f"UPDATE prefetch_requests SET {CANCEL_SET} "
                    f"WHERE dedup_key = ? AND state IN {CANCELLABLE}",
                    (at, at, action.dedup_key))
            else:
                conn.executemany(
                    f"UPDATE prefetch_requests SET {CANCEL_SET} "
                    f"WHERE id = ? AND state IN {CANCELLABLE}",
                    [(at, at, row["id"]) for row in _order_rows(conn, action.dedup_key)
                     if procedures_compatible(_stored(row), action.procedure)])
        if scheduled:  # the message's first request (a message of several names them all)
            conn.execute("UPDATE prefetch_messages SET request_fk = ? WHERE message_key = ?",
                         (scheduled[0].request_id, message_key))
        if audit_row is not None and (scheduled or any(isinstance(a, Cancel)
                                                       for a in actions)):
            # The ``hl7`` row of a message acted on, with the change it records (invariant
            # 3): only refusals were audited, so which orders came, from whom, for which
            # patient, was in no row (an order names a patient).
            audit.record_in(conn, "hl7", outcome="success", **audit_row)
    return Recorded(first=True, scheduled=scheduled[0] if scheduled else None,
                    reused_for=reused_for, all_scheduled=tuple(scheduled))


def schedule(db: Database, request: NewRequest, count_repeat: bool = True) -> Scheduled:
    """``count_repeat`` False: a known request seen again (a worklist polled every few
    minutes) is not counted as requested again; its time still follows a rescheduling.
    (An update only, ADT^A08, comes through :func:`record_message`.)"""
    assert not request.update_only
    with db.transaction() as conn:
        made = _schedule(conn, request, now(), 1 if count_repeat else 0)
    assert made is not None
    return made


def _schedule(conn: Any, request: NewRequest, at: float, repeat: int = 1,
              revive: bool = False) -> Scheduled | None:
    """``revive``: a new order from the RIS for a request it had cancelled (ORC-1 NW after
    CA with the same order number) makes it pending again, as new; without it, a cancelled
    request stays cancelled (a worklist still listing a step the RIS cancelled by HL7 must
    not undo the cancel at every poll)."""
    due = request.due_at if request.due_at is not None else at
    if request.procedure is not None:
        row = _order_row(conn, request.dedup_key, request.procedure)
    else:
        row = conn.execute("SELECT id, state FROM prefetch_requests WHERE dedup_key = ?",
                           (request.dedup_key,)).fetchone()
    if row is not None and revive and row["state"] == "cancelled":
        conn.execute(
            f"""UPDATE prefetch_requests SET attempts = 0,
                   state = CASE WHEN finished_at IS NULL THEN 'running' ELSE 'pending' END,
                   times_requested = times_requested + ?, updated_at = ?,
                   scheduled_at = ?, due_at = ?, next_attempt_at = ?, last_error = NULL,
                   started_at = CASE WHEN finished_at IS NULL THEN started_at END,
                   finished_at = NULL, {KNOWN_ACCESSION},
                   modality = coalesce(?, modality), body_part = coalesce(?, body_part)
               WHERE id = ?""",
            (repeat, at, request.scheduled_at, due, due, *accession_params(request),
             request.modality, request.body_part, row["id"]))
        return Scheduled(int(row["id"]), created=False)
    if row is not None:
        update_known(conn, int(row["id"]), request, due, at, repeat)
        return Scheduled(int(row["id"]), created=False)
    if request.update_only:
        return None
    order_key = procedure_key = None
    dedup_key = request.dedup_key
    if request.procedure is not None:
        order_key, procedure_key = request.dedup_key, json.dumps(list(request.procedure))
        dedup_key = _free_dedup_key(conn, request.dedup_key, request.procedure)
    cursor = conn.execute(
        """INSERT INTO prefetch_requests (dedup_key, trigger, patient_id, issuer,
               accession_number, modality, body_part, scheduled_at, due_at, next_attempt_at,
               created_at, updated_at, order_key, procedure_key)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (dedup_key, request.trigger, request.patient_id, request.issuer,
         request.accession_number, request.modality, request.body_part, request.scheduled_at,
         due, due, at, at, order_key, procedure_key))
    return Scheduled(int(cursor.lastrowid or 0), created=True)


def procedures_compatible(one: tuple[str, str], other: tuple[str, str]) -> bool:
    """Whether two (accession, requested procedure ID) may name the same procedure: each
    part equal, or not given on one side. A message naming none (an ``ORC|CA`` alone)
    names every procedure of its order; one naming an accession, those of that accession."""
    return all(not a or not b or a == b for a, b in zip(one, other, strict=True))


def _stored(row: Any) -> tuple[str, str]:
    """A request's procedure; ('', '') when not known (stored before migration 15)."""
    if not row["procedure_key"]:
        return "", ""
    accession, requested = json.loads(row["procedure_key"])
    return str(accession), str(requested)


def _order_rows(conn: Any, order_key: str) -> list[Any]:
    return conn.execute("SELECT id, state, procedure_key FROM prefetch_requests "
                        "WHERE order_key = ? ORDER BY id", (order_key,)).fetchall()


def _order_row(conn: Any, order_key: str, procedure: tuple[str, str]) -> Any:
    """The request of this order and procedure: the one stored with exactly this procedure,
    else the first whose procedure is compatible (a part one side did not give: a status
    message naming no accession; a request stored before procedures were recorded, which
    then takes this procedure's parts), else None (a procedure of its own).

    Keyed by order alone, an order's second procedure (an MR knee after a CT chest, one
    order number) was the first one's request, and its priors were never fetched."""
    rows = _order_rows(conn, order_key)
    for row in rows:
        if _stored(row) == procedure:
            return row
    for row in rows:
        stored = _stored(row)
        if procedures_compatible(stored, procedure):
            merged = [mine or theirs for mine, theirs in zip(stored, procedure, strict=True)]
            if tuple(merged) != stored:
                conn.execute("UPDATE prefetch_requests SET procedure_key = ? WHERE id = ?",
                             (json.dumps(merged), row["id"]))
            return row
    return None


def _free_dedup_key(conn: Any, order_key: str, procedure: tuple[str, str]) -> str:
    """A new request's ``dedup_key``: the order's own key for its first procedure (as every
    order had before procedures were told apart), then ``<order key>|<accession>^<requested
    procedure ID>`` (numbered should that be taken)."""
    label = "^".join(procedure).rstrip("^")
    candidates = [order_key, f"{order_key}|{label}"]
    candidates += [f"{order_key}|{label}#{n}" for n in range(2, 1000)]
    for key in candidates:
        if conn.execute("SELECT 1 FROM prefetch_requests WHERE dedup_key = ?",
                        (key,)).fetchone() is None:
            return key
    raise RuntimeError(f"no free request key for order {order_key}")


# A due time within this of the exam's time less the lead time was that time, not "now".
ANCHORED_WITHIN_S = 1.0


def shift_for_clock_step_in(conn: Any, step: float, cut: float,
                            lead_s: float | None) -> int:
    """Within :func:`appliance.store.cache.shift_for_clock_step`'s transaction: pending and
    running requests written before the wall clock stepped by ``step`` keep the time they had
    left (a step back of 2 h held a prior's 30 s retry for 2 h 30 s, and an arrival's
    prefetch, due "now", for 2 h); how many.

    ``due_at`` is ``max(time received, scheduled_at - lead_s)`` (:func:`_schedule`, the
    HL7 orders' and the worklist's due time). Only its first part is clock-relative: a due
    time anchored to the exam's time (``scheduled_at - lead_s``, a real-world time from the
    RIS) keeps its meaning across a step and is not moved (moved forward by a step of years
    from a dead RTC, the priors would come years after the exam). A due time that was "now"
    (no exam time: arrival and manual requests; or the exam already within the lead time)
    moves with the step, though never before the anchor (a step back shows the request was
    in fact received before it). ``lead_s`` None (not known): only requests without an exam
    time move theirs.

    ``next_attempt_at`` (written from now: a retry, a deferral, or the due time itself)
    moves with the step when it was after ``due_at``, and is never before the new
    ``due_at`` (the attempt code keeps ``next_attempt_at >= due_at``); one that was the due
    time stays it. A deferral to a WAN window's opening is wall-anchored too, but moving it
    is harmless: the attempt checks the window again and defers again.

    Running requests move their ``due_at`` too: their attempt's end compares it with now
    (an exam moved beyond now makes it pending again, a deferral waits for it)."""
    now_type = "(scheduled_at IS NULL" + (
        "" if lead_s is None else f" OR due_at > scheduled_at - :lead + {ANCHORED_WITHIN_S}"
    ) + ")"
    new_due = (f"CASE WHEN NOT {now_type} THEN due_at "
               "WHEN scheduled_at IS NULL THEN due_at + :step "
               "ELSE max(due_at + :step, scheduled_at - :lead) END")
    return conn.execute(
        f"""UPDATE prefetch_requests SET
               next_attempt_at = CASE WHEN next_attempt_at > due_at
                                      THEN max(next_attempt_at + :step, {new_due})
                                      ELSE {new_due} END,
               due_at = {new_due}, updated_at = updated_at + :step
            WHERE state IN ('pending', 'running') AND updated_at < :cut""",
        {"step": step, "cut": cut, "lead": lead_s}).rowcount


def claim_due(db: Database, limit: int = 8) -> list[dict[str, Any]]:
    """Pending requests whose time has come, marked running (one transaction). A request left
    running by a crash is made pending again by :func:`recover`."""
    at = now()
    with db.transaction() as conn:
        rows = conn.execute(
            "SELECT * FROM prefetch_requests WHERE state = 'pending' AND next_attempt_at <= ? "
            "ORDER BY coalesce(scheduled_at, due_at), id LIMIT ?", (at, limit)).fetchall()
        for row in rows:
            conn.execute(
                "UPDATE prefetch_requests SET state = 'running', attempts = attempts + 1, "
                "started_at = coalesce(started_at, ?), updated_at = ? WHERE id = ?",
                (at, at, row["id"]))
    return [dict(r) for r in rows]


def recover(db: Database) -> int:
    """After a restart: running requests go back to pending; fetched instances are routed;
    no attempt of a cancelled request runs any more (nor of one cancelled before its
    finished_at said so: an order revived then is pending, not running with no thread)."""
    with db.transaction() as conn:
        cursor = conn.execute("UPDATE prefetch_requests SET state = 'pending', updated_at = ? "
                              "WHERE state = 'running'", (now(),))
        conn.execute("UPDATE prefetch_requests SET finished_at = coalesce(updated_at, ?) "
                     "WHERE state = 'cancelled' AND finished_at IS NULL", (now(),))
    mark_fetched_routed(db)
    return cursor.rowcount


def record_found(db: Database, request_id: int, rule: str,
                 studies: list[dict[str, Any]]) -> None:
    """The priors a rule chose for a request (study_uid, study_date, modalities, expected)."""
    with db.transaction() as conn:
        conn.execute("UPDATE prefetch_requests SET rule = ?, studies_found = ?, updated_at = ? "
                     "WHERE id = ?", (rule, len(studies), now(), request_id))
        for study in studies:
            conn.execute(
                """INSERT INTO prefetch_studies (request_fk, study_uid, study_date, modalities,
                       instances_expected) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (request_fk, study_uid) DO UPDATE SET
                       instances_expected = excluded.instances_expected""",
                (request_id, study["study_uid"], study.get("study_date"),
                 study.get("modalities"), study.get("instances_expected")))


def set_study_state(db: Database, request_id: int, study_uid: str, state: str) -> None:
    with db.transaction() as conn:
        conn.execute("UPDATE prefetch_studies SET state = ? WHERE request_fk = ? AND "
                     "study_uid = ?", (state, request_id, study_uid))


def study_fetched(db: Database, request_id: int, study_uid: str, detail: str) -> None:
    """A prior fetched from the region: its state ``fetched`` and its ``retrieve`` audit row,
    one transaction (written apart, a crash between them left the prior fetched, its
    instances in the cache, and no row saying where they came from)."""
    with db.transaction() as conn:
        conn.execute("UPDATE prefetch_studies SET state = 'fetched' WHERE request_fk = ? AND "
                     "study_uid = ?", (request_id, study_uid))
        audit.record_in(conn, "retrieve", actor="prefetch", target=study_uid, detail=detail)


def add_progress(db: Database, request_id: int, instances: int, size: int) -> None:
    with db.transaction() as conn:
        conn.execute(
            "UPDATE prefetch_requests SET instances_fetched = instances_fetched + ?, "
            "bytes_fetched = bytes_fetched + ?, updated_at = ? WHERE id = ?",
            (instances, size, now(), request_id))


def finish(db: Database, request_id: int, searched: dict[str, Any] | None = None) -> bool:
    """The attempt found and fetched what it could: ``fetched``. ``searched``: the request
    as claimed (:func:`claim_due`), what its attempt searched for; False when the request
    now asks for something else, and is pending again
    (:func:`~appliance.store.prefetch_changes.searched_changed`)."""
    at = now()
    with db.transaction() as conn:
        if searched is not None and searched_changed(conn, request_id, searched, at):
            return False
        conn.execute(
            """UPDATE prefetch_requests SET state = 'fetched', finished_at = ?, updated_at = ?,
                   last_error = NULL,
                   studies_fetched = (SELECT count(*) FROM prefetch_studies
                       WHERE request_fk = ? AND state IN ('fetched', 'on_site'))
               WHERE id = ? AND state = 'running'""", (at, at, request_id, request_id))
        _cancelled_attempt_over(conn, request_id, at)
    return True


def fail_attempt(db: Database, request_id: int, error: str, max_attempts: int,
                 retry_at: float, searched: dict[str, Any] | None = None) -> str:
    """Back to pending with ``retry_at``, or failed once ``max_attempts`` are spent; pending,
    not counted, when the request asks for something else than ``searched`` now (see
    :func:`finish`)."""
    at = now()
    with db.transaction() as conn:
        if searched is not None and searched_changed(conn, request_id, searched, at):
            return "pending"
        row = conn.execute("SELECT attempts, state FROM prefetch_requests WHERE id = ?",
                           (request_id,)).fetchone()
        if row is not None and row["state"] != "running":
            _cancelled_attempt_over(conn, request_id, at)
            return str(row["state"])  # cancelled by the RIS while it ran: it stays so
        state = "failed" if row is None or row["attempts"] >= max_attempts else "pending"
        conn.execute(
            "UPDATE prefetch_requests SET state = ?, last_error = ?, next_attempt_at = ?, "
            "updated_at = ?, finished_at = CASE WHEN ? = 'failed' THEN ? END WHERE id = ?",
            (state, error[:500], retry_at, at, state, at, request_id))
    return state


def defer(db: Database, request_id: int, until: float, reason: str) -> bool:
    """Not now (outside the WAN windows, or the region unreachable): pending again, the
    attempt not counted. False when the request was cancelled while it ran (it stays so)."""
    with db.transaction() as conn:
        deferred = conn.execute(
            "UPDATE prefetch_requests SET state = 'pending', attempts = max(attempts - 1, 0), "
            "next_attempt_at = max(?, due_at), last_error = ?, updated_at = ? WHERE id = ? "
            "AND state = 'running'", (until, reason, now(), request_id)).rowcount > 0
        _cancelled_attempt_over(conn, request_id, now())
        return deferred


def _cancelled_attempt_over(conn: Any, request_id: int, at: float) -> None:
    """The attempt of a request cancelled while it ran has ended (see :data:`CANCEL_SET`)."""
    conn.execute("UPDATE prefetch_requests SET finished_at = ? WHERE id = ? AND "
                 "state = 'cancelled' AND finished_at IS NULL", (at, request_id))


def wait_for_trust(db: Database, request_id: int, until: float, error: str) -> bool:
    """As :func:`defer`, for a request the region's hub refused the credentials of: its
    ``last_error`` starts with :data:`~appliance.store.jobs.WAITING_FOR_TRUST`, as a job's
    does, so that :func:`waiting_for_credentials` and the start-up find it."""
    return defer(db, request_id, until, (WAITING_FOR_TRUST + error)[:500])


def wake_waiting_for_trust(db: Database) -> int:
    """Every request waiting for credentials is due now: called at start-up, because a
    restart is how a new certificate takes effect. How many."""
    at = now()
    with db.transaction() as conn:
        return conn.execute(
            """UPDATE prefetch_requests SET next_attempt_at = ?, updated_at = ?
               WHERE state = 'pending' AND next_attempt_at > ? AND last_error LIKE ?""",
            (at, at, at, WAITING_FOR_TRUST + "%")).rowcount


def waiting_for_credentials(db: Database) -> dict[str, Any] | None:
    """The prefetch requests waiting for credentials to be put right: how many, and the
    latest refusal without its prefix (None: none waits). Such requests never fail, so the
    failed-requests signals miss them: the status and the metrics show this instead."""
    row = db.query_one(
        """SELECT count(*) AS requests,
                  (SELECT last_error FROM prefetch_requests WHERE state = 'pending'
                     AND last_error LIKE ? ORDER BY updated_at DESC LIMIT 1) AS last_error
           FROM prefetch_requests WHERE state = 'pending' AND last_error LIKE ?""",
        (WAITING_FOR_TRUST + "%", WAITING_FOR_TRUST + "%"))
    if row is None or not row["requests"]:
        return None
    return {"requests": int(row["requests"]),
            "error": (row["last_error"] or "")[len(WAITING_FOR_TRUST):]}


def get_request(db: Database, request_id: int) -> dict[str, Any] | None:
    row = db.query_one("SELECT * FROM prefetch_requests WHERE id = ?", (request_id,))
    return dict(row) if row else None


def list_requests(db: Database, state: str | None = None,
                  limit: int = 200) -> list[dict[str, Any]]:
    """Newest first, with the lead time achieved: how long before the scheduled exam the
    priors were on site (negative: late)."""
    where, params = "", []
    if state:
        where, params = "WHERE state = ?", [state]
    rows = db.query(
        f"""SELECT *, CASE WHEN state = 'fetched' AND scheduled_at IS NOT NULL
                           THEN scheduled_at - finished_at END AS lead_time_s
            FROM prefetch_requests {where} ORDER BY id DESC LIMIT ?""", (*params, limit))
    return [dict(r) for r in rows]


def studies_of_request(db: Database, request_id: int) -> list[dict[str, Any]]:
    rows = db.query("SELECT * FROM prefetch_studies WHERE request_fk = ? ORDER BY study_date "
                    "DESC", (request_id,))
    return [dict(r) for r in rows]


def counts_by_state(db: Database) -> dict[str, int]:
    rows = db.query("SELECT state, count(*) AS n FROM prefetch_requests GROUP BY state")
    return {r["state"]: int(r["n"]) for r in rows}


# --- the shared index, as the prefetch sees it ----------------------------------------------


def local_instance_count(db: Database, study_uid: str) -> int:
    row = db.query_one(
        "SELECT count(*) AS n FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ? AND i.is_current = 1", (study_uid,))
    return int(row["n"]) if row else 0


def held_instance_uids(db: Database, study_uid: str) -> set[str]:
    """The study's current instances, and those moved from it to another study here (a
    correction): the region's copy of a moved one would only be kept as an older version
    (``index.record_instance``, ``keep_local_moves``), so it is not asked for."""
    rows = db.query(
        "SELECT i.sop_instance_uid FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ? AND i.is_current = 1", (study_uid,))
    return {r["sop_instance_uid"] for r in rows} | retrieve.moved_out_of(db, study_uid)


def current_elsewhere(db: Database, study_uid: str, sop_uids: list[str]) -> set[str]:
    """Which of ``sop_uids`` another study here holds as current (moved there):
    :func:`appliance.store.retrieve.current_elsewhere`, for the prefetch's WADO-RS list."""
    return retrieve.current_elsewhere(db, study_uid, sop_uids)


def held_by_patient(db: Database, patient_id: str,
                    limit: int) -> dict[str, list[str]] | None:
    """Study UID -> the SOP Instance UIDs held, for the local studies of that patient ID
    (whatever the issuer: a superset only costs bytes); None if over ``limit`` instances.
    ``patient_id != ''`` (implied by a non-empty ID) lets SQLite use patients_key, which is
    partial (schema migration 17): without it each order read every current instance."""
    keyed = " AND p.patient_id != ''" if patient_id else ""
    rows = db.query(
        "SELECT s.study_uid, i.sop_instance_uid FROM instances i "
        "JOIN studies s ON s.id = i.study_fk JOIN patients p ON p.id = s.patient_fk "
        f"WHERE p.patient_id = ?{keyed} AND i.is_current = 1 LIMIT ?", (patient_id, limit + 1))
    if len(rows) > limit:
        return None
    held: dict[str, list[str]] = {}
    for row in rows:
        held.setdefault(row["study_uid"], []).append(row["sop_instance_uid"])
    return held


def pin_study(db: Database, study_uid: str, until: float) -> None:
    """Keep a fetched prior in the cache until ``until`` (never shortens an existing pin)."""
    with db.transaction() as conn:
        conn.execute("UPDATE studies SET pinned_until = max(coalesce(pinned_until, 0), ?) "
                     "WHERE study_uid = ?", (until, study_uid))


def mark_fetched_routed(db: Database, instance_id: int | None = None) -> int:
    """Instances fetched from the region are already there: mark them routed, so that the
    stability pass never uploads them back, and confirmed (the region just served them), so
    that once their pin expires the cache may evict them like any confirmed study."""
    at = now()
    with db.transaction() as conn:
        if instance_id is not None:
            cursor = conn.execute(
                "UPDATE instances SET routed_at = coalesce(routed_at, ?), "
                "confirmed_at = coalesce(confirmed_at, ?) WHERE id = ? AND "
                "source_address = ?", (at, at, instance_id, REGION_SOURCE))
        else:
            cursor = conn.execute(
                "UPDATE instances SET routed_at = coalesce(routed_at, ?), "
                "confirmed_at = coalesce(confirmed_at, ?) WHERE (routed_at IS NULL OR "
                "confirmed_at IS NULL) AND source_address = ?", (at, at, REGION_SOURCE))
    return cursor.rowcount


def record_fetched(db: Database, request_id: int, instance_ids: list[int], size: int) -> None:
    """Instances of a request filed from the region, in one transaction (a bucket's worth
    rather than two commits per instance): marked routed and confirmed as
    :func:`mark_fetched_routed` does, and counted in the request's progress."""
    if not instance_ids:
        return
    at = now()
    with db.transaction() as conn:
        conn.executemany(
            "UPDATE instances SET routed_at = coalesce(routed_at, ?), "
            "confirmed_at = coalesce(confirmed_at, ?) WHERE id = ? AND source_address = ?",
            [(at, at, instance_id, REGION_SOURCE) for instance_id in instance_ids])
        conn.execute(
            "UPDATE prefetch_requests SET instances_fetched = instances_fetched + ?, "
            "bytes_fetched = bytes_fetched + ?, updated_at = ? WHERE id = ?",
            (len(instance_ids), size, at, request_id))


def study_patient(db: Database, study_fk: int) -> dict[str, Any] | None:
    """Who a newly arrived local study belongs to (for the on-arrival trigger)."""
    row = db.query_one(
        """SELECT s.study_uid, s.accession_number, s.origin, p.patient_id, p.issuer,
                  (SELECT group_concat(DISTINCT se.modality) FROM series se
                     WHERE se.study_fk = s.id) AS modalities
           FROM studies s JOIN patients p ON p.id = s.patient_fk WHERE s.id = ?""",
        (study_fk,))
    return dict(row) if row else None


def instance_ids_of_study(db: Database, study_uid: str) -> tuple[int, list[int]]:
    rows = db.query("SELECT i.id, s.id AS study_fk FROM instances i JOIN studies s ON "
                    "s.id = i.study_fk WHERE s.study_uid = ? AND i.is_current = 1",
                    (study_uid,))
    return (int(rows[0]["study_fk"]) if rows else 0), [int(r["id"]) for r in rows]


def urgent_uploads_waiting(db: Database) -> int:
    """Urgent uploads to the hub not yet done: downloads step aside for them."""
    row = db.query_one("SELECT count(*) AS n FROM jobs WHERE kind = 'hub' AND priority = 0 "
                       "AND state IN ('pending', 'running')")
    return int(row["n"]) if row else 0
