"""Filing instances into a database of an older schema, for the upgrade tests.

``index.record_instance`` writes the columns of today's schema; from schema 18 on that
includes the image attributes (image_rows, image_columns, bits_allocated, number_of_frames),
which an older database's instances table lacks, and from schema 28 on the patient
attributes of each study (patient_name, patient_birth_date, patient_sex on studies).
Schema 29 adds ``studies.patient_values_provisional``. :func:`record_before_18` and
:func:`record_before_28` add what is missing for the call and drop it again (SQLite >=
3.35): the rows are today's filing logic, the tables the older shape, with nothing of the
columns left for migrations 18, 28 and 29 to meet.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from appliance.store import index
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, RecordOutcome, StoredFile

IMAGE_COLUMNS = ("image_rows", "image_columns", "bits_allocated", "number_of_frames")
# Schema 28: the patient attributes each study keeps (studies.patient_name...); 29: which of
# them are still migration 28's copy.
STUDY_PATIENT_COLUMNS = ("patient_name", "patient_birth_date", "patient_sex")
PROVISIONAL_COLUMN = "patient_values_provisional INTEGER NOT NULL DEFAULT 0"


def record_before_18(db: Database, record: InstanceRecord, stored: StoredFile,
                     **kwargs: Any) -> RecordOutcome:
    """``index.record_instance`` on a database older than schema 18."""
    assert db.schema_version() < 18, "a database of schema 18 or later: file it directly"
    return _record_without(db, record, stored, kwargs)


def record_before_28(db: Database, record: InstanceRecord, stored: StoredFile,
                     **kwargs: Any) -> RecordOutcome:
    """``index.record_instance`` on a database of schema 18 to 27 (no per-study patient
    attributes yet); older ones: :func:`record_before_18`."""
    assert 18 <= db.schema_version() < 28, "older than 18: record_before_18; 28 on: directly"
    return _record_without(db, record, stored, kwargs)


def _record_without(db: Database, record: InstanceRecord, stored: StoredFile,
                    kwargs: dict[str, Any]) -> RecordOutcome:
    """File ``record`` with today's code, the columns the database lacks added for the call
    and dropped again, so that nothing of them is left for their migration to meet."""
    missing = [("studies", PROVISIONAL_COLUMN)]
    if db.schema_version() < 28:
        missing += [("studies", column) for column in STUDY_PATIENT_COLUMNS]
    if db.schema_version() < 18:
        missing += [("instances", column) for column in IMAGE_COLUMNS]
    with db.transaction() as conn:
        for table, column in missing:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    try:
        return index.record_instance(db, record, stored, **kwargs)
    finally:
        with db.transaction() as conn:
            for table, column in missing:
                conn.execute(f"ALTER TABLE {table} DROP COLUMN {column.split()[0]}")


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
