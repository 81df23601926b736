"""A C-FIND's answers: each match's identifier encoded straight from its values, byte for
byte what pydicom writes for :func:`~appliance.serving.qr_identifiers.response_identifier`'s
Dataset, and sent to the viewer.

Owns: the bytes of each Pending response's identifier (:class:`IdentifierEncoder`) and how
it leaves (:func:`answerer`: written to the socket by ``appliance/dicomnet/direct_find.py``,
or yielded for pynetdicom). May not touch: which keys are answered and with what values
(``qr_identifiers.py`` says, and stays the reference), SQL, the audit (``qr.py``).

Why: building that Dataset (``DataElement`` conversion and validation per value) and having
pydicom write it (a buffer, a writer lookup and a character set conversion per element)
cost ~0.25 ms per match of an IMAGE-level C-FIND, most of what PAS spends per match once the
DIMSE path is direct. A query's answers all have the same elements in the same order; only
the values change. So the tags, VRs and length fields' layout are worked out once per query,
and a match is its values padded and joined.

Only what is written the same by both ways goes the short way: little endian (implicit or
explicit VR), string VRs whose ASCII text pydicom writes as it is (padded to even length:
NUL for UI, a space otherwise; not a PN with component groups, whose trailing empty groups
pydicom drops), IS from an integer, US from an integer in its range (two bytes, little
endian: an image's Rows, Columns, BitsAllocated), empty sequences. A match with any other
value (text beyond ASCII: its character set is chosen per match; an IS given as text; a
value too long for its length field) and a query with any other VR or syntax are encoded by
pydicom as before. tests/test_serving_qr_answers.py compares the two on generated values.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom.dsutils import encode

from appliance.dicomnet.direct_find import DirectFindError, DirectFindResponder
from appliance.dicomnet.outgoing import wait_for_room
from appliance.serving.qr_identifiers import response_identifier

# String VRs pydicom writes as their text (ASCII: the default repertoire, no conversion).
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                      "UI", "UR", "UT"})
IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_QUERY_RETRIEVE_LEVEL = 0x00080052
_SHORT_LENGTH_MAX = 0xFFFF
_US = struct.Struct("<H")
PENDING = 0xFF00
# Pending, "one or more Optional Keys were not supported for existence and/or matching for
# this Identifier" (PS3.4 C.4.1.1.4): a query with keys PAS ignored (qr_identifiers.py).
PENDING_UNMATCHED = 0xFF01
UNABLE_TO_ENCODE = 0xC312  # pynetdicom's status for an identifier that does not encode


class IdentifierEncoder:
    """Encodes the identifiers of one C-FIND's answers in the context's transfer syntax."""

    def __init__(self, level: str, asked: list[DataElement], retrieve_ae: str,
                 charset: list[str], transfer_syntax: str):
        self.level = level
        self.asked = asked
        self.retrieve_ae = retrieve_ae
        self.charset = charset
        self.syntax = UID(transfer_syntax)
        self.implicit = transfer_syntax == IMPLICIT_LE
        # (header before the length, keyword, VR, explicit 32-bit length) in tag order,
        # as pydicom writes a dataset; None: this query goes pydicom's way.
        self.layout: list[tuple[bytes, str, str, bool]] | None = None
        if transfer_syntax in (IMPLICIT_LE, EXPLICIT_LE):
            self.layout = self._layout()

    def _layout(self) -> list[tuple[bytes, str, str, bool]] | None:
        elements = [(_QUERY_RETRIEVE_LEVEL, "QueryRetrieveLevel", "CS")]
        for element in self.asked:
            if element.VR not in TEXT_VRS and element.VR not in ("IS", "US", "SQ"):
                return None
            if element.tag < 0x00080000 or element.tag == _QUERY_RETRIEVE_LEVEL:
                return None  # command or meta groups, or a duplicate: pydicom's business
            elements.append((int(element.tag), element.keyword, element.VR))
        if len({tag for tag, _, _ in elements}) != len(elements):
            return None
        layout = []
        for tag, keyword, vr in sorted(elements):
            header = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
            long_length = self.implicit or vr in EXPLICIT_VR_LENGTH_32
            if not self.implicit:
                header += vr.encode("ascii") + (b"\0\0" if long_length else b"")
            layout.append((header, keyword, vr, long_length))
        return layout

    def encode(self, values: dict[str, Any], availability: str = "ONLINE") -> bytes:
        """The identifier of one match; empty bytes if it cannot be encoded (pynetdicom's
        sign for that: the answer is then a failure, 0xC312)."""
        if self.layout is not None:
            fast = self._encode_fast(values, availability)
            if fast is not None:
                return fast
        dataset = response_identifier(self.level, self.asked, values, self.retrieve_ae,
                                      availability=availability, charset=self.charset)
        encoded = encode(dataset, self.syntax.is_implicit_VR, self.syntax.is_little_endian,
                         self.syntax.is_deflated)
        return encoded or b""

    def _encode_fast(self, values: dict[str, Any], availability: str) -> bytes | None:
        assert self.layout is not None
        parts: list[bytes] = []
        for header, keyword, vr, long_length in self.layout:
            if keyword == "QueryRetrieveLevel":
                value: Any = self.level
            elif keyword == "RetrieveAETitle":
                value = self.retrieve_ae
            elif keyword == "InstanceAvailability":
                value = availability
            else:
                value = values.get(keyword)
            if vr == "SQ" or value is None or value == "":
                raw = b""  # an empty sequence is written with length 0, as an empty value
            elif isinstance(value, str) and vr in TEXT_VRS and value.isascii():
                if vr == "UI" and ("\\" in value or value != value.strip()):
                    return None  # pydicom's UID strips each value's surrounding whitespace
                if vr == "PN" and "=" in value:
                    return None  # pydicom's PersonName drops trailing empty groups ("A^B=")
                raw = value.encode("ascii")
            elif type(value) is int and vr == "IS":
                raw = str(value).encode("ascii")
            elif type(value) is int and vr == "US" and 0 <= value <= 0xFFFF:
                raw = _US.pack(value)
            else:
                return None
            if len(raw) % 2:
                raw += b"\0" if vr == "UI" else b" "
            if long_length:
                parts.append(header + struct.pack("<I", len(raw)))
            elif len(raw) < _SHORT_LENGTH_MAX:
                parts.append(header + struct.pack("<H", len(raw)))
            else:
                return None  # pydicom writes it as UN, with a warning
            parts.append(raw)
        return b"".join(parts)


# How one C-FIND match is answered: (values, InstanceAvailability) -> a generator that
# yields what pynetdicom must send, if anything, and returns False once the association ended.
Answerer = Callable[[dict[str, Any], str], Generator[tuple[int, Any], None, bool]]


def answerer(event: Any, encoder: IdentifierEncoder, status: int = PENDING) -> Answerer:
    """Each match written straight to the socket (direct_find.py: its bytes are what
    pynetdicom would send), or, on an association without the event-driven loops, yielded
    for pynetdicom to send once the DUL has room: it queues each answer at once, and a viewer
    reading slowly had them all held in memory (0.7 kB each). An identifier that does not
    encode is a failure, 0xC312, as pynetdicom answers it. ``status``: each answer's Pending
    status (0xFF01 when keys of the request were not matched)."""
    responder = DirectFindResponder.for_event(event, status)

    def direct(values: dict[str, Any], availability: str
               ) -> Generator[tuple[int, Any], None, bool]:
        assert responder is not None
        identifier = encoder.encode(values, availability)
        if not identifier:
            yield UNABLE_TO_ENCODE, None
            return False
        try:
            responder.send(identifier)
        except DirectFindError:
            return False
        return True

    def queued(values: dict[str, Any], availability: str
               ) -> Generator[tuple[int, Any], None, bool]:
        if not wait_for_room(event.assoc):
            return False
        yield status, response_identifier(encoder.level, encoder.asked, values,
                                           encoder.retrieve_ae, availability=availability,
                                           charset=encoder.charset)
        return True

    return queued if responder is None else direct
