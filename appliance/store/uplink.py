"""Uplink state: when each destination (the hub, STOW-RS archives) last answered, and its last
error, so that ``pas status`` (another process) can show the link state.

Owns: the SQL of ``uplink_state`` (and there, when a local destination's outage began, for
the dispatcher), and the uplink's read of job progress for status. May not touch: files or
the network.
"""

from __future__ import annotations

from typing import Any

from appliance.store.db import Database, now


def record_contact(db: Database, destination: str, ok: bool, error: str | None = None) -> None:
    """One transaction: a success stamps ``last_ok_at``; a failure keeps it and records the
    error. The last error stays visible after a success (with its time) on purpose: an
    operator reading the status wants to know the link flapped."""
    at = now()
    with db.transaction() as conn:
        if ok:
            conn.execute(
                """INSERT INTO uplink_state (destination, last_ok_at, updated_at)
                   VALUES (?, ?, ?)
                   ON CONFLICT (destination) DO UPDATE SET last_ok_at = excluded.last_ok_at,
                       updated_at = excluded.updated_at""",
                (destination, at, at),
            )
        else:
            conn.execute(
                """INSERT INTO uplink_state (destination, last_error, last_error_at, updated_at)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT (destination) DO UPDATE SET last_error = excluded.last_error,
                       last_error_at = excluded.last_error_at, updated_at = excluded.updated_at""",
                (destination, (error or "")[:1000], at, at),
            )


def mark_unreachable(db: Database, destination: str, at: float) -> tuple[float, bool]:
    """A try found a local destination unreachable (``LinkDown``) at ``at``: when its current
    outage began, and whether this try began it. Kept in the database, not in the
    dispatcher's memory, so that a restart during the outage goes on with the same start
    (the wait between tries keeps growing with it, and the outage's warning is not logged
    again). An outage the destination answered in since it began (``last_ok_at`` later: an
    association made, and no delivery followed) is over: this try begins a new one. One
    transaction when it begins, so that of several workers' tries exactly one begins it."""
    current = _outage(db, destination)
    if current is not None:
        return current, False
    with db.transaction() as conn:
        current = _outage(db, destination)  # another worker may have begun it meanwhile
        if current is not None:
            return current, False
        conn.execute(
            """INSERT INTO uplink_state (destination, unreachable_since, updated_at)
               VALUES (?, ?, ?)
               ON CONFLICT (destination) DO UPDATE
                   SET unreachable_since = excluded.unreachable_since""",
            (destination, at, at),
        )
    return at, True


def clear_unreachable(db: Database, destination: str) -> bool:
    """A job to the destination was delivered: its outage is over. Whether one was open
    (read first: the common case, no outage, takes no write lock)."""
    row = db.query_one("SELECT unreachable_since FROM uplink_state WHERE destination = ?",
                       (destination,))
    if row is None or row["unreachable_since"] is None:
        return False
    with db.transaction() as conn:
        cursor = conn.execute(
            """UPDATE uplink_state SET unreachable_since = NULL
               WHERE destination = ? AND unreachable_since IS NOT NULL""", (destination,))
        return cursor.rowcount == 1


def _outage(db: Database, destination: str) -> float | None:
    """The start of the destination's open outage, None when there is none."""
    row = db.query_one(
        "SELECT unreachable_since, last_ok_at FROM uplink_state WHERE destination = ?",
        (destination,))
    return None if row is None else _open(row["unreachable_since"], row["last_ok_at"])


def link_states(db: Database) -> dict[str, dict[str, Any]]:
    """``{destination: {last_ok_at, last_error, last_error_at, state, unreachable_since}}``;
    state is ``up`` when the last contact succeeded, ``down`` when the last event was an
    error. ``unreachable_since``: when a local destination's outage began, as the dispatcher
    dated it (None when none is open; the hub's outage is dated by ``last_ok_at``)."""
    result: dict[str, dict[str, Any]] = {}
    for row in db.query("SELECT * FROM uplink_state ORDER BY destination"):
        ok_at, error_at = row["last_ok_at"], row["last_error_at"]
        state = "up" if ok_at and (not error_at or ok_at >= error_at) else "down"
        result[row["destination"]] = {
            "state": state,
            "last_ok_at": ok_at,
            "last_error": row["last_error"],
            "last_error_at": error_at,
            "unreachable_since": _open(row["unreachable_since"], ok_at),
        }
    return result


def _open(since: float | None, ok_at: float | None) -> float | None:
    """An outage start, None once the destination answered after it (see mark_unreachable)."""
    if since is None or (ok_at is not None and ok_at > since):
        return None
    return float(since)
