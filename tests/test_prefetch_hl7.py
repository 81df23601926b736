"""The HL7 v2 MLLP listener of a real ``pas run``, driven by the ``hl7`` package's MLLPClient.

What is proven: each supported message is ACKed (AA) only once its request is durable; the same
order sent five times (new control ids) is one request; a resent message (same control id) is
recognised; every named bad input gets a NAK (AE/AR) with the reason in MSA-3 and ERR, changes
nothing, and the listener keeps serving the next client. No region is configured reachable
here (``prefetch.dicomweb_url`` points at a closed port), so requests stay pending: these
tests are about triggers, not fetching (see test_prefetch_acceptance.py).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hl7
import pytest
from hl7.client import MLLPClient

from tests.support.peers import PasProcess, pas_with_hl7, wait_for
from tests.support.peers import prefetch_requests as requests
from tests.support.serving import serve_in_thread
from tests.support.silent_peer import SilentPeer


@pytest.fixture(scope="module")
def pas_hl7(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pas = pas_with_hl7(tmp_path_factory.mktemp("pas_hl7"), PAS_PREFETCH__LEAD_TIME_H="12")
    yield pas
    pas.stop()


def send(pas: PasProcess, *messages: str) -> list[hl7.Message]:
    with MLLPClient("127.0.0.1", pas.hl7_port) as client:
        answers = [client.send_message(m) for m in messages]
    return [hl7.parse(a.decode().strip("\x0b\x1c\r")) for a in answers]




def shape(pas: PasProcess) -> list[tuple[int, str, int]]:
    """What a message may change (the scheduler moves attempts and errors on its own)."""
    return [(r["id"], r["dedup_key"], r["times_requested"]) for r in requests(pas)]


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    return (str(ack["MSA.F1"]), str(ack["MSA.F2"]), str(ack["MSA.F3"]) if len(
        ack.segment("MSA")) > 3 else "")


def orm(control: str, order: str, patient: str = "P100", when: str = "",
        control_code: str = "NW", modality: str = "CT") -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||ORM^O01|{control}|P|2.5",
        f"PID|1||{patient}^^^HOSP^MR||DOE^JOHN||19500101|M",
        f"ORC|{control_code}|{order}|||SC||^^^{when}",
        f"OBR|1|{order}||CTCHEST^CT chest||||||||||||||ACC{order}||||||{modality}",
    ])


def test_orm_is_acked_and_one_order_five_times_is_one_request(pas_hl7: PasProcess) -> None:
    acks = send(pas_hl7, *[orm(f"C{i}", "ORD1", when="20991231120000") for i in range(5)])
    assert [msa(a)[0] for a in acks] == ["AA"] * 5
    assert [msa(a)[1] for a in acks] == [f"C{i}" for i in range(5)]
    rows = [r for r in requests(pas_hl7) if r["dedup_key"] == "order:P100|HOSP|ORD1"]
    assert len(rows) == 1
    assert rows[0]["times_requested"] == 5
    assert rows[0]["state"] == "pending"
    assert rows[0]["modality"] == "CT" and rows[0]["accession_number"] == "ACCORD1"
    # Exam far in the future: due lead_time_h (12 h) before it, not now.
    assert rows[0]["due_at"] == pytest.approx(rows[0]["scheduled_at"] - 12 * 3600)


def test_resent_message_is_recognised(pas_hl7: PasProcess) -> None:
    first, again = send(pas_hl7, orm("SAME1", "ORD2"), orm("SAME1", "ORD2"))
    assert msa(first)[:2] == ("AA", "SAME1")
    assert msa(again)[0] == "AA" and "duplicate" in msa(again)[2]
    rows = [r for r in requests(pas_hl7) if r["dedup_key"] == "order:P100|HOSP|ORD2"]
    assert len(rows) == 1 and rows[0]["times_requested"] == 1


def raw_exchange(port: int, payload: bytes, answers: int = 1,
                 start: threading.Barrier | None = None) -> list[bytes]:
    """Write ``payload`` as is on a new connection and read ``answers`` MLLP blocks (fewer if
    the listener closes): for framings the MLLPClient cannot produce."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if start is not None:
            start.wait(10)
        sock.sendall(payload)
        buffer, blocks = b"", []
        while len(blocks) < answers:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
            while b"\x1c\r" in buffer:
                block, buffer = buffer.split(b"\x1c\r", 1)
                blocks.append(block.lstrip(b"\x0b"))
        return blocks


def test_one_message_resent_on_many_connections_at_once_counts_once(
        pas_hl7: PasProcess) -> None:
    """A RIS that resends after an ACK timeout on new connections: the message is recorded
    once and counted once, whichever connection wins (the check was outside the
    transaction: 30 at once gave times_requested = 2)."""
    port = pas_hl7.hl7_port
    for round_ in range(3):
        payload = b"\x0b" + orm(f"RACE{round_}", f"ORDR{round_}").encode() + b"\x1c\r"
        start = threading.Barrier(30)
        with ThreadPoolExecutor(30) as pool:
            futures = [pool.submit(raw_exchange, port, payload, start=start)
                       for _ in range(30)]
            answers = [f.result() for f in futures]
        assert all(len(a) == 1 and b"MSA|AA" in a[0] for a in answers)
        assert sum(b"duplicate" not in a[0] for a in answers) == 1
        (row,) = [r for r in requests(pas_hl7)
                  if r["dedup_key"] == f"order:P100|HOSP|ORDR{round_}"]
        assert row["times_requested"] == 1


def test_message_key_is_the_whole_msh_fields(pas_hl7: PasProcess) -> None:
    """Control ids (MSH-10) or facilities (MSH-4, HD: namespace^universal id^type) that differ
    only after the first component are distinct messages: each order is stored (the key kept
    component 1 only: the second was ACKed as a duplicate and lost)."""
    first = orm("Z^1", "ORDZ1", patient="PZ1")
    second = orm("Z^2", "ORDZ2", patient="PZ2")
    other_site = orm("Z^1", "ORDZ3", patient="PZ3").replace(
        "|RIS|HOSP|", "|RIS|HOSP^1.2.250.1.2^ISO|", 1)
    acks = send(pas_hl7, first, second, other_site)
    assert [msa(a)[0] for a in acks] == ["AA"] * 3
    assert not any("duplicate" in msa(a)[2] for a in acks)
    keys = {r["dedup_key"] for r in requests(pas_hl7)}
    assert {"order:PZ1|HOSP|ORDZ1", "order:PZ2|HOSP|ORDZ2", "order:PZ3|HOSP|ORDZ3"} <= keys
    (again,) = send(pas_hl7, second)  # the same whole key again is still a resend
    assert "duplicate" in msa(again)[2]


def test_siu_reschedule_moves_one_request(pas_hl7: PasProcess) -> None:
    def siu(event: str, control: str, start: str) -> str:
        return "\r".join([
            f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||SIU^{event}|{control}|P|2.5",
            f"SCH|APPT7||||||||||^^^{start}",
            "PID|1||P200^^^HOSP^MR||ROE^ANN",
            f"AIS|1||MRBRAIN^MR brain|{start}",
        ])
    acks = send(pas_hl7, siu("S12", "S1", "20991201080000"), siu("S14", "S2", "20991202090000"))
    assert [msa(a)[0] for a in acks] == ["AA", "AA"]
    rows = [r for r in requests(pas_hl7) if r["dedup_key"] == "appointment:P200|HOSP|APPT7"]
    assert len(rows) == 1 and rows[0]["times_requested"] == 2
    from appliance.prefetch.messages import parse_hl7_time

    assert rows[0]["scheduled_at"] == parse_hl7_time("20991202090000")


def test_siu_rescheduled_then_cancelled(pas_hl7: PasProcess) -> None:
    """S12, S13 (rescheduled: the appointment's new time), S15 (cancelled): AA each, one
    request, moved then cancelled; S17 (deleted) cancels too. S13, S15 and S17 were
    refused AR 200 "unsupported message type": a RIS announcing appointments by SIU had
    its reschedules and cancels rejected, and the cancelled appointment's priors fetched."""
    def siu(event: str, control: str, appointment: str, start: str = "") -> str:
        return "\r".join([
            f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||SIU^{event}|{control}|P|2.5",
            f"SCH|{appointment}||||||||||^^^{start}",
            "PID|1||P201^^^HOSP^MR||ROE^ANN",
            f"AIS|1||MRBRAIN^MR brain|{start}",
        ])
    acks = send(pas_hl7, siu("S12", "SR1", "APPT8", "20991201080000"),
                siu("S13", "SR2", "APPT8", "20991203100000"))
    assert [msa(a)[:2] for a in acks] == [("AA", "SR1"), ("AA", "SR2")]
    (row,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "appointment:P201|HOSP|APPT8"]
    from appliance.prefetch.messages import parse_hl7_time

    assert (row["state"], row["times_requested"]) == ("pending", 2)
    assert row["scheduled_at"] == parse_hl7_time("20991203100000")

    acks = send(pas_hl7, siu("S15", "SR3", "APPT8"), siu("S12", "SR4", "APPT9", "20991201"),
                siu("S17", "SR5", "APPT9"))
    assert [msa(a)[:2] for a in acks] == [("AA", "SR3"), ("AA", "SR4"), ("AA", "SR5")]
    states = {r["dedup_key"]: r["state"] for r in requests(pas_hl7)
              if r["dedup_key"].startswith("appointment:P201|")}
    assert states == {"appointment:P201|HOSP|APPT8": "cancelled",
                      "appointment:P201|HOSP|APPT9": "cancelled"}


def test_adt_a04_then_a08_of_one_visit_and_omi(pas_hl7: PasProcess) -> None:
    def adt(event: str, control: str) -> str:
        return "\r".join([
            f"MSH|^~\\&|ADT|HOSP|PAS|HOSP|20261123120000||ADT^{event}|{control}|P|2.5",
            "PID|1||P300^^^HOSP^MR||POE^EVE",
            "PV1|1|O|||||||||||||||||V555",
        ])
    omi = "\r".join([
        "MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||OMI^O23|O1|P|2.5",
        "PID|1||P300^^^HOSP^MR||POE^EVE",
        "ORC|NW|ORD9",
        "TQ1|1||||||20991203100000",
        "OBR|1|ORD9||USABD^US abdomen",
        "IPC|ACC9|RP9|1.2.3.4|SPS9|US",
    ])
    acks = send(pas_hl7, adt("A04", "A1"), adt("A08", "A2"), omi)
    assert [msa(a)[0] for a in acks] == ["AA", "AA", "AA"]
    rows = requests(pas_hl7)
    visit = [r for r in rows if r["dedup_key"] == "visit:P300|HOSP|V555"]
    assert len(visit) == 1 and visit[0]["times_requested"] == 2
    order = [r for r in rows if r["dedup_key"] == "order:P300|HOSP|ORD9"]
    assert len(order) == 1
    assert order[0]["accession_number"] == "ACC9" and order[0]["modality"] == "US"

    # A11 (cancel admit / visit notification) cancels the visit's request: it was refused
    # AR 200, and the cancelled visit's priors fetched all the same
    (ack,) = send(pas_hl7, adt("A11", "A3"))
    assert msa(ack)[:2] == ("AA", "A3")
    (visit,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "visit:P300|HOSP|V555"]
    assert visit["state"] == "cancelled"


def _hl7_audit_rows(pas: PasProcess) -> list[dict[str, Any]]:
    return json.loads(pas.cli("audit", "--event", "hl7", "--limit", "100000", "--json").stdout)


def test_an_adt_feed_s_other_events_and_an_a08_of_no_known_visit_make_nothing(
        pas_hl7: PasProcess) -> None:
    """A hospital's ADT feed sends every event of every patient. A01, A03, A31, A39 were
    refused AR 200 (an interface engine holds its queue and alarms on each, and each wrote
    a failure audit row); an A08 (any change of any patient's record) made a prefetch
    request, so every inpatient whose address changed had priors pulled over the WAN. Now
    those events are ACKed AA, nothing done, and an A08 only updates a visit an A04 made."""
    def adt(event: str, control: str, visit: str = "V777", admit: str = "") -> str:
        return "\r".join([
            f"MSH|^~\\&|ADT|HOSP|PAS|HOSP|20261206120000||ADT^{event}|{control}|P|2.5",
            "PID|1||P301^^^HOSP^MR||ROE^RAY",
            f"PV1|1|I|||||||||||||||||{visit}" + ("|" * 25 + admit if admit else ""),
        ])

    before, audited = shape(pas_hl7), len(_hl7_audit_rows(pas_hl7))
    for event in ("A01", "A03", "A31", "A39"):
        (ack,) = send(pas_hl7, adt(event, f"N{event}"))
        assert msa(ack) == ("AA", f"N{event}",
                            f"ADT^{event}: not used by PAS's prefetch, nothing done"), event
        assert str(ack.segment("MSH")[9]) == f"ACK^{event}^ACK"
    (ack,) = send(pas_hl7, adt("A08", "U1"))
    assert msa(ack) == ("AA", "U1", "no prefetch request for visit:P301|HOSP|V777: an "
                        "ADT^A08 updates the one an ADT^A04 made, and makes none")
    assert shape(pas_hl7) == before
    assert len(_hl7_audit_rows(pas_hl7)) == audited  # nothing refused
    # Registered (A04), then updated (A08, the admit time moved): one request, moved.
    send(pas_hl7, adt("A04", "U2"))
    (ack,) = send(pas_hl7, adt("A08", "U3", admit="20991203100000"))
    assert msa(ack)[:2] == ("AA", "U3")
    (row,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "visit:P301|HOSP|V777"]
    from appliance.prefetch.messages import parse_hl7_time

    assert (row["times_requested"], row["scheduled_at"]) == (
        2, parse_hl7_time("20991203100000")), row


def test_a_test_message_is_refused_and_a_nak_before_parsing_mirrors_the_msh(
        pas_hl7: PasProcess) -> None:
    """MSH-11 ``T`` (a RIS's test system) made a request like any order and fetched a real
    patient's priors: refused AR 202 now, nothing changed. And a message refused before it
    is parsed whole (here 51 order groups) was answered with a hand-made MSH: MSH-5/6
    empty, MSH-9 ``ACK``, MSH-12 ``2.5`` whatever the message said."""
    before = shape(pas_hl7)
    for processing in ("T", "D"):
        training = orm(f"T{processing}", "ORD77").replace("|P|2.5", f"|{processing}|2.5", 1)
        (ack,) = send(pas_hl7, training)
        assert msa(ack) == ("AR", f"T{processing}", f"processing id {processing} (MSH-11): "
                            "this PAS acts on P only (hl7.processing_ids); a test or training "
                            "message must not fetch a patient's priors")
        assert str(ack.segment("ERR")[3]) == "202^Unsupported processing id^HL70357"
        assert str(ack.segment("MSH")[11]) == processing
        # The audit row names the message and its sender (it said the type alone).
        assert _hl7_audit_rows(pas_hl7)[0]["detail"] == \
            f"ORM^O01 MSH-10 T{processing} from RIS^HOSP"
    assert shape(pas_hl7) == before
    groups = [f"ORC|NW|G{n}\rOBR|1|G{n}||CT^CT||||||||||||||ACCG{n}||||||CT" for n in range(51)]
    many = "\r".join([
        "MSH|^~\\&|RIS|HOSP|PAS|RAD|20261206120000||ORM^O01|MANY1|P|2.3.1",
        "PID|1||P302^^^HOSP^MR||DOE^JANE", *groups])
    (ack,) = send(pas_hl7, many)
    assert msa(ack)[:2] == ("AR", "MANY1")
    header = ack.segment("MSH")
    assert [str(header[n]) for n in (3, 4, 5, 6, 9, 11, 12)] == [
        "PAS", "RAD", "RIS", "HOSP", "ACK^O01^ACK", "P", "2.3.1"], str(header)
    assert shape(pas_hl7) == before


def test_two_patients_whose_identifiers_join_alike_keep_their_own_requests(
        pas_hl7: PasProcess) -> None:
    """PID-3 ``X|Y`` of issuer ``Z`` and ``X`` of issuer ``Y|Z`` (a ``|`` written ``\\F\\``),
    both order N1: the keys joined the parts with ``|`` unescaped, so the second patient's
    order was counted as the first's sent again (AA, one request). Now two requests."""
    # orm() writes PID-3 as {patient}^^^HOSP^MR: CX.4, the issuer, is the one given here.
    acks = send(pas_hl7, orm("J1", "N1", patient="X\\F\\Y^^^Z"),
                orm("J2", "N1", patient="X^^^Y\\F\\Z"))
    assert [msa(a)[0] for a in acks] == ["AA", "AA"]
    rows = {(r["patient_id"], r["issuer"]): r for r in requests(pas_hl7)
            if r["dedup_key"].endswith("|N1")}
    assert {who: row["dedup_key"] for who, row in rows.items()} == {
        ("X|Y", "Z"): "order:X\\|Y|Z|N1", ("X", "Y|Z"): "order:X|Y\\|Z|N1"}, rows
    assert [row["times_requested"] for row in rows.values()] == [1, 1]


def test_cancel_order(pas_hl7: PasProcess) -> None:
    send(pas_hl7, orm("K1", "ORD5", when="20991231120000"))
    (ack,) = send(pas_hl7, orm("K2", "ORD5", control_code="CA"))
    assert msa(ack)[0] == "AA"
    (row,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "order:P100|HOSP|ORD5"]
    assert row["state"] == "cancelled"
    # Each message acted on is an audit row (only refusals were): from whom, which
    # message, for which patient, what it did.
    rows = {r["detail"]: r for r in _hl7_audit_rows(pas_hl7)}
    made, cancelled = rows["ORM^O01 MSH-10 K1 from RIS^HOSP"], \
        rows["ORM^O01 MSH-10 K2 from RIS^HOSP"]
    assert (made["outcome"], made["target"], made["patient"]) == (
        "success", "order:P100|HOSP|ORD5", "P100"), made
    assert cancelled["target"] == "cancel order:P100|HOSP|ORD5", cancelled
    assert made["actor"].startswith("127.0.0.1:"), made
    assert [r["detail"] for r in json.loads(pas_hl7.cli(
        "audit", "--patient", "P100", "--event", "hl7", "--json").stdout)].count(
        "ORM^O01 MSH-10 K1 from RIS^HOSP") == 1


def test_order_cancelled_then_ordered_again_is_pending_again(pas_hl7: PasProcess) -> None:
    """NW, CA, then NW with the same order number: the RIS re-ordered the exam, so the
    prefetch is due again (it stayed cancelled, ACKed AA and never fetched)."""
    send(pas_hl7, orm("RV1", "ORD15", when="20991231120000"))
    send(pas_hl7, orm("RV2", "ORD15", control_code="CA"))
    (ack,) = send(pas_hl7, orm("RV3", "ORD15", when="20991230100000"))
    assert msa(ack)[0] == "AA"
    (row,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "order:P100|HOSP|ORD15"]
    assert row["state"] == "pending" and row["attempts"] == 0
    from appliance.prefetch.messages import parse_hl7_time

    assert row["scheduled_at"] == parse_hl7_time("20991230100000")
    assert row["due_at"] == pytest.approx(row["scheduled_at"] - 12 * 3600)
    assert row["next_attempt_at"] == row["due_at"]


def test_a_changed_order_changes_its_pending_request(pas_hl7: PasProcess) -> None:
    """NW for a CT, then XO (change order) of the same order and accession as an MR with
    a new exam time: the pending request is the MR's (its rule chooses MR priors). Before,
    only the time moved: the request kept CT, and the CT rule chose the priors of an exam
    no longer ordered. The same when a cancelled order is ordered again as another exam."""
    send(pas_hl7, orm("XO1", "ORD30", when="20991231120000"))
    (ack,) = send(pas_hl7, orm("XO2", "ORD30", when="20991230080000", control_code="XO",
                               modality="MR").replace("CTCHEST^CT chest", "MRKNEE^MR knee"))
    assert msa(ack)[:2] == ("AA", "XO2")
    (row,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "order:P100|HOSP|ORD30"]
    from appliance.prefetch.messages import parse_hl7_time

    assert (row["state"], row["modality"], row["times_requested"]) == ("pending", "MR", 2)
    assert row["scheduled_at"] == parse_hl7_time("20991230080000")
    # a message giving no modality nor accession (a status update) keeps the ones known
    # (the accession became the order number, and today's exam could be its own prior)
    send(pas_hl7, orm("XO3", "ORD30", when="20991230080000", control_code="SC",
                      modality="").replace("|ACCORD30|", "||"))
    (row,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "order:P100|HOSP|ORD30"]
    assert (row["modality"], row["accession_number"]) == ("MR", "ACCORD30")

    send(pas_hl7, orm("XO4", "ORD31", when="20991231120000"),
         orm("XO5", "ORD31", control_code="CA"),
         orm("XO6", "ORD31", when="20991231120000", modality="US"))
    (row,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "order:P100|HOSP|ORD31"]
    assert (row["state"], row["modality"]) == ("pending", "US")


@pytest.mark.parametrize("message, code, reason", [
    ("garbage that is not HL7", "AR", "does not start with an MSH segment"),
    (orm("U1", "ORD6").replace("ORM^O01", "ORU^R01"), "AR", "unsupported message type ORU^R01"),
    (orm("U2", "ORD6").replace("P100^^^HOSP^MR", ""), "AE", "PID-3 patient identifier is missing"),
    ("\r".join(orm("U3", "ORD6").split("\r")[:1] + orm("U3", "ORD6").split("\r")[2:]), "AE",
     "PID segment is missing"),
    (orm("", "ORD6"), "AR", "MSH-10 message control id is missing"),
    (orm("U4", "", ).replace("ACC", ""), "AE", "no order number"),
    (orm("U5", "ORD6", when="2099-12-31"), "AE", "ORC-7.4: not an HL7 date/time: '2099-12-31'"),
])
def test_bad_messages_get_a_nak_with_the_reason_and_change_nothing(
        pas_hl7: PasProcess, message: str, code: str, reason: str) -> None:
    before = shape(pas_hl7)
    (ack,) = send(pas_hl7, message)
    ack_code, _, text = msa(ack)
    assert ack_code == code
    assert reason in text.replace("\\S\\", "^")
    assert ack.segment("ERR") is not None
    assert reason in str(ack["ERR.F8"]).replace("\\S\\", "^")
    assert shape(pas_hl7) == before
    # The listener keeps serving: a good message right after is accepted.
    (ok,) = send(pas_hl7, orm(f"after-{abs(hash(message))}", "ORD1"))
    assert msa(ok)[0] == "AA"


def test_unframed_bytes_get_a_nak_and_others_are_still_served(pas_hl7: PasProcess) -> None:
    with socket.create_connection(("127.0.0.1", pas_hl7.hl7_port), timeout=10) as sock:  # type: ignore[attr-defined]
        sock.sendall(b"MSH|^~\\&|no start block\x1c\r")
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert b"MSA|AR" in answer and b"not MLLP-framed" in answer
        assert sock.recv(4096) == b""  # the stream cannot be resynchronised: closed
    (ok,) = send(pas_hl7, orm("F1", "ORD1"))
    assert msa(ok)[0] == "AA"


def test_manual_request_and_list(pas_hl7: PasProcess) -> None:
    out = pas_hl7.cli("prefetch", "patient", "P900", "--modality", "mr").stdout
    assert "queued" in out
    rows = [r for r in requests(pas_hl7) if r["patient_id"] == "P900"]
    assert len(rows) == 1 and rows[0]["trigger"] == "manual" and rows[0]["modality"] == "MR"
    table = pas_hl7.cli("prefetch", "list").stdout
    listed = json.loads(pas_hl7.cli("prefetch", "list", "--json").stdout)
    count = len(listed["requests"])
    assert table.splitlines()[0].strip() == (f"{count} prefetch request"
                                             + ("" if count == 1 else "s"))
    assert [r["id"] for r in listed["requests"]] == [r["id"] for r in requests(pas_hl7)]
    assert sum(listed["counts"].values()) == len(listed["requests"])
    bad = pas_hl7.cli("prefetch", "patient", " ", check=False)
    assert bad.returncode == 2 and "PATIENT_ID" in bad.stderr


def test_a_test_daemon_whose_own_hl7_port_was_taken_starts_again_on_another(
        tmp_path: Any) -> None:
    """The tests' harness, not PAS: another test's server held the port a test's PAS was
    given for HL7; PAS started without its HL7 listener (as it should), and the test sent its
    order to that server, reading HTTP's 400 back (a CI run). The harness now starts PAS
    again on a new HL7 port, as it does for its DICOM and HTTP ports."""
    pas = PasProcess(tmp_path / "pas", {"PAS_HTTP__ENABLED": "false"})
    first = pas.hl7_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        taken.listen()
        pas.start()
        try:
            assert pas.hl7_port != first
            assert f"HL7 listener cannot listen on 127.0.0.1:{first}" in pas.log()
            assert f"HL7 MLLP listener on 127.0.0.1:{pas.hl7_port}" in pas.log()
            (ack,) = send(pas, orm("MOVED1", "ORDMOVED"))
            assert msa(ack)[0] == "AA"
        finally:
            pas.stop()


def test_hl7_port_taken_is_reported_and_dicom_keeps_serving(
        pas_factory: Any, tmp_path: Any) -> None:
    """A bad hl7.port (already in use) names the problem; images are still received."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pas = pas_factory({"PAS_HL7__PORT": str(port), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        wait_for(lambda: f"HL7 listener cannot listen on 127.0.0.1:{port}" in pas.log(), 15,
                 what="the HL7 bind error in the log")
        from tests.support.peers import CT_DIR, storescu

        one = sorted(CT_DIR.glob("*.dcm"))[0]
        storescu([one], pas.port)
        assert pas.status()["instances"] == 1
        # Not enrolled, no DICOMweb region: a new study schedules no prefetch that could
        # only fail.
        wait_for(lambda: re.search(r"stable: 1 instance\b", pas.log()), 30, what="the study routed")
        assert requests(pas) == []


def test_an_order_cancelled_while_its_fetch_runs_stays_cancelled(tmp_path: Any) -> None:
    """NW (due now), its fetch running against a region that does not answer, then CA
    (ACKed AA), then the region's connection closes: the request is cancelled and never
    tried again. Before, the cancel touched only a pending request: while the fetch ran it
    changed nothing, the failed attempt made the request pending again ("waiting for the
    link", not even counted), and the cancelled order's priors would have been fetched
    once the link came back."""
    region = SilentPeer()
    pas = pas_with_hl7(tmp_path, PAS_PREFETCH__DICOMWEB_URL=(
        f"http://127.0.0.1:{region.port}/dicom-web"))
    try:
        (ack,) = send(pas, orm("RC1", "ORD40"))
        assert msa(ack)[:2] == ("AA", "RC1")
        wait_for(lambda: region.held and requests(pas)[0]["state"] == "running", 30,
                 what="the fetch running, its search held by the region")
        (ack,) = send(pas, orm("RC2", "ORD40", control_code="CA"))
        assert msa(ack)[:2] == ("AA", "RC2")
        region.close()
        wait_for(lambda: "prefetch 1 for P100" in pas.log(),
                 30, what="the attempt ended")
        (row,) = requests(pas)
        assert (row["state"], row["last_error"]) == ("cancelled", None), row
        assert "prefetch 1 for P100: cancelled while it ran" in pas.log()
    finally:
        region.close()
        pas.stop()


def test_an_order_cancelled_and_ordered_again_while_its_fetch_runs_is_that_fetch(
        tmp_path: Any) -> None:
    """NW, its fetch running (the region holds the search), CA, NW again: the request is
    running, the attempt under way is its (one connection to the region, not two), and
    when that attempt meets the closed link the request waits for the link as any other.
    Revived as pending, a second attempt ran beside the first, and whichever ended second
    logged the active order as "cancelled while it ran"."""
    region = SilentPeer()
    pas = pas_with_hl7(tmp_path, PAS_PREFETCH__DICOMWEB_URL=(
        f"http://127.0.0.1:{region.port}/dicom-web"))
    try:
        send(pas, orm("RR1", "ORD41"))
        wait_for(lambda: region.held and requests(pas)[0]["state"] == "running", 30,
                 what="the fetch running, its search held by the region")
        acks = send(pas, orm("RR2", "ORD41", control_code="CA"), orm("RR3", "ORD41"))
        assert [msa(a)[:2] for a in acks] == [("AA", "RR2"), ("AA", "RR3")]
        (row,) = requests(pas)
        assert (row["state"], row["times_requested"]) == ("running", 2), row
        region.close()
        wait_for(lambda: "prefetch 1 for P100" in pas.log(), 30, what="the attempt ended")
        (row,) = requests(pas)
        assert row["state"] == "pending" and row["last_error"].startswith(
            "waiting for the link"), row
        assert len(region.held) == 1
        assert "cancelled while it ran" not in pas.log()
    finally:
        region.close()
        pas.stop()


def test_pas_status_says_when_the_prefetch_waits_fails_or_is_late(tmp_path: Any) -> None:
    """A region answering 500 (an order failed for good, max_attempts = 1), then none at
    all (an order for an exam already past waits for the link): ``pas status`` says both,
    and that the waiting one is late, in its text and its JSON. It said nothing of the
    prefetch (only of a certificate refused): the region's outage and the orders given up
    were seen only by whoever ran ``pas prefetch list``."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_error(500, "archive database offline")

        def log_message(self, *args: Any) -> None:
            pass

    region = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    serve_in_thread(region)
    pas = pas_with_hl7(tmp_path, PAS_PREFETCH__MAX_ATTEMPTS="1", PAS_PREFETCH__DICOMWEB_URL=(
        f"http://127.0.0.1:{region.server_address[1]}/dicom-web"))
    try:
        send(pas, orm("ST1", "ORD50"))
        wait_for(lambda: requests(pas)[0]["state"] == "failed", 30, what="the order failed")
        region.shutdown()
        region.server_close()
        send(pas, orm("ST2", "ORD51", patient="P101", when="20200101120000"))
        wait_for(lambda: (requests(pas)[0]["last_error"] or "").startswith(
            "waiting for the link"), 30, what="the second order waiting for the link")
        summary = pas.status()["prefetch"]
        assert {key: summary[key] for key in ("pending", "running", "waiting_for_link",
                                              "failed_24h", "late")} == {
            "pending": 1, "running": 0, "waiting_for_link": 1, "failed_24h": 1, "late": 1}
        assert "500" in summary["last_failure"]
        text = " ".join(pas.cli("status").stdout.split())
        assert "prefetch: 1 prefetch request waiting for the link since " in text
        assert "prefetch: 1 prefetch request failed in the last 24 h (pas prefetch list " \
               "--state failed), the last: " in text
        assert "prefetch: 1 prefetch request late: the exam time passed, the priors not on " \
               "site yet (1 pending, 0 running)" in text
    finally:
        region.server_close()
        pas.stop()


def test_the_status_page_and_metrics_say_the_region_is_unreachable_and_priors_late(
        pas_hl7: PasProcess) -> None:
    """``pas status`` said "N prefetch requests waiting for the link since ..." and "1 late";
    the status page listed its rows "pending" and said neither, and /metrics had no gauge an
    alert could watch. The region here is a closed port: an order due now waits for it."""
    import httpx

    from tests.test_ops_fleet import metric

    send(pas_hl7, orm("LATE1", "ORDLATE", patient="P777", when="20200101120000"))
    wait_for(lambda: any(r["dedup_key"] == "order:P777|HOSP|ORDLATE" and str(
        r["last_error"] or "").startswith("waiting for the link") for r in requests(pas_hl7)),
        30, what="the order waiting for the link")
    status = json.loads(pas_hl7.cli("status", "--json").stdout)["prefetch"]
    assert status["waiting_for_link"] >= 1 and status["late"] >= 1, status
    base = f"http://127.0.0.1:{pas_hl7.http_port}"
    page = httpx.get(f"{base}/", timeout=10).text
    assert re.search(r'<p id=prefetch-trouble><span class="state down">\d+ requests? waiting '
                     r"for the link to the region since [^<]+: ", page), page
    assert re.search(r'<span class="state down">\d+ requests? late: the exam time passed, '
                     r"the priors not on site</span>", page)
    assert re.search(r"<td>(pending|running): waiting for the link \(late\)</td>", page), page
    scraped = httpx.get(f"{base}/metrics", timeout=10).text
    # Both only grow here (the region never answers, time passes): read after the status.
    assert (metric(scraped, "pas_prefetch_waiting_for_link") or 0) >= status["waiting_for_link"]
    assert (metric(scraped, "pas_prefetch_late") or 0) >= status["late"]


def test_prefetch_show_says_which_messages_made_changed_and_cancelled_a_request(
        pas_hl7: PasProcess) -> None:
    """``pas prefetch show`` printed the row as JSON, times in epoch seconds, and which
    control ids touched an order was in no output (an interface engineer's first question).
    Now a table, the messages listed; ``--json`` has them too."""
    send(pas_hl7, orm("SH1", "ORDSH", patient="P880", when="20991231120000"),
         orm("SH2", "ORDSH", patient="P880", when="20991230080000", control_code="XO",
             modality="MR"),
         orm("SH3", "ORDSH", patient="P880", control_code="CA"))
    (row,) = [r for r in requests(pas_hl7) if r["dedup_key"] == "order:P880|HOSP|ORDSH"]
    detail = json.loads(pas_hl7.cli("prefetch", "show", str(row["id"]), "--json").stdout)
    assert [(m["message_key"], m["message_type"], m["ack_code"]) for m in
            detail["messages"]] == [("RIS|HOSP|SH1", "ORM^O01", "AA"),
                                    ("RIS|HOSP|SH2", "ORM^O01", "AA"),
                                    ("RIS|HOSP|SH3", "ORM^O01", "AA")], detail["messages"]
    shown = pas_hl7.cli("prefetch", "show", str(row["id"])).stdout
    cells = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in shown.split("HL7 message")[0].splitlines() if line.count("│") == 3}
    assert cells["state"] == "cancelled" and cells["modality, body part"] == "MR, -", cells
    assert cells["order, appointment or visit"] == "order:P880|HOSP|ORDSH"
    assert re.fullmatch(r"2099-12-30 08:00", cells["exam"]), cells
    assert "3 HL7 messages" in shown and "RIS|HOSP|SH3" in shown and "0 prior studies" in shown
