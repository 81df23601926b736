r"""What a real RIS may put on the wire, against a real ``pas run`` over raw MLLP sockets.

Found in review (2026-12-04):
- a 1 MB order (within ``hl7.max_message_kb``) whose NTE held a million ``~`` took the
  daemon from 115 to 560 MB and 4.6 s (six at once: 2.7 GB): the ``hl7`` package builds an
  object per repetition. Only the segments read are parsed now, with a bounded number of
  delimiters (invariant 8).
- a sender that gave up a message half-way and began again on the same connection (a second
  start block before the end block) had both read as one: the second one's order stored for
  the first one's patient, and ACKed with the first one's control id.
- MSH-18 was ignored: an ``8859/1`` message was read as UTF-8, its patient id ``PÉ1`` stored
  as ``P\ufffd1``; bytes invalid in the character set were stored as U+FFFD and ACKed AA.
- the ``hl7`` package's unescaping stored an unescaped backslash ``AB\CD`` as ``AB``, an
  invalid ``\Xzz\`` as nothing, highlighting ``\H\`` as ``_``: silently wrong ids.
- a message ended by FS alone (no CR) waited ``frame_timeout_s`` for a NAK saying "message not
  finished"; two of them sent together were read as one.
- ``ORC|SC`` with ORC-5 ``CA`` (order status: cancelled), sent after a cancel, was taken for a
  new order and made the cancelled request pending again.
- PID-3 was read at its first repetition only: with the INS first (as French RIS may send
  it) the request was for the INS, not the hospital's IPP the region indexes.
- a control id seen before with another order (a RIS numbering from 1 again) was taken for a
  resend: ACKed AA "already processed", the new order dropped.

Found in review (2026-12-05):
- a message with delimiters other than ``|^~\&`` (MSH ``#$*@!``) got MSA-3 and ERR appended
  with ``|`` and ``^``: its resend's AA and every NAK had MSA-2 ``D1|duplicate message...``,
  no control id the RIS sent.
- the ACK of an ``8859/1`` message was encoded in 8859/1 (its MSH-6 echoing ``HÔP``) but
  declared nothing in MSH-18, which HL7 reads as ASCII.
"""

from __future__ import annotations

import socket
from typing import Any

import hl7
import pytest

from tests.support.peers import PasProcess, pas_with_hl7
from tests.support.peers import prefetch_requests as requests
from tests.test_ingest_spill import peak_rss_mb
from tests.test_prefetch_mllp import read_blocks
from tests.test_serving_memory import _reset_peak

SB, EB = b"\x0b", b"\x1c\r"


@pytest.fixture(scope="module")
def pas_input(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pas = pas_with_hl7(tmp_path_factory.mktemp("pas_hl7_input"), PAS_HL7__FRAME_TIMEOUT_S="3")
    yield pas
    pas.stop()


def orm(control: str, order: str, patient: str = "P1^^^HOSP^MR", msh_tail: str = "") -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261204120000||ORM^O01|{control}|P|2.5{msh_tail}",
        f"PID|1||{patient}||DOE^JOHN",
        f"ORC|NW|{order}|||SC||^^^20991231120000",
        f"OBR|1|{order}||CT^CT||||||||||||||ACC{order}||||||CT",
    ])


def exchange(pas: PasProcess, payload: bytes, answers: int = 1) -> list[bytes]:
    """Send ``payload`` on a new connection; the MLLP blocks answered (fewer if closed)."""
    with socket.create_connection(("127.0.0.1", pas.hl7_port), timeout=60) as sock:  # type: ignore[attr-defined]
        sock.sendall(payload)
        return read_blocks(sock, answers)


def request(pas: PasProcess, order: str) -> dict[str, Any]:
    (row,) = [r for r in requests(pas) if r["dedup_key"].endswith(f"|{order}")]
    return row


def test_segments_not_read_cost_nothing_to_parse(pas_input: PasProcess) -> None:
    """A million repetitions in an NTE: AA, stored, and the daemon grows by less than 100 MB
    (it was +445 MB); the same in a segment that is read is refused by name."""
    assert pas_input.proc is not None
    bulky = orm("BIG1", "ORDBIG1") + "\rNTE|1||" + "~" * 1_000_000
    _reset_peak(pas_input.proc.pid)
    before = peak_rss_mb(pas_input.proc.pid)
    (ack,) = exchange(pas_input, SB + bulky.encode() + EB)
    growth = peak_rss_mb(pas_input.proc.pid) - before
    assert b"MSA|AA|BIG1" in ack
    assert request(pas_input, "ORDBIG1")["accession_number"] == "ACCORDBIG1"
    assert growth < 100, f"+{growth:.0f} MB to parse one order"

    complex_pid = orm("BIG2", "ORDBIG2", patient="P2^^^HOSP" + "~" * 30_000)
    (nak,) = exchange(pas_input, SB + complex_pid.encode() + EB)
    assert b"MSA|AR|BIG2|PID segment too complex: 30009 delimiters" in nak
    assert b"may hold 20000 together" in nak
    assert not [r for r in requests(pas_input) if r["dedup_key"].endswith("|ORDBIG2")]


def test_a_message_begun_again_replaces_the_unfinished_one(pas_input: PasProcess) -> None:
    """``VT <half of R1> VT <R2> FS CR``: R2 is answered and stored as sent; the half message
    is dropped (it was read as one message with R2: ACKed as R1, an order stored for patient
    ``PAT\\x0bMSH`` with R2's order number)."""
    half = orm("R1", "ORDR1", patient="PATA^^^HOSP").encode()[:70]
    (ack,) = exchange(pas_input, SB + half + SB + orm("R2", "ORDR2", "PATB^^^HOSP").encode() + EB)
    assert b"MSA|AA|R2" in ack
    row = request(pas_input, "ORDR2")  # the one request of that order
    assert (row["patient_id"], row["accession_number"]) == ("PATB", "ACCORDR2")
    assert "bytes of an unfinished message dropped, a new start block began" in pas_input.log()


def test_the_declared_character_set_is_the_one_read(pas_input: PasProcess) -> None:
    """MSH-18 ``8859/1``: ``PÉ1`` is stored as sent (it was ``P\\ufffd1``, read as UTF-8);
    bytes not valid in the declared set, in a value PAS stores, are refused by name (they
    were stored as U+FFFD); in a patient name, which PAS does not keep, they are harmless."""
    latin = orm("CS1", "ORDCS1", patient="PÉ1^^^HÔP", msh_tail="||||||8859/1")
    latin = latin.replace("DOE^JOHN", "MÜLLER^ÉLODIE").replace("ACCORDCS1", "ACCÉ1")
    (ack,) = exchange(pas_input, SB + latin.encode("latin-1") + EB)
    assert b"MSA|AA|CS1" in ack
    row = request(pas_input, "ORDCS1")
    assert (row["patient_id"], row["issuer"], row["accession_number"]) == ("PÉ1", "HÔP", "ACCÉ1")

    invalid = orm("CS2", "ORDCS2", patient="P\xff2^^^HOSP", msh_tail="||||||UNICODE UTF-8")
    (nak,) = exchange(pas_input, SB + invalid.encode("latin-1") + EB)
    assert b"MSA|AE|CS2|PID-3 patient identifier 'P\xef\xbf\xbd2' holds bytes that are not " \
           b"valid in the message's character set (MSH-18 'UNICODE UTF-8')" in nak
    assert not [r for r in requests(pas_input) if r["dedup_key"].endswith("|ORDCS2")]

    # the answers go back in 8859/1 and say so in their MSH-18 (HL7 reads it empty as
    # ASCII, and the AA's MSH-6 echoes the RIS's 'HÔP' as the byte 0xD4)
    facility = latin.replace("|RIS|HOSP|", "|RIS|HÔP|").replace("|CS1|", "|CS4|")
    bad = orm("CS5", "ORDCS5", patient="PÉ\\5^^^HOSP", msh_tail="||||||8859/1")
    accepted, refused = (
        [segment.split("|") for segment in answer.decode("latin-1").split("\r")[:2]]
        for answer in exchange(pas_input, b"".join(SB + m.encode("latin-1") + EB
                                                   for m in (facility, bad)), answers=2))
    assert [accepted[0][17], accepted[0][5], *accepted[1][1:3]] == \
        ["8859/1", "HÔP", "AA", "CS4"], accepted
    assert [refused[0][17], *refused[1][1:3]] == ["8859/1", "AE", "CS5"], refused
    assert refused[1][3].startswith("PID-3 'PÉ\\E\\5': the escape character"), refused

    name_only = orm("CS3", "ORDCS3", msh_tail="||||||UNICODE UTF-8").replace("DOE", "D\xd6E")
    (ack,) = exchange(pas_input, SB + name_only.encode("latin-1") + EB)
    assert b"MSA|AA|CS3" in ack
    assert request(pas_input, "ORDCS3")["patient_id"] == "P1"


@pytest.mark.parametrize("declared, codec, unknown", [
    ("", "utf-8", ""), ("8859/1", "iso8859-1", ""), ("8859/15", "iso8859-15", ""),
    ("UNICODE UTF-8", "utf-8", ""), ("8859/1~UNICODE UTF-8", "iso8859-1", ""),
    ("ISO-8859-1", "iso8859-1", ""), ("windows-1252", "cp1252", ""),
    ("base64", "utf-8", "base64"), ("UNICODE UTF-16", "utf-8", "UNICODE UTF-16"),
    ("utf-16", "utf-8", "utf-16"), ("EBCDIC", "utf-8", "EBCDIC"),
    ("idna", "utf-8", "idna"), ("punycode", "utf-8", "punycode"), ("UTF-7", "utf-8", "UTF-7"),
    ("cp037", "utf-8", "cp037"), ("utf-8-sig", "utf-8", "utf-8-sig"),
    ("shift_jis", "shift_jis", ""), ("GB 18030-2000", "gb18030", ""),
])
def test_msh_18_names_the_codec(declared: str, codec: str, unknown: str) -> None:
    """Table 0211 names, the names engines write instead, and what cannot be read (a codec
    that is no text encoding; one whose ASCII bytes are not ASCII, or are not written back
    as ASCII: UTF-16, UTF-7, EBCDIC, a BOM; one that cannot replace invalid bytes: idna):
    ``hl7.encoding``, named for the log."""
    from appliance.prefetch.messages import message_encoding

    block = orm("CS9", "ORDCS9", msh_tail=f"||||||{declared}").encode()
    assert message_encoding(block, "utf-8") == (codec, unknown)
    assert message_encoding(b"\r\n" + block, "utf-8") == (codec, unknown)  # a blank line first


def test_a_charset_that_cannot_carry_hl7_is_read_in_the_site_s_own(
        pas_input: PasProcess) -> None:
    """MSH-18 ``idna`` (its decoder has no "replace": the connection was dropped, no ACK, no
    audit row), ``UTF-7`` (the ACK went out as ``MSH|^+AH4AXA&|...``) and ``cp037`` (EBCDIC:
    the ACK went back in EBCDIC): each is an MSH-18 not read, as an unknown one is: logged,
    the message read in ``hl7.encoding``, ACKed AA in ASCII with MSH-18 empty, stored."""
    names = {"CX1": "idna", "CX2": "UTF-7", "CX3": "cp037"}
    acks = exchange(pas_input, b"".join(
        SB + orm(control, f"ORD{control}", msh_tail=f"||||||{name}").encode() + EB
        for control, name in names.items()), answers=3)
    assert len(acks) == 3, acks
    for (control, name), ack in zip(names.items(), acks, strict=True):
        assert ack.isascii() and ack.startswith(b"MSH|^~\\&|PAS|"), ack
        parsed = hl7.parse(ack.decode("ascii"))
        assert (str(parsed["MSA.F1"]), str(parsed["MSA.F2"])) == ("AA", control), ack
        assert ack.split(b"\r")[0].split(b"|")[17:18] in ([], [b""]), ack  # MSH-18: ASCII
        assert request(pas_input, f"ORD{control}")["accession_number"] == f"ACCORD{control}"
        assert f"MSH-18 character set {name!r} unknown, read as utf-8" in pas_input.log()


def test_hex_escapes_are_bytes_of_the_set_the_message_was_read_in(tmp_path: Any) -> None:
    """``P\\XE9\\1`` is ``Pé1`` at a site whose ``hl7.encoding`` is Latin-1 (MSH-18 empty),
    and in a message declaring ``8859/1``; at a UTF-8 site, or in a message declaring UTF-8,
    the lone byte E9 is refused by name. It was read as UTF-8 whatever the site's set: a
    Latin-1 site's order was refused AE 102 "not utf-8 bytes"."""
    from appliance.prefetch import orders
    from appliance.prefetch.charsets import default_codec
    from appliance.store import prefetch as store
    from appliance.store.db import Database

    db = Database(tmp_path / "pas.sqlite")

    def answer(control: str, patient: str, encoding: str, msh_tail: str = "") -> str:
        text = orm(control, f"ORD{control}", patient=f"{patient}^^^HOSP", msh_tail=msh_tail)
        return orders.handle(db, text, "test", lambda _: 0.0, encoding=encoding)[0]

    assert "MSA|AA|XL1" in answer("XL1", "P\\XE9\\1", "iso8859-1")
    assert "MSA|AA|XL2" in answer("XL2", "P\\XE9\\2", "utf-8", "||||||8859/1")
    assert "MSA|AA|XL3" in answer("XL3", "P\\XC3A9\\3", "utf-8")
    assert "MSA|AA|XL4" in answer("XL4", "P\\XC3A9\\4", "iso8859-1", "||||||UNICODE UTF-8")
    for control, encoding, tail in [("XL5", "utf-8", ""), ("XL6", "iso8859-1", "||||||UTF-8")]:
        nak = answer(control, "P\\XE9\\5", encoding, tail)
        assert f"MSA|AE|{control}|PID-3 'P\\E\\XE9\\E\\5': \\E\\XE9\\E\\: not utf-8 bytes" \
            in nak, nak
    assert sorted(r["patient_id"] for r in store.list_requests(db)) == \
        ["Pé1", "Pé2", "Pé3", "Pé4"]
    assert default_codec() == "utf-8"  # the site's set is the call's, not left behind


def test_escape_sequences_are_read_or_refused_by_name(pas_input: PasProcess) -> None:
    """The delimiters' and hex escapes are stored unescaped, highlighting dropped (it was
    ``_``); an escape character never closed or a sequence an identifier cannot hold is
    refused naming the field (``AB\\CD`` was stored as ``AB``, ``\\Xzz\\`` as nothing)."""
    escaped = orm("ES1", "ORDES1", patient="AB\\F\\C\\H\\D\\N\\^^^H\\S\\1")
    escaped = escaped.replace("ACCORDES1", "A\\X41\\\\T\\\\E\\")
    (ack,) = exchange(pas_input, SB + escaped.encode() + EB)
    assert b"MSA|AA|ES1" in ack
    row = request(pas_input, "ORDES1")
    assert (row["patient_id"], row["issuer"], row["accession_number"]) == \
        ("AB|CD", "H^1", "AA&\\")

    for control, patient, reason in [
            ("ES2", "AB\\CD^^^HOSP", b"PID-3 'AB\\E\\CD': the escape character '\\E\\' opens a "
                                     b"sequence it never closes"),
            ("ES3", "A\\Xzz\\B^^^HOSP", b"PID-3 'A\\E\\Xzz\\E\\B': escape sequence \\E\\Xzz\\E\\ "
                                       b"is not one an identifier may hold")]:
        (nak,) = exchange(pas_input, SB + orm(control, f"ORD{control}", patient).encode() + EB)
        assert b"MSA|AE|" + control.encode() + b"|" + reason in nak
        assert not [r for r in requests(pas_input) if r["dedup_key"].endswith(f"|ORD{control}")]


def test_a_control_id_used_again_for_another_order_is_not_a_resend(
        pas_input: PasProcess) -> None:
    """A RIS that numbers its messages from 1 again (reinstalled) sends a new order under an
    old MSH-10: it is stored and logged (it was ACKed "duplicate message: already
    processed" and dropped); the same message resent is still recognised, and so is the
    cancel resent under a reused id."""
    first = SB + orm("K1", "ORDK1").encode() + EB
    other = SB + orm("K1", "ORDK2", patient="P2^^^HOSP").encode() + EB
    acks = exchange(pas_input, first + other + other + first, answers=4)
    assert [b"MSA|AA|K1" in a for a in acks] == [True] * 4
    assert [b"duplicate message" in a for a in acks] == [False, False, True, True]
    assert request(pas_input, "ORDK2")["patient_id"] == "P2"
    assert request(pas_input, "ORDK1")["times_requested"] == 1
    assert "control id K1 (MSH-10) was already used for order:P1|HOSP|ORDK1" in pas_input.log()

    cancel = SB + orm("K1", "ORDK2", patient="P2^^^HOSP").replace("ORC|NW", "ORC|CA").encode() \
        + EB
    acks = exchange(pas_input, cancel + cancel, answers=2)
    assert [b"duplicate message" in a for a in acks] == [False, True]
    assert request(pas_input, "ORDK2")["state"] == "cancelled"


def test_an_end_block_without_its_cr_is_named(pas_input: PasProcess) -> None:
    """``FS`` alone then silence: after ``frame_timeout_s`` a NAK names the missing CR (it
    said "message not finished"); ``FS`` then the next message's ``VT``: a NAK at once, and
    neither message taken for an order (they were read as one). Both NAKs echo MSH-10."""
    (nak,) = exchange(pas_input, SB + orm("FS1", "ORDFS1").encode() + b"\x1c")
    assert b"MSA|AR|FS1|an end block FS came, but no CR after it (MLLP ends a message with FS " \
           b"CR) within hl7.frame_timeout_s (3 s)" in nak
    two = SB + orm("FS2", "ORDFS2").encode() + b"\x1c" + SB + orm("FS3", "ORDFS3").encode() + EB
    (nak,) = exchange(pas_input, two, answers=2)
    assert b"MSA|AR|FS2|not MLLP-framed: the end block FS is followed by 0x0b, not CR" in nak
    assert not [r for r in requests(pas_input) if "|ORDFS" in r["dedup_key"]]


def test_a_status_change_to_cancelled_cancels(pas_input: PasProcess) -> None:
    """``ORC|CA`` then ``ORC|SC|...|CA`` (the status notice many RIS send after a cancel): the
    request stays cancelled (the SC was taken for a new order and made it pending again); an
    SC to cancelled alone cancels too."""
    new = orm("SC1", "ORDSC1")
    cancel = new.replace("ORC|NW", "ORC|CA")
    status = new.replace("ORC|NW|ORDSC1|||SC", "ORC|SC|ORDSC1|||CA")
    acks = exchange(pas_input, b"".join(SB + m.encode() + EB for m in [
        new, cancel.replace("|SC1|", "|SC2|"), status.replace("|SC1|", "|SC3|")]), answers=3)
    assert [b"MSA|AA" in a for a in acks] == [True] * 3
    assert request(pas_input, "ORDSC1")["state"] == "cancelled"

    other = orm("SC4", "ORDSC4")
    discontinued = other.replace("ORC|NW|ORDSC4|||SC", "ORC|SC|ORDSC4|||DC")
    acks = exchange(pas_input, b"".join(SB + m.encode() + EB for m in [
        other, discontinued.replace("|SC4|", "|SC5|")]), answers=2)
    assert [b"MSA|AA" in a for a in acks] == [True] * 2
    assert request(pas_input, "ORDSC4")["state"] == "cancelled"


def test_the_pid_3_repetition_of_a_mapped_issuer_is_the_patient(tmp_path: Any) -> None:
    """PID-3 with the INS first and the hospital's IPP second: with the IPP's issuer in
    ``prefetch.issuer_map`` the request is for the IPP (it was for the INS, which the
    region does not index: no prior found); without one in the map, the first as before.
    The map's key comes from the environment, in lower case as every variable's name part
    arrives, and the RIS writes the issuer in capitals: matched regardless of case."""
    pas = pas_with_hl7(tmp_path, PAS_PREFETCH__ISSUER_MAP__HOSP="1.2.250.1.99")
    try:
        ins = "1234567890123^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
        for control, ipp in [("IN1", "IPP42^^^HOSP^PI"), ("IN2", "IPP43^^^other^PI")]:
            message = orm(control, f"ORD{control}", patient=f"{ins}~{ipp}")
            (ack,) = exchange(pas, SB + message.encode() + EB)
            assert b"MSA|AA|" + control.encode() in ack
        mapped, unmapped = request(pas, "ORDIN1"), request(pas, "ORDIN2")
        assert (mapped["patient_id"], mapped["issuer"]) == ("IPP42", "HOSP")
        assert (unmapped["patient_id"], unmapped["issuer"]) == \
            ("1234567890123", "ASIP-SANTE-INS-NIR")
    finally:
        pas.stop()


def other_delimiters(control: str, order: str, *more: str, patient: str = "PD1$$$HOSP") -> str:
    """An ORM whose MSH-1/MSH-2 are ``#`` and ``$*@!`` (component ``$``, repetition ``*``,
    escape ``@``, subcomponent ``!``): HL7 lets a sender choose them, and the ACK must use
    them."""
    return "\r".join([
        f"MSH#$*@!#RIS#HOSP#PAS#HOSP#20261205120000##ORM$O01#{control}#P#2.5",
        f"PID#1##{patient}##DOE$JOHN",
        f"ORC#NW#{order}###SC##$$$20991231120000",
        f"OBR#1#{order}##CT$CT##############ACC{order}######CT", *more])


def msa_and_err(ack: bytes) -> tuple[list[str], list[str]]:
    """MSA and ERR of an ACK whose field separator is ``#`` (ERR empty when absent)."""
    segments = {s.split("#", 1)[0]: s.split("#") for s in ack.decode().split("\r") if s}
    assert segments["MSH"][1] == "$*@!", ack
    return segments["MSA"], segments.get("ERR", [])


def test_the_ack_is_written_in_the_message_s_own_delimiters(pas_input: PasProcess) -> None:
    """A message with ``#`` as field separator and ``$*@!`` as encoding characters: every
    ACK's MSA-2 is its control id and MSA-3 / ERR are written with its delimiters, the
    reason escaped with its escape character. Before, MSA-3 and ERR were appended with
    ``|`` and ``^``: the resend's "already processed" AA read ``MSA-2 = D1|duplicate
    message...`` and every NAK's MSA-2 held its reason too, so the RIS could match none
    of them to the message it sent (and resent it for ever)."""
    first = SB + other_delimiters("D1", "ORDD1").encode() + EB
    acks = exchange(pas_input, first + first, answers=2)
    assert [msa_and_err(a)[0][1:] for a in acks] == [
        ["AA", "D1"], ["AA", "D1", "duplicate message: already processed"]]
    assert request(pas_input, "ORDD1")["times_requested"] == 1
    assert request(pas_input, "ORDD1")["patient_id"] == "PD1"

    # an unclosed escape character in PID-3: refused, the reason quoting '@' as @E@
    (nak,) = exchange(pas_input, SB + other_delimiters(
        "D2", "ORDD2", patient="AB@CD$$$HOSP").encode() + EB)
    msa, err = msa_and_err(nak)
    assert msa[1:3] == ["AE", "D2"], nak
    assert msa[3].startswith("PID-3 'AB@E@CD': the escape character '@E@' opens a sequence "
                             "it never closes (a literal '@E@' is written @E@E@E@)"), nak
    assert err[3] == "102$Data type error$HL70357" and err[8] == msa[3], nak
    assert not [r for r in requests(pas_input) if r["dedup_key"].endswith("|ORDD2")]

    # a second order group with no order number: its reason holds '#', the field separator
    (nak,) = exchange(pas_input, SB + other_delimiters(
        "D3", "ORDD3", "ORC#NW", "OBR#1").encode() + EB)
    msa, err = msa_and_err(nak)
    assert msa[1:3] == ["AE", "D3"], nak
    assert msa[3].startswith("order group 2 of 2 (ORC @F@2): no order number: "), nak
    assert err[3] == "101$Required field missing$HL70357", nak

    # refused by the listener before the message is read (FS not followed by CR)
    (nak,) = exchange(pas_input, SB + other_delimiters("D4", "ORDD4").encode() + b"\x1cX")
    msa, err = msa_and_err(nak)
    assert msa[1:] == ["AR", "D4", "not MLLP-framed: the end block FS is followed by 0x58, "
                       "not CR"], nak
    assert err[3] == "100$Segment sequence error$HL70357", nak
    assert not [r for r in requests(pas_input) if "|ORDD3" in r["dedup_key"]
                or "|ORDD4" in r["dedup_key"]]


def test_a_letter_among_the_delimiters_is_refused_by_name(pas_input: PasProcess) -> None:
    """The fuzzer's merge with MSH-2 ``^~\\MSH&``: its subcomponent delimiter ``M`` cut the
    MRG segment's name, the merge reading found the segment by its text and the hl7 package
    then did not (KeyError: an AE "internal error"). Delimiters that are letters, digits or
    spaces are refused, naming them; nothing is recorded."""
    merge = "\r".join(["MSH|^~\\MSH&|ADT|HOSP|PAS|HOSP|20260101120000||ADT^A40^ADT_A39|DL1|P|2.5",
                       "EVN|A40", "PID|1||PAT004^^^HOSP", "MRG|PAT005^^^HOSP"])
    (nak,) = exchange(pas_input, SB + merge.encode() + EB)
    assert b"|AR|" in nak and b"delimiters" in nak and b"'M' cannot be one" in nak, nak
    assert b"internal error" not in nak
    ordered = orm("DL2", "ORDDL2").replace("MSH|^~\\&|", "MSH|^~\\1|", 1)
    (nak,) = exchange(pas_input, SB + ordered.encode() + EB)
    assert b"|AR|" in nak and b"'1' cannot be one" in nak, nak
    assert not [r for r in requests(pas_input) if r["dedup_key"].endswith("|ORDDL2")]


def test_a_latin_1_site_reads_hex_escapes_as_latin_1(tmp_path: Any) -> None:
    """``hl7.encoding = "iso8859-1"`` and MSH-18 empty: ``P\\XE9\\1`` is ``Pé1``. The daemon
    read ``\\Xhh\\`` as UTF-8 whatever the site's encoding, and refused it AE 102 ("not
    utf-8 bytes"; a review, 2026-12-07): the order and its priors were lost."""
    pas = pas_with_hl7(tmp_path, PAS_HL7__ENCODING="iso8859-1")
    try:
        message = orm("XL9", "ORDXL9", patient="P\\XE9\\9^^^HOSP^MR")
        (ack,) = exchange(pas, SB + message.encode() + EB)
        assert b"MSA|AA|XL9" in ack, ack
        assert request(pas, "ORDXL9")["patient_id"] == "Pé9"
    finally:
        pas.stop()
