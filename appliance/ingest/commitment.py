"""Storage Commitment Push Model SCP (PS3.4 Annex J) for the modalities.

Owns: the N-ACTION-RQ handler on the ingest listener (validating the request, recording it
through :mod:`appliance.store.commitment`, answering N-ACTION-RSP), and delivering each
answer as an N-EVENT-REPORT-RQ: on the asking association while it is still open, else on a
new association PAS opens to the modality, retried with backoff until a deadline. May not
touch: SQL (the store module decides and records) or the C-STORE path.

Why: modalities are usually configured to ask their archive for commitment and to delete
their own copy only once it committed. PAS is their only destination; without this SOP
class their commitment context was rejected and the technologist saw "archive failed".

Where a report goes (docs/ingest.md, "Storage Commitment"): PAS first gives the modality a
moment (:data:`SAME_ASSOCIATION_GRACE_S`) after the N-ACTION-RSP; if the association is
still open it sends the report there, from a thread of its own (pynetdicom pauses the
association's loop for it, after the response went out). A modality that released at once
(Orthanc, many IHE Evidence Creators) gets it on a new association, to the address of its
``dicom.known_aes`` entry (``host`` and ``port``) or else of its ``serving.move_destinations``
entry, with PAS proposing SCP role selection (PS3.4 J.3.3, PS3.7 D.3.3.4). A report that
could not be delivered stays pending in the database: retried with backoff, across restarts,
until ``dicom.storage_commitment_give_up_h``, then given up, logged and audited.

Deliveries to different modalities are independent: at most :data:`DELIVERY_WORKERS`
threads at once, at most one report in flight per AE, so a modality whose
address swallows packets (up to :data:`REPORT_ANSWER_TIMEOUT_S` a try) delays only its own
reports, not every other modality's. A report to a ``dicom.known_aes`` entry with ``tls``
(by default: when the listener speaks TLS, ``dicom.tls.enabled``) goes over DICOM TLS with
the listener's certificate and key as client certificate, the modality's certificate
checked against ``dicom.tls.ca``, as a ``dicom`` destination's forwarding does, and, with
the entry's ``tls_check_hostname``, required to name the address it is sent to.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_role

from appliance.config import DicomSection, MoveDestination
from appliance.dicomnet.event_report import EventReportError, send_event_report
from appliance.dicomnet.outgoing import association_ended
from appliance.ops.metrics import count_commitment_report
from appliance.ops.security import OutgoingDicomTls
from appliance.routing.backoff import exponential_delay
from appliance.store import commitment
from appliance.store.db import Database, now
from appliance.store.spool import Spool

log = logging.getLogger("pas.ingest.commitment")
FORGET_EVERY_S = 3600.0  # how often settled requests are pruned

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1   # Action Type ID (PS3.4 J.3.2.1.1)
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type ID (PS3.4 J.3.3.1)

# N-ACTION failure statuses (PS3.7 C.4.2.1 general statuses), each with an Error Comment.
PROCESSING_FAILURE = 0x0110
INVALID_ATTRIBUTE_VALUE = 0x0106
INVALID_ARGUMENT_VALUE = 0x0115
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

# How long after the N-ACTION-RSP PAS waits to see whether the modality releases the
# association (then the report goes on a new one) before sending it on that association.
SAME_ASSOCIATION_GRACE_S = 0.3
# Longest wait for the modality's N-EVENT-REPORT-RSP, and for a new association to open.
REPORT_ANSWER_TIMEOUT_S = 10.0
# Backoff between delivery attempts of one report.
RETRY_INITIAL_S = 10.0
RETRY_MAX_S = 600.0
# Reports delivered at once on new associations, each to a different modality.
DELIVERY_WORKERS = 4


class CommitmentRefused(Exception):
    """A request PAS cannot take: the N-ACTION failure status and its Error Comment (an LO:
    at most 64 characters, so it names the problem briefly; the log line says it whole)."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]


def _uid(value: Any) -> str:
    return str(value or "").strip("\x00 ")


def parse_request(action_type_id: int | None, requested_instance: str,
                  information: Dataset | None, max_items: int
                  ) -> tuple[str, list[tuple[str, str]]]:
    """The Transaction UID and the (SOP Class UID, SOP Instance UID) items of an N-ACTION-RQ
    asking for Storage Commitment; :class:`CommitmentRefused` naming what is wrong."""
    if action_type_id != REQUEST_STORAGE_COMMITMENT:
        raise CommitmentRefused(NO_SUCH_ACTION, f"Action Type ID {action_type_id}: only 1 "
                                                "(Request Storage Commitment)")
    if requested_instance != WELL_KNOWN_INSTANCE:
        raise CommitmentRefused(INVALID_OBJECT_INSTANCE,
                                f"Requested SOP Instance UID not {WELL_KNOWN_INSTANCE}")
    if information is None:
        raise CommitmentRefused(MISSING_ATTRIBUTE, "no Action Information")
    transaction_uid = _uid(information.get("TransactionUID"))
    if not transaction_uid:
        raise CommitmentRefused(MISSING_ATTRIBUTE, "Transaction UID (0008,1195) missing")
    if not UID(transaction_uid).is_valid:
        raise CommitmentRefused(INVALID_ATTRIBUTE_VALUE,
                                "Transaction UID (0008,1195) is not a valid UID")
    if "ReferencedSOPSequence" not in information:
        raise CommitmentRefused(MISSING_ATTRIBUTE, "Referenced SOP Sequence (0008,1199) missing")
    sequence = information.ReferencedSOPSequence or []
    if not sequence:
        raise CommitmentRefused(MISSING_ATTRIBUTE_VALUE,
                                "Referenced SOP Sequence (0008,1199) is empty")
    if len(sequence) > max_items:  # the request and its report stay bounded (invariant 8)
        raise CommitmentRefused(RESOURCE_LIMITATION,
                                f"{len(sequence)} items; at most {max_items} a request")
    items: list[tuple[str, str]] = []
    for number, item in enumerate(sequence, 1):
        sop_class = _uid(item.get("ReferencedSOPClassUID"))
        sop_instance = _uid(item.get("ReferencedSOPInstanceUID"))
        for keyword, value in (("Class", sop_class), ("Instance", sop_instance)):
            if not value:
                raise CommitmentRefused(MISSING_ATTRIBUTE,
                                        f"item {number}: no Referenced SOP {keyword} UID")
            if not UID(value).is_valid:
                raise CommitmentRefused(INVALID_ATTRIBUTE_VALUE,
                                        f"item {number}: Referenced SOP {keyword} UID invalid")
        items.append((sop_class, sop_instance))
    return transaction_uid, items


def report_dataset(request: commitment.Commitment, retrieve_ae: str) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT's Event Type ID and Event Information (PS3.4 J.3.3.1)."""
    info = Dataset()
    info.TransactionUID = request.transaction_uid
    info.RetrieveAETitle = retrieve_ae  # where the committed instances can be retrieved
    if request.committed:
        info.ReferencedSOPSequence = DicomSequence([
            _referenced(sop_class, sop_instance) for sop_class, sop_instance in request.committed])
    if request.failed:
        failed = []
        for sop_class, sop_instance, reason in request.failed:
            item = _referenced(sop_class, sop_instance)
            item.FailureReason = reason
            failed.append(item)
        info.FailedSOPSequence = DicomSequence(failed)
    return (SOME_FAILED if request.failed else ALL_COMMITTED), info


def _referenced(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


class StorageCommitmentScp:
    """The N-ACTION handler on the ingest AE and the reports' delivery loop."""

    def __init__(self, config: DicomSection, db: Database, spool: Spool,
                 move_destinations: list[MoveDestination] | None = None):
        self.config = config
        self.db = db
        self.spool = spool
        self.give_up_after_s = config.storage_commitment_give_up_h * 3600.0
        self.addresses: dict[str, tuple[str, int]] = {
            d.title: (d.host, d.port) for d in move_destinations or []}
        # known_aes wins over move_destinations: it is the modality's own entry.
        self.addresses.update({ae.title: (ae.host, ae.port) for ae in config.known_aes
                               if ae.host and ae.port})
        # Modalities whose reports go over DICOM TLS (config: KnownAE.tls, else the
        # MoveDestination's, else dicom.tls.enabled), the entry giving the address deciding.
        uses_tls = {d.title: d.uses_tls(config.tls.enabled) for d in move_destinations or []}
        uses_tls.update({ae.title: config.tls.enabled if ae.tls is None else ae.tls
                         for ae in config.known_aes if ae.host and ae.port})
        self.tls_aes = {title for title, tls in uses_tls.items() if tls}
        # ... and whose certificate must also name the address (tls_check_hostname): the
        # entry giving the address decides here too (a move destination's was not heeded).
        checks_host = {d.title: d.tls_check_hostname for d in move_destinations or []}
        checks_host.update({ae.title: ae.tls_check_hostname for ae in config.known_aes
                            if ae.host and ae.port})
        self.host_checked_aes = {title for title, check in checks_host.items() if check}
        self.outgoing_tls = OutgoingDicomTls(config.tls.ca, config.tls.cert,
                                             config.tls.key)
        self._in_flight: set[int] = set()  # reports being tried on their own association
        self._busy_aes: set[str] = set()   # modalities with a report on a new association
        self._answering: set[tuple[str, str]] = set()  # (AE, Transaction UID) being recorded
        self._lock = threading.Lock()
        self.wake = threading.Event()

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_N_ACTION, self._on_n_action)]

    # -- the request ------------------------------------------------------------------------

    def _on_n_action(self, event: Any) -> tuple[Any, Dataset | None]:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        address = assoc.requestor.address
        try:
            transaction_uid, items = self._read(event)
        except CommitmentRefused as refused:
            log.warning("Storage Commitment request from %s (%s) refused (0x%04X): %s",
                        calling, address, refused.status, refused, extra={"CALLING_AE": calling})
            return _failure(refused.status, refused.comment), None
        # Claimed before the row exists: a new (or asked again) request is due at once, and
        # a delivery pass between its commit and the in-flight mark below would also send
        # it on a new association while this one sends it here (found at review).
        answering = (calling, transaction_uid)
        with self._lock:
            self._answering.add(answering)
        try:
            recorded, new = commitment.record_request(
                self.db, transaction_uid, calling, address, items,
                lambda path: self.spool.path(path).is_file(), self.give_up_after_s)
        except Exception as exc:
            with self._lock:
                self._answering.discard(answering)
            log.exception("Storage Commitment request %s from %s could not be recorded",
                          transaction_uid, calling, extra={"CALLING_AE": calling})
            return _failure(PROCESSING_FAILURE, f"not recorded: {type(exc).__name__}"), None
        log.info("Storage Commitment request %s from %s (%s)%s: %d of %d instances committed",
                 transaction_uid, calling, address, "" if new else " (again)",
                 len(recorded.committed), len(recorded.committed) + len(recorded.failed),
                 extra={"CALLING_AE": calling})
        with self._lock:
            self._in_flight.add(recorded.id)
            self._answering.discard(answering)
        threading.Thread(target=self._report_on_association, args=(recorded.id, assoc),
                         name="pas-stgcmt-here", daemon=True).start()
        return 0x0000, None

    def _read(self, event: Any) -> tuple[str, list[tuple[str, str]]]:
        """:func:`parse_request` on the event; Action Information pydicom cannot decode is
        refused like any other bad request, not left to pynetdicom's bare 0x0110."""
        request = event.request
        try:
            information = event.action_information if request.ActionInformation else None
            return parse_request(request.ActionTypeID, _uid(request.RequestedSOPInstanceUID),
                                 information, self.config.storage_commitment_max_items)
        except CommitmentRefused:
            raise
        except Exception as exc:  # undecodable Action Information, a broken element
            raise CommitmentRefused(INVALID_ARGUMENT_VALUE, f"Action Information unreadable: "
                                                            f"{type(exc).__name__}") from exc

    # -- delivery ---------------------------------------------------------------------------

    def _report_on_association(self, request_id: int, assoc: Any) -> None:
        """Send the report on the asking association if the modality keeps it open; else
        leave it to the loop (a new association)."""
        try:
            deadline = time.monotonic() + SAME_ASSOCIATION_GRACE_S
            while time.monotonic() < deadline and not association_ended(assoc):
                time.sleep(0.02)
            request = commitment.get(self.db, request_id)
            if request is None or request.state != "pending" or association_ended(assoc):
                return
            error = self._send_here(assoc, request)
            if error is None:
                self._sent(request, "same association")
            else:
                log.info("Storage Commitment report %s not taken on the asking association "
                         "(%s): sending it on a new one", request.transaction_uid, error)
        except Exception:
            log.exception("Storage Commitment report on the asking association failed")
        finally:
            with self._lock:
                self._in_flight.discard(request_id)
            self.wake.set()

    def _send_here(self, assoc: Any, request: commitment.Commitment) -> str | None:
        """:meth:`_send` on the association the modality opened and may still be using:
        a request it sends meanwhile is served, not taken for the answer (event_report.py)."""
        if getattr(assoc.dul, "_pas_io_lock", None) is None:  # pynetdicom's own loops
            assoc.dimse_timeout = REPORT_ANSWER_TIMEOUT_S
            return self._send(assoc, request)
        event_type, info = report_dataset(request, self.config.ae_title)
        try:
            code = send_event_report(assoc, info, event_type, STORAGE_COMMITMENT_PUSH,
                                     WELL_KNOWN_INSTANCE, 1, REPORT_ANSWER_TIMEOUT_S)
        except EventReportError as exc:
            return str(exc)
        return None if code == 0x0000 else f"N-EVENT-REPORT-RSP status 0x{code:04X}"

    def _send(self, assoc: Any, request: commitment.Commitment) -> str | None:
        """Send the report on ``assoc``; None when the modality answered success, else what
        went wrong."""
        event_type, info = report_dataset(request, self.config.ae_title)
        status, _reply = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT_PUSH,
                                                   WELL_KNOWN_INSTANCE, msg_id=1)
        code = status.get("Status") if status is not None else None
        if code is None:
            return "no N-EVENT-REPORT-RSP"
        if code != 0x0000:
            return f"N-EVENT-REPORT-RSP status 0x{code:04X}"
        return None

    def _sent(self, request: commitment.Commitment, how: str) -> None:
        commitment.mark_sent(self.db, request, how)
        count_commitment_report("sent")
        log.info("Storage Commitment report %s sent to %s on the %s (%d committed, %d failed)",
                 request.transaction_uid, request.calling_ae, how, len(request.committed),
                 len(request.failed), extra={"CALLING_AE": request.calling_ae})

    def deliver(self, request: commitment.Commitment) -> None:
        """One attempt on a new association to the modality; the outcome recorded."""
        if now() >= request.give_up_at:
            error = f"not delivered by its deadline ({request.attempts} attempts)"
            commitment.give_up(self.db, request, error)
            count_commitment_report("given-up")
            log.error("Storage Commitment report %s to %s given up: %s; the modality keeps its "
                      "copy (it never heard PAS committed)", request.transaction_uid,
                      request.calling_ae, error, extra={"CALLING_AE": request.calling_ae})
            return
        address = self.addresses.get(request.calling_ae)
        if address is None:
            error = (f"no address for {request.calling_ae}: give it host and port in "
                     f"dicom.known_aes (or list it in serving.move_destinations)")
        else:
            error = self._deliver_to(request, *address)
            if error is None:
                self._sent(request, f"new association to {address[0]}:{address[1]}")
                return
        delay = exponential_delay(request.attempts + 1, RETRY_INITIAL_S, RETRY_MAX_S)
        commitment.mark_failed(self.db, request, error, delay)
        count_commitment_report("failed")
        log.warning("Storage Commitment report %s to %s not delivered: %s; next try in %.0f s",
                    request.transaction_uid, request.calling_ae, error, delay,
                    extra={"CALLING_AE": request.calling_ae})

    def _deliver_to(self, request: commitment.Commitment, host: str, port: int) -> str | None:
        ae = AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = REPORT_ANSWER_TIMEOUT_S
        ae.connection_timeout = REPORT_ANSWER_TIMEOUT_S
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH,
                                 [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # PAS is the SCP of the class and the requestor of this association: SCP role only.
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        tls = request.calling_ae in self.tls_aes
        checked = tls and request.calling_ae in self.host_checked_aes
        try:
            tls_args = self.outgoing_tls.tls_args(tls, host if checked else None)
            assoc = ae.associate(host, port, ae_title=request.calling_ae, ext_neg=[role],
                                 tls_args=tls_args)  # type: ignore[arg-type]
        except Exception as exc:
            return f"association to {host}:{port}{' (TLS)' if tls else ''} failed: {exc}"
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "failed"
            if tls and not assoc.is_rejected:
                # pynetdicom logs the handshake's own error, and returns no association.
                why += (f" (TLS: handshake refused, the modality does not speak TLS there, or "
                        f"its certificate does not name {host} (tls_check_hostname))"
                        if checked else " (TLS: handshake refused, or the modality does not "
                        "speak TLS there)")
            return f"association to {request.calling_ae} at {host}:{port} {why}"
        try:
            if not assoc.accepted_contexts:
                return "the modality accepted no Storage Commitment context"
            return self._send(assoc, request)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            if assoc.is_established:
                assoc.release()

    def deliver_due(self) -> None:
        """Hand due reports to delivery threads: at most one in flight per modality, at
        most :data:`DELIVERY_WORKERS` at once. A report whose AE is busy, or beyond the
        bound, waits for the next pass (a delivery ending wakes the loop). Daemon threads,
        as the loop's own: a stop never waits for a try to a silent modality to time out."""
        with self._lock:
            busy = set(self._busy_aes)
        if len(busy) >= DELIVERY_WORKERS:
            return
        for request in commitment.due(self.db, exclude_aes=busy):
            with self._lock:
                if len(self._busy_aes) >= DELIVERY_WORKERS:
                    return
                if (request.id in self._in_flight or request.calling_ae in self._busy_aes
                        or (request.calling_ae, request.transaction_uid) in self._answering):
                    continue
                self._in_flight.add(request.id)
                self._busy_aes.add(request.calling_ae)
            threading.Thread(target=self._deliver_in_thread, args=(request,),
                             name="pas-stgcmt-send", daemon=True).start()

    def _deliver_in_thread(self, request: commitment.Commitment) -> None:
        try:
            self.deliver(request)
        except Exception:
            log.exception("Storage Commitment report %s to %s: delivery failed",
                          request.transaction_uid, request.calling_ae)
        finally:
            with self._lock:
                self._in_flight.discard(request.id)
                self._busy_aes.discard(request.calling_ae)
            self.wake.set()

    def deliveries_under_way(self) -> int:
        """Reports being tried on new associations now (tests await none before closing)."""
        with self._lock:
            return len(self._busy_aes)

    def run(self, stopping: threading.Event) -> None:
        """The delivery loop (a daemon thread): due reports to delivery threads, then sleep
        until the next one, a delivery ending, a new request, or at most a second (to
        notice ``stopping``; :meth:`stop` ends that sleep at once). Hourly, settled
        requests past their week are forgotten."""
        forget_at = 0.0  # settled requests pruned at the first pass, then hourly
        while True:
            self.wake.clear()  # before the look at ``stopping``: a stop's wake is never lost
            if stopping.is_set():
                return
            try:
                if time.monotonic() >= forget_at:
                    forget_at = time.monotonic() + FORGET_EVERY_S
                    if forgotten := commitment.forget_settled(self.db):
                        log.info("Storage Commitment: %d settled requests older than %d "
                                 "days forgotten (their audit rows stay)", forgotten,
                                 commitment.SETTLED_KEPT_S // 86400)
                self.deliver_due()
                with self._lock:
                    busy = set(self._busy_aes)
                next_at = commitment.next_due_at(self.db, exclude_aes=busy)
            except Exception:
                log.exception("Storage Commitment delivery pass failed")
                next_at = None
            wait = 1.0 if next_at is None else min(1.0, max(0.05, next_at - now()))
            self.wake.wait(wait)

    def stop(self) -> None:
        """Wake the delivery loop so that it sees ``stopping`` now: asleep, it held the
        daemon's stop up to a second (its thread joined), every stop of an idle daemon."""
        self.wake.set()


def _failure(status: int, comment: str) -> Dataset:
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment[:64]
    return answer
