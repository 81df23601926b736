"""The acknowledgements the MLLP listener answers: ACK (AA) and NAK (AE/AR, the reason in
MSA-3 and an ERR segment), built on the message's own MSH (its delimiters, escape
character, character set), and the MSH of a message refused before it is read whole.

Owns: the text of each answer. May not touch: the database or the network (the listener
sends the bytes), nor what a message means (:mod:`appliance.prefetch.messages`). Split from
messages.py (which had reached 600 lines) when the ACK learned the message's delimiters and
MSH-18.
"""

from __future__ import annotations

import datetime as dt

import hl7
from hl7.util import generate_message_control_id

from appliance.prefetch.charsets import charset_codec, message_encoding
from appliance.prefetch.messages import _field, _msh_field, bad_delimiters


def build_ack(message: hl7.Message | None, ack_code: str = "AA", text: str = "",
              error_code: str = "", control_id: str = "", application: str = "PAS") -> str:
    """An ACK (AA) or NAK (AE/AR) with the reason in MSA-3 and an ERR segment.

    Built by hand when the incoming message could not even be parsed (no MSH to echo).
    MSH-7 is local time with its offset (v2.5 DTM ``...SS+ZZZZ``): ``hl7``'s ``create_ack``
    wrote UTC with no offset, which HL7 reads as the sender's local time (an hour or two off
    in Europe)."""
    stamp = dt.datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z")
    own_id = generate_message_control_id()
    ack = None
    if message is not None:
        try:
            ack = message.create_ack(ack_code, message_id=own_id, application=application)
            ack.segment("MSH").assign_field(stamp, 7)
            charset = _msh_field(message, 18).split(message.separators[2])[0]
            if charset and charset_codec(charset) is not None:  # the ACK's, as encoded;
                ack.segment("MSH").assign_field(charset, 18)  # empty, HL7 reads ASCII
        except Exception:  # found by fuzzing: a malformed MSH makes hl7's create_ack raise
            ack = None
            control_id = control_id or field_or_empty(message, "MSH.F10")
    # MSA-3 and ERR in the delimiters of the ACK's MSH (the message's MSH-1/2): with |^ a
    # RIS using # read MSA-2 as "C42|duplicate message..." and matched no NAK to a message.
    delimiters = (*message.separators[1:5], message.esc or "\\") \
        if ack is not None and message is not None else ("|", "~", "^", "&", "\\")
    field, _, component, _, _ = delimiters
    clean = _escape(text, *delimiters)
    if ack is not None:
        result = str(ack).rstrip("\r")
        if text:
            result += f"{field}{clean}"  # MSA-3 text message
    else:
        result = (f"MSH|^~\\&|{application}||||{stamp}||ACK|{own_id}|P|2.5\r"
                  f"MSA|{ack_code}|{_escape(control_id, *delimiters)}|{clean}")
    if ack_code != "AA":
        f, c = field, component
        result += f"\rERR{f * 4}E" if not error_code else \
            f"\rERR{f * 3}{error_code}{c}{_error_name(error_code)}{c}HL70357{f}E{f * 4}{clean}"
    return result


# How much of a message that will not be read whole is searched for its MSH: a real MSH
# is a few hundred bytes; MSH-10 further than this is not echoed.
HEAD_BYTES = 4096


def leading_msh(head: bytes, default: str) -> tuple[hl7.Message | None, str]:
    """The MSH that begins ``head`` (the first bytes of a message refused before it is read:
    too large, unfinished, badly framed), parsed alone, and the codec to answer in
    (:func:`message_encoding`, ``default`` when MSH-18 is not there).

    None when ``head`` does not begin with an MSH holding all of MSH-10: a control id cut
    short would match another message of the RIS. Such NAKs had an empty MSA-2, which the
    RIS cannot match to the message it sent."""
    line = head[:HEAD_BYTES].lstrip(b"\r\n")
    whole = False
    for end in (b"\r", b"\n"):
        if end in line:
            line, whole = line.split(end, 1)[0], True
    if len(line) < 8 or not line.startswith(b"MSH"):
        return None, default
    fields = line.split(line[3:4])
    if not whole:
        fields = fields[:-1]  # the last field may go on past what was received
    if len(fields) < 10:  # MSH-10 is fields[9]: MSH-1 is the separator itself
        return None, default
    fields += [b""] * (12 - len(fields))  # hl7's create_ack needs MSH-11 and MSH-12
    line = line[3:4].join(fields)
    codec = message_encoding(line, default)[0]
    try:
        return hl7.parse(line.decode(codec, "replace")), codec
    except Exception:  # the hl7 package raises several types on broken input
        return None, default


def msh_alone(text: str) -> hl7.Message | None:
    """The MSH of a message refused before it was parsed whole (too many order groups, a
    second OBR in a group, a segment too complex), parsed alone, for the NAK to mirror it:
    those NAKs were built by hand, MSH-3 to MSH-6 empty, MSH-11 ``P`` and MSH-12 ``2.5``
    whatever the message said, which an engine routing answers by MSH-5/6 misfiled. None
    when the text does not begin with an MSH holding MSH-10."""
    line = text.lstrip("\r\n").replace("\n", "\r").split("\r", 1)[0]
    if len(line) < 8 or not line.startswith("MSH"):
        return None
    fields = line.split(line[3])
    if len(fields) < 10 or bad_delimiters(line[3] + fields[1][:4]):  # answered by hand
        return None
    fields += [""] * (12 - len(fields))  # hl7's create_ack needs MSH-11 and MSH-12
    try:
        return hl7.parse(line[3].join(fields))
    except Exception:  # the hl7 package raises several types on broken input
        return None


def field_or_empty(message: hl7.Message, path: str) -> str:
    try:
        return _field(message, path)
    except Exception:  # the same malformed message may break the field accessor too
        return ""


def _error_name(code: str) -> str:
    return {"100": "Segment sequence error", "101": "Required field missing",
            "102": "Data type error", "200": "Unsupported message type",
            "202": "Unsupported processing id",
            "207": "Application internal error"}.get(code, "Error")


def _escape(text: str, field: str = "|", repetition: str = "~", component: str = "^",
            subcomponent: str = "&", escape: str = "\\") -> str:
    """HL7 escape sequences for the delimiters (the message's own: MSH-1 and MSH-2), so
    that a reason never breaks the ACK. The escape character goes first: the sequences
    written after it are made of it."""
    text = text.replace(escape, f"{escape}E{escape}")
    for character, letter in ((field, "F"), (component, "S"), (subcomponent, "T"),
                              (repetition, "R")):
        text = text.replace(character, f"{escape}{letter}{escape}")
    return text.replace("\r", " ").replace("\n", " ")
