"""Ports for the tests' servers: each test process hands out its own, outside the kernel's.

Why: a port taken with ``bind(port 0)`` and closed again comes from the kernel's ephemeral
range (``net.ipv4.ip_local_port_range``, 32768-60999 here), the same range every outgoing
connection on the machine takes its source port from, and every other test process's
``bind(0)`` too. Between ``free_port()`` and the server's own bind, another test's
connection or peer could take it. CI runs saw it: a ``pas run`` refused its start ("Address
already in use"), an HL7 order sent to another test's HTTP server. ``PasProcess`` starts
again on a new port; storescp, the hub and the other peers did not.

So the ports handed out here come from below that range, where the kernel never picks one
itself, and each pytest-xdist worker has its own block of them (``PYTEST_XDIST_WORKER`` and
``..._COUNT``), walked in turn from a random start. Two workers never hand out the same
port, and a worker hands out one again only after its whole block (thousands) went round. A
port something listens on, or still holds (a connection in TIME_WAIT), is passed over.
Where the ephemeral range leaves too little room below it, the kernel's ``bind(0)`` is used
as before.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading
from pathlib import Path

# Above the demo's defaults (DICOM 11112, HTTP 8080, HL7 2575): a developer's `make demo`
# left running does not take the tests' ports.
LOWEST = 12000
# Fewer than this many ports per worker below the ephemeral range: the kernel's choice.
MIN_BLOCK = 500
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class _Block:
    """One process's ports: ``[start, stop)``, the next candidate at ``cursor``."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.cursor = random.randrange(start, stop)
        self.lock = threading.Lock()

    def take(self, host: str) -> int:
        with self.lock:
            for _ in range(self.stop - self.start):
                port = self.cursor
                self.cursor = self.cursor + 1 if self.cursor + 1 < self.stop else self.start
                if _bindable(host, port):
                    return port
        raise RuntimeError(f"no free port in {self.start}-{self.stop - 1} on {host}")


def _bindable(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now, without SO_REUSEADDR: a listener or a
    connection still in TIME_WAIT on it says no."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _worker() -> tuple[int, int]:
    """This process's xdist worker index and the number of workers (0 and 1 outside xdist)."""
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(match.group(1)) if match else 0
    return (index, count) if 0 <= index < count else (0, 1)


def _make_block() -> _Block | None:
    try:
        ephemeral_low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    index, count = _worker()
    size = (ephemeral_low - LOWEST) // count
    if size < MIN_BLOCK:
        return None
    start = LOWEST + index * size
    return _Block(start, start + size)


_block: _Block | None = None
_block_made = False
_block_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing holds on ``host`` now, that no other test process is handed and the
    kernel does not give to a connection: the server the caller starts can bind it."""
    global _block, _block_made
    with _block_lock:
        if not _block_made:
            _block, _block_made = _make_block(), True
    if _block is not None:
        return _block.take(host)
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
