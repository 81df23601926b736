"""The associations a Q/R handler works on: the viewer's, and the one a C-MOVE opens.

Owns: who asked (:func:`peer`), and a C-MOVE's sub-association to its destination: the
presentation contexts proposed (:func:`contexts_for`: the stored syntax and the uncompressed
fallback), those accepted, its reactor kept off the C-STORE responses
(:func:`reactor_takes_no_messages`), and why it did not come up (:func:`refusal_handlers`,
:func:`why_not_up`). Split from ``qr.py`` (the C-FIND handler, the wiring, the audit) and
used by ``qr_retrieve.py`` (the C-MOVE/C-GET handlers).
May not touch: SQL, the spool, the audit, the DIMSE messages of a retrieve (sending the
sub-operations is ``suboperations.py``'s, the responses ``qr_responses.py``'s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt

log = logging.getLogger("pas.serving")

# The fallback a retrieve's sub-operation may be sent in when its stored syntax was not
# accepted: explicit, else implicit, VR little endian (never fail for a viewer lacking JPEG-LS).
UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
_MAX_CONTEXTS = 128


def peer(event: Any) -> tuple[str, str]:
    """The calling AE title and the address of the association an event came on."""
    requestor = event.assoc.requestor
    return requestor.ae_title.strip(), requestor.address


def reactor_takes_no_messages(assoc: Any) -> None:
    """Keep the sub-association's reactor from stealing C-STORE responses.

    pynetdicom pauses an association's reactor around ``send_c_store`` with a flag that can
    be stale when sends follow each other closely: the reactor then takes the next C-STORE-RSP
    off the queue as an "unexpected C-STORE service message" and the sender waits for the
    DIMSE timeout (seen here on C-MOVEs of many small instances on a loaded machine). A
    C-MOVE sub-association never receives requests (the peer is a storage SCP), so its
    reactor's non-blocking reads may safely see nothing; ``send_c_store`` still reads the
    response with a blocking get."""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None:
        return
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return original(block=True) if block else (None, None)

    dimse.get_msg = get_msg


def contexts_for(pairs: list[tuple[str, str]]) -> list[Any]:
    """For each SOP class: the stored syntax alone (so the peer can accept it) and the
    uncompressed pair (the fallback), within the 128 contexts an association may propose.
    ``pairs``: the retrieve's distinct (SOP class, stored transfer syntax), sorted."""
    contexts: list[Any] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for sop_class, _ in pairs:
        key = (sop_class, UNCOMPRESSED)
        if key not in seen:
            seen.add(key)
            contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
    for sop_class, syntax in pairs:
        key = (sop_class, (syntax,))
        if syntax not in UNCOMPRESSED and key not in seen and len(contexts) < _MAX_CONTEXTS:
            seen.add(key)
            contexts.append(build_context(sop_class, [syntax]))
    for sop_class, syntax in pairs:  # stored uncompressed: offer it alone too (exact bytes)
        key = (sop_class, (syntax,))
        if syntax in UNCOMPRESSED and key not in seen and len(contexts) < _MAX_CONTEXTS:
            seen.add(key)
            contexts.append(build_context(sop_class, [syntax]))
    return contexts[:_MAX_CONTEXTS]


def accepted_contexts(assoc: Any) -> set[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs the destination accepted."""
    return {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}


def refusal_handlers(refused: list[str], opened: list[Any]
                     ) -> list[tuple[Any, Callable[[Any], None]]]:
    """Handlers for a C-MOVE sub-association that note in ``refused`` why it did not come up
    when the destination said so, and in ``opened`` the association once its connection is
    open. pynetdicom answers the viewer 0xA801 alike for a destination that is down, one
    that rejected the association and one that accepted it with no presentation context
    (it then aborts it); the audit row names which (:func:`why_not_up`)."""

    def on_open(store_event: Any) -> None:
        opened.append(store_event.assoc)

    def on_accepted(store_event: Any) -> None:
        if not store_event.assoc.accepted_contexts:
            names = sorted({UID(cx.abstract_syntax).name
                            for cx in store_event.assoc.rejected_contexts})
            refused.append("the destination accepted no presentation context; refused: "
                           + ", ".join(names)[:200])

    def on_rejected(store_event: Any) -> None:
        refused.append("the destination rejected the association")

    return [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACCEPTED, on_accepted),
            (evt.EVT_REJECTED, on_rejected)]


def why_not_up(refused: list[str], opened: list[Any]) -> str:
    """Why a C-MOVE's sub-association ended the retrieve early. pynetdicom marks an
    association rejected before it runs the EVT_REJECTED handlers, in the association's own
    thread: the C-MOVE handler, resumed on that mark, could get here first and said
    "unreachable" for a destination that had answered with a rejection. The mark is read
    too."""
    if refused:
        return refused[0]
    if opened and opened[0].is_rejected:
        return "the destination rejected the association"
    return "destination unreachable or association lost"
