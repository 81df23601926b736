"""Q/R identifiers: a C-FIND/C-MOVE/C-GET request's identifier read into matching keys, and a
C-FIND answer's identifier built, in the viewer's own character set when it can hold the text.

Owns: the level, matching keys and asked-for elements of a request (:func:`identifier_keys`),
whether its level is one the model allows (:func:`level_problem`), the summary of it an audit
row names (:func:`request_summary`), its Specific Character Set (:func:`query_charset`), the
character set of an answer (:func:`response_charset`, PS3.4 C.4.1.1.3.2) and the answer itself
(:func:`response_identifier`). Split from ``qr.py``, which keeps the C-FIND handler and the
audit (the C-MOVE/C-GET handlers are ``qr_retrieve.py``'s, their associations
``qr_associations.py``'s). May not touch: SQL, the spool, associations or the network, the
audit: these are pure functions of datasets and values.
"""

from __future__ import annotations

from typing import Any

from pydicom.charset import custom_encoders, python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from appliance.store.query import LEVELS, available

_PATIENT_ROOT = {str(PatientRootQueryRetrieveInformationModelFind),
                 str(PatientRootQueryRetrieveInformationModelMove),
                 str(PatientRootQueryRetrieveInformationModelGet)}


def identifier_keys(identifier: Dataset) -> tuple[str, dict[str, str], list[DataElement]]:
    """(level, keyword -> matching value, the elements asked for, in order)."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    keys: dict[str, str] = {}
    asked: list[DataElement] = []
    for element in identifier:
        keyword = element.keyword
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or not keyword:
            continue
        asked.append(element)
        if element.VR == "SQ":
            continue
        value = element.value
        if value is None or value == "":
            keys[keyword] = ""
        elif isinstance(value, MultiValue | list):
            keys[keyword] = "\\".join(str(v) for v in value)
        else:
            keys[keyword] = str(value)
    return level, keys, asked


# Keys a C-FIND answer fills from PAS itself, whatever the request held.
_ANSWERED_BY_PAS = frozenset({"RetrieveAETitle", "InstanceAvailability"})


def unmatched_keys(level: str, keys: dict[str, str], asked: list[DataElement]) -> list[str]:
    """The keys of a request that hold a value (not universal matching: empty or ``*``) and
    that PAS does not match at ``level``: not in the index, of a level below the query's, or
    a sequence whose item holds a value (sequence matching, PS3.4 C.2.2.2.6, is not offered).
    They are ignored, so each answer is Pending 0xFF01 (PS3.4 C.4.1.1.4: "one or more
    Optional Keys were not supported for existence and/or matching"): answered 0xFF00, which
    says every key was applied, a viewer filtering on ``InstitutionName=ZZZ`` got every study
    of the cache as matching it."""
    unmatched = []
    for element in asked:
        keyword = element.keyword
        if keyword in _ANSWERED_BY_PAS:
            # Not a filter PAS applies: a value given (InstanceAvailability=OFFLINE) was
            # answered 0xFF00 with every study ONLINE, as if it had been matched.
            if str(element.value if element.value is not None else "").strip().replace(
                    "*", ""):
                unmatched.append(keyword)
            continue
        if element.VR == "SQ":
            if any(_holds_a_value(item) for item in element.value or []):
                unmatched.append(keyword)
        elif (keys.get(keyword) or "").strip().replace("*", "") and \
                not available(keyword, level):
            unmatched.append(keyword)
    return unmatched


def unnamed_keys(identifier: Dataset) -> list[str]:
    """Keys of a request that PAS knows no name for (private attributes, tags of no
    dictionary) and that hold a value: never matched, so each answer is Pending 0xFF01, as
    for :func:`unmatched_keys`. They were dropped unseen (0xFF00: as if applied). A private
    creator (gggg,0010-00FF) reserves a block and matches nothing: not one of them."""
    named = []
    for element in identifier:
        if element.keyword or (element.tag.is_private and element.tag.is_private_creator):
            continue
        value = element.value
        if element.VR == "SQ":
            given = any(_holds_a_value(item) for item in value or [])
        else:
            given = bool(str(value if value is not None else "").strip().replace("*", ""))
        if given:
            named.append(f"({element.tag.group:04X},{element.tag.element:04X})")
    return named


def _holds_a_value(item: Dataset) -> bool:
    """Whether a sequence item of a request asks for more than universal matching."""
    for element in item:
        if element.VR == "SQ":
            if any(_holds_a_value(nested) for nested in element.value or []):
                return True
        elif str(element.value if element.value is not None else "").strip().replace(
                "*", ""):
            return True
    return False


def level_problem(level: str, model: str) -> str | None:
    """What is wrong with a request's QueryRetrieveLevel under the information ``model`` (its
    SOP Class UID) it was sent in, or None when the level is one that model allows."""
    if not level:
        return "QueryRetrieveLevel missing: PATIENT, STUDY, SERIES or IMAGE"
    if level not in LEVELS:
        return f"QueryRetrieveLevel {level!r} is not PATIENT, STUDY, SERIES or IMAGE"
    if level == "PATIENT" and model not in _PATIENT_ROOT:
        return "QueryRetrieveLevel PATIENT is only valid in the Patient Root model"
    return None


def request_summary(level: str, keys: dict[str, str]) -> str:
    """What was asked, for the audit trail: the level and the non-empty matching keys."""
    parts = [f"{k}={v}" for k, v in keys.items() if v]
    return f"{level} {' '.join(parts)}"[:500]


# Terms of Specific Character Set meaning the default repertoire (ASCII) alone.
_ASCII_TERMS = {"", "ISO_IR 6", "ISO 2022 IR 6"}
UTF8 = "ISO_IR 192"


def query_charset(identifier: Dataset) -> list[str]:
    """The Specific Character Set of a request identifier, as a list of terms ([] if absent)."""
    value = identifier.get("SpecificCharacterSet")
    if value is None or value == "":
        return []
    values = value if isinstance(value, MultiValue | list) else [value]
    return [str(v).strip() for v in values]


def _encodes(char: str, codec: str) -> bool:
    try:
        encoder = custom_encoders.get(codec)
        if encoder is not None:
            encoder(char)
        else:
            char.encode(codec)
        return True
    except (UnicodeError, LookupError):
        return False


def response_charset(asked: list[str], texts: list[str]) -> str | list[str]:
    """The Specific Character Set of a response holding the non-ASCII ``texts``.

    PS3.4 C.4.1.1.3.2 lets the SCP answer in another character set than the request's, but a
    workstation that asked in ISO_IR 100 (or ISO 2022 IR 87...) may know no other, and shows
    UTF-8 bytes as mojibake ("HÃ©lÃ¨ne"). So: the request's own character set when every
    character of every value is in its repertoires (pydicom then encodes each value in it,
    escape sequences included); UTF-8 otherwise (a Japanese name for a Latin-1 viewer, a
    request without Specific Character Set, or one PAS does not know)."""
    if not asked or UTF8 in asked:
        return UTF8
    codecs = []
    for term in asked:
        if term in _ASCII_TERMS:
            continue  # value 1 empty: ASCII as G0; no other character comes from it
        codec = python_encoding.get(term)
        if codec is None:
            return UTF8
        codecs.append(codec)
    for text in texts:
        for char in set(text):
            if not char.isascii() and not any(_encodes(char, codec) for codec in codecs):
                return UTF8
    return asked[0] if len(asked) == 1 else asked


def response_identifier(level: str, asked: list[DataElement], values: dict[str, Any],
                        retrieve_ae: str, availability: str = "ONLINE",
                        charset: list[str] | None = None) -> Dataset:
    """Only the keys asked for, in the order asked, valued from the match (or empty);
    text beyond ASCII in the request's character set ``charset`` when it can hold it
    (:func:`response_charset`)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    non_ascii: list[str] = []
    for element in asked:
        value = values.get(element.keyword)
        if element.keyword == "RetrieveAETitle":
            value = retrieve_ae
        elif element.keyword == "InstanceAvailability":
            value = availability  # ONLINE here; NEARLINE: at the region, fetched on retrieve
        if element.VR == "SQ":
            ds.add(DataElement(element.tag, "SQ", []))
            continue
        if value is None or value == "":
            ds.add(DataElement(element.tag, element.VR, None))
            continue
        if isinstance(value, str) and not value.isascii():
            non_ascii.append(value)
        if isinstance(value, str) and "\\" in value:
            value = value.split("\\")
        ds.add(DataElement(element.tag, element.VR, value))
    if non_ascii:
        ds.SpecificCharacterSet = response_charset(charset or [], non_ascii)
    return ds
