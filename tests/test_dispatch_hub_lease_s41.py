"""Destination kind ``hub``: the job's lease holds for the whole attempt, whichever call the
hub is slow to answer, and a worker that lost it anyway changes nothing more.

The uplink renewed the lease only while it PUT buckets and while the commit ran. Its other
calls (the holdings question, what the hub holds of a transfer, the manifest's POST, a
receipt) ran without renewal: a hub that held one of those answers past ``queue.lease_s``
let a second worker claim the same job beside the first, and over an outage of a silent hub
each such claim counted an attempt that the first worker's "waiting for the link" could not
give back (it no longer owned the job): the job ended ``failed`` (review s41, F1).

The hub here is a small real HTTP server on loopback (the real hub cannot be made to hold
an answer on demand): it takes bucket PUTs at once and holds every other request until the
job's lease either outlived its first expiry in the hands of the worker that sent it, or was
taken by another worker; then it drops the connection without answering (a hub gone silent:
the link's failure, which the job waits out uncounted). The rest is real: the dispatcher and
its workers, the hub target and its client, the index and the spool with a real CT study.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.config import load_settings
from appliance.dispatch.target_types.hub import HubTarget
from appliance.dispatch.worker import Dispatcher
from appliance.ingest.receive import Receiver
from appliance.store import jobs as job_store
from appliance.store.db import Database, now
from appliance.store.jobs import WAITING_FOR_LINK
from appliance.store.spool import Spool
from appliance.transfer.client import HubClient
from appliance.transfer.enrolment import Enrolment
from tests.support.peers import wait_for
from tests.support.serving import serve_in_thread
from tests.test_routing import CT_PATIENT

LEASE_S = 1.0
MAX_ATTEMPTS = 2
HOLD_AT_MOST_S = 15.0  # a backstop only: a hold ends on a condition of the job's lease


class HoldingHub:
    """A hub that answers bucket PUTs at once (201, no receipt) and, in ``mode`` "hold",
    holds every other request until :meth:`_decide` says how the job's lease held up, then
    drops the connection unanswered. ``holds``: per held request, (method, path, taken
    over by another worker). In ``mode`` "steal", the manifest's POST (once a bucket was
    taken) is answered 201 after another owner took the job's lease (``stolen``: the job's
    progress then); ``after_steal``: the requests that came after."""

    def __init__(self, db: Database, mode: str = "hold"):
        self.db = db
        self.mode = mode
        self.holds: list[tuple[str, str, bool]] = []
        self.active = 0
        self.most_at_once = 0
        self.stolen: str | None = None
        self.after_steal: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"{}") -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                path = self.path.split("?")[0]
                with hub.lock:
                    if hub.stolen is not None:
                        hub.after_steal.append((self.command, path))
                if self.command == "PUT":
                    self._answer(201)
                elif hub.mode == "steal":
                    if hub.stolen is None and self.command == "POST" and \
                            path.endswith("/transfers"):
                        wait_for(hub.bucket_saved, HOLD_AT_MOST_S, what="the bucket's PUT")
                        hub.steal()
                        self._answer(201)
                    else:
                        self._answer(404, b'{"error": "unknown transfer"}')
                else:
                    with hub.lock:
                        hub.active += 1
                        hub.most_at_once = max(hub.most_at_once, hub.active)
                    try:
                        taken_over = hub.hold()
                    finally:
                        with hub.lock:
                            hub.active -= 1
                    if taken_over is not None:
                        with hub.lock:
                            hub.holds.append((self.command, path, taken_over))
                    self.close_connection = True  # silent: no answer at all

            do_GET = do_POST = do_PUT = _any  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        serve_in_thread(self.server)

    def _lease(self) -> tuple[str | None, float | None]:
        rows = self.db.query("SELECT lease_owner, lease_until FROM jobs WHERE state = 'running'")
        return (rows[0]["lease_owner"], rows[0]["lease_until"]) if rows else (None, None)

    def hold(self) -> bool | None:
        """Wait until the lease the request came under was renewed past its first expiry
        by the same worker (False), or another worker took the job (True: also a request
        sent while no worker holds the job); None when released first (the test's end)."""
        owner, first_until = self._lease()
        if owner is None or first_until is None:
            return True
        said: list[bool | None] = []

        def decided() -> bool:
            if self.release.is_set():
                said.append(None)
                return True
            now_owner, until = self._lease()
            if now_owner != owner:
                said.append(True)
                return True
            if until is not None and until > first_until + LEASE_S:
                said.append(False)
                return True
            return False

        wait_for(decided, HOLD_AT_MOST_S, interval=0.02, what="the lease renewed or taken")
        return said[-1]

    def bucket_saved(self) -> bool:
        """The job's progress counts the bucket PUT (its worker saved it)."""
        [row] = self.db.query("SELECT progress FROM jobs")
        return bool(json.loads(row["progress"] or "{}").get("buckets_sent"))

    def steal(self) -> None:
        """Another worker's claim, as ``claim_next`` makes it of an expired lease."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE jobs SET lease_owner = 'another-worker', lease_until = ?, "
                         "attempts = attempts + 1 WHERE state = 'running'", (now() + 600,))
            self.stolen = conn.execute("SELECT progress FROM jobs").fetchone()[0]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Site:
    db: Database
    dispatcher: Dispatcher
    job_id: int


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[Dispatcher, HoldingHub]] = []

    def make(mode: str) -> tuple[Site, HoldingHub]:
        settings = load_settings(environ={
            "PAS_HOME": str(tmp_path), "PAS_QUEUE__LEASE_S": str(LEASE_S),
            "PAS_QUEUE__WORKERS": "2", "PAS_QUEUE__MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "PAS_QUEUE__BACKOFF_INITIAL_S": "0.1", "PAS_QUEUE__BACKOFF_MAX_S": "0.3",
            "PAS_QUEUE__POLL_INTERVAL_S": "0.05", "PAS_HUB__URGENT_WORKER": "false",
            "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        db = Database(settings.db_path)
        spool = Spool(settings.spool_dir, fsync=False)
        receiver = Receiver(db, spool)
        ids = [receiver.receive_file(path.read_bytes(), calling_ae="CT1").instance_id
               for path in CT_PATIENT]
        [study] = db.query("SELECT id FROM studies")
        job_store.route_study(db, int(study["id"]), ids, [
            job_store.NewJob("hub", "hub", 2, "fallback", ids)])
        [job] = db.query("SELECT id FROM jobs")
        hub = HoldingHub(db, mode)
        transfer_key = X25519PrivateKey.generate().public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)
        enrolment = Enrolment(tmp_path / "pki", hub.url, "SITE-A", transfer_key, "")
        client = HubClient(hub.url, False, timeout_s=HOLD_AT_MOST_S * 2, retries=1,
                           backoff_max_s=0.05)
        target = HubTarget("hub", settings, enrolment, db, client=client)
        dispatcher = Dispatcher(settings, db, spool, lambda name: target)
        made.append((dispatcher, hub))
        return Site(db, dispatcher, int(job["id"])), hub

    yield make
    for dispatcher, hub in made:
        hub.release.set()
        dispatcher.stop(20)
        hub.stop()


def _job(site: Site) -> dict[str, Any]:
    return dict(site.db.query("SELECT * FROM jobs WHERE id = ?", (site.job_id,))[0])


def test_a_silent_hub_keeps_the_job_to_its_worker_and_never_fails_it(site: Any) -> None:
    """Two workers, a lease of 1 s, a hub holding the manifest's POST and then what it
    holds of the transfer, each past the lease, attempt after attempt. Before the fix: the
    second worker claimed the job while the first waited for the manifest's answer (the
    first hold ended "taken over", two requests held at once), and the job ended ``failed``
    once ``max_attempts`` claims were counted. Now each hold sees the lease renewed by the
    worker that sent the request, and after twice ``max_attempts`` holds the job still
    waits for the link, no attempt counted."""
    place, hub = site("hold")
    place.dispatcher.start()
    wait_for(lambda: len(hub.holds) >= 2 * MAX_ATTEMPTS or _job(place)["state"] == "failed",
             60, what="the hub's holds, or the job failed")
    hub.release.set()
    place.dispatcher.stop(20)
    assert hub.holds, "no request held"
    assert [taken for _m, _p, taken in hub.holds] == [False] * len(hub.holds), hub.holds
    assert hub.most_at_once == 1
    paths = {path for _method, path, _taken in hub.holds}
    assert any(p.endswith("/transfers") for p in paths), paths  # the manifest's POST
    assert any(p.endswith("/buckets") for p in paths), paths  # what the hub holds of it
    job = _job(place)
    assert (job["state"], job["attempts"]) == ("pending", 0), job
    assert job["last_error"].startswith(WAITING_FOR_LINK), job["last_error"]


def test_a_worker_that_lost_the_job_while_the_hub_held_its_answer_sends_and_writes_nothing(
        site: Any) -> None:
    """Another worker took the job while the hub held the manifest's POST (here: its lease
    taken as ``claim_next`` takes an expired one). Before the fix the first worker went on:
    it asked the hub to commit, asked what it held, PUT the bucket again and saved the
    job's progress over the new owner's. Now it stops at its next step."""
    place, hub = site("steal")
    assert place.dispatcher.run_one("the-first-worker")
    assert hub.stolen is not None, "the manifest was never posted"
    assert hub.after_steal == [], hub.after_steal
    job = _job(place)
    assert (job["state"], job["lease_owner"], job["attempts"]) == (
        "running", "another-worker", 2), job
    assert job["progress"] == hub.stolen  # nothing written since
    assert json.loads(job["progress"])["buckets_sent"] == 1
