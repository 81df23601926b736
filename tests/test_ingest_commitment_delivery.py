"""Storage Commitment reports on a new association: over DICOM TLS, and independent per
modality (appliance/ingest/commitment.py; docs/ingest.md, "Storage Commitment").

Found in review (2026-12-04): with ``dicom.tls.enabled`` a modality that reached PAS over
TLS was called back in clear (its TLS-only SCP never got the report); and the delivery
loop was one thread, so a modality whose address swallows packets held every other
modality's report for the 10 s of each try.

In-process, the daemon's own :class:`StorageCommitmentScp` and store; the modalities are
pynetdicom SCPs (one behind a real TLS listener), the silent one a BlackHole in a test
namespace.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from appliance.config import ConfigError, DicomSection, MoveDestination, load_settings
from appliance.ingest import commitment as commitment_scp
from appliance.ingest.commitment import StorageCommitmentScp
from appliance.store import commitment
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.faults.pki import make_pki
from tests.support.netns import BlackHole, NetNamespace
from tests.support.peers import free_port, wait_for


class Modality:
    """A pynetdicom Storage Commitment SCU taking N-EVENT-REPORTs on its own listener."""

    def __init__(self, title: str, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None):
        self.reports: list[tuple[str, float]] = []  # (Transaction UID, monotonic time)
        ae = AE(ae_title=title)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.server = ae.start_server((host, port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])

    def _on_report(self, event: Any) -> tuple[int, None]:
        self.reports.append((str(event.event_information.TransactionUID), time.monotonic()))
        return 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "pas.sqlite")
    yield database
    database.close()


def _request(db: Database, transaction_uid: str, calling_ae: str) -> commitment.Commitment:
    recorded, _ = commitment.record_request(db, transaction_uid, calling_ae, "127.0.0.1",
                                            [(CTImageStorage, generate_uid())],
                                            lambda relative: True, 3600)
    return recorded


def _row(db: Database, transaction_uid: str) -> dict[str, Any]:
    [row] = db.query("SELECT * FROM commitment_requests WHERE transaction_uid = ?",
                     (transaction_uid,))
    return dict(row)


def test_report_goes_over_tls_to_a_tls_modality_with_the_listeners_certificate(
        tmp_path: Path, db: Database) -> None:
    """``dicom.tls.enabled``: a known AE without ``tls`` is called back over TLS (PAS shows
    its listener's certificate, the modality's is checked against ``dicom.tls.ca``); the
    modality's SCP speaks TLS only and requires PAS's certificate."""
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server_side.verify_mode = ssl.CERT_REQUIRED  # PAS must show a certificate of the CA
    server_side.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    modality = Modality("TLSCT", "127.0.0.1", port, server_side)
    try:
        config = DicomSection(
            tls={"enabled": True, "cert": pki / "server.crt", "key": pki / "server.key",
                 "ca": pki / "ca.crt"},
            known_aes=[{"title": "TLSCT", "host": "127.0.0.1", "port": port}])
        scp = StorageCommitmentScp(config, db, Spool(tmp_path / "spool"))
        transaction = generate_uid()
        scp.deliver(_request(db, transaction, "TLSCT"))
        assert [uid for uid, _ in modality.reports] == [transaction]
        row = _row(db, transaction)
        assert (row["state"], row["sent_how"]) == ("sent", f"new association to 127.0.0.1:{port}")
    finally:
        modality.stop()


def test_a_modality_known_only_as_a_move_destination_gets_its_report_over_its_tls(
        tmp_path: Path, db: Database) -> None:
    """A modality whose address PAS has only from ``serving.move_destinations`` is called
    back over TLS when that entry says ``tls = true`` (the entry giving the address decides;
    before, only ``dicom.known_aes`` did, and the report went in clear to a TLS-only SCP)."""
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server_side.verify_mode = ssl.CERT_REQUIRED
    server_side.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    modality = Modality("MOVECT", "127.0.0.1", port, server_side)
    try:
        config = DicomSection(tls={"cert": pki / "server.crt", "key": pki / "server.key",
                                   "ca": pki / "ca.crt"})
        scp = StorageCommitmentScp(config, db, Spool(tmp_path / "spool"), [MoveDestination(
            title="MOVECT", host="127.0.0.1", port=port, tls=True)])
        transaction = generate_uid()
        scp.deliver(_request(db, transaction, "MOVECT"))
        assert [uid for uid, _ in modality.reports] == [transaction]
        assert _row(db, transaction)["state"] == "sent"
    finally:
        modality.stop()


def _deliver(db: Database, tmp_path: Path, title: str, config: DicomSection,
             moves: list[MoveDestination] | None = None) -> str:
    """One report of a new transaction from ``title``, delivered by a Storage Commitment SCP
    on ``config``: its Transaction UID."""
    transaction = generate_uid()
    StorageCommitmentScp(config, db, Spool(tmp_path / "spool"), moves).deliver(
        _request(db, transaction, title))
    return transaction


def test_a_report_over_tls_goes_only_to_a_certificate_naming_the_address_when_checked(
        tmp_path: Path, db: Database) -> None:
    """``tls_check_hostname`` on a known AE (and on a move destination giving the address):
    a device at 127.0.0.2 showing a certificate of the site's CA that names 127.0.0.1 only
    (another device's) gets no report; the row stays to be tried again, its error naming
    the address. Without the check the CA's word alone passes, as before. Before, Storage
    Commitment had no such key, and a move destination's was not heeded for its reports."""
    pki = make_pki(tmp_path / "pki")  # every certificate names 127.0.0.1 only
    port = free_port()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server_side.verify_mode = ssl.CERT_REQUIRED
    server_side.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    modality = Modality("CT2", "127.0.0.2", port, server_side)
    tls = {"enabled": True, "cert": pki / "server.crt", "key": pki / "server.key",
           "ca": pki / "ca.crt"}
    try:
        for known, moves in (
                ({"title": "CT2", "host": "127.0.0.2", "port": port,
                  "tls_check_hostname": True}, []),
                (None, [MoveDestination(title="CT2", host="127.0.0.2", port=port,
                                        tls_check_hostname=True)])):
            transaction = _deliver(db, tmp_path, "CT2", DicomSection(
                tls=tls, known_aes=[known] if known else []), moves)
            assert modality.reports == []
            row = _row(db, transaction)
            assert row["state"] == "pending", row
            assert "its certificate does not name 127.0.0.2 (tls_check_hostname)" in \
                row["last_error"], row

        transaction = _deliver(db, tmp_path, "CT2", DicomSection(
            tls=tls, known_aes=[{"title": "CT2", "host": "127.0.0.2", "port": port}]))
        assert [uid for uid, _ in modality.reports] == [transaction]
    finally:
        modality.stop()
    # Checked, at the address its certificate names: delivered (the check is not a refusal
    # of every certificate).
    named = Modality("CT3", "127.0.0.1", port, server_side)
    try:
        transaction = _deliver(db, tmp_path, "CT3", DicomSection(
            tls=tls, known_aes=[{"title": "CT3", "host": "127.0.0.1", "port": port,
                                 "tls_check_hostname": True}]))
        assert [uid for uid, _ in named.reports] == [transaction]
    finally:
        named.stop()
    # Unchecked, to a modality that speaks no TLS there: the error does not name the check.
    clear_port = free_port()
    clear = Modality("CT4", "127.0.0.1", clear_port)
    try:
        transaction = _deliver(db, tmp_path, "CT4", DicomSection(
            tls=tls, known_aes=[{"title": "CT4", "host": "127.0.0.1", "port": clear_port}]))
        assert clear.reports == []
        assert _row(db, transaction)["last_error"].endswith(
            " failed (TLS: handshake refused, or the modality does not speak TLS there)")
    finally:
        clear.stop()
    toml = tmp_path / "pas.toml"
    for known, problem in (
            ('{title = "CT1", host = "10.1.1.1", tls_check_hostname = true}',
             "dicom.known_aes.0.tls_check_hostname: needs host and port: where the reports "
             "go, the address the modality's certificate must name"),
            ('{title = "CT1", host = "10.1.1.1", port = 104, tls_check_hostname = true}',
             "dicom.known_aes[0].tls_check_hostname: CT1 is called back in clear (its tls, "
             "else dicom.tls.enabled, is false): there is no certificate to check")):
        toml.write_text(f'home = "{tmp_path / "home"}"\n[dicom]\nknown_aes = [{known}]\n')
        with pytest.raises(ConfigError) as refused:
            load_settings(toml)
        assert refused.value.problems == [problem]


def test_tls_false_calls_back_in_clear_and_tls_without_a_ca_is_refused_naming_the_key(
        tmp_path: Path, db: Database) -> None:
    """``tls = false`` on one known AE: a modality whose SCP listens in clear still gets its
    report though the listener speaks TLS. ``tls = true`` with no ``dicom.tls.ca``: the
    configuration is refused, naming the key and the AE."""
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    modality = Modality("CLEARCT", "127.0.0.1", port)
    try:
        config = DicomSection(
            tls={"enabled": True, "cert": pki / "server.crt", "key": pki / "server.key",
                 "ca": pki / "ca.crt"},
            known_aes=[{"title": "CLEARCT", "host": "127.0.0.1", "port": port, "tls": False}])
        scp = StorageCommitmentScp(config, db, Spool(tmp_path / "spool"))
        transaction = generate_uid()
        scp.deliver(_request(db, transaction, "CLEARCT"))
        assert [uid for uid, _ in modality.reports] == [transaction]
    finally:
        modality.stop()
    toml = tmp_path / "pas.toml"
    toml.write_text(f'home = "{tmp_path / "home"}"\n[dicom]\n'
                    'known_aes = [{title = "CT1", host = "10.1.1.1", port = 104, tls = true}]\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(toml)
    assert refused.value.problems == [
        "dicom.known_aes[0].tls: CT1 is called back over TLS: dicom.tls.ca (the modalities' "
        "CA) is required"]


@pytest.mark.root
def test_a_black_holed_modality_does_not_delay_another_modalitys_report(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """SILENT's address swallows every packet; its report is due first. FAST's report must
    still arrive at once, not after SILENT's try times out (6 s here): on the one-thread
    loop it waited for it."""
    monkeypatch.setattr(commitment_scp, "REPORT_ANSWER_TIMEOUT_S", 6.0)
    ns = NetNamespace("stgops").create()
    silent_port = free_port()
    hole = BlackHole(ns, silent_port)
    hole.on()
    fast_port = free_port()
    fast = Modality("FAST", "127.0.0.1", fast_port)
    stopping = threading.Event()
    loop: threading.Thread | None = None
    scp: StorageCommitmentScp | None = None
    try:
        config = DicomSection(known_aes=[
            {"title": "SILENT", "host": ns.inner_address, "port": silent_port},
            {"title": "FAST", "host": "127.0.0.1", "port": fast_port}])
        scp = StorageCommitmentScp(config, db, Spool(tmp_path / "spool"))
        silent_uids = [generate_uid() for _ in range(3)]
        for uid in silent_uids:  # due first, the oldest
            _request(db, uid, "SILENT")
        fast_uid = generate_uid()
        _request(db, fast_uid, "FAST")
        loop = threading.Thread(target=scp.run, args=(stopping,), daemon=True)
        loop.start()
        wait_for(lambda: fast.reports, 30, what="FAST's report")
        # FAST's report came while SILENT's first try was still waiting for its timeout:
        # on the one-thread loop it came only after that try had failed.
        assert [_row(db, u)["attempts"] for u in silent_uids] == [0, 0, 0]
        [(uid, _arrived)] = fast.reports
        assert uid == fast_uid
        # The modality has the report before PAS has its answer and records it.
        wait_for(lambda: _row(db, fast_uid)["state"] == "sent", 10, what="FAST's report sent")
        # SILENT: one try at a time, failing by its own timeout, the others still waiting.
        failed = wait_for(lambda: [r for r in (_row(db, u) for u in silent_uids)
                                   if r["attempts"] == 1], 20, what="SILENT's first try")
        assert len(failed) == 1 and "failed" in failed[0]["last_error"]
        assert all(_row(db, u)["state"] == "pending" for u in silent_uids)
    finally:
        stopping.set()
        if loop is not None:
            loop.join(5)
        hole.off()  # the try under way gets its refusal, and ends before the database does
        if scp is not None and hasattr(scp, "deliveries_under_way"):
            # The try under way ends by its refusal, or its own timeout (6 s here) under a
            # loaded CI: 15 s was once not enough there (the database then closed under it).
            wait_for(lambda: scp.deliveries_under_way() == 0, 40, what="tries ended")
        fast.stop()
        ns.delete()


def test_the_report_on_the_open_association_comes_after_the_answer_to_its_request(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch,
        pynetdicom_senders_fixed: None) -> None:
    """pynetdicom marks the association's loop paused while the N-ACTION handler runs, before
    its N-ACTION-RSP is sent. The report thread took that for its turn: on a loaded host
    (here: an answer 0.5 s late) the report went first, the modality's pynetdicom took it for
    the answer to its N-ACTION and aborted (this process's pynetdicom has PAS's fix and
    copes: the order it received them in is what is checked). The report must wait."""
    monkeypatch.setattr(commitment_scp, "SAME_ASSOCIATION_GRACE_S", 0.0)
    scp = StorageCommitmentScp(DicomSection(known_aes=[
        {"title": "KEEPSOPEN", "host": "127.0.0.1"}]), db, Spool(tmp_path / "spool"))
    [(event_type, on_n_action)] = scp.handlers()
    assert event_type == evt.EVT_N_ACTION

    def late_answer(event: Any) -> Any:
        answer = on_n_action(event)  # starts the report thread
        time.sleep(0.5)  # pynetdicom sends the N-ACTION-RSP only when this returns
        return answer

    pas = AE(ae_title="PAS")
    pas.add_supported_context(StorageCommitmentPushModel)
    port = free_port()
    server = pas.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_N_ACTION, late_answer)])
    reports: list[str] = []
    received: list[str] = []  # DIMSE messages, in the order the modality received them
    modality = AE(ae_title="KEEPSOPEN")
    modality.add_requested_context(StorageCommitmentPushModel)
    assoc = modality.associate("127.0.0.1", port, ae_title="PAS", evt_handlers=[
        (evt.EVT_N_EVENT_REPORT,
         lambda event: (reports.append(str(event.event_information.TransactionUID)),
                        (0x0000, None))[1]),
        (evt.EVT_DIMSE_RECV, lambda event: received.append(type(event.message).__name__))])
    try:
        assert assoc.is_established
        transaction = generate_uid()
        info = Dataset()
        info.TransactionUID = transaction
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = generate_uid()  # never sent: reported failed
        info.ReferencedSOPSequence = [item]
        status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel,
                                        "1.2.840.10008.1.20.1.1")
        assert status.get("Status") == 0x0000, "the N-ACTION-RSP was not the first answer"
        assert assoc.is_established
        wait_for(lambda: reports, 15, what="the report on the open association")
        assert reports == [transaction]
        assert received == ["N_ACTION_RSP", "N_EVENT_REPORT_RQ"]
        wait_for(lambda: _row(db, transaction)["state"] == "sent", 10, what="report recorded")
    finally:
        if assoc.is_established:
            assoc.release()
        server.shutdown()
