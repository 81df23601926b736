"""The local index: patients, studies, series and instances, as plain functions.

Owns: every SQL statement about what the cache holds. Each function that changes state does
it in one transaction (invariant 3). May not touch: files (that is :mod:`appliance.store.spool`)
or the network.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.store import audit
from appliance.store.db import Database, now
from appliance.store.query import _HELD, _SERIES_HELD

if TYPE_CHECKING:
    from appliance.store.spool import Spool


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps about one received instance (read from its header)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_uid: str
    series_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str | None = None
    referring_physician: str | None = None
    series_number: int | None = None
    modality: str | None = None
    series_description: str | None = None
    body_part: str | None = None
    instance_number: int | None = None
    # The image's geometry, returned by QIDO-RS and C-FIND at the instance level (schema 18);
    # None: the instance has no such attribute (a structured report, a single frame).
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None


@dataclass(frozen=True)
class StoredFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class RecordOutcome:
    instance_id: int
    duplicate: bool  # the same bytes were already held: nothing changed
    conflict: bool   # the same SOP Instance UID with other bytes: a new version was kept
    version: int
    # the patient the study was filed under before this instance moved it (a correction)
    refiled_from: str | None = None


def record_instance(
    db: Database,
    record: InstanceRecord,
    stored: StoredFile,
    *,
    calling_ae: str | None = None,
    called_ae: str | None = None,
    source_address: str | None = None,
    origin: str = "local",
    received_at: float | None = None,
    pin_until: float | None = None,
    keep_local_moves: bool = False,
) -> RecordOutcome:
    """Index one stored file, in one transaction.

    The same SOP Instance UID with the same SHA-256 as its current version is a re-send:
    nothing changes. With other bytes it is a conflict: the new version is kept beside the old
    and becomes current. With the bytes of an older version (A, then B, then A again: a
    correction taken back), that version becomes current again and is routed again, as a
    new one would be: the sender's last word serves, here and in the region.

    An instance of ``origin="regional"`` (fetched from the region: fetch-through, prefetch)
    is held by the region by definition: it is filed as routed and confirmed at once, so that
    routing never sends it back and the cache may evict it. A prefetched prior's
    (``pin_until``) pins its study in the same transaction: confirmed at once, it was
    evicted half fetched, before the prefetch pinned it once the whole study was there.

    ``keep_local_moves`` (the appliance's copies from the region): a regional copy whose
    current version here is in another study (:func:`_moved_away`), or whose bytes are a
    version this index saw replaced, is kept as an older version, never current: the
    region still holding what it was sent before a correction must not undo it. The hub's
    embedded archive files every site upload as ``regional`` and must follow a site's
    correction: it leaves it off.

    ``received_at`` (a file adopted back by start-up recovery: its time on disk): a version
    older than the current one is kept beside it, not made current. Re-indexing a whole
    spool (``pas cache rebuild-index``) adopts files in name order, and without this the
    version adopted last, not the one received last, would serve. Nor does an adopted file
    whose bytes are already an older version (``pas verify --repair`` beside a live daemon:
    its receive committed after the walk saw it, and a correction came after).
    """
    adopted = received_at is not None
    received_at = now() if received_at is None else received_at
    held_by_region = received_at if origin == "regional" else None
    with db.transaction() as conn:
        versions = conn.execute(
            "SELECT id, sha256, version, is_current, received_at, study_fk, series_fk, "
            "confirmed_at FROM instances WHERE sop_instance_uid = ? ORDER BY version DESC",
            (record.sop_instance_uid,),
        ).fetchall()
        same = next((row for row in versions if row["sha256"] == stored.sha256), None)
        if same is not None and same["is_current"]:
            return RecordOutcome(same["id"], duplicate=True, conflict=False,
                                 version=same["version"])
        if origin == "regional":
            current = next((row for row in versions if row["is_current"]), None)
            if current is not None and (
                    current["confirmed_at"] is None
                    # The appliance's copies: bytes this index saw replaced are stale, and a
                    # copy of the study an instance was moved out of is too.
                    or (keep_local_moves and (same is not None
                                              or _moved_away(conn, record, current)))):
                return _behind_unconfirmed(conn, record, stored, current, same, received_at,
                                           source_address, versions[0]["version"] + 1)
        newer = next((row for row in versions if row["is_current"]
                      and row["received_at"] > received_at), None) if adopted else None
        if newer is not None and same is None:
            return _keep_older_version(conn, record, stored, newer, received_at,
                                       versions[0]["version"] + 1)
        if newer is not None:  # bytes indexed meanwhile as an older version: kept as it is
            return RecordOutcome(same["id"], duplicate=True, conflict=False,
                                 version=same["version"])
        study_fk, refiled_from = _file_study(conn, record, received_at, origin,
                               actor=calling_ae or origin, source=source_address,
                               adopted=adopted)
        series_fk = _upsert_series(conn, record, study_fk)
        if pin_until is not None:  # never shortens a pin
            conn.execute("UPDATE studies SET pinned_until = max(coalesce(pinned_until, 0), ?) "
                         "WHERE id = ?", (pin_until, study_fk))
        if same is not None:  # an older version sent again: current again, routed again
            # Filed under its own header's study and series (this record's): a version
            # adopted by recovery was kept in the current version's (_keep_older_version),
            # and made current again it stayed there, served under the other study while
            # its own study's row, made just above, held nothing.
            conn.execute("UPDATE instances SET is_current = 0 WHERE sop_instance_uid = ?",
                         (record.sop_instance_uid,))
            conn.execute(
                """UPDATE instances SET is_current = 1, received_at = ?, routed_at = ?,
                       confirmed_at = ?, calling_ae = ?, called_ae = ?, source_address = ?,
                       study_fk = ?, series_fk = ?
                   WHERE id = ?""",
                (received_at, held_by_region, held_by_region, calling_ae, called_ae,
                 source_address, study_fk, series_fk, same["id"]),
            )
            return RecordOutcome(same["id"], duplicate=False, conflict=True,
                                 version=same["version"], refiled_from=refiled_from)
        version = versions[0]["version"] + 1 if versions else 1
        if versions:
            conn.execute(
                "UPDATE instances SET is_current = 0 WHERE sop_instance_uid = ?",
                (record.sop_instance_uid,),
            )
        cursor = conn.execute(
            """INSERT INTO instances (sop_instance_uid, series_fk, study_fk, sop_class_uid,
                   transfer_syntax_uid, instance_number, path, size, sha256, calling_ae,
                   called_ae, source_address, received_at, version, is_current, routed_at,
                   confirmed_at, image_rows, image_columns, bits_allocated, number_of_frames)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)""",
            (record.sop_instance_uid, series_fk, study_fk, record.sop_class_uid,
             record.transfer_syntax_uid, record.instance_number, stored.path, stored.size,
             stored.sha256, calling_ae, called_ae, source_address, received_at, version,
             held_by_region, held_by_region, record.rows, record.columns,
             record.bits_allocated, record.number_of_frames),
        )
        return RecordOutcome(int(cursor.lastrowid or 0), duplicate=False,
                             conflict=bool(versions), version=version,
                             refiled_from=refiled_from)


def _upsert_patient(conn: sqlite3.Connection, record: InstanceRecord) -> int:
    """The patient row of ``record``'s PatientID and issuer, created with the record's name,
    birth date and sex if it is new. A row that exists is not changed here: the study is
    filed first, then :func:`refresh_patient` gives the row its newest study's values (the
    last instance received, a prefetched prior, renamed every study of the patient: review
    s40, finding 1). Without a PatientID, a new row (a new study's): an instance that names
    nobody (an issuer alone names nobody) is nobody else's (schema migration 17)."""
    if not record.patient_id:
        cursor = conn.execute(
            "INSERT INTO patients (patient_id, issuer, name, birth_date, sex) "
            "VALUES ('', ?, ?, ?, ?)",
            (record.issuer_of_patient_id, record.patient_name, record.birth_date, record.sex))
        return int(cursor.lastrowid or 0)
    conn.execute(
        """INSERT INTO patients (patient_id, issuer, name, birth_date, sex)
           VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (patient_id, issuer) WHERE patient_id != '' DO NOTHING""",
        (record.patient_id, record.issuer_of_patient_id, record.patient_name,
         record.birth_date, record.sex),
    )
    # "patient_id != ''" (true here) lets SQLite use patients_key, which is partial: without
    # it the look-up read every patient row, for each instance filed.
    row = conn.execute(
        "SELECT id FROM patients WHERE patient_id = ? AND issuer = ? AND patient_id != ''",
        (record.patient_id, record.issuer_of_patient_id),
    ).fetchone()
    return int(row["id"])


# The newest non-empty value of one of a patient's studies' patient attributes (?1: the
# patient's row id): by StudyDate, then by the time the study was first received (not last:
# that moves with every instance, and only a change of date or values then needs a refresh,
# _names_the_patient_anew). A study without a StudyDate counts as the oldest (NULL sorts
# last in a descending order).
_NEWEST = ("(SELECT y.{column} FROM studies y WHERE y.patient_fk = ?1 AND y.{column} IS NOT "
           "NULL ORDER BY y.study_date DESC, y.first_received_at DESC LIMIT 1)")
_NEWEST_NAME = _NEWEST.format(column="patient_name")
_NEWEST_BIRTH = _NEWEST.format(column="patient_birth_date")
_NEWEST_SEX = _NEWEST.format(column="patient_sex")


def refresh_patient(conn: sqlite3.Connection, patient_fk: int) -> None:
    """Give a patient's row the name, birth date and sex of its newest study by StudyDate
    (then by first receipt), each the newest study's that has it, in the caller's transaction.

    Why not the last instance's, as before schema 28: the order of receipt is not the order
    of the studies. A prior prefetched after the current study (the usual order) put the
    prior's name (before a marriage, a corrected registration) back on the row, and every
    study was listed under it. Queries no longer read these columns (each study keeps its
    own: ``studies.patient_name``...); ``pas studies``, the status page and a PATIENT level
    C-FIND do not either. The row keeps the values a patient is best known by now. Written
    only when something changes: no page dirtied per instance filed."""
    conn.execute(
        f"""UPDATE patients SET name = coalesce({_NEWEST_NAME}, name),
               birth_date = coalesce({_NEWEST_BIRTH}, birth_date),
               sex = coalesce({_NEWEST_SEX}, sex)
           WHERE id = ?1 AND (coalesce({_NEWEST_NAME}, name) IS NOT name
              OR coalesce({_NEWEST_BIRTH}, birth_date) IS NOT birth_date
              OR coalesce({_NEWEST_SEX}, sex) IS NOT sex)""",
        (patient_fk,))


def _moved_away(conn: sqlite3.Connection, record: InstanceRecord, current: sqlite3.Row) -> bool:
    """Whether the current version here is in another study than the region's copy says:
    the sender moved the instance (a correction of its Study Instance UID), and the region
    still lists the copy it was sent before under the old study.

    Made current, such a copy moved the instance back: fetch-through of the old study (or a
    prior fetched for it) undid a correction the region had confirmed, the instance served
    under the old study again and routed from there (review s43 of the fetch-through fix).
    It is kept as an older version instead, as behind an unconfirmed correction. Asked for
    the appliance's copies only (``keep_local_moves``): at the hub's archive a site's upload
    to another study is the site's correction, to be followed (review s43b)."""
    row = conn.execute("SELECT study_uid FROM studies WHERE id = ?",
                       (current["study_fk"],)).fetchone()
    return row is not None and row[0] != record.study_uid


def _behind_unconfirmed(conn: sqlite3.Connection, record: InstanceRecord, stored: StoredFile,
                        current: sqlite3.Row, same: sqlite3.Row | None, received_at: float,
                        source: str | None, version: int) -> RecordOutcome:
    """The region's copy of an instance whose current version the region has not confirmed
    yet (a correction the sender sent after the copy the region holds), or whose current
    version is in another study (:func:`_moved_away`): kept as a version
    that is not current, held by the region (routed and confirmed), in the current version's
    study; the correction stays current, travels, and stays until the region confirms it.

    Filed as current, as any regional copy was (a viewer opening the study the correction
    was moved out of; the modality re-sending while fetch-through downloaded), the copy made
    the correction a replaced version: excused from the eviction's "held by the region"
    rule, taken out of its hub job as replaced, and evicted without ``--force``, never
    having reached the region (review s41, invariant 2)."""
    if same is not None:  # the bytes of an older version: the region holds them
        conn.execute("UPDATE instances SET routed_at = coalesce(routed_at, ?1), "
                     "confirmed_at = coalesce(confirmed_at, ?1) WHERE id = ?2",
                     (received_at, same["id"]))
        return RecordOutcome(same["id"], duplicate=True, conflict=False,
                             version=same["version"])
    return _keep_older_version(conn, record, stored, current, received_at, version,
                               source=source, held_by_region=received_at)


def _keep_older_version(conn: sqlite3.Connection, record: InstanceRecord, stored: StoredFile,
                        newer: sqlite3.Row, received_at: float, version: int, *,
                        source: str | None = "recovery",
                        held_by_region: float | None = None) -> RecordOutcome:
    """An adopted file older than the current version of its instance: kept beside it, not
    current, in the current version's study and series, which it does not touch (an older
    version's patient or description must not undo a correction received after it).
    Routing marks it routed without sending it, as any version that is not current. Sent
    again, it becomes current and moves to its own header's study and series
    (:func:`record_instance`)."""
    cursor = conn.execute(
        """INSERT INTO instances (sop_instance_uid, series_fk, study_fk, sop_class_uid,
               transfer_syntax_uid, instance_number, path, size, sha256, source_address,
               received_at, version, is_current, image_rows, image_columns, bits_allocated,
               number_of_frames, routed_at, confirmed_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)""",
        (record.sop_instance_uid, newer["series_fk"], newer["study_fk"], record.sop_class_uid,
         record.transfer_syntax_uid, record.instance_number, stored.path, stored.size,
         stored.sha256, source, received_at, version, record.rows, record.columns,
         record.bits_allocated, record.number_of_frames, held_by_region, held_by_region),
    )
    return RecordOutcome(int(cursor.lastrowid or 0), duplicate=False, conflict=True,
                         version=version)


def _file_study(conn: sqlite3.Connection, record: InstanceRecord, received_at: float,
                origin: str, actor: str | None, source: str | None,
                adopted: bool = False) -> tuple[int, str | None]:
    """The study row of ``record``, created or brought up to date, and the patient it was
    filed under until now if this instance moved it to another one (else None).

    The newest instance speaks for the study: each attribute it carries replaces the one
    held, one it lacks keeps it. Why not the first instance's word, as Orthanc's main tags
    and dcm4chee's default "supplement" policy keep: PAS's own instances follow the sender's
    last word (a new version serves), and a correction re-sent by the modality or the RIS,
    the same Study Instance UID under the right PatientID, must move the study to that
    patient. It used to stay filed under the first, wrongly identified one: a viewer's
    C-FIND for the right patient did not find it, and one for the wrong patient did.

    A move to another patient is written in the audit trail (``refile``, naming both) in
    this transaction, and the ``refiled_from`` of the outcome tells the receiver to log it.
    An instance with no PatientID never moves a study (it names nobody). Nor does a file
    ``adopted`` by start-up recovery that was written before the study's last receipt: it
    is not the study's last word (it moved a corrected study back to the wrong patient).
    """
    held = conn.execute("SELECT id, patient_fk, last_received_at, study_date, patient_name, "
                        "patient_birth_date, patient_sex FROM studies WHERE study_uid = ?",
                        (record.study_uid,)).fetchone()
    if held is None:
        patient_fk = _upsert_patient(conn, record)
        cursor = conn.execute(
            """INSERT INTO studies (study_uid, patient_fk, study_date, study_time,
                   accession_number, study_id, description, referring_physician, origin,
                   first_received_at, last_received_at, patient_name, patient_birth_date,
                   patient_sex)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (record.study_uid, patient_fk, record.study_date, record.study_time,
             record.accession_number, record.study_id, record.study_description,
             record.referring_physician, origin, received_at, received_at,
             record.patient_name, record.birth_date, record.sex),
        )
        refresh_patient(conn, patient_fk)
        return int(cursor.lastrowid or 0), None
    study_fk = int(held["id"])
    if adopted and received_at < held["last_received_at"]:
        return study_fk, None
    patient_fk = int(held["patient_fk"])
    split = False  # off an unnamed row other studies share (filed before migration 17)
    if record.patient_id:
        patient_fk = _upsert_patient(conn, record)
    elif conn.execute(
            "SELECT 1 FROM patients p WHERE p.id = ? AND p.patient_id = '' "
            "AND EXISTS (SELECT 1 FROM studies o WHERE o.patient_fk = p.id AND o.id != ?)",
            (patient_fk, study_fk)).fetchone() is not None:
        # Its word on that row would rename the other studies' patient: a row of its own.
        patient_fk, split = _upsert_patient(conn, record), True
    # else: it names nobody, and the study's own unnamed row takes its values below.
    conn.execute(
        """UPDATE studies SET patient_fk = ?, last_received_at = ?,
               study_date = coalesce(?, study_date), study_time = coalesce(?, study_time),
               accession_number = coalesce(?, accession_number),
               study_id = coalesce(?, study_id), description = coalesce(?, description),
               referring_physician = coalesce(?, referring_physician),
               patient_name = coalesce(?, patient_name),
               patient_birth_date = coalesce(?, patient_birth_date),
               patient_sex = coalesce(?, patient_sex),
               patient_values_provisional = patient_values_provisional & ~?
           WHERE id = ?""",
        (patient_fk, received_at, record.study_date, record.study_time,
         record.accession_number, record.study_id, record.study_description,
         record.referring_physician, record.patient_name, record.birth_date, record.sex,
         _carried_patient_values(record), study_fk),
    )
    if patient_fk != held["patient_fk"] or split or _names_the_patient_anew(record, held):
        refresh_patient(conn, patient_fk)
    if patient_fk == held["patient_fk"] or split:
        return study_fk, None
    before = _patient_named(conn, int(held["patient_fk"]))
    forget_patient_if_unused(conn, int(held["patient_fk"]))
    audit.record_in(
        conn, "refile", actor=actor, source=source, target=record.study_uid,
        patient=before[0],
        detail=(f"study filed under patient {_patient_label(*before)} until now, "
                f"under {_patient_label(record.patient_id, record.issuer_of_patient_id)} "
                f"from instance {record.sop_instance_uid} on"),
    )
    return study_fk, _patient_label(*before)


def _carried_patient_values(record: InstanceRecord) -> int:
    """The bits of ``studies.patient_values_provisional`` (schema 28) this instance's word
    replaces: 1 PatientName, 2 PatientBirthDate, 4 PatientSex, each it carries. The header
    backfill then leaves those alone: this instance is newer than any it reads."""
    return ((record.patient_name is not None) | (record.birth_date is not None) << 1
            | (record.sex is not None) << 2)


def _names_the_patient_anew(record: InstanceRecord, held: sqlite3.Row) -> bool:
    """Whether this instance changes what its study says of the patient, or the study's
    date (which decides the newest study): only then can the patient row's values change.
    The other instances of a study (nearly all) skip :func:`refresh_patient`'s six look-ups
    (~30 us of each C-STORE, bench/record_path.py)."""
    return any(new is not None and new != old for new, old in (
        (record.study_date, held["study_date"]), (record.patient_name, held["patient_name"]),
        (record.birth_date, held["patient_birth_date"]), (record.sex, held["patient_sex"])))


def forget_patient_if_unused(conn: sqlite3.Connection, patient_fk: int) -> None:
    """Delete a patient's row once no study of the cache is filed under it (its last study
    evicted, purged or filed under another patient), in the caller's transaction. Why: the
    row holds the name, birth date and sex; a cache that keeps them after the images are
    gone holds health data for nothing (and ``pas status`` counted such patients). A row
    kept takes the values of its newest study left (:func:`refresh_patient`)."""
    conn.execute("DELETE FROM patients WHERE id = ? AND NOT EXISTS "
                 "(SELECT 1 FROM studies WHERE patient_fk = ?)", (patient_fk, patient_fk))
    refresh_patient(conn, patient_fk)


def _patient_named(conn: sqlite3.Connection, patient_fk: int) -> tuple[str, str]:
    row = conn.execute("SELECT patient_id, issuer FROM patients WHERE id = ?",
                       (patient_fk,)).fetchone()
    return (str(row["patient_id"]), str(row["issuer"])) if row else ("", "")


def _patient_label(patient_id: str, issuer: str) -> str:
    return f"{patient_id!r} (issuer {issuer!r})" if issuer else repr(patient_id)


def _upsert_series(conn: sqlite3.Connection, record: InstanceRecord, study_fk: int) -> int:
    """The series row of ``record``'s SeriesInstanceUID in the study ``study_fk``, its
    attributes from the newest instance that carries them (the study's rule, see
    :func:`_file_study`: a corrected SeriesDescription or BodyPartExamined serves).

    One row per (SeriesInstanceUID, study), schema migration 26: a known series UID under
    another study (a correction re-sending an instance with a new StudyInstanceUID and the
    same series; a modality reusing a series UID) gets a row in that study. It used to be
    filed in the first study's row: the instance's study and series disagreed, C-FIND listed
    the new study with no series, and the old study could no longer be deleted (a foreign
    key), which failed every eviction pass. Each study lists, retrieves and evicts its own
    instances of the series; a retrieve by the series UID alone finds them all.

    A look-up, then an update or an insert, not ``INSERT ... ON CONFLICT``: the conflict
    target needs migration 26's unique index, and the upgrade tests file instances into
    databases of older schemas with this code."""
    values = (record.series_number, record.modality, record.series_description,
              record.body_part)
    row = conn.execute("SELECT id FROM series WHERE series_uid = ? AND study_fk = ?",
                       (record.series_uid, study_fk)).fetchone()
    if row is None:
        cursor = conn.execute(
            "INSERT INTO series (series_uid, study_fk, series_number, modality, description, "
            "body_part) VALUES (?, ?, ?, ?, ?, ?)", (record.series_uid, study_fk, *values))
        return int(cursor.lastrowid or 0)
    conn.execute(  # written only when something changes: no page dirtied per instance
        """UPDATE series SET series_number = coalesce(?1, series_number),
               modality = coalesce(?2, modality), description = coalesce(?3, description),
               body_part = coalesce(?4, body_part)
           WHERE id = ?5 AND (coalesce(?1, series_number) IS NOT series_number
              OR coalesce(?2, modality) IS NOT modality
              OR coalesce(?3, description) IS NOT description
              OR coalesce(?4, body_part) IS NOT body_part)""",
        (*values, row["id"]))
    return int(row["id"])


def instance_by_uid(db: Database, sop_instance_uid: str) -> sqlite3.Row | None:
    """The current version of an instance."""
    return db.query_one(
        "SELECT * FROM instances WHERE sop_instance_uid = ? AND is_current = 1",
        (sop_instance_uid,),
    )


def instance_places(db: Database, instance_ids: list[int]) -> dict[int, tuple[str, str]]:
    """{instance id: (Study Instance UID, Series Instance UID)} as the index files them: the
    WADO-RS path of an instance a ``stowrs`` destination reads back."""
    if not instance_ids:
        return {}
    marks = ", ".join("?" for _ in instance_ids)
    rows = db.query(
        f"""SELECT i.id, st.study_uid, se.series_uid
            FROM instances i JOIN studies st ON st.id = i.study_fk
                             JOIN series se ON se.id = i.series_fk
            WHERE i.id IN ({marks})""",
        tuple(instance_ids),
    )
    return {int(r["id"]): (str(r["study_uid"]), str(r["series_uid"])) for r in rows}


def instances_of_study(db: Database, study_uid: str) -> list[sqlite3.Row]:
    return db.query(
        """SELECT i.* FROM instances i JOIN studies s ON s.id = i.study_fk
           WHERE s.study_uid = ? AND i.is_current = 1 ORDER BY i.series_fk, i.instance_number""",
        (study_uid,),
    )


def totals(db: Database) -> dict[str, int]:
    """What the cache holds: instance versions, studies, bytes, conflicts."""
    row = db.query_one(  # kept by triggers (schema migration 6): one row, not every instance
        "SELECT files, bytes, instances, conflicts, confirmed FROM instance_totals")
    studies = db.query_one("SELECT count(*) AS n FROM studies")
    patients = db.query_one("SELECT count(*) AS n FROM patients")
    assert row is not None and studies is not None and patients is not None
    return {
        "instances": int(row["instances"]),
        "files": int(row["files"]),
        "studies": int(studies["n"]),
        "patients": int(patients["n"]),
        "bytes": int(row["bytes"]),
        "conflicts": int(row["conflicts"]),
        "confirmed_instances": int(row["confirmed"]),
    }


def discard_unindexed_file(db: Database, spool: Spool, relative: str) -> bool:
    """Remove a file a receive wrote and could not index (its commit failed), unless a row
    names it: the same bytes may have come meanwhile on another association, whose write
    found this file held and whose commit succeeded (its sender told success). Under the
    write lock, so no commit lands between the look and the unlink. Never raises: an index
    that cannot be read now leaves the file, which start-up recovery indexes again (the
    bytes of an instance the sender will send again). True: removed."""
    try:
        with db.transaction() as conn:
            if conn.execute("SELECT 1 FROM instances WHERE path = ? LIMIT 1",
                            (relative,)).fetchone() is not None:
                return False
            spool.discard(relative)
            return True
    except sqlite3.Error:
        return False


def spool_bytes(db: Database) -> int:
    row = db.query_one("SELECT bytes FROM instance_totals")
    return int(row["bytes"]) if row else 0


def list_studies(db: Database, patient_id: str | None = None,
                 limit: int = 1000) -> list[dict[str, Any]]:
    """Studies in the cache, the most recently received first, with counts, the state of
    their delivery and their pin (``pinned_until``: None when not pinned now).

    What C-FIND lists, counted as it counts (query.py's conditions): a study, a series or a
    modality only while it holds a current instance. A correction moving instances to
    another series or study leaves the old one with older versions only; ``pas studies``
    listed such a study with 0 instances, and counted such series and their modality."""
    where, params = f"WHERE {_HELD['STUDY']}", []
    if patient_id is not None:
        where, params = f"{where} AND p.patient_id = ?", [patient_id]
    if patient_id:
        # Implied, and stated so that SQLite uses patients_key (partial): without it the
        # studies were read newest first, every one, to find this patient's.
        where += " AND p.patient_id != ''"
    rows = db.query(
        f"""SELECT s.study_uid, p.patient_id, s.patient_name, s.study_date,
                   s.accession_number, s.description, s.origin, s.last_received_at,
                   CASE WHEN s.pinned_until >= ? THEN s.pinned_until END AS pinned_until,
                   (SELECT group_concat(DISTINCT x.modality) FROM series x
                      WHERE x.study_fk = s.id AND {_SERIES_HELD}) AS modalities,
                   (SELECT count(*) FROM series x
                      WHERE x.study_fk = s.id AND {_SERIES_HELD}) AS series,
                   (SELECT count(*) FROM instances i
                      WHERE i.study_fk = s.id AND i.is_current = 1) AS instances,
                   (SELECT coalesce(sum(size), 0) FROM instances i
                      WHERE i.study_fk = s.id AND i.is_current = 1) AS bytes,
                   (SELECT count(*) FROM instances i WHERE i.study_fk = s.id
                      AND i.is_current = 1 AND i.confirmed_at IS NOT NULL) AS confirmed
            FROM studies s JOIN patients p ON p.id = s.patient_fk
            {where}
            ORDER BY s.last_received_at DESC LIMIT ?""",
        (now(), *params, limit),
    )
    return [dict(r) for r in rows]


def studies_ready_to_route(db: Database, quiet_since: float) -> list[int]:
    """Studies with instances not yet routed and no new instance since ``quiet_since``."""
    rows = db.query(
        """SELECT DISTINCT s.id FROM studies s
           JOIN instances i ON i.study_fk = s.id AND i.routed_at IS NULL
           WHERE s.last_received_at <= ?""",
        (quiet_since,),
    )
    return [int(r["id"]) for r in rows]


def studies_arriving_with_a_batch(db: Database, quiet_since: float,
                                  oldest_before: float) -> list[int]:
    """Studies not quiet yet (a new instance since ``quiet_since``) holding unrouted
    instances, the oldest of them received before ``oldest_before``: the candidates for an
    urgent batch (appliance/routing/stability.py). Over the unrouted instances only (their
    partial index): the instances still arriving, not the cache."""
    rows = db.query(
        """SELECT i.study_fk AS id FROM instances i
           JOIN studies s ON s.id = i.study_fk
           WHERE i.routed_at IS NULL AND s.last_received_at > ?
           GROUP BY i.study_fk HAVING min(i.received_at) <= ?""",
        (quiet_since, oldest_before),
    )
    return [int(r["id"]) for r in rows]


def unrouted_instances(db: Database, study_fk: int, after_id: int = 0) -> list[sqlite3.Row]:
    """Unrouted instances of a study with every attribute a routing rule may look at
    (``is_current`` tells a superseded version, which is marked routed but not sent);
    ``after_id``: only those filed after that row (the urgent pass's rules run on each
    instance once: re-reading every unrouted row of a 50,000-image study at each pass cost
    190 ms a pass)."""
    return db.query(
        """SELECT i.id, i.sop_instance_uid, i.sop_class_uid, i.calling_ae, i.called_ae,
                  i.is_current,
                  se.modality, se.body_part, s.description AS study_description,
                  s.study_uid
           FROM instances i
           JOIN series se ON se.id = i.series_fk
           JOIN studies s ON s.id = i.study_fk
           WHERE i.study_fk = ? AND i.routed_at IS NULL AND i.id > ?""",
        (study_fk, after_id),
    )


def urgent_job_under_way(db: Database, study_fk: int) -> bool:
    """Whether the study has a job of priority urgent pending or running: the urgent pass
    cuts no new batch then, and the next batch holds what arrived meanwhile (batches grow
    when the link falls behind, instead of one transfer every few seconds queued one after
    another)."""
    return db.query_one("SELECT EXISTS (SELECT 1 FROM jobs WHERE study_fk = ? AND "
                        "priority = 0 AND state IN ('pending', 'running')) AS busy",
                        (study_fk,))["busy"] == 1


def studies_quiet_or_not(db: Database, study_fks: Collection[int],
                         quiet_since: float) -> dict[int, tuple[str, bool]]:
    """Those of ``study_fks`` that still exist: their Study Instance UID, and whether each is
    quiet since ``quiet_since`` with nothing left unrouted (a study the urgent pass routed
    whole, now stable)."""
    if not study_fks:
        return {}
    marks = ",".join("?" * len(study_fks))
    return {int(r["id"]): (str(r["study_uid"]), bool(r["quiet"])) for r in db.query(
        f"""SELECT s.id, s.study_uid, (s.last_received_at <= ? AND NOT EXISTS (
                   SELECT 1 FROM instances i WHERE i.study_fk = s.id AND i.routed_at IS NULL)
               ) AS quiet
            FROM studies s WHERE s.id IN ({marks})""", (quiet_since, *study_fks))}
