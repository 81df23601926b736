"""How long the prefetch's own rows are kept: finished requests, their priors, HL7 messages.

Owns: deleting the ``prefetch_requests`` rows in a final state (``fetched``, ``failed``,
``cancelled``) that nothing touched for ``prefetch.keep_days``, their ``prefetch_studies``,
and the ``prefetch_messages`` received before then that name no request still kept. May not
touch: any other table, files or the network. Split from prefetch.py (near 600 lines).

Why: nothing deleted them. A hospital sending ~1,000 orders a day (a few priors and one or
two messages each) added a million requests, some four million prior rows and 1.5 million
HL7 messages in three years, in every backup too. What they are kept for is
idempotence (invariant 6): a message resent, or an order sent again, within the window is
still recognised. After it, an order sent again is a new request: one search at the region,
and priors still in the cache are not fetched again (complete: ``on_site``; partial: only
the instances missing, see appliance/prefetch/fetcher.py).

What is never deleted, whatever its age: a request pending or running (nor one cancelled
while its attempt runs: its ``finished_at`` is NULL until that attempt ends), one changed or
sent again within the window (``updated_at``), and a message whose request is still kept,
by ``request_fk`` or, for a cancel, by the order its ``detail`` names: a cancel resent after
the window, its order revived meanwhile, would otherwise cancel the live order.

``prefetch_requests.id`` is reused once the highest rows are deleted (no AUTOINCREMENT): a
message kept while its request goes (received after the request's last change: only a wall
clock stepped back does that) loses its ``request_fk``, so that it never names the next
request of that id (``pas prefetch show`` would list it, and a key reused by the RIS would be
compared with that request's order). Its key still makes a resend a resend.

Not kept by this: a message of several orders is kept by its first order's request only
(``request_fk``; the others are in its ``detail`` as text). Resent after that request went,
it is applied again: each order still kept is counted as sent again, a cancel in it cancels
again.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from appliance.store.db import Database

# The states a request never leaves on its own (a new order for it may revive it, which
# sets updated_at): those whose rows may go once old. Written out, not bound: SQLite uses
# schema 25's partial index only for this very term.
FINAL = "('fetched', 'failed', 'cancelled')"
# Requests per transaction: each takes its priors (a few) and messages (one or two) with it,
# so a batch is a few thousand rows and the write lock is short (C-STOREs and HL7 ACKs
# commit in between). The first run after an upgrade may have years of rows to go.
REQUESTS_PER_TRANSACTION = 500
MESSAGES_PER_TRANSACTION = 2000
RETENTION_INTERVAL_S = 3600.0  # how often the daemon prunes (hourly, by the monotonic clock)
# Batches of requests per call: the first prune after the upgrade (years of rows) is done
# over several passes of the prefetch scheduler, which claims due requests in between.
BATCHES_PER_CALL = 20
CANCEL = "cancel "  # a cancel's prefetch_messages.detail: this, then the order's key


@dataclass(frozen=True)
class Pruned:
    """How many rows went, per table."""

    requests: int = 0
    studies: int = 0
    messages: int = 0
    more: bool = False  # stopped at max_batches with rows left: call again soon

    def __bool__(self) -> bool:
        return bool(self.requests or self.studies or self.messages)

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(self.requests + other.requests, self.studies + other.studies,
                      self.messages + other.messages, self.more or other.more)


def prune_prefetch(db: Database, before: float, max_batches: int | None = None) -> Pruned:
    """Delete the finished requests untouched since ``before`` with their priors, then the
    messages received before ``before`` that name no request left (see the module's
    docstring for what stays). Each batch is one transaction holding a request with its
    priors and messages: a crash between two leaves every request whole. Running it again
    at once deletes nothing. ``max_batches``: at most this many transactions; ``more`` says
    rows are left."""
    total, batches = Pruned(), 0
    while True:
        if max_batches is not None and batches >= max_batches:
            return total + Pruned(more=True)
        with db.transaction() as conn:
            batch = _prune_requests(conn, before)
        total, batches = total + batch, batches + 1
        if batch.requests < REQUESTS_PER_TRANSACTION:
            break
    while True:
        if max_batches is not None and batches >= max_batches:
            return total + Pruned(more=True)
        with db.transaction() as conn:
            gone = _prune_messages(conn, before)
        total, batches = total + Pruned(messages=gone), batches + 1
        if gone < MESSAGES_PER_TRANSACTION:
            return total


def newest_row_at(db: Database) -> float | None:
    """When the newest HL7 message was received or the newest request made (None: neither
    yet): the retention's "now" is never later than that, so a wall clock far ahead (a dead
    RTC, a mistyped date) never makes the rows look old. A site that gets no more orders
    keeps what it has, which does not grow."""
    row = db.connection().execute(
        "SELECT (SELECT max(received_at) FROM prefetch_messages), "
        "(SELECT created_at FROM prefetch_requests ORDER BY id DESC LIMIT 1)").fetchone()
    times = [float(value) for value in row if value is not None]
    return max(times) if times else None


def _prune_requests(conn: sqlite3.Connection, before: float) -> Pruned:
    """One batch of old finished requests, with their priors and messages, in the caller's
    transaction (chosen inside it: an order sent again meanwhile has moved updated_at)."""
    ids = [(row[0],) for row in conn.execute(
        "SELECT id FROM prefetch_requests INDEXED BY prefetch_requests_finished "
        f"WHERE state IN {FINAL} AND finished_at < ? AND updated_at < ? LIMIT ?",
        (before, before, REQUESTS_PER_TRANSACTION))]
    if not ids:
        return Pruned()
    studies = conn.executemany("DELETE FROM prefetch_studies WHERE request_fk = ?",
                               ids).rowcount
    messages = conn.executemany(
        "DELETE FROM prefetch_messages WHERE request_fk = ? AND received_at < ?",
        [(request_id, before) for (request_id,) in ids]).rowcount
    # Kept (received since ``before``): no longer names the request, whose id may be reused.
    conn.executemany("UPDATE prefetch_messages SET request_fk = NULL WHERE request_fk = ?", ids)
    requests = conn.executemany("DELETE FROM prefetch_requests WHERE id = ?", ids).rowcount
    return Pruned(requests, studies, messages)


def _prune_messages(conn: sqlite3.Connection, before: float) -> int:
    """One batch of messages received before ``before`` that name no request still kept:
    none (a refusal, a merge, an update of no known visit), one deleted, or a cancel of an
    order no request carries any more."""
    return conn.execute(
        f"""DELETE FROM prefetch_messages WHERE rowid IN (
               SELECT m.rowid FROM prefetch_messages m WHERE m.received_at < ?
                 AND (m.request_fk IS NULL OR NOT EXISTS (
                        SELECT 1 FROM prefetch_requests r WHERE r.id = m.request_fk))
                 AND NOT (coalesce(substr(m.detail, 1, {len(CANCEL)}), '') = ? AND EXISTS (
                        SELECT 1 FROM prefetch_requests r
                        WHERE r.dedup_key = substr(m.detail, {len(CANCEL) + 1})
                           OR r.order_key = substr(m.detail, {len(CANCEL) + 1})))
               LIMIT ?)""",
        (before, CANCEL, MESSAGES_PER_TRANSACTION)).rowcount
