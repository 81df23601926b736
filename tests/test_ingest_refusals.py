"""Objects and PDUs the C-STORE SCP must refuse, each with the status a modality can act on,
nothing stored, and the daemon serving the next sender (invariant 7; docs/ingest.md).

Found in review (2026-12-03): an object cut just before its pixel data, or inside an element
other than the pixel data, was answered Success; so were a dataset in explicit VR on an
implicit-VR context, a C-STORE on another class's presentation context and a dataset of
another SOP class than its request. A peer silent in the middle of a PDU held its
association slot for ever, and a re-sent older version did not become current again.
"""

from __future__ import annotations

import socket
import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pynetdicom import AE, _config
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from appliance.dicomnet.direct_receive import p_data_tf
from appliance.dicomnet.direct_store import c_store_rq
from tests.support import raw_ul
from tests.support.objects import tiny_ct
from tests.support.peers import (
    CT_DIR,
    MR_DIR,
    PasProcess,
    half_written,
    read_rows,
    storescu,
    wait_for,
)
from tests.test_ingest import dataset_part, index_rows

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


pytestmark = pytest.mark.usefixtures("pynetdicom_senders_fixed")


@pytest.fixture
def pas(tmp_path: Path) -> PasProcess:
    daemon = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__NETWORK_TIMEOUT_S": "2", "PAS_DICOM__MAX_ASSOCIATIONS": "2",
    }).start()
    yield daemon
    daemon.stop()


def send_file_as_is(port: int, path: Path, *contexts: tuple[str, str]) -> Any:
    """The file's dataset bytes sent untouched (pynetdicom streams them from the file,
    with the command's UIDs and the context from its file meta); the C-STORE-RSP."""
    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae = AE(ae_title="RAWSCU")
    for abstract, syntax in contexts or ((meta.MediaStorageSOPClassUID,
                                          meta.TransferSyntaxUID),):
        ae.add_requested_context(abstract, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="PAS")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()


def echo_accepted(pas: PasProcess) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def assert_nothing_stored(pas: PasProcess) -> None:
    assert pas.status()["instances"] == 0
    assert not list((pas.home / "spool").rglob("*.dcm"))
    assert not half_written(pas.home / "spool")


def test_an_object_cut_anywhere_is_refused_and_nothing_stored(pas: PasProcess,
                                                              tmp_path: Path) -> None:
    source = next(p for p in sorted(MR_DIR.rglob("*.dcm")))
    content = source.read_bytes()
    dataset = dataset_part(source)
    meta_end = len(content) - len(dataset)
    pixels = meta_end + dataset.index(PIXEL_DATA_TAG)
    # The longest element before the pixel data: cut in the middle of its value.
    raw = read_dataset(BytesIO(dataset), False, True, stop_when=lambda tag, *_: tag == 0x7FE00010)
    longest = max((e for e in raw.values() if getattr(e, "length", 0) not in (0, 0xFFFFFFFF)),
                  key=lambda e: e.length)
    assert longest.length > 100
    cuts = {
        "mid-element": (meta_end + longest.value_tell + longest.length // 2, "truncated"),
        "inside the pixel data's header": (pixels + 5, "truncated"),
    }
    for name, (cut, reason) in cuts.items():
        bad = tmp_path / f"{name}.dcm"
        bad.write_bytes(content[:cut])
        answer = send_file_as_is(pas.port, bad)
        assert answer.Status == 0xC210, (name, hex(answer.Status))
        assert reason in str(answer.ErrorComment), (name, answer.ErrorComment)
    assert_nothing_stored(pas)
    assert send_file_as_is(pas.port, source).Status == 0x0000  # and the next one is taken
    assert pas.status()["instances"] == 1


def test_pixel_data_short_of_a_us_number_of_frames_is_refused(pas: PasProcess,
                                                               tmp_path: Path) -> None:
    """NumberOfFrames 50 written with VR US (as some writers do; an IS is text): its bytes
    "2\\x00" were read as the text "2", and the pixel-length check of the quick path took
    that from the record. An object with 2 of its 50 frames was answered Success, stored,
    and indexed as 2 frames; pydicom's full parse reads 50 and refuses it."""
    ds = tiny_ct()
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "US", 2, (50).to_bytes(2, "little"), 0,
                                    False, True)
    ds.PixelData = bytes(128 * 2)
    cut = tmp_path / "two-of-fifty-frames.dcm"
    ds.save_as(cut, enforce_file_format=True)
    answer = send_file_as_is(pas.port, cut)
    assert answer.Status == 0xC210, hex(answer.Status)
    assert "PixelData is truncated: 256 bytes, the header describes 6400" in str(
        answer.ErrorComment), answer.ErrorComment
    assert_nothing_stored(pas)
    ds.PixelData = bytes(128 * 50)
    whole = tmp_path / "fifty-frames.dcm"
    ds.save_as(whole, enforce_file_format=True)
    assert send_file_as_is(pas.port, whole).Status == 0x0000
    assert [r["number_of_frames"] for r in read_rows(
        pas.home / "pas.sqlite", "SELECT number_of_frames FROM instances")] == [50]


def test_a_dataset_in_another_vr_than_its_context_is_refused(pas: PasProcess,
                                                              tmp_path: Path) -> None:
    """Explicit-VR bytes on an Implicit VR Little Endian context: the file would be kept
    behind a meta that says implicit, and no reader could parse it."""
    source = sorted(CT_DIR.glob("*.dcm"))[0]
    ds = dcmread(source, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    lying = tmp_path / "lying.dcm"
    content = source.read_bytes()
    explicit_meta_ts = b"1.2.840.10008.1.2.1\x00"
    at = content.index(explicit_meta_ts)
    # The same length, so the meta's group length stays right: "1.2.840.10008.1.2" padded.
    lying.write_bytes(content[:at] + b"1.2.840.10008.1.2\x00\x00\x00" + content[at + 20:])
    assert dcmread(lying, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID \
        == "1.2.840.10008.1.2"
    answer = send_file_as_is(pas.port, lying)
    assert answer.Status == 0xC210
    assert "encoded with explicit VR" in str(answer.ErrorComment)
    assert_nothing_stored(pas)


def test_a_dataset_of_another_class_than_its_request_gets_a900(pas: PasProcess,
                                                                tmp_path: Path) -> None:
    source = sorted(CT_DIR.glob("*.dcm"))[0]
    ds = dcmread(source)
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage  # the command's class
    bad = tmp_path / "ct-as-mr.dcm"
    ds.save_as(bad)
    answer = send_file_as_is(pas.port, bad, (MRImageStorage, "1.2.840.10008.1.2.1"))
    assert answer.Status == 0xA900
    assert "SOPClassUID differs from the C-STORE request's" in str(answer.ErrorComment)
    assert_nothing_stored(pas)


def test_a_c_store_on_another_classes_context_gets_0122(pas: PasProcess) -> None:
    """A CT on the MR context, and a C-STORE on the Verification context: PS3.7 9.3.1.1
    binds a request's SOP Class to its context's; the file meta would name a class its body
    is not."""
    source = sorted(CT_DIR.glob("*.dcm"))[0]
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    dataset = dataset_part(source)
    explicit = "1.2.840.10008.1.2.1"
    raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), explicit),
                                      (3, str(MRImageStorage), explicit),
                                      (5, str(Verification), explicit)])
    assert raw.accepted == {1: 0, 3: 0, 5: 0}
    try:
        for _ in range(3):  # and again: each answer comes, the association goes on
            for context_id in (3, 5):
                answer = raw.c_store(context_id, str(CTImageStorage), uid, dataset)
                assert struct.unpack("<H", answer[0x0900])[0] == 0x0122, context_id
                assert b"not this context's" in answer[0x0902], answer[0x0902]
        answer = raw.c_store(1, str(CTImageStorage), uid, dataset)
        assert struct.unpack("<H", answer[0x0900])[0] == 0x0000
    finally:
        raw.release()
    rows = index_rows(pas.home)
    assert [(r["version"], r["sop_class_uid"]) for r in rows] == [(1, str(CTImageStorage))]


def test_a_c_store_on_a_rejected_context_aborts_at_once_and_says_why(
        pas: PasProcess) -> None:
    """A modality sending on a context PAS rejected (a transfer syntax not offered): the
    association was aborted, and no line in PAS's log said why. Now the log names the
    sender and the context; the abort still comes at the command, nothing is stored."""
    source = sorted(CT_DIR.glob("*.dcm"))[0]
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    explicit = "1.2.840.10008.1.2.1"
    raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), explicit),
                                      (3, str(CTImageStorage), "1.2.3.4.5.6.7")],
                           calling="REJECTEDCX")
    assert raw.accepted == {1: 0, 3: 4}  # 4: transfer syntaxes not supported
    try:
        raw.sock.sendall(p_data_tf(3, 0x03, c_store_rq(str(CTImageStorage), uid, 7)))
        raw.sock.sendall(p_data_tf(3, 0x00, dataset_part(source)[:4096]))  # not the last
        assert raw.read_pdu(5)[0] == 0x07  # A-ABORT, without waiting for the rest
    finally:
        raw.sock.close()
    wait_for(lambda: "REJECTEDCX (127.0.0.1) sent a C-STORE of CT Image Storage on "
                     "presentation context 3, which PAS rejected at negotiation" in pas.log(),
             10, what="the abort's reason in PAS's log")
    assert_nothing_stored(pas)
    assert echo_accepted(pas)


@pytest.mark.parametrize("path", ["direct", "pynetdicom"])
def test_a_message_on_a_context_not_accepted_is_named_counted_and_provider_aborted(
        tmp_path: Path, path: str) -> None:
    """pynetdicom as a modality sending a C-STORE on the context PAS rejected, and a raw
    client on a context it never proposed. Was: an A-ABORT with no reason (and, on
    pynetdicom's path, ``dicom.direct_receive = false``, a service-user abort and nothing in
    PAS's log); the log line named neither the SOP class nor why the context was refused,
    and no audit row or counter had it. Now: an A-P-ABORT (source 2, reason 6: invalid PDU
    parameter value; no response can go on a context that is not accepted), a warning line
    and a ``security`` audit row naming the sender, the message, the context and its fate;
    another modality's association, open throughout, still stores."""
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false"}
    if path == "pynetdicom":
        env["PAS_DICOM__DIRECT_RECEIVE"] = "false"
    pas = PasProcess(tmp_path / "pas", env).start()
    source = sorted(CT_DIR.glob("*.dcm"))[0]
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    explicit = "1.2.840.10008.1.2.1"
    try:
        good_ae = AE(ae_title="GOODCT")
        good_ae.add_requested_context(CTImageStorage, explicit)
        good = good_ae.associate("127.0.0.1", pas.port, ae_title="PAS")
        assert good.is_established
        bad_ae = AE(ae_title="BADMR")
        bad_ae.add_requested_context(CTImageStorage, explicit)
        bad_ae.add_requested_context(MRImageStorage, "1.2.3.4.5.6.7")
        bad = bad_ae.associate("127.0.0.1", pas.port, ae_title="PAS")
        assert [(cx.context_id, cx.result) for cx in bad.rejected_contexts] == [(3, 4)]
        request = C_STORE()
        request.MessageID = 5
        request.AffectedSOPClassUID = MRImageStorage
        request.AffectedSOPInstanceUID = uid
        request.Priority = 2
        request.DataSet = BytesIO(dataset_part(source)[:4096])
        bad.dimse.send_msg(request, 3)
        wait_for(lambda: bad.is_aborted, 10, what="the misbehaving association aborted")
        raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), explicit)],
                               calling="NEVERPROPOSED")
        try:
            raw.sock.sendall(p_data_tf(9, 0x03, c_store_rq(str(CTImageStorage), uid, 7)))
            raw.sock.sendall(p_data_tf(9, 0x02, dataset_part(source)[:4096]))
            # A-ABORT-RQ: reserved, reserved, source 2 (UL service-provider), reason 6.
            assert raw.read_pdu(5) == (0x07, b"\x00\x00\x02\x06")
        finally:
            raw.sock.close()
        # The other association, open all the while, still stores.
        assert good.send_c_store(source).Status == 0x0000
        good.release()
        aborted = "association aborted (A-P-ABORT, invalid PDU parameter value)"
        said = [
            "sent a C-STORE of MR Image Storage on presentation context 3, which PAS rejected "
            "at negotiation (MR Image Storage, 1.2.3.4.5.6.7: transfer syntaxes not "
            f"supported); {aborted}",
            f"sent a C-STORE of CT Image Storage on presentation context 9, which was never "
            f"proposed; {aborted}",
        ]
        # Each is said in its own association's thread, after its abort: both awaited.
        wait_for(lambda: f"NEVERPROPOSED (127.0.0.1) {said[1]}" in pas.log()
                 and f"BADMR (127.0.0.1) {said[0]}" in pas.log(), 10,
                 what="both refusals in PAS's log")
        # The audit row commits just after the log line (seen read too soon under load).
        rows = wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(read_rows(
            pas.home / "pas.sqlite", "SELECT actor, source, outcome FROM audit "
            "WHERE event = 'security' ORDER BY id")), 10, what="both security rows")
        assert [tuple(r) for r in rows] == [("BADMR", "127.0.0.1", f"failure: {said[0]}"),
                                            ("NEVERPROPOSED", "127.0.0.1",
                                             f"failure: {said[1]}")]
        assert "Traceback" not in pas.log()
        assert pas.status()["instances"] == 1  # GOODCT's
    finally:
        pas.stop()


@pytest.mark.parametrize("end", ["A-ABORT", "connection closed"])
def test_an_association_cut_inside_a_dataset_says_so_in_the_log_and_audit(
        pas: PasProcess, end: str) -> None:
    """An association cut in the middle of a C-STORE's dataset (the modality's A-ABORT, or
    its connection lost between PDUs): nothing of that instance is kept, and the log and the
    association's audit row say an instance was cut. Before, nothing anywhere said so: the
    row read "success" when an earlier instance had been stored, and there was no row at
    all when the cut instance was the association's first."""
    sources = sorted(CT_DIR.glob("*.dcm"))[:2]
    explicit = "1.2.840.10008.1.2.1"
    rows_before = 0
    for first_stored in (False, True):
        calling = f"CUT{int(first_stored)}"
        raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), explicit)], calling=calling)
        if first_stored:
            uid = str(dcmread(sources[0], stop_before_pixels=True).SOPInstanceUID)
            answer = raw.c_store(1, str(CTImageStorage), uid, dataset_part(sources[0]))
            assert struct.unpack("<H", answer[0x0900])[0] == 0x0000
        cut_uid = str(dcmread(sources[1], stop_before_pixels=True).SOPInstanceUID)
        raw.sock.sendall(p_data_tf(1, 0x03, c_store_rq(str(CTImageStorage), cut_uid, 9)))
        raw.sock.sendall(p_data_tf(1, 0x00, dataset_part(sources[1])[:8192]))  # not the last
        if end == "A-ABORT":
            raw.sock.sendall(struct.pack(">BBI", 0x07, 0, 4) + b"\0\0\0\0")
        raw.sock.close()
        wait_for(lambda c=calling: read_rows(pas.home / "pas.sqlite",
                                             "SELECT 1 FROM audit WHERE event = 'store' "
                                             "AND actor = ?", (c,)), 10,
                 what=f"the audit row of {calling}")
        [row] = read_rows(pas.home / "pas.sqlite",
                          "SELECT outcome, detail FROM audit WHERE event = 'store' "
                          "AND actor = ?", (calling,))
        stored = int(first_stored)
        assert row["outcome"] == "failure: 1 cut", dict(row)
        assert row["detail"] == (f"{stored} instance{'' if stored else 's'} stored, 0 refused, "
                                 "1 cut by the association's end"), dict(row)
        assert (f"C-STORE of {cut_uid} from {calling} (127.0.0.1) cut after 8192 bytes"
                in pas.log())
        rows_before += stored
        assert pas.status()["instances"] == rows_before
    assert not half_written(pas.home / "spool")
    assert echo_accepted(pas)


def test_a_resent_older_version_becomes_current_again(pas: PasProcess, tmp_path: Path) -> None:
    """A, then a corrected B, then A again (the correction taken back): A serves, and is
    routed again; no third copy."""
    first = sorted(CT_DIR.glob("*.dcm"))[0]
    ds = dcmread(first)
    ds.InstitutionName = "CORRECTED"
    second = tmp_path / "corrected.dcm"
    ds.save_as(second)
    for path in (first, second, first):
        storescu([path], pas.port)
    rows = index_rows(pas.home)
    assert len(rows) == 2
    current = [r for r in rows if r["is_current"]]
    assert len(current) == 1 and current[0]["version"] == 1
    assert current[0]["routed_at"] is None
    assert dcmread(pas.home / "spool" / current[0]["path"]).get("InstitutionName") != "CORRECTED"
    status = pas.status()
    assert (status["files"], status["instances"]) == (2, 1)


def test_a_peer_silent_inside_a_pdu_frees_its_slot(pas: PasProcess) -> None:
    """Two connections (dicom.max_associations = 2) each stop in the middle of a P-DATA-TF
    PDU, as a modality switched off mid-image leaves them: after the network timeout (2 s)
    both are closed and a modality is served again."""
    stalled = []
    for _ in range(2):
        raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), "1.2.840.10008.1.2.1")])
        raw.sock.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
        stalled.append(raw)
    assert not echo_accepted(pas)  # both slots taken
    wait_for(lambda: pas.log().count("connection closed before the entire PDU") == 2, 30,
             what="both stalled associations ended by PAS")
    wait_for(lambda: echo_accepted(pas), 10, what="an association slot free again")
    storescu(sorted(MR_DIR.rglob("*.dcm"))[:1], pas.port)
    assert pas.status()["instances"] == 1
    for raw in stalled:
        assert raw.read_pdu(5)[0] in (None, 0x07)  # closed by PAS (or aborted, then closed)
        raw.sock.close()


def test_a_pdu_over_the_offered_maximum_aborts_before_its_body_is_read(
        pas: PasProcess) -> None:
    ae = AE(ae_title="BIGPDU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
    assert assoc.is_established
    offered = assoc.acceptor.maximum_length
    assert offered > 0
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, offered + 1) + b"\x00" * 64)
    wait_for(lambda: assoc.is_aborted, 10, what="the association aborted by PAS")
    assert f"over the {offered} this association accepts" in pas.log()
    wait_for(lambda: echo_accepted(pas), 10, what="an association slot free again")
    storescu(sorted(MR_DIR.rglob("*.dcm"))[:1], pas.port)
    assert pas.status()["instances"] == 1


def test_a_bare_port_probe_does_not_hold_an_association_place(tmp_path: Path) -> None:
    """A TCP connection closed before any A-ASSOCIATE-RQ (a monitoring system's port check)
    used to keep one of dicom.max_associations for the whole ACSE timeout (30 s): with one
    place, a modality was refused for 30 s after each probe."""
    daemon = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__MAX_ASSOCIATIONS": "1"}).start()  # its start-up check is such a probe
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=5):
                pass
            # Well under the 30 s ACSE timeout the place used to be held for.
            wait_for(lambda: echo_accepted(daemon), 5, what="the only place free again")
    finally:
        daemon.stop()


def test_places_kept_for_modalities_are_not_taken_by_viewers(tmp_path: Path) -> None:
    """Sixteen associations that never end (a viewer's keep-alive echoes, a C-FIND read
    slowly) locked every modality out ("Local Limit Exceeded" for as long as they lived).
    ``dicom.reserved_for_storage`` (here a quarter of 4: one) keeps places only an
    association that may send images takes: the fourth viewer is refused, a modality gets
    in beside the three."""
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__MAX_ASSOCIATIONS": "4"}).start()
    viewer = AE(ae_title="VIEWER")
    viewer.add_requested_context(Verification)
    held = []
    try:
        for _ in range(3):
            assoc = viewer.associate("127.0.0.1", pas.port, ae_title="PAS")
            assert assoc.is_established
            held.append(assoc)
        fourth = viewer.associate("127.0.0.1", pas.port, ae_title="PAS")
        assert fourth.is_rejected, "a fourth association that sends no image took the place"
        wait_for(lambda: "3 associations already open (dicom.max_associations, 1 of them "
                         "kept for associations that send images: dicom.reserved_for_storage)"
                         in pas.log(), 10, what="the refusal's line")
        sent = storescu(sorted(CT_DIR.glob("*.dcm"))[:2], pas.port)
        assert sent.returncode == 0, sent.stderr
        assert len(read_rows(pas.home / "pas.sqlite", "SELECT id FROM instances")) == 2
        assert all(assoc.is_established for assoc in held)
    finally:
        for assoc in held:
            assoc.release()
        pas.stop()


def test_a_pinned_modality_is_known_on_a_dual_stack_listener(tmp_path: Path) -> None:
    """A listener on ``::`` sees an IPv4 modality as ``::ffff:127.0.0.1``: its pin (an IPv4
    address, as the configuration writes it) was compared as a string, and every
    association of that modality refused ("pinned to 127.0.0.1 ... connected from
    ::ffff:127.0.0.1")."""
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__HOST": "::", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__KNOWN_AES": '[{title = "CT2", host = "127.0.0.1"}]'}).start()
    try:
        sent = storescu(sorted(CT_DIR.glob("*.dcm"))[:1], pas.port, calling="CT2",
                        check=False)
        assert sent.returncode == 0, pas.log()[-2000:]
        assert len(read_rows(pas.home / "pas.sqlite", "SELECT id FROM instances")) == 1
        ae = AE(ae_title="CT2")  # the same title from another address (DCMTK: no IPv6)
        ae.add_requested_context(Verification)
        other = ae.associate("::1", pas.port, ae_title="PAS")
        assert other.is_rejected
        wait_for(lambda: "calling AE 'CT2' is pinned to 127.0.0.1 (its dicom.known_aes entry's "
                         "host) but connected from ::1" in pas.log(), 10, what="the refusal")
    finally:
        pas.stop()
