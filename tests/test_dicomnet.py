"""The event-driven association loops (appliance/dicomnet/reactor.py), against a real `pas run`.

They replace pynetdicom's 1 ms polling, so what the polling loops did on their timers must
still happen: a silent association is dropped after `network_timeout_s`, a peer's A-ABORT
ends the association and the daemon keeps serving, SIGTERM with an association open still
stops the daemon cleanly. And the point of the change: idle associations cost no CPU.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.support import raw_ul
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    StoreSCP,
    half_written,
    storescu,
    wait_for,
)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def associate(pas: PasProcess, *contexts: str) -> object:
    ae = AE(ae_title="TESTSCU")
    for context in contexts or (Verification,):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
    assert assoc.is_established
    return assoc


@pytest.fixture
def pas(tmp_path: Path) -> PasProcess:
    daemon = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__NETWORK_TIMEOUT_S": "2",
    }).start()
    yield daemon
    daemon.stop()


def cpu_over(pid: int, window_s: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(window_s)  # a measurement window, not a wait for a condition
    return cpu_seconds(pid) - before


def test_idle_associations_cost_no_polling(tmp_path: Path) -> None:
    # Longer than the measurement: the associations must stay open and silent throughout.
    daemon = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                           "PAS_HTTP__ENABLED": "false",
                                           "PAS_DICOM__NETWORK_TIMEOUT_S": "60"}).start()
    try:
        pid = daemon.proc.pid
        baseline = cpu_over(pid, 2.0)
        held = [associate(daemon) for _ in range(4)]
        # Not counted: the tail of accepting them (threads starting, handlers), which on a
        # loaded machine spills a few clock ticks past the associate() calls.
        cpu_over(pid, 0.5)
        with_idle = cpu_over(pid, 2.0)
        assert all(assoc.is_established for assoc in held)
        # pynetdicom's own loops (event_driven = false) spend ~0.2 s of CPU here: 8 threads
        # waking 1,000 times a second. Event-driven, 4 idle associations are ~free: under
        # 0.1 s, half of that (a CI run on a loaded machine counted 5 clock ticks, 0.05 s).
        assert with_idle - baseline < 0.1, (baseline, with_idle)
        for assoc in held:
            assoc.release()
    finally:
        daemon.stop()


def test_a_silent_association_is_dropped_after_the_network_timeout(pas: PasProcess) -> None:
    assoc = associate(pas)
    wait_for(lambda: not assoc.is_established, 20, what="PAS to drop the silent association")
    assert assoc.is_aborted or assoc.is_released
    assert "network timeout reached" in pas.log().lower()
    # The daemon serves the next association as usual.
    storescu(sorted(CT_DIR.glob("*.dcm"))[:1], pas.port)
    assert pas.status()["instances"] == 1


def test_a_connection_quiet_after_its_associate_rq_is_dropped(pas: PasProcess) -> None:
    """A peer sends an A-ASSOCIATE-RQ, then neither reads (not even the A-ASSOCIATE-AC) nor
    sends: dropped after the network timeout (2 s), not before. The clock now also restarts
    on what PAS sends and when a handler returns (dicomnet/idle.py): not on this."""
    sock = socket.create_connection(("127.0.0.1", pas.port), timeout=10)
    try:
        sock.sendall(raw_ul.associate_rq([(1, str(Verification), "1.2.840.10008.1.2")],
                                         "PAS", "QUIET", 0))
        sent = time.time()
        wait_for(lambda: "network timeout reached" in pas.log(), 20,
                 what="PAS to drop the quiet connection")
        waited = pas.logged_at("network timeout reached") - sent
        assert 2 * 0.95 <= waited < 2 + 5, waited
        raw = raw_ul.RawAssociation(sock)
        assert raw.read_pdu(5)[0] == 0x02  # the A-ASSOCIATE-AC it never read,
        assert raw.read_pdu(5)[0] in (0x07, None)  # then an A-ABORT, and the end
        assert raw.read_pdu(5)[0] is None
    finally:
        sock.close()
    storescu(sorted(CT_DIR.glob("*.dcm"))[:1], pas.port)
    assert pas.status()["instances"] == 1


def test_a_peer_abort_mid_association_leaves_the_daemon_serving(pas: PasProcess) -> None:
    assoc = associate(pas, Verification, CTImageStorage)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.abort()
    assert assoc.is_aborted
    storescu(sorted(CT_DIR.glob("*.dcm"))[:3], pas.port)
    assert pas.status()["instances"] == 3


def test_sigterm_with_an_open_association_stops_cleanly(tmp_path: Path) -> None:
    daemon = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                           "PAS_HTTP__ENABLED": "false",
                                           "PAS_DICOM__NETWORK_TIMEOUT_S": "60"}).start()
    assoc = associate(daemon)
    daemon.stop(timeout=15.0)  # kills with -9 if SIGTERM did not end it in time
    assert daemon.proc.returncode == 0, daemon.log()[-2000:]
    wait_for(lambda: not assoc.is_established, 10, what="the association to end")


def test_the_direct_c_store_command_set_is_pynetdicoms() -> None:
    """direct_store.py encodes C-STORE-RQ by hand; pynetdicom's encoder is the reference."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    from appliance.dicomnet.direct_store import c_store_rq, parse_command

    for originator in ((None, None), ("PAS", 7), ("ODD_TITLE", 65535)):
        primitive = C_STORE()
        primitive.MessageID = 513
        primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"
        primitive.Priority = 0
        primitive.DataSet = BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")  # a dataset follows
        if originator[0]:
            primitive.MoveOriginatorApplicationEntityTitle = originator[0]
            primitive.MoveOriginatorMessageID = originator[1]
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        reference = DicomBytesIO()
        reference.is_little_endian, reference.is_implicit_VR = True, True
        write_dataset(reference, message.command_set)
        ours = c_store_rq("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.123", 513,
                          *originator)
        assert parse_command(ours) == parse_command(reference.getvalue()), originator
        assert ours == reference.getvalue(), originator


def test_the_direct_c_store_response_is_pynetdicoms() -> None:
    """direct_receive.py encodes C-STORE-RSP by hand; pynetdicom's encoder is the reference."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from appliance.dicomnet.direct_receive import c_store_rsp

    for status, comment in ((0x0000, None), (0xC210, "PixelData is truncated"),
                            (0xA700, "x" * 80)):
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = 65535
        primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1234"
        primitive.Status = status
        if comment:
            primitive.ErrorComment = comment[:64]
        message = C_STORE_RSP()
        message.primitive_to_message(primitive)
        reference = DicomBytesIO()
        reference.is_little_endian, reference.is_implicit_VR = True, True
        write_dataset(reference, message.command_set)
        ours = c_store_rsp("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1234",
                           65535, status, comment)
        assert ours == reference.getvalue(), hex(status)


def test_a_destination_dying_mid_move_fails_the_rest_and_pas_keeps_serving(
        tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "viewer", ae_title="VIEWER")
    daemon = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_SERVING__MOVE_DESTINATIONS":
            f'[{{title = "VIEWER", host = "127.0.0.1", port = {scp.port}}}]'}).start()
    files = sorted(MR_DIR.glob("*.dcm"))[:40]
    try:
        storescu(files, daemon.port)
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        move = ["movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem", "VIEWER",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                "127.0.0.1", str(daemon.port)]
        # A viewer that takes a second per image, killed once the first has arrived.
        scp.start(["--sleep-during", "1"])
        first = subprocess.Popen(move, env=DCMTK_ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: scp.files(), 30, what="the first moved image")
        scp.proc.kill()
        output = first.communicate(timeout=60)[0]
        assert "Final Move Response" in output and "(Success)" not in output, output[-1500:]
        assert daemon.log().count("aborting the association") == 1, daemon.log()[-3000:]
        # The same viewer back: the whole study arrives, bit for bit.
        for old in scp.files():
            old.unlink()
        scp.start()
        second = subprocess.run(move, env=DCMTK_ENV, capture_output=True, text=True,
                                timeout=120)
        assert "Final Move Response (Success)" in second.stderr, second.stderr[-1500:]
        received = wait_for(lambda: len(scp.files()) >= len(files) and scp.files(), 30,
                            what="every moved image")
        assert len(received) == len(files)
    finally:
        daemon.stop()
        scp.stop()


def test_the_cheap_context_copy_equals_pynetdicoms_deep_copy() -> None:
    import copy

    from appliance.config import Settings
    from appliance.dicomnet import contexts
    from appliance.ingest.scp import DicomListener

    listener = DicomListener(Settings().dicom, None)  # type: ignore[arg-type]
    supported = listener.ae.supported_contexts
    deep = copy.deepcopy(supported)  # pynetdicom's own behaviour before install()
    contexts.install()
    cheap = copy.deepcopy(supported)
    assert [vars(c) for c in cheap] == [vars(c) for c in deep]
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax
               for a, b in zip(cheap, supported, strict=True))
    cheap[0].add_transfer_syntax("1.2.3.4.5")  # a copy's list is its own
    assert "1.2.3.4.5" not in supported[0].transfer_syntax


def test_sigterm_after_a_bare_port_probe_stops_cleanly(tmp_path: Path) -> None:
    """A connection that never sends an A-ASSOCIATE-RQ (a health check, a port scan) left
    an association thread waiting out acse_timeout: SIGTERM then hung until kill -9."""
    import socket

    daemon = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                           "PAS_HTTP__ENABLED": "false"}).start()
    probe = socket.create_connection(("127.0.0.1", daemon.port))
    probe.close()
    wait_for(lambda: "PAS ready" in daemon.log(), 10, what="the daemon ready")
    daemon.stop(timeout=8.0)  # kills with -9 if SIGTERM did not end it in time
    assert daemon.proc.returncode == 0, daemon.log()[-2000:]


# --- the C-STORE fast path (appliance/dicomnet/direct_receive.py) ---------------------------


def cstore_paths(pas: PasProcess) -> dict[str, float]:
    """``pas_cstore_requests_total`` by path, from the daemon's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    return {sample.labels["path"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "pas_cstore_requests"
            for sample in family.samples if sample.name.endswith("_total")}


def datasets_held(files: list[Path]) -> set[str]:
    """SHA-256 of the dataset part (what travelled) of each file."""
    import hashlib

    from tests.test_ingest import dataset_part

    return {hashlib.sha256(dataset_part(p)).hexdigest() for p in files}


def as_sent(tmp_path: Path, files: list[Path]) -> set[str]:
    """What storescu puts on the wire for ``files`` (it may convert the transfer syntax),
    kept by DCMTK's storescp as the witness."""
    witness = StoreSCP(tmp_path / "witness").start(["+xa"])
    try:
        storescu(files, witness.port, called="STORESCP")
    finally:
        witness.stop()
    return datasets_held(witness.files())


@pytest.mark.parametrize("max_pdu", ["4096", "262144"])
def test_storescu_goes_through_the_direct_path_bit_exact(tmp_path: Path, max_pdu: str) -> None:
    """A 4 kB maximum PDU makes storescu cut each CT image into ~130 fragments: all are
    reassembled in order (SHA-256 of every stored file), and the direct path answered all."""
    files = sorted(CT_DIR.glob("*.dcm"))[:6] + sorted(MR_DIR.rglob("*.dcm"))[:6]
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__MAX_PDU": max_pdu}).start()
    try:
        storescu(files, pas.port)
        stored = list((pas.home / "spool").rglob("*.dcm"))
        assert datasets_held(stored) == as_sent(tmp_path, files)
        # Hashed fragment by fragment as they arrived: each name is its content's SHA-256.
        assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in stored)
        assert pas.status()["instances"] == len(files)
        assert cstore_paths(pas) == {"direct": len(files)}
    finally:
        pas.stop()


def test_with_direct_receive_off_pynetdicom_files_them_the_same(tmp_path: Path) -> None:
    files = sorted(MR_DIR.rglob("*.dcm"))[:5]
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__DIRECT_RECEIVE": "false"}).start()
    try:
        storescu(files, pas.port)
        stored = list((pas.home / "spool").rglob("*.dcm"))
        assert datasets_held(stored) == as_sent(tmp_path, files)
        # Hashed fragment by fragment as they arrived: each name is its content's SHA-256.
        assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in stored)
        assert cstore_paths(pas) == {"pynetdicom": len(files)}
    finally:
        pas.stop()


def test_other_services_share_the_association_with_direct_c_stores(tmp_path: Path) -> None:
    """C-ECHO, C-STORE, C-FIND, C-STORE on one association: the direct path takes the
    C-STOREs and leaves the rest, whole, to pynetdicom (each answered correctly)."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        MRImageStorage,
        StudyRootQueryRetrieveInformationModelFind,
    )

    ct, mr = sorted(CT_DIR.glob("*.dcm"))[0], sorted(MR_DIR.rglob("*.dcm"))[0]
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        assoc = associate(pas, Verification, CTImageStorage, MRImageStorage,
                          StudyRootQueryRetrieveInformationModelFind)
        try:
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_store(dcmread(ct)).Status == 0x0000
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            studies = {str(identifier.StudyInstanceUID) for status, identifier in answers
                       if status.Status == 0xFF00}
            assert studies == {str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)}
            assert answers[-1][0].Status == 0x0000
            assert assoc.send_c_store(dcmread(mr)).Status == 0x0000
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        assert pas.status()["instances"] == 2
        assert cstore_paths(pas) == {"direct": 2}
    finally:
        pas.stop()


def test_a_refusal_names_the_problem_in_the_response(tmp_path: Path) -> None:
    """A C-STORE whose dataset names another SOP Instance UID than its command: refused with
    0xC210 and an Error Comment that says so (a modality logs it), nothing stored."""
    from pynetdicom import _config

    source = sorted(CT_DIR.glob("*.dcm"))[0]
    ds = dcmread(source)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"  # the command's
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        assoc = associate(pas, CTImageStorage)
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # command UIDs from the file meta
        try:
            refused = assoc.send_c_store(bad)
            stored = assoc.send_c_store(source)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
            assoc.release()
        assert refused.Status == 0xC210
        assert str(refused.ErrorComment).startswith("SOPInstanceUID differs from the C-STORE")
        assert stored.Status == 0x0000
        assert pas.status()["instances"] == 1
        assert not half_written(pas.home / "spool")
    finally:
        pas.stop()


def test_a_broken_fragment_sequence_aborts_only_that_association(tmp_path: Path) -> None:
    """A dataset fragment on another presentation context than its command's: the
    association is aborted (as pynetdicom does on a PDU it cannot take), nothing is stored,
    and the next modality is served."""
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    from appliance.dicomnet.direct_receive import p_data_tf
    from appliance.dicomnet.direct_store import c_store_rq

    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        assoc = associate(pas, CTImageStorage, MRImageStorage)
        ct_context, mr_context = (cx.context_id for cx in assoc.accepted_contexts)
        command = c_store_rq(str(CTImageStorage), "1.2.826.0.1.3680043.8.498.1", 1)
        assoc.dul.socket.send(p_data_tf(ct_context, 0x03, command))
        assoc.dul.socket.send(p_data_tf(mr_context, 0x02, b"\x08\x00\x18\x00\x00\x00\x00\x00"))
        wait_for(lambda: assoc.is_aborted, 10, what="the association aborted by PAS")
        # The peer named, the rule it broke, and what PAS did (appliance/dicomnet/last_word.py).
        assert ("DICOM peer TESTSCU (127.0.0.1) sent a PDU that breaks the rules (dataset "
                "fragment on presentation context" in pas.log())
        assert "association aborted (A-ABORT), connection closed" in pas.log()
        files = sorted(MR_DIR.rglob("*.dcm"))[:2]
        storescu(files, pas.port)
        assert pas.status()["instances"] == 2
    finally:
        pas.stop()


def test_remembered_uid_checks_answer_as_pydicoms() -> None:
    """contexts.install() remembers pydicom's UID validation per string: same answers, and
    an invalid UID still warns (or raises in RAISE mode) every time it is made."""
    import warnings

    from pydicom import config
    from pydicom.uid import UID
    from pydicom.valuerep import validate_value

    from appliance.dicomnet import contexts

    samples = ["1.2.840.10008.1.2.1", "1.2.3.04", "1.2.3.", "1.2.a", "9" * 65, "0.0", ""]
    before = [(UID(s).is_valid, UID(s).is_valid) for s in samples]
    contexts.install()
    contexts.install()  # idempotent: wraps once
    assert [(UID(s).is_valid, UID(s).is_valid) for s in samples] == before
    assert [v for v, _ in before] == [True, False, False, False, False, True, False]
    for _ in range(2):
        with pytest.raises(ValueError, match="1.2.3.04"):
            validate_value("UI", "1.2.3.04", config.RAISE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            UID("1.2.3.04", validation_mode=config.WARN)
        assert caught, "an invalid UID still warns when made again"
    validate_value("UI", "1.2.840.10008.1.2.1", config.RAISE)  # valid: no exception


def test_remembered_uid_checks_keep_no_overlong_value() -> None:
    """A UID item in a PDU may be 65,535 bytes long; no UID is over 64 characters. Each
    remembered check (pynetdicom's, pydicom's) kept such a value whole before pynetdicom
    refused the PDU: 200 A-ASSOCIATE-RQs naming a distinct 60 kB abstract syntax left
    24 MB behind here (a real daemon: 1,000 of them, RSS 126 -> 306 MB), up to 8,192 per
    check, from anyone who can connect. Each is still refused, naming the problem."""
    import gc
    import logging
    import tracemalloc
    import warnings

    from pydicom.uid import UID
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    from appliance.dicomnet import contexts

    contexts.install()
    logging.disable(logging.CRITICAL)  # the records (each naming the value) would be kept
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for index in range(200):
                overlong = f"1.2.{index}.".ljust(60_000, "9")
                pdu = raw_ul.associate_rq([(1, overlong, "1.2.840.10008.1.2")], "PAS", "RAW",
                                          16384)
                with pytest.raises(ValueError, match="Invalid 'Abstract Syntax Name' value"):
                    A_ASSOCIATE_RQ().decode(pdu)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        assert kept < 2 << 20, f"{kept / 1e6:.1f} MB kept"
        assert not UID("9" * 65).is_valid and UID("1.2.840.10008.1.2").is_valid
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)


def test_the_storage_contexts_built_once_equal_pynetdicoms() -> None:
    """The listener's ~180 storage contexts, built with the transfer syntaxes checked once
    (dicomnet/contexts.py), are what pynetdicom's add_supported_context makes class by class:
    ingest's pass, then serving's with the SCU and SCP roles, then a class already supported
    with other syntaxes (pynetdicom extends its list)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from appliance.dicomnet.contexts import add_supported_contexts
    from appliance.ingest.policy import TRANSFER_SYNTAXES, storage_sop_classes

    classes = storage_sop_classes([])
    assert len(classes) > 150
    theirs, ours = AE(), AE()
    theirs.add_supported_context(CTImageStorage, [ImplicitVRLittleEndian])
    ours.add_supported_context(CTImageStorage, [ImplicitVRLittleEndian])
    for sop_class in classes:
        theirs.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    add_supported_contexts(ours, classes, TRANSFER_SYNTAXES)
    for sop_class in classes:
        theirs.add_supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    add_supported_contexts(ours, classes, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    theirs.add_supported_context(Verification, [ExplicitVRLittleEndian])
    add_supported_contexts(ours, [Verification], [ExplicitVRLittleEndian])

    def described(ae: AE) -> list[tuple[str, list[str], bool | None, bool | None]]:
        return [(cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role)
                for cx in ae.supported_contexts]

    assert described(ours) == described(theirs)
    ct = [cx for cx in ours.supported_contexts if cx.abstract_syntax == CTImageStorage]
    assert ct[0].transfer_syntax[0] == ImplicitVRLittleEndian and ct[0].scp_role is True
    # Each class has its own list: a change to one leaves the others as they were.
    first, second = ours.supported_contexts[1:3]
    first.transfer_syntax.append("1.2.3.4")
    assert "1.2.3.4" not in second.transfer_syntax
