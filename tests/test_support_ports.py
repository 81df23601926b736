"""The tests' port allocator (tests/support/ports.py) against the real kernel.

The tests' peers bind ports ``free_port()`` handed out. Taken from the kernel's ephemeral
range, another test's connection or ``bind(0)`` could take one before the peer bound it (a
CI run: a daemon refused its start, an HL7 order went to another test's HTTP server). Here:
the ports are below that range, the xdist workers' blocks do not overlap, a port held by a
listener or by a connection in TIME_WAIT is passed over, and a real DCMTK storescp binds
what it is given.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.support import ports
from tests.support.peers import ROOT, StoreSCP, port_open, running


def ephemeral_low() -> int:
    return int(ports.EPHEMERAL_RANGE.read_text().split()[0])


def blocks(count: int) -> list[tuple[int, int]]:
    """Each worker's block as a child process under xdist's variables sees it."""
    found = []
    for index in range(count):
        code = ("from tests.support import ports; b = ports._make_block(); "
                "print(b.start, b.stop)")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, text=True,
                             capture_output=True, env={"PYTEST_XDIST_WORKER": f"gw{index}",
                                                       "PYTEST_XDIST_WORKER_COUNT": str(count),
                                                       "PATH": "/usr/bin:/bin"}).stdout
        start, stop = map(int, out.split())
        found.append((start, stop))
    return found


def test_each_worker_has_its_own_block_below_the_ephemeral_range() -> None:
    found = blocks(3)
    for start, stop in found:
        assert ports.LOWEST <= start < stop <= ephemeral_low()
        assert stop - start >= ports.MIN_BLOCK
    for (_, stop), (start, _) in zip(found, found[1:], strict=False):
        assert stop <= start  # disjoint, in order


def test_ports_handed_out_are_distinct_and_outside_the_ephemeral_range() -> None:
    taken = [ports.free_port() for _ in range(200)]
    assert len(set(taken)) == 200
    assert all(ports.LOWEST <= port < ephemeral_low() for port in taken)


def test_a_port_held_by_a_listener_or_in_time_wait_is_passed_over() -> None:
    block = ports._Block(ports.LOWEST, ephemeral_low())
    block.cursor = block.start
    # A listener on the next candidate (one something else on the machine holds: next).
    held = block.take("127.0.0.1")
    block.cursor = held
    listener = socket.socket()
    listener.bind(("127.0.0.1", held))
    listener.listen()
    with listener:
        assert block.take("127.0.0.1") > held
    # A connection closed by the server's side first: the server's port stays in TIME_WAIT.
    port = block.cursor = block.take("127.0.0.1")
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()
    server.close()
    client.recv(1)  # the FIN: the server's end has closed first
    client.close()
    block.cursor = port
    assert block.take("127.0.0.1") > port


def test_a_real_storescp_binds_the_port_it_is_given(tmp_path: Path) -> None:
    with running(StoreSCP(tmp_path / "scp")) as scp:
        assert ports.LOWEST <= scp.port < ephemeral_low()
        assert port_open("127.0.0.1", scp.port)
