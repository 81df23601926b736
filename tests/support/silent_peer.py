"""A TCP peer on 127.0.0.1 that takes connections and never answers: a hung PACS, an archive
or a region gone silent, a WAN that drops nothing but says nothing. The attempt against it
is in progress for as long as the test wants (until :meth:`SilentPeer.close`).

``close_first``: the first connections are closed at once instead (an attempt that fails
with a real error), the later ones held. One class for what three tests wrote apiece.
"""

from __future__ import annotations

import socket
import threading


class SilentPeer:
    """Accepts connections and holds them: reads nothing, answers nothing."""

    def __init__(self, ae_title: str = "PACS", close_first: int = 0) -> None:
        self.ae_title = ae_title  # for a configuration naming it as a DICOM node
        self.close_first = close_first
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.connections = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            self.connections += 1
            if self.connections <= self.close_first:
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        """Stop listening and close every connection held (the attempts then fail)."""
        self.server.close()
        for conn in self.held:
            conn.close()
