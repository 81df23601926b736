"""An HL7 order in, its acknowledgement out: the request committed before the ACK exists.

Owns: what one HL7 message from the RIS does to the prefetch state (a new request, a cancel,
a resend recognised, a refusal audited) and the ACK or NAK that answers it. The message is
read by :mod:`appliance.prefetch.messages`; the state is written through
:mod:`appliance.store.prefetch` in one transaction per message. May not touch: the network
(the MLLP listener carries the bytes) or the fetching of priors (the service's scheduler
takes the requests from the database).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from appliance.prefetch.messages import Refusal, build_ack, interpret, parse_message
from appliance.store import audit
from appliance.store import prefetch as store
from appliance.store.db import Database

log = logging.getLogger("pas.prefetch")


def handle(db: Database, text: str, source: str,
           due_at: Callable[[float | None], float],
           site_issuers: Collection[str] = ()) -> tuple[str, bool]:
    """The ACK for one HL7 message, and whether a request was scheduled (the scheduler is
    then woken). ``due_at``: when a request for an exam at that time is due. A resent
    message is recognised and ACKed again, changing nothing; a refused one is audited and
    NAKed with the reason; an internal error is still answered (AE), never left hanging.
    ``site_issuers``: which PID-3 repetition is the patient's (:func:`messages.interpret`)."""
    message = None
    try:
        message = parse_message(text)
        order = interpret(message, site_issuers=site_issuers)
        if order.cancel:
            recorded = store.record_message(db, order.message_key, order.message_type, "AA",
                                            cancel_key=order.dedup_key)
            if not recorded.first:
                return _duplicate(message, order.message_type, order.control_id, source), False
            _warn_reused(order.control_id, recorded.reused_for, order.dedup_key, source)
            log.info("HL7 %s: order %s cancelled", order.message_type, order.dedup_key)
            return build_ack(message, "AA"), False
        scheduled_at = order.scheduled_at
        request = store.NewRequest(
            order.dedup_key, "hl7", order.patient_id, order.issuer, order.accession_number,
            order.modality, order.body_part, scheduled_at, due_at(scheduled_at))
        recorded = store.record_message(db, order.message_key, order.message_type, "AA",
                                        request=request)
        if not recorded.first:
            return _duplicate(message, order.message_type, order.control_id, source), False
        _warn_reused(order.control_id, recorded.reused_for, order.dedup_key, source)
        result = recorded.scheduled
        log.info("HL7 %s %s from %s: patient %s, %s request %s", order.message_type,
                 order.control_id, source, order.patient_id,
                 "new" if result and result.created else "known",
                 result.request_id if result else "-")
        return build_ack(message, "AA"), True
    except Refusal as refusal:
        log.warning("HL7 from %s refused (%s): %s", source, refusal.ack_code, refusal.reason)
        audit.record(db, "hl7", actor=source or None, outcome=f"failure: {refusal.reason}",
                     detail=refusal.message_type or None)
        return build_ack(message, refusal.ack_code, refusal.reason, refusal.error_code,
                         refusal.control_id), False
    except Exception as exc:  # never leave the RIS without an answer
        log.exception("HL7 from %s: internal error", source)
        return build_ack(message, "AE", f"internal error: {exc}", "207"), False


def _warn_reused(control_id: str, earlier: str | None, order: str, source: str) -> None:
    if earlier is not None:
        log.warning("HL7 from %s: control id %s (MSH-10) was already used for %s; this message "
                    "names %s: taken as a new message (did the RIS restart its numbering?)",
                    source, control_id, earlier, order)


def _duplicate(message: Any, message_type: str, control_id: str, source: str) -> str:
    """A message already recorded (a resend): ACKed again, nothing changed."""
    log.info("HL7 %s %s from %s: already processed", message_type, control_id, source)
    return build_ack(message, "AA", "duplicate message: already processed")
