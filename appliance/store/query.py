"""Queries over the cache index for C-FIND and QIDO-RS: a DICOM identifier translated to SQL.

Owns: the mapping of DICOM attributes to index columns, the PS3.4 C.2.2.2 matching rules as
SQL (single value, ``*``/``?`` wildcards, date and time ranges, UID lists, universal matching,
person-name matching case-insensitive or not), the computed attributes (ModalitiesInStudy,
SOPClassesInStudy, NumberOf*Related*). Read-only: it never changes a row. May not touch:
files, the network, pydicom datasets (callers turn the plain dicts returned here into
datasets or JSON); which instances a retrieve covers and what the cache holds of a study
(:mod:`appliance.store.retrieve`, which matches its UID lists with :func:`_match`).

Values are always bound as parameters; only column names from the fixed tables below are
ever spliced into the SQL text, so a query cannot inject SQL.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

from appliance.store.db import Database
from appliance.store.person_names import (
    FOLDING,
    FOLDING_TABLES,
    PADDING,
    PN_MATCH,
    PN_TABLES,
    SEPARATED,
    key_groups,
    matches_anything,
    pn_match,
)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


class QueryError(ValueError):
    """A query the index cannot answer as asked (bad level, malformed value): names it."""


# The most values one key's list (UIDs, code strings) is matched against. A viewer's list
# query names a few hundred at most; each value is one SQL variable and SQLite refuses a
# statement of more than 250,000 (its SQLITE_MAX_VARIABLE_NUMBER, 999 before 3.32): a C-FIND
# of 300,000 StudyInstanceUIDs (an 8.6 MB identifier) was refused as "query failed: too many
# SQL variables" and the C-GET of it ended in pynetdicom's bare 0xC413 with a traceback.
MAX_LIST_VALUES = 10_000


def _list_values(keyword: str, values: list[str]) -> list[str]:
    """``values`` (one key's list), or QueryError naming the key, the count and the bound."""
    if len(values) > MAX_LIST_VALUES:
        # Said within the 64 characters of a C-FIND's Error Comment.
        raise QueryError(f"{keyword}: {len(values)} values, more than {MAX_LIST_VALUES}")
    return values


@dataclass(frozen=True)
class Column:
    level: str
    sql: str
    vr: str  # PN, DA, TM, UI, IS, US or ST (any other string)


# Attributes stored in the index, by keyword.
COLUMNS: dict[str, Column] = {
    "PatientID": Column("PATIENT", "p.patient_id", "ST"),
    "IssuerOfPatientID": Column("PATIENT", "p.issuer", "ST"),
    # Each study's own (schema 28), at every level but PATIENT (see _PER_STUDY).
    "PatientName": Column("PATIENT", "s.patient_name", "PN"),
    "PatientBirthDate": Column("PATIENT", "s.patient_birth_date", "DA"),
    "PatientSex": Column("PATIENT", "s.patient_sex", "ST"),
    "StudyInstanceUID": Column("STUDY", "s.study_uid", "UI"),
    "StudyDate": Column("STUDY", "s.study_date", "DA"),
    "StudyTime": Column("STUDY", "s.study_time", "TM"),
    "AccessionNumber": Column("STUDY", "s.accession_number", "ST"),
    "StudyID": Column("STUDY", "s.study_id", "ST"),
    "StudyDescription": Column("STUDY", "s.description", "ST"),
    "ReferringPhysicianName": Column("STUDY", "s.referring_physician", "PN"),
    "SeriesInstanceUID": Column("SERIES", "se.series_uid", "UI"),
    "SeriesNumber": Column("SERIES", "se.series_number", "IS"),
    "Modality": Column("SERIES", "se.modality", "ST"),
    "SeriesDescription": Column("SERIES", "se.description", "ST"),
    "BodyPartExamined": Column("SERIES", "se.body_part", "ST"),
    "SOPInstanceUID": Column("IMAGE", "i.sop_instance_uid", "UI"),
    "SOPClassUID": Column("IMAGE", "i.sop_class_uid", "UI"),
    "InstanceNumber": Column("IMAGE", "i.instance_number", "IS"),
    # Schema 18: NULL for an instance without them, and for one filed before until the
    # backfill has read its header (appliance/ops/backfill.py).
    "Rows": Column("IMAGE", "i.image_rows", "US"),
    "Columns": Column("IMAGE", "i.image_columns", "US"),
    "BitsAllocated": Column("IMAGE", "i.bits_allocated", "US"),
    "NumberOfFrames": Column("IMAGE", "i.number_of_frames", "IS"),
}
# The patient attributes each study keeps as its own instances carry them (schema 28). A
# STUDY, SERIES or IMAGE query matches and returns the study's (PS3.4 C.2.2.2: an entity is
# matched and answered on its own values); they came from one patients row, written by the
# last instance received, and a prior received after a name change relabelled the current
# study: a search by the current name missed it (review s40, finding 1). A PATIENT query
# matches a patient when one of its studies matches every such key, and answers the values
# of its newest study by StudyDate (then by first receipt), each the newest one given.
_PER_STUDY = ("PatientName", "PatientBirthDate", "PatientSex")
# The range of the integer VRs a key may hold (PS3.5 6.2).
_INTEGER_RANGE = {"IS": (-2**31, 2**31 - 1, "an IS value (a 32-bit signed integer)"),
                  "US": (0, 2**16 - 1, "a US value (a 16-bit unsigned integer)")}

_CURRENT = "x.is_current = 1"
# Implied by a PatientID key of IDs (no wildcard, none empty), and stated so that SQLite sees
# it: patients_key is partial (schema migration 17), and SQLite takes a partial index only
# when the query's own WHERE implies the index's. Without it a C-FIND, QIDO-RS or retrieve
# by PatientID read every patient row (20,000: 60,000 to 640,000 SQLite instructions).
_NAMES_SOMEONE = "p.patient_id != ''"
# Whether a series (alias ``x``) or a study (alias ``y``) still holds a current instance. A
# correction that moves an instance to another series or study (same SOP Instance UID, new
# SeriesInstanceUID) leaves the old series, and maybe the old study, with older versions only;
# eviction removes studies but keeps their patient. Such an entity has nothing a viewer could
# retrieve: it is neither listed nor counted (it was listed with 0 instances and counted in
# NumberOfStudyRelatedSeries, NumberOfPatientRelated*, ModalitiesInStudy).
_SERIES_HELD = "EXISTS (SELECT 1 FROM instances z WHERE z.series_fk = x.id AND z.is_current = 1)"
_STUDY_HELD = "EXISTS (SELECT 1 FROM instances z WHERE z.study_fk = y.id AND z.is_current = 1)"
# The same test for the entity a query lists, by its level's alias.
_HELD: dict[str, str] = {
    "PATIENT": ("EXISTS (SELECT 1 FROM studies y JOIN instances z ON z.study_fk = y.id "
                "WHERE y.patient_fk = p.id AND z.is_current = 1)"),
    "STUDY": "EXISTS (SELECT 1 FROM instances z WHERE z.study_fk = s.id AND z.is_current = 1)",
    "SERIES": ("EXISTS (SELECT 1 FROM instances z WHERE z.series_fk = se.id "
               "AND z.is_current = 1)"),
    "IMAGE": "i.is_current = 1",
}
# Attributes computed from the rows below an entity: (level, SQL returning the value).
COMPUTED: dict[str, tuple[str, str]] = {
    "ModalitiesInStudy": ("STUDY", "(SELECT group_concat(DISTINCT x.modality) FROM series x "
                                   f"WHERE x.study_fk = s.id AND {_SERIES_HELD})"),
    "SOPClassesInStudy": ("STUDY", "(SELECT group_concat(DISTINCT x.sop_class_uid) FROM "
                                   f"instances x WHERE x.study_fk = s.id AND {_CURRENT})"),
    "NumberOfStudyRelatedSeries": ("STUDY", "(SELECT count(*) FROM series x "
                                            f"WHERE x.study_fk = s.id AND {_SERIES_HELD})"),
    "NumberOfStudyRelatedInstances": ("STUDY", "(SELECT count(*) FROM instances x "
                                               f"WHERE x.study_fk = s.id AND {_CURRENT})"),
    "NumberOfSeriesRelatedInstances": ("SERIES", "(SELECT count(*) FROM instances x "
                                                 f"WHERE x.series_fk = se.id AND {_CURRENT})"),
    "NumberOfPatientRelatedStudies": ("PATIENT", "(SELECT count(*) FROM studies y "
                                                 f"WHERE y.patient_fk = p.id AND {_STUDY_HELD})"),
    "NumberOfPatientRelatedSeries": ("PATIENT", "(SELECT count(*) FROM series x JOIN studies y "
                                                "ON y.id = x.study_fk WHERE y.patient_fk = p.id "
                                                f"AND {_SERIES_HELD})"),
    "NumberOfPatientRelatedInstances": ("PATIENT", "(SELECT count(*) FROM instances x JOIN "
                                                   "studies y ON y.id = x.study_fk WHERE "
                                                   f"y.patient_fk = p.id AND {_CURRENT})"),
}
# The newest held study's value of the patient attribute in column {column} (PATIENT level).
_NEWEST_OF_PATIENT = ("(SELECT {column} FROM studies s WHERE s.patient_fk = p.id AND "
                      "{column} IS NOT NULL AND " + _HELD["STUDY"] +
                      " ORDER BY s.study_date DESC, s.first_received_at DESC LIMIT 1)")
# Multi-valued computed attributes: SQLite joins them with ","; DICOM wants "\\".
_MULTI = {"ModalitiesInStudy", "SOPClassesInStudy"}

_FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies s JOIN patients p ON p.id = s.patient_fk",
    "SERIES": ("series se JOIN studies s ON s.id = se.study_fk "
               "JOIN patients p ON p.id = s.patient_fk"),
    "IMAGE": ("instances i JOIN series se ON se.id = i.series_fk "
              "JOIN studies s ON s.id = i.study_fk JOIN patients p ON p.id = s.patient_fk"),
}
_ENTITY_ID = {"PATIENT": "p.id", "STUDY": "s.id", "SERIES": "se.id", "IMAGE": "i.id"}
_ENTITY_TABLE = {"PATIENT": "patients p", "STUDY": "studies s", "SERIES": "series se"}
_DEPTH = {level: n for n, level in enumerate(LEVELS)}

# A UID as a query asks for one, and as ingest lets one in (appliance/ingest/attributes.py:
# a Study, Series, SOP Instance or SOP Class UID of any other form is refused there, so every
# stored object can be found and retrieved by its UIDs; one with letters was stored with
# Success, then its SERIES C-FIND failed 0xA900 and its C-GET was refused). No stricter than
# that: leading zeros in a component break PS3.5 9.1 but are in real hospital data.
UID_PATTERN = re.compile(r"[0-9.]{1,64}")


def is_uid(text: str) -> bool:
    """Whether ``text`` (padding removed) is a UID the index can match: digits and dots."""
    return UID_PATTERN.fullmatch(text) is not None


# [0-9], not \d: any script's digits, which int() reads, so "\u0662\u0660..." (Arabic-Indic)
# was searched as a date and matched nothing. \Z, not $ (which matches before a newline).
_DATE = re.compile(r"[0-9]{8}\Z")
_TIME = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?\Z")


def _valid(vr: str, text: str) -> bool:
    """A DA that is a calendar date, or a TM whose hours, minutes and seconds are in range.
    The shape alone let 20201301 through: it matched nothing and answered an empty list,
    which reads as "no such study" instead of naming the mistake."""
    if vr == "DA":
        if not _DATE.match(text):
            return False
        try:
            dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            return False
        return True
    if not _TIME.match(text):
        return False
    hours, minutes, seconds = int(text[:2]), text[2:4], text[4:6]
    return hours < 24 and (not minutes or int(minutes) < 60) and \
        (not seconds or int(seconds) <= 60)  # 60: a leap second


def level_of(keyword: str) -> str | None:
    """The query level an attribute belongs to (None: not one the index knows)."""
    if keyword in COLUMNS:
        return COLUMNS[keyword].level
    if keyword in COMPUTED:
        return COMPUTED[keyword][0]
    return None


def available(keyword: str, level: str) -> bool:
    """Whether ``keyword`` can be matched or returned at ``level``: attributes of the level
    and of the levels above it (Study Root and relational queries); never of those below."""
    owner = level_of(keyword)
    return owner is not None and _DEPTH[owner] <= _DEPTH[level]


@dataclass
class _Where:
    clauses: list[str]
    params: list[Any]

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


_CASEFOLD = "pas_casefold"


def _casefold(value: str | None) -> str | None:
    """Full Unicode case folding (É -> é, ß -> ss) for case-insensitive person names."""
    return value.casefold() if isinstance(value, str) else value


def _glob_pattern(value: str) -> str:
    return value.replace("[", "[[]")


def _match_range(where: _Where, column: str, keyword: str, value: str, vr: str) -> None:
    low, _, high = value.partition("-")
    for bound in (low, high):
        if bound and not _valid(vr, bound):
            raise QueryError(f"{keyword}: {value!r} is not a valid {vr} range")
    if not low and not high:
        raise QueryError(f"{keyword}: {value!r} is an empty range")
    if low and vr == "TM":
        # A stored time of lower precision covers what it is a prefix of (PS3.5 6.2: trailing
        # null components): 1500 is 15:00 to 15:00:59.9, so it is in "150000-", which the
        # plain comparison ("1500" < "150000") missed.
        where.add(f"({column} >= ? OR ({column} <> '' AND substr(?, 1, length({column})) "
                  f"= {column}))", low, low)
    elif low:
        where.add(f"{column} >= ?", low)
    if high:
        # A bound is inclusive of everything it is a prefix of (1200 includes 120059.9).
        where.add(f"{column} <= ?", high + "\x7f")


def _any_of(column: str, values: list[str]) -> tuple[str, list[str]]:
    """SQL matching ``column`` against any of several code-string values, each one a single
    value or a ``*``/``?`` wildcard (PS3.4 C.2.2.2.4 applies wildcards to CS too)."""
    plain = [v for v in values if not _has_wildcard(v)]
    tests = [f"{column} GLOB ?" for v in values if _has_wildcard(v)]
    params = [_glob_pattern(v) for v in values if _has_wildcard(v)]
    if plain:
        tests.insert(0, f"{column} IN ({', '.join('?' * len(plain))})")
        params[:0] = plain
    return "(" + " OR ".join(tests) + ")", params


def _match(where: _Where, keyword: str, value: str, pn_case_sensitive: bool) -> None:
    """Append the SQL for one non-empty matching key (PS3.4 C.2.2.2)."""
    if keyword == "SOPClassesInStudy":
        # A study holding an instance of any of the classes (refused before, where a viewer
        # listing a cache's structured reports or presentation states asks it).
        uids = _list_values(keyword, [v.strip() for v in value.split("\\") if v.strip()])
        if not uids or any(uid.replace("*", "") == "" for uid in uids):
            return  # "*": universal matching
        if any(not is_uid(uid) for uid in uids):
            raise QueryError(f"{keyword}: {value!r} is not a UID or a list of UIDs")
        where.add("EXISTS (SELECT 1 FROM instances x WHERE x.study_fk = s.id AND "
                  f"x.is_current = 1 AND x.sop_class_uid IN ({', '.join('?' * len(uids))}))",
                  *uids)
        return
    if keyword in COMPUTED:
        if keyword != "ModalitiesInStudy":
            # Said within the 64 characters of a C-FIND's Error Comment (the longest
            # keyword, NumberOfPatientRelatedInstances, leaves 29): it was cut mid-word.
            raise QueryError(f"{keyword}: a count, returned, not matched")
        values = _list_values(keyword, [v for v in value.split("\\") if v])
        if not values or any(v.replace("*", "") == "" for v in values):
            return  # "*": universal matching (what an SCU sends for "all modalities")
        test, params = _any_of("x.modality", values)
        where.add("EXISTS (SELECT 1 FROM series x WHERE x.study_fk = s.id AND "
                  f"{_SERIES_HELD} AND {test})", *params)
        return
    column = COLUMNS[keyword]
    sql, vr = column.sql, column.vr
    if value.replace("*", "") == "":
        # "*" alone: universal matching, a UID's too (refused before: PS3.4 C.2.2.2.4 keeps
        # wildcards off UIDs, but a lone "*" is what viewers send for "any", as Orthanc takes).
        return
    if vr == "UI":
        uids = _list_values(keyword, [v.strip() for v in value.split("\\") if v.strip()])
        if any(not is_uid(uid) for uid in uids):
            raise QueryError(f"{keyword}: {value!r} is not a UID or a list of UIDs")
        where.add(f"{sql} IN ({', '.join('?' * len(uids))})", *uids)
    elif vr in ("DA", "TM"):
        if "-" in value:
            _match_range(where, sql, keyword, value, vr)
        elif vr == "TM" and _valid(vr, value):
            # One time as the range from it to itself: 012345 is 01:23:45 to 01:23:45.99,
            # so a time stored as 012345.000 matches it (compared as text, it did not).
            _match_range(where, sql, keyword, f"{value}-{value}", vr)
        elif _valid(vr, value):
            where.add(f"{sql} = ?", value)
        else:
            raise QueryError(f"{keyword}: {value!r} is not a valid {vr} value or range")
    elif vr in _INTEGER_RANGE:
        try:
            number = int(value)
        except ValueError:
            raise QueryError(f"{keyword}: {value!r} is not an integer") from None
        # PS3.5 IS: a 32-bit signed integer. Past SQLite's 64 bits the bound parameter raised
        # OverflowError, not a sqlite3.Error: QIDO-RS ?InstanceNumber=99999999999999999999999
        # was a 500 with no audit row.
        low, high, what = _INTEGER_RANGE[vr]
        if not low <= number <= high:
            raise QueryError(f"{keyword}: {value[:40]!r} is out of the range of {what}")
        where.add(f"{sql} = ?", number)
    elif vr == "PN":
        _match_person_name(where, keyword, sql, value, pn_case_sensitive)
    elif "\\" in value:  # several values of a CS (e.g. Modality CT\MR): any of them
        test, params = _any_of(sql, _list_values(keyword, value.split("\\")))
        where.add(test, *params)
    elif _has_wildcard(value):
        where.add(f"{sql} GLOB ?", _glob_pattern(value))
    else:
        where.add(f"{sql} = ?", value)
    if keyword == "PatientID" and not _has_wildcard(value) and all(value.split("\\")):
        # Not for a wildcard: SQLite took a prefix over a better index (P00* with PatientName
        # PATIENT^1000*: 657 -> 240,357 instructions where every ID began with P00).
        where.add(_NAMES_SOMEONE)


def _match_person_name(where: _Where, keyword: str, sql: str, value: str,
                       case_sensitive: bool) -> None:
    """A person name key (PS3.4 C.2.2.2.1, C.2.2.2.4): one value, matched against each value
    and component group of a stored name that has several (``person_names.py``), against the
    whole name otherwise. A key of several values (``DOE^JOHN\\DOE^J``) is refused: PN keys
    are VM 1, PS3.4 C.2.2.2 lets a key hold more values than its VM only for List of UID
    Matching and for Multiple Value Matching, which is for attributes of VM > 1 and needs an
    extended negotiation PAS does not offer (C.2.2.2.8 note 4: undefined without it). It
    matched nothing, which read as "no such patient".

    Trailing empty components do not count, on either side (PS3.5 6.2.1.1, ``key_groups``):
    ``DOE^JANE`` finds ``DOE^JANE^^^`` and ``SMITH^JOHN^^^`` finds ``smith^john``. A key of
    several groups is matched group by group; a stored name without ``=`` has its first
    (alphabetic) group only, so ``SMITH*=*=*`` is ``SMITH*`` on it, ``*=*`` matches every
    name, and ``=山田*`` none of them (each of these matched nothing: the key was compared
    whole)."""
    if "\\" in value:
        count = len(value.split("\\"))
        raise QueryError(f"{keyword}: a person name key takes one value, not {count} (PS3.4 "
                         f"C.2.2.2: VM 1, no multiple value matching): {value[:80]!r}")
    groups = key_groups(value)
    if all(matches_anything(group) for group in groups):
        return  # "^", "*=*", "=": universal matching, as "" and "*"
    table, column = PN_TABLES[sql]
    alias = sql.split(".")[0]
    # Two terms SQLite can each answer from an index: the name index for the names of one
    # value, the rows of several (their partial index, schema migration 14) by row id.
    separated = (f"{alias}.id IN (SELECT id FROM {table} WHERE "
                 f"{SEPARATED.format(column=column)} AND {PN_MATCH}({column}, ?, ?))")
    params = ["=".join(groups), int(case_sensitive)]
    if any(not matches_anything(group) for group in groups[1:]):
        # A group past the first asked for: a name of one group has none to match it.
        where.add(separated, *params)
        return
    plain, plain_params = _plain_name(sql, groups[0], case_sensitive)
    if case_sensitive or not groups[0].isascii():
        where.add(f"(({plain} AND NOT {SEPARATED.format(column=sql)}) OR {separated})",
                  *plain_params, *params)
        return
    # An ASCII key, matched by NOCASE and LIKE, which fold ASCII letters only: the names
    # holding a letter that folds to ASCII ones (ß) are matched as a non-ASCII key's are,
    # both sides case-folded (by pn_match), so that "strasse^anna" finds "Straße^Anna" as
    # "straße^anna" does (review s40, finding 6). Through their partial index (migration 28)
    # where there is one: a few rows.
    if sql in FOLDING_TABLES:
        table, column = FOLDING_TABLES[sql]
        folding = (f"{alias}.id IN (SELECT id FROM {table} WHERE "
                   f"{FOLDING.format(column=column)} AND {PN_MATCH}({column}, ?, 0))")
    else:
        folding = f"({FOLDING.format(column=sql)} AND {PN_MATCH}({sql}, ?, 0))"
    where.add(f"(({plain} AND NOT {SEPARATED.format(column=sql)}) OR {separated} "
              f"OR {folding})", *plain_params, *params, groups[0])


def _plain_name(sql: str, key: str, case_sensitive: bool) -> tuple[str, list[Any]]:
    """SQL matching the stored name ``sql`` of one value and one group against one group of
    a key (from ``key_groups``: no trailing ``^``), as ``person_names.pn_match`` matches a
    group: the name without its trailing ``^`` (written out to five components for a key
    ending in ``*``). Whatever else it tests, it bounds the name on the name index (``name
    COLLATE NOCASE``): the names beginning with the key's text before its first wildcard,
    so the trailing ``^`` of a stored name cost no index (an exact key: a range of the
    names from it to those followed by ``^``; a wildcard one: LIKE's prefix, as before)."""
    trimmed = f"rtrim({sql}, '^')"
    subject = f"{trimmed} || '{PADDING}'" if key.endswith("*") else trimmed
    wild = _has_wildcard(key)
    tests: list[str] = []
    params: list[Any] = []
    if case_sensitive or key.isascii():
        if not wild:
            # "_" is the character after "^": DOE^JANE to DOE^JANE^^^, not DOE^JANET.
            tests.append(f"{sql} >= ? COLLATE NOCASE AND {sql} < ? COLLATE NOCASE")
            params += [key, key + "_"]
        elif prefix := re.split(r"[*?]", key, maxsplit=1)[0].rstrip("^"):
            tests.append(f"{sql} LIKE ? ESCAPE '\\'")
            params.append(_like_pattern(prefix) + "%")
    if not case_sensitive and not key.isascii():
        # SQLite's LIKE and NOCASE fold ASCII letters only: "hélène*" missed HÉLÈNE^DUPONT.
        # Both sides go through str.casefold (registered on the connection by find()); an
        # ASCII value keeps the forms below, which fold the same. No index bound: a letter
        # beyond ASCII may fold to ASCII ones (ß to ss), which NOCASE does not see.
        folded = _casefold(key)
        if wild:
            tests.append(f"{_CASEFOLD}({subject}) GLOB ?")
            params.append(_glob_pattern(folded))
        else:
            tests.append(f"{_CASEFOLD}({trimmed}) = ?")
            params.append(folded)
    elif not case_sensitive:
        if wild:
            tests.append(f"{subject} LIKE ? ESCAPE '\\'")
            params.append(_like_pattern(key))
        else:
            tests.append(f"{trimmed} = ? COLLATE NOCASE")
            params.append(key)
    elif wild:
        tests.append(f"{subject} GLOB ?")
        params.append(_glob_pattern(key))
    else:
        tests.append(f"{trimmed} = ?")
        params.append(key)
    return "(" + " AND ".join(tests) + ")", params


def find(db: Database, level: str, keys: dict[str, str], *,
         pn_case_sensitive: bool = False, limit: int | None = None,
         offset: int = 0) -> Generator[dict[str, Any], None, None]:
    """Every entity at ``level`` matching ``keys`` (keyword -> DICOM string value; empty is
    universal matching), each as keyword -> value for every key asked that the index knows.

    Keys the index does not hold, or of a level below ``level``, are returned as ``None``
    (the caller sends them empty, as PS3.4 C.4.1.1.3.2 allows for optional keys)."""
    for _, result in _entities(db, level, keys, pn_case_sensitive=pn_case_sensitive,
                               limit=limit, offset=offset):
        yield result


def find_pages(db: Database, level: str, keys: dict[str, str], *, page_size: int,
               pn_case_sensitive: bool = False, limit: int | None = None,
               offset: int = 0) -> Iterator[list[dict[str, Any]]]:
    """What :func:`find` returns, ``page_size`` entities at a time, each page one query read
    whole (so each may run in another thread), the pages after the first after the last
    entity's row id, not by OFFSET (which rescans): one list of every row of a study of
    200,000 instances cost +1,582 MB. The first page raises QueryError, before any answer."""
    left = limit
    after: int | None = None
    computed: dict[tuple[str, Any], Any] = {}  # per owner, once for every page
    while left is None or left > 0:
        size = page_size if left is None else min(page_size, left)
        page = list(_entities(db, level, keys, pn_case_sensitive=pn_case_sensitive,
                              limit=size, offset=offset if after is None else 0,
                              after=after, computed=computed))
        if page:
            yield [result for _, result in page]
        if len(page) < size:
            return
        after = page[-1][0]
        if left is not None:
            left -= len(page)


def _entities(db: Database, level: str, keys: dict[str, str], *, pn_case_sensitive: bool,
              limit: int | None, offset: int, after: int | None = None,
              computed: dict[tuple[str, Any], Any] | None = None,
              ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row id, values) of each entity :func:`find` returns, past row id ``after``;
    ``computed`` keeps the computed attributes of the owners above the level."""
    level = level.upper()
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel: {level!r} is not one of {', '.join(LEVELS)}")
    where = _Where([], [])
    where.add(_HELD[level])
    selected: list[str] = []
    select_sql: list[str] = []
    # Computed attributes of a level above the query's (NumberOfStudyRelatedInstances of an
    # instance search): a correlated count per row would recount the whole study for each of
    # its instances (38 ms a row in a 400,000-instance study). The row carries the owner's id
    # instead and each owner is computed once.
    per_owner: set[str] = set()
    # A PATIENT query's keys on its studies' own patient attributes: one study must match
    # them all (a name and a birth date of the same study, not of two).
    of_a_study = _Where([], [])
    for keyword, value in keys.items():
        if not available(keyword, level):
            continue
        value = (value or "").strip()
        per_study = level == "PATIENT" and keyword in _PER_STUDY
        if value:
            _match(of_a_study if per_study else where, keyword, value, pn_case_sensitive)
        if per_study:
            sql = _NEWEST_OF_PATIENT.format(column=COLUMNS[keyword].sql)
        elif keyword in COLUMNS:
            sql = COLUMNS[keyword].sql
        elif COMPUTED[keyword][0] != level:
            sql = _ENTITY_ID[COMPUTED[keyword][0]]
            per_owner.add(keyword)
        else:
            sql = COMPUTED[keyword][1]
        selected.append(keyword)
        select_sql.append(f"{sql} AS c{len(selected) - 1}")
    if of_a_study.clauses:
        where.add(f"p.id IN (SELECT s.patient_fk FROM studies s WHERE {_HELD['STUDY']} AND "
                  + " AND ".join(of_a_study.clauses) + ")", *of_a_study.params)
    if after is not None:
        where.add(f"{_ENTITY_ID[level]} > ?", after)
    columns = ", ".join([f"{_ENTITY_ID[level]} AS entity_id", *select_sql])
    sql = f"SELECT {columns} FROM {_FROM[level]}"
    if where.clauses:
        sql += " WHERE " + " AND ".join(where.clauses)
    sql += f" ORDER BY {_ENTITY_ID[level]}"
    if limit is not None or offset:
        # SQLite has no OFFSET without LIMIT; -1 is "no limit" (QIDO ?offset=n alone).
        sql += " LIMIT ? OFFSET ?"
        where.params.extend([-1 if limit is None else limit, offset])
    conn = db.connection()
    try:
        conn.create_function(_CASEFOLD, 1, _casefold, deterministic=True)
        conn.create_function(PN_MATCH, 3, pn_match, deterministic=True)
        cursor = conn.execute(sql, where.params)
    except sqlite3.Error as exc:
        raise QueryError(f"query failed: {exc}") from exc
    if computed is None:
        computed = {}
    for row in cursor:
        result: dict[str, Any] = dict.fromkeys(keys)
        for n, keyword in enumerate(selected):
            value = row[f"c{n}"]
            if keyword in per_owner:
                if (keyword, value) not in computed:
                    computed[keyword, value] = _computed_for(conn, keyword, value)
                value = computed[keyword, value]
            if keyword in _MULTI and value is not None:
                value = "\\".join(sorted(set(value.split(","))))
            result[keyword] = value
        yield row["entity_id"], result


def _computed_for(conn: sqlite3.Connection, keyword: str, entity_id: Any) -> Any:
    """One computed attribute of one patient, study or series (by its row id)."""
    owner, expression = COMPUTED[keyword]
    row = conn.execute(f"SELECT {expression} AS v FROM {_ENTITY_TABLE[owner]} "
                       f"WHERE {_ENTITY_ID[owner]} = ?", (entity_id,)).fetchone()
    return row["v"] if row else None


def confirmed_in_study(db: Database, study_uid: str) -> int:
    """How many current instances of the study here the region confirmed (its receipts
    named them): a set the region holds. When the region counts no more instances of the
    study than that, it holds nothing of it that is not here (serving/qr.py
    ``_region_wanted``); a plain count here proved nothing (another set of the same size)."""
    row = db.connection().execute(
        "SELECT count(*) FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ? AND i.is_current = 1 AND i.confirmed_at IS NOT NULL",
        (study_uid,)).fetchone()
    return int(row[0])
