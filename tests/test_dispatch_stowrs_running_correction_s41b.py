"""A correction filed while a stowrs job's attempt is running: the replaced version is not
POSTed.

As for a dicom node (``tests/test_dispatch_running_correction_s41b.py``): the attempt's
start left out the versions replaced by then, and a version replaced while the attempt ran
went in a later request (review s41, F-D). The target now checks each batch just before
its request; an instance no longer current is left out and counted in the done job's
``last_error``.

The archive is a small real HTTP server on loopback that holds its answer to each POST
until the test lets it go (the correction is filed while the first request is out), then
lists the instances as stored. PAS is the real daemon, fed by DCMTK's storescu as the CT and
as the QA workstation (whose AE no rule sends to the archive).
"""

from __future__ import annotations

import json
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydicom import dcmread

from tests.support.peers import read_rows, storescu, wait_for
from tests.support.refusing_archive import _parts, _uids
from tests.support.serving import serve_in_thread
from tests.test_ingest import sop_uid
from tests.test_routing import CT_PATIENT


class HeldArchive:
    """Stores what each POST carries (``stored``: the SOP Instance UIDs, in order) and
    answers once ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stored: list[str] = []
        self.lock = threading.Lock()
        archive = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                uids = [_uids(part)[2] for part in _parts(self.headers["Content-Type"], body)]
                with archive.lock:
                    archive.stored.extend(uids)
                archive.release.wait(60)
                listed = json.dumps({"00081199": {"vr": "SQ", "Value": [
                    {"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(listed)))
                self.end_headers()
                self.wfile.write(listed)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        serve_in_thread(self.server)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_version_replaced_during_the_attempt_is_not_posted(pas_factory: Any,
                                                            tmp_path: Path) -> None:
    archive = HeldArchive()
    try:
        config = tmp_path / "appliance.toml"
        config.write_text(textwrap.dedent(f"""
            [queue]
            poll_interval_s = 0.1

            [[routing.rules]]
            name = "CT to the archive"
            match = {{ calling_ae = "^CT1$" }}
            destinations = ["archive"]

            [destinations.archive]
            kind = "stowrs"
            url = "{archive.url}"
            instances_per_request = 1
            """))
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                           "PAS_STUDY__STABLE_AFTER_S": "0.5"})
        database = pas.home / "pas.sqlite"

        def jobs() -> list[dict[str, Any]]:
            return [dict(r) for r in read_rows(database, "SELECT * FROM jobs ORDER BY id")]

        storescu(CT_PATIENT, pas.port, calling="CT1")
        wait_for(lambda: len(archive.stored) == 1, 60, what="the first request out")
        order = [r["sop_instance_uid"] for r in read_rows(
            database, "SELECT i.sop_instance_uid FROM job_instances ji JOIN instances i "
                      "ON i.id = ji.instance_fk WHERE ji.job_id = 1 "
                      "ORDER BY i.series_fk, i.instance_number, i.id")]
        assert len(order) == 3 and archive.stored == order[:1]
        last = next(p for p in CT_PATIENT if sop_uid(p) == order[-1])
        corrected = dcmread(last)
        corrected.ImageComments = "corrected at the QA workstation"
        correction = tmp_path / "correction.dcm"
        corrected.save_as(correction)
        storescu(correction, pas.port, calling="QA_WS")
        versions = read_rows(database, "SELECT is_current FROM instances "
                                       "WHERE sop_instance_uid = ? ORDER BY version",
                             (order[-1],))
        assert [v["is_current"] for v in versions] == [0, 1]
        assert jobs()[0]["state"] == "running"  # filed while the first request is out

        archive.release.set()
        wait_for(lambda: jobs()[0]["state"] == "done", 60, what="job done")
        job = jobs()[0]
        assert job["attempts"] == 1, job
        assert archive.stored == order[:2]  # not the replaced version
        assert job["last_error"].startswith("1 version the sender replaced after this job "
                                            "was routed left out, not sent"), job
        assert order[-1] in job["last_error"]
        assert len(jobs()) == 1
    finally:
        archive.stop()
