"""Patient merges (HL7 ADT^A40 and its older forms, and A47's change of identifier) applied
to the prefetch requests.

Owns: the SQL that moves a merged-away patient's requests not yet done to the surviving
patient, with the message's record and its audit rows, in one transaction (invariant 3).
May not touch: the index (``patients``, ``studies``: PAS never rewrites images or their
patient; the cache keeps what it received under the identity it carried) nor files.

What moves: requests ``pending`` or ``running`` of (prior id, prior issuer). Each takes the
surviving patient's id and issuer, and its dedup key (and order key) is re-keyed the same
way (``order:OLD|I|ORD1`` -> ``order:NEW|I|ORD1``), so that the RIS's later messages about
that order, which name the surviving patient, find it: kept under the old key, an update
scheduled a second request and a cancel cancelled nothing. When the surviving patient
already has the request of that order, appointment or visit (the RIS re-sent it under the
real identity first), the prior patient's is cancelled instead, naming that request in
``last_error``: the order is not fetched twice. Requests already ended (fetched, failed,
cancelled) stay as they were: they say what was done under the identity of the time.

A request running while it moves keeps its attempt, which searched for the prior id; that
attempt's end makes it pending again (:func:`appliance.store.prefetch.finish`), so that it
searches again for the patient it now names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.store import audit
from appliance.store.db import Database, now
from appliance.store.prefetch import (
    CANCEL_SET,
    _free_dedup_key,
    _order_rows,
    _stored,
    procedures_compatible,
    request_key,
)
from appliance.store.prefetch_messages import MERGED, claim_message

NOT_DONE = ("pending", "running")


@dataclass(frozen=True)
class Merge:
    """The prior patient (MRG-1) merged into the surviving one (PID-3); ``correction``: an
    A47, one identifier of the same patient corrected (no second patient involved)."""

    prior_id: str
    prior_issuer: str
    patient_id: str
    issuer: str
    correction: bool = False

    def describe(self) -> str:
        """The merge as the message record keeps it (a resend is compared on it): the same
        words for A40 and A47, as recorded before A47 had its own."""
        return (f"{_who(self.prior_id, self.prior_issuer)} into "
                f"{_who(self.patient_id, self.issuer)}")

    def said(self) -> str:
        """For people (ACK, audit, log, a request's last error): an identity-vigilance team
        tells a merge of two patients from one identifier typed wrong."""
        if self.correction:
            return (f"identifier {_who(self.prior_id, self.prior_issuer)} corrected to "
                    f"{_who(self.patient_id, self.issuer)}")
        return f"patient {self.describe()}"

    @property
    def verb(self) -> str:
        return "corrected" if self.correction else "merged"

    @property
    def survivor(self) -> str:
        return "the corrected identifier's" if self.correction else "the surviving patient's"


@dataclass(frozen=True)
class Merged:
    """What one merge did: requests moved, and requests cancelled as duplicates (each with
    the surviving patient's request that already held its order)."""

    merge: Merge
    moved: tuple[int, ...] = ()
    folded: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class MergeRecorded:
    first: bool                   # False: a resend, nothing changed
    merged: tuple[Merged, ...] = ()
    reused_for: str | None = None  # what an earlier message with this key named


def record_merges(db: Database, message_key: str, message_type: str, merges: list[Merge],
                  source: str = "") -> MergeRecorded:
    """Record the merge message and apply each of its merges, in its order, in ONE
    transaction with an audit row per merge (``merge``): the ACK is sent only after this
    commits. A resend (same message key and merges) changes nothing."""
    at = now()
    meaning = MERGED + "; ".join(merge.describe() for merge in merges)
    with db.transaction() as conn:
        claimed, reused_for = claim_message(conn, message_key, message_type, "AA", meaning,
                                            at)
        if claimed is None:
            return MergeRecorded(first=False)
        done = tuple(_merge(conn, merge, at) for merge in merges)
        for merged in done:
            audit.record_in(
                conn, "merge", actor=source or None, detail=_audit_detail(message_type, merged),
                patient=audit.PATIENT_SEPARATOR.join(sorted(
                    {merged.merge.prior_id, merged.merge.patient_id})))
    return MergeRecorded(first=True, merged=done, reused_for=reused_for)


def _merge(conn: Any, merge: Merge, at: float) -> Merged:
    rows = conn.execute(
        "SELECT id, dedup_key, order_key, procedure_key, state FROM prefetch_requests "
        f"WHERE patient_id = ? AND issuer = ? AND state IN {NOT_DONE} ORDER BY id",
        (merge.prior_id, merge.prior_issuer)).fetchall()
    moved: list[int] = []
    folded: list[tuple[int, int]] = []
    for row in rows:
        dedup_key = _rekeyed(row["dedup_key"], merge)
        order_key = _rekeyed(row["order_key"], merge) if row["order_key"] else None
        holder = _holder(conn, int(row["id"]), dedup_key, order_key, _stored(row))
        if holder is not None:
            conn.execute(
                f"UPDATE prefetch_requests SET {CANCEL_SET}, last_error = ? WHERE id = ?",
                (at, at, f"{merge.said()} {merge.verb}: request {holder} already "
                 "holds this order", row["id"]))
            folded.append((int(row["id"]), holder))
            continue
        if order_key is not None and dedup_key != row["dedup_key"] and conn.execute(
                "SELECT 1 FROM prefetch_requests WHERE dedup_key = ?",
                (dedup_key,)).fetchone() is not None:
            dedup_key = _free_dedup_key(conn, order_key, _stored(row))
        conn.execute(
            "UPDATE prefetch_requests SET patient_id = ?, issuer = ?, dedup_key = ?, "
            "order_key = ?, updated_at = ? WHERE id = ?",
            (merge.patient_id, merge.issuer, dedup_key, order_key, at, row["id"]))
        moved.append(int(row["id"]))
    return Merged(merge, tuple(moved), tuple(folded))


def _rekeyed(key: str, merge: Merge) -> str:
    """``kind:PRIOR|ISSUER|rest`` -> ``kind:NEW|ISSUER|rest``: the key the surviving patient's
    messages about the same order, appointment, visit or worklist step give. A key naming
    no patient (``arrival:<study UID>``) is kept."""
    kind, colon, _ = key.partition(":")
    prefix = request_key(kind, merge.prior_id, merge.prior_issuer, "")
    if not colon or not key.startswith(prefix):
        return key
    return request_key(kind, merge.patient_id, merge.issuer, "") + key[len(prefix):]


def _holder(conn: Any, own: int, dedup_key: str, order_key: str | None,
            procedure: tuple[str, str]) -> int | None:
    """The surviving patient's request for the same order and procedure (an order's, found
    as a new message's would be: same procedure, else a compatible one), appointment or
    visit, other than request ``own``; None when it has none."""
    if order_key is not None:
        rows = [r for r in _order_rows(conn, order_key) if r["id"] != own]
        for row in [r for r in rows if _stored(r) == procedure] + rows:
            if procedures_compatible(_stored(row), procedure):
                return int(row["id"])
        return None
    row = conn.execute("SELECT id FROM prefetch_requests WHERE dedup_key = ? AND id != ?",
                       (dedup_key, own)).fetchone()
    return int(row["id"]) if row is not None else None


def _who(patient_id: str, issuer: str) -> str:
    return f"{patient_id}" + (f" ({issuer})" if issuer else "")


def _audit_detail(message_type: str, merged: Merged) -> str:
    moved = ", ".join(f"#{n}" for n in merged.moved) or "none"
    text = (f"{message_type}: {merged.merge.said()}; prefetch requests not yet "
            f"done moved: {moved}")
    if merged.folded:
        text += f"; cancelled, {merged.merge.survivor} request already holding the order: " + \
            ", ".join(f"#{old} (held by #{holder})" for old, holder in merged.folded)
    return text
