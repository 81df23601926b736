"""Reading the attributes the index needs from a received header.

Owns: the mapping from DICOM tags to :class:`~appliance.store.index.InstanceRecord`, and the
check that an object carries the UIDs without which it cannot be filed.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from appliance.store.index import InstanceRecord


class InvalidInstance(ValueError):
    """The object cannot be filed; the message names what is missing or wrong."""


class _Unreadable:
    """An element whose value pydicom cannot convert (unknown VR, undecodable bytes)."""


UNREADABLE = _Unreadable()


def _get(ds: Dataset, keyword: str) -> Any:
    # Found by fuzzing (tests/fuzz): values are converted lazily, so an element with an
    # unknown VR raises here, not at parse time. For the index an odd value is no value.
    try:
        return ds.get(keyword)
    except Exception:
        return UNREADABLE


def _text(ds: Dataset, keyword: str) -> str | None:
    value: Any = _get(ds, keyword)
    if value is None or value == "" or value is UNREADABLE:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = _get(ds, keyword)
        return int(value) if value not in (None, "", UNREADABLE) else None
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    if _get(ds, keyword) is UNREADABLE:
        raise InvalidInstance(f"{keyword} cannot be read (invalid value representation)")
    value = _text(ds, keyword)
    if not value:
        raise InvalidInstance(f"{keyword} is missing")
    if len(value) > 64:
        raise InvalidInstance(f"{keyword} is longer than 64 characters")
    return value


def instance_record(ds: Dataset, transfer_syntax_uid: str) -> InstanceRecord:
    """The index's view of ``ds``; raises :class:`InvalidInstance` naming what is missing."""
    return InstanceRecord(
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        sop_class_uid=_uid(ds, "SOPClassUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID") or "",
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID") or "",
        patient_name=_text(ds, "PatientName"),
        birth_date=_text(ds, "PatientBirthDate"),
        sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician=_text(ds, "ReferringPhysicianName"),
        series_number=_int(ds, "SeriesNumber"),
        modality=_text(ds, "Modality"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined"),
        instance_number=_int(ds, "InstanceNumber"),
    )
