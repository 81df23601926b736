r"""Bad HL7 input is refused clearly (invariant 7), against a real ``pas run`` over MLLP.

Found in review s40 (findings 1-4 of the bad-input review), each ACKed AA or answered in
Python's words before:
- a PID-3 (or its issuer, or a merge's MRG-1) over 64 characters was ACKed AA and stored;
  searched in a batch, the hub's 422 failed every other patient of the burst with it.
- two messages in one MLLP frame: the second one's order was filed under the first one's
  patient (its MSH and PID dropped without a word), and it was never ACKed. A second PID in
  one ORM did the same.
- an offset ``+2500`` got ``dt.timezone``'s "offset must be a timedelta strictly between...",
  ``+0199`` was read as +2h39 and stored, ``00010101`` was refused as "year 0".
- a NUL, or ``\X00\`` / ``\X0D\`` escapes, in PID-3 were stored in the patient ID.

Each is now NAKed naming the field or segment and the problem, nothing is recorded (neither a
request nor the message), and the next good message on the same listener is served. And
``pas prefetch patient $'P\x01X'`` queued a request: it exits 2 naming the character.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.peers import PasProcess, pas_with_hl7, read_rows
from tests.test_prefetch_hl7_input import EB, SB, exchange, orm

LONG = "A" + "0" * 64  # 65 characters: one past DICOM LO


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pas = pas_with_hl7(tmp_path_factory.mktemp("pas_hl7_bad_input"))
    yield pas
    pas.stop()


def counts(pas: PasProcess) -> tuple[int, int]:
    """(prefetch requests, HL7 messages recorded)."""
    db = pas.home / "pas.sqlite"
    return (read_rows(db, "SELECT count(*) FROM prefetch_requests")[0][0],
            read_rows(db, "SELECT count(*) FROM prefetch_messages")[0][0])


def refused(pas: PasProcess, frame: str, code: str, control: str, reason: bytes) -> None:
    """``frame`` (one MLLP block's content) gets one answer: MSA ``code`` for ``control``,
    its ERR segment holding ``reason`` whole (MSA-3 is cut at 80 characters); nothing is
    recorded, and the listener then serves a good order on a new connection."""
    before = counts(pas)
    (nak,) = exchange(pas, SB + frame.encode("latin-1") + EB)
    assert f"MSA|{code}|{control}|".encode() in nak, nak
    assert reason in nak.split(b"\rERR|", 1)[1], nak
    assert b"internal error" not in nak and b"Traceback" not in nak
    assert counts(pas) == before
    served(pas, before)


def served(pas: PasProcess, before: tuple[int, int]) -> None:
    """A good order after a refusal is ACKed AA and stored: the listener keeps serving."""
    control = f"GOOD{before[1]}-{before[0]}"
    (ack,) = exchange(pas, SB + orm(control, f"ORD{control}").encode() + EB)
    assert b"MSA|AA|" + control.encode() in ack, ack
    assert counts(pas) == (before[0] + 1, before[1] + 1)


def merge(control: str, patient: str, prior: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|ADT|HOSP|PAS|HOSP|20261207120000||ADT^A40^ADT_A39|{control}|P|2.5",
        "EVN|A40", f"PID|1||{patient}", f"MRG|{prior}"])


def test_an_identifier_over_64_characters_is_refused_naming_the_field(pas: PasProcess) -> None:
    """PID-3, its issuer (CX-4) and a merge's MRG-1: 65 characters is one past DICOM LO."""
    refused(pas, orm("LONG1", "ORDLONG1", f"{LONG}^^^HOSP"), "AE", "LONG1",
            b"PID-3 patient identifier is 65 characters: at most 64 (a DICOM LO value")
    refused(pas, orm("LONG2", "ORDLONG2", f"P1^^^{'H' * 65}"), "AE", "LONG2",
            b"PID-3.4 issuer is 65 characters: at most 64")
    refused(pas, orm("LONG3", "ORDLONG3", "A" * 1000 + "^^^HOSP"), "AE", "LONG3",
            b"PID-3 patient identifier is 1000 characters: at most 64")
    refused(pas, merge("LONG4", "P1^^^HOSP", f"{LONG}^^^HOSP"), "AE", "LONG4",
            b"MRG-1 prior patient identifier is 65 characters: at most 64")
    # 64 is allowed.
    before = counts(pas)
    (ack,) = exchange(pas, SB + orm("LONG5", "ORDLONG5", f"{LONG[:64]}^^^HOSP").encode() + EB)
    assert b"MSA|AA|LONG5" in ack, ack
    assert counts(pas) == (before[0] + 1, before[1] + 1)


def test_two_messages_in_one_frame_are_refused_naming_the_segment(pas: PasProcess) -> None:
    """A second MSH (two ORMs concatenated), or a batch's or file's header or trailer, after
    the first segment: AR naming the segment; the second ORM's order is not filed under the
    first one's patient. One answer only, for the first message's control id."""
    first = orm("TWO-A", "ORDTWOA", "PA1^^^HOSP")
    second = orm("TWO-B", "ORDTWOB", "PB2^^^HOSP")
    refused(pas, first + "\r" + second, "AR", "TWO-A",
            b"segment 5 is a second MSH: one message per MLLP frame (HL7 batches, BHS/FHS, "
            b"are not read; send each message in a frame of its own)")
    for control, segment, named in [("BAT1", "BTS|1", b"BTS, a batch trailer"),
                                    ("BAT2", "BHS|^~\\&|RIS", b"BHS, a batch header"),
                                    ("BAT3", "FTS|1", b"FTS, a file trailer")]:
        refused(pas, orm(control, f"ORD{control}") + "\r" + segment, "AR", control,
                b"segment 5 is " + named + b": one message per MLLP frame")


def test_a_second_pid_in_an_order_is_refused(pas: PasProcess) -> None:
    """An ORM names one patient: the ORC/OBR after a second PID were filed under the
    first PID's patient."""
    frame = orm("PID2", "ORDPID2A", "PA1^^^HOSP") + "\r" + "\r".join(
        orm("X", "ORDPID2B", "PB2^^^HOSP").split("\r")[1:])
    refused(pas, frame, "AE", "PID2",
            b"segment 5 is a second PID: an ORM message names one patient")


def test_an_omg_s_prior_result_group_is_not_read_as_an_order(pas: PasProcess) -> None:
    """OMG^O19 lets an order group end with a PRIOR_RESULT group, opened by the prior's own
    PID and holding its ORC/OBR: refused as "a second PID" after d7d5f15 (review s40/2b F2),
    and before that its ORC was filed as a second order. The current order is ACKed and
    stored; the prior's is not."""
    before = counts(pas)
    frame = "\r".join([
        "MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261204120000||OMG^O19^OMG_O19|OMGPRIOR|P|2.5",
        "PID|1||P1^^^HOSP^MR||DOE^JOHN",
        "ORC|NW|ORDOMG1|||SC||^^^20991231120000",
        "OBR|1|ORDOMG1||CT^CT||||||||||||||ACCOMG1||||||CT",
        "PID|1||P1^^^HOSP^MR||DOE^JOHN",
        "ORC|XO|ORDOLD9",
        "OBR|1|ORDOLD9||CT^CT PRIOR||||||||||||||ACCOLD9||||||CT"])
    (ack,) = exchange(pas, SB + frame.encode() + EB)
    assert b"MSA|AA|OMGPRIOR" in ack, ack
    assert counts(pas) == (before[0] + 1, before[1] + 1)
    keys = [row[0] for row in read_rows(pas.home / "pas.sqlite",
                                        "SELECT dedup_key FROM prefetch_requests")]
    assert any("ORDOMG1" in key for key in keys), keys
    assert not any("ORDOLD9" in key for key in keys), keys


@pytest.mark.parametrize(("control", "when", "why"), [
    ("DT1", "20991231120000+2500",
     b"(the offset +2500 must be under 24 hours, its minutes under 60)"),
    ("DT2", "20991231120000+0199",
     b"(the offset +0199 must be under 24 hours, its minutes under 60)"),
    ("DT3", "20991231120000+9999",
     b"(the offset +9999 must be under 24 hours, its minutes under 60)"),
    ("DT4", "00010101", b"(out of the range of dates this system can hold)"),
])
def test_a_date_out_of_range_is_refused_in_the_words_of_the_other_dates(
        pas: PasProcess, control: str, when: str, why: bytes) -> None:
    """As every other date refusal: the field, the value quoted, what is wrong with it; not
    Python's "offset must be a timedelta..." or "year 0 is out of range"."""
    message = orm(control, f"ORD{control}").replace("^^^20991231120000", f"^^^{when}")
    refused(pas, message, "AE", control,
            b"ORC-7.4: not an HL7 date/time: '" + when.encode() + b"' " + why)


@pytest.mark.parametrize(("control", "patient", "named"), [
    ("CC1", "P\x001^^^HOSP", b"PID-3 patient identifier holds a control character, U+0000 at "
                             b"character 2"),
    ("CC2", "P\\X00\\1^^^HOSP", b"PID-3 patient identifier holds a control character, U+0000"),
    ("CC3", "P\\X0D\\1^^^HOSP", b"PID-3 patient identifier holds a control character, U+000D"),
    ("CC4", "P\x7f1^^^HOSP", b"PID-3 patient identifier holds a control character, U+007F"),
    ("CC5", "P1^^^HO\\X01\\SP", b"PID-3.4 issuer holds a control character, U+0001 at "
                                b"character 3"),
    # A kanji issuer in ISO 2022 (JIS X 0208): named as the escape it is, not as a control
    # character (review s40/2b F3).
    ("CC7", "P1^^^\x1b$BIB1!\x1b(B", b"PID-3.4 issuer holds an ISO 2022 escape sequence "
                                     b"(ESC, U+001B at character 1)"),
])
def test_a_control_character_in_an_identifier_is_refused(
        pas: PasProcess, control: str, patient: str, named: bytes) -> None:
    """Raw, or decoded from a hex escape: never stored as part of a patient ID."""
    refused(pas, orm(control, f"ORD{control}", patient), "AE", control, named)


def test_a_control_character_in_a_merge_s_prior_identifier_is_refused(pas: PasProcess) -> None:
    refused(pas, merge("CC6", "P1^^^HOSP", "P\\X00\\2^^^HOSP"), "AE", "CC6",
            b"MRG-1 prior patient identifier holds a control character, U+0000")


@pytest.mark.parametrize(("args", "named"), [
    (("P\x01X",), "PATIENT_ID holds a control character, U+0001 at character 2"),
    (("P\x7f",), "PATIENT_ID holds a control character, U+007F at character 2"),
    (("P1", "--issuer", "H\x1bS"),
     "--issuer holds an ISO 2022 escape sequence (ESC, U+001B at character 2)"),
    (("P1", "--issuer", "H" * 65), "--issuer is 65 characters: at most 64"),
])
def test_pas_prefetch_patient_refuses_what_hl7_intake_refuses(
        pas: PasProcess, args: tuple[str, ...], named: str) -> None:
    """The same identifiers by hand: exit 2 naming the argument and the character; no
    request queued (``P\\x01X`` was queued, and searched for until it failed)."""
    before = counts(pas)
    bad = pas.cli("prefetch", "patient", *args, check=False)
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert named in " ".join(bad.stderr.split()), bad.stderr
    assert counts(pas) == before
