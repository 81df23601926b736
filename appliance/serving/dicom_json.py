"""The DICOM JSON Model (PS3.18 Annex F) of a pydicom dataset, for QIDO-RS answers and
WADO-RS metadata. No HTTP, no SQL, no files: a dataset in, a dict out.

pydicom's ``Dataset.to_json_dict`` was used before, and three things it does are not the
Annex F model:

- A multi-valued attribute with an empty value (``DOE^JOHN\\``, ``1\\``, ``0.5\\``) raised
  (IndexError for PN, ValueError for IS and DS): the instance's metadata was a 500, and a
  QIDO-RS search listing a patient named so was cut mid-answer, every study after it lost:
  the whole study list of a viewer, for one name with a trailing backslash. F.2.5: an empty
  value of a multi-valued attribute is a JSON ``null`` (pydicom wrote ``""`` for CS, LO...,
  where Orthanc writes ``null``).
- Group Length attributes (gggg,0000), which F.2.2 says "shall not be included", were.
- A PN value's empty component groups were written (``"Alphabetic": ""``); F.2.2 encodes the
  non-empty ones only.

Attributes are written in ascending tag order (F.2.2), the callers' additions included
(:func:`dataset_json`'s ``extra``: metadata's BulkDataURIs and Transfer Syntax UID came last).
A value pydicom keeps as text where a number is due (an IS or DS that is not one) goes as the
JSON string F.2.3 allows for IS and DS, and a NaN or infinity (no JSON number) as null,
rather than failing the answer.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# VRs whose value goes as InlineBinary (or a BulkDataURI the caller makes).
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
INTEGER_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
FLOAT_VRS = frozenset({"DS", "FL", "FD"})
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def dataset_json(ds: Dataset, extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``ds`` as a DICOM JSON Model object: attributes in ascending tag order, no group
    lengths; ``extra`` (tag as 8 hex digits -> attribute object) merged into that order."""
    attributes: dict[str, dict[str, Any]] = dict(extra or {})
    tags = list(ds.keys())  # iterating ``ds`` itself would yield its elements
    for tag in tags:
        if tag.element == 0:  # Group Length (gggg,0000): never in the JSON model (F.2.2)
            continue
        attributes.setdefault(f"{int(tag):08X}", element_json(ds[tag]))
    return dict(sorted(attributes.items()))


def element_json(element: DataElement) -> dict[str, Any]:
    """One attribute object: its ``vr`` and its ``Value`` (none when empty, F.2.5), or its
    ``InlineBinary`` for a binary VR."""
    value = element.value
    vr = _resolved_vr(str(element.VR), value)
    attribute: dict[str, Any] = {"vr": vr}
    if vr == "SQ":
        if value:
            attribute["Value"] = [dataset_json(item) for item in value]
    elif vr in BINARY_VRS:
        if value:
            attribute["InlineBinary"] = base64.b64encode(bytes(value)).decode("ascii")
    elif not element.is_empty:
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        attribute["Value"] = [_json_value(v, vr) for v in values]
    return attribute


def _resolved_vr(vr: str, value: Any) -> str:
    """A VR pydicom left ambiguous ("US or SS", "OB or OW"): one the JSON model knows."""
    if " or " not in vr:
        return vr
    if vr == "US or SS":
        values = value if isinstance(value, MultiValue | list | tuple) else [value]
        return "SS" if any(isinstance(v, int) and v < 0 for v in values) else "US"
    return "OW" if "OW" in vr else "OB"


def _json_value(value: Any, vr: str) -> Any:
    """One value of a non-binary, non-sequence attribute; None (JSON null) when empty."""
    if value is None or (isinstance(value, str | PersonName) and str(value).strip() == ""):
        return None
    if vr == "PN":
        groups = str(value).split("=")
        return {name: group for name, group in zip(PN_GROUPS, groups, strict=False) if group}
    if vr == "AT":
        return f"{int(value):08X}"
    if vr in INTEGER_VRS or vr in FLOAT_VRS:
        return _number(value, vr)
    return str(value)


def _number(value: Any, vr: str) -> Any:
    """A JSON number; an IS or DS that is not one keeps its text (F.2.3 allows a string for
    IS and DS). A NaN or an infinity (FL, FD, DS) has no JSON form: null, as Orthanc writes
    a NaN (json.dumps refused it: the instance's metadata was a 500, "Out of range float
    values are not JSON compliant", and a series' metadata cut at that instance)."""
    try:
        number = int(value) if vr in INTEGER_VRS else float(value)
    except (TypeError, ValueError, OverflowError):
        return str(value).strip()
    if isinstance(number, float) and not math.isfinite(number):
        return None
    return number
