"""A stand-in QIDO-RS archive for the hub's priors search, and a real ``pas hub run`` over it
with an enrolled site.

Why: the priors tests (bounds, review s39; the entry a 422 names, review s40) each started
the same hub over the same archive in a module fixture."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.hub import HubProcess, enroll
from tests.support.serving import serve_in_thread

ROW = {"0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.2.1125.1.12345678901234567890"]},
       "00100020": {"vr": "LO", "Value": ["PAT000001"]},
       "00080020": {"vr": "DA", "Value": ["20240101"]},
       "00080050": {"vr": "SH", "Value": ["ACC0000001"]},
       "00080061": {"vr": "CS", "Value": ["CT"]}}
BIG = json.dumps([ROW] * 10_000).encode()  # 2.9 MB: an archive that ignores limit


class Archive(BaseHTTPRequestHandler):
    """A stand-in QIDO-RS archive: patient "BIG" gets 10,000 rows whatever the limit, any
    other one row; each answer after ``delay`` s (searches at once counted)."""

    seen: list[dict[str, list[str]]] = []
    lock = threading.Lock()
    running = 0
    most = 0
    delay = 0.0

    def do_GET(self) -> None:  # noqa: N802
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        cls = type(self)
        with cls.lock:
            cls.seen.append(query)
            cls.running += 1
            cls.most = max(cls.most, cls.running)
        try:
            time.sleep(cls.delay)
            body = BIG if query.get("PatientID") == ["BIG"] else json.dumps([ROW]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with cls.lock:
                cls.running -= 1

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def priors_hub(root: Path, site: str) -> Iterator[dict[str, Any]]:
    """A real ``pas hub run`` (its home ``root/hub``) over an :class:`Archive` on loopback,
    and the site ``site`` enrolled with it (``root/site``): ``{"hub": HubProcess, "site":
    its enrolment}``; both stopped after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Archive)
    serve_in_thread(server)
    hub = HubProcess(root / "hub", {
        "PAS_HUB_ARCHIVE__KIND": "dicomweb",
        "PAS_HUB_ARCHIVE__URL": f"http://127.0.0.1:{server.server_port}/dicom-web"})
    try:
        hub.init().start()
        yield {"hub": hub, "site": enroll(hub, root / "site", site)}
    finally:
        hub.stop()
        server.shutdown()
        server.server_close()
