"""An N-EVENT-REPORT sent on an association the peer opened and is still using.

Owns: sending one N-EVENT-REPORT-RQ from a thread other than the association's own, on an
accepted association with the event-driven loops (reactor.py), and waiting for its answer.
May not touch: what the report says (the caller's dataset), negotiation, release, and the
serving of the peer's own requests (pynetdicom's, as always).

Why: pynetdicom's ``send_n_event_report`` takes the first DIMSE message that arrives after
the request as its answer. A modality that sends a request of its own meanwhile (a C-ECHO,
its next Storage Commitment N-ACTION, crossing the report on the wire; each side then has
one operation outstanding, within the default window) had that request read as an invalid
N-EVENT-REPORT-RSP: pynetdicom aborted the association, the request went unanswered, and the
report the modality did answer was recorded as not delivered and sent again. Here a request
that arrives while PAS waits is kept aside and put back, in order, at the head of the queue
the association's loop serves, once the answer came (or did not).

Its PDUs are queued for the DUL under the I/O lock: the DUL, which also writes the direct
receive path's C-STORE-RSPs (direct_receive.py), sends queued PDUs before it reads again, so
no C-STORE-RSP can fall between the report's command and its dataset fragments (PS3.8 9.3.1:
a message's fragments are not interleaved with another message's).
"""

from __future__ import annotations

import logging
import time
from io import BytesIO
from queue import Empty
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode

from appliance.dicomnet.outgoing import association_ended

log = logging.getLogger("pas.dicomnet")

_PAUSE_WAIT_S = 5.0


class EventReportError(Exception):
    """The report could not be sent or was not answered; the message names why."""


def send_event_report(assoc: Any, information: Dataset, event_type: int, class_uid: str,
                      instance_uid: str, message_id: int, timeout: float) -> int:
    """Send the N-EVENT-REPORT-RQ on ``assoc`` and return the status of its answer.
    Raises :class:`EventReportError` when it was not answered within ``timeout`` (the
    association is then aborted, as pynetdicom does) or could not be sent."""
    io_lock = getattr(assoc.dul, "_pas_io_lock", None)
    if io_lock is None:
        raise EventReportError("not an association with the event-driven loops")
    context = assoc._get_valid_context(class_uid, "", None)
    syntax = context.transfer_syntax[0]
    encoded = encode(information, syntax.is_implicit_VR, syntax.is_little_endian,
                     syntax.is_deflated)
    if encoded is None:
        raise EventReportError("the Event Information does not encode")
    request = N_EVENT_REPORT()
    request.MessageID = message_id
    request.AffectedSOPClassUID = class_uid
    request.AffectedSOPInstanceUID = instance_uid
    request.EventTypeID = event_type
    request.EventInformation = BytesIO(encoded)

    # pynetdicom's own protocol with its association loop: it stops taking messages off the
    # DIMSE queue until the checkpoint is set again (reactor.association_run_reactor).
    # Parked, not merely paused: pynetdicom marks the loop paused while a handler runs, and
    # the N-ACTION handler that asked for this report may not have sent its N-ACTION-RSP
    # yet; a modality must get that answer first (pynetdicom's send_n_action took the
    # report for it and aborted).
    assoc._reactor_checkpoint.clear()
    held: list[tuple[Any, Any]] = []
    try:
        deadline = time.monotonic() + _PAUSE_WAIT_S
        while not getattr(assoc, "_pas_parked", False):
            if time.monotonic() > deadline or association_ended(assoc):
                raise EventReportError("the association's loop did not pause")
            time.sleep(0.0001)
        with io_lock:
            assoc.dimse.send_msg(request, context.context_id)
        status = _await_answer(assoc, message_id, timeout, held)
    finally:
        _put_back(assoc, held)
        assoc._reactor_checkpoint.set()
        wake = getattr(assoc, "_pas_wake", None)
        if wake is not None and held:
            wake.set()  # the loop serves what was kept aside now, not at its next tick
    if status is None:
        if not association_ended(assoc):
            log.error("no N-EVENT-REPORT-RSP within %.0f s: aborting the association", timeout)
            assoc.abort()
        raise EventReportError("no N-EVENT-REPORT-RSP")
    return status


def _await_answer(assoc: Any, message_id: int, timeout: float,
                  held: list[tuple[Any, Any]]) -> int | None:
    """The status of the N-EVENT-REPORT-RSP to ``message_id``; None if none came. Requests
    that arrive meanwhile go to ``held``; a stray response is logged and dropped, as
    pynetdicom's loop does with one."""
    deadline = time.monotonic() + timeout
    queue = assoc.dimse.msg_queue
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            context_id, message = queue.get(timeout=min(left, 0.05))
        except Empty:
            # What arrived before the association ended (an answer, then the modality's
            # A-RELEASE-RQ) is read first: only an empty queue of an ended one is no answer.
            if association_ended(assoc):
                return None
            continue
        if message is None:
            continue
        if (isinstance(message, N_EVENT_REPORT) and message.is_valid_response
                and message.MessageIDBeingRespondedTo == message_id):
            return int(message.Status)
        if message.is_valid_request:
            held.append((context_id, message))
        else:
            log.warning("unexpected %s while waiting for an N-EVENT-REPORT-RSP, ignored",
                        message.msg_type)


def _put_back(assoc: Any, held: list[tuple[Any, Any]]) -> None:
    """The requests kept aside, ahead of anything that arrived after them, in their order."""
    if not held:
        return
    queue = assoc.dimse.msg_queue
    with queue.mutex:
        queue.queue.extendleft(reversed(held))
        queue.not_empty.notify(len(held))
