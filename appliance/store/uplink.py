"""Uplink state: when each destination (the hub, STOW-RS archives) last answered, and its last
error, so that ``pas status`` (another process) can show the link state.

Owns: the SQL of ``uplink_state``, and the uplink's read of job progress for status. May not
touch: files or the network.
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


def link_states(db: Database) -> dict[str, dict[str, Any]]:
    """``{destination: {last_ok_at, last_error, last_error_at, state}}``; state is ``up`` when
    the last contact succeeded, ``down`` when the last event was an error."""
    result: dict[str, dict[str, Any]] = {}
    for row in db.query("SELECT * FROM uplink_state ORDER BY destination"):
        ok_at, error_at = row["last_ok_at"], row["last_error_at"]
        state = "up" if ok_at and (not error_at or ok_at >= error_at) else "down"
        result[row["destination"]] = {
            "state": state,
            "last_ok_at": ok_at,
            "last_error": row["last_error"],
            "last_error_at": error_at,
        }
    return result
