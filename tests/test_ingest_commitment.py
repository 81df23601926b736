"""Storage Commitment Push Model SCP (appliance/ingest/commitment.py; docs/ingest.md,
"Storage Commitment").

Found in review (2026-12-04): PAS did not offer Storage Commitment at all. A modality
configured to ask its archive for commitment (most CT and MR are) had that presentation
context rejected, and the technologist saw "archive failed" for every study.

Orthanc (1.6+ is a Storage Commitment SCU) plays the modality that sends, asks, releases
the association and waits for the report on a new one; pynetdicom plays the modalities
Orthanc cannot: one asking for instances PAS does not hold or under another SOP class, one
keeping the association open for the report, one sending malformed requests.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO, N_ACTION
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from tests.support.cleanup import started
from tests.support.objects import tiny_ct
from tests.support.peers import NetNamespace, Orthanc, PasProcess, free_port, read_rows, wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("pynetdicom_senders_fixed")]

WELL_KNOWN = "1.2.840.10008.1.20.1.1"


class Site:
    """One PAS on a test namespace's outer address; Orthanc inside the namespace; the
    pynetdicom modalities on the outer address (so PAS can pin them and call them back)."""

    def __init__(self, root: Path):
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self.ns = NetNamespace("stgcmt").create()
            stack.callback(self.ns.delete)
            self.modality_port = free_port()
            self.pas = PasProcess(root / "pas", {
                "PAS_DICOM__HOST": self.ns.outer_address,
                "PAS_HTTP__ENABLED": "false",
                "PAS_PREFETCH__ENABLED": "false",
                "PAS_DICOM__STORAGE_COMMITMENT_MAX_ITEMS": "100",  # the limit's test: cheap
                "PAS_DICOM__KNOWN_AES":
                    f'[{{title = "ORTHANC", host = "{self.ns.inner_address}", port = 4242}}, '
                    f'{{title = "MODALITY", host = "{self.ns.outer_address}", '
                    f'port = {self.modality_port}}}, '
                    f'{{title = "KEEPSOPEN", host = "{self.ns.outer_address}"}}]',
            })
            self.orthanc = started(stack, Orthanc(root / "orthanc", ns=self.ns, modalities={
                "PAS": ["PAS", self.ns.outer_address, self.pas.port]}))
            started(stack, self.pas)
            stack.pop_all()  # set up: stop() stops them from now on

    def stop(self) -> None:
        self.pas.stop()
        self.orthanc.stop()
        self.ns.delete()

    def rows(self, transaction_uid: str) -> list[dict[str, Any]]:
        return [dict(r) for r in read_rows(
            self.pas.home / "pas.sqlite",
            "SELECT * FROM commitment_requests WHERE transaction_uid = ?", (transaction_uid,))]

    def audit(self, transaction_uid: str) -> list[dict[str, Any]]:
        return [dict(r) for r in read_rows(
            self.pas.home / "pas.sqlite",
            "SELECT * FROM audit WHERE event = 'commitment' AND detail LIKE ?",
            (f"%{transaction_uid}%",))]



@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("stgcmt"))
    try:
        yield site
    finally:
        site.stop()


def request_info(transaction_uid: str | None, items: list[tuple[str | None, str | None]]
                 ) -> Dataset:
    info = Dataset()
    if transaction_uid is not None:
        info.TransactionUID = transaction_uid
    sequence = []
    for sop_class, sop_instance in items:
        item = Dataset()
        if sop_class is not None:
            item.ReferencedSOPClassUID = sop_class
        if sop_instance is not None:
            item.ReferencedSOPInstanceUID = sop_instance
        sequence.append(item)
    info.ReferencedSOPSequence = sequence
    return info


class Reports:
    """N-EVENT-REPORTs a pynetdicom modality received (on its own association or PAS's)."""

    def __init__(self) -> None:
        self.received: list[tuple[int, Dataset, str]] = []
        self.lock = threading.Lock()

    def handler(self, how: str) -> Any:
        def on_report(event: Any) -> tuple[int, None]:
            with self.lock:
                self.received.append((event.request.EventTypeID, event.event_information, how))
            return 0x0000, None
        return on_report

    def for_transaction(self, uid: str) -> list[tuple[int, Dataset, str]]:
        with self.lock:
            return [r for r in self.received if r[1].TransactionUID == uid]


def sent_before_release(site: Site, transaction: str) -> dict[str, Any]:
    """Wait until PAS marks the report sent, i.e. has the modality's N-EVENT-REPORT-RSP.
    The modality's handler records a report before pynetdicom sends that answer: an
    association released (or a listener shut down) as soon as the report is recorded may
    end before the answer goes."""
    [row] = wait_for(lambda: [r for r in site.rows(transaction) if r["state"] == "sent"], 10,
                     what="the report marked sent")
    return row


def store_and_ask(assoc: Any) -> str:
    """One new CT stored on ``assoc``, then its commitment asked (accepted); the
    Transaction UID."""
    stored = tiny_ct()
    assert assoc.send_c_store(stored).Status == 0x0000
    transaction = generate_uid()
    status, _ = assoc.send_n_action(
        request_info(transaction, [(CTImageStorage, str(stored.SOPInstanceUID))]), 1,
        StorageCommitmentPushModel, WELL_KNOWN)
    assert status.Status == 0x0000
    return transaction

def listen_for_reports(site: Site, reports: Reports) -> Any:
    """The modality's own Storage Commitment SCU listening where known_aes says (its host and
    port in the site's namespace): reports on a new association land in ``reports``."""
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    return listener.start_server(
        (site.ns.outer_address, site.modality_port), block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler("new"))])


def modality(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(Verification)
    return ae


def test_orthanc_as_modality_gets_success_for_what_it_sent(site: Site, tmp_path: Path) -> None:
    study = generate_uid()
    sent = []
    for number in (1, 2):
        ds = tiny_ct(study_uid=study, InstanceNumber=number)
        path = tmp_path / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        answer = httpx.post(f"{site.orthanc.url}/instances", content=path.read_bytes(),
                            timeout=30)
        assert answer.status_code == 200, answer.text
        sent.append((answer.json()["ID"], str(ds.SOPInstanceUID)))

    job = httpx.post(f"{site.orthanc.url}/modalities/PAS/store", timeout=60, json={
        "Resources": [orthanc_id for orthanc_id, _ in sent], "StorageCommitment": True,
        "Synchronous": True}).json()
    transaction = job["StorageCommitmentTransactionUID"]

    report = wait_for(lambda: (r := httpx.get(
        f"{site.orthanc.url}/storage-commitment/{transaction}", timeout=10).json())["Status"]
        != "Pending" and r, 30, what="Orthanc's storage commitment report")
    assert report["Status"] == "Success", report
    assert sorted(i["SOPInstanceUID"] for i in report["Success"]) == sorted(u for _, u in sent)
    assert report["Failures"] == []
    # Marked once Orthanc's N-EVENT-REPORT-RSP came back: a moment after Orthanc has it.
    [row] = wait_for(lambda: [r for r in site.rows(transaction) if r["state"] == "sent"], 10,
                     what="the report marked sent")
    assert row["calling_ae"] == "ORTHANC"
    assert row["sent_how"] == f"new association to {site.ns.inner_address}:4242"
    assert sorted(json.loads(row["committed"])) == sorted([CTImageStorage, u] for _, u in sent)
    assert json.loads(row["failed"]) == []
    [audit] = site.audit(transaction)
    assert audit["actor"] == "ORTHANC" and audit["outcome"] == "success"
    assert audit["target"] == study
    assert "2 committed, 0 not held" in audit["detail"]


def test_missing_and_wrong_class_reported_failed_on_the_open_association(site: Site) -> None:
    """The modality keeps the association open: the report comes on it, event type 2, the
    one never sent 0x0112, the one asked under another SOP class 0x0119."""
    reports = Reports()
    ae = modality("KEEPSOPEN")
    assoc = ae.associate(site.ns.outer_address, site.pas.port, ae_title="PAS",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler("same"))])
    assert assoc.is_established
    try:
        stored = tiny_ct()
        stored_as_mr = tiny_ct()
        for ds in (stored, stored_as_mr):
            assert assoc.send_c_store(ds).Status == 0x0000
        never_sent = generate_uid()
        transaction = generate_uid()
        status, _ = assoc.send_n_action(
            request_info(transaction, [(CTImageStorage, str(stored.SOPInstanceUID)),
                                       (CTImageStorage, never_sent),
                                       (MRImageStorage, str(stored_as_mr.SOPInstanceUID))]),
            1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0000
        [(event_type, info, how)] = wait_for(lambda: reports.for_transaction(transaction), 15,
                                             what="the report on the open association")
        # Released once PAS has the N-EVENT-REPORT-RSP: the handler records the report
        # before pynetdicom sends its answer, and a release sent in between left the answer
        # unsent (pynetdicom: "Invalid event 'Evt9' for the current state 'Sta7'"; CI,
        # 2026-12-06), the report never marked sent.
        sent_before_release(site, transaction)
    finally:
        assoc.release()
    assert (event_type, how) == (2, "same")
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in info.ReferencedSOPSequence] == [(CTImageStorage, stored.SOPInstanceUID)]
    assert sorted((i.ReferencedSOPInstanceUID, i.ReferencedSOPClassUID, i.FailureReason)
                  for i in info.FailedSOPSequence) == sorted([
        (never_sent, CTImageStorage, 0x0112),
        (stored_as_mr.SOPInstanceUID, MRImageStorage, 0x0119)])
    assert info.RetrieveAETitle == "PAS"
    [row] = wait_for(lambda: [r for r in site.rows(transaction) if r["state"] == "sent"], 10,
                     what="the report marked sent")
    assert row["sent_how"] == "same association"
    [audit] = site.audit(transaction)
    assert audit["outcome"] == "failure: 2 of 3 not held"
    assert "(0x0112, 0x0119)" in audit["detail"]


def test_report_on_a_new_association_once_released_and_the_same_answer_again(
        site: Site) -> None:
    """The modality releases after the N-ACTION-RSP: PAS calls it back (known_aes host and
    port), proposing the SCP role. Asked again with the same Transaction UID: the same
    answer, again, and still one row."""
    reports = Reports()
    server = listen_for_reports(site, reports)
    try:
        stored = tiny_ct()
        transaction = generate_uid()
        for attempt in (1, 2):
            assoc = modality("MODALITY").associate(site.ns.outer_address, site.pas.port,
                                                   ae_title="PAS")
            if attempt == 1:
                assert assoc.send_c_store(stored).Status == 0x0000
            status, _ = assoc.send_n_action(
                request_info(transaction, [(CTImageStorage, str(stored.SOPInstanceUID))]),
                1, StorageCommitmentPushModel, WELL_KNOWN)
            assoc.release()
            assert status.Status == 0x0000
            wait_for(lambda n=attempt: len(reports.for_transaction(transaction)) == n, 15,
                     what=f"report {attempt} on a new association")
        sent_before_release(site, transaction)  # the listener's shutdown ends its association
    finally:
        server.shutdown()
    answers = reports.for_transaction(transaction)
    for event_type, info, how in answers:
        assert (event_type, how) == (1, "new")
        assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [
            stored.SOPInstanceUID]
        assert "FailedSOPSequence" not in info
    [row] = wait_for(lambda: [r for r in site.rows(transaction) if r["state"] == "sent"], 10,
                     what="the report marked sent")
    assert row["sent_how"] == f"new association to {site.ns.outer_address}:{site.modality_port}"
    assert len(site.audit(transaction)) == 1  # the request once; the repeat is not new


MALFORMED = [
    (lambda: request_info(None, [(CTImageStorage, generate_uid())]), 1, WELL_KNOWN,
     0x0120, "Transaction UID (0008,1195) missing"),
    (lambda: request_info(generate_uid(), []), 1, WELL_KNOWN,
     0x0121, "Referenced SOP Sequence (0008,1199) is empty"),
    (lambda: request_info(generate_uid(), [(CTImageStorage, generate_uid()),
                                           (CTImageStorage, None)]), 1, WELL_KNOWN,
     0x0120, "item 2: no Referenced SOP Instance UID"),
    (lambda: request_info(generate_uid(), [(None, generate_uid())]), 1, WELL_KNOWN,
     0x0120, "item 1: no Referenced SOP Class UID"),
    (lambda: request_info("not a uid", [(CTImageStorage, generate_uid())]), 1, WELL_KNOWN,
     0x0106, "Transaction UID (0008,1195) is not a valid UID"),
    (lambda: request_info(generate_uid(), [(CTImageStorage, generate_uid())] * 101), 1,
     WELL_KNOWN, 0x0213, "101 items; at most 100 a request"),
    (lambda: request_info(generate_uid(), [(CTImageStorage, generate_uid())]), 2, WELL_KNOWN,
     0x0123, "Action Type ID 2: only 1 (Request Storage Commitment)"),
    (lambda: request_info(generate_uid(), [(CTImageStorage, generate_uid())]), 1,
     "1.2.3.4", 0x0117, f"Requested SOP Instance UID not {WELL_KNOWN}"),
]


# Implicit VR little endian: a Transaction UID, then a Referenced SOP Sequence of undefined
# length whose first "item" is not an item tag: pydicom cannot decode it.
UNDECODABLE = (b"\x08\x00\x95\x11\x08\x00\x00\x001.2.3.4\x00"
               b"\x08\x00\x99\x11\xff\xff\xff\xff\x01\x02\x03\x04\x05\x06\x07\x08")


def send_raw_n_action(assoc: Any, information: bytes) -> Any:
    """An N-ACTION-RQ whose Action Information is ``information`` as it is (pynetdicom's
    send_n_action only sends what it encodes itself); the N-ACTION-RSP primitive. The
    association's loop is paused meanwhile, as pynetdicom's own send_*() do."""
    context = assoc._get_valid_context(StorageCommitmentPushModel, "", "scu")
    request = N_ACTION()
    request.MessageID = 77
    request.RequestedSOPClassUID = StorageCommitmentPushModel
    request.RequestedSOPInstanceUID = WELL_KNOWN
    request.ActionTypeID = 1
    request.ActionInformation = BytesIO(information)
    assoc._reactor_checkpoint.clear()
    try:
        wait_for(lambda: assoc._is_paused, 5, interval=0.001, what="the loop paused")
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return response


def test_malformed_requests_refused_naming_the_problem_and_the_association_serves_on(
        site: Site) -> None:
    reports = Reports()
    assoc = modality("KEEPSOPEN").associate(
        site.ns.outer_address, site.pas.port, ae_title="PAS",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler("same"))])
    assert assoc.is_established
    before = len(read_rows(site.pas.home / "pas.sqlite", "SELECT id FROM commitment_requests"))
    try:
        for make, action_type, instance, status_code, comment in MALFORMED:
            status, _ = assoc.send_n_action(make(), action_type, StorageCommitmentPushModel,
                                            instance)
            assert (status.Status, status.ErrorComment) == (status_code, comment)
        undecodable = send_raw_n_action(assoc, UNDECODABLE)
        assert undecodable.Status == 0x0115
        assert assoc.is_established
        # Still serving: a good request on the same association is answered and reported.
        transaction = store_and_ask(assoc)
        wait_for(lambda: reports.for_transaction(transaction), 15, what="the good report")
        sent_before_release(site, transaction)
    finally:
        assoc.release()
    after = read_rows(site.pas.home / "pas.sqlite", "SELECT id FROM commitment_requests")
    assert len(after) == before + 1  # the refused ones recorded nothing
    log = site.pas.log()
    assert "Storage Commitment request from KEEPSOPEN" in log
    assert "refused (0x0120): Transaction UID (0008,1195) missing" in log
    assert "refused (0x0115): Action Information unreadable: OSError" in log


def test_report_undelivered_is_retried_and_survives_a_restart(site: Site) -> None:
    """The modality's listener is down when PAS calls back: the report stays pending with
    the error; PAS restarts; the listener is up; the report arrives."""
    stored = tiny_ct()
    transaction = generate_uid()
    assoc = modality("MODALITY").associate(site.ns.outer_address, site.pas.port,
                                           ae_title="PAS")
    assert assoc.send_c_store(stored).Status == 0x0000
    status, _ = assoc.send_n_action(
        request_info(transaction, [(CTImageStorage, str(stored.SOPInstanceUID))]), 1,
        StorageCommitmentPushModel, WELL_KNOWN)
    assoc.release()
    assert status.Status == 0x0000
    [row] = wait_for(lambda: [r for r in site.rows(transaction) if r["attempts"] >= 1], 15,
                     what="a failed delivery")
    assert row["state"] == "pending"
    assert f"at {site.ns.outer_address}:{site.modality_port} failed" in row["last_error"]
    assert row["next_attempt_at"] > row["requested_at"]

    site.pas.stop()
    reports = Reports()
    server = listen_for_reports(site, reports)
    try:
        site.pas.start()
        [(event_type, info, _)] = wait_for(lambda: reports.for_transaction(transaction), 15,
                                           what="the report after the restart")
        sent_before_release(site, transaction)
    finally:
        server.shutdown()
    assert event_type == 1
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [
        stored.SOPInstanceUID]
    wait_for(lambda: site.rows(transaction)[0]["state"] == "sent", 10, what="marked sent")


def test_dicom_storage_commitment_false_refuses_the_sop_class(tmp_path: Path) -> None:
    """The switch: with ``dicom.storage_commitment = false`` the context is rejected at
    negotiation (as before the feature), and everything else is served."""
    pas = PasProcess(tmp_path / "off", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_HTTP__ENABLED": "false",
                                        "PAS_PREFETCH__ENABLED": "false",
                                        "PAS_DICOM__STORAGE_COMMITMENT": "false"}).start()
    try:
        assoc = modality("CT1").associate("127.0.0.1", pas.port, ae_title="PAS")
        assert assoc.is_established
        try:
            assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == [
                StorageCommitmentPushModel]
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_store(tiny_ct()).Status == 0x0000
        finally:
            assoc.release()
    finally:
        pas.stop()


def test_report_without_an_address_says_which_key_and_is_given_up_past_its_deadline(
        tmp_path: Path) -> None:
    """In-process, the daemon's own objects: a modality PAS has no address for (neither
    known_aes host+port nor a move destination) gets a retry naming the keys to set; past
    its deadline the report is given up, with a failure row in the audit trail."""
    from appliance.config import DicomSection
    from appliance.ingest.commitment import StorageCommitmentScp
    from appliance.store import commitment
    from appliance.store.db import Database
    from appliance.store.spool import Spool

    db = Database(tmp_path / "pas.sqlite")
    scp = StorageCommitmentScp(DicomSection(known_aes=[{"title": "CT9"}]), db,
                               Spool(tmp_path / "spool"))
    item = [(CTImageStorage, generate_uid())]
    waiting, _ = commitment.record_request(db, "1.2.9.1", "CT9", "10.0.0.9", item,
                                           lambda relative: True, 3600)
    late, _ = commitment.record_request(db, "1.2.9.2", "CT9", "10.0.0.9", item,
                                        lambda relative: True, -1)
    scp.deliver(waiting)
    scp.deliver(late)
    rows = {r["transaction_uid"]: dict(r) for r in db.query("SELECT * FROM commitment_requests")}
    assert rows["1.2.9.1"]["state"] == "pending" and rows["1.2.9.1"]["attempts"] == 1
    assert rows["1.2.9.1"]["last_error"] == (
        "no address for CT9: give it host and port in dicom.known_aes (or list it in "
        "serving.move_destinations)")
    assert rows["1.2.9.1"]["next_attempt_at"] >= rows["1.2.9.1"]["requested_at"] + 5
    assert rows["1.2.9.2"]["state"] == "given-up"
    [given_up] = db.query("SELECT * FROM audit WHERE event = 'commitment' AND outcome LIKE "
                          "'failure: report not delivered%'")
    assert given_up["actor"] == "CT9" and "1.2.9.2" in given_up["detail"]
    assert commitment.due(db) == []  # neither is due now: one waits, one is given up
    db.close()


def test_settled_requests_are_forgotten_after_a_week_pending_ones_never(
        tmp_path: Path) -> None:
    """In-process: a request holds the UIDs of every instance it answered (a 2,000-image CT
    is ~260 kB), and rows were kept for ever. The delivery loop's first pass deletes those
    settled (sent, given up) over a week ago; a pending one, however old, and a recent one
    stay; the audit rows all stay."""
    import threading

    from appliance.config import DicomSection
    from appliance.ingest.commitment import StorageCommitmentScp
    from appliance.store import commitment
    from appliance.store.db import Database
    from appliance.store.spool import Spool

    db = Database(tmp_path / "pas.sqlite")
    scp = StorageCommitmentScp(DicomSection(known_aes=[{"title": "CT9"}]), db,
                               Spool(tmp_path / "spool"))
    item = [(CTImageStorage, generate_uid())]
    ids = {}
    for uid in ("1.2.9.10", "1.2.9.11", "1.2.9.12", "1.2.9.13"):
        ids[uid] = commitment.record_request(db, uid, "CT9", "10.0.0.9", item,
                                             lambda relative: True, 30 * 86400)[0].id
    for sent in ("1.2.9.10", "1.2.9.11"):                        # sent 8 days ago, just now
        commitment.mark_sent(db, commitment.get(db, ids[sent]), "same association")
    with db.transaction() as conn:
        conn.execute("UPDATE commitment_requests SET state = 'given-up' WHERE id = ?",
                     (ids["1.2.9.12"],))                              # given up 8 days ago
        conn.execute("UPDATE commitment_requests SET updated_at = updated_at - ? "
                     "WHERE id IN (?, ?, ?)", (8 * 86400, ids["1.2.9.10"], ids["1.2.9.12"],
                                               ids["1.2.9.13"]))     # 13: pending, 8 days
    stopping = threading.Event()
    loop = threading.Thread(target=scp.run, args=(stopping,), daemon=True)
    loop.start()
    try:
        wait_for(lambda: len(db.query("SELECT id FROM commitment_requests")) == 2, 10,
                 what="the settled requests of over a week forgotten")
    finally:
        stopping.set()
        scp.wake.set()
        loop.join(10)
    left = {r["transaction_uid"] for r in db.query("SELECT transaction_uid "
                                                   "FROM commitment_requests")}
    assert left == {"1.2.9.11", "1.2.9.13"}
    assert len(db.query("SELECT id FROM audit WHERE event = 'commitment'")) == 4
    db.close()


def test_a_request_crossing_the_report_on_the_open_association_is_answered(site: Site) -> None:
    """Found in review (2026-12-04): the modality sends a C-ECHO-RQ (or its next N-ACTION-RQ)
    just as PAS sends the report on the open association. pynetdicom's send_n_event_report
    took the first message that came back as its answer: the C-ECHO-RQ was read as an
    invalid N-EVENT-REPORT-RSP and PAS aborted the association the modality was using.
    Here the modality sends a C-ECHO-RQ before it answers the report (each side has one
    operation outstanding, within the default window)."""
    reports = Reports()
    echoes: list[int] = []
    ae = modality("KEEPSOPEN")

    def on_report(event: Any) -> tuple[int, None]:
        echo = C_ECHO()
        echo.MessageID = 901
        echo.AffectedSOPClassUID = Verification
        context = event.assoc._get_valid_context(Verification, "", "scu")
        event.assoc.dimse.send_msg(echo, context.context_id)
        return reports.handler("same")(event)

    def on_message(event: Any) -> None:  # the modality's loop drops the answer itself
        if type(event.message).__name__ == "C_ECHO_RSP":
            echoes.append(int(event.message.command_set.Status))

    assoc = ae.associate(site.ns.outer_address, site.pas.port, ae_title="PAS",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report),
                                       (evt.EVT_DIMSE_RECV, on_message)])
    assert assoc.is_established
    try:
        transaction = store_and_ask(assoc)
        wait_for(lambda: reports.for_transaction(transaction), 15, what="the report")
        [row] = wait_for(lambda: [r for r in site.rows(transaction) if r["state"] == "sent"],
                         10, what="the report marked sent")
        assert row["sent_how"] == "same association"
        wait_for(lambda: echoes, 10, what="the C-ECHO-RSP")
        assert echoes == [0x0000]
        assert assoc.is_established and not assoc.is_aborted
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_request_asked_again_while_its_report_is_on_its_way_gets_its_own_report(
        tmp_path: Path) -> None:
    """Seen in CI (2026-12-07): the modality, its first report received, asked the same
    Transaction UID again 2 ms before PAS's delivery thread recorded that first report as
    sent. The row, made due again by the second asking, was marked sent by the first
    delivery's end, and the second asking never had its report. In-process, on the store:
    a delivery's outcome lands only on the asking it answered."""
    from appliance.store import commitment
    from appliance.store.db import Database

    db = Database(tmp_path / "pas.sqlite")
    item = [(CTImageStorage, generate_uid())]

    def ask() -> commitment.Commitment:
        return commitment.record_request(db, "1.2.9.20", "CT9", "10.0.0.9", item,
                                         lambda relative: True, 3600)[0]

    def row() -> dict[str, Any]:
        return dict(db.query_one("SELECT * FROM commitment_requests"))

    for outcome in ("sent", "failed"):
        first = ask()  # the asking a delivery thread took
        [due] = commitment.due(db)
        assert due.id == first.id
        again = ask()  # asked again while that delivery is under way
        assert again.id == first.id and again.give_up_at > first.give_up_at
        if outcome == "sent":
            commitment.mark_sent(db, due, "new association to 10.0.0.9:104")
        else:
            commitment.mark_failed(db, due, "association refused", retry_in_s=600)
        # Still due at once, its attempts counted anew: the second asking's report.
        assert (row()["state"], row()["attempts"], row()["last_error"]) == ("pending", 0, None)
        assert [r.id for r in commitment.due(db)] == [first.id]
        commitment.mark_sent(db, again, "new association to 10.0.0.9:104")
        assert (row()["state"], row()["attempts"]) == ("sent", 1)
    # Once past its deadline, the earlier asking is not given up over the new one.
    stale = ask()
    ask()
    commitment.give_up(db, stale, "not delivered by its deadline (3 attempts)")
    assert row()["state"] == "pending"
    db.close()
