"""What a C-MOVE/C-GET sends besides its sub-operations: how often its Pending responses go
(:func:`throttle_pending`) and why a refused retrieve was refused (:func:`explain_refusal`).

Owns: wraps of one association's ``dimse.send_msg`` that change the C-MOVE/C-GET responses
pynetdicom sends for the handlers of ``qr.py`` (Pending ones left out, an Error Comment put on
a refusal). May not touch: SQL, spool writes, the audit (``qr.py`` writes the rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pynetdicom.dimse_primitives import C_GET, C_MOVE

PENDING = 0xFF00
CANCELLED = 0xFE00
SUCCESS = 0x0000


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


def explain_refusal(assoc: Any, why: Callable[[], str] | None,
                    only: int | None = None) -> None:
    """Have the final C-MOVE/C-GET response of the retrieve now handled on ``assoc`` carry
    ``why()`` in its Error Comment (0000,0902) if it is a refusal (``only``: if its status
    is that one). pynetdicom sends these refusals itself and offers no way to comment them:
    0xA801 for a destination unknown, down or refusing, 0xC511/0xC411 when the handler
    raises (a bad identifier, more than 65,535 matches, a study the region could not
    provide); the viewer got the bare status and only the audit row said why. None: no
    comment (each retrieve starts so). Set per association: pynetdicom handles its
    requests one at a time."""
    dimse = assoc.dimse
    if getattr(dimse, "_pas_refusal", None) is None:
        original = dimse.send_msg

        def send_msg(primitive: Any, context_id: int) -> None:
            pending = dimse._pas_refusal
            if (pending[0] is not None and isinstance(primitive, C_MOVE | C_GET)
                    and primitive.Status not in _NOT_REFUSALS and not primitive.ErrorComment
                    and pending[1] in (None, primitive.Status)):
                primitive.ErrorComment = _error_comment(pending[0]())
                pending[0] = None
            original(primitive, context_id)

        dimse.send_msg = send_msg
        dimse._pas_refusal = [None, None]
    dimse._pas_refusal[:] = [why, only]


def _error_comment(text: str) -> str:
    """``text`` as an Error Comment: LO in the command set's default repertoire, one value
    (no backslash), at most 64 characters."""
    ascii_text = text.encode("ascii", "replace").decode().replace("\\", "/")
    return ascii_text if len(ascii_text) <= 64 else ascii_text[:61] + "..."
