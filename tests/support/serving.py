"""A test's own socketserver (http.server) served from a thread that stops at once."""

from __future__ import annotations

import socketserver
import threading

# ``shutdown()`` waits for ``serve_forever`` to look at its flag, which it does every
# ``poll_interval``: 0.5 s by default, half a second at the end of every test that used one.
POLL_INTERVAL_S = 0.02


def serve_in_thread(server: socketserver.BaseServer) -> threading.Thread:
    """``server.serve_forever()`` in a daemon thread (started), its ``shutdown()`` quick."""
    thread = threading.Thread(target=server.serve_forever, daemon=True,
                              kwargs={"poll_interval": POLL_INTERVAL_S})
    thread.start()
    return thread
