"""Storage Commitment requests and the delivery of their answers (``commitment_requests``,
migration 16).

Owns: deciding, in the transaction that records a request, which of its instances PAS
commits to (the index holds that SOP Instance UID with that SOP Class, and its file is on the
spool) and which it does not (PS3.4 J.3.3 Failure Reason: 0x0112 no such object instance,
0x0119 class/instance conflict); the request's audit row, in that same transaction; and the
delivery state of its report (pending, sent, given-up) with its backoff. May not touch: the
network (appliance/ingest/commitment.py sends the reports) or the files.

Why the answer is decided when the request comes, and kept: PAS answers a C-STORE only once
the instance is durable (invariant 1) and keeps it until the region confirmed it
(invariant 2), so what the index holds then is what PAS can honestly commit to. Kept, the
same Transaction UID asked again gets the same answer (invariant 6), and a restart resumes a
report not yet delivered from the row (invariant 3).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.store import audit
from appliance.store.db import Database, now

# PS3.4 J.3.3 (Failed SOP Sequence, Failure Reason 0008,1197).
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119


@dataclass(frozen=True)
class Commitment:
    """One request and the answer PAS decided for it."""

    id: int
    transaction_uid: str
    calling_ae: str
    source_address: str | None
    committed: list[tuple[str, str]]        # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int]]      # (SOP Class UID, SOP Instance UID, reason)
    state: str
    attempts: int
    give_up_at: float

    @staticmethod
    def from_row(row: sqlite3.Row) -> Commitment:
        return Commitment(
            id=int(row["id"]), transaction_uid=row["transaction_uid"],
            calling_ae=row["calling_ae"], source_address=row["source_address"],
            committed=[(c, i) for c, i in json.loads(row["committed"])],
            failed=[(c, i, int(r)) for c, i, r in json.loads(row["failed"])],
            state=row["state"], attempts=int(row["attempts"]),
            give_up_at=float(row["give_up_at"]))


def _decide(conn: sqlite3.Connection, items: Sequence[tuple[str, str]],
            file_exists: Callable[[str], bool]
            ) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]], set[str]]:
    """Committed and failed items, and the studies of the committed ones: an instance is
    committed when the index's current version of it has the asked SOP Class and its file
    exists."""
    committed: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    studies: set[str] = set()
    for sop_class, sop_instance in items:
        row = conn.execute(
            "SELECT i.sop_class_uid, i.path, s.study_uid FROM instances i "
            "JOIN studies s ON s.id = i.study_fk WHERE i.sop_instance_uid = ? "
            "ORDER BY i.is_current DESC, i.version DESC LIMIT 1", (sop_instance,)).fetchone()
        if row is None or not file_exists(row["path"]):
            failed.append((sop_class, sop_instance, NO_SUCH_OBJECT_INSTANCE))
        elif row["sop_class_uid"] != sop_class:
            failed.append((sop_class, sop_instance, CLASS_INSTANCE_CONFLICT))
        else:
            committed.append((sop_class, sop_instance))
            studies.add(row["study_uid"])
    return committed, failed, studies


def record_request(db: Database, transaction_uid: str, calling_ae: str,
                   source_address: str | None, items: Sequence[tuple[str, str]],
                   file_exists: Callable[[str], bool], give_up_after_s: float
                   ) -> tuple[Commitment, bool]:
    """Record a request and its answer, with its audit row, in one transaction; the row and
    whether it is new. The same calling AE and Transaction UID again returns the row
    recorded first (same answer; its report is due again at once, the modality asking again
    having likely missed it), and writes no second row."""
    existing = _again(db, transaction_uid, calling_ae, give_up_after_s)
    if existing is not None:
        return existing, False
    # Decided before the write transaction (reads only: a request may name tens of thousands
    # of instances, and C-STOREs must not wait for their look-ups). An instance PAS holds
    # stays until the region confirmed it, so the answer cannot go stale meanwhile.
    committed, failed, studies = _decide(db.connection(), items, file_exists)
    at = now()
    with db.transaction() as conn:
        if not conn.execute("SELECT 1 FROM commitment_requests WHERE calling_ae = ? "
                            "AND transaction_uid = ?",
                            (calling_ae, transaction_uid)).fetchone():
            cursor = conn.execute(
                "INSERT INTO commitment_requests (transaction_uid, calling_ae, source_address, "
                "requested_at, committed, failed, next_attempt_at, give_up_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (transaction_uid, calling_ae, source_address, at, json.dumps(committed),
                 json.dumps(failed), at, at + give_up_after_s, at))
            # The studies name their patients in the trail (audit._patients_named).
            named, left_out = audit.study_list(studies)
            detail = (f"Transaction UID {transaction_uid}: {len(committed)} committed, "
                      f"{len(failed)} not held")
            if failed:
                reasons = sorted({f"0x{reason:04X}" for _, _, reason in failed})
                detail += f" ({', '.join(reasons)})"
            if left_out:
                detail += f", {left_out} more studies not listed"
            audit.record_in(conn, "commitment", actor=calling_ae, source=source_address,
                            target=named,
                            outcome="success" if not failed
                            else f"failure: {len(failed)} of {len(items)} not held",
                            detail=detail, sop_class="1.2.840.10008.1.20.1")
            row = conn.execute("SELECT * FROM commitment_requests WHERE id = ?",
                               (cursor.lastrowid,)).fetchone()
            return Commitment.from_row(row), True
    again = _again(db, transaction_uid, calling_ae, give_up_after_s)
    if again is None:  # recorded by another association a moment ago, so it exists
        raise RuntimeError(f"commitment request {transaction_uid} vanished")
    return again, False


def _again(db: Database, transaction_uid: str, calling_ae: str,
           give_up_after_s: float) -> Commitment | None:
    """A request already recorded: its report is due again at once (the modality asking
    again has likely missed it), with a new deadline; None when it is new."""
    at = now()
    with db.transaction() as conn:
        row = conn.execute(
            "SELECT * FROM commitment_requests WHERE calling_ae = ? AND transaction_uid = ?",
            (calling_ae, transaction_uid)).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE commitment_requests SET state = 'pending', next_attempt_at = ?, "
                     "give_up_at = ?, attempts = 0, updated_at = ? WHERE id = ?",
                     (at, at + give_up_after_s, at, row["id"]))
        row = conn.execute("SELECT * FROM commitment_requests WHERE id = ?",
                           (row["id"],)).fetchone()
        return Commitment.from_row(row)


def get(db: Database, request_id: int) -> Commitment | None:
    row = db.query_one("SELECT * FROM commitment_requests WHERE id = ?", (request_id,))
    return Commitment.from_row(row) if row is not None else None


def _not_of(exclude_aes: Collection[str]) -> tuple[str, tuple[str, ...]]:
    """The SQL condition leaving out the reports of ``exclude_aes`` (modalities with a
    delivery under way), and its parameters."""
    if not exclude_aes:
        return "", ()
    marks = ", ".join("?" * len(exclude_aes))
    return f" AND calling_ae NOT IN ({marks})", tuple(exclude_aes)


def due(db: Database, limit: int = 32, exclude_aes: Collection[str] = ()) -> list[Commitment]:
    """Reports to deliver now, the oldest first; none of ``exclude_aes`` (so the reports of
    a modality whose delivery hangs never fill ``limit`` and hide the others')."""
    condition, params = _not_of(exclude_aes)
    rows = db.query("SELECT * FROM commitment_requests WHERE state = 'pending' "
                    f"AND next_attempt_at <= ?{condition} ORDER BY next_attempt_at LIMIT ?",
                    (now(), *params, limit))
    return [Commitment.from_row(r) for r in rows]


def next_due_at(db: Database, exclude_aes: Collection[str] = ()) -> float | None:
    condition, params = _not_of(exclude_aes)
    row = db.query_one("SELECT min(next_attempt_at) AS at FROM commitment_requests "
                       f"WHERE state = 'pending'{condition}", params)
    return float(row["at"]) if row is not None and row["at"] is not None else None


# A delivery's outcome is recorded only on the asking it answered. The modality may ask the
# same transaction again while a report is on its way (it missed the first, or its release
# came first): that asking sets a new deadline (``give_up_at``) and makes the report due
# again. Marked sent by the earlier delivery's end, the row said "sent" and the second
# asking never had its report (seen in CI: the modality asked again 2 ms before the first
# delivery logged its end). Rows whose deadline moved are left pending, so due again.
_AS_DELIVERED = "id = ? AND state = 'pending' AND give_up_at = ?"


def mark_sent(db: Database, request: Commitment, how: str) -> None:
    """``request``'s report was delivered (unless it was asked again meanwhile)."""
    with db.transaction() as conn:
        conn.execute("UPDATE commitment_requests SET state = 'sent', sent_at = ?, sent_how = ?, "
                     "attempts = attempts + 1, last_error = NULL, updated_at = ? "
                     f"WHERE {_AS_DELIVERED}", (now(), how, now(), request.id,
                                                request.give_up_at))


def mark_failed(db: Database, request: Commitment, error: str, retry_in_s: float) -> None:
    """One delivery failed; the next one in ``retry_in_s`` (unless it was asked again
    meanwhile: then it is due at once, with its attempts counted anew)."""
    with db.transaction() as conn:
        conn.execute("UPDATE commitment_requests SET attempts = attempts + 1, last_error = ?, "
                     f"next_attempt_at = ?, updated_at = ? WHERE {_AS_DELIVERED}",
                     (error, now() + retry_in_s, now(), request.id, request.give_up_at))


def give_up(db: Database, request: Commitment, error: str) -> None:
    """Past its deadline: no more tries, and a failure row in the audit trail (the modality
    never heard the answer, so it keeps its copy: nothing is lost, but someone should look)."""
    with db.transaction() as conn:
        changed = conn.execute(
            "UPDATE commitment_requests SET state = 'given-up', last_error = ?, updated_at = ? "
            f"WHERE {_AS_DELIVERED}", (error, now(), request.id, request.give_up_at)).rowcount
        if changed:
            audit.record_in(conn, "commitment", actor=request.calling_ae,
                            source=request.source_address, target=None,
                            outcome=f"failure: report not delivered: {error}",
                            detail=f"Transaction UID {request.transaction_uid}: report given "
                                   f"up after {request.attempts} attempts",
                            sop_class="1.2.840.10008.1.20.1")


# How long a settled request (its report sent, or given up) is kept: long enough for a
# modality asking the same transaction again to get the same answer, for `pas doctor` to
# know who asks, and for IT to look back a week; its audit row stays for good.
SETTLED_KEPT_S = 7 * 86400.0


def forget_settled(db: Database, kept_s: float = SETTLED_KEPT_S) -> int:
    """Delete requests settled more than ``kept_s`` ago; how many. A row holds the UIDs of
    every instance it answered (~130 bytes each: a 2,000-image CT is 260 kB), so kept for
    ever the table grew by tens of MB a day at a busy site, in the database every index
    read shares. Pending reports are never touched."""
    with db.transaction() as conn:
        return conn.execute(
            "DELETE FROM commitment_requests WHERE state IN ('sent', 'given-up') "
            "AND updated_at < ?", (now() - kept_s,)).rowcount


def due_at_start(db: Database) -> int:
    """At start-up: every report still pending is due at once (the modality may have come
    back while PAS was down, and a restart is how an operator says "try now"); how many."""
    with db.transaction() as conn:
        return conn.execute("UPDATE commitment_requests SET next_attempt_at = ?, "
                            "updated_at = ? WHERE state = 'pending' AND next_attempt_at > ?",
                            (now(), now(), now())).rowcount


def shift_for_clock_step_in(conn: sqlite3.Connection, step: float, cut: float) -> int:
    """Within :func:`appliance.store.cache.shift_for_clock_step`'s transaction: pending
    reports written before the wall clock stepped keep the time they had left until their
    next try and their deadline (a step forward by years gave every one up at once, a step
    back postponed them by its size); how many."""
    return conn.execute(
        "UPDATE commitment_requests SET next_attempt_at = next_attempt_at + ?, "
        "give_up_at = give_up_at + ?, updated_at = updated_at + ? "
        "WHERE state = 'pending' AND updated_at < ?", (step, step, step, cut)).rowcount


GIVEN_UP_RECENT_S = 24 * 3600.0
# A report waiting longer than this is worth a look (``pas doctor``, the heartbeat, the
# ``PasApplianceCommitmentReportsStuck`` alert): a reachable modality gets it within seconds
# (its first retry comes 10 s after a failed try).
STUCK_AFTER_S = 300.0


def backlog(db: Database) -> dict[str, Any]:
    """What hospital IT must see of the reports (``pas status``, the status page, ``pas
    doctor``): how many wait and since when, per modality with its latest error, and how
    many were given up (last 24 h; last 7 days, as settled rows are kept a week). A modality
    that never hears PAS committed keeps its copy of the study, and its disk fills: this is
    the first sign of it."""
    at = now()
    per_ae = db.query(
        "SELECT calling_ae, count(*) AS pending, min(requested_at) AS oldest, "
        "max(attempts) AS attempts, "
        "(SELECT last_error FROM commitment_requests e WHERE e.calling_ae = c.calling_ae "
        " AND e.state = 'pending' AND e.last_error IS NOT NULL "
        " ORDER BY e.updated_at DESC LIMIT 1) AS last_error "
        "FROM commitment_requests c WHERE state = 'pending' GROUP BY calling_ae "
        "ORDER BY oldest")
    given_up = db.query_one(
        "SELECT count(*) AS total, coalesce(sum(updated_at >= ?), 0) AS recent "
        "FROM commitment_requests WHERE state = 'given-up'", (at - GIVEN_UP_RECENT_S,))
    by_ae = [{"calling_ae": r["calling_ae"], "pending": int(r["pending"]),
              "oldest_age_s": round(at - r["oldest"], 1), "attempts": int(r["attempts"]),
              "last_error": r["last_error"]} for r in per_ae]
    return {
        "pending": sum(row["pending"] for row in by_ae),
        "oldest_age_s": max((row["oldest_age_s"] for row in by_ae), default=None),
        "given_up_24h": int(given_up["recent"]) if given_up is not None else 0,
        "given_up_7d": int(given_up["total"]) if given_up is not None else 0,
        "by_ae": by_ae,
    }


def askers(db: Database) -> list[dict[str, Any]]:
    """Every modality that asked for commitment: how many requests, when last, and how
    many reports went on the asking association (``pas doctor``: an AE PAS has no address
    for gets its reports only while it keeps that association open)."""
    rows = db.query(
        "SELECT calling_ae, count(*) AS requests, max(requested_at) AS last_at, "
        "coalesce(sum(sent_how = 'same association'), 0) AS on_same_association "
        "FROM commitment_requests GROUP BY calling_ae ORDER BY calling_ae")
    return [dict(r) for r in rows]
