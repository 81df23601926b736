"""Patient merges (HL7 ADT^A40, the older A34 / A18, and A47's change of a patient identifier)
sent over MLLP to a real ``pas run``.

What is proven: a merge moves the prior patient's (MRG-1) prefetch requests not yet done to
the surviving patient (PID-3), re-keyed so that the RIS's later messages about those orders
find them; an order the surviving patient already has is not doubled (the prior patient's
request is cancelled, naming the one that holds it); requests already ended stay as they
were; the ACK (AA) says what moved, and the audit trail has a ``merge`` row; a resend
changes nothing; a malformed merge is NAKed naming the problem and changes nothing; a
request whose fetch was running when its patient was merged searches again for the
surviving patient once that attempt ends. Requests are read with ``pas prefetch list
--json``. Refused (AR 200) before: a John Doe's orders searched the region for the
temporary id and fetched no prior of the real patient. ADT^A47 (a wrong identifier
corrected) was still refused AR 200: the requests kept searching for the wrong one.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import hl7
import pytest
from hl7.client import MLLPClient

from tests.support.peers import PasProcess, pas_with_hl7, wait_for
from tests.support.peers import prefetch_requests as requests
from tests.support.serving import serve_in_thread

FAR = "20991231120000"


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pas = pas_with_hl7(tmp_path_factory.mktemp("pas_merge"))
    yield pas
    pas.stop()


def send(pas: PasProcess, *messages: str) -> list[hl7.Message]:
    with MLLPClient("127.0.0.1", pas.hl7_port) as client:  # type: ignore[attr-defined]
        answers = [client.send_message(m) for m in messages]
    return [hl7.parse(a.decode().strip("\x0b\x1c\r")) for a in answers]


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    return (str(ack["MSA.F1"]), str(ack["MSA.F2"]), str(ack["MSA.F3"]) if len(
        ack.segment("MSA")) > 3 else "")


def orm(control: str, order: str, patient: str, control_code: str = "NW",
        modality: str = "CT", when: str = FAR) -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261205120000||ORM^O01|{control}|P|2.5",
        f"PID|1||{patient}^^^HOSP^MR||DOE^JOHN",
        f"ORC|{control_code}|{order}|||SC||^^^{when}",
        f"OBR|1|{order}||CT^CT||||||||||||||ACC{order}||||||{modality}",
    ])


def merge(control: str, *segments: str, event: str = "A40") -> str:
    structure = "ADT_A30" if event == "A47" else "ADT_A39"  # v2.5's for A47: one PID, one MRG
    return "\r".join([
        f"MSH|^~\\&|ADT|HOSP|PAS|HOSP|20261205120000||ADT^{event}^{structure}|{control}|P|2.5",
        f"EVN|{event}|20261205120000",
        *segments,
    ])


def listed(pas: PasProcess) -> dict[int, dict[str, Any]]:
    """Every request, as ``pas prefetch list --json`` shows it, by id."""
    out = json.loads(pas.cli("prefetch", "list", "--json").stdout)
    return {r["id"]: r for r in out["requests"]}


def shape(pas: PasProcess) -> list[tuple[Any, ...]]:
    """What a merge may change."""
    return [(r["id"], r["dedup_key"], r["patient_id"], r["issuer"], r["state"],
             r["times_requested"]) for r in requests(pas)]


def test_a40_moves_a_john_doe_s_pending_orders_to_the_real_patient(pas: PasProcess) -> None:
    """John Doe JD1 has three orders (CT, MR, one cancelled) and an appointment; the real
    patient R1 already has the MR order (the RIS sent it again under R1 first) and an order
    of its own; another patient is unrelated. The merge moves the CT and the appointment,
    cancels JD1's MR request as held by R1's, leaves the cancelled one and the others."""
    send(pas, orm("J1", "M-CT", "JD1"), orm("J2", "M-MR", "JD1", modality="MR"),
         orm("J3", "M-OLD", "JD1"), orm("J4", "M-OLD", "JD1", control_code="CA"),
         orm("R1", "M-MR", "R1", modality="MR"), orm("R2", "M-R1", "R1"),
         orm("O1", "M-OTHER", "OTHER1"),
         "\r".join(["MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261205120000||SIU^S12|S1|P|2.5",
                    "SCH|APPT-JD1||||||||||^^^" + FAR, "PID|1||JD1^^^HOSP^MR"]))
    before = listed(pas)
    ids = {r["dedup_key"]: i for i, r in before.items()}
    ct, mr, old, appt = (ids["order:JD1|HOSP|M-CT"], ids["order:JD1|HOSP|M-MR"],
                         ids["order:JD1|HOSP|M-OLD"], ids["appointment:JD1|HOSP|APPT-JD1"])
    real_mr, real_own, other = (ids["order:R1|HOSP|M-MR"], ids["order:R1|HOSP|M-R1"],
                                ids["order:OTHER1|HOSP|M-OTHER"])
    assert before[old]["state"] == "cancelled"
    assert {before[i]["state"] for i in (ct, mr, appt, real_mr, real_own, other)} == {"pending"}

    (ack,) = send(pas, merge("MG1", "PID|1||R1^^^HOSP^MR||DOE^JOHN",
                             "MRG|JD1^^^HOSP^MR"))
    code, control, text = msa(ack)
    assert (code, control) == ("AA", "MG1")
    assert text == ("patient JD1 (HOSP) into R1 (HOSP): 2 prefetch requests moved, 1 request "
                    "cancelled (the surviving patient's held the same order)")

    after = listed(pas)
    assert len(after) == len(before)  # nothing created
    for moved, key in ((ct, "order:R1|HOSP|M-CT"), (appt, "appointment:R1|HOSP|APPT-JD1")):
        assert (after[moved]["patient_id"], after[moved]["issuer"], after[moved]["dedup_key"],
                after[moved]["state"]) == ("R1", "HOSP", key, "pending")
        assert after[moved]["due_at"] == before[moved]["due_at"]
    assert after[ct]["modality"] == "CT"
    # The MR order: one request of R1's, JD1's cancelled naming it.
    assert (after[mr]["patient_id"], after[mr]["state"]) == ("JD1", "cancelled")
    assert after[mr]["last_error"] == (f"patient JD1 (HOSP) into R1 (HOSP) merged: request "
                                       f"{real_mr} already holds this order")
    assert [i for i, r in after.items() if r["patient_id"] == "R1" and r["modality"] == "MR"
            and r["state"] == "pending"] == [real_mr]
    # Ended requests, and other patients', are as they were.
    for kept in (old, real_mr, real_own, other):
        assert after[kept] == before[kept], kept
    (row,) = json.loads(pas.cli("audit", "--event", "merge", "--json").stdout)
    assert row["patient"] == "JD1\\R1" and row["outcome"] == "success"
    assert row["detail"] == (f"ADT^A40: patient JD1 (HOSP) into R1 (HOSP); prefetch requests "
                             f"not yet done moved: #{ct}, #{appt}; cancelled, the surviving "
                             f"patient's request already holding the order: #{mr} (held by "
                             f"#{real_mr})")

    # The RIS's next message about the CT order names R1: it finds the moved request.
    (ack,) = send(pas, orm("R3", "M-CT", "R1", control_code="XO", modality="MR"))
    assert msa(ack)[0] == "AA"
    later = listed(pas)
    assert len(later) == len(before)
    assert (later[ct]["times_requested"], later[ct]["modality"]) == (2, "MR")
    # ... and a cancel of the appointment under R1 cancels the moved one.
    (ack,) = send(pas, "\r".join([
        "MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261205120000||SIU^S15|S2|P|2.5",
        "SCH|APPT-JD1||||||||||^^^" + FAR, "PID|1||R1^^^HOSP^MR"]))
    assert msa(ack)[0] == "AA"
    assert listed(pas)[appt]["state"] == "cancelled"
    # The same merge resent: recognised, nothing changes.
    shown = shape(pas)
    (ack,) = send(pas, merge("MG1", "PID|1||R1^^^HOSP^MR||DOE^JOHN", "MRG|JD1^^^HOSP^MR"))
    assert msa(ack)[0] == "AA" and "duplicate" in msa(ack)[2]
    assert shape(pas) == shown


def test_an_order_or_appointment_resent_after_its_patient_was_merged_changes_nothing(
        pas: PasProcess) -> None:
    """Found in review (2026-12-07): an ORM and an SIU^S12 for John Doe JD9, an A40 merging
    JD9 into R9, then the ORM and the SIU resent unchanged: each resend was compared with its
    request's key, re-keyed to R9 by the merge, taken as new ("control id ... was already
    used") and made a request for the merged-away JD9 again (invariant 6). Each message's
    meaning is recorded now: the resends change nothing. A control id reused for another
    order is still a new message, logged."""
    order = orm("JR1", "M-JR", "JD9")
    appointment = "\r".join(["MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261205120000||SIU^S12|JS1|P|2.5",
                             "SCH|APPT-JD9||||||||||^^^" + FAR, "PID|1||JD9^^^HOSP^MR"])
    assert [msa(a)[:2] for a in send(pas, order, appointment)] == [("AA", "JR1"),
                                                                   ("AA", "JS1")]
    (ack,) = send(pas, merge("MG9", "PID|1||R9^^^HOSP^MR||DOE^JOHN", "MRG|JD9^^^HOSP^MR"))
    assert msa(ack)[2] == "patient JD9 (HOSP) into R9 (HOSP): 2 prefetch requests moved"

    def mine() -> list[dict[str, Any]]:
        return [r for r in requests(pas) if r["patient_id"] in ("JD9", "R9")]

    before = mine()
    assert sorted((r["dedup_key"], r["state"], r["times_requested"]) for r in before) == [
        ("appointment:R9|HOSP|APPT-JD9", "pending", 1), ("order:R9|HOSP|M-JR", "pending", 1)]
    acks = send(pas, order, appointment)
    assert [msa(a) for a in acks] == [
        ("AA", "JR1", "duplicate message: already processed"),
        ("AA", "JS1", "duplicate message: already processed")]
    assert mine() == before  # JD9 had a new order and a new appointment
    assert "control id JR1 (MSH-10) was already used" not in pas.log()
    assert "control id JS1 (MSH-10) was already used" not in pas.log()

    # JR1 reused for another order (a RIS numbering from 1 again): new, and logged.
    (ack,) = send(pas, orm("JR1", "M-JR2", "R9"))
    assert msa(ack) == ("AA", "JR1", "")
    assert "control id JR1 (MSH-10) was already used for order:JD9|HOSP|M-JR; this message " \
           "names order:R9|HOSP|M-JR2: taken as a new message" in pas.log()
    assert [r["dedup_key"] for r in mine() if r not in before] == ["order:R9|HOSP|M-JR2"]


def test_a40_with_assigning_authorities_given_as_oids_alone(pas: PasProcess) -> None:
    """An order and a merge whose PID-3 and MRG-1 name their assigning authority by OID
    alone (CX-4.2, ``^^^&1.2.250.1.71.4.2.1&ISO``, as IHE PAM France senders write it): the
    request's issuer is the OID and the merge finds it. Before, the issuer was read from
    CX-4.1 only and stored empty, and another authority's patient of the same number with
    no issuer was the same patient to PAS."""
    oid = "1.2.250.1.71.4.2.1"
    (ack,) = send(pas, orm("OID1", "M-OID", "JD7").replace("^^^HOSP^MR", f"^^^&{oid}&ISO^PI"))
    assert msa(ack)[0] == "AA"
    (request,) = [r for r in listed(pas).values() if r["dedup_key"].endswith("|M-OID")]
    assert (request["patient_id"], request["issuer"], request["dedup_key"]) == \
        ("JD7", oid, f"order:JD7|{oid}|M-OID")
    (ack,) = send(pas, merge("MGOID", f"PID|1||R7^^^&{oid}&ISO^PI||DOE^JOHN",
                             f"MRG|JD7^^^&{oid}&ISO^PI"))
    assert msa(ack)[:2] == ("AA", "MGOID")
    assert msa(ack)[2] == f"patient JD7 ({oid}) into R7 ({oid}): 1 prefetch request moved"
    moved = listed(pas)[request["id"]]
    assert (moved["patient_id"], moved["issuer"], moved["dedup_key"], moved["state"]) == \
        ("R7", oid, f"order:R7|{oid}|M-OID", "pending")


def test_older_forms_and_several_patients_in_one_a40(pas: PasProcess) -> None:
    """A18 (v2.2) and A34 with MRG-1 giving no issuer (the surviving patient's is taken), and
    one A40 merging two patients: each pair moves its own."""
    send(pas, orm("K1", "K-A18", "JD18"), orm("K2", "K-A34", "JD34"),
         orm("K3", "K-X", "JDX"), orm("K4", "K-Y", "JDY"))
    acks = send(pas, merge("MG18", "PID|1||R18^^^HOSP", "MRG|JD18", event="A18"),
                merge("MG34", "PID|1||R34^^^HOSP", "MRG|JD34", event="A34"),
                merge("MG2", "PID|1||RX^^^HOSP", "MRG|JDX^^^HOSP",
                      "PID|2||RY^^^HOSP", "MRG|JDY^^^HOSP"))
    assert [msa(a)[:2] for a in acks] == [("AA", "MG18"), ("AA", "MG34"), ("AA", "MG2")]
    assert msa(acks[2])[2] == ("patient JDX (HOSP) into RX (HOSP): 1 prefetch request moved; "
                               "patient JDY (HOSP) into RY (HOSP): 1 prefetch request moved")
    keys = {r["dedup_key"] for r in listed(pas).values() if r["state"] == "pending"}
    assert {"order:R18|HOSP|K-A18", "order:R34|HOSP|K-A34", "order:RX|HOSP|K-X",
            "order:RY|HOSP|K-Y"} <= keys
    assert not {k for k in keys if k.split("|")[0] in (
        "order:JD18", "order:JD34", "order:JDX", "order:JDY")}


def test_a47_moves_the_wrong_identifier_s_pending_requests_to_the_corrected_one(
        pas: PasProcess) -> None:
    """ADT^A47 (change patient identifier list, HL7 v2.5 3.3.47): the registration typed IPP
    W47 where the patient's is C47, and the RIS ordered under W47 (a CT, an MR, a cancelled
    order) and made an appointment; C47 already has an order of its own, another patient is
    unrelated. The correction moves W47's requests not yet done to C47, re-keyed, and leaves
    the cancelled one and the others; ACK, audit and resend as for a merge. Refused AR 200
    before: the requests went on searching the region for W47, which has no history."""
    send(pas, orm("W1", "W-CT", "W47"), orm("W2", "W-MR", "W47", modality="MR"),
         orm("W3", "W-OLD", "W47"), orm("W4", "W-OLD", "W47", control_code="CA"),
         orm("C1", "C-OWN", "C47"), orm("Q1", "Q-OTHER", "OTHER47"),
         "\r".join(["MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261205120000||SIU^S12|WS1|P|2.5",
                    "SCH|APPT-W47||||||||||^^^" + FAR, "PID|1||W47^^^HOSP^MR"]))
    before = {r["id"]: r for r in requests(pas)}
    ids = {r["dedup_key"]: i for i, r in before.items()}
    ct, mr, old, appt = (ids["order:W47|HOSP|W-CT"], ids["order:W47|HOSP|W-MR"],
                         ids["order:W47|HOSP|W-OLD"], ids["appointment:W47|HOSP|APPT-W47"])
    own, other = ids["order:C47|HOSP|C-OWN"], ids["order:OTHER47|HOSP|Q-OTHER"]
    assert before[old]["state"] == "cancelled"
    assert {before[i]["state"] for i in (ct, mr, appt, own, other)} == {"pending"}

    (ack,) = send(pas, merge("CH47", "PID|1||C47^^^HOSP^MR||DOE^JANE", "MRG|W47^^^HOSP^MR",
                             event="A47"))
    # Said as what it is: an identifier corrected, not two patients merged.
    assert msa(ack) == ("AA", "CH47", "identifier W47 (HOSP) corrected to C47 (HOSP): 3 "
                        "prefetch requests moved")
    assert str(ack.segment("MSH")[9]) == "ACK^A47^ACK"

    after = {r["id"]: r for r in requests(pas)}
    assert len(after) == len(before)  # nothing created
    for moved, key in ((ct, "order:C47|HOSP|W-CT"), (mr, "order:C47|HOSP|W-MR"),
                       (appt, "appointment:C47|HOSP|APPT-W47")):
        assert (after[moved]["patient_id"], after[moved]["issuer"], after[moved]["dedup_key"],
                after[moved]["state"], after[moved]["due_at"]) == (
            "C47", "HOSP", key, "pending", before[moved]["due_at"])
    for kept in (old, own, other):
        assert after[kept] == before[kept], kept
    rows = [r for r in json.loads(pas.cli("audit", "--event", "merge", "--json").stdout)
            if r["detail"].startswith("ADT^A47")]
    assert [(r["patient"], r["outcome"], r["detail"]) for r in rows] == [(
        "C47\\W47", "success", f"ADT^A47: identifier W47 (HOSP) corrected to C47 (HOSP); "
        f"prefetch requests not yet done moved: #{ct}, #{mr}, #{appt}")]

    # The RIS's next message about the CT order names C47: it finds the moved request.
    (ack,) = send(pas, orm("C2", "W-CT", "C47"))
    assert msa(ack)[0] == "AA"
    later = {r["id"]: r for r in requests(pas)}
    assert len(later) == len(before) and later[ct]["times_requested"] == 2
    # The same A47 resent: recognised, nothing changes.
    shown = shape(pas)
    (ack,) = send(pas, merge("CH47", "PID|1||C47^^^HOSP^MR||DOE^JANE", "MRG|W47^^^HOSP^MR",
                             event="A47"))
    assert msa(ack)[0] == "AA" and "duplicate" in msa(ack)[2]
    assert shape(pas) == shown


@pytest.mark.parametrize(("event", "segments", "code", "reason"), [
    ("A40", ("PID|1||R9^^^HOSP",), "AE",
     "MRG segment is missing: ADT^A40 names the patient merged"),
    ("A40", ("PID|1||R9^^^HOSP", "MRG|^^^HOSP"), "AE",
     "MRG-1 prior patient identifier is missing"),
    ("A40", ("PID|1||JD9^^^HOSP", "MRG|JD9^^^HOSP"), "AE",
     "MRG-1 prior patient identifier JD9 (issuer HOSP) is PID-3's own: a patient cannot be "
     "merged into itself"),
    ("A40", ("MRG|JD9^^^HOSP", "PID|1||R9^^^HOSP"), "AE", "MRG segment before any PID"),
    ("A40", ("PID|1||^^^HOSP", "MRG|JD9^^^HOSP"), "AE", "PID-3 patient identifier is missing"),
    ("A40", ("PID|1||R9^^^HOSP", "MRG|JD9^^^HOSP", "PID|2||R8^^^HOSP"), "AE",
     "MRG segment is missing (PID #2)"),
    # A47 (change patient identifier list) is read by the same code: refused alike.
    ("A47", ("PID|1||R9^^^HOSP",), "AE",
     "MRG segment is missing: ADT^A47 names the identifier corrected"),
    ("A47", ("PID|1||R9^^^HOSP", "MRG|^^^HOSP"), "AE",
     "MRG-1 prior patient identifier is missing"),
    ("A47", ("PID|1||JD9^^^HOSP", "MRG|JD9"), "AE",
     "MRG-1 prior patient identifier JD9 (issuer HOSP) is PID-3's own: an identifier cannot "
     "be corrected to itself"),
    ("A47", ("MRG|JD9^^^HOSP", "PID|1||R9^^^HOSP"), "AE", "MRG segment before any PID"),
], ids=["no-mrg", "empty-mrg-1", "same-id", "mrg-first", "empty-pid-3", "second-pid-no-mrg",
        "a47-no-mrg", "a47-empty-mrg-1", "a47-same-id", "a47-mrg-first"])
def test_a_malformed_merge_is_refused_naming_it_and_changes_nothing(
        pas: PasProcess, event: str, segments: tuple[str, ...], code: str,
        reason: str) -> None:
    send(pas, orm("B1", "B-JD9", "JD9"))
    before = shape(pas)
    (ack,) = send(pas, merge(f"BAD-{event}-{abs(hash(segments))}", *segments, event=event))
    ack_code, _, text = msa(ack)
    assert ack_code == code
    assert reason in text, text
    assert reason in str(ack["ERR.F8"])
    assert str(ack.segment("MSH")[9]) == f"ACK^{event}^ACK"
    assert shape(pas) == before
    assert [r["patient_id"] for r in requests(pas) if r["dedup_key"].endswith("|B-JD9")] == \
        ["JD9"]


class HeldRegion:
    """A DICOMweb region on loopback whose QIDO-RS study searches wait until
    :meth:`release`, then answer no study; it notes the PatientID each search asked for."""

    def __init__(self) -> None:
        self.searched: list[str] = []
        self.gate = threading.Event()
        region = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                if url.path.endswith("/studies"):
                    region.searched.append(parse_qs(url.query).get("PatientID", [""])[0])
                    region.gate.wait(30)
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"[]")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        serve_in_thread(self.server)

    def release(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_request_merged_while_its_fetch_runs_searches_again_for_the_real_patient(
        tmp_path: Any) -> None:
    """A John Doe's order due now, its search held by the region; the merge moves it while
    it runs; the region then answers (no prior for the temporary id): the request searches
    again, for the real patient, and only then is fetched. Without that, the attempt for the
    temporary id ended the request as fetched and the real patient's priors were never
    searched for."""
    region = HeldRegion()
    pas = pas_with_hl7(tmp_path, PAS_PREFETCH__DICOMWEB_URL=(
        f"http://127.0.0.1:{region.port}/dicom-web"))
    try:
        (ack,) = send(pas, orm("T1", "T-CT", "JDT", when=""))
        assert msa(ack)[0] == "AA"
        wait_for(lambda: region.searched == ["JDT"] and requests(pas)[0]["state"] == "running",
                 30, what="the fetch running, its search held by the region")
        (ack,) = send(pas, merge("TM1", "PID|1||RT^^^HOSP", "MRG|JDT^^^HOSP"))
        assert msa(ack)[:2] == ("AA", "TM1")
        (row,) = requests(pas)
        assert (row["patient_id"], row["state"]) == ("RT", "running")
        region.release()
        wait_for(lambda: requests(pas)[0]["state"] == "fetched", 30, what="the request done")
        assert region.searched == ["JDT", "RT"]
        (row,) = listed(pas).values()
        assert (row["patient_id"], row["dedup_key"], row["attempts"]) == (
            "RT", "order:RT|HOSP|T-CT", 1)
        assert "prefetch 1 for JDT: its order changed while it ran (the patient merged" in \
            pas.log()
    finally:
        region.close()
        pas.stop()


def test_an_order_changed_while_its_fetch_runs_or_after_it_is_fetched_again(
        tmp_path: Any) -> None:
    """An ``ORC|XO`` turning a CT into an MR while the CT's fetch ran was ACKed AA and lost:
    only a pending request took a change, the attempt ended as fetched with the CT's rule,
    and the MR's priors were never searched for (an interface engine never resends an ACKed
    message). Now the attempt's end sees it and the request searches again; a change after
    it was fetched does the same, and an exam moved days later waits for its new due time."""
    region = HeldRegion()
    pas = pas_with_hl7(tmp_path, PAS_PREFETCH__DICOMWEB_URL=(
        f"http://127.0.0.1:{region.port}/dicom-web"))
    try:
        (ack,) = send(pas, orm("C1", "C-CT", "PC", when=""))
        assert msa(ack)[0] == "AA"
        wait_for(lambda: region.searched == ["PC"] and requests(pas)[0]["state"] == "running",
                 30, what="the fetch running, its search held by the region")
        (ack,) = send(pas, orm("C2", "C-CT", "PC", control_code="XO", modality="MR", when=""))
        assert msa(ack)[:2] == ("AA", "C2")
        (row,) = requests(pas)
        assert (row["state"], row["modality"]) == ("running", "MR")  # the attempt's end decides
        region.release()
        wait_for(lambda: requests(pas)[0]["state"] == "fetched", 30, what="the request done")
        assert region.searched == ["PC", "PC"]  # searched again, for the MR
        (row,) = listed(pas).values()
        assert (row["modality"], row["attempts"], row["times_requested"]) == ("MR", 1, 2), row
        assert "prefetch 1 for PC: its order changed while it ran" in pas.log()

        # Fetched, then changed again (the body part): searched again at once.
        (ack,) = send(pas, orm("C3", "C-CT", "PC", control_code="XO", modality="US", when=""))
        assert msa(ack)[0] == "AA"
        wait_for(lambda: len(region.searched) == 3 and requests(pas)[0]["state"] == "fetched",
                 30, what="the changed request fetched again")
        assert requests(pas)[0]["modality"] == "US"
        # Fetched, then the exam moved days later: pending, due lead_time_h before it.
        (ack,) = send(pas, orm("C4", "C-CT", "PC", control_code="XO", modality="US"))
        assert msa(ack)[0] == "AA"
        (row,) = requests(pas)
        assert row["state"] == "pending" and row["next_attempt_at"] == row["due_at"], row
        assert row["due_at"] > time.time() + 86_400 and len(region.searched) == 3, row
        # The same message content again (a RIS's resend under a new control id): no change.
        send(pas, orm("C5", "C-CT", "PC", control_code="XO", modality="US"))
        assert {k: v for k, v in requests(pas)[0].items() if k not in (
            "times_requested", "updated_at")} == {
            k: v for k, v in row.items() if k not in ("times_requested", "updated_at")}
    finally:
        region.close()
        pas.stop()
