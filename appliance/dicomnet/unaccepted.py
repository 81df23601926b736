"""A DIMSE message on a presentation context that was not accepted: named, counted, aborted.

Owns: the description of such a message (who sent what on which context, and what became of
that context at negotiation: rejected, and why, or never proposed), its report to the AE's
listener (``ae._pas_unaccepted_context``, set by appliance/ingest/scp.py: a warning line and
the refusals audit and counter), the A-P-ABORT that answers it, and the wrap of pynetdicom's
``Association._serve_request`` that does the same on pynetdicom's own path
(``dicom.direct_receive = false`` or ``dicom.event_driven = false``). The direct path
(``direct_receive.py``) raises :class:`UnacceptedContext` and the reactor sends the abort.
May not touch: negotiation, any message on an accepted context.

What the standard expects: a DIMSE message travels on a presentation context accepted at
negotiation (PS3.8 9.3.5 and 7.1.1.13: the Presentation-context-ID of a P-DATA-TF value is
one of the association's), and its response goes on the same context (PS3.7). On a
context PAS rejected, or that was never proposed, there is no context to answer on, so no
failure status can be sent: it is a protocol error of the peer, answered by the upper layer
provider with an A-P-ABORT (PS3.8 7.4, 9.3.8: source 2, "DICOM UL service-provider"), reason
6, "invalid-PDU-parameter value" (the parameter is well formed, its value is not one of the
association's contexts). Before this, the direct path aborted with reason 0 and a log line
that named neither the SOP class nor why the context had been refused, and pynetdicom's path
aborted as a service user (source 0), logging nothing PAS shows (its line is at INFO): a
modality whose operator asked "why are my images aborted?" found no answer on the appliance.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.uid import UID
from pynetdicom.association import Association

log = logging.getLogger("pas.dicomnet")

INVALID_PDU_PARAMETER_VALUE = 0x06  # A-P-ABORT provider reason (PS3.8 Table 9-26)

# A-ASSOCIATE-AC presentation context results (PS3.8 Table 9-18).
_RESULTS = {1: "user rejection", 2: "no reason given", 3: "abstract syntax not supported",
            4: "transfer syntaxes not supported"}
# DIMSE Command Field values of the requests a peer sends (PS3.7 E.1).
_COMMANDS = {0x0001: "C-STORE", 0x0020: "C-FIND", 0x0010: "C-GET", 0x0021: "C-MOVE",
             0x0030: "C-ECHO", 0x0FFF: "C-CANCEL"}

_installed = False


class UnacceptedContext(Exception):
    """Raised by the direct path: the message's context was not accepted. The reactor aborts
    with ``abort_reason``, then calls :meth:`report` (the sender does not wait for the
    audit row)."""

    abort_reason = INVALID_PDU_PARAMETER_VALUE

    def __init__(self, assoc: Any, context_id: int, command: str | None,
                 sop_class_uid: str | None):
        super().__init__(f"message on presentation context {context_id}, not accepted at "
                         "negotiation")
        self.details = (assoc, context_id, command, sop_class_uid)

    def report(self) -> None:
        report(*self.details)


def _name(uid: str | None) -> str:
    if not uid:
        return "an unknown SOP class"
    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"


def describe(assoc: Any, context_id: int, command: str | None, sop_class_uid: str | None
             ) -> str:
    """What was sent and why it was refused: ``a C-STORE of MR Image Storage on presentation
    context 3, which PAS rejected at negotiation (MR Image Storage, 1.2.3: transfer syntaxes
    not supported); association aborted (...)`` (or ``which was never proposed``)."""
    what = f"a {command or 'message'}" + (f" of {_name(sop_class_uid)}" if sop_class_uid
                                          else "")
    proposed = next((cx for cx in getattr(assoc, "rejected_contexts", [])
                     if cx.context_id == context_id), None)
    if proposed is None:
        fate = "which was never proposed"
    else:
        syntaxes = ", ".join(str(s) for s in proposed.transfer_syntax)[:120]
        fate = (f"which PAS rejected at negotiation ({_name(proposed.abstract_syntax)}, "
                f"{syntaxes}: {_RESULTS.get(proposed.result, f'result {proposed.result}')})")
    return (f"{what} on presentation context {context_id}, {fate}; association aborted "
            "(A-P-ABORT, invalid PDU parameter value)")


def command_of(fields: dict[int, bytes]) -> tuple[str | None, str | None]:
    """(request name, Affected SOP Class UID) from a command set's elements (group 0000,
    :func:`appliance.dicomnet.direct_store.parse_command`), as far as they are there."""
    field = fields.get(0x0100)
    command = _COMMANDS.get(int.from_bytes(field[:2], "little")) if field else None
    uid = fields.get(0x0002, b"").rstrip(b"\x00 ").decode("ascii", "replace") or None
    return command, uid


def report(assoc: Any, context_id: int, command: str | None, sop_class_uid: str | None
           ) -> None:
    """Tell the listener (its log line, the refusals audit and counter), or log it here when
    the AE has no listener hook (``pas send``, ``pas doctor``). Never raises: the abort must
    go whatever happens to the report."""
    text = describe(assoc, context_id, command, sop_class_uid)
    hook = getattr(getattr(assoc, "ae", None), "_pas_unaccepted_context", None)
    try:
        if hook is not None:
            hook(assoc, text)
        else:
            requestor = assoc.requestor
            log.warning("%s (%s) sent %s", requestor.ae_title.strip(), requestor.address, text)
    except Exception:
        log.exception("report of a message on an unaccepted presentation context failed: %s",
                      text)


def _serve_request(original: Any) -> Any:
    def serve_request(self: Association, msg: Any, context_id: int) -> None:
        if (self.is_acceptor and context_id not in self._accepted_cx
                and not self._sent_release and msg.is_valid_request):
            uid = getattr(msg, "AffectedSOPClassUID", None) or getattr(
                msg, "RequestedSOPClassUID", None)
            acse = self.acse
            # pynetdicom aborts this association now (Association.abort: a service-user
            # A-ABORT); make that abort the provider's, as the direct path sends it.
            acse.send_abort = lambda source: acse.send_ap_abort(INVALID_PDU_PARAMETER_VALUE)
            original(self, msg, context_id)
            # After the abort: the sender does not wait for the audit row.
            report(self, context_id, msg.msg_type.removesuffix("-RQ"),
                   str(uid) if uid else None)
            return
        original(self, msg, context_id)

    serve_request.pas_unaccepted = True  # type: ignore[attr-defined]
    return serve_request


def install() -> None:
    """Idempotent; process-wide (pynetdicom's path, whatever ``dicom.event_driven`` says)."""
    global _installed
    current = Association._serve_request
    if not _installed and not getattr(current, "pas_unaccepted", False):
        Association._serve_request = _serve_request(current)  # type: ignore[method-assign]
        _installed = True
