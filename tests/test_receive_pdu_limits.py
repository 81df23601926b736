"""PDUs and command sets the C-STORE receive path must refuse by name, the daemon serving the
next sender (invariants 7 and 8; docs/ingest.md).

Found in review (2027-01, s38): with dicom.max_pdu = 0 (no maximum offered) one P-DATA-TF
PDU was read whole into memory: one declaring 1.5 GB took the daemon's RSS up by every byte
sent (+600 MB measured). A C-STORE-RQ command set with a non-ASCII byte in its Affected SOP
Instance UID, or a Message ID of 4 or 1 bytes, aborted the association with an anonymous
"exception in the DUL reactor ... 'ascii' codec can't decode" (no peer named, no audit
row), where pynetdicom's path answers it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from appliance.dicomnet.direct_receive import p_data_tf
from appliance.dicomnet.direct_store import _element, _ui, c_store_rq, parse_command
from tests.support import raw_ul
from tests.support.peers import CT_DIR, MR_DIR, PasProcess, read_rows, storescu, wait_for
from tests.test_ingest import dataset_part
from tests.test_ingest_refusals import echo_accepted

EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def pas(tmp_path: Path) -> PasProcess:
    daemon = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__MAX_PDU": "0"}).start()
    yield daemon
    daemon.stop()


def test_a_huge_pdu_with_no_maximum_offered_is_refused_before_its_body(
        pas: PasProcess) -> None:
    """dicom.max_pdu = 0: a P-DATA-TF PDU declaring 1.5 GB is refused at its header (A-ABORT,
    the peer named in the log), not read into memory; a modality stores next. Before, PAS
    read on, holding every byte, and never answered."""
    raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), EXPLICIT)], calling="BIGPDU")
    try:
        assert raw.max_pdu == 0
        raw.sock.sendall(p_data_tf(1, 0x03, c_store_rq(str(CTImageStorage),
                                                       "1.2.826.0.1.3680043.8.498.1", 1)))
        length = 1536 << 20
        raw.sock.sendall(struct.pack(">BBI", 0x04, 0, length)
                         + struct.pack(">IBB", length - 4, 1, 0) + b"\0" * 65536)
        assert raw.read_pdu(10)[0] in (0x07, None)  # A-ABORT (or the close after it)
    finally:
        raw.sock.close()
    wait_for(lambda: "DICOM peer BIGPDU (127.0.0.1) sent a PDU that breaks the rules (PDU of "
                     f"type 0x04 declares {length} bytes, over the 64 MB" in pas.log(), 10,
             what="the refusal's line naming the peer")
    wait_for(lambda: echo_accepted(pas), 10, what="the daemon serving")
    sent = storescu(sorted(MR_DIR.rglob("*.dcm"))[:1], pas.port)
    assert sent.returncode == 0, sent.stderr
    assert pas.status()["instances"] == 1


def _command(**replaced: bytes) -> bytes:
    uid = str(dcmread(sorted(CT_DIR.glob("*.dcm"))[3], stop_before_pixels=True).SOPInstanceUID)
    fields = {0x0002: _ui(str(CTImageStorage)), 0x0100: b"\x01\x00", 0x0110: b"\x07\x00",
              0x0700: b"\x00\x00", 0x0800: b"\x01\x00", 0x1000: _ui(uid)}
    fields.update({int(key[1:], 16): value for key, value in replaced.items()})
    joined = b"".join(_element((0, element), value) for element, value in fields.items())
    return _element((0, 0), struct.pack("<I", len(joined))) + joined


def _send_c_store(pas: PasProcess, **replaced: bytes) -> tuple[int | None, bytes]:
    """A CT's C-STORE-RQ with ``replaced`` command fields, and its dataset; what came back."""
    data = dataset_part(sorted(CT_DIR.glob("*.dcm"))[3])
    raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), EXPLICIT)], calling="BADCMD")
    try:
        raw.sock.sendall(p_data_tf(1, 0x03, _command(**replaced)))
        step = 1 << 20
        for at in range(0, len(data), step):
            raw.sock.sendall(p_data_tf(1, 0x02 if at + step >= len(data) else 0x00,
                                       data[at:at + step]))
        return raw.read_pdu(10)
    except OSError:  # aborted and closed while the dataset was still going out
        return raw.read_pdu(10)
    finally:
        raw.sock.close()


def test_a_non_ascii_instance_uid_in_a_c_store_command_is_answered(pas: PasProcess) -> None:
    """A non-ASCII byte in the Affected SOP Instance UID: left to pynetdicom, which answers
    0xC210 (cannot understand); nothing stored, the daemon serving. Before, the direct path
    raised on it and aborted the association with an anonymous "exception in the DUL
    reactor ... 'ascii' codec can't decode"."""
    kind, body = _send_c_store(pas, x1000=b"1.2.826.0.1.3680043.8.498.9\xe9")
    assert kind == 0x04, (kind, pas.log()[-1500:])
    assert struct.unpack("<H", parse_command(body[6:])[0x0900])[0] == 0xC210
    assert "exception in the DUL reactor" not in pas.log()
    assert pas.status()["instances"] == 0
    assert echo_accepted(pas)


@pytest.mark.parametrize("message_id", [b"\x07\x00\x00\x00", b"\x07"], ids=["4-bytes", "1-byte"])
def test_a_c_store_with_a_malformed_message_id_is_aborted_by_name(
        pas: PasProcess, message_id: bytes) -> None:
    """A Message ID of 4 or 1 bytes (a US has 2; the response names the request by it): the
    association is aborted, the log and a security audit row naming the peer and the field;
    nothing stored. Before: an anonymous "exception in the DUL reactor ... unpack requires a
    buffer of 2 bytes", no peer named, no audit row."""
    kind, _ = _send_c_store(pas, x0110=message_id)
    assert kind in (0x07, None)  # A-ABORT (or the close after it)
    said = (f"sent a PDU that breaks the rules (C-STORE-RQ whose Message ID (0000,0110) has "
            f"{len(message_id)} bytes (a US has 2))")
    wait_for(lambda: f"DICOM peer BADCMD (127.0.0.1) {said}" in pas.log(), 10,
             what="the abort's line naming the peer")
    rows = wait_for(lambda: read_rows(pas.home / "pas.sqlite",
                                      "SELECT actor, outcome FROM audit WHERE event = "
                                      "'security'"), 10, what="the security row")
    assert [tuple(r) for r in rows] == [("BADCMD", f"failure: {said}")]
    log = pas.log()
    assert "exception in the DUL reactor" not in log and "Traceback" not in log
    assert pas.status()["instances"] == 0
    assert echo_accepted(pas)
