"""The backups this index knows of: those written of it (``pas backup``'s ``export`` audit
rows) and the one it was restored from (``pas restore``: ``restored_backups``, migration 21).

Owns: the SQL of both. May not touch: the backup folders (``appliance.ops.backup``,
``appliance.ops.restore``), any other row.

Why a restore is recorded apart from the audit rows: a backup's index is copied before
``pas backup`` writes its export row, so an index put back by ``pas restore`` never holds the
row of the backup it came from. ``pas status``, ``pas doctor``, the status page and the
heartbeat then said no backup was ever written (or named the one before, older). The
restore's row gives the backup's own time (its manifest's ``made_at``), which no audit column
holds; keyed by the restore's ``recovery`` audit row, it takes its place among the export
rows: whichever row came last names the last backup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.store import audit
from appliance.store.db import Database


def record_restore(db: Database, *, made_at: float, folder: Path, actor: str,
                   detail: str) -> None:
    """The restore of the backup in ``folder``, written at ``made_at``, with its ``recovery``
    audit row (``detail``): one transaction, so neither is there without the other.

    The row also names the restored trail's head (its last row id and the chain the
    ``recovery`` row follows on from): the rows written from here reuse ids that the
    trail's copies (journald, a syslog collector) may have received from the index before
    the restore, with other chains. The ``recovery`` row starts that new branch, and says
    where it branches off (docs/operations.md, "The hash chain")."""
    with db.transaction() as conn:
        last_id, head = audit.chain_head(conn)
        if last_id is not None:
            detail = (f"{detail}; the restored audit trail's head: row {last_id}, "
                      f"chain {head}")
        audit_id = audit.record_in(conn, "recovery", actor=actor, outcome="success",
                                   detail=detail)
        conn.execute("INSERT INTO restored_backups (audit_id, made_at, folder) VALUES (?, ?, ?)",
                     (audit_id, made_at, str(folder)))


def newest_backup(db: Database, export_detail: str) -> dict[str, Any] | None:
    """The last backup this index knows of, ``None`` when none: ``at`` (when it was
    written), ``folder``, and ``restored_at`` (when this index was restored from it; None
    for a backup written of this index). ``export_detail``: how ``pas backup``'s export rows
    begin (other export rows are not backups). Export rows are found through migration 19's
    partial index, restores by their key: the status page asks every 10 s."""
    export = db.query_one("SELECT id, at, target FROM audit WHERE event = 'export' AND "
                          "detail LIKE ? ORDER BY id DESC LIMIT 1", (export_detail + "%",))
    restore = db.query_one(
        "SELECT r.audit_id, r.made_at, r.folder, a.at FROM restored_backups r "
        "JOIN audit a ON a.id = r.audit_id ORDER BY r.audit_id DESC LIMIT 1")
    if restore is not None and (export is None or restore["audit_id"] > export["id"]):
        return {"at": restore["made_at"], "folder": restore["folder"],
                "restored_at": restore["at"]}
    if export is None:
        return None
    return {"at": export["at"], "folder": export["target"], "restored_at": None}
