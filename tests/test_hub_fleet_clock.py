"""Heartbeats across a step of the appliance's clock (review s39, clock F1 and F5).

F1: after NTP stepped the appliance's clock back, a job's ``created_at`` was in its future: the
heartbeat carried a negative backlog age (and uptime), and the hub refused the whole heartbeat
(422), so the site showed down while healthy. The appliance now clamps the ages at 0 and
counts its uptime on ``time.monotonic``; the hub clamps a negative age (an older appliance's)
instead of refusing the heartbeat, and still refuses an absurd one.

F5: the site's ``last_backup_at`` (its clock) was compared with the hub's clock; it is now read
with the heartbeat's own offset (received at, on the hub, minus sent at, on the site).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.config import load_settings
from appliance.hub.fleet import validate_heartbeat
from appliance.ingest.receive import Receiver
from appliance.ops import heartbeat as heartbeat_module
from appliance.ops.heartbeat import HeartbeatSender, build_heartbeat
from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.support.cleanup import started
from tests.support.hub import Enrolment, HubProcess, client, enroll
from tests.support.peers import CT_DIR
from tests.test_ops_fleet import _beat, metric


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fleet-clock")
    with contextlib.ExitStack() as stack:
        hub = started(stack, HubProcess(root / "hub").init())
        site = enroll(hub, root / "site", "SITE-B")
        viewer = stack.enter_context(
            httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30))
        yield {"hub": hub, "site": site, "viewer": viewer}


def _post(site: Enrolment, beat: dict[str, Any]) -> httpx.Response:
    with client(site) as http:
        return http.post("/api/v1/heartbeat", json=beat)


def test_the_hub_keeps_a_heartbeat_with_a_negative_age_and_refuses_an_absurd_one(
        fleet: dict[str, Any]) -> None:
    site = fleet["site"]
    backlog = {"studies": 1, "bytes": 1000, "oldest_age_s": -3600.0,
               "urgent_oldest_age_s": -3600.0, "routine_oldest_age_s": -3600.0}
    answer = _post(site, _beat(backlog=backlog))
    assert answer.status_code == 201, answer.text  # was 422: the site shown down
    scrape = fleet["viewer"].get("/metrics").text
    assert metric(scrape, "pas_fleet_site_up", site="SITE-B") == 1
    assert metric(scrape, "pas_fleet_site_backlog_oldest_age_seconds", site="SITE-B") == 0
    absurd = _post(site, _beat(sent_at=time.time() + 1,
                               backlog={**backlog, "oldest_age_s": -1e9}))
    assert absurd.status_code == 422, absurd.text
    assert "backlog.oldest_age_s: must be >= -86400" in absurd.json()["detail"]


def test_a_backup_age_is_read_with_the_heartbeats_own_clock_offset(
        fleet: dict[str, Any]) -> None:
    """The site's clock 3 h ahead, its backup a day old by that clock: a day old, not 21 h
    (before: a stale backup hidden for as long as the clock was ahead)."""
    ahead = 3 * 3600.0
    sent_at = time.time() + ahead + 2
    answer = _post(fleet["site"], _beat(sent_at=sent_at, last_backup_at=sent_at - 86400))
    assert answer.status_code == 201, answer.text
    scrape = fleet["viewer"].get("/metrics").text
    age = metric(scrape, "pas_fleet_site_backup_age_seconds", site="SITE-B")
    assert age is not None and 86400 - 5 <= age < 86400 + 60, age
    page = fleet["viewer"].get("/fleet/sites/SITE-B")
    assert page.status_code == 200 and "last backup 24 h ago" in page.text, page.text[-2000:]


def test_the_appliance_never_sends_a_negative_age_or_uptime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job routed, then the clock stepped back an hour (its created_at in the future, as
    after an NTP step): the heartbeat says 0 and the hub's own check accepts it. The uptime
    does not follow the step either."""
    settings = load_settings(environ={"PAS_HOME": str(tmp_path)})
    db = Database(settings.db_path)
    try:
        receiver = Receiver(db, Spool(settings.spool_dir, fsync=False))
        instance = receiver.receive_file(sorted(CT_DIR.glob("*.dcm"))[0].read_bytes(),
                                         source="CT1").instance_id
        study = db.query_one("SELECT study_fk FROM instances WHERE id = ?",
                             (instance,))["study_fk"]
        job_store.route_study(db, study, [instance],
                              [job_store.NewJob("dicom", "pacs", 2, "r", [instance]),
                               job_store.NewJob("dicom", "pacs", 0, "r", [instance])])
        sender = HeartbeatSender(settings, db, 30.0)
        real = time.time
        # NTP steps the clock back an hour (time.time, for every module): the jobs were
        # created in the clock's future.
        monkeypatch.setattr(heartbeat_module.time, "time", lambda: real() - 3600)
        beat = build_heartbeat(settings, db, sender.started_at)
    finally:
        db.close()
    ages = {key: beat["backlog"][key]
            for key in ("oldest_age_s", "urgent_oldest_age_s", "routine_oldest_age_s")}
    assert ages == dict.fromkeys(ages, 0.0), beat["backlog"]
    assert beat["uptime_s"] >= 0, beat["uptime_s"]
    validate_heartbeat(beat)
