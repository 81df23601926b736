"""Reading the attributes the index needs from a received header.

Owns: the mapping from DICOM tags to :class:`~appliance.store.index.InstanceRecord`, and the
check that an object carries the UIDs without which it cannot be filed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from types import SimpleNamespace
from typing import Any

from pydicom.charset import python_encoding
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from appliance.store.index import InstanceRecord
from appliance.store.query import is_uid

log = logging.getLogger("pas.ingest")


class InvalidInstance(ValueError):
    """The object cannot be filed; the message names what is missing or wrong."""


class DatasetMismatch(InvalidInstance):
    """The dataset's SOP Class is not the one its C-STORE request names (PS3.4 B.2.3:
    0xA900, "Data Set does not match SOP Class", as DCMTK's storescp answers)."""


class OtherStudy(InvalidInstance):
    """The object belongs to another study than the one it was sent to (a STOW-RS to
    /studies/{study}); ``record`` is its index record."""

    def __init__(self, record: InstanceRecord):
        super().__init__(f"belongs to study {record.study_uid}")
        self.record = record


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


# The range of an IS value (PS3.5 6.2: a 32-bit signed integer). An over-long one
# ("99999999999999999999") is no value for the index: bound to SQLite it raised
# OverflowError, and the C-STORE failed ("unexpected error"), with it every other instance
# of its group commit (appliance/ingest/receive.py), whose rollback catches only SQLite's
# errors.
IS_MIN, IS_MAX = -2**31, 2**31 - 1


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = _get(ds, keyword)
        number = int(value) if value not in (None, "", UNREADABLE) else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(IS("1e400"))
        return None
    return number if number is None or IS_MIN <= number <= IS_MAX else None


# The range of a US value (PS3.5 6.2). Rows, Columns and BitsAllocated are US; written with
# another VR (SS -1, an IS of 70000) and kept as they came, the index held a value no C-FIND
# answer can encode: the query failed (0xC312) at that instance, every match after it lost.
US_MAX = 2**16 - 1


def _unsigned(ds: Dataset, keyword: str) -> int | None:
    number = _int(ds, keyword)
    return number if number is None or 0 <= number <= US_MAX else None


def _uid(ds: Dataset, keyword: str) -> str:
    if _get(ds, keyword) is UNREADABLE:
        raise InvalidInstance(f"{keyword} cannot be read (invalid value representation)")
    return _checked_uid(keyword, _text(ds, keyword))


def _checked_uid(keyword: str, value: str | None) -> str:
    """``value`` if it is a UID the index can file and every query can find again; raises
    :class:`InvalidInstance` naming ``keyword`` otherwise (both ingest paths).

    Why the form too, not just presence and length: a UID with letters (or several values)
    was stored with Success, then no query could name it (query.py matches UIDs as digits
    and dots, :data:`~appliance.store.query.UID_PATTERN`): its SERIES C-FIND failed 0xA900
    and its C-GET was refused. The pattern is the query side's own, so nothing the index
    holds is out of a query's reach, and nothing a query could find is refused here."""
    if not value:
        raise InvalidInstance(f"{keyword} is missing")
    if len(value) > 64:
        raise InvalidInstance(f"{keyword} is longer than 64 characters")
    if not is_uid(value):
        # Not the value: the Error Comment is an LO of 64 characters (the refusal's log
        # line names the instance, from the request: appliance/ingest/scp.py).
        raise InvalidInstance(f"{keyword} is not a UID (digits and dots only)")
    return value


# The DA and TM forms PS3.5 6.2 asks a reader to accept for backward compatibility with
# ACR-NEMA, which older modalities and archive migrations still write: yyyy.mm.dd, and
# hh:mm:ss.frac (hh:mm, hh:mm:ss). [0-9], not \d (any script's digits).
_LEGACY_DA = re.compile(r"([0-9]{4})\.([0-9]{2})\.([0-9]{2})")
_LEGACY_TM = re.compile(r"([0-9]{2}):([0-9]{2})(?::([0-9]{2})(\.[0-9]{1,6})?)?")


def _index_date(value: str | None) -> str | None:
    """A DA value as the index keeps it: ``yyyy.mm.dd`` as ``yyyymmdd``, anything else as
    read. Why: queries match dates as yyyymmdd (appliance/store/query.py), and 2020.01.15
    kept as received was missed by every StudyDate and PatientBirthDate match and range.
    Only the index's value: the stored file keeps its bytes (invariant 4)."""
    match = _LEGACY_DA.fullmatch(value) if value else None
    return "".join(match.groups()) if match else value


def _index_time(value: str | None) -> str | None:
    """A TM value as the index keeps it: ``hh:mm:ss.frac`` as ``hhmmss.frac``, anything else
    as read (see :func:`_index_date`; 10:30:00 was matched as text, in no range's order)."""
    match = _LEGACY_TM.fullmatch(value) if value else None
    return "".join(part or "" for part in match.groups()) if match else value


# Text the index reads whose bytes the dataset's character set decides (PS3.5 6.1.2.3).
_CHARSET_FIELDS = {0x00100020: "patient_id", 0x00100021: "issuer_of_patient_id",
                   0x00100010: "patient_name", 0x00080050: "accession_number",
                   0x00200010: "study_id", 0x00081030: "study_description",
                   0x00080090: "referring_physician", 0x0008103E: "series_description"}
_CHARSET_TAGS = set(_CHARSET_FIELDS)
_ASCII_TERMS = {"", "ISO_IR 6", "ISO 2022 IR 6"}
# Studies already warned about (one warning per study, not per image): bounded, invariant 8.
_warned_studies: set[str] = set()
WARNED_STUDIES_REMEMBERED = 4096


def _declared_terms(ds: Dataset) -> list[str] | None:
    """The Specific Character Set's defined terms ([] when absent); None when unreadable."""
    try:
        element = ds.get_item(0x00080005)
    except Exception:
        return None
    value = element.value if element is not None else None
    if isinstance(value, bytes):
        return [t.strip() for t in value.decode("ascii", "replace").split("\\")]
    if isinstance(value, str):
        return [value.strip()]
    if value:
        return [str(t).strip() for t in value]
    return []


def _charset_problems(ds: Dataset) -> tuple[list[str], dict[str, str]]:
    """What in the raw text values the index reads does not fit the declared Specific
    Character Set, and the values to index instead of pydicom's reading.

    Bytes beyond ASCII without a Specific Character Set: many modalities and anonymisers
    write UTF-8 and declare nothing. pydicom reads such bytes as Latin-1, which turns
    "Zoë" into "ZoÃ«" in the index, in every C-FIND answer and in every search for the
    name. Text that is valid UTF-8 is indexed as UTF-8 (Latin-1 text of real names is
    practically never valid UTF-8: an accented letter is one byte >= 0xC0 followed by a
    lower-case ASCII letter, which UTF-8 forbids); anything else is indexed as pydicom reads
    it, in Latin-1. Bytes invalid in a single-valued declared set: pydicom puts U+FFFD in
    their place. ISO 2022 code extensions are left to pydicom, which warns itself. The
    stored bytes are never changed."""
    terms = _declared_terms(ds)
    if terms is None:
        return [], {}
    ascii_only = all(t in _ASCII_TERMS for t in terms)
    codec = python_encoding.get(terms[0]) if len(terms) == 1 and not ascii_only else None
    if not ascii_only and codec is None:
        return [], {}
    problems: list[str] = []
    as_utf8: dict[str, str] = {}
    for tag in sorted(_CHARSET_TAGS):
        raw = ds._dict.get(tag)  # type: ignore[attr-defined]
        if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes):
            continue
        if ascii_only:
            if raw.value.isascii():
                continue
            try:
                text = raw.value.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{keyword_for_tag(tag)} has bytes beyond ASCII and no "
                                "Specific Character Set: indexed as read in Latin-1")
                continue
            problems.append(f"{keyword_for_tag(tag)} has bytes beyond ASCII and no "
                            "Specific Character Set: valid UTF-8, indexed as UTF-8")
            as_utf8[_CHARSET_FIELDS[tag]] = _trimmed(text)
            continue
        try:
            raw.value.decode(str(codec))
        except UnicodeDecodeError:
            problems.append(f"{keyword_for_tag(tag)} is not valid {terms[0]}: indexed with "
                            "replacement characters")
    return problems, as_utf8


def _trimmed(text: str) -> str:
    """A raw text value as ``_text`` gives a converted one: padding gone, values joined."""
    values = [value.strip(" \x00") for value in text.split("\\")]
    return "\\".join(values).strip()


def _warn_charset(problems: list[str], record: InstanceRecord) -> None:
    if not problems or record.study_uid in _warned_studies:
        return
    if len(_warned_studies) >= WARNED_STUDIES_REMEMBERED:
        _warned_studies.clear()
    _warned_studies.add(record.study_uid)
    log.warning("%s (study %s): %s; stored as received (logged once per study)",
                record.sop_instance_uid, record.study_uid, "; ".join(problems),
                extra={"SOP_INSTANCE_UID": record.sop_instance_uid,
                       "STUDY_UID": record.study_uid})


def instance_record(ds: Dataset, transfer_syntax_uid: str) -> InstanceRecord:
    """The index's view of ``ds``; raises :class:`InvalidInstance` naming what is missing.
    Text whose bytes do not fit the declared character set is indexed as pydicom reads it
    and logged (:func:`_charset_problems`)."""
    problems, as_utf8 = _charset_problems(ds)
    record = _instance_record(ds, transfer_syntax_uid)
    if as_utf8:
        record = dataclasses.replace(record, **as_utf8)
    _warn_charset(problems, record)
    return record


def _instance_record(ds: Dataset, transfer_syntax_uid: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        sop_class_uid=_uid(ds, "SOPClassUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID") or "",
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID") or "",
        patient_name=_text(ds, "PatientName"),
        birth_date=_index_date(_text(ds, "PatientBirthDate")),
        sex=_text(ds, "PatientSex"),
        study_date=_index_date(_text(ds, "StudyDate")),
        study_time=_index_time(_text(ds, "StudyTime")),
        accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician=_text(ds, "ReferringPhysicianName"),
        series_number=_int(ds, "SeriesNumber"),
        modality=_text(ds, "Modality"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined"),
        instance_number=_int(ds, "InstanceNumber"),
        rows=_unsigned(ds, "Rows"),
        columns=_unsigned(ds, "Columns"),
        bits_allocated=_unsigned(ds, "BitsAllocated"),
        number_of_frames=_int(ds, "NumberOfFrames"),
    )


# -- the same record from raw values (appliance/ingest/header.py), without pydicom elements --

# Character sets whose text decodes with one plain codec (PS3.5 6.1.2.3; no code extensions).
_SIMPLE_CHARSETS = {b"": "ascii", b"ISO_IR 6": "ascii", b"ISO_IR 100": "latin-1",
                    b"ISO_IR 192": "utf-8"}
_TEXT_TAGS = {
    "patient_id": 0x00100020, "issuer_of_patient_id": 0x00100021, "patient_name": 0x00100010,
    "birth_date": 0x00100030, "sex": 0x00100040, "study_date": 0x00080020,
    "study_time": 0x00080030, "accession_number": 0x00080050, "study_id": 0x00200010,
    "study_description": 0x00081030, "referring_physician": 0x00080090,
    "modality": 0x00080060, "series_description": 0x0008103E, "body_part": 0x00180015,
}
_UID_TAGS = {"sop_instance_uid": (0x00080018, "SOPInstanceUID"),
             "sop_class_uid": (0x00080016, "SOPClassUID"),
             "study_uid": (0x0020000D, "StudyInstanceUID"),
             "series_uid": (0x0020000E, "SeriesInstanceUID")}
_INT_TAGS = {"series_number": 0x00200011, "instance_number": 0x00200013,
             "number_of_frames": 0x00280008}
# The image geometry's US values (2 bytes, little endian: the walk reads no other order).
_US_TAGS = {"rows": 0x00280010, "columns": 0x00280011, "bits_allocated": 0x00280100}


# The VRs these elements have (None: implicit VR, pydicom's dictionary decides); any other,
# e.g. UN from an anonymiser, is left to pydicom's conversion.
_TEXT_VRS = {None, "AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
             "TM", "UC", "UI", "UT", "US"}


class _NotSimple(Exception):
    """A value pydicom should convert (multi-valued, a code extension, odd padding...)."""


def _plain(raw: bytes, codec: str) -> str | None:
    if b"\\" in raw or b"\x00" in raw.rstrip(b"\x00"):
        raise _NotSimple
    try:
        text = raw.rstrip(b"\x00").decode(codec).strip()
    except UnicodeDecodeError:
        raise _NotSimple from None
    return text or None


def _unsigned_short(element: RawDataElement | None) -> int | None:
    """A US value of one raw element, as pydicom converts it (None: absent or empty); one
    of another VR (an anonymiser's UN, or SS), or of several values, goes to pydicom."""
    if element is None or not element.value:
        return None
    if element.VR not in (None, "US") or len(element.value) != 2:
        raise _NotSimple
    return int.from_bytes(element.value, "little")


def record_from_raw(ds: Dataset, transfer_syntax_uid: str) -> InstanceRecord:
    """:func:`instance_record` for a dataset of raw elements (header.py): plain values are
    decoded here, which is what pydicom's conversion then ``_text`` give for them (tests
    compare both on every real file); anything else goes through :func:`instance_record`."""
    raw = {tag: element.value for tag, element in ds._dict.items()}
    codec = _SIMPLE_CHARSETS.get(raw.get(0x00080005, b"").strip())
    if codec is None or any(element.VR not in _TEXT_VRS for element in ds._dict.values()):
        return instance_record(ds, transfer_syntax_uid)
    try:
        values: dict[str, Any] = {}
        for name, (tag, keyword) in _UID_TAGS.items():
            value = _plain(raw[tag], "ascii") if tag in raw else None
            values[name] = _checked_uid(keyword, value)
        for name, tag in _TEXT_TAGS.items():
            values[name] = _plain(raw[tag], codec) if tag in raw else None
        for name, tag in _INT_TAGS.items():
            if tag in raw and ds._dict[tag].VR not in (None, "IS"):
                raise _NotSimple  # a writer's US or UL: its bytes are a number, not text
            text = _plain(raw[tag], "ascii") if tag in raw else None
            values[name] = int(text) if text is not None and text.isdigit() else None
            if text is not None and values[name] is None:
                raise _NotSimple
            if values[name] is not None and values[name] > IS_MAX:
                values[name] = None  # as _int: past the range of an IS, no value
        for name, tag in _US_TAGS.items():
            values[name] = _unsigned_short(ds._dict.get(tag))
    except _NotSimple:
        return instance_record(ds, transfer_syntax_uid)
    values["patient_id"] = values["patient_id"] or ""
    values["issuer_of_patient_id"] = values["issuer_of_patient_id"] or ""
    values["birth_date"] = _index_date(values["birth_date"])
    values["study_date"] = _index_date(values["study_date"])
    values["study_time"] = _index_time(values["study_time"])
    return InstanceRecord(transfer_syntax_uid=transfer_syntax_uid, **values)


# The Image Pixel elements pydicom's get_expected_length reads beyond the record's own.
_SAMPLES_PER_PIXEL, _PHOTOMETRIC, _NUMBER_OF_FRAMES = 0x00280002, 0x00280004, 0x00280008
# The record's geometry values and the VR each must have to be pydicom's value too: the
# record makes an int of a DS Rows (8.0) or NumberOfFrames (2.5), where pydicom's float
# makes the expected length no int, and the check is skipped.
_RECORD_GEOMETRY_VRS = {0x00280010: "US", 0x00280011: "US", 0x00280100: "US",
                        _NUMBER_OF_FRAMES: "IS"}


def pixel_geometry(ds: Dataset, record: InstanceRecord) -> SimpleNamespace | None:
    """What :func:`pydicom.pixels.utils.get_expected_length` reads of a raw header
    (header.py), decoded as pydicom would, or None when pydicom should convert them (a value
    absent, of another VR, or several values).

    Why: asked of the raw dataset itself, pydicom converts each of these elements through its
    generic path, 60-70 us per image on the C-STORE success path; Rows, Columns,
    BitsAllocated and NumberOfFrames are already in the record, decoded from the same bytes.
    """
    raw = ds._dict
    if record.rows is None or record.columns is None or record.bits_allocated is None:
        return None
    if _NUMBER_OF_FRAMES in raw and (record.number_of_frames is None
                                     or not isinstance(raw[_NUMBER_OF_FRAMES].value, bytes)):
        # Empty, not a number, past an IS, or not plain digits (converted by pydicom for the
        # record: "2.5" is 2 there, 2.5 to pydicom, and no int length): pydicom decides.
        return None
    if any(tag in raw and raw[tag].VR not in (None, vr)
           for tag, vr in _RECORD_GEOMETRY_VRS.items()):
        return None
    photometric = raw.get(_PHOTOMETRIC)
    if (photometric is None or photometric.VR not in (None, "CS")
            or not isinstance(photometric.value, bytes) or b"\\" in photometric.value):
        return None
    try:
        samples = _unsigned_short(raw.get(_SAMPLES_PER_PIXEL))
    except _NotSimple:
        return None
    # pydicom's reading of a CS value: Latin-1, trailing spaces and NULs trimmed, nothing
    # else (" YBR_FULL_422" is not YBR_FULL_422 to it, nor to its length check).
    interpretation = photometric.value.decode("latin-1").rstrip(" \x00")
    if samples is None or not interpretation:
        return None
    return SimpleNamespace(Rows=record.rows, Columns=record.columns, SamplesPerPixel=samples,
                           BitsAllocated=record.bits_allocated,
                           NumberOfFrames=record.number_of_frames or 1,
                           PhotometricInterpretation=interpretation)
