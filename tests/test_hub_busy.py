"""The hub's bucket bodies in memory are bounded, every site together (invariant 8), and the
appliance's uplink waits for a busy hub instead of failing its studies.

Real peers: ``pas hub run`` (embedded archive) with ``limits.bucket_bodies_bytes`` equal to
one bucket's ``limits.max_bucket_bytes`` (1 MiB) and ``busy_retry_after_s`` 1; a raw TLS PUT
that declares a full bucket and sends almost nothing holds the whole budget (a slow site's
upload); ``pas run`` (enrolled through the real code) as the uplink. Without the bound every
PUT was read whatever the others held (40 sites x a 48 MB bucket: ~2 GB); without the
uplink's handling a 503 was retried on the exponential backoff and then counted as a failed
attempt. The hub's /metrics count the busy refusals per site and show the bodies held (the
log alone said it before).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.store.hub import open_hub_db, revoke_site
from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, Shipment, client, enroll, pack_items, ship
from tests.support.peers import CT_DIR, MR_DIR, read_rows, storescu, wait_for
from tests.test_hub_fleet_bound import _beat
from tests.test_ops_fleet import metric
from tests.test_uplink_hub import enrolled_pas, stored_hashes, wait_jobs_finished

BUDGET = 1024 * 1024  # limits.max_bucket_bytes and limits.bucket_bodies_bytes
ANSWER_TIMEOUT_S = 20.0  # an upper bound for an answer, not a wait: the answer ends it


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub", {
        "PAS_HUB_LIMITS__MAX_BUCKET_BYTES": str(BUDGET),
        "PAS_HUB_LIMITS__BUCKET_BODIES_BYTES": str(BUDGET),
        "PAS_HUB_LIMITS__BUSY_RETRY_AFTER_S": "1"}).init()
    process.start()
    yield process
    process.stop()


class SlowPut:
    """A PUT of ``shipment``'s bucket 0 on a raw TLS socket that declares a whole budget
    and sends 1 KiB: a slow site's upload, holding its reservation until it closes."""

    def __init__(self, hub: HubProcess, site: Enrolment, shipment: Shipment):
        self.hub, self.site, self.shipment = hub, site, shipment
        self.tls: ssl.SSLSocket | None = None

    def start(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.hub.port), timeout=ANSWER_TIMEOUT_S)
        self.tls = self.site.ssl_context().wrap_socket(raw, server_hostname="localhost")
        self.tls.sendall(f"PUT {self.shipment.bucket_url(0)} HTTP/1.1\r\n"
                         f"Host: localhost:{self.hub.port}\r\nContent-Length: {BUDGET}\r\n"
                         "\r\n".encode() + b"\0" * 1024)

    def answered(self) -> bool:
        return self.tls is not None and bool(select.select([self.tls], [], [], 0)[0])

    def close(self) -> None:
        if self.tls is not None:
            self.tls.close()
            self.tls = None


@contextlib.contextmanager
def budget_held(hub: HubProcess, site: Enrolment, shipment: Shipment) -> Iterator[None]:
    """A :class:`SlowPut` holding the hub's whole budget, until leaving."""
    slow = SlowPut(hub, site, shipment)

    def holds() -> bool:
        """Held once a body the hub would read (it fails authentication: nothing stored
        either way) is refused as busy. The probe may be read first and the slow PUT
        refused: it then has its answer, and starts again."""
        if slow.tls is None:
            slow.start()
        if http.put(shipment.bucket_url(1), content=b"\0" * 64).status_code == 503:
            return True
        if slow.answered():
            slow.close()
        return False

    with client(site) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        try:
            wait_for(holds, 60, what="the hub's bucket budget held by the slow PUT")
            yield
        finally:
            slow.close()


def head_only_answer(hub: HubProcess, site: Enrolment, path: str, size: int
                     ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """PUT ``path`` declaring ``size`` bytes and sending none: the status, headers and JSON
    body of the answer, read while the body is still unsent."""
    with socket.create_connection(("127.0.0.1", hub.port), timeout=ANSWER_TIMEOUT_S) as raw, \
            site.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"PUT {path} HTTP/1.1\r\nHost: localhost:{hub.port}\r\n"
                    f"Content-Length: {size}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                _headers(answer).get("content-length", "1")):
            data = tls.recv(65536)  # socket.timeout (the test fails) if no answer comes
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, _headers(answer), json.loads(answer.partition(b"\r\n\r\n")[2])


def _headers(answer: bytes) -> dict[str, str]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


BUSY = "pas_hub_bucket_puts_refused_busy_total"


def budget_metrics(hub: HubProcess) -> dict[str, float | None]:
    """The hub's /metrics as regional ops' Prometheus reads it (no client certificate):
    the busy refusals of both sites and the bucket bodies held now."""
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30) as viewer:
        scrape = viewer.get("/metrics")
    assert scrape.status_code == 200, scrape.text
    return {"CHU-EST": metric(scrape.text, BUSY, site="CHU-EST"),
            "CHU-SLOW": metric(scrape.text, BUSY, site="CHU-SLOW"),
            **{name: metric(scrape.text, f"pas_hub_bucket_bodies_{name}")
               for name in ("held_bytes", "held", "budget_bytes")}}


def archived(hub: HubProcess) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the file the embedded archive holds."""
    return {r["sop_instance_uid"]: hashlib.sha256(
                (hub.home / "archive" / "spool" / r["path"]).read_bytes()).hexdigest()
            for r in read_rows(hub.home / "archive" / "pas.sqlite",
                               "SELECT sop_instance_uid, path FROM instances")}


def test_a_bucket_put_past_the_budget_is_503_unread_and_stores_nothing(
        hub: HubProcess, tmp_path: Path) -> None:
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())
    hog = enroll(hub, tmp_path / "hog", "CHU-SLOW")
    site = enroll(hub, tmp_path / "site", "CHU-EST")
    shipment = ship(pack_items(mr[:12]), site.hub_transfer_key, target_bytes=256 * 1024)
    assert len(shipment.buckets) >= 2 and max(map(len, shipment.buckets)) <= BUDGET
    with client(site) as http:
        # Both are in the fleet (CHU-EST by a heartbeat, CHU-SLOW by its enrolment, never
        # heard yet): their refusals are exported at 0 from the start, and the gauges too.
        assert http.post("/api/v1/heartbeat", json=_beat("CHU-EST", time.time())).status_code == 201
        assert budget_metrics(hub) == {"CHU-EST": 0, "CHU-SLOW": 0, "held_bytes": 0,
                                       "held": 0, "budget_bytes": BUDGET}
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        with budget_held(hub, hog, ship(pack_items(mr[12:14]), hog.hub_transfer_key,
                                        target_bytes=64 * 1024)):
            # Answered before any of the body is sent: the hub did not wait to read it.
            status, headers, body = head_only_answer(hub, site, shipment.bucket_url(0),
                                                     len(shipment.buckets[0]))
            assert (status, headers.get("retry-after"), body["error"]) == (503, "1", "busy")
            assert "limits.bucket_bodies_bytes" in body["detail"]
            # A whole, valid bucket sent by a real client: refused the same, nothing stored.
            busy = http.put(shipment.bucket_url(0), content=shipment.buckets[0])
            assert (busy.status_code, busy.headers.get("retry-after")) == (503, "1"), busy.text
            state = http.get(shipment.url).json()
            assert (state["held"], state["bytes_received"], state["puts"]) == (0, 0, 0)
            assert http.get(shipment.url + "/buckets").json()["held"] == []
            assert not (hub.home / "buckets" / shipment.transfer_id).exists() or not any(
                (hub.home / "buckets" / shipment.transfer_id).iterdir())
            assert http.get("/api/v1/whoami").json() == {"site": "CHU-EST"}  # still serving
            # What regional ops see meanwhile: CHU-EST's two refusals, the probe's of
            # CHU-SLOW (and its slow PUT's, when the probe was read first), a refused site
            # exported though it never sent a heartbeat; the slow PUT holding the budget.
            busy = budget_metrics(hub)
            assert busy["CHU-EST"] == 2 and busy["CHU-SLOW"] is not None and \
                busy["CHU-SLOW"] >= 1, busy
            assert (busy["held_bytes"], busy["held"], busy["budget_bytes"]) == (
                BUDGET, 1, BUDGET), busy
        # The slow PUT gone, its budget is free again: the same buckets are stored and the
        # study reaches the archive bit-exact.
        def stored_once_free() -> httpx.Response | None:
            answer = http.put(shipment.bucket_url(0), content=shipment.buckets[0])
            return None if answer.status_code == 503 else answer

        first = wait_for(stored_once_free, what="the budget given back")
        assert first.status_code == 201, first.text
        assert shipment.put_all(http)[1:] == [201] * (len(shipment.buckets) - 1)
        receipt = http.post(shipment.url + "/commit")
        assert receipt.status_code == 200, receipt.text
    assert {i["sop_instance_uid"]: i["sha256"] for i in receipt.json()["instances"]} == \
        shipment.originals
    assert {uid: sha for uid, sha in archived(hub).items() if uid in shipment.originals} == \
        shipment.originals
    # Every reservation given back; a site revoked since leaves the metrics, as it leaves
    # the fleet's (a bounded set of series: the enrolled sites).
    db = open_hub_db(hub.home / "hub.sqlite")
    try:
        revoke_site(db, "CHU-SLOW")
    finally:
        db.close()
    after = budget_metrics(hub)
    assert after["CHU-EST"] is not None and after["CHU-EST"] >= 2, after
    assert (after["CHU-SLOW"], after["held_bytes"], after["held"]) == (None, 0, 0), after


def test_the_uplink_waits_for_a_busy_hub_then_delivers_bit_exact(
        hub: HubProcess, pas_factory: Any, tmp_path: Path) -> None:
    """``queue.max_attempts`` 1 and ``hub.retries`` 1: a busy answer counted as an attempt
    fails the study for good, as it did."""
    hog = enroll(hub, tmp_path / "hog", "CHU-SLOW")
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())
    files = sorted(CT_DIR.glob("*.dcm"))[:4]  # one job per study they belong to
    with budget_held(hub, hog, ship(pack_items(mr[:2]), hog.hub_transfer_key,
                                    target_bytes=64 * 1024)):
        pas = enrolled_pas(pas_factory, hub, tmp_path / "site-busy", {
            "PAS_QUEUE__MAX_ATTEMPTS": "1", "PAS_HUB__RETRIES": "1",
            "PAS_HUB__BUCKET_MB": "0.5", "PAS_STUDY__STABLE_AFTER_S": "1"})
        storescu(files, pas.port)
        db = pas.home / "pas.sqlite"
        waiting = wait_for(lambda: next((j for j in read_rows(db, "SELECT * FROM jobs")
                                         if j["last_error"] or j["state"] in ("done", "failed")),
                                        None),
                           60, what=f"the upload's first try (log {pas.log_path})")
        assert (waiting["state"], waiting["attempts"]) == ("pending", 0), dict(waiting)
        assert waiting["last_error"].startswith("waiting for the destination to free up: "), \
            waiting["last_error"]
        assert "Retry-After 1 s" in waiting["last_error"]
    # The hub free again: the same job resumes and the study is confirmed from the receipt.
    finished = wait_jobs_finished(pas, len(files), timeout=60)
    assert finished and all(j["state"] == "done" and j["attempts"] <= 1 for j in finished), \
        [dict(j) for j in finished]
    stored = stored_hashes(pas)
    assert len(stored) == len(files)
    assert {uid: sha for uid, sha in archived(hub).items() if uid in stored} == stored
    confirmed = read_rows(db, "SELECT count(*) AS n FROM instances WHERE confirmed_at IS NOT NULL")
    assert confirmed[0]["n"] == len(files)
    assert "(limits.bucket_bodies_bytes); come back in 1 s" in hub.log()
