"""A DICOM association whose socket's descriptor is past 1024 (appliance/dicomnet/poll.py).

``select.select`` refuses such descriptors (ValueError): pynetdicom's ``ready()`` took that
for a closed connection (Evt17) and aborted the association, and the reactor's wait
swallowed it. One host holding ~1,000 HTTP connections open pushed the next association's
socket there, and modalities could not store, with nothing in the log (security review,
2026-12-06). Real sockets; a real daemon and DCMTK's echoscu and storescu.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import socket
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from pynetdicom.transport import AssociationSocket

from appliance.dicomnet.poll import install, readable
from tests.support.peers import CT_DIR, DCMTK_ENV, PasProcess, storescu, wait_for


@contextlib.contextmanager
def _high_descriptor_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair whose first socket's descriptor is past 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    one, other = socket.socketpair()
    high = os.dup2(one.fileno(), 1500)
    one.close()
    try:
        yield socket.socket(fileno=high), other
    finally:
        other.close()
        with contextlib.suppress(OSError):
            os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_readiness_is_asked_past_descriptor_1024() -> None:
    import select

    with _high_descriptor_pair() as (high, other):
        assert high.fileno() > 1024
        try:
            select.select([high], [], [], 0)
            raise AssertionError("select took a descriptor past 1024")
        except ValueError:
            pass  # what pynetdicom and the reactor met
        assert readable([high], 0) == []
        other.sendall(b"x")
        assert readable([high], 1.0) == [high]
        install()
        events: queue.Queue[str] = queue.Queue()
        wrapped: Any = AssociationSocket.__new__(AssociationSocket)
        wrapped.socket, wrapped._is_connected = high, True
        wrapped._assoc = SimpleNamespace(dul=SimpleNamespace(event_queue=events))
        assert wrapped.ready is True and events.empty()  # not Evt17, "connection closed"
        high.recv(1)
        assert wrapped.ready is False and events.empty()
        high.detach()  # closed by _high_descriptor_pair


def test_a_daemon_holding_many_connections_still_takes_a_modality_s_study(
        tmp_path: Any) -> None:
    """1,100 idle HTTP connections held open against the daemon: its descriptors past
    1024, the modality's study is still stored (it was aborted: "Peer aborted
    Association")."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # As pas.service's LimitNOFILE lets it (65536): the daemon inherits this limit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    held: list[socket.socket] = []
    # The HTTP port's own bounds (appliance/web/bounded.py) raised past the 1,100 held
    # here: this is about the DICOM side when the descriptors are past 1024 anyway.
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_HTTP__MAX_CONNECTIONS": "4096",
                                        "PAS_HTTP__REQUEST_TIMEOUT_S": "600"})
    pas.launcher = ("env",)  # a process of its own, as systemd starts it (not forked warm)
    try:
        pas.start()
        for _ in range(1100):
            held.append(socket.create_connection(("127.0.0.1", pas.http_port), timeout=10))
        assert pas.proc is not None
        fds = f"/proc/{pas.proc.pid}/fd"
        wait_for(lambda: len(os.listdir(fds)) > 1100, 30, what="the daemon's descriptors "
                 "past 1024")
        echo = subprocess.run(["echoscu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1",
                               str(pas.port)], env=DCMTK_ENV, capture_output=True,
                              text=True, timeout=60)
        assert echo.returncode == 0, echo.stderr[-2000:]  # "Peer aborted Association"
        files = sorted(CT_DIR.glob("*.dcm"))[:3]
        result = storescu(files, pas.port, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        assert pas.status()["instances"] == 3
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        pas.stop()
