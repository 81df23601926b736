"""HL7 orders carrying several procedures (several ORC/OBR groups), against a real ``pas run``
over MLLP; the last test fetches both procedures' priors from a real hub and Orthanc.

Found (2026-12-04): an ORM^O01 with a CT thorax and a CT abdomen, each its own ORC-2 order
number, accession and modality, registered the FIRST group only (ACKed AA): the second
procedure's priors were never fetched, and a later cancel of it found nothing. A second group
that was bad (no order number) was ignored, the first stored and ACKed AA.

Now each group is a request of its own, one ACK and one transaction per message: a bad group
refuses the whole message naming the group, nothing stored; more than 50 groups, or a group
holding a second OBR, are refused by name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
from hl7.client import MLLPClient

from tests.support.hub import HubProcess, enroll
from tests.support.peers import (
    CT_DIR,
    Orthanc,
    PasProcess,
    pas_with_hl7,
    port_open,
    read_rows,
    wait_for,
)
from tests.support.peers import prefetch_requests as requests

FAR = "20991231120000"  # exams this far ahead stay pending: due 12 h before


@pytest.fixture(scope="module")
def pas_groups(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pas = pas_with_hl7(tmp_path_factory.mktemp("pas_hl7_groups"), PAS_PREFETCH__LEAD_TIME_H="12")
    yield pas
    pas.stop()


def group(order: str, modality: str = "CT", body: str = "CHEST", when: str = FAR,
          control: str = "NW", status: str = "SC") -> list[str]:
    """One ORC/OBR group: order ``order``, accession ``ACC<order>``."""
    return [f"ORC|{control}|{order}|F{order}||{status}||^^^{when}",
            f"OBR|1|{order}|F{order}|{modality}{body}^{modality} {body}|||||||||||{body}^{body}"
            f"|||ACC{order}||||||{modality}",
            "NTE|1||a comment between the groups"]


def orm(control: str, *groups: list[str], patient: str = "PG1", kind: str = "ORM^O01") -> str:
    return "\r".join([f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261204120000||{kind}|{control}|P|2.5",
                      f"PID|1||{patient}^^^HOSP^MR||DOE^JANE"]
                     + [segment for g in groups for segment in g])


def send(pas: PasProcess, message: str) -> tuple[str, str]:
    """MSA-1 and MSA-3 (its HL7 escapes read back) of the answer to ``message``."""
    with MLLPClient("127.0.0.1", pas.hl7_port) as client:  # type: ignore[attr-defined]
        ack = hl7.parse(client.send_message(message).decode().strip("\x0b\x1c\r"))
    text = str(ack["MSA.F3"]) if len(ack.segment("MSA")) > 3 else ""
    return str(ack["MSA.F1"]), text.replace("\\S\\", "^").replace("\\F\\", "|")


def rows_of(pas: PasProcess, patient: str) -> dict[str, dict[str, Any]]:
    """The patient's requests by order number."""
    return {r["dedup_key"].rsplit("|", 1)[1]: r for r in requests(pas)
            if r["patient_id"] == patient}


def shape(pas: PasProcess) -> list[tuple[Any, ...]]:
    return [(r["id"], r["dedup_key"], r["state"], r["times_requested"], r["scheduled_at"])
            for r in requests(pas)]


def test_each_order_group_is_a_request_of_its_own(pas_groups: PasProcess) -> None:
    """CT thorax + MR abdomen in one ORM: two requests, each with its own accession, modality,
    body part and exam time (only the first existed); the message resent changes nothing."""
    message = orm("G1", group("THX1", "CT", "CHEST", "20991230080000"),
                  group("ABD1", "MR", "ABDOMEN", "20991230093000"), patient="PG1")
    assert send(pas_groups, message) == ("AA", "")
    rows = rows_of(pas_groups, "PG1")
    assert sorted(rows) == ["ABD1", "THX1"]
    got = {order: (r["accession_number"], r["modality"], r["body_part"], r["state"])
           for order, r in rows.items()}
    assert got == {"THX1": ("ACCTHX1", "CT", "CHEST", "pending"),
                   "ABD1": ("ACCABD1", "MR", "ABDOMEN", "pending")}
    from appliance.prefetch.messages import parse_hl7_time

    assert rows["ABD1"]["scheduled_at"] == parse_hl7_time("20991230093000")
    assert rows["THX1"]["scheduled_at"] == parse_hl7_time("20991230080000")
    before = shape(pas_groups)
    assert send(pas_groups, message) == ("AA", "duplicate message: already processed")
    assert shape(pas_groups) == before
    assert all(r["times_requested"] == 1 for r in rows_of(pas_groups, "PG1").values())
    # The same control id for other orders (a RIS numbering from 1 again) is a new message.
    reused = orm("G1", group("THX2"), group("ABD2", "MR", "ABDOMEN"), patient="PG1")
    assert send(pas_groups, reused) == ("AA", "")
    assert sorted(rows_of(pas_groups, "PG1")) == ["ABD1", "ABD2", "THX1", "THX2"]
    before = shape(pas_groups)
    assert send(pas_groups, reused) == ("AA", "duplicate message: already processed")
    assert shape(pas_groups) == before


def test_omi_groups_each_read_from_their_own_tq1_and_ipc(pas_groups: PasProcess) -> None:
    omi = "\r".join([
        "MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261204120000||OMI^O23|GO1|P|2.5",
        "PID|1||PG2^^^HOSP^MR||POE^EVE",
        "ORC|NW|OMI1", "TQ1|1||||||20991203100000", "OBR|1|OMI1||USABD^US abdomen",
        "IPC|ACCUS|RP1|1.2.3.4|SPS1|US",
        "ORC|NW|OMI2", "TQ1|1||||||20991203110000", "OBR|1|OMI2||MGBIL^Mammo",
        "IPC|ACCMG|RP2|1.2.3.5|SPS2|MG", "IPC|ACCMG-B|RP2|1.2.3.5|SPS3|MG"])
    assert send(pas_groups, omi) == ("AA", "")
    rows = rows_of(pas_groups, "PG2")
    assert {o: (r["accession_number"], r["modality"]) for o, r in rows.items()} == {
        "OMI1": ("ACCUS", "US"), "OMI2": ("ACCMG", "MG")}
    from appliance.prefetch.messages import parse_hl7_time

    assert rows["OMI2"]["scheduled_at"] == parse_hl7_time("20991203110000")


def test_a_cancel_of_the_second_procedure_cancels_it_alone(pas_groups: PasProcess) -> None:
    """Ordered together, the abdomen is cancelled alone (it found no request); then one
    status message of both groups acts on each: the thorax moved, the abdomen cancelled."""
    assert send(pas_groups, orm("C1", group("THX3"), group("ABD3", "CT", "ABDOMEN"),
                                patient="PG3"))[0] == "AA"
    assert send(pas_groups, orm("C2", group("ABD3", control="CA"), patient="PG3"))[0] == "AA"
    rows = rows_of(pas_groups, "PG3")
    assert {o: r["state"] for o, r in rows.items()} == {"THX3": "pending",
                                                       "ABD3": "cancelled"}

    assert send(pas_groups, orm("C3", group("THX4"), group("ABD4"), patient="PG4"))[0] == "AA"
    status = orm("C4", group("THX4", when="20991229070000", control="SC", status="IP"),
                 group("ABD4", control="SC", status="CA"), patient="PG4")
    assert send(pas_groups, status) == ("AA", "")
    rows = rows_of(pas_groups, "PG4")
    from appliance.prefetch.messages import parse_hl7_time

    assert (rows["THX4"]["state"], rows["THX4"]["times_requested"]) == ("pending", 2)
    assert rows["THX4"]["scheduled_at"] == parse_hl7_time("20991229070000")
    assert rows["ABD4"]["state"] == "cancelled"
    before = shape(pas_groups)
    assert send(pas_groups, status) == ("AA", "duplicate message: already processed")
    assert shape(pas_groups) == before


@pytest.mark.parametrize("groups, code, reason", [
    ([group("OK5"), ["ORC|NW|||||||^^^" + FAR, "OBR|1||||||||||||||||||||||CT"]], "AE",
     "order group 2 of 2 (ORC #2): no order number: ORC-2, ORC-3 and the accession "
     "(OBR-18 / IPC-1) are all empty"),
    ([group("OK6"), group("BAD6", when="2099-12-31")], "AE",
     "order group 2 of 2 (ORC #2): ORC-7.4: not an HL7 date/time: '2099-12-31'"),
    ([group("OK7") + ["OBR|2|OK7B||CTABD^CT abdomen||||||||||||||ACCOK7B||||||CT"]], "AE",
     "order group 1 (ORC #1) holds a second OBR segment: each procedure needs an ORC of its "
     "own"),
    ([group(f"N{n}") for n in range(51)], "AR",
     "too many orders in one message: more than 50 ORC segments"),
    ([group(f"X{n}") for n in range(49)] + [group("X49")[:1] + ["OBR|1|X49" + "~" * 20_000]],
     "AR", "OBR of ORC #50 segment too complex: 20002 delimiters"),
])
def test_a_bad_group_refuses_the_whole_message_naming_it(
        pas_groups: PasProcess, groups: list[list[str]], code: str, reason: str) -> None:
    """Nothing of the message is stored (its first group was, ACKed AA); the listener goes on."""
    before = shape(pas_groups)
    answer, text = send(pas_groups, orm("B1", *groups, patient="PG5"))
    assert (answer, text[:len(reason)]) == (code, reason)
    assert shape(pas_groups) == before
    assert send(pas_groups, orm("B2", group("OK8"), patient="PG6"))[0] == "AA"


def test_fifty_groups_are_fifty_requests(pas_groups: PasProcess) -> None:
    assert send(pas_groups, orm("F1", *[group(f"Q{n}") for n in range(50)],
                                patient="PG7")) == ("AA", "")
    assert len(rows_of(pas_groups, "PG7")) == 50


def obr(placer: str, filler: str, code: str, accession: str, requested: str,
        modality: str) -> str:
    """An OBR as a RIS writes it: OBR-18 accession, OBR-19 requested procedure ID (IHE),
    OBR-24 modality (diagnostic service section)."""
    fields = ["OBR", "1", placer, filler, code] + [""] * 13 + [accession, requested] \
        + [""] * 4 + [modality]
    return "|".join(fields)


def answer(pas: PasProcess, message: str) -> hl7.Message:
    with MLLPClient("127.0.0.1", pas.hl7_port) as client:  # type: ignore[attr-defined]
        return hl7.parse(client.send_message(message).decode().strip("\x0b\x1c\r"))


def test_omg_o19_is_read_like_omi_and_acknowledged(pas_groups: PasProcess) -> None:
    """A general clinical order (OMG^O19, v2.5.1, as a RIS writes it: PV1, ORC, TQ1, OBR,
    NTE, OBX) was refused AR 200 ("unsupported message type"): no prefetch at all for a
    RIS that sends it. Now read as OMI (without IPC), ACKed as ORM and OMI are (the general
    ACK, MSH-9 ``ACK^O19^ACK``), resends recognised, its cancel cancels."""
    def omg(control: str, order_control: str) -> str:
        return "\r".join([
            f"MSH|^~\\&|RIS|CHU-A|PAS|CHU-A|20261204143000+0100||OMG^O19^OMG_O19|{control}"
            "|P|2.5.1||||||8859/1",
            "PID|1||PO19^^^CHU-A^PI||MARTIN^Paul||19601012|M",
            "PV1|1|O|RADIO^^^CHU-A||||||||||||||||V0001^^^CHU-A^VN",
            f"ORC|{order_control}|CMD19^RIS|EXA19^RIS||SC||||20261204142900|||1234^DUPONT^Jean",
            "TQ1|1||||||20991230103000||R",
            obr("CMD19^RIS", "EXA19^RIS", "ZBQK002^Radiographie du thorax^CCAM", "ACC19",
                "RP19", "CR"),
            "NTE|1||Patient porteur d'un pacemaker",
            "OBX|1|NM|3141-9^Poids^LN||72|kg|||||F"])

    ack = answer(pas_groups, omg("OMG0001", "NW"))
    assert (str(ack.segment("MSH")[9]), str(ack["MSA.F1"]), str(ack["MSA.F2"])) == (
        "ACK^O19^ACK", "AA", "OMG0001"), str(ack)
    (row,) = [r for r in requests(pas_groups) if r["patient_id"] == "PO19"]
    from appliance.prefetch.messages import parse_hl7_time

    assert (row["dedup_key"], row["accession_number"], row["modality"], row["state"],
            row["scheduled_at"]) == ("order:PO19|CHU-A|CMD19", "ACC19", "CR", "pending",
                                     parse_hl7_time("20991230103000"))
    before = shape(pas_groups)
    ack = answer(pas_groups, omg("OMG0001", "NW"))
    assert (str(ack["MSA.F1"]), str(ack["MSA.F3"])) == ("AA",
                                                        "duplicate message: already processed")
    assert shape(pas_groups) == before
    assert answer(pas_groups, omg("OMG0002", "CA"))["MSA.F1"] == "AA"
    assert [r["state"] for r in requests(pas_groups) if r["patient_id"] == "PO19"] == [
        "cancelled"]


def swf_omi(control: str, *groups: tuple[str, str, str, str], patient: str = "PS1") -> str:
    """An IHE SWF OMI^O23 (RAD-4, v2.5.1): one order (placer ORD-S, filler FIL-S, one
    accession), each requested procedure an ORC/TQ1/OBR/IPC group: (order control, requested
    procedure ID, modality, procedure code)."""
    segments = [f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261204120000||OMI^O23^OMI_O23|{control}|P|"
                "2.5.1", f"PID|1||{patient}^^^HOSP^MR||DOE^JANE", "PV1|1|O"]
    for order_control, requested, modality, code in groups:
        segments += [f"ORC|{order_control}|ORD-S|FIL-S||SC", f"TQ1|1||||||{FAR}",
                     obr("ORD-S", "FIL-S", code, "ACC-S", requested, modality),
                     f"IPC|ACC-S|{requested}|1.2.826.0.1.{requested[-1]}|SPS{requested}|"
                     f"{modality}"]
    return "\r".join(segments)


def by_modality(pas: PasProcess, patient: str) -> dict[str, tuple[Any, ...]]:
    """The patient's requests: modality -> requested procedure ID, state, times requested."""
    return {r["modality"]: (r["dedup_key"].rsplit("^", 1)[-1] if "^" in r["dedup_key"]
                            else "first", r["state"], r["times_requested"])
            for r in requests(pas) if r["patient_id"] == patient}


def test_procedures_of_one_order_number_are_requests_of_their_own(
        pas_groups: PasProcess) -> None:
    """IHE SWF: a CT chest and an MR knee of one order (one order number, one accession),
    told apart by the requested procedure ID (IPC-2). They were one request, the CT's
    (logged "two order groups name order ..."): the MR priors were never fetched. Now one
    request each; an exact repeat of a procedure in the message (a second step of it)
    counts once; the message resent changes nothing, sent again as a new message counts
    each once more; a cancel naming the MR cancels it alone; an ``ORC|CA`` naming no
    procedure cancels the order's every procedure."""
    ct, mr = ("NW", "RP1", "CT", "CTTHX^CT chest"), ("NW", "RP2", "MR", "MRKNEE^MR knee")
    message = swf_omi("S1", ct, mr, ct)
    assert send(pas_groups, message) == ("AA", "")
    assert by_modality(pas_groups, "PS1") == {"CT": ("first", "pending", 1),
                                              "MR": ("RP2", "pending", 1)}
    before = shape(pas_groups)
    assert send(pas_groups, message) == ("AA", "duplicate message: already processed")
    assert shape(pas_groups) == before
    assert send(pas_groups, swf_omi("S2", ct, mr)) == ("AA", "")
    assert by_modality(pas_groups, "PS1") == {"CT": ("first", "pending", 2),
                                              "MR": ("RP2", "pending", 2)}
    assert send(pas_groups, swf_omi("S3", ("CA", *mr[1:]))) == ("AA", "")
    assert by_modality(pas_groups, "PS1") == {"CT": ("first", "pending", 2),
                                              "MR": ("RP2", "cancelled", 2)}
    # The MR ordered again (NW after CA) is pending again; a status change to cancelled
    # naming the CT alone cancels the CT alone.
    assert send(pas_groups, swf_omi("S4", mr)) == ("AA", "")
    status = swf_omi("S5", ("SC", *ct[1:])).replace("ORC|SC|ORD-S|FIL-S||SC",
                                                    "ORC|SC|ORD-S|FIL-S||CA")
    assert send(pas_groups, status) == ("AA", "")
    assert by_modality(pas_groups, "PS1") == {"CT": ("first", "cancelled", 2),
                                              "MR": ("RP2", "pending", 3)}
    whole = "\r".join(swf_omi("S6").split("\r") + ["ORC|CA|ORD-S|FIL-S||CA"])
    assert send(pas_groups, whole) == ("AA", "")
    assert {m: state for m, (_, state, _) in by_modality(pas_groups, "PS1").items()} == {
        "CT": "cancelled", "MR": "cancelled"}


def test_orm_procedures_of_one_order_number_told_apart_by_accession(
        pas_groups: PasProcess) -> None:
    """An ORM^O01 giving a CT chest and an MR knee one placer order number, each its own
    accession (OBR-18): two requests (the MR's priors were not fetched)."""
    groups = [[f"ORC|NW|ORD-A|||SC||^^^{FAR}", obr("ORD-A", "", code, accession, "", modality)]
              for code, accession, modality in (("CTTHX", "ACC-A1", "CT"),
                                                 ("MRKNEE", "ACC-A2", "MR"))]
    assert send(pas_groups, orm("A1", *groups, patient="PA1")) == ("AA", "")
    rows = [r for r in requests(pas_groups) if r["patient_id"] == "PA1"]
    assert sorted((r["accession_number"], r["modality"], r["state"]) for r in rows) == [
        ("ACC-A1", "CT", "pending"), ("ACC-A2", "MR", "pending")]


def test_a_resend_is_what_its_message_meant_not_what_the_request_became(
        pas_groups: PasProcess) -> None:
    """Found in review (2026-12-07): an order's second procedure (its own accession, one
    order number), then a cancel of it, then that order message resent unchanged: the resend
    was compared with its request's key (``...|ORD-Q|ACC-Q2``), not with the order the
    message named (``...|ORD-Q``), taken as new ("control id Q2 was already used") and the
    cancelled MR pending again (invariant 6). Each message's meaning is recorded now: the
    resend changes nothing. A control id reused for another order is still new, logged."""
    def q(control: str, accession: str, modality: str = "CT", order: str = "ORD-Q",
          order_control: str = "NW") -> str:
        return orm(control, [f"ORC|{order_control}|{order}|||SC||^^^{FAR}",
                             obr(order, "", "X", accession, "", modality)], patient="PQ1")

    def mine() -> list[dict[str, Any]]:
        return [r for r in requests(pas_groups) if r["patient_id"] == "PQ1"]

    q2 = q("Q2", "ACC-Q2", "MR")
    for message in (q("Q1", "ACC-Q1"), q2):
        assert send(pas_groups, message) == ("AA", "")
    before = mine()
    assert send(pas_groups, q2) == ("AA", "duplicate message: already processed")
    assert mine() == before  # was counted as requested again
    assert send(pas_groups, q("Q3", "ACC-Q2", "MR", order_control="CA")) == ("AA", "")
    assert sorted((r["accession_number"], r["modality"], r["state"], r["times_requested"])
                  for r in mine()) == [("ACC-Q1", "CT", "pending", 1),
                                       ("ACC-Q2", "MR", "cancelled", 1)]
    before = mine()
    assert send(pas_groups, q2) == ("AA", "duplicate message: already processed")
    assert mine() == before  # the cancelled MR was pending again
    assert "control id Q2 (MSH-10) was already used" not in pas_groups.log()

    # Q2 reused by a RIS numbering from 1 again, for another order: new, and logged.
    reused = q("Q2", "ACC-Q9", order="ORD-Q9")
    assert send(pas_groups, reused) == ("AA", "")
    assert "control id Q2 (MSH-10) was already used for order:PQ1|HOSP|ORD-Q; this message " \
           "names order:PQ1|HOSP|ORD-Q9: taken as a new message" in pas_groups.log()
    assert len(mine()) == 3
    before = mine()
    assert send(pas_groups, reused) == ("AA", "duplicate message: already processed")
    assert mine() == before


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.root
def test_both_procedures_priors_land_each_prior_fetched_once(tmp_path: Path) -> None:
    """One ORM: a CT thorax (rule: the newest CT prior) and an MR abdomen (rule: the two
    newest priors, any modality). Both requests fetched, the union of their priors (two
    studies, six files) on site byte for byte, the prior both want sent by the hub once."""
    patient = "A002304"
    orthanc = Orthanc(tmp_path / "orthanc").start()
    hub = HubProcess(tmp_path / "hub", {"PAS_HUB_ARCHIVE__KIND": "dicomweb",
                                        "PAS_HUB_ARCHIVE__URL": orthanc.dicomweb})
    pas = None
    try:
        files = sorted(CT_DIR.glob(f"{patient}_*.dcm"))  # two CT studies of 3 files
        for path in files:
            httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(),
                       timeout=60).raise_for_status()
        hub.init().start()
        enroll(hub, tmp_path / "pas", "SITE-G")
        pas = PasProcess(tmp_path / "pas", {
            "PAS_PREFETCH__RETRY_AFTER_S": "1", "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2",
            "PAS_OPS__HEARTBEAT": "false",
            "PAS_PREFETCH__RULES": '[{name = "ct", modality = "^CT$", priors = 1, '
                                   'same = "modality"}, {name = "mr", modality = "^MR$", '
                                   'priors = 2}]'}).start()
        port = int(pas.env["PAS_HL7__PORT"])
        wait_for(lambda: port_open("127.0.0.1", port), 30, what="the HL7 listener")
        pas.hl7_port = port  # type: ignore[attr-defined]
        message = orm("E1", group("THX9", "CT", "CHEST", when=""),
                      group("ABD9", "MR", "ABDOMEN", when=""), patient=patient)
        assert send(pas, message) == ("AA", "")

        def done() -> dict[str, dict[str, Any]] | None:  # all created before the ACK
            rows = rows_of(pas, patient)  # type: ignore[arg-type]
            finished = all(r["state"] in ("fetched", "failed") for r in rows.values())
            return rows if rows and finished else None

        rows = wait_for(done, 180, interval=0.2, what="both procedures' prefetch")
        assert {o: (r["state"], r["rule"], r["studies_found"], r["studies_fetched"])
                for o, r in rows.items()} == {"THX9": ("fetched", "ct", 1, 1),
                                              "ABD9": ("fetched", "mr", 2, 2)}, rows
        held = read_rows(pas.home / "pas.sqlite",
                         "SELECT sha256, path FROM instances WHERE is_current = 1")
        assert sorted(r["sha256"] for r in held) == sorted(sha256(p.read_bytes())
                                                           for p in files)
        for row in held:
            assert sha256((pas.home / "spool" / row["path"]).read_bytes()) == row["sha256"]
        everything = read_rows(pas.home / "pas.sqlite", "SELECT count(*) AS n FROM instances")
        assert everything[0]["n"] == len(files)  # none filed twice
        # The hub sent each prior once, all its instances: by its priors route, or by a
        # search and a batched download (the path depends on whether the keep-warm call
        # had learnt the hub's features before the order resolved: CI took each). One line
        # per study sent, written when the hub's side of a stream ends: every one is
        # written once both have stopped (the site first, so that nothing asks again).
        pas.stop()
        hub.stop()
        lines = re.findall(r"download of study ([0-9.]+) for SITE-G sent: (\d+) instances?",
                           hub.log())
        assert len(lines) == 2 and len({uid for uid, _ in lines}) == 2, hub.log()[-3000:]
        assert [n for _, n in lines] == ["3", "3"], hub.log()[-3000:]
    finally:
        if pas is not None:
            pas.stop()
        hub.stop()
        orthanc.stop()
