"""Why a peer rejected an association PAS requested, in PS3.8's words.

Owns: reading the reason of an A-ASSOCIATE-RJ as it arrives (pynetdicom logs it and keeps
nothing). Used by the C-MOVE sub-association (serving) and the ``dicom`` destination
(dispatch): "calling AE title not recognised" is the usual fix to make, and it is made in
the peer's or PAS's configuration, not by waiting. Touches nothing else.
"""

from __future__ import annotations

from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

_TRANSIENT = 0x02


class RejectionWatch:
    """Bound to an association request (:meth:`handler`), holds its rejection's reason."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def handler(self) -> tuple[Any, Any]:
        """The ``evt_handlers`` entry that notes the A-ASSOCIATE-RJ's reason."""

        def on_pdu(event: Any) -> None:
            if isinstance(event.pdu, A_ASSOCIATE_RJ):
                self.reason = rejection_reason(event.pdu)

        return evt.EVT_PDU_RECV, on_pdu


def rejection_reason(pdu: A_ASSOCIATE_RJ) -> str:
    """An A-ASSOCIATE-RJ's reason in PS3.8's words (table 9-21), lower case, "(transient)"
    after one the peer may take later (congestion, a limit of associations); the codes when
    they are none the table names (pynetdicom raises on those)."""
    try:
        named = pdu.reason_str
        reason = named[0].lower() + named[1:]  # "Calling AE title..." -> "calling AE title..."
    except ValueError:
        reason = f"source {pdu.source}, reason {pdu.reason_diagnostic}"
    return f"{reason} (transient)" if pdu.result == _TRANSIENT else reason
