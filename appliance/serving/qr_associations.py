"""The associations a Q/R handler works on: the viewer's, and the one a C-MOVE opens.

Owns: who asked (:func:`peer`), and a C-MOVE's sub-association to its destination: the
presentation contexts proposed (:func:`contexts_for`: the stored syntax and the uncompressed
fallback), those accepted, its reactor kept off the C-STORE responses
(:func:`reactor_takes_no_messages`), and why it did not come up
(:class:`SubAssociationWatch`). Split from ``qr.py`` (the C-FIND handler, the wiring, the
audit) and used by ``qr_retrieve.py`` (the C-MOVE/C-GET handlers).
May not touch: SQL, the spool, the audit, the DIMSE messages of a retrieve (sending the
sub-operations is ``suboperations.py``'s, the responses ``qr_responses.py``'s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt

from appliance.dicomnet.rejection import RejectionWatch

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


class SubAssociationWatch:
    """Why a C-MOVE's sub-association did not come up, seen through its events: the SOP
    classes of a destination that accepted the association and none of its presentation
    contexts, a rejection, or neither (unreachable). pynetdicom answers the three alike
    (0xA801); PAS fails every sub-operation instead (``qr_retrieve.py``) and says which it
    was: in the final response's Error Comment (:meth:`comment`), the audit row and the
    journal (:meth:`failure`)."""

    def __init__(self) -> None:
        self.opened: list[Any] = []  # the sub-association, once its connection is open
        self.refused_classes: list[str] = []  # accepted with no context: these classes
        self.accepted = False  # the destination accepted the association
        self.rejected = False
        self.rejection = RejectionWatch()  # the A-ASSOCIATE-RJ's reason, as PS3.8 names it

    def handlers(self) -> list[tuple[Any, Callable[[Any], None]]]:
        """The sub-association's event handlers that note what happened."""

        def on_open(store_event: Any) -> None:
            self.opened.append(store_event.assoc)

        def on_accepted(store_event: Any) -> None:
            self.accepted = True
            if not store_event.assoc.accepted_contexts:
                self.refused_classes = sorted(
                    {UID(cx.abstract_syntax).name
                     for cx in store_event.assoc.rejected_contexts})

        def on_rejected(store_event: Any) -> None:
            self.rejected = True

        return [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACCEPTED, on_accepted),
                (evt.EVT_REJECTED, on_rejected), self.rejection.handler()]

    def why(self) -> str:
        """Why the sub-association did not come up, or ended the retrieve early.
        pynetdicom marks an association rejected before it runs the EVT_REJECTED handlers,
        in the association's own thread: the C-MOVE handler, resumed on that mark, could get
        here first and said "unreachable" for a destination that had answered with a
        rejection. The mark is read too."""
        if self.refused_classes:
            return f"no presentation context accepted for {self._classes()}"
        if self.rejection.reason is not None:
            return f"the destination rejected the association: {self.rejection.reason}"
        if self.rejected or (self.opened and self.opened[0].is_rejected):
            return "the destination rejected the association"
        # Which of the three it was: "unreachable or association lost" said none (a
        # workstation switched off, a port mistyped, a peer closing mid-negotiation, or a
        # link lost after images went all read alike). Each fits the Error Comment's 64
        # characters after a 16-character title.
        if not self.opened:
            return "could not connect (refused or no answer)"
        if not self.accepted:
            return "closed while negotiating the association"
        return "association lost"

    def failure(self, host: str, port: int) -> str:
        """Why each sub-operation failed, as the audit row says it: the SOP classes
        refused (the words of a class refused by a destination that took others), or
        where the association was not made, and why."""
        if self.refused_classes:
            return self.why()
        return f"no association with {host}:{port}: {self.why()}"

    def comment(self, title: str) -> str:
        """The Error Comment (64 characters): the SOP classes refused first."""
        if self.refused_classes:
            return f"{title} accepted none of: {self._classes()}"
        if self.rejection.reason is not None:  # short: a 16-character title, its reason fit
            return f"{title} rejected: {self.rejection.reason}"
        return f"{title}: {self.why()}"

    def _classes(self) -> str:
        return ", ".join(self.refused_classes)[:200]
