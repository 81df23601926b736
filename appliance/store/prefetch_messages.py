"""The HL7 messages the prefetch has recorded: how a message is claimed once, and what an
earlier message with the same key meant.

Owns: the ``prefetch_messages`` rows written when a message is applied (in the caller's
transaction, with what the message changes: :func:`appliance.store.prefetch.record_message`
for orders, appointments and visits, :func:`appliance.store.prefetch_merge.record_merges`
for patient merges), and reading back those of one request (:func:`messages_of`). Split
from prefetch.py so that both share one claim. May not touch: the requests themselves,
files or the network.
"""

from __future__ import annotations

from typing import Any

# What a message is recorded as meaning (prefetch_messages.detail), which a resend is
# compared with: the order's key (``order:...``, ``appointment:...``...), ``cancel <key>``,
# or for a message of several orders this prefix, then each order's meaning, in order.
SEVERAL = "orders: "
# What a patient merge is recorded as meaning: this prefix, then the merges it named
# (:mod:`appliance.store.prefetch_merge`).
MERGED = "merge "
# What a cancel was recorded as until 2026-12-04 (the order it named was not kept).
LEGACY_CANCEL = "cancel"


def claim_message(conn: Any, message_key: str, message_type: str, ack_code: str,
                  meaning: str, at: float) -> tuple[str | None, str | None]:
    """Record a message and its ``meaning`` (kept in ``detail``, what a resend is compared
    with) in the transaction ``conn`` is in: the key it is recorded under
    (None: already recorded with this ``meaning``, a resend that must change nothing), and
    the meaning an earlier message with this key had when the key was reused for another
    (see :func:`appliance.store.prefetch.record_message`)."""
    claimed = conn.execute(
        "INSERT OR IGNORE INTO prefetch_messages (message_key, received_at, message_type, "
        "request_fk, ack_code, detail) VALUES (?, ?, ?, NULL, ?, ?)",
        (message_key, at, message_type, ack_code, meaning))
    if claimed.rowcount:
        return message_key, None
    earlier = _recorded_meaning(conn, message_key)
    if earlier is None or earlier == meaning:
        return None, None
    message_key = f"{message_key}|{meaning}"
    claimed = conn.execute(
        "INSERT OR IGNORE INTO prefetch_messages (message_key, received_at, "
        "message_type, request_fk, ack_code, detail) VALUES (?, ?, ?, NULL, ?, ?)",
        (message_key, at, message_type, ack_code, meaning))
    return (message_key if claimed.rowcount else None), earlier  # None: that one resent too


def _recorded_meaning(conn: Any, message_key: str) -> str | None:
    """The order a recorded message named, as it was recorded (``detail``): the order's
    key, or ``cancel <key>``; ``orders: ...`` for a message of several, see
    :data:`SEVERAL`; ``merge ...`` for a patient merge, :data:`MERGED`. None when unknown.

    A message of one order recorded before 2026-12-07 kept no meaning (``detail`` NULL):
    its request's dedup key now stands for it, as it did then (None: its request deleted).
    Compared with that key, a resend was taken as new once the key had changed (a merge
    re-keys it; an order's second procedure has a key of its own), bringing back cancelled
    orders and merged-away patients (invariant 6). A cancel recorded before 2026-12-04
    kept the bare word ``cancel``: None, as it was."""
    row = conn.execute(
        "SELECT m.detail, r.dedup_key FROM prefetch_messages m LEFT JOIN prefetch_requests r "
        "ON r.id = m.request_fk WHERE m.message_key = ?", (message_key,)).fetchone()
    if row is None:
        return None
    if row["detail"] and row["detail"] != LEGACY_CANCEL:
        return str(row["detail"])
    return str(row["dedup_key"]) if row["dedup_key"] is not None else None


def messages_of(db: Any, request_id: int, dedup_key: str) -> list[dict[str, Any]]:
    """The messages recorded for a request, oldest first: those that made or changed it
    and those that cancelled it (``pas prefetch show``): which control ids touched an order
    was in no output. A message of several orders names its first request only."""
    return [dict(r) for r in db.query(
        "SELECT message_key, received_at, message_type, ack_code FROM prefetch_messages "
        "WHERE request_fk = ? OR detail = ? ORDER BY received_at, message_key",
        (request_id, f"cancel {dedup_key}"))]
