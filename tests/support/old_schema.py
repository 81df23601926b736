"""Filing instances into a database of an older schema, for the upgrade tests.

``index.record_instance`` writes the columns of today's schema; from schema 18 on that
includes the image attributes (image_rows, image_columns, bits_allocated, number_of_frames),
which an older database's instances table lacks. :func:`record_before_18` adds them for the
call and drops them again (SQLite >= 3.35): the rows are today's filing logic, the table the
older shape, with nothing of the columns left for migration 18 to meet.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from appliance.store import index
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, RecordOutcome, StoredFile

IMAGE_COLUMNS = ("image_rows", "image_columns", "bits_allocated", "number_of_frames")


def record_before_18(db: Database, record: InstanceRecord, stored: StoredFile,
                     **kwargs: Any) -> RecordOutcome:
    """``index.record_instance`` on a database older than schema 18."""
    assert db.schema_version() < 18, "a database of schema 18 or later: file it directly"
    with db.transaction() as conn:
        for column in IMAGE_COLUMNS:
            conn.execute(f"ALTER TABLE instances ADD COLUMN {column} INTEGER")
    try:
        return index.record_instance(db, record, stored, **kwargs)
    finally:
        with db.transaction() as conn:
            for column in IMAGE_COLUMNS:
                conn.execute(f"ALTER TABLE instances DROP COLUMN {column}")


def undo_hub_migration_15(conn: sqlite3.Connection) -> None:
    """Take a hub database's enrol_tokens back to before hub migration 15 (what spent a
    token): for the tests that rebuild an older hub from a new one."""
    for column in ("spent_key_sha256", "spent_serial", "spent_certificate"):
        conn.execute(f"ALTER TABLE enrol_tokens DROP COLUMN {column}")


def user_version(path: Path) -> int:
    """The schema version a database file says it has (``PRAGMA user_version``), read
    without opening it through :class:`Database` (which would migrate or refuse it)."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()
