"""A STOW-RS archive stand-in: a small real HTTP server on loopback that keeps the SOP
Instance UIDs each POST carries and answers 200, listing them as stored (DICOM JSON).

Why: the dispatch tests of a ``stowrs`` destination (a login page answered 200, a correction
filed while a request is out) each wrote this server; they differ only in the answer, a
subclass's :meth:`StowArchive.answer`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.refusing_archive import _parts, _uids
from tests.support.serving import serve_in_thread


def referenced(uids: list[str]) -> dict[str, Any]:
    """A Store Instances Response (DICOM JSON) listing ``uids`` in its Referenced SOP
    Sequence."""
    return {"00081199": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]}}


class StowArchive:
    """Answers each STOW-RS POST 200 with :meth:`answer`. ``stored``: the SOP Instance UIDs
    stored, in order; ``url``: the base URL, ``http://127.0.0.1:<port>/dicom-web``."""

    def __init__(self) -> None:
        self.stored: list[str] = []
        self.lock = threading.Lock()
        archive = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                answer, content_type = archive.answer(
                    [_uids(part)[2] for part in _parts(self.headers["Content-Type"], body)])
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        serve_in_thread(self.server)

    def answer(self, uids: list[str]) -> tuple[bytes, str]:
        """Store the POST's instances (``uids``) and answer the body and Content-Type that
        list them as stored."""
        with self.lock:
            self.stored.extend(uids)
        return json.dumps(referenced(uids)).encode(), "application/dicom+json"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
