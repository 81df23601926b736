"""HL7 v2 messages from the RIS: what they ask for.

Owns: turning an HL7 v2 message (parsed by the ``hl7`` package) into a :class:`PrefetchOrder`
or a :class:`Refusal` that names the problem (the ACK / NAK answering it is built in
:mod:`appliance.prefetch.acks`). May not touch: the database or the network; the listener
does that.

Which fields are read, and why (HL7 v2.5 positions):
- every message: MSH-9 type, MSH-10 control id, PID-3 patient identifier (CX: ID^^^issuer;
  the repetition of an issuer in ``prefetch.issuer_map``, else the first).
- ORM^O01: ORC-1 order control (CA/DC/OC/OD/CR/DR, or SC with ORC-5 CA/DC: cancel),
  ORC-2/ORC-3 placer/filler order number (the dedup key), OBR-18 accession (else ORC-3/2,
  only while none is known), OBR-24 modality, OBR-15 body site, OBR-27.4 / ORC-7.4 /
  OBR-36 / OBR-7 the time of the exam.
- OMI^O23: the same ORC/OBR, TQ1-7 start time, IPC-1 accession, IPC-2 requested procedure
  ID, IPC-5 modality.
- OMG^O19 (general clinical order, v2.5+): read as OMI without its IPC. It was refused (AR
  200): a RIS sending it had no prefetch at all.
- Each order group's requested procedure (:func:`_procedure`) tells apart the groups of one
  order number (IHE SWF); merged, the second procedure's priors were never fetched.
- ORM/OMI/OMG with several order groups (ORC, then its OBR, TQ1, IPC): each group is an order of
  its own, read as above from its own segments (:func:`order_groups`); one bad group refuses
  the whole message, naming the group. Read first-only, the second procedure of a CT thorax +
  CT abdomen order was never prefetched, nor could it be cancelled.
- SIU^S12/S13/S14: SCH-1/SCH-2 appointment ids (dedup key), SCH-11.4 or AIS-4 start time;
  S15/S17 (cancelled, deleted) cancel that appointment's request.
- ADT^A04/A08: PV1-19 visit number (dedup key: A04 then A08 of one visit is one request);
  an A08 updates the request of a visit an A04 registered and makes none (a hospital's ADT
  feed sends one for every change of any patient's record: each made a request, and the
  priors of every inpatient whose address changed crossed the WAN); A11 (cancel admit /
  visit) cancels it. The ADT events not read here (A01, A03, A31...) are ACKed AA, nothing
  done (:class:`NotUsed`): a feed sends them all, and NAKed, an interface engine holds its
  queue and alarms on each.
- MSH-11 processing id: only those of ``hl7.processing_ids`` (production, ``P``, by
  default) are acted on (:func:`refuse_other_processing`); a training or test message
  fetched a real patient's priors.
- ADT^A40/A34/A36/A18 (merge patient): PID-3 the surviving patient, MRG-1 the prior one
  (read by :mod:`appliance.prefetch.merges`, each PID with its MRG); A47 (change patient
  identifier list: MRG-1 the wrong identifier, PID-3 the right one) read the same way.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import hl7

from appliance.prefetch.charsets import default_codec, message_encoding
from appliance.prefetch.identifiers import identifier_problem
from appliance.store.prefetch import request_key

SUPPORTED = {("ORM", "O01"), ("OMI", "O23"), ("OMG", "O19"), ("SIU", "S12"), ("SIU", "S13"),
             ("SIU", "S14"), ("SIU", "S15"), ("SIU", "S17"), ("ADT", "A04"), ("ADT", "A08"),
             ("ADT", "A11"), ("ADT", "A40"), ("ADT", "A34"), ("ADT", "A36"), ("ADT", "A18"),
             ("ADT", "A47")}
# ADT events that merge a prior patient (MRG-1) into the PID-3 one: A40 (v2.3.1+, patient
# identifier list), A34 / A36 (patient id only / with the account) and A18 (v2.2 and
# before) say the same for the prefetch. Refused (AR 200) before: a John Doe's pending
# orders searched the region for the temporary id, and no prior of the real patient came.
# A47 (change patient identifier list: one identifier of the same patient was wrong, MRG-1,
# and is now PID-3's) is not a merge of two patients, but for the prefetch it does what one
# does: the requests of the old identifier are the new one's. Refused (AR 200) before, they
# kept searching the region for an identifier that no longer exists.
MERGE_EVENTS = {"A40", "A34", "A36", "A18", "A47"}
# SIU events that end an appointment (cancelled, deleted); S13 (rescheduled) moves it as S14.
# Refused (AR 200) before: a RIS's reschedules and cancels rejected, the priors fetched.
SIU_CANCELS = {"S15", "S17"}
# The order messages: one order per ORC group (:func:`order_groups`). OMG^O19 has OMI's
# ORC / TQ1 / OBR order group without the IPC segment.
ORDER_KINDS = ("ORM", "OMI", "OMG")
# ORC-1 order controls that end an order: cancel / discontinue requests, and the filler's
# "cancelled / discontinued as requested" answers.
CANCEL_CONTROLS = {"CA", "DC", "OC", "OD", "CR", "DR"}
# ORC-1 ``SC`` (status changed) with one of these ORC-5 order statuses ends it too: a RIS
# sends it after (or instead of) CA, and taken as a new order it revived the cancelled request.
CANCELLED_STATUSES = {"CA", "DC"}


@dataclass(frozen=True)
class PrefetchOrder:
    """What a message asks the prefetch to do."""

    message_key: str            # MSH-3|MSH-4|MSH-10, each whole (every component)
    message_type: str           # e.g. ORM^O01
    control_id: str
    dedup_key: str
    patient_id: str
    issuer: str
    accession_number: str | None
    modality: str | None
    body_part: str | None
    scheduled_at: float | None  # seconds since the epoch
    cancel: bool = False
    # Which requested procedure of the order (orders only): (accession, requested procedure
    # ID) as the group gives them, '' for one it does not give.
    procedure: tuple[str, str] = ("", "")
    update_only: bool = False   # ADT^A08: changes the visit's request, never makes one


@dataclass
class NotUsed(Exception):
    """An ADT event the prefetch does not read (A01 admit, A03 discharge, A31 person
    update...): ACKed AA with this reason, nothing done or recorded."""

    message_type: str
    control_id: str

    def __str__(self) -> str:
        return f"{self.message_type}: not used by PAS's prefetch, nothing done"


@dataclass(frozen=True)
class Refusal(Exception):
    """Why a message is refused: MSA-1 code (AE or AR), HL7 table 0357 error code, text."""

    ack_code: str
    error_code: str
    reason: str
    message_type: str = ""
    control_id: str = ""

    def __str__(self) -> str:
        return self.reason

    def of_part(self, part: str) -> Refusal:
        """The same refusal, its reason naming the ``part`` of a message of several (an
        order group, a merged patient) that it is about."""
        return Refusal(self.ack_code, self.error_code, f"{part}: {self.reason}")


def _field(message: hl7.Message, path: str) -> str:
    """``message["PID.F3.R1.C1"]`` that answers '' for anything absent, its escape sequences
    read by :func:`_unescape` (:class:`Refusal` for one that cannot be read).

    Outside the MSH, the leaf is found here as ``hl7`` finds it (the first child down to a
    leaf; '' when the path goes on past one) but taken raw: ``hl7`` unescapes on its own
    terms, which stored ``AB\\CD`` (a backslash not escaped) as ``AB``, ``\\Xzz\\`` as
    nothing and ``\\H\\`` as ``_``."""
    name, *steps = path.split(".")
    if name == "MSH":
        try:
            value = message[path]
        except (KeyError, IndexError, ValueError, TypeError):
            return ""
        return str(value).strip() if value is not None else ""
    try:
        segment = message.segment(name)
    except KeyError:
        return ""
    indexes = {step[0]: int(step[1:]) for step in steps}
    if indexes["F"] >= len(segment):
        return ""
    node: Any = segment[indexes["F"]]
    for level in "RCS":
        index = indexes.get(level, 1)
        if isinstance(node, str):
            if index != 1:
                return ""
            break
        node = node[index - 1] if index <= len(node) else ""
    while not isinstance(node, str):
        node = node[0] if len(node) else ""
    try:
        return _unescape(message, node).strip()
    except ValueError as exc:
        label = f"{name}-{indexes['F']}" + (f".{indexes['C']}" if indexes.get("C", 1) > 1
                                            else "")
        raise Refusal("AE", "102", f"{label} '{node}': {exc}") from None


def _unescape(message: hl7.Message, raw: str) -> str:
    """HL7 escape sequences of an identifier or code (v2.5 section 2.7): the delimiters
    (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``), bytes in hex (``\\X41\\``, in the message's character
    set: MSH-18's, else ``hl7.encoding``, :func:`~appliance.prefetch.charsets.site_default`;
    it was UTF-8); highlighting (``\\H\\ \\N\\``) dropped. Anything else, an escape character
    not closed included, is a :class:`ValueError` naming it: guessed, two identifiers would
    become one."""
    escape = message.esc
    if not escape or escape not in raw:
        return raw
    parts = raw.split(escape)
    if len(parts) % 2 == 0:
        raise ValueError(f"the escape character '{escape}' opens a sequence it never closes "
                         f"(a literal '{escape}' is written {escape}E{escape})")
    delimiters = {"F": message.separators[1], "R": message.separators[2],
                  "S": message.separators[3], "T": message.separators[4], "E": escape}
    text = []
    for position, part in enumerate(parts):
        if position % 2 == 0:
            text.append(part)
        elif part in delimiters:
            text.append(delimiters[part])
        elif part in ("H", "N"):
            continue
        elif re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", part):
            codec = message_encoding(str(message.segment("MSH")).encode("ascii", "replace"),
                                     default_codec())[0]
            try:
                text.append(bytes.fromhex(part[1:]).decode(codec))
            except UnicodeDecodeError:
                raise ValueError(f"{escape}{part}{escape}: not {codec} bytes") from None
        else:
            raise ValueError(f"escape sequence {escape}{part}{escape} is not one an "
                             f"identifier may hold (F S T R E X.. H N)")
    return "".join(text)


def _msh_field(message: hl7.Message, number: int) -> str:
    """MSH-``number`` whole, every component: what names a message (MSH-3/4 are HD
    ``namespace^universal id^type``, MSH-10 may carry components). ``message["MSH.F10"]``
    answers component 1 only, which took ``Z^1`` and ``Z^2`` for the same message."""
    try:
        return str(message.segment("MSH")[number]).strip()
    except (KeyError, IndexError, ValueError, TypeError):
        return ""


def _segment_present(message: hl7.Message, name: str) -> bool:
    try:
        message.segment(name)
        return True
    except KeyError:
        return False


_DTM = re.compile(r"(\d{8}(?:\d{2}){0,3})(?:\.\d{1,4})?(?:([+-])(\d{2})(\d{2}))?")


def parse_hl7_time(value: str) -> float | None:
    """HL7 v2 TS/DTM ``YYYYMMDD[HH[MM[SS[.S[S[S[S]]]]]]][+/-ZZZZ]`` -> epoch seconds (local
    time when no zone is given, as RIS messages usually are).

    At least a day is needed to schedule an exam. Anything else is refused with the whole
    value quoted, ISO 8601 (``2099-12-31``) included: HL7 v2 has no separators, and guessing
    would hide a misconfigured interface whose other fields may be just as wrong."""
    original = value
    value = value.strip()
    if not value:
        return None
    match = _DTM.fullmatch(value)
    if match is None:
        raise ValueError(f"not an HL7 date/time: {original!r} (expected "
                         "YYYYMMDD[HH[MM[SS[.S]]]][+/-ZZZZ])")
    digits, sign, hours, minutes = match.groups()
    formats = {14: "%Y%m%d%H%M%S", 12: "%Y%m%d%H%M", 10: "%Y%m%d%H", 8: "%Y%m%d"}
    try:
        moment = dt.datetime.strptime(digits, formats[len(digits)])
    except ValueError:
        raise ValueError(f"not an HL7 date/time: {original!r} (no such date or time)") \
            from None
    if sign is not None and (int(hours) >= 24 or int(minutes) >= 60):
        # dt.timezone's own ValueError reached the NAK ("offset must be a timedelta strictly
        # between..."), and minutes of 60 or more (+0199) were read as more hours.
        raise ValueError(f"not an HL7 date/time: {original!r} (the offset {sign}{hours}{minutes} "
                         "must be under 24 hours, its minutes under 60)")
    try:
        if sign is not None:
            offset = int(hours) * 60 + int(minutes)
            zone = dt.timezone(dt.timedelta(minutes=offset if sign == "+" else -offset))
            return moment.replace(tzinfo=zone).timestamp()
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        # Python's words for it ("year 0 is out of range" of a value in year 1, the local
        # zone applied) named neither the value nor the field's problem.
        raise ValueError(f"not an HL7 date/time: {original!r} (out of the range of dates "
                         "this system can hold)") from None


def _time(message: hl7.Message, *paths: str) -> float | None:
    for path in paths:
        raw = _field(message, path)
        if raw:
            try:
                return parse_hl7_time(raw)
            except ValueError as exc:  # the field named (it said "OBR:", of 50 fields)
                raise Refusal("AE", "102", f"{_field_label(path)}: {exc}") from None
    return None


def _field_label(path: str) -> str:
    """``OBR.F27.R1.C4`` -> ``OBR-27.4``, ``PV1.F44`` -> ``PV1-44``: a field as HL7 names it."""
    name, *steps = path.split(".")
    indexes = {step[0]: step[1:] for step in steps}
    component = f".{indexes['C']}" if indexes.get("C", "1") != "1" else ""
    return f"{name}-{indexes['F']}{component}"


# The segments :func:`interpret` reads. Of these, the first only (``message.segment``
# answers the first); each ORC opens an order group, and of :data:`GROUP_SEGMENTS` the first
# in each group is kept. The others (NTE, OBX, AL1, Z-segments...) are dropped before parsing,
# since the ``hl7`` package builds a Python object per field, repetition and component: one
# 1 MB message of ``~`` cost 4.6 s and 450 MB, six at once 2.7 GB (invariant 8).
READ_SEGMENTS = ("MSH", "PID", "SCH", "AIS", "PV1", "MRG")
GROUP_SEGMENTS = ("OBR", "TQ1", "IPC")
# Segments that only begin a message, a batch or a file: one after the first segment is a
# second message in the same MLLP frame. Read as one, the second message's orders were filed
# under the first one's patient (its PID dropped as a second PID), and it was never ACKed.
FRAME_SEGMENTS = {"MSH": "message header", "BHS": "batch header", "BTS": "batch trailer",
                  "FHS": "file header", "FTS": "file trailer"}
# Message types whose patient group may repeat (SIU: the patients of one appointment, the
# first read); in the other types read, outside a merge, a second PID is refused: the orders
# after it were filed under the first PID's patient.
SEVERAL_PATIENTS = ("SIU",)
# Delimiters allowed in the segments kept: a real order carries a few hundred; 20,000 cost
# about 0.1 s and 10 MB to parse.
MAX_DELIMITERS = 20_000
# Order groups (ORC segments) one ORM/OMI/OMG may carry: a real one holds a few procedures; more
# is refused (split them over several messages) rather than read half.
MAX_GROUPS = 50


def parse_message(text: str) -> hl7.Message:
    """Parse, refusing what is not an HL7 v2 message with a reason.

    Only the segments read are parsed (:data:`READ_SEGMENTS`, and the ORC groups), at most
    :data:`MAX_GROUPS` groups, holding at most :data:`MAX_DELIMITERS` delimiters together
    (a NAK naming the segment otherwise): what parsing costs is bounded whatever the message
    carries besides."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH"):
        raise Refusal("AR", "100", "not an HL7 v2 message: it does not start with an MSH "
                      "segment")
    if len(text) < 8:
        raise Refusal("AR", "100", "MSH segment too short to carry its encoding characters")
    # MSH-1 and the four encoding characters of MSH-2 split every segment, its name too: a
    # letter there (the fuzzer's "MSH|^~\\MSH&") cut "MRG" into pieces that the merge
    # reading found by its text and the hl7 package then did not (a KeyError, answered as
    # an internal error). HL7 v2 (2.5.4) has them printable and neither letters nor digits.
    delimiters = text[3] + text[4:].split(text[3], 1)[0][:4]
    bad = bad_delimiters(delimiters)
    if bad:
        raise Refusal("AR", "100", f"MSH-1/MSH-2 delimiters {delimiters!r}: {bad[0]!r} cannot "
                      "be one (a delimiter is a printable character, not a letter, digit or "
                      "space)")
    text = _segments_read(text)
    try:
        return hl7.parse(text)
    except Exception as exc:  # the hl7 package raises several types on broken input
        raise Refusal("AR", "100", f"cannot parse the HL7 message: {exc}") from None


def refuse_other_processing(message: hl7.Message, accepted: Collection[str]) -> None:
    """:class:`Refusal` (AR 202, HL7 table 0357 "Unsupported processing id") of a message
    whose MSH-11 processing id (its first component: P production, T training, D debugging)
    is not one of ``accepted`` (``hl7.processing_ids``). A test or training message from a
    RIS's test system on the production feed made a request like any order, and fetched a
    real patient's priors from the region. An empty MSH-11 (older senders) is taken as
    production."""
    processing = _field(message, "MSH.F11.R1.C1").upper() or "P"
    if processing not in {value.upper() for value in accepted}:
        kind = _field(message, "MSH.F9.R1.C1").upper()
        event = _field(message, "MSH.F9.R1.C2").upper()
        raise Refusal("AR", "202", f"processing id {processing} (MSH-11): this PAS acts on "
                      f"{', '.join(sorted(accepted))} only (hl7.processing_ids); a test or "
                      "training message must not fetch a patient's priors",
                      f"{kind}^{event}", _msh_field(message, 10))


def bad_delimiters(delimiters: str) -> list[str]:
    """Those of MSH-1 and MSH-2's characters that cannot be delimiters (HL7 v2 2.5.4: they
    are printable, neither letters nor digits nor spaces)."""
    return [c for c in delimiters if c.isalnum() or c.isspace() or not c.isprintable()]


def _segments_read(text: str) -> str:
    """The segments of ``text`` that are read, in their order: the first MSH, PID, SCH...
    (:data:`READ_SEGMENTS`), every ORC and the first OBR, TQ1 and IPC after each (those
    before the first ORC are kept as well: a message of one order may put them first).

    Refused here, before anything is parsed: a second MSH, or a BHS/BTS/FHS/FTS, after the
    first segment (AR: two messages in one frame, :data:`FRAME_SEGMENTS`); a second PID but
    in a merge or an SIU (AE: whose orders would be a guess); more than :data:`MAX_GROUPS` ORC
    (AR); an ORC group holding a second OBR (AE: a procedure with no ORC of its own, so no
    order number or order control of its own); too many delimiters (AR)."""
    separator = text[3]
    encoding_characters = text[4:8].split(separator, 1)[0]  # MSH-2: ^~\& or fewer
    delimiters = {separator, *encoding_characters[:2], *encoding_characters[3:]}
    msh = text.split("\r", 1)[0].split(separator, 10)[8:10] + ["", ""]  # MSH-9, MSH-10
    component, repetition = (encoding_characters + "^~")[:2]
    kind, _, event = msh[0].split(repetition, 1)[0].partition(component)
    kind, event = kind.strip().upper(), event.split(component, 1)[0].strip().upper()
    grouped = kind in ORDER_KINDS  # other types: the first ORC, OBR... only, as read
    # A merge may name several patients (A40: {PID, MRG} repeated): each PID and MRG kept.
    merging = kind == "ADT" and event in MERGE_EVENTS
    # The types read whose structure holds one PID (ADT events not read stay ACKed AA).
    one_patient = (kind, event) in SUPPORTED and not merging and kind not in SEVERAL_PATIENTS
    # OMG^O19: an order group may end with a PRIOR_RESULT group, opened by the prior's own
    # PID (PATIENT_PRIOR) and holding its own ORC/OBR (ORDER_PRIOR): results, not orders.
    # Its ORC cannot be told from a next order's, so from that PID on nothing is read: the
    # orders before it are (refused as "a second PID" since d7d5f15; before that its ORC
    # was filed as an order).
    prior_results = kind == "OMG"
    reading = True
    patients = 0
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()   # READ_SEGMENTS (and ORC when not grouped) already kept
    in_group: set[str] = set()  # GROUP_SEGMENTS already kept since the last ORC
    groups = 0
    number = 0  # of the segment, counting from the MSH, as a reader of the message would
    for segment in text.split("\r"):
        name = segment.split(separator, 1)[0]
        number += bool(segment)
        if number > 1 and name in FRAME_SEGMENTS:
            what = "a second MSH" if name == "MSH" else f"{name}, a {FRAME_SEGMENTS[name]}"
            raise Refusal("AR", "100", f"segment {number} is {what}: one message per MLLP "
                          "frame (HL7 batches, BHS/FHS, are not read; send each message in "
                          "a frame of its own)", msh[0], msh[1])
        if name == "PID" and prior_results and groups:
            prior_results = False
            reading = False
        if not reading:  # a prior result group's segments, to the end (frame checks above)
            continue
        if name == "PID" and "PID" in seen and one_patient:
            raise Refusal("AE", "100", f"segment {number} is a second PID: an {kind} message "
                          "names one patient (what follows it would be filed under the first "
                          "PID's)", msh[0], msh[1])
        if name == "ORC" and not grouped:
            if name not in seen:
                seen.add(name)
                kept.append((name, segment))
        elif name == "ORC":
            groups += 1
            if groups > MAX_GROUPS:
                raise Refusal("AR", "100", f"too many orders in one message: more than "
                              f"{MAX_GROUPS} ORC segments (at most {MAX_GROUPS} order groups "
                              "are read; send the others in another message)", msh[0], msh[1])
            in_group = set()
            kept.append((f"ORC #{groups}" if groups > 1 else "ORC", segment))
        elif name in GROUP_SEGMENTS:
            if name in in_group:
                if name == "OBR" and groups and grouped:
                    raise Refusal("AE", "100", f"order group {groups} (ORC #{groups}) holds a "
                                  "second OBR segment: each procedure needs an ORC of its own "
                                  "(its order control and order number)", msh[0], msh[1])
                continue
            in_group.add(name)
            kept.append((f"{name} of ORC #{groups}" if groups > 1 else name, segment))
        elif merging and name in ("PID", "MRG"):
            patients += name == "PID"
            if patients > MAX_GROUPS:
                raise Refusal("AR", "100", f"too many patients in one merge: more than "
                              f"{MAX_GROUPS} PID segments (send the others in another "
                              "message)", msh[0], msh[1])
            kept.append((name, segment))
        elif name in READ_SEGMENTS and name not in seen:
            seen.add(name)
            kept.append((name, segment))
    total = 0
    for name, segment in kept:
        count = sum(segment.count(d) for d in delimiters)
        total += count
        if total > MAX_DELIMITERS:
            raise Refusal("AR", "100", f"{name} segment too complex: {count} delimiters, the "
                          f"segments read (MSH, PID, ORC, OBR...) may hold {MAX_DELIMITERS} "
                          "together", msh[0], msh[1])
    return "\r".join(segment for _, segment in kept)


def order_groups(message: hl7.Message) -> list[hl7.Message]:
    """One message per ORC group: the message's own segments (MSH, PID...) and that group's
    ORC, OBR, TQ1 and IPC, so that each is read exactly as a message of one order is. The
    OBR, TQ1 or IPC before the first ORC belong to the first group (after its own)."""
    header: list[Any] = []
    leading: list[Any] = []
    groups: list[list[Any]] = []
    for segment in message:
        name = str(segment[0])
        if name == "ORC":
            groups.append([segment])
        elif name in GROUP_SEGMENTS:
            (groups[-1] if groups else leading).append(segment)
        else:
            header.append(segment)
    if groups:
        groups[0].extend(leading)
    return [hl7.Message(message.separator, header + group, esc=message.esc,
                        separators=message.separators, factory=message.factory)
            for group in groups]


def interpret(message: hl7.Message, issuer_default: str = "",
              site_issuers: Collection[str] = ()) -> list[PrefetchOrder]:
    """What the message asks for, one :class:`PrefetchOrder` per order group of an ORM/OMI/OMG
    (one for the other types), or :class:`Refusal`: a bad group refuses the whole message,
    its reason naming the group when there are several, so that nothing of a message is
    stored unless all of it is (one transaction per message, as for one order).

    ``site_issuers``: the issuers whose identifiers the region knows
    (``prefetch.issuer_map``): the PID-3 repetition of one of them is the patient's, else the
    first (see :func:`_site_repetition`)."""
    kind = _field(message, "MSH.F9.R1.C1").upper()
    event = _field(message, "MSH.F9.R1.C2").upper()
    message_type = f"{kind}^{event}"
    control_id = _msh_field(message, 10)
    if not control_id:
        raise Refusal("AR", "101", "MSH-10 message control id is missing", message_type)
    if kind == "ADT" and (kind, event) not in SUPPORTED:
        raise NotUsed(message_type, control_id)
    if (kind, event) not in SUPPORTED:
        supported = ", ".join(f"{k}^{e}" for k, e in sorted(SUPPORTED))
        raise Refusal("AR", "200", f"unsupported message type {message_type} (accepted: "
                      f"{supported})", message_type, control_id)
    if not _segment_present(message, "PID"):
        raise Refusal("AE", "100", "PID segment is missing", message_type, control_id)
    sender = f"{_msh_field(message, 3)}|{_msh_field(message, 4)}"
    message_key = f"{sender}|{control_id}"
    views = order_groups(message) if kind in ORDER_KINDS else [message]
    orders = []
    try:
        repetition = _site_repetition(message, site_issuers)
        patient_id = _field(message, f"PID.F3.R{repetition}.C1")
        if not patient_id:
            raise Refusal("AE", "101", "PID-3 patient identifier is missing")
        issuer = identifier_issuer(message, f"PID.F3.R{repetition}") or issuer_default
        _refuse_undecodable(message, {"PID-3 patient identifier": patient_id,
                                      "PID-3.4 issuer": issuer,
                                      "MSH-3/MSH-4/MSH-10": message_key})
        refuse_unsearchable({"PID-3 patient identifier": patient_id, "PID-3.4 issuer": issuer})
        if not views:
            raise Refusal("AE", "100", "ORC segment is missing")
        for number, view in enumerate(views, 1):
            try:
                dedup_key, accession, modality, body_part, scheduled_at, cancel = \
                    _interpret_kind(view, kind, (patient_id, issuer), event)
                procedure = _procedure(view, kind) if kind in ORDER_KINDS else ("", "")
                _refuse_undecodable(message, {
                    "accession number": accession, "modality": modality,
                    "body part": body_part, "order, appointment or visit number": dedup_key,
                    "requested procedure ID": procedure[1]})
            except Refusal as refusal:
                if len(views) == 1:
                    raise
                raise refusal.of_part(
                    f"order group {number} of {len(views)} (ORC #{number})") from None
            orders.append(PrefetchOrder(
                message_key, message_type, control_id, dedup_key, patient_id, issuer,
                accession or None, (modality or "").upper() or None, body_part or None,
                scheduled_at, cancel, procedure, update_only=(kind, event) == ("ADT", "A08")))
    except Refusal as refusal:
        raise Refusal(refusal.ack_code, refusal.error_code, refusal.reason, message_type,
                      control_id) from None
    return orders


def _site_repetition(message: hl7.Message, site_issuers: Collection[str],
                     segment: str = "PID", number: int = 3) -> int:
    """The PID-3 repetition (``segment``-``number``: MRG-1 for a merge) whose issuer (CX-4.1
    namespace or CX-4.2 OID) is one of ``site_issuers``, else 1.

    A French RIS sends the INS (``...^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS``)
    and the hospital's IPP in PID-3, in either order: the first alone queried the region
    for the INS where it indexes the IPP, and found no prior."""
    if not site_issuers:
        return 1
    wanted = {issuer.casefold() for issuer in site_issuers}  # as PrefetchSection.region_issuer
    try:
        found = message.segment(segment)
    except KeyError:  # no such segment: its absence is refused by the caller, naming it
        return 1
    field = found[number] if len(found) > number else []
    repetitions = len(field) if field and not isinstance(field[0], str) else 1
    for repetition in range(1, repetitions + 1):
        try:
            path = f"{segment}.F{number}.R{repetition}"
            names = {_field(message, f"{path}.C4.S{part}").casefold() for part in (1, 2)}
            if names & wanted and _field(message, f"{path}.C1"):
                return repetition
        except Refusal:
            continue  # an identifier of another issuer that cannot be read: not this one
    return 1


def identifier_issuer(message: hl7.Message, path: str) -> str:
    """The assigning authority of the CX identifier at ``path`` (``PID.F3.R2``, ``MRG.F1.R1``):
    its namespace (CX-4.1, ``CHU-A``), else its universal ID (CX-4.2, the OID), else ''.

    French and IHE PAM senders often give the authority as an OID alone
    (``IPP42^^^&1.2.250.1.71.4.2.1&ISO^PI``). Read as CX-4.1 only, that issuer was stored
    empty: ``prefetch.issuer_map`` could not name it, so the region was asked by PatientID
    alone, and the request could not be told from another authority's patient of the same
    number."""
    return _field(message, f"{path}.C4.S1") or _field(message, f"{path}.C4.S2")


def _refuse_undecodable(message: hl7.Message, stored: dict[str, str]) -> None:
    """A value PAS stores or matches on that holds U+FFFD, the mark of bytes not valid in
    the character set the message was read with, is refused naming it: stored, it would
    match no study in the region, and two ids differing only there would be one request.
    Such bytes elsewhere (a patient name) are harmless and left."""
    for name, value in stored.items():
        if "\ufffd" in value:
            declared = _msh_field(message, 18)
            charset = f"MSH-18 {declared!r}" if declared else "hl7.encoding, MSH-18 empty"
            raise Refusal("AE", "102", f"{name} {value!r} holds bytes that are not valid in "
                          f"the message's character set ({charset})")


def refuse_unsearchable(identifiers: dict[str, str]) -> None:
    """:class:`Refusal` (AE 102, data type error) of the first patient identifier or issuer
    in ``identifiers`` (named by its key: ``PID-3 patient identifier``, ``MRG-1.4 issuer``)
    that the region cannot be searched by: over 64 characters, or holding a control character
    (``\\X00\\`` and ``\\X0D\\`` included, read after unescaping). ACKed and stored before,
    a 65-character ID failed every patient of the burst it was searched with (the hub refuses
    the batched search), and a NUL became part of the patient ID and the dedup key."""
    for name, value in identifiers.items():
        problem = identifier_problem(value)
        if problem is not None:
            raise Refusal("AE", "102", f"{name} {problem}")


def _procedure(group: hl7.Message, kind: str) -> tuple[str, str]:
    """The requested procedure an order group names: its accession (IPC-1, else OBR-18) and
    requested procedure ID (IPC-2, else OBR-19: IHE RAD-4's places in OMI and ORM), each ''
    when not given. IHE SWF gives one order's procedures one order number (and may give them
    one accession): only these tell a CT chest from an MR knee of the same order."""
    ipc = kind == "OMI"
    accession = (_field(group, "IPC.F1.R1.C1") if ipc else "") or _field(group, "OBR.F18")
    requested = (_field(group, "IPC.F2.R1.C1") if ipc else "") or _field(group, "OBR.F19")
    return accession, requested


def _interpret_kind(message: hl7.Message, kind: str, patient: tuple[str, str],
                    event: str = "") -> tuple[str, str, str, str, float | None, bool]:
    if kind in ORDER_KINDS:
        placer = _field(message, "ORC.F2.R1.C1")
        filler = _field(message, "ORC.F3.R1.C1")
        # No OBR-18 / IPC-1: the order number; it never replaces a known one (prefetch_changes)
        accession = (_field(message, "IPC.F1.R1.C1") if kind == "OMI" else "") \
            or _field(message, "OBR.F18") or filler or placer
        order_number = placer or filler or accession
        if not order_number:
            raise Refusal("AE", "101", "no order number: ORC-2, ORC-3 and the accession "
                          "(OBR-18 / IPC-1) are all empty")
        modality = (_field(message, "IPC.F5.R1.C1") if kind == "OMI" else "") \
            or _field(message, "OBR.F24")
        body_part = _field(message, "OBR.F15.R1.C1")
        scheduled = _time(message, "TQ1.F7.R1.C1", "OBR.F27.R1.C4", "ORC.F7.R1.C4",
                          "OBR.F36", "OBR.F7")
        control = _field(message, "ORC.F1").upper()
        cancel = control in CANCEL_CONTROLS or (
            control == "SC" and _field(message, "ORC.F5").upper() in CANCELLED_STATUSES)
        return (request_key("order", *patient, order_number), accession, modality, body_part,
                scheduled, cancel)
    if kind == "SIU":
        appointment = _field(message, "SCH.F1.R1.C1") or _field(message, "SCH.F2.R1.C1")
        if not appointment:
            raise Refusal("AE", "101", "SCH-1 / SCH-2 appointment id is missing")
        scheduled = _time(message, "SCH.F11.R1.C4", "AIS.F4")
        modality = _field(message, "OBR.F24")
        accession = _field(message, "OBR.F18")
        return (request_key("appointment", *patient, appointment), accession, modality, "",
                scheduled, event in SIU_CANCELS)
    # ADT^A04 / A08: a registered outpatient; one request per visit, which A11 (cancel
    # admit / visit notification) cancels.
    visit = _field(message, "PV1.F19.R1.C1") or _field(message, "PV1.F44")[:8] \
        or dt.date.today().strftime("%Y%m%d")
    scheduled = _time(message, "PV1.F44")
    return request_key("visit", *patient, visit), "", "", "", scheduled, event == "A11"
