"""The character set of an HL7 v2 message: MSH-18 read before the message is decoded.

Owns: HL7 table 0211's names and the Python codecs they map to, which codecs can carry HL7
over MLLP, and the site's default set (``hl7.encoding``) while one message is read
(:func:`site_default`). May not touch: anything else (read by the MLLP listener to decode a
message, by the ACK to say which set it answers in, by the unescaping of ``\\Xhh\\``).
Split from messages.py when it passed 600 lines.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import functools
from collections.abc import Iterator

# HL7 table 0211 (MSH-18) -> Python codec, for the character sets whose ASCII bytes are ASCII
# (MLLP framing and the MSH must read as such); a name outside it that Python knows as a text
# encoding (``UTF-8``, ``ISO-8859-1``, ``windows-1252``, as some engines write) is used too,
# when it can carry HL7 (:func:`carries_hl7`).
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
    """The codec of an MSH-18 character set, None for one not read (:func:`message_encoding`):
    unknown, not a text encoding (base64, rot13), or one that cannot carry HL7
    (:func:`carries_hl7`)."""
    codec = CHARSETS.get(declared.upper())
    if codec is None:
        try:
            "".encode(declared)  # a text encoding (not base64, rot13...)
            codec = codecs.lookup(declared).name
        except (LookupError, ValueError):
            return None
    return codec if carries_hl7(codec) else None


# Every printable ASCII character and the segment ends: what MLLP's framing, the MSH and the
# ACK are written in; and an HL7 escape that a codec of escapes would read as another
# character (raw_unicode_escape).
_ASCII = bytes(range(0x20, 0x7F)) + b"\r\n\t\\u00e9\\"


@functools.lru_cache(maxsize=64)
def carries_hl7(codec: str) -> bool:
    """Whether ``codec`` can read and answer an HL7 message over MLLP: ASCII bytes read as
    the same ASCII text and written back as the same bytes (the framing, the delimiters, the
    ACK's MSH), and invalid bytes read, and characters it has not written, with
    ``errors="replace"`` (a value holding U+FFFD is then refused by name).

    Any Python text codec was taken before (until 2026-12-07): MSH-18 ``idna`` made the
    decode raise (no ACK, the connection dropped, no audit row), ``UTF-7`` sent the ACK as
    ``MSH|^+AH4AXA&|...``, ``cp037`` (EBCDIC) sent it in EBCDIC; UTF-16/32's bytes are not
    ASCII either."""
    try:
        text = _ASCII.decode(codec)
        if text != _ASCII.decode("ascii") or text.encode(codec) != _ASCII:
            return False
        b"MSH|\xff\xfe\x80\x81\xc3|".decode(codec, "replace")
        "MSH|\ufffd\u00e9\u4e2d\U0001f600|".encode(codec, "replace")
    except (UnicodeError, LookupError, ValueError, TypeError):
        return False
    return True


# ``hl7.encoding`` while one message is read (:func:`site_default`): the set a message whose
# MSH-18 is empty (or names none read) was decoded with, hence its ``\\Xhh\\`` escapes' too.
_SITE_DEFAULT: contextvars.ContextVar[str] = contextvars.ContextVar("hl7_site_default",
                                                                    default="utf-8")


@contextlib.contextmanager
def site_default(codec: str) -> Iterator[None]:
    """Within it, :func:`default_codec` is ``codec`` (this thread's, this call's)."""
    token = _SITE_DEFAULT.set(codec)
    try:
        yield
    finally:
        _SITE_DEFAULT.reset(token)


def default_codec() -> str:
    """The codec a message whose MSH-18 names no set read was decoded with: ``hl7.encoding``
    as :func:`site_default` set it, else UTF-8."""
    return _SITE_DEFAULT.get()
