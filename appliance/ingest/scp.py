"""The DICOM listener modalities send to: C-ECHO and C-STORE (pynetdicom).

Owns: presentation contexts, applying the association policy (appliance/ingest/policy.py:
known calling AEs, optionally pinned to a host, and the SOP classes and transfer syntaxes
taken, in which order; here: the called AE title, the limits, the order for the contexts a
C-GET viewer receives on) and mapping receive outcomes to DIMSE statuses. Other services
(C-FIND/C-MOVE/C-GET) register their handlers on the same AE through :meth:`add_handlers`.
May not touch: SQL or files directly (it calls :class:`~appliance.ingest.receive.Receiver`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.config import DicomSection
from appliance.dicomnet.contexts import add_supported_contexts
from appliance.dicomnet.server import ListenerServer
from appliance.ingest.attributes import DatasetMismatch, InvalidInstance
from appliance.ingest.policy import (
    SENDING_TRANSFER_SYNTAXES,
    TRANSFER_SYNTAXES,
    AssociationPolicy,
    RefusedSopClassLog,
    RefusedTransferSyntaxLog,
    standard_non_storage,
    storage_sop_classes,
)
from appliance.ingest.receive import Receiver, StorageFailure
from appliance.logs import ThrottledWarning
from appliance.ops.metrics import (
    count_image_classes_refused,
    count_refusal,
    watch_dicom_connections,
)
from appliance.ops.refusals import RefusalAudit
from appliance.ops.security import AssociationRateLimiter, server_context
from appliance.store import audit
from appliance.store.spool import SpoolFull
from appliance.words import counted

log = logging.getLogger("pas.ingest")

# Statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0xC211

# A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2): abstract syntax not
# supported; transfer syntaxes not supported
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04
# SENDING_TRANSFER_SYNTAXES as pynetdicom keeps a context's list (UID objects), made once.
_SENDING_UIDS = [UID(uid) for uid in SENDING_TRANSFER_SYNTAXES]
# A-ASSOCIATE-RJ: rejected-permanent, by the service user
_REJECT_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03
_CALLED_AE_NOT_RECOGNISED = 0x07
# A-ASSOCIATE-RJ: rejected-transient, by the service provider (presentation), local limit
_REJECT_TRANSIENT = 0x02
_SOURCE_PROVIDER_PRESENTATION = 0x03
_LOCAL_LIMIT_EXCEEDED = 0x02


def _instance_named(sop_instance_uid: str | None, sop_class_uid: str | None) -> str:
    """`` of SOP Instance 1.2.3 (CT Image Storage, 1.2.840.10008.5.1.4.1.1.2)`` from a
    C-STORE request's Affected SOP Instance and Class UIDs, as far as they are known."""
    def known(uid: str | None) -> str | None:
        text = str(uid or "").strip("\x00 ")
        if not text or text == "None":  # pynetdicom's path: str() of an absent element
            return None
        return text if len(text) <= 64 else text[:64] + "..."

    instance, sop_class = known(sop_instance_uid), known(sop_class_uid)
    if sop_class:
        name = UID(sop_class).name
        sop_class = sop_class if name == sop_class else f"{name}, {sop_class}"
    if instance:
        return f" of SOP Instance {instance}" + (f" ({sop_class})" if sop_class else "")
    return f" of an instance of {sop_class}" if sop_class else ""


def _end_connection(assoc: Any) -> None:
    """Shut an association's connection down under its DUL (the TCP socket's shutdown, not
    SSLSocket's, as ``ListenerServer.end_handshakes`` does)."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class DicomListener:
    """One pynetdicom AE serving every DICOM service PAS offers on the configured port."""

    def __init__(self, config: DicomSection, receiver: Receiver,
                 on_stored: Callable[[str], None] | None = None,
                 refusals: RefusalAudit | None = None):
        self.config = config
        self.receiver = receiver
        self.refusals = refusals  # refused associations in the audit trail
        self.policy = AssociationPolicy(config)
        # Security (appliance/ops/security.py): per-source attempt limit, DICOM TLS (BCP 195).
        self.rate_limiter = AssociationRateLimiter(config.max_association_attempts_per_minute)
        tls = config.tls
        self.ssl_context = server_context(tls.cert, tls.key, tls.ca, tls.require_client_cert) \
            if tls.enabled and tls.cert and tls.key else None
        self.on_stored = on_stored
        self.ae = AE(ae_title=config.ae_title)
        # pynetdicom counts every open connection against its limit, one that never sent its
        # A-ASSOCIATE-RQ too: a port scan's silent connections locked modalities out
        # ("Local Limit Exceeded") for its ACSE timeout. Its limit is the connection bound
        # here (dicomnet/server.py keeps to it); dicom.max_associations is counted from the
        # A-ASSOCIATE-RQ on, in _on_requested.
        self.ae.maximum_associations = config.max_connections
        self.ae.network_timeout = config.network_timeout_s
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.require_called_aet = True
        self.ae.add_supported_context(Verification)
        # The SCP's supported contexts are not bound by the 128 an association may propose
        # (that limit is the requestor's): the standard, retired and extra classes all go.
        self.storage_classes = storage_sop_classes(config.extra_storage_sop_classes)
        self._storage_set = set(self.storage_classes)
        add_supported_contexts(self.ae, self.storage_classes, TRANSFER_SYNTAXES)
        self.refused_sop_classes = RefusedSopClassLog(
            storage_commitment=config.storage_commitment)
        self.refused_transfer_syntaxes = RefusedTransferSyntaxLog()
        # Per storage class, its supported context with SENDING_TRANSFER_SYNTAXES' order
        # (_receiving_in_sending_order): made on first use, shared like the AE's own.
        self._sending_contexts: dict[str, Any] = {}
        self._busy_warning = ThrottledWarning(log)  # dicom.max_associations reached
        self._admission_lock = threading.Lock()
        self._handlers: list[tuple[Any, Callable[..., Any]]] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_c_store_timed),
            (evt.EVT_RELEASED, self._on_association_end),
            (evt.EVT_ABORTED, self._on_association_end),
        ]
        # Per association, on the association object (``pas_note``): what was stored, for
        # one audit "store" event at its end. (A dict keyed by id(assoc) kept the note of an
        # association whose end was never seen, and a later association given the same id()
        # took it over: "1 cut by the association's end" on a clean association's row.)
        # A C-STORE's dataset beyond this size goes to a spool temp file as it arrives.
        self.spill_above = config.spill_above_mb << 20
        if config.direct_receive:
            # Read by appliance/dicomnet/reactor.py on every association this AE accepts.
            self.ae._pas_direct_store = self  # type: ignore[attr-defined]
        # Called by appliance/dicomnet/unaccepted.py, on the direct path and pynetdicom's.
        self.ae._pas_unaccepted_context = self._on_unaccepted_context  # type: ignore[attr-defined]
        # Called by appliance/dicomnet/last_word.py once such a connection is closed.
        self.ae._pas_invalid_pdu = self._on_invalid_pdu  # type: ignore[attr-defined]
        self._server: Any = None
        self._stats_lock = threading.Lock()
        self.stats = {"stored": 0, "duplicates": 0, "conflicts": 0, "refused": 0}

    def add_handlers(self, handlers: list[tuple[Any, Callable[..., Any]]],
                     contexts: list[Any] = ()) -> None:  # type: ignore[assignment]
        """Let serving (Q/R) register on the same AE before :meth:`start`."""
        for context in contexts:
            self.ae.add_supported_context(context)
        self._handlers.extend(handlers)

    def start(self) -> None:
        # As ``AE.start_server(block=False)``, with PAS's server: TLS handshakes off the
        # accept loop (appliance/dicomnet/server.py).
        server = self.ae.make_server(
            (self.config.host, self.config.port), evt_handlers=self._handlers,
            ssl_context=self.ssl_context, server_class=ListenerServer,
            handshake_timeout_s=self.config.network_timeout_s,
            max_connections=self.config.max_connections, on_refused=self._connection_refused,
            allowed_names=tuple(self.config.tls.allowed_names),
        )
        threading.Thread(target=server.serve_forever, name="pas-dicom-accept",
                         daemon=True).start()
        self.ae._servers.append(server)  # pynetdicom's shutdown() removes it
        self._server = server
        watch_dicom_connections(server.open_connections)
        log.info("DICOM listener %s on %s:%d%s", self.config.ae_title, self.config.host,
                 self.config.port, " (TLS)" if self.ssl_context else "")

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.config.port

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop listening, then end the associations still open.

        pynetdicom's server shutdown leaves open associations running, and their threads
        keep the process alive (a viewer left connected held `systemctl stop` until systemd's
        kill). Each is aborted; a C-STORE being filed finishes first in its thread (its
        sender sees no success and sends again: invariant 1), then the thread ends."""
        if self._server is None:
            return
        # One grace for the whole stop, the refusals' audit and the associations' end
        # together: given grace_s each, one after the other (the associations not even
        # aborted while the audit waited), the stop took twice as long (20 s with the
        # database's write lock held by another writer: the daemon's whole stop budget).
        deadline = time.monotonic() + grace_s
        server, self._server = self._server, None
        watch_dicom_connections(None)
        open_associations = list(server.active_associations)
        # socketserver's loop looks at its stop request only between polls of the listening
        # socket, every 0.5 s: every stop waited for it. Shutting the socket down wakes the
        # poll at once; until the request is seen, accept() fails and nothing is accepted.
        stopping = threading.Thread(target=server.shutdown, name="pas-listener-stop")
        stopping.start()
        with contextlib.suppress(OSError):
            server.socket.shutdown(socket.SHUT_RD)
        server.end_handshakes()  # the server's close joins their threads
        stopping.join()
        for assoc in open_associations:
            if assoc.dul.state_machine.current_state in ("Sta1", "Sta2"):
                # No A-ASSOCIATE-RQ yet (a port probe, a silent connection): nothing to
                # abort. pynetdicom's state machine has no A-ABORT request there, and its
                # DUL thread died on one: a traceback in the journal for every silent
                # connection at every stop. Its connection is ended instead; the DUL sees
                # it close (and tells the association thread, dicomnet/reactor.py).
                _end_connection(assoc)
            else:
                assoc.abort()
            if not assoc.is_established:
                # A connection that never sent its A-ASSOCIATE-RQ (a port probe, a health
                # check) leaves the thread waiting up to acse_timeout for one; pynetdicom
                # reads None there as "none came" and ends the association.
                assoc.dul.to_user_queue.put(None)
        # Before the daemon writes the audit's last counts (RefusalAudit.flush); the
        # associations end meanwhile.
        if not server.finish_refusals(max(0.0, deadline - time.monotonic())):
            log.warning("refused connections not all audited after %.0f s at shutdown",
                        grace_s)
        # One grace for all of them, not each: associations blocked on the WAN (a fetch from
        # a hub that no longer answers) took grace_s one after the other.
        for assoc in open_associations:
            assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                log.warning("association from %s still busy after %.0f s at shutdown",
                            assoc.requestor.ae_title, grace_s)

    # -- handlers ---------------------------------------------------------------------------

    def _on_requested(self, event: Any) -> None:
        requestor = event.assoc.requestor
        # At this point only the received A-ASSOCIATE-RQ primitive carries the titles.
        calling = str(requestor.primitive.calling_ae_title).strip()
        # A known AE pinned to this very address is exempt: some modalities open one
        # association per image, and a CT must never be throttled by a probe defence.
        pinned = self.policy.pinned_to(calling, requestor.address)
        if not pinned and not self.rate_limiter.allow(requestor.address):
            self._reject(event, calling, "rate-limit", f" from {requestor.address}",
                         f"more than {self.rate_limiter.per_minute} attempts in a minute",
                         _REJECT_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION,
                         _LOCAL_LIMIT_EXCEEDED)
            return
        called = str(requestor.primitive.called_ae_title).strip()
        if called != self.config.ae_title.strip():
            # Refused here, as pynetdicom would (require_called_aet), but said: its own
            # rejection left no audit row, no log line and no count, while an unknown
            # calling AE had all three (a device set up for another node, or a probe).
            self._reject(event, calling, "unknown-called-ae",
                         f" from {calling} ({requestor.address})",
                         f"called AE title {called!r} is not this appliance's "
                         f"({self.config.ae_title})",
                         _REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLED_AE_NOT_RECOGNISED,
                         value=repr(called))
            return
        proposed = [str(context.abstract_syntax) for context
                    in requestor.primitive.presentation_context_definition_list or ()]
        reason = self.policy.refusal(calling, requestor.address, proposed)
        if reason:
            self._reject(event, calling, "unknown-ae", "", reason,
                         _REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED,
                         value=repr(calling))
            return
        # After the AE policy: an unknown AE is told so (permanently, and audited), not
        # "busy, try again", and takes no place.
        sends = self._may_send_images(requestor)
        shared = self.config.max_associations - self.config.storage_reserve
        with self._admission_lock:  # counting and taking a place: one request at a time
            negotiating, not_sending = self._associations_admitted()
            if negotiating < self.config.max_associations and (sends or not_sending < shared):
                event.assoc.pas_admitted = True
                event.assoc.pas_sends_images = sends
        if getattr(event.assoc, "pas_admitted", False):
            self._receiving_in_sending_order(event.assoc)
        else:
            self._busy_warning.warn(
                "association from %s (%s) rejected: %d associations already open "
                "(dicom.max_associations%s); the sender should try again later", calling,
                requestor.address, negotiating,
                "" if sends else (f", {self.config.storage_reserve} of them kept for "
                                  "associations that send images: dicom.reserved_for_storage"),
                extra={"CALLING_AE": calling})
            event.assoc.acse.send_reject(
                _REJECT_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED
            )
            event.assoc.kill()
            count_refusal("dicom", "too-many-associations")

    def _receiving_in_sending_order(self, assoc: Any) -> None:
        """Before negotiation: the storage contexts the requestor proposes to receive on (the
        SCP role: a C-GET viewer) take their transfer syntax in SENDING_TRANSFER_SYNTAXES'
        order, uncompressed first, for this association only.

        pynetdicom's acceptor takes the first of its own list that a context proposes, and
        the listener's list leads with the lossless compressed syntaxes (what a modality
        sends is kept in its own encoding: policy.py). A viewer proposing one context
        [JPEG-LS Lossless, Explicit LE, ...] per class (DCMTK getscu ``+xt``) would then get
        JPEG-LS, and every instance PAS holds uncompressed would fail its sub-operation
        (no accepted context to send it on); with Explicit LE accepted, PAS sends each
        instance in it, converting the compressed ones (serving/qr_retrieve.py)."""
        roles = assoc.requestor.role_selection
        receiving = {str(uid) for uid, item in roles.items() if item.scp_role}
        if not receiving:
            return
        contexts = list(assoc.acceptor.supported_contexts)
        for index, context in enumerate(contexts):
            uid = str(context.abstract_syntax)
            if uid in receiving and uid in self._storage_set:
                sending = self._sending_contexts.get(uid)
                if sending is None or sending.scu_role != context.scu_role \
                        or sending.scp_role != context.scp_role:
                    sending = copy.copy(context)  # the shared one is left as it is
                    sending._transfer_syntax = list(_SENDING_UIDS)
                    self._sending_contexts[uid] = sending
                contexts[index] = sending
        assoc.acceptor.supported_contexts = contexts

    def _on_accepted(self, event: Any) -> None:
        """Name the SOP classes whose presentation contexts were refused because PAS does
        not take them (:class:`RefusedSopClassLog`), and those refused because PAS reads
        none of the transfer syntaxes proposed (:class:`RefusedTransferSyntaxLog`)."""
        assoc = event.assoc
        # Only what the peer proposed to send: a C-GET viewer proposes dozens of storage
        # classes in the SCP role alone (getscu: retired print and standalone classes among
        # them) and will never send PAS one of them.
        roles = assoc.requestor.role_selection
        sent = [cx for cx in assoc.rejected_contexts
                if cx.abstract_syntax not in roles or roles[cx.abstract_syntax].scu_role]
        refused = {str(cx.abstract_syntax) for cx in sent
                   if cx.result == _ABSTRACT_SYNTAX_NOT_SUPPORTED}
        requestor = assoc.requestor
        if refused:
            self.refused_sop_classes.refused(requestor.ae_title.strip(), requestor.address,
                                             refused)
        unread = [cx for cx in sent if cx.result == _TRANSFER_SYNTAXES_NOT_SUPPORTED]
        # For the association's store row and pas_dicom_image_classes_refused: the classes of
        # images it could not send. Not a modality's MPPS or worklist proposed beside them
        # (said in the log, not images); not a class refused in one context and accepted in
        # another (JPEG XL proposed alone, then Explicit VR Little Endian): its images came.
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        not_sent = {uid: "sop-class" for uid in refused if not standard_non_storage(uid)}
        for cx in unread:
            not_sent.setdefault(str(cx.abstract_syntax), "transfer-syntax")
        not_sent = {uid: why for uid, why in not_sent.items() if uid not in accepted}
        assoc.pas_refused_classes = sorted(not_sent)
        if not_sent:  # its store row, even when no image of it came: it was written only
            with self._stats_lock:  # after a first C-STORE, none when all were refused
                self._association_note(assoc)
        for reason, classes in Counter(not_sent.values()).items():
            count_image_classes_refused(reason, classes)
        if unread:
            # pynetdicom's result context keeps the first syntax proposed only; the request's
            # context (the same ID) has them all.
            proposed = {cx.context_id: cx for cx in requestor.requested_contexts}
            self.refused_transfer_syntaxes.refused(
                requestor.ae_title.strip(), requestor.address,
                [(str(cx.abstract_syntax),
                  [str(s) for s in (proposed[cx.context_id].transfer_syntax
                                    if cx.context_id in proposed else cx.transfer_syntax)])
                 for cx in unread])

    def _on_unaccepted_context(self, assoc: Any, what: str) -> None:
        """A message on a presentation context that was not accepted (``what`` names it,
        appliance/dicomnet/unaccepted.py): a warning line, and a refusal in the audit trail
        and ``pas_access_refused{channel="dicom", reason="unaccepted-context"}``, beside the
        associations refused at negotiation."""
        requestor = assoc.requestor
        calling = requestor.ae_title.strip()
        log.warning("%s (%s) sent %s", calling, requestor.address, what,
                    extra={"CALLING_AE": calling})
        if self.refusals is not None:
            self.refusals.refused(channel="dicom", kind="unaccepted-context",
                                  source=requestor.address, actor=calling or "-",
                                  reason=f"sent {what}", target=self.config.ae_title)

    def _on_invalid_pdu(self, address: str, calling: str, what: str) -> None:
        """A PDU that could not be read (dicomnet/last_word.py logged it): a refusal in the
        audit trail and ``pas_access_refused{channel="dicom", reason="invalid-pdu"}``."""
        if self.refusals is not None:
            self.refusals.refused(channel="dicom", kind="invalid-pdu", source=address,
                                  actor=calling or "-", reason=f"sent {what}",
                                  target=self.config.ae_title)
        else:
            count_refusal("dicom", "invalid-pdu")

    def _reject(self, event: Any, calling: str, kind: str, whose: str, why: str,
                result: int, source: int, reason_code: int, value: str | None = None) -> None:
        """An A-ASSOCIATE-RJ (``result``, ``source``, ``reason_code``) sent, its line in the
        log ("association``whose`` rejected: ``why``"), its audit row and count
        (:meth:`_refused`; ``value``: the AE title the peer chose, as ``why`` writes it):
        the three refusals at negotiation, said alike."""
        log.warning("association%s rejected: %s", whose, why, extra={"CALLING_AE": calling})
        event.assoc.acse.send_reject(result, source, reason_code)
        event.assoc.kill()  # as pynetdicom does: waits until the A-ASSOCIATE-RJ is sent
        self._refused(event, kind, calling, f"association rejected: {why}", value)

    def _refused(self, event: Any, kind: str, calling: str, reason: str,
                 value: str | None = None) -> None:
        """The audit row of a rejected association (after the A-ASSOCIATE-RJ is sent: the
        sender does not wait for the trail)."""
        if self.refusals is not None:
            called = str(event.assoc.requestor.primitive.called_ae_title).strip()
            self.refusals.refused(channel="dicom", kind=kind,
                                  source=event.assoc.requestor.address,
                                  actor=calling or "-", reason=reason, target=called or None,
                                  value=value)

    def _may_send_images(self, requestor: Any) -> bool:
        """Whether an A-ASSOCIATE-RQ proposes a storage SOP class in the SCU role (a
        modality, a workstation sending back): it may take a place of
        ``dicom.reserved_for_storage``. A C-GET viewer proposes storage classes in the SCP
        role only (to receive): that is not sending."""
        roles = {str(uid): item for uid, item in requestor.role_selection.items()}
        for context in requestor.primitive.presentation_context_definition_list or ():
            uid = str(context.abstract_syntax)
            if uid in self._storage_set:
                role = roles.get(uid)
                if role is None or role.scu_role is None or role.scu_role:
                    return True
        return False

    def _associations_admitted(self) -> tuple[int, int]:
        """The listener's associations given a place of ``dicom.max_associations`` (by
        :meth:`_on_requested`, from their A-ASSOCIATE-RQ) whose thread is still running. A
        connection that has sent no request has no place: it takes a thread, bounded by
        ``dicom.max_connections``. Called under ``_admission_lock``, the place taken under
        it too: counting every association past its request instead, two requests handled
        at once each counted the other, and with one place free both were rejected (17
        times in 40); with no association open, max_associations + 1 requests arriving
        together were often all rejected. With how many of them may not send images (their
        share: ``max_associations - reserved_for_storage``)."""
        server = self._server
        if server is None:
            return 0, 0
        admitted = [other for other in server.active_associations
                    if getattr(other, "pas_admitted", False) and other.is_alive()]
        return len(admitted), sum(1 for other in admitted
                                  if not getattr(other, "pas_sends_images", False))

    def _connection_refused(self, address: str, kind: str, reason: str) -> None:
        """The audit row (coalesced per source and minute) of a connection the server
        closed before any A-ASSOCIATE-RQ was read (no AE title is known): a TLS handshake
        that refused the client's certificate, a connection over ``dicom.max_connections``."""
        if self.refusals is not None:
            self.refusals.refused(channel="dicom", kind=kind, source=address, actor="-",
                                  reason=reason)
        else:
            count_refusal("dicom", kind)

    def _on_c_store_timed(self, event: Any) -> Any:
        """pynetdicom's EVT_C_STORE handler (``dicom.direct_receive = false``, or a C-STORE
        the fast path left to pynetdicom): the same filing as :meth:`store_request`."""
        status, comment = self.store_request(
            event.assoc, str(event.context.transfer_syntax),
            str(event.request.AffectedSOPClassUID), str(event.request.AffectedSOPInstanceUID),
            event.request.DataSet.getvalue(), path="pynetdicom",
            context_sop_class_uid=str(event.context.abstract_syntax))
        if status == SUCCESS or not comment:
            return status
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = comment[:64]
        return answer

    def store_request(self, assoc: Any, transfer_syntax_uid: str, sop_class_uid: str,
                      sop_instance_uid: str, dataset: bytes | bytearray,
                      path: str = "direct",
                      prepared: tuple[bytes, Any] | None = None,
                      context_sop_class_uid: str | None = None) -> tuple[int, str | None]:
        """File one C-STORE's dataset; the status to answer and, for a failure, the reason
        (sent as the response's Error Comment so the modality's log names the problem).
        ``context_sop_class_uid``: the abstract syntax of the presentation context the request
        came on, which must be the request's SOP Class (PS3.7 9.3.1.1; a C-STORE on the
        Verification context, or a CT on an MR context, would be filed with a file meta naming
        a class its body is not). Timed for the ``pas_cstore_duration_seconds`` histogram."""
        started = time.perf_counter()
        if context_sop_class_uid is not None and context_sop_class_uid != sop_class_uid:
            calling = assoc.requestor.ae_title.strip()
            # The Error Comment is an LO: 64 characters, so the UIDs go to the log only.
            status, comment = SOP_CLASS_NOT_SUPPORTED, "SOP Class not this context's"
            self._count("refused")
            log.warning("C-STORE from %s refused: C-STORE of %s on a presentation context "
                        "negotiated for %s", calling, sop_class_uid, context_sop_class_uid,
                        extra={"CALLING_AE": calling})
        else:
            if getattr(assoc, "pas_opened_note", None) is None:
                self._note_opened(assoc)
            status, comment = self._store(assoc, transfer_syntax_uid, sop_class_uid,
                                          sop_instance_uid, dataset, prepared)
        self._note_store(assoc, status, getattr(assoc, "pas_last_held", False))
        from appliance.ops.metrics import observe_cstore

        observe_cstore(time.perf_counter() - started, status, path)
        return status, comment

    def open_spill(self, header: bytes) -> Any:
        """The direct path's spill file for a large dataset: see Receiver.open_spill."""
        return self.receiver.open_spill(header)

    def check_spill_room(self, spill: Any) -> bool:
        """The direct path's spill, every ``SPILL_ROOM_CHECK_BYTES`` it grows: see
        Receiver.check_spill_room (False: it gave up, the C-STORE gets 0xA700)."""
        return self.receiver.check_spill_room(spill)

    def prepare_store(self, sop_class_uid: str, sop_instance_uid: str,
                      transfer_syntax_uid: str) -> tuple[bytes, Any]:
        """The direct path's early start (dicomnet/direct_receive.py): see Receiver.prepare."""
        return self.receiver.prepare(sop_class_uid, sop_instance_uid, transfer_syntax_uid)

    def _store(self, assoc: Any, transfer_syntax_uid: str, sop_class_uid: str,
               sop_instance_uid: str, dataset: bytes | bytearray,
               prepared: tuple[bytes, Any] | None = None) -> tuple[int, str | None]:
        requestor = assoc.requestor
        calling = requestor.ae_title.strip()
        assoc.pas_last_held = False
        try:
            received = self.receiver.receive_dataset(
                dataset,
                transfer_syntax_uid=transfer_syntax_uid,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                calling_ae=calling,
                called_ae=assoc.acceptor.ae_title.strip(),
                source=requestor.address,
                prepared=prepared,
            )
        except InvalidInstance as exc:
            self._count("refused")
            # Named from the request's command set (there even when the dataset is broken):
            # the modality's operator finds the object by its UID.
            log.warning("C-STORE%s from %s (%s) refused: %s",
                        _instance_named(sop_instance_uid, sop_class_uid), calling,
                        requestor.address, exc, extra={"CALLING_AE": calling})
            return (DATASET_MISMATCH if isinstance(exc, DatasetMismatch)
                    else CANNOT_UNDERSTAND), str(exc)
        except SpoolFull as exc:
            self._count("refused")
            log.error("C-STORE from %s refused, out of resources: %s", calling, exc,
                      extra={"CALLING_AE": calling})
            return OUT_OF_RESOURCES, exc.comment  # what fits the Error Comment's 64
        except StorageFailure as exc:
            self._count("refused")
            log.error("C-STORE from %s failed: %s", calling, exc, extra={"CALLING_AE": calling})
            return PROCESSING_FAILURE, str(exc)
        except Exception as exc:  # never let one bad object take the association down silently
            self._count("refused")
            log.exception("C-STORE from %s: unexpected error", calling)
            return PROCESSING_FAILURE, f"unexpected error: {type(exc).__name__}"
        self._count("duplicates" if received.duplicate else "stored")
        if received.conflict:
            self._count("conflicts")
        if self.on_stored is not None and not received.duplicate:
            self.on_stored(received.study_uid)
        assoc.pas_study_uid = received.study_uid  # for the association's audit event
        assoc.pas_last_held = received.duplicate  # the same bytes again: counted apart there
        return SUCCESS, None

    def note_cut(self, assoc: Any, sop_instance_uid: str, received: int) -> None:
        """The direct path's C-STORE cut by the association's end (the peer's A-ABORT, the
        connection lost) before its dataset was whole: nothing of it was stored, no answer
        went out. Logged, and counted in the association's audit row (which said "success"
        for an association cut inside an instance, and was not written at all when the cut
        one was its first)."""
        calling = assoc.requestor.ae_title.strip()
        log.warning("C-STORE of %s from %s (%s) cut after %d bytes of its dataset: the "
                    "association ended inside it; nothing of it stored", sop_instance_uid,
                    calling, assoc.requestor.address, received,
                    extra={"CALLING_AE": calling})
        with self._stats_lock:
            if not getattr(assoc, "pas_ended", False):  # its row not written yet
                self._association_note(assoc)["cut"] += 1

    def _association_note(self, assoc: Any) -> dict[str, Any]:
        """What an association did, for its audit row (under ``_stats_lock``)."""
        note: dict[str, Any] | None = getattr(assoc, "pas_note", None)
        if note is None:
            note = assoc.pas_note = {"stored": 0, "held": 0, "refused": 0, "cut": 0,
                                     "studies": set()}
        return note

    def _note_store(self, assoc: Any, status: int, held: bool) -> None:
        """``held``: a success for bytes already stored (no second copy): counted apart, so
        the audit row's figures add up to what the index holds."""
        with self._stats_lock:
            note = self._association_note(assoc)
            if status == SUCCESS:
                note["held" if held else "stored"] += 1
                study = getattr(assoc, "pas_study_uid", None)
                if study:
                    note["studies"].add(study)
            else:
                note["refused"] += 1

    def _note_opened(self, assoc: Any) -> None:
        """Before the association's first instance is filed: note it open in the database,
        so that a crash before its end still leaves its ``store`` row (written at the next
        start, ``audit.close_cut_associations``)."""
        requestor = assoc.requestor
        try:
            assoc.pas_opened_note = audit.association_opened(
                self.receiver.db, requestor.ae_title.strip(), requestor.address)
        except Exception:  # the trail must not refuse the instance; its end row still comes
            log.exception("noting the association open for the audit trail failed")
            assoc.pas_opened_note = 0

    def _on_association_end(self, event: Any) -> None:
        """One audit ``store`` event per association (PS3.15 "DICOM Instances
        Transferred"): who, from where, which studies, how many stored and refused; written
        with the end of its open note, in one transaction."""
        with self._stats_lock:
            if getattr(event.assoc, "pas_ended", False):
                return  # its row is written (an end is seen once: EVT_ABORTED may repeat)
            note = getattr(event.assoc, "pas_note", None)
            event.assoc.pas_note = None
            event.assoc.pas_ended = True  # a late note_cut must not leave a note behind
        opened = getattr(event.assoc, "pas_opened_note", None)
        if not note:
            if opened:
                with contextlib.suppress(Exception):  # a row left: written at the next start
                    audit.association_closed(self.receiver.db, opened)
            return
        requestor = event.assoc.requestor
        refused, cut = note["refused"], note["cut"]
        # Whole UIDs only, and how many more (as a STOW-RS row): the list was cut at 4000
        # characters in the middle of a UID, which named another study or none.
        target, left_out = audit.study_list(note["studies"])
        detail = f"{counted(note['stored'], 'instance')} stored"
        if note["held"]:  # e.g. a modality sending a study again: success, no second copy
            detail += f", {note['held']} already held"
        detail += f", {refused} refused"
        if cut:
            detail += f", {cut} cut by the association's end"
        if left_out:
            detail += f", {counted(left_out, 'more study', 'more studies')} not listed"
        classes = getattr(event.assoc, "pas_refused_classes", [])
        if classes:  # the modality could not send these at all: no C-STORE to count
            shown = ", ".join(classes[:5]) + (f" and {len(classes) - 5} more"
                                              if len(classes) > 5 else "")
            detail += (f"; presentation contexts refused for "
                       f"{counted(len(classes), 'SOP class', 'SOP classes')} ({shown}): "
                       "the log says why")
        failures = [f"{refused} refused"] if refused else []
        if cut:
            failures.append(f"{cut} cut")
        if classes:
            failures.append(f"{counted(len(classes), 'SOP class', 'SOP classes')} refused")
        try:
            audit.association_closed(
                self.receiver.db, opened, actor=requestor.ae_title.strip(),
                source=requestor.address, target=target,
                outcome="failure: " + ", ".join(failures) if failures else "success",
                detail=detail)
        except Exception:  # the audit must not break the association's end
            log.exception("audit record failed")

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1
