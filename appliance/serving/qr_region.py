"""The region's C-FIND answers (``serving.query_region``) merged with the local ones, level by
level: one answer per patient, study, series or instance, local rows winning for what is
held here.

Owns: what the index is asked for the merge (:func:`local_keys`), a local match merged with
the region's row of it (:func:`merged`, :func:`patient_merged`), whether a row of the
region's that the index did not match is held here whole (:func:`whole_here`), what is held
here of the region's answers (:func:`held_counts`, :func:`held_studies`), and the region's
studies grouped into patients (:func:`region_patients`, :func:`patient_answer`). The
C-FIND handler that streams them is ``qr.py``'s, the QIDO-RS search itself
``fetch.py``'s (:class:`RegionFind`). May not touch: SQL (the index is read through
:mod:`appliance.store.query`), the network, associations.

Counts follow what the STUDY level answers for a study held in part: the region's when it
counts more instances than are here (the rest is fetched on retrieve, NEARLINE), the local
ones otherwise (ONLINE). A patient's counts are those of the union of its studies held here
and those the region matched, each study counted so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from appliance.serving.fetch import PATIENT_KEYS, UNAPPLIED
from appliance.store import query as store_query
from appliance.store.db import Database

# The unique key of each level the region is asked at (PS3.4 C.4.1.2.1); a patient is told
# by PatientID and IssuerOfPatientID.
UNIQUE_KEY = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}
# The instance count compared with the region's, per level (an instance is held or not).
COUNT_KEY = {"STUDY": "NumberOfStudyRelatedInstances",
             "SERIES": "NumberOfSeriesRelatedInstances"}
PATIENT_COUNTS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                  "NumberOfPatientRelatedInstances")
# UIDs looked up in the index at a time (List of UID Matching: one SQL variable each).
HELD_PAGE = 500


def local_keys(level: str, keys: dict[str, str], ask_region: bool) -> dict[str, str]:
    """The keys the index is asked: the query's, with what the merge needs when the region
    is asked (the level's unique key or the patient's identity, the instance count compared
    with the region's); the answers carry the keys asked only."""
    asked = {"StudyInstanceUID": "", **keys}
    if not ask_region:
        return asked
    if level == "PATIENT":
        asked.setdefault("PatientID", "")
        asked.setdefault("IssuerOfPatientID", "")
        return asked
    asked.setdefault(UNIQUE_KEY[level], "")
    if level in COUNT_KEY:
        asked.setdefault(COUNT_KEY[level], "")
    return asked


def _int(value: Any) -> int:
    """A count of the index's or of the region's (an IS string); 0 when none or not one."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def merged(level: str, here: dict[str, Any], there: dict[str, Any] | None
           ) -> tuple[dict[str, Any], str]:
    """A study, series or instance matched here, with the region's row of it (None: the
    region was not asked, did not answer, or does not list it): (its values, its
    InstanceAvailability).

    When the region counts more instances of a study or series than are here (a series
    added at the region after the study was cached, a prefetch still running), it is
    answered with the region's counts (a study's also with the modalities and SOP classes of
    both), NEARLINE: PS3.4 C.4.1.2 has ONLINE for instances "immediately available", and the
    rest is fetched from the region on retrieve (fetch-through), as what is held only there
    is. Otherwise (the region holds no more, gives no count, or it is an instance) it is the
    local row, ONLINE."""
    count_key = COUNT_KEY.get(level)
    if there is None or count_key is None:
        return here, "ONLINE"
    try:
        count_here = int(here.get(count_key) or 0)
        count_there = int(there.get(count_key) or 0)
    except ValueError:
        return here, "ONLINE"
    if count_there <= count_here:
        return here, "ONLINE"
    result = dict(here)
    result[count_key] = count_there
    if level == "STUDY":
        with contextlib.suppress(ValueError):
            result["NumberOfStudyRelatedSeries"] = max(
                int(here.get("NumberOfStudyRelatedSeries") or 0),
                int(there.get("NumberOfStudyRelatedSeries") or 0))
        for keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
            codes = {v for row in (here, there)
                     for v in str(row.get(keyword) or "").split("\\")}
            if codes - {""}:
                result[keyword] = "\\".join(sorted(codes - {""}))
    return result, "NEARLINE"


def whole_here(level: str, count_here: int | None, there: dict[str, Any]) -> bool:
    """Whether a study, series or instance of the region's answer is held here whole: as
    many instances here as the region counts, or more (a region giving no count: not whole,
    it says nothing); an instance: held here."""
    if count_here is None:
        return False
    if level not in COUNT_KEY:
        return True
    try:
        return count_here >= int(there.get(COUNT_KEY[level]) or count_here + 1)
    except ValueError:
        return False


def _held(db: Database, level: str, uids: list[str], counts: tuple[str, ...]
          ) -> dict[str, dict[str, Any]]:
    """The index's rows at ``level`` of the ``uids`` held here (with ``counts``), by UID."""
    unique = UNIQUE_KEY[level]
    # A UID the index would refuse (a letter in it, over 64 characters) is held nowhere
    # here; asked, its QueryError failed the whole C-FIND (0xC311, no audit row; review
    # s40/2a).
    uids = [uid for uid in dict.fromkeys(uids) if store_query.is_uid(uid)]
    rows: dict[str, dict[str, Any]] = {}
    for at in range(0, len(uids), HELD_PAGE):
        keys = {unique: "\\".join(uids[at:at + HELD_PAGE]), **dict.fromkeys(counts, "")}
        for row in store_query.find(db, level, keys):
            rows[str(row[unique])] = row
    return rows


def held_counts(db: Database, level: str, uids: list[str]) -> dict[str, int]:
    """How many instances of each of ``uids`` (studies, series or instances) are here, for
    those held."""
    count_key = COUNT_KEY.get(level)
    rows = _held(db, level, uids, (count_key,) if count_key else ())
    return {uid: _int(row.get(count_key)) if count_key else 1 for uid, row in rows.items()}


def held_studies(db: Database, uids: list[str]) -> dict[str, tuple[int, int]]:
    """(series, instances) here of each of the studies ``uids`` held here."""
    rows = _held(db, "STUDY", uids, ("NumberOfStudyRelatedSeries",
                                     "NumberOfStudyRelatedInstances"))
    return {uid: (_int(row.get("NumberOfStudyRelatedSeries")),
                  _int(row.get("NumberOfStudyRelatedInstances"))) for uid, row in rows.items()}


# -- PATIENT ----------------------------------------------------------------------------


def patient_key(values: dict[str, Any]) -> tuple[str, str]:
    """A patient's identity: (PatientID, IssuerOfPatientID), "" for none."""
    return (str(values.get("PatientID") or "").strip(),
            str(values.get("IssuerOfPatientID") or "").strip())


@dataclass
class RegionPatient:
    """A patient of the region's answer: its values (identity; name, birth date and sex each
    of its newest study by StudyDate giving one, as the index answers a patient), its
    studies matched (UID -> (series, instances) the region counts) and the keys held back
    that could not be checked on one of them."""

    values: dict[str, Any]
    studies: dict[str, tuple[int, int]] = field(default_factory=dict)
    unapplied: set[str] = field(default_factory=set)
    dated: dict[str, str] = field(default_factory=dict)  # keyword -> StudyDate it came from


def region_patients(rows: list[dict[str, Any]], keys: dict[str, str]
                    ) -> dict[tuple[str, str], RegionPatient]:
    """The region's studies (a PATIENT search's answer) grouped into patients, in the
    region's order of their first study. A row without PatientID or StudyInstanceUID is
    left out (it could not be told from another, nor retrieved). A row without
    IssuerOfPatientID is of the query's issuer when the query named one (the region matched
    it: fetch.py sends it), else of none. Keys given a value that are not a study's (the
    patient's counts) are not checked on the region's patients: they are unapplied."""
    issuer_key = (keys.get("IssuerOfPatientID") or "").strip()
    if "*" in issuer_key or "?" in issuer_key or "\\" in issuer_key:
        issuer_key = ""
    not_checked = {keyword for keyword, value in keys.items()
                   if keyword not in PATIENT_KEYS and (value or "").strip().replace("*", "")
                   and store_query.available(keyword, "PATIENT")}
    patients: dict[tuple[str, str], RegionPatient] = {}
    for row in rows:
        study = str(row.get("StudyInstanceUID") or "")
        patient_id = str(row.get("PatientID") or "").strip()
        if not study or not patient_id:
            continue
        issuer = str(row.get("IssuerOfPatientID") or "").strip() or issuer_key
        patient = patients.get((patient_id, issuer))
        if patient is None:
            patient = patients[patient_id, issuer] = RegionPatient(
                {"PatientID": patient_id, "IssuerOfPatientID": issuer},
                unapplied=set(not_checked))
        patient.studies[study] = (_int(row.get("NumberOfStudyRelatedSeries")),
                                  _int(row.get("NumberOfStudyRelatedInstances")))
        patient.unapplied.update(row.get(UNAPPLIED) or [])
        date = str(row.get("StudyDate") or "")
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex"):
            value = row.get(keyword)
            if value and (keyword not in patient.dated or date > patient.dated[keyword]):
                patient.values[keyword] = value
                patient.dated[keyword] = date
    return patients


def _union(there: RegionPatient, held: dict[str, tuple[int, int]]
           ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(studies, series, instances) of the patient's studies the region matched, each
    counted as the STUDY level answers it (the region's counts when it holds more of it than
    is here, else the local ones); and how many of those are beyond what is here."""
    total = [0, 0, 0]
    beyond = [0, 0, 0]
    for uid, (series_there, instances_there) in there.studies.items():
        series_here, instances_here = held.get(uid, (0, 0))
        total[0] += 1
        if uid not in held:
            beyond[0] += 1
        if instances_there > instances_here:
            series = max(series_there, series_here)
            total[1] += series
            total[2] += instances_there
            beyond[1] += series - series_here
            beyond[2] += instances_there - instances_here
        else:
            total[1] += series_here
            total[2] += instances_here
    return (total[0], total[1], total[2]), (beyond[0], beyond[1], beyond[2])


def patient_merged(here: dict[str, Any], there: RegionPatient | None,
                   held: dict[str, tuple[int, int]]) -> tuple[dict[str, Any], str]:
    """A patient matched here, with the region's studies of it (None: none, or the region
    not asked): the local values, and when the region holds studies or instances of the
    patient that are not here, its counts those of the union and NEARLINE (the rest is
    fetched on retrieve, as for a study held in part); else the local row, ONLINE."""
    if there is None:
        return here, "ONLINE"
    _, beyond = _union(there, held)
    if not beyond[0] and not beyond[2]:
        return here, "ONLINE"
    result = dict(here)
    for keyword, more in zip(PATIENT_COUNTS, beyond, strict=True):
        if keyword in result:  # asked
            result[keyword] = _int(result[keyword]) + more
    return result, "NEARLINE"


def uncounted(values: dict[str, Any]) -> dict[str, Any]:
    """A patient's values with its NumberOfPatientRelated* empty: counts that may be
    incomplete (the region's answer was cut) are not given (answered 0xFF01)."""
    return {**values, **dict.fromkeys(PATIENT_COUNTS, "")}


def patient_answer(there: RegionPatient, held: dict[str, tuple[int, int]]
                   ) -> tuple[dict[str, Any], bool]:
    """A patient only the region matched: (its values, with the counts of the studies the
    region matched, whether those are all held here whole)."""
    total, beyond = _union(there, held)
    values = dict(there.values)
    values.update(zip(PATIENT_COUNTS, total, strict=True))
    return values, not beyond[0] and not beyond[2]
