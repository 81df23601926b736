"""A small real DICOMweb archive (HTTP on loopback) that refuses duplicates, as Microsoft's
DICOM service (Azure Health Data Services) documents it: a STOW-RS instance whose UIDs it
holds already is listed in FailedSOPSequence with FailureReason 45070 (0xB00E) and keeps the
bytes it had; the request answers 200 when every instance was stored, 202 when some were, 409
when none was. Google's Cloud Healthcare API answers 409 for an instance that exists too.
Orthanc (the tests' real archive) accepts a duplicate silently, so it cannot show what PAS
does with such an answer; Azure and Google cannot run here.

Also QIDO-RS (UID list matching, as the hub asks) and WADO-RS of one instance (multipart, the
bytes held), and three faults a test arms: the answer to a STOW lost after it stored
(``lose_answer_for``: the connection closes with no answer, as a cut link or a proxy timeout
does), read-backs answered 503 (``wado_failures``), a UID held with other bytes
(:meth:`hold`)."""

from __future__ import annotations

import io
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydicom import dcmread

DUPLICATE = 45070  # 0xB00E


def _uids(data: bytes) -> tuple[str, str, str]:
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _parts(content_type: str, body: bytes) -> list[bytes]:
    boundary = content_type.split("boundary=")[1].split(";")[0].strip().strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        parts.append(chunk.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n"))
    return parts


class RefusingArchive:
    """``url`` is the DICOMweb root (``http://127.0.0.1:PORT/dicom-web``). ``held``: {SOP
    Instance UID: (study, series, bytes)}; ``stows``: per POST, the UIDs it carried;
    ``reads``: the UIDs read back (WADO-RS), in order."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, str, bytes]] = {}
        self.lose_answer_for: set[str] = set()
        self.wado_failures: dict[str, int] = {}
        self.stows: list[list[str]] = []
        self.reads: list[str] = []
        self.lock = threading.Lock()
        archive = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

            def _send(self, code: int, body: bytes = b"",
                      content_type: str = "application/dicom+json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path.endswith("/instances"):  # QIDO-RS
                    query = urllib.parse.parse_qs(url.query)
                    wanted = ",".join(query.get("SOPInstanceUID", [])).split(",")
                    with archive.lock:
                        found = [{"00080018": {"vr": "UI", "Value": [u]},
                                  "0020000D": {"vr": "UI", "Value": [archive.held[u][0]]},
                                  "0020000E": {"vr": "UI", "Value": [archive.held[u][1]]}}
                                 for u in wanted if u in archive.held]
                    if not found:
                        return self._send(204)
                    return self._send(200, json.dumps(found).encode())
                # WADO-RS: .../studies/S/series/SE/instances/U
                bits = url.path.split("/")
                study, series, uid = bits[-5], bits[-3], bits[-1]
                with archive.lock:
                    archive.reads.append(uid)
                    if archive.wado_failures.get(uid, 0) > 0:
                        archive.wado_failures[uid] -= 1
                        return self._send(503, b"busy", "text/plain")
                    held = archive.held.get(uid)
                if held is None or held[:2] != (study, series):
                    return self._send(404, b"not found", "text/plain")
                body = (b"--held\r\nContent-Type: application/dicom\r\n\r\n" + held[2]
                        + b"\r\n--held--\r\n")
                self._send(200, body, 'multipart/related; type="application/dicom"; '
                           "boundary=held")

            def do_POST(self) -> None:  # STOW-RS
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stored, duplicate = [], []
                lose = False
                with archive.lock:
                    carried = []
                    for data in _parts(self.headers["Content-Type"], body):
                        study, series, uid = _uids(data)
                        carried.append(uid)
                        if uid in archive.held:
                            duplicate.append(uid)
                        else:
                            archive.held[uid] = (study, series, data)
                            stored.append(uid)
                        if uid in archive.lose_answer_for:
                            archive.lose_answer_for.discard(uid)
                            lose = True
                    archive.stows.append(carried)
                if lose:  # stored; the answer never arrives
                    self.close_connection = True
                    return
                answer: dict = {}
                if stored:
                    answer["00081199"] = {"vr": "SQ", "Value": [
                        {"00081155": {"vr": "UI", "Value": [u]}} for u in stored]}
                if duplicate:
                    answer["00081198"] = {"vr": "SQ", "Value": [
                        {"00081155": {"vr": "UI", "Value": [u]},
                         "00081197": {"vr": "US", "Value": [DUPLICATE]}} for u in duplicate]}
                code = 200 if not duplicate else 202 if stored else 409
                self._send(code, json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def hold(self, data: bytes) -> str:
        """Hold ``data`` as if stored earlier (another version, or the same bytes from
        elsewhere); its SOP Instance UID."""
        study, series, uid = _uids(data)
        with self.lock:
            self.held[uid] = (study, series, data)
        return uid

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
