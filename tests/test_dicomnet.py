"""The event-driven association loops (appliance/dicomnet/reactor.py), against a real `pas run`.

They replace pynetdicom's 1 ms polling, so what the polling loops did on their timers must
still happen: a silent association is dropped after `network_timeout_s`, a peer's A-ABORT
ends the association and the daemon keeps serving, SIGTERM with an association open still
stops the daemon cleanly. And the point of the change: idle associations cost no CPU.
"""

from __future__ import annotations

import os
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    StoreSCP,
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
        with_idle = cpu_over(pid, 2.0)
        assert all(assoc.is_established for assoc in held)
        # pynetdicom's own loops (event_driven = false) spend ~0.2 s of CPU here: 8 threads
        # waking 1,000 times a second. Event-driven, 4 idle associations are ~free.
        assert with_idle - baseline < 0.05, (baseline, with_idle)
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
