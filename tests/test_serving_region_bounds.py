"""The regional C-FIND (``serving.query_region``) and the region client's reads are bounded
(invariant 8), against a real HTTP server standing in for the region's DICOMweb root.

- A study-level C-FIND asks the region ``limit = serving.max_results + 1``, and a real daemon
  answers findscu at most ``max_results`` matches with the region's, the cut audited and
  logged as the local matches' is.
- A region that ignores ``limit`` and answers more than ``MAX_ANSWER_BYTES`` (a broad
  ``PatientName=*`` over a regional archive) is read no further: RegionError naming the limit,
  the C-FIND answered from local data, memory a fraction of what reading it whole took
  (a 14 MB answer peaked at 142 MB).
- One instance's WADO-RS answer is parsed as it streams, up to a limit.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import tracemalloc
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from appliance.serving.fetch import RegionFind
from appliance.transfer.region import MAX_ANSWER_BYTES, RegionClient, RegionError, RegionInstance
from tests.support.peers import DCMTK_ENV, PasProcess
from tests.support.serving import serve_in_thread

STUDIES = 20


def _study(n: int) -> dict:
    return {"0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.2.1125.9.{n}"]},
            "00100020": {"vr": "LO", "Value": [f"PAT{n:06d}"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]},
            "00080020": {"vr": "DA", "Value": ["20240101"]},
            "00080050": {"vr": "SH", "Value": [f"ACC{n:07d}"]},
            "00080061": {"vr": "CS", "Value": ["CT", "SR"]}}


ROW = json.dumps(_study(1)).encode()
# More than MAX_ANSWER_BYTES, never all read by a bounded client (about 36,000 studies).
BIG_ROWS = (MAX_ANSWER_BYTES + (4 << 20)) // (len(ROW) + 1)
INSTANCE = b"DICM" * (300 * 1024)  # 1.2 MB: "the file"
BOUNDARY = "b0und"


class Region(BaseHTTPRequestHandler):
    """``studies``: STUDIES studies, ``limit`` honoured, unless PatientName starts with BIG:
    then BIG_ROWS of them whatever ``limit`` says, written as they are made (chunked).
    ``studies/.../instances/...``: INSTANCE as one multipart part."""

    protocol_version = "HTTP/1.1"
    asked: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Region.asked.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if "/instances/" in url.path:
            body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + INSTANCE + f"\r\n--{BOUNDARY}--\r\n".encode())
            self.send_response(200)
            self.send_header("Content-Type", f'multipart/related; type="application/dicom"; '
                                             f"boundary={BOUNDARY}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if query.get("PatientName", [""])[0].startswith("BIG"):
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self._chunk(b"[" + ROW)
                for _ in range(BIG_ROWS // 1000):
                    self._chunk(b"".join(b"," + ROW for _ in range(1000)))
                self._chunk(b"]")
                self._chunk(b"")
            except OSError:  # the client stopped reading: what a bounded one does
                pass
            return
        rows = [_study(n) for n in range(STUDIES)]
        if "limit" in query:
            rows = rows[: int(query["limit"][0])]
        body = json.dumps(rows).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def region() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Region)
    server.daemon_threads = True
    serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_port}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def test_region_find_asks_one_more_than_max_results(region: str) -> None:
    find = RegionFind(RegionClient(region, False, 10), 10, max_results=5)
    rows = find("STUDY", {"PatientName": "*"})
    assert "limit=6" in Region.asked[-1], Region.asked[-1]
    assert len(rows) == 6  # the one more tells the caller the answer was cut
    unlimited = RegionFind(RegionClient(region, False, 10), 10)  # max_results = 0
    assert len(unlimited("STUDY", {"PatientName": "*"})) == STUDIES
    assert "limit" not in Region.asked[-1]


def test_an_answer_over_the_byte_limit_is_read_no_further(region: str) -> None:
    client = RegionClient(region, False, 30)
    tracemalloc.start()
    try:
        # search_studies and series_of read through the same bound (RegionClient._get).
        with pytest.raises(RegionError, match=f"over {MAX_ANSWER_BYTES} bytes"):
            client.qido("studies", {"PatientName": "BIG*"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Read whole, the 12 MB answer and its ~36,000 parsed rows peaked at over 100 MB.
    assert peak < 3 * MAX_ANSWER_BYTES, f"peak {peak / 1e6:.0f} MB"
    find = RegionFind(client, 30, max_results=5)  # a region that ignores limit
    with pytest.raises(RegionError, match=f"over {MAX_ANSWER_BYTES} bytes"):
        find("STUDY", {"PatientName": "BIG*"})


def test_an_instance_streams_in_whole_and_over_its_limit_is_refused(region: str) -> None:
    client = RegionClient(region, False, 30)
    instance = RegionInstance("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert client.retrieve_instance(instance) == INSTANCE
    with pytest.raises(RegionError, match=r"1\.2\.3\.4\.5: the region's answer is over "
                                          r"1048576 bytes"):
        client.retrieve_instance(instance, limit=1 << 20)


def _findscu(pas: PasProcess, patient_name: str, out: Path) -> int:
    out.mkdir(parents=True)
    result = subprocess.run(
        ["findscu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-X", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientName={patient_name}",
         "-k", "StudyInstanceUID", "127.0.0.1", str(pas.port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return len(list(out.glob("rsp*.dcm")))


def test_a_daemons_regional_cfind_stops_at_max_results(region: str, tmp_path: Path) -> None:
    """A real daemon asked by findscu: 3 of the region's 20 studies (max_results = 3), the
    cut audited; a region answering past the byte limit leaves the C-FIND its local matches,
    the log and the audit row naming why."""
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_PREFETCH__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": region,
        "PAS_SERVING__QUERY_REGION": "true",
        "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "20",
        "PAS_SERVING__MAX_RESULTS": "3",
    }).start()
    try:
        assert _findscu(pas, "*", tmp_path / "all") == 3
        assert "limit=4" in Region.asked[-1]
        assert _findscu(pas, "BIG*", tmp_path / "big") == 0
        log = pas.log()
        assert f"over {MAX_ANSWER_BYTES} bytes" in log, log[-3000:]
        conn = sqlite3.connect(pas.home / "pas.sqlite")
        try:
            details = [row[0] or "" for row in conn.execute(
                "SELECT detail FROM audit WHERE event = 'query' ORDER BY id")]
        finally:
            conn.close()
        assert "truncated: more than serving.max_results = 3 matches" in details[0], details
        assert f"over {MAX_ANSWER_BYTES} bytes" in details[1], details
    finally:
        pas.stop()
