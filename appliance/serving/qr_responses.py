"""What a C-MOVE/C-GET sends besides its sub-operations: how often its Pending responses go
(:func:`throttle_pending`), why a retrieve pynetdicom refused was refused
(:func:`explain_refusal`), the status of a retrieve PAS refuses itself
(:class:`RetrieveRefused`, :func:`refuse`), and the final response of a C-MOVE whose
sub-association did not come up (:func:`fail_every_suboperation`).

Owns: wraps of one association's ``dimse.send_msg`` that change the C-MOVE/C-GET responses
pynetdicom sends for the handlers of ``qr_retrieve.py`` (Pending ones left out, an Error
Comment put on a refusal, a refusal's status set, every sub-operation of a C-MOVE counted
failed). May not touch: SQL, spool writes, the audit
(``qr.py`` writes the rows).

Why a refusal is made by rewriting a response: pynetdicom's C-MOVE/C-GET service lets a
handler end a retrieve before any sub-operation only two ways. A C-MOVE handler must first
yield a destination, and ``(None, None)`` is answered 0xA801 (move destination unknown); any
exception in the handler is answered with a fixed status of pynetdicom's (0xC514, 0xC413...)
and logged as an error with a traceback. A status of the handler's own choice (0xA900
identifier does not match the SOP class, PS3.4 C.4.2.1.5 and C.4.3.1.5) can only follow a
sub-operation, i.e. a C-MOVE's sub-association opened first. So a refused retrieve yields
"no sub-operations" (pynetdicom opens no sub-association and answers Success at once) and the
wrap turns that one response into the refusal: its status, Error Comment, Offending Element,
and no sub-operation counts. Likewise pynetdicom answers 0xA801 (move destination unknown)
for a known destination whose sub-association did not come up, and that response is
rewritten to fail every sub-operation (0xA702, the counts, the Failed SOP Instance UID List).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode

PENDING = 0xFF00
CANCELLED = 0xFE00
SUCCESS = 0x0000
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
MOVE_DESTINATION_UNKNOWN = 0xA801
REFUSED_SUB_OPERATIONS = 0xA702  # Refused: Out of resources - unable to perform sub-operations


def throttle_pending(assoc: Any, interval_s: float) -> None:
    """Send a retrieve's Pending responses on ``assoc`` at most every ``interval_s``.

    pynetdicom answers every sub-operation with a Pending C-MOVE/C-GET-RSP (counts of
    remaining/completed/failed). PS3.4 makes them optional; a viewer uses them for a
    progress bar, and encoding and sending one costs about what a small image's C-STORE
    does. The first is always sent, the final response always is (it is not Pending)."""
    if interval_s <= 0 or getattr(assoc.dimse, "_pas_pending_interval", None) is not None:
        return
    dimse = assoc.dimse
    original = dimse.send_msg
    last_sent = [0.0]

    def send_msg(primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_MOVE | C_GET) and primitive.Status == PENDING:
            now = time.monotonic()
            if now - last_sent[0] < interval_s:
                return
            last_sent[0] = now
        original(primitive, context_id)

    dimse.send_msg = send_msg
    dimse._pas_pending_interval = interval_s


# Final statuses a refusal comment never goes on: what pynetdicom sends for a retrieve that ran.
_NOT_REFUSALS = (SUCCESS, PENDING, CANCELLED, 0xB000)


class RetrieveRefused(Exception):
    """A C-MOVE/C-GET refused before any sub-operation: the status to answer and the reason
    (Error Comment, audit row, log line). ``offending``: the tag of the element the reason
    starts with ("StudyInstanceUID: required..."), for the Offending Element of an
    identifier that does not match the SOP class (PS3.4 C.4.2.1.5)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        keyword = reason.split(":")[0].split(" ")[0]
        self.offending = (tag_for_keyword(keyword)
                          if status == IDENTIFIER_DOES_NOT_MATCH else None)


def refuse(assoc: Any, status: int, why: str, offending: int | None = None) -> None:
    """Have the next final C-MOVE/C-GET response on ``assoc``, the Success pynetdicom sends
    for a handler that yields no sub-operations, go out as a refusal: ``status``, ``why`` in
    its Error Comment (0000,0902), the tag ``offending`` in its Offending Element (0000,0901)
    when given, and no sub-operation counts (PS3.4 C.4.2.1.5: a refusal's related fields are
    these two). The handler then yields no sub-operations (``qr_retrieve.py``)."""
    _install(assoc).set(why=lambda: why, made=(status, offending))


def explain_refusal(assoc: Any, why: Callable[[], str] | None,
                    only: int | None = None) -> None:
    """Have the final C-MOVE/C-GET response of the retrieve now handled on ``assoc`` carry
    ``why()`` in its Error Comment (0000,0902) if it is a refusal (``only``: if its status
    is that one). pynetdicom sends these refusals itself and offers no way to comment them:
    a 0xCxxx of its own when the handler raises unexpectedly; the viewer got the bare status
    and only the audit row said why. None: no comment (each retrieve starts so). Set per
    association: pynetdicom handles its requests one at a time."""
    _install(assoc).set(why=why, only=only)


def fail_every_suboperation(assoc: Any, why: Callable[[], str],
                            failed: Callable[[], list[str]]) -> None:
    """Have the 0xA801 (move destination unknown) pynetdicom sends for a C-MOVE whose
    sub-association did not come up go out as PS3.4 C.4.2.3.1 says: each sub-operation
    that cannot be performed is failed, and when all are, the final status is Failure or
    Refused. So: 0xA702 (Refused: Out of resources - unable to perform sub-operations),
    as DCMTK's Q/R SCP answers a sub-association it could not build, with 0 completed,
    every instance failed, 0 warning, the Failed SOP Instance UID List (0008,0058) naming
    them (PS3.4 C.4.2.1.4) and ``why()`` in the Error Comment. The destination is known:
    0xA801 told the viewer it was not. ``failed()``: the retrieve's SOP Instance UIDs,
    called once, as the response goes (the caller counts them failed then)."""
    _install(assoc).set(why=why, only=MOVE_DESTINATION_UNKNOWN, failed=failed)


@dataclass
class _NextFinal:
    """What the next final response of a retrieve on one association gets."""

    why: Callable[[], str] | None = None  # its Error Comment (None: nothing changed)
    only: int | None = None  # the only status commented (None: any refusal)
    made: tuple[int, int | None] | None = None  # (status, offending tag) of refuse()
    failed: Callable[[], list[str]] | None = None  # fail_every_suboperation's UIDs

    def set(self, why: Callable[[], str] | None, only: int | None = None,
            made: tuple[int, int | None] | None = None,
            failed: Callable[[], list[str]] | None = None) -> None:
        self.why, self.only, self.made, self.failed = why, only, made, failed


def _install(assoc: Any) -> _NextFinal:
    """Wrap ``assoc``'s ``dimse.send_msg`` once; ``dimse._pas_refusal`` holds what the next
    final response gets (:class:`_NextFinal`)."""
    dimse = assoc.dimse
    state = getattr(dimse, "_pas_refusal", None)
    if state is not None:
        return state
    original = dimse.send_msg
    state = _NextFinal()

    def send_msg(primitive: Any, context_id: int) -> None:
        if state.why is not None and isinstance(primitive, C_MOVE | C_GET):
            if state.made is not None and primitive.Status == SUCCESS:
                primitive.Status, offending = state.made
                primitive.OffendingElement = [offending] if offending is not None else None
                primitive.ErrorComment = _error_comment(state.why())
                for count in ("Remaining", "Completed", "Failed", "Warning"):
                    setattr(primitive, f"NumberOf{count}Suboperations", None)
                state.set(None)
            elif (state.made is None and primitive.Status not in _NOT_REFUSALS
                    and not primitive.ErrorComment and state.only in (None, primitive.Status)):
                if state.failed is not None:
                    _every_one_failed(assoc, primitive, context_id, state.failed())
                primitive.ErrorComment = _error_comment(state.why())
                state.set(None)
        original(primitive, context_id)

    dimse.send_msg = send_msg
    dimse._pas_refusal = state
    return state


def _every_one_failed(assoc: Any, primitive: Any, context_id: int, uids: list[str]) -> None:
    """``primitive`` as the final response of a retrieve none of whose sub-operations could
    be performed: 0xA702, the counts, the Failed SOP Instance UID List as its identifier
    (encoded in the transfer syntax of the C-MOVE's presentation context)."""
    primitive.Status = REFUSED_SUB_OPERATIONS
    primitive.NumberOfRemainingSuboperations = None
    primitive.NumberOfCompletedSuboperations = 0
    primitive.NumberOfFailedSuboperations = len(uids)
    primitive.NumberOfWarningSuboperations = 0
    syntax = next(cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                  if cx.context_id == context_id)
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = uids
    encoded = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian,
                     syntax.is_deflated)
    primitive.Identifier = BytesIO(encoded) if encoded is not None else None


def _error_comment(text: str) -> str:
    """``text`` as an Error Comment: LO in the command set's default repertoire, one value
    (no backslash), at most 64 characters."""
    ascii_text = text.encode("ascii", "replace").decode().replace("\\", "/")
    return ascii_text if len(ascii_text) <= 64 else ascii_text[:61] + "..."
