"""Which instances a retrieve covers, and what the cache holds of a study.

Owns: the set a C-MOVE, C-GET, WADO-RS or the hub's download sends (its unique keys read as
PS3.4 C.4.2.2.1 asks: single values or UID lists, no wildcard, never "everything"; a
PatientID with its IssuerOfPatientID, never several issuers' patients merged), kept as
row ids and read back a page at a time; the look-ups that say how much of a study is here
(fetch-through, the hub's holdings statement, the bucketed download) and the one write of a
read: ``last_accessed_at`` (:func:`touch_studies`, what the cache's LRU eviction reads).
May not touch: files, the network, pydicom datasets; the PS3.4 matching rules and the
index's attribute tables, which are :mod:`appliance.store.query`'s (a retrieve's UID lists
are matched by the same code as a C-FIND's).

Values are always bound as parameters; only column names and table joins from
:mod:`appliance.store.query` are spliced into the SQL text.
"""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from appliance.store.db import Database
from appliance.store.query import (
    _FROM,
    _NAMES_SOMEONE,
    LEVELS,
    QueryError,
    _has_wildcard,
    _match,
    _Where,
    available,
)

_UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
           "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
_RETRIEVE_ORDER = "ORDER BY s.id, se.series_number, se.id, i.instance_number, i.id"


def check_retrieve_keys(level: str, keys: dict[str, str]) -> None:
    """Raise QueryError naming what makes ``keys`` unusable for a retrieve at ``level``
    (before anything is fetched or read for it)."""
    _retrieve_where(level, keys)


def _retrieve_where(level: str, keys: dict[str, str]) -> _Where:
    """The WHERE clause of a retrieve at ``level`` (unique keys only; UID lists allowed).
    A wildcard in a unique key is refused (PS3.4 C.4.2.2.1: a retrieve names its instances
    by single values or UID lists): PatientID ``*`` matched the literal "*", nothing, and
    the retrieve answered Success with no sub-operation."""
    level = level.upper()
    if level not in _UNIQUE:
        raise QueryError(f"QueryRetrieveLevel: {level!r} is not one of {', '.join(LEVELS)}")
    if not (keys.get(_UNIQUE[level]) or "").strip():
        raise QueryError(f"{_UNIQUE[level]}: required for a {level}-level retrieve")
    where = _Where(["i.is_current = 1"], [])
    for keyword in _UNIQUE.values():
        value = (keys.get(keyword) or "").strip()
        if value and available(keyword, level) and _has_wildcard(value):
            raise QueryError(f"{keyword}: no wildcard in a retrieve ({value[:40]!r})")
        if value and available(keyword, level):
            if keyword == "PatientID":
                where.add("p.patient_id = ?", value)
                where.add(_NAMES_SOMEONE)  # implied: the value is not empty
                _match_issuer(where, keys)
            else:
                _match(where, keyword, value, False)
    return where


def _match_issuer(where: _Where, keys: dict[str, str]) -> None:
    """A PatientID's IssuerOfPatientID, when the identifier gives one: the index keeps a
    patient per (PatientID, issuer), as C-FIND matches them. Ignored, a patient-level
    retrieve of PatientID 123456 issuer HOSP_A sent HOSP_B's 123456 too. An empty one is
    universal matching (a patient filed without an issuer has ``''``); absent at PATIENT
    level, :func:`_refuse_ambiguous_patient` refuses a PatientID that names several."""
    issuer = (keys.get("IssuerOfPatientID") or "").strip()
    if not issuer:
        return
    if _has_wildcard(issuer):
        raise QueryError(f"IssuerOfPatientID: no wildcard in a retrieve ({issuer[:40]!r})")
    where.add("p.issuer = ?", issuer)


# How many issuers a refusal of an ambiguous PatientID names (the audit row keeps them all).
_ISSUERS_NAMED = 5


def _refuse_ambiguous_patient(conn: sqlite3.Connection, level: str,
                              keys: dict[str, str]) -> None:
    """Raise QueryError when a PATIENT-level retrieve without IssuerOfPatientID names a
    PatientID that patients of several issuers hold here (each with current instances):
    sending them all merged two hospitals' patients into one retrieve. The viewer names the
    issuer, or retrieves the studies one by one."""
    if level.upper() != "PATIENT" or (keys.get("IssuerOfPatientID") or "").strip():
        return
    patient_id = (keys.get("PatientID") or "").strip()
    issuers = [str(r[0]) for r in conn.execute(
        f"SELECT p.issuer FROM patients p WHERE p.patient_id = ? AND {_NAMES_SOMEONE} "
        "AND EXISTS (SELECT 1 FROM studies s JOIN instances i ON i.study_fk = s.id "
        "WHERE s.patient_fk = p.id AND i.is_current = 1) ORDER BY p.issuer",
        (patient_id,))]
    if len(issuers) < 2:
        return
    named = ", ".join(issuer or "none" for issuer in issuers[:_ISSUERS_NAMED])
    more = f" and {len(issuers) - _ISSUERS_NAMED} more" if len(issuers) > _ISSUERS_NAMED else ""
    raise QueryError(f"PatientID {patient_id} names {len(issuers)} patients: give "
                     f"IssuerOfPatientID (issuers {named}{more})")


def instance_pages(db: Database, instance_ids: Sequence[int],
                   page_size: int = 500) -> Iterator[list[sqlite3.Row]]:
    """The rows of ``instance_ids`` (a :class:`RetrievePlan`'s) in that order, with their
    study_uid and series_uid, ``page_size`` at a time, each page one query (so each may run
    in another thread): reading every row first cost +250 MB for 200,000 instances before
    the first byte (WADO-RS, the hub's download). One removed since the plan is left out."""
    for start in range(0, len(instance_ids), page_size):
        ids = list(instance_ids[start:start + page_size])
        found = {row["id"]: row for row in db.query(
            f"SELECT i.*, s.study_uid, se.series_uid FROM {_FROM['IMAGE']} "
            f"WHERE i.is_current = 1 AND i.id IN ({', '.join('?' * len(ids))})", tuple(ids))}
        page = [found[i] for i in ids if i in found]
        if page:
            yield page


@dataclass(frozen=True)
class RetrievePlan:
    """What a C-MOVE/C-GET will send, without holding its rows: the instances' row ids in
    the order sent (8 bytes each), the (SOP class, transfer syntax) pairs for the contexts,
    and the studies touched. Whole rows cost 120 MB for 100,000 instances; each is read when
    its C-STORE goes (:func:`instance_row`)."""

    instance_ids: array[int]
    pairs: list[tuple[str, str]]
    study_uids: list[str]


def retrieve_plan(db: Database, level: str, keys: dict[str, str]) -> RetrievePlan:
    """The :class:`RetrievePlan` of a retrieve (C-MOVE, C-GET, WADO-RS, the hub's download)
    at ``level``: the current instances its unique keys name, PatientID, StudyInstanceUID,
    SeriesInstanceUID, SOPInstanceUID (UID lists allowed), a PatientID's IssuerOfPatientID
    when given. An identifier without the unique key of its level is refused: a retrieve
    never means "everything"; so is a PATIENT-level one whose PatientID, without an issuer,
    names patients of several issuers: never merged."""
    where = _retrieve_where(level, keys)
    condition = " AND ".join(where.clauses)
    params = tuple(where.params)
    ids: array[int] = array("q")
    conn = db.connection()
    _refuse_ambiguous_patient(conn, level, keys)
    for (instance_id,) in conn.execute(
            f"SELECT i.id FROM {_FROM['IMAGE']} WHERE {condition} {_RETRIEVE_ORDER}", params):
        ids.append(instance_id)
    pairs = [(r[0], r[1]) for r in conn.execute(
        f"SELECT DISTINCT i.sop_class_uid, i.transfer_syntax_uid FROM {_FROM['IMAGE']} "
        f"WHERE {condition}", params)]
    studies = [r[0] for r in conn.execute(
        f"SELECT DISTINCT s.study_uid FROM {_FROM['IMAGE']} WHERE {condition}", params)]
    return RetrievePlan(ids, sorted(pairs), sorted(studies))


def representative_instances(db: Database, study_uid: str, series_uid: str | None = None,
                             limit: int = 8) -> list[sqlite3.Row]:
    """What a study's or a series' thumbnail shows: the middle current instance (by Instance
    Number) of each of its series, in series order (the first series first), id and path.
    Several: the first series may hold no image (a report, a presentation state)."""
    where, params = "s.study_uid = ? AND i.is_current = 1", [study_uid]
    if series_uid is not None:
        where += " AND se.series_uid = ?"
        params.append(series_uid)
    return db.query(
        f"""SELECT id, path FROM (
                SELECT i.id, i.path, se.series_number, se.id AS series_id,
                       row_number() OVER (PARTITION BY se.id
                                          ORDER BY i.instance_number, i.id) AS place,
                       count(*) OVER (PARTITION BY se.id) AS instances
                FROM {_FROM['IMAGE']} WHERE {where})
            WHERE place = (instances + 1) / 2
            ORDER BY series_number IS NULL, series_number, series_id LIMIT ?""",
        (*params, limit))


def instance_row(db: Database, instance_id: int) -> sqlite3.Row | None:
    """One instance of a :class:`RetrievePlan` as it is sent (None: removed since, by a
    purge or an eviction)."""
    return db.query_one("SELECT * FROM instances WHERE id = ?", (instance_id,))


def instance_uids(db: Database, ids: Sequence[int]) -> dict[int, str]:
    """The SOP Instance UIDs of those of ``ids`` still held (a retrieve reads them a page
    ahead, so that one purged before its C-STORE is still named as failed)."""
    return {r[0]: r[1] for r in db.connection().execute(
        f"SELECT id, sop_instance_uid FROM instances WHERE id IN ({', '.join('?' * len(ids))})",
        list(ids))} if ids else {}


def study_instance_count(db: Database, study_uid: str) -> int:
    """How many current instances of a study the cache holds (0: not on site)."""
    row = db.query_one(
        "SELECT count(*) AS n FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ? AND i.is_current = 1", (study_uid,))
    return int(row["n"]) if row else 0


# The study's key written ``+i.study_fk`` in the look-ups of a list of UIDs: SQLite then
# finds each UID by ``instances_sop`` instead of walking every current row of the study
# (``instances_study``) for each batch of 500, which made fetch-through's check of a
# 65,000-instance study read 8.5 million rows (1.6 s; 0.06 s so; review s43).
_BY_UID = "+i.study_fk"


def held_of(db: Database, study_uid: str, sop_uids: list[str],
            batch: int = 500) -> set[str]:
    """Which of ``sop_uids`` the study holds as current instances, asked ``batch`` at a time:
    what fetch-through compares the region's list with (every row of the study read whole
    cost +82 MB for 65,001 instances before the region was even asked)."""
    held: set[str] = set()
    conn = db.connection()
    for start in range(0, len(sop_uids), batch):
        chunk = sop_uids[start:start + batch]
        held.update(r[0] for r in conn.execute(
            f"SELECT i.sop_instance_uid FROM instances i JOIN studies s ON s.id = {_BY_UID} "
            f"WHERE s.study_uid = ? AND i.is_current = 1 AND i.sop_instance_uid IN "
            f"({', '.join('?' * len(chunk))})", (study_uid, *chunk)))
    return held


def current_elsewhere(db: Database, study_uid: str, sop_uids: list[str],
                      batch: int = 500) -> set[str]:
    """Which of ``sop_uids`` are current instances of *another* study here: the sender moved
    them (a correction that put the Study Instance UID right). The region may still list
    them under the old study; its copy, fetched, is filed as an older version and never
    served under the old study, so fetch-through must not download it (it did, at every
    retrieve of the old study: one instance's WAN cost each time, the whole study's for a
    study moved whole)."""
    found: set[str] = set()
    conn = db.connection()
    for start in range(0, len(sop_uids), batch):
        chunk = sop_uids[start:start + batch]
        found.update(r[0] for r in conn.execute(
            "SELECT i.sop_instance_uid FROM instances i JOIN studies s ON s.id = i.study_fk "
            f"WHERE i.is_current = 1 AND s.study_uid != ? AND i.sop_instance_uid IN "
            f"({', '.join('?' * len(chunk))})", (study_uid, *chunk)))
    return found


def moved_out_of(db: Database, study_uid: str) -> set[str]:
    """The SOP Instance UIDs this study held in an earlier version and another study holds
    now (:func:`current_elsewhere`, from the study's own rows): what a bucketed download of
    the study is told the appliance has, with its current instances."""
    return {r[0] for r in db.connection().execute(
        "SELECT DISTINCT old.sop_instance_uid FROM instances old "
        "JOIN studies s ON s.id = old.study_fk "
        "JOIN instances now ON now.sop_instance_uid = old.sop_instance_uid "
        "AND now.is_current = 1 AND now.study_fk != old.study_fk "
        "WHERE s.study_uid = ? AND old.is_current = 0", (study_uid,))}


def held_versions(db: Database, study_uid: str, pairs: list[tuple[str, str]],
                  batch: int = 500) -> set[tuple[str, str]]:
    """Which of the (SOP Instance UID, SHA-256) ``pairs`` of a study the index holds, as any
    version (current or kept beside a later one), asked ``batch`` UIDs at a time: what the
    hub's embedded archive answers for the region in a holdings statement (it keeps every
    version it took, each under the SHA-256 of its exact bytes)."""
    asked = set(pairs)
    uids = sorted({uid for uid, _ in pairs})
    held: set[tuple[str, str]] = set()
    conn = db.connection()
    for start in range(0, len(uids), batch):
        chunk = uids[start:start + batch]
        held.update(pair for pair in ((str(r[0]), str(r[1])) for r in conn.execute(
            "SELECT i.sop_instance_uid, i.sha256 FROM instances i "
            f"JOIN studies s ON s.id = {_BY_UID} WHERE s.study_uid = ? AND "
            f"i.sop_instance_uid IN ({', '.join('?' * len(chunk))})", (study_uid, *chunk)))
            if pair in asked)
    return held


def study_sop_uids(db: Database, study_uid: str) -> set[str]:
    """The SOP Instance UIDs of a study's current instances (what a bucketed download is
    told the appliance has)."""
    return {r[0] for r in db.connection().execute(
        "SELECT i.sop_instance_uid FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ? AND i.is_current = 1", (study_uid,))}


def touch_studies(db: Database, study_uids: list[str], at: float) -> None:
    """Mark studies as just read (the cache's LRU eviction uses last_accessed_at)."""
    if not study_uids:
        return
    with db.transaction() as conn:
        conn.executemany("UPDATE studies SET last_accessed_at = ? WHERE study_uid = ?",
                         [(at, uid) for uid in study_uids])
