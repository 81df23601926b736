"""Where the backfill of the values read from headers stands, and what it writes.

Owns: the ``header_backfill`` row (schema migrations 18 and 28) and the update from a file's
header of its instance's ``image_rows``, ``image_columns``, ``bits_allocated`` and
``number_of_frames`` (schema 18) and of its study's ``patient_name``, ``patient_birth_date``
and ``patient_sex`` (schema 28). May not touch: files (``appliance/ops/backfill.py`` reads
them), any other column.

Instances filed before schema 18 have NULL in the first; the studies filed before schema 28
have their patient row's values, which the last instance received wrote (maybe another
study's). The backfill walks the rows by id, from ``after_id`` to ``last_id`` (the newest
row at the upgrade: every later row was filed with its values), a batch at a time, each
batch's values and its new position in one transaction: a restart goes on after the last
batch written (invariant 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.store.db import Database, now
from appliance.store.index import InstanceRecord, refresh_patient


@dataclass(frozen=True)
class PendingFile:
    instance_id: int
    path: str  # relative to the spool directory


@dataclass(frozen=True)
class Progress:
    after_id: int
    last_id: int
    finished: bool


def progress(db: Database) -> Progress:
    """Where the backfill stands (a database without rows from before schema 18: finished)."""
    row = db.query_one("SELECT after_id, last_id, finished_at FROM header_backfill")
    if row is None:
        return Progress(0, 0, True)
    return Progress(int(row["after_id"]), int(row["last_id"]), row["finished_at"] is not None)


def pending(db: Database, limit: int) -> list[PendingFile]:
    """The next ``limit`` instances to read ([]: none left, or the backfill finished)."""
    state = progress(db)
    if state.finished:
        return []
    rows = db.query("SELECT id, path FROM instances WHERE id > ? AND id <= ? ORDER BY id "
                    "LIMIT ?", (state.after_id, state.last_id, limit))
    return [PendingFile(int(r["id"]), str(r["path"])) for r in rows]


def save(db: Database, read: list[tuple[PendingFile, InstanceRecord | None]],
         after_id: int) -> None:
    """The values read for a batch (None: the file could not be read; its row keeps NULL)
    and the position after it, in one transaction. A row is matched by id and path: one
    evicted meanwhile is not there any more, and one whose id a newer row took (the newest
    row evicted, then a new one filed) names another file.

    A current instance's patient attributes go to its study, each one it carries replacing
    the one held: read in id order, the study ends with its newest instance's, as ingest
    files them. Only the attributes still provisional (``patient_values_provisional``,
    schema 28): one an instance filed after the upgrade carried is that instance's, the
    newer word; one it lacked is still the copy, and the files read give it. Each patient
    whose study changed then takes its newest study's values (``index.refresh_patient``)."""
    with db.transaction() as conn:
        conn.executemany(
            "UPDATE instances SET image_rows = ?, image_columns = ?, bits_allocated = ?, "
            "number_of_frames = ? WHERE id = ? AND path = ?",
            [(record.rows, record.columns, record.bits_allocated, record.number_of_frames,
              item.instance_id, item.path) for item, record in read if record is not None])
        patients: set[int] = set()
        for item, record in read:
            if record is None:
                continue
            study = conn.execute(
                """SELECT s.id, s.patient_fk FROM instances i JOIN studies s ON s.id = i.study_fk
                   WHERE i.id = ? AND i.path = ? AND i.is_current = 1
                     AND s.patient_values_provisional != 0""",
                (item.instance_id, item.path)).fetchone()
            if study is None:
                continue
            conn.execute(
                """UPDATE studies SET
                       patient_name = CASE WHEN patient_values_provisional & 1
                           THEN coalesce(?, patient_name) ELSE patient_name END,
                       patient_birth_date = CASE WHEN patient_values_provisional & 2
                           THEN coalesce(?, patient_birth_date) ELSE patient_birth_date END,
                       patient_sex = CASE WHEN patient_values_provisional & 4
                           THEN coalesce(?, patient_sex) ELSE patient_sex END
                   WHERE id = ?""",
                (record.patient_name, record.birth_date, record.sex, study["id"]))
            patients.add(int(study["patient_fk"]))
        for patient_fk in sorted(patients):
            refresh_patient(conn, patient_fk)
        conn.execute("UPDATE header_backfill SET after_id = ?, "
                     "started_at = coalesce(started_at, ?)", (after_id, now()))


def finish(db: Database) -> None:
    """Every row up to ``last_id`` has been read."""
    with db.transaction() as conn:
        conn.execute("UPDATE header_backfill SET after_id = last_id, finished_at = ?, "
                     "started_at = coalesce(started_at, ?) WHERE finished_at IS NULL",
                     (now(), now()))
        # What the files gave is the studies' own word now (an evicted file's study keeps
        # the copy, the best known).
        conn.execute("UPDATE studies SET patient_values_provisional = 0 "
                     "WHERE patient_values_provisional != 0")
