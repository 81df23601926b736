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
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from appliance.dicomnet.direct_receive import p_data_tf
from appliance.dicomnet.direct_store import c_store_rq
from tests.support import raw_ul
from tests.support.peers import MR_DIR, PasProcess, storescu, wait_for
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
