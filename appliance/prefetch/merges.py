"""HL7 v2 patient merges from the RIS / ADT feed: which patient became which.

Owns: reading an ADT^A40 (or the older A34 / A36 / A18 forms, or an A47) into
:class:`PatientMerge` items, or a :class:`~appliance.prefetch.messages.Refusal` naming the
problem. May not touch: the database or the network (:mod:`appliance.prefetch.orders`
stores what it means).

Why: a trauma patient is registered under a temporary identity ("John Doe", a temporary
PID-3) and the exams are ordered under it; once identified, the ADT system merges that
identity into the real patient's (HL7 v2.5 section 3.3.40: PID-3 the surviving patient,
MRG-1 the prior identifier that disappears). PAS's pending requests still named the
temporary id: they searched the region for a patient who has no history there and fetched
no prior of the real one.

ADT^A47 (change patient identifier list, v2.5 section 3.3.47) corrects one identifier of a
patient: MRG-1 the incorrect one, PID-3 the correct one (IHE ITI-30). It is read here as a
merge is, field for field and refusal for refusal: for the prefetch the effect is the same
(the requests of MRG-1 become PID-3's), only the HL7 meaning differs.

Fields read (v2.5 positions): MSH-9, MSH-10 as for every message; per merged patient (A40
repeats the PID / MRG pair), PID-3 and MRG-1 ``ID^^^issuer``: for PID-3 the repetition of
an issuer in ``prefetch.issuer_map``, else the first (as for orders); for MRG-1 the
repetition of the issuer PID-3's was read from, else the first. An MRG-1 giving no
issuer is the PID-3 issuer's (a merge is within one assigning authority, IHE ITI PAM).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import hl7

from appliance.prefetch.messages import (
    MERGE_EVENTS,
    Refusal,
    _field,
    _msh_field,
    _refuse_undecodable,
    _site_repetition,
    identifier_issuer,
    refuse_unsearchable,
)


@dataclass(frozen=True)
class PatientMerge:
    """One merge: the prior patient's pending requests become the surviving patient's."""

    message_key: str            # MSH-3|MSH-4|MSH-10, as for an order
    message_type: str           # e.g. ADT^A40
    control_id: str
    patient_id: str             # PID-3: the patient that remains
    issuer: str
    prior_id: str               # MRG-1: the identifier merged into it
    prior_issuer: str


def is_merge(message: hl7.Message) -> bool:
    """Whether ``message`` is one of the ADT merge events (:data:`MERGE_EVENTS`)."""
    return (_field(message, "MSH.F9.R1.C1").upper() == "ADT"
            and _field(message, "MSH.F9.R1.C2").upper() in MERGE_EVENTS)


def interpret_merges(message: hl7.Message,
                     site_issuers: Collection[str] = ()) -> list[PatientMerge]:
    """Each PID / MRG pair of a merge message, in its order, or :class:`Refusal` (AE) for the
    whole message when one pair is bad, its reason naming the pair when there are several:
    no PID or no MRG, an empty PID-3 or MRG-1, a patient merged into itself, bytes not
    valid in the character set. Nothing of a message is stored unless all of it is."""
    message_type = (f"{_field(message, 'MSH.F9.R1.C1').upper()}^"
                    f"{_field(message, 'MSH.F9.R1.C2').upper()}")
    control_id = _msh_field(message, 10)
    if not control_id:
        raise Refusal("AR", "101", "MSH-10 message control id is missing", message_type)
    message_key = f"{_msh_field(message, 3)}|{_msh_field(message, 4)}|{control_id}"
    try:
        pairs = _pairs(message, message_type)
        merges = []
        for number, pair in enumerate(pairs, 1):
            try:
                merges.append(_merge(pair, site_issuers, message_key, message_type,
                                     control_id))
            except Refusal as refusal:
                if len(pairs) == 1:
                    raise
                raise refusal.of_part(
                    f"patient {number} of {len(pairs)} (PID #{number})") from None
    except Refusal as refusal:
        raise Refusal(refusal.ack_code, refusal.error_code, refusal.reason, message_type,
                      control_id) from None
    return merges


def _pairs(message: hl7.Message, message_type: str) -> list[hl7.Message]:
    """One message per PID (the MSH, that PID and the MRG after it), read as a merge of one
    patient is. An MRG before any PID, or a second MRG for one PID, is refused: which patient
    it merges would be a guess."""
    header: list[Any] = []
    pairs: list[list[Any]] = []
    for segment in message:
        name = str(segment[0])
        if name == "PID":
            pairs.append([segment])
        elif name == "MRG":
            if not pairs:
                raise Refusal("AE", "100", "MRG segment before any PID: the surviving "
                              "patient (PID-3) comes first")
            if any(str(s[0]) == "MRG" for s in pairs[-1]):
                raise Refusal("AE", "100", f"PID #{len(pairs)} has two MRG segments: one "
                              "prior patient per PID (repeat the PID / MRG pair for another)")
            pairs[-1].append(segment)
        else:
            header.append(segment)
    if not pairs:
        raise Refusal("AE", "100", "PID segment is missing")
    for number, pair in enumerate(pairs, 1):
        if len(pair) < 2:
            of = f" (PID #{number})" if len(pairs) > 1 else ""
            what = ("the identifier corrected" if is_correction(message_type)
                    else "the patient merged away")
            raise Refusal("AE", "100", f"MRG segment is missing{of}: {message_type} names "
                          f"{what} (its prior identifier, MRG-1) there")
    return [hl7.Message(message.separator, header + pair, esc=message.esc,
                        separators=message.separators, factory=message.factory)
            for pair in pairs]


def is_correction(message_type: str) -> bool:
    """An A47 (change patient identifier list): one patient's identifier corrected, not two
    patients merged; its refusals, ACK and audit say so."""
    return message_type.split("^")[1:2] == ["A47"]


def _merge(pair: hl7.Message, site_issuers: Collection[str], message_key: str,
           message_type: str, control_id: str) -> PatientMerge:
    repetition = _site_repetition(pair, site_issuers)
    patient_id = _field(pair, f"PID.F3.R{repetition}.C1")
    if not patient_id:
        raise Refusal("AE", "101", "PID-3 patient identifier is missing")
    issuer = identifier_issuer(pair, f"PID.F3.R{repetition}")
    prior_repetition = _site_repetition(pair, [issuer] if issuer else site_issuers, "MRG", 1)
    prior_id = _field(pair, f"MRG.F1.R{prior_repetition}.C1")
    if not prior_id:
        raise Refusal("AE", "101", "MRG-1 prior patient identifier is missing: which "
                      + ("identifier is corrected" if is_correction(message_type)
                         else "patient is merged away") + " is not said")
    prior_issuer = identifier_issuer(pair, f"MRG.F1.R{prior_repetition}") or issuer
    _refuse_undecodable(pair, {"PID-3 patient identifier": patient_id,
                               "PID-3.4 issuer": issuer,
                               "MRG-1 prior patient identifier": prior_id,
                               "MRG-1.4 issuer": prior_issuer,
                               "MSH-3/MSH-4/MSH-10": message_key})
    # Each identifier as an order's is checked: a merge moves requests to PID-3's, which are
    # then searched by it; and an MRG-1 no order could have had names none PAS holds.
    refuse_unsearchable({"PID-3 patient identifier": patient_id, "PID-3.4 issuer": issuer,
                         "MRG-1 prior patient identifier": prior_id,
                         "MRG-1.4 issuer": prior_issuer})
    if (prior_id, prior_issuer) == (patient_id, issuer):
        named = f"{prior_id}" + (f" (issuer {issuer})" if issuer else "")
        raise Refusal("AE", "205", f"MRG-1 prior patient identifier {named} is PID-3's own: "
                      + ("an identifier cannot be corrected to itself"
                         if is_correction(message_type) else
                         "a patient cannot be merged into itself"))
    return PatientMerge(message_key, message_type, control_id, patient_id, issuer, prior_id,
                        prior_issuer)
