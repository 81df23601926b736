"""Back-pressure on what a handler queues for an association's DUL to send.

Owns: waiting, in the thread that runs a handler, until pynetdicom's DUL has taken most of
what was queued for it. Touches nothing else of pynetdicom's behaviour.

Why: pynetdicom puts every message a handler produces on the DUL's ``to_provider_queue``
(unbounded) at once, and the DUL sends them as fast as the peer reads. A C-FIND of 100,000
studies to a viewer reading more slowly than the database produces rows held nearly all of
them there: +68 MB of peak RSS (measured 2026-12, ~0.7 kB per queued answer). The handler
now waits before producing the next answer while more than a few dozen primitives are queued.

The wait is on the queue's own ``not_full`` condition (``queue.Queue.get()`` notifies it
whether the queue has a maximum size or not; the DUL takes a P-DATA primitive off with
``get()`` just before sending it), with a ``TICK_S`` timeout to notice the association's end:
with pynetdicom's own polling loops too.
"""

from __future__ import annotations

from typing import Any

# Primitives the DUL may have queued before a handler waits. A C-FIND answer is two
# (command, identifier): a few dozen answers in flight, a few tens of kB.
OUTGOING_LIMIT = 64
# Longest wait between looks at whether the association has ended.
TICK_S = 0.05


def association_ended(assoc: Any) -> bool:
    """The association was aborted, the peer asked to release it, or its DUL stopped: what
    is still queued will not be sent (pynetdicom's Q/R loop checks the first two between
    answers, and stops)."""
    return (bool(getattr(assoc, "_kill", False)) or not assoc.is_established
            or assoc.acse.is_aborted() or assoc.acse.is_release_requested()
            or not assoc.dul.is_alive())


def wait_for_room(assoc: Any, limit: int = OUTGOING_LIMIT, tick_s: float = TICK_S) -> bool:
    """Return once at most ``limit`` primitives are queued for ``assoc``'s DUL: True, or False
    as soon as the association has ended (nothing then waits for a peer that is gone)."""
    queued = assoc.dul.to_provider_queue
    while True:
        with queued.not_full:
            if queued._qsize() <= limit:
                return True
            queued.not_full.wait(tick_s)
        if association_ended(assoc):
            return False
