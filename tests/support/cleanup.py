"""Set-ups that start several peers in a row, and stop every one already started when a
later start or step raises.

A fixture's code after ``yield`` runs only if its set-up reached the ``yield``. Written as
``a = A().start(); b = B().start(); yield; b.stop(); a.stop()``, a start of ``B`` that timed
out on a loaded machine left ``A`` (a ``pas run``, an Orthanc and its network namespace...)
running for the rest of the session, holding its ports and CPU, and later tests failed in
ways that had nothing to do with them (a CI run's ``tests/test_serving_fetch.py``). The
pattern::

    with contextlib.ExitStack() as stack:
        a = started(stack, A())
        b = started(stack, B())
        yield a, b

stops ``b`` then ``a`` after the tests, and whatever was started when a step raises. A class
whose constructor starts the peers and whose ``stop()`` stops them ends the ``with`` block
with ``stack.pop_all()``: once it is set up, its ``stop()`` stops them, in its own order.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, TypeVar


class Peer(Protocol):
    def start(self, *args: Any, **kwargs: Any) -> Any: ...
    def stop(self) -> Any: ...


PeerT = TypeVar("PeerT", bound=Peer)


def started(stack: contextlib.ExitStack, peer: PeerT, *args: Any, **kwargs: Any) -> PeerT:
    """``peer.start(*args, **kwargs)``, and ``peer.stop()`` when ``stack`` closes.

    The stop is registered before the start: a start that fails half-way (the process
    launched, its port not seen in time) is stopped too, and a peer never started has
    nothing to stop (every peer's ``stop`` allows it)."""
    stack.callback(peer.stop)
    peer.start(*args, **kwargs)
    return peer
