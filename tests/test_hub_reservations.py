"""A busy hub costs the WAN (almost) nothing: bucket reservations (docs/protocol.md, "A busy
hub").

The hub answers a bucket PUT past ``limits.bucket_bodies_bytes`` 503 busy before reading its
body, but httpx (the appliance's client) does not implement ``Expect: 100-continue``: it sent
the whole body anyway, and uvicorn read and discarded it. Every refusal cost a bucket's body
on the site's slow uplink and the hub's ingress (after a regional outage, 40 sites catching
up refilled the hub's link with refused bodies). Now an appliance the hub turned away lately
reserves a bucket's bytes first (``POST .../reservation``, a few hundred bytes): refused,
the body is never sent.

Real peers: ``pas hub run`` (embedded archive, a 1 MiB budget, ``busy_retry_after_s`` 1)
kept busy by a slow PUT of another site (tests/test_hub_busy.py's), ``pas run`` enrolled and
pointed at the hub through a counting TCP relay on 127.0.0.1 (tests/support/tcpproxy.py):
what the appliance sends while the hub is busy is counted on the wire, TLS included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import CT_DIR, MR_DIR, read_rows, storescu, wait_for
from tests.support.tcpproxy import TcpProxy
from tests.test_hub_busy import BUDGET, archived, budget_held
from tests.test_hub_fleet_bound import _beat
from tests.test_ops_fleet import metric
from tests.test_uplink_hub import enrolled_pas, stored_hashes, wait_jobs_finished

RESERVATION_S = 4  # limits.bucket_reservation_s here: long enough for a loaded machine
PER_SITE = 2  # limits.bucket_reservations_per_site here
# What one busy refusal may cost the appliance's uplink now: a reservation request and its
# TLS records (a few hundred bytes), with room for a keep-warm call. A bucket here is
# 100-1000 KiB: each refusal cost one before.
SMALL_BYTES = 8 * 1024


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub", {
        "PAS_HUB_LIMITS__MAX_BUCKET_BYTES": str(BUDGET),
        "PAS_HUB_LIMITS__BUCKET_BODIES_BYTES": str(BUDGET),
        "PAS_HUB_LIMITS__BUSY_RETRY_AFTER_S": "1",
        "PAS_HUB_LIMITS__BUCKET_RESERVATION_S": str(RESERVATION_S),
        "PAS_HUB_LIMITS__BUCKET_RESERVATIONS_PER_SITE": str(PER_SITE)}).init()
    process.start()
    yield process
    process.stop()


def scrape(hub: HubProcess) -> str:
    """The hub's /metrics as regional ops' Prometheus reads it (no client certificate)."""
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30) as viewer:
        answer = viewer.get("/metrics")
    assert answer.status_code == 200, answer.text
    return answer.text


def refusals(hub: HubProcess, site: str) -> tuple[float, float]:
    """The site's busy refusals (all) and those of them answered to a reservation."""
    text = scrape(hub)
    return (metric(text, "pas_hub_bucket_puts_refused_busy_total", site=site) or 0,
            metric(text, "pas_hub_bucket_reservations_refused_busy_total", site=site) or 0)


def held(hub: HubProcess) -> dict[str, float | None]:
    text = scrape(hub)
    return {name: metric(text, f"pas_hub_bucket_{name}")
            for name in ("bodies_held_bytes", "bodies_held", "reservations_held",
                         "reservations_held_bytes")}


def test_a_busy_hub_costs_the_uplink_small_requests_then_the_study_arrives_bit_exact(
        hub: HubProcess, pas_factory: Any, tmp_path: Path) -> None:
    """Main's appliance sent 655,815 bytes to the busy hub for 7 refusals here (a ~94 KB
    bucket each); now a few hundred bytes a refusal (2,636 for 4), every one a
    reservation's. ``hub.retries`` 1 and ``queue.max_attempts`` 1: a busy answer counted as
    an attempt would fail the study."""
    hog = enroll(hub, tmp_path / "hog", "CHU-SLOW")
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())
    files = sorted(CT_DIR.glob("*.dcm"))[:4]
    relay = TcpProxy("127.0.0.1", hub.port).start()
    try:
        with budget_held(hub, hog, ship(pack_items(mr[:2]), hog.hub_transfer_key,
                                        target_bytes=64 * 1024)):
            pas = enrolled_pas(pas_factory, hub, tmp_path / "site-busy", {
                "PAS_QUEUE__MAX_ATTEMPTS": "1", "PAS_HUB__RETRIES": "1",
                "PAS_HUB__BUCKET_MB": "0.5", "PAS_STUDY__STABLE_AFTER_S": "1",
                "PAS_OPS__HEARTBEAT": "false"}, via=relay)
            storescu(files, pas.port)
            db = pas.home / "pas.sqlite"
            # The first refusal is a PUT's (nothing said busy before it: its body crossed);
            # once the job waits, every PUT attempt of that round has ended.
            wait_for(lambda: any((j["last_error"] or "").startswith("waiting for the destin")
                                 for j in read_rows(db, "SELECT * FROM jobs")),
                     60, what=f"the upload turned away busy (log {pas.log_path})")
            before, sent_before = refusals(hub, "SITE-BUSY"), relay.bytes_up
            # Each attempt after it: a reservation refused, the body not sent.
            def four_more() -> tuple[float, float] | None:
                now = refusals(hub, "SITE-BUSY")
                return now if now[0] >= before[0] + 4 else None

            after = wait_for(four_more, 60, interval=0.2, what="four more busy refusals")
            sent = relay.bytes_up - sent_before
            refused = after[0] - before[0]
            assert sent < refused * SMALL_BYTES, (
                f"{sent} bytes sent to the busy hub for {refused:.0f} refusals")
            # Every one of them a reservation's.
            assert after[1] - before[1] == refused, (before, after)
        # The hub free again: the same job resumes, the study is confirmed bit-exact.
        finished = wait_jobs_finished(pas, len(files), timeout=60)
    finally:
        relay.stop()
    assert finished and all(j["state"] == "done" and j["attempts"] <= 1 for j in finished), \
        [dict(j) for j in finished]
    stored = stored_hashes(pas)
    assert len(stored) == len(files)
    assert {uid: sha for uid, sha in archived(hub).items() if uid in stored} == stored
    confirmed = read_rows(db, "SELECT count(*) AS n FROM instances WHERE confirmed_at IS NOT NULL")
    assert confirmed[0]["n"] == len(files)
    # Reservations used by their PUTs and given back: nothing held once the study is in.
    assert held(hub) == {"bodies_held_bytes": 0, "bodies_held": 0, "reservations_held": 0,
                         "reservations_held_bytes": 0}


def _reserve(http: httpx.Client, url: str, size: Any) -> httpx.Response:
    return http.post(url + "/reservation", json={"bytes": size})


def test_reservations_hold_the_budget_refuse_clearly_and_lapse(
        hub: HubProcess, tmp_path: Path) -> None:
    """The call itself, by a client certificate of each of two sites: what a reservation
    holds (the gauges), its refusals (each a problem naming it, nothing held or counted),
    the per-site bound, busy for another site, its PUT never refused busy while one
    without is, the lapse giving it back, and old-style PUTs as before."""
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())
    site = enroll(hub, tmp_path / "site", "CHU-EST")
    hog = enroll(hub, tmp_path / "hog", "CHU-SLOW")
    shipment = ship(pack_items(mr[:12]), site.hub_transfer_key, target_bytes=200 * 1024)
    theirs = ship(pack_items(mr[12:14]), hog.hub_transfer_key, target_bytes=64 * 1024)
    sizes = [len(b) for b in shipment.buckets]
    assert len(sizes) >= 3 and sum(sizes[:2]) < BUDGET, sizes
    with client(site) as http, client(hog) as other:
        assert http.post("/api/v1/heartbeat", json=_beat("CHU-EST", time.time())).status_code == 201
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        assert other.post("/api/v1/transfers", json=theirs.manifest).status_code == 201
        url = shipment.bucket_url
        granted = _reserve(http, url(0), sizes[0])
        assert granted.status_code == 200, granted.text
        assert granted.json() == {"transfer_id": shipment.transfer_id, "index": 0,
                                  "bytes": sizes[0], "expires_in_s": RESERVATION_S}
        holding = {"bodies_held_bytes": sizes[0], "bodies_held": 0, "reservations_held": 1,
                   "reservations_held_bytes": sizes[0]}
        assert held(hub) == holding

        # Bad reservations: a clear problem each, nothing held nor counted.
        for target, body, status, error, said in [
            ("/api/v1/transfers/no-such-transfer/buckets/0", {"bytes": 10}, 404,
             "unknown_transfer", "no transfer no-such-transfer"),
            (url(len(sizes)), {"bytes": 10}, 416, "index_out_of_range",
             f"bucket index {len(sizes)} not in 0..{len(sizes) - 1}"),
            (url(1), {"bytes": BUDGET + 1}, 413, "too_large",
             f"bucket of {BUDGET + 1} bytes is over the limit of {BUDGET}"),
            (url(1), {"bytes": "10"}, 422, "bad_reservation", "bytes: must be the size"),
            (url(1), {"bytes": 0}, 422, "bad_reservation", "got 0"),
            (url(1), {"bytes": True}, 422, "bad_reservation", "got True"),
            ("/api/v1/transfers/" + shipment.transfer_id + "/buckets/x", {"bytes": 10}, 400,
             "bad_request", "bucket index must be a number"),
        ]:
            answer = http.post(target + "/reservation", json=body)
            assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
            assert said in answer.json()["detail"], answer.text
        not_json = http.post(url(1) + "/reservation", content=b"{bytes: 10",
                             headers={"Content-Type": "application/json"})
        assert (not_json.status_code, not_json.json()["error"]) == (400, "bad_json")
        assert held(hub) == holding
        assert refusals(hub, "CHU-EST") == (0, 0)

        # At most PER_SITE a site (a renewal is not one more).
        assert _reserve(http, url(1), sizes[1]).status_code == 200
        too_many = _reserve(http, url(2), sizes[2])
        assert (too_many.status_code, too_many.json()["error"]) == (429, "too_many_reservations")
        assert "limits.bucket_reservations_per_site" in too_many.json()["detail"]
        assert _reserve(http, url(0), sizes[0]).status_code == 200

        # Another site: no room for one byte more than is left: 503 busy, counted as a
        # reservation's refusal; then exactly what is left: the budget is full.
        left = BUDGET - sizes[0] - sizes[1]
        refused = _reserve(other, theirs.bucket_url(0), left + 1)
        assert (refused.status_code, refused.headers.get("retry-after"),
                refused.json()["error"]) == (503, "1", "busy"), refused.text
        assert "2 reservations" in refused.json()["detail"], refused.text
        assert refusals(hub, "CHU-SLOW") == (1, 1)
        assert _reserve(other, theirs.bucket_url(0), left).status_code == 200

        # The reservations hold the budget: a PUT without one is refused (the old way,
        # counted as a PUT's); the PUT with one is stored, full budget or not.
        busy = http.put(url(2), content=shipment.buckets[2])
        assert busy.status_code == 503, busy.text
        assert refusals(hub, "CHU-EST") == (1, 0)
        stored = http.put(url(0), content=shipment.buckets[0])
        assert stored.status_code == 201, stored.text
        assert held(hub) == {"bodies_held_bytes": sizes[1] + left, "bodies_held": 0,
                             "reservations_held": 2, "reservations_held_bytes": sizes[1] + left}

        # Lapsed (no PUT within RESERVATION_S): given back, the gauges at 0.
        wait_for(lambda: held(hub) == {"bodies_held_bytes": 0, "bodies_held": 0,
                                       "reservations_held": 0, "reservations_held_bytes": 0},
                 RESERVATION_S + 20, interval=0.2, what="the reservations lapsed and given back")
        # Old-style PUTs (no reservation) as before; the study arrives bit-exact.
        assert [http.put(url(i), content=b).status_code
                for i, b in enumerate(shipment.buckets)][1:] == [201] * (len(sizes) - 1)
        receipt = http.post(shipment.url + "/commit")
        assert receipt.status_code == 200, receipt.text
    assert {i["sop_instance_uid"]: i["sha256"] for i in receipt.json()["instances"]} == \
        shipment.originals
    assert {uid: sha for uid, sha in archived(hub).items() if uid in shipment.originals} == \
        shipment.originals
    assert refusals(hub, "CHU-EST") == (1, 0)
