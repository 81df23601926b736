"""The audit trail: an append-only record of who did what to which data, and how it ended.

Owns: writing and reading the ``audit`` table (triggers in the schema forbid UPDATE and
DELETE). Health-data hosting rules require this traceability; events are shaped after the
DICOM PS3.15 audit messages (store, query, retrieve, export, delete, configuration, enrolment).
"""

from __future__ import annotations

from typing import Any

from appliance.store.db import Database, now


def record(db: Database, event: str, *, actor: str | None, outcome: str = "success",
           target: str | None = None, source: str | None = None,
           detail: str | None = None) -> None:
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO audit (at, event, actor, source, target, outcome, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now(), event, actor, source, target, outcome, detail),
        )


def recent(db: Database, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
    where, params = "", []
    if event:
        where, params = "WHERE event = ?", [event]
    rows = db.query(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", (*params, limit))
    return [dict(r) for r in rows]
