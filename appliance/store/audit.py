"""The audit trail: an append-only record of who did what to which data, and how it ended.

Owns: writing and reading the ``audit`` table (triggers in the schema forbid UPDATE and
DELETE). Health-data hosting rules require this traceability; events are shaped after the
DICOM PS3.15 audit messages (store, query, retrieve, export, delete, configuration, enrolment).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from appliance.store.db import Database, now

# Called after each committed record (journald, syslog: appliance/ops/audit_trail.py). A
# sink must be quick and must not raise; it runs in the caller's thread.
_sinks: list[Callable[[dict[str, Any]], None]] = []


def add_sink(sink: Callable[[dict[str, Any]], None]) -> None:
    _sinks.append(sink)


def remove_sink(sink: Callable[[dict[str, Any]], None]) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def record(db: Database, event: str, *, actor: str | None, outcome: str = "success",
           target: str | None = None, source: str | None = None,
           detail: str | None = None) -> None:
    at = now()
    with db.transaction() as conn:
        cursor = conn.execute(
            "INSERT INTO audit (at, event, actor, source, target, outcome, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (at, event, actor, source, target, outcome, detail),
        )
    entry = {"id": cursor.lastrowid, "at": at, "event": event, "actor": actor,
             "source": source, "target": target, "outcome": outcome, "detail": detail}
    for sink in list(_sinks):
        with contextlib.suppress(Exception):  # the trail itself is committed already
            sink(entry)


def recent(db: Database, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
    where, params = "", []
    if event:
        where, params = "WHERE event = ?", [event]
    rows = db.query(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", (*params, limit))
    return [dict(r) for r in rows]
