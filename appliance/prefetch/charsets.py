"""The character set of an HL7 v2 message: MSH-18 read before the message is decoded.

Owns: HL7 table 0211's names and the Python codecs they map to. May not touch: anything
else (pure functions, read by the MLLP listener to decode a message and by the ACK to say
which set it answers in). Split from messages.py when it passed 600 lines.
"""

from __future__ import annotations

import codecs

# HL7 table 0211 (MSH-18) -> Python codec, for the character sets whose ASCII bytes are ASCII
# (MLLP framing and the MSH must read as such); a name outside it that Python knows as a text
# encoding (``UTF-8``, ``ISO-8859-1``, ``windows-1252``, as some engines write) is used too.
CHARSETS = {"ASCII": "ascii", "ISO IR6": "ascii", "UNICODE UTF-8": "utf-8",
            "ISO IR192": "utf-8", "ISO IR100": "iso8859-1", "GB 18030-2000": "gb18030",
            "KS X 1001": "euc-kr", "BIG-5": "big5",
            **{f"8859/{n}": f"iso8859-{n}" for n in (*range(1, 10), 15)}}


def message_encoding(block: bytes, default: str) -> tuple[str, str]:
    """The codec to read ``block`` with: its MSH-18 character set (first repetition), else
    ``default`` (``hl7.encoding``). Second item: the MSH-18 value when it names no character
    set this can read (``default`` is then used), for the caller to log.

    A RIS declaring ``8859/1`` had its ``É`` read as UTF-8, that is U+FFFD: a patient id
    stored wrong, and two ids differing by one accent made one request."""
    msh = block.lstrip(b"\r\n").split(b"\r", 1)[0].split(b"\n", 1)[0]
    if len(msh) < 8 or not msh.startswith(b"MSH"):
        return default, ""
    fields = msh.split(msh[3:4])
    if len(fields) < 18:
        return default, ""
    declared = fields[17].split(msh[5:6])[0].decode("ascii", "replace").strip()
    if not declared:
        return default, ""
    codec = charset_codec(declared)
    return (codec, "") if codec is not None else (default, declared)


def charset_codec(declared: str) -> str | None:
    """The codec of an MSH-18 character set, None for one not read (:func:`message_encoding`)."""
    codec = CHARSETS.get(declared.upper())
    if codec is None:
        try:
            "".encode(declared)  # a text encoding (not base64, rot13...)
            codec = codecs.lookup(declared).name
        except (LookupError, ValueError):
            return None
        if codec.startswith(("utf-16", "utf-32")):  # MLLP bytes and the MSH are not ASCII
            return None
    return codec
