"""Destination kind ``stowrs``: the job's lease holds for as long as a POST is out.

The lease was renewed only after each whole request. A POST to a slow archive that outlasted
``queue.lease_s`` let the lease expire under it: a second worker claimed the job and POSTed
the same study at the same time, the first worker's attempt ended "lease lost", and with
``queue.max_attempts = 2`` spent that way the live job ended ``failed`` ("the worker died
while sending it"). The archive here is a small recording server that holds each POST until
the job's lease either outlived its first expiry in the hands of the worker that sent it
(renewed during the POST) or was taken by another worker.
"""

from __future__ import annotations

import io
import re
import sqlite3
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydicom import dcmread

from tests.support.peers import storescu, wait_for
from tests.support.serving import serve_in_thread
from tests.test_routing import CT_PATIENT, jobs_of

LEASE_S = 1.0
HOLD_AT_MOST_S = 15.0  # a backstop only: the hold ends on a condition of the job's lease


def _lease(database: Path) -> tuple[str | None, float | None]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT lease_owner, lease_until FROM jobs "
                           "WHERE state = 'running' ORDER BY id LIMIT 1").fetchone()
    finally:
        conn.close()
    return (row[0], row[1]) if row else (None, None)


class SlowArchive:
    """A STOW-RS archive that answers each POST only once the job's lease says how it held
    up during the POST: ``posts`` records, per POST, whether another worker took the job
    meanwhile; ``most_at_once`` the most POSTs it held at the same time."""

    def __init__(self, database: Path):
        self.database = database
        self.posts: list[dict] = []
        self.lock = threading.Lock()
        self.active = 0
        self.most_at_once = 0
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                boundary = re.search(r"boundary=([^;]+)",
                                     self.headers.get("Content-Type", "")).group(1).encode()
                uids = []
                for part in body.split(b"--" + boundary)[1:]:
                    if part.startswith(b"--"):
                        break
                    data = part.split(b"\r\n\r\n", 1)[1][:-2]
                    uids.append(str(_uid(data)))
                with archive.lock:
                    archive.active += 1
                    archive.most_at_once = max(archive.most_at_once, archive.active)
                entry = {"uids": uids, "taken_over": archive.hold()}
                answer = ('{"00081199": {"vr": "SQ", "Value": [' + ", ".join(
                    f'{{"00081155": {{"vr": "UI", "Value": ["{u}"]}}}}' for u in uids)
                    + "]}}").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                with archive.lock:
                    archive.active -= 1
                    archive.posts.append(entry)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        serve_in_thread(self.server)

    def hold(self) -> bool:
        """Wait until the lease the POST began under was renewed past its first expiry by
        the same worker (False), or another worker took the job (True)."""
        owner, first_until = _lease(self.database)
        assert owner is not None and first_until is not None, "a POST with no job running"
        taken_over: list[bool] = []

        def decided() -> bool:
            now_owner, until = _lease(self.database)
            if now_owner != owner:
                taken_over.append(True)
                return True
            if until is not None and until > first_until + LEASE_S:
                taken_over.append(False)
                return True
            return False

        wait_for(decided, HOLD_AT_MOST_S, what="the lease renewed or taken over")
        return taken_over[-1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _uid(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_a_post_longer_than_the_lease_keeps_the_job_to_its_worker(pas_factory,
                                                                   tmp_path: Path) -> None:
    """Before the fix: the POST outlasted the lease, the second worker took the job and
    POSTed the study again beside the first (two POSTs at once), and the job ended failed
    after its two attempts, "the worker died while sending it"."""
    home = tmp_path / "pas"
    archive = SlowArchive(home / "pas.sqlite")
    try:
        config = tmp_path / "appliance.toml"
        config.write_text(textwrap.dedent(f"""
            [queue]
            workers = 2
            lease_s = {LEASE_S}
            poll_interval_s = 0.1
            max_attempts = 2
            backoff_initial_s = 0.2
            backoff_max_s = 0.5

            [routing.fallback]
            destinations = ["archive"]

            [destinations.archive]
            kind = "stowrs"
            url = "http://127.0.0.1:{archive.port}/dicom-web"
            instances_per_request = 16
            """))
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"},
                          home=home)
        storescu(CT_PATIENT, pas.port)
        wait_for(lambda: jobs_of(home) and all(j["state"] in ("done", "failed")
                                               for j in jobs_of(home)), 60, what="job over")
        wait_for(lambda: archive.active == 0, 30, what="no POST still held")
        jobs = jobs_of(home)
        assert [(j["state"], j["attempts"]) for j in jobs] == [("done", 1)], jobs
        assert [p["taken_over"] for p in archive.posts] == [False], archive.posts
        assert archive.most_at_once == 1
        assert sorted(archive.posts[0]["uids"]) == sorted(
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in CT_PATIENT)
    finally:
        archive.stop()
