"""Heartbeats from a real, enrolled ``pas run`` to a real ``pas hub run`` over mutual TLS; the
fleet dashboard, site page and fleet metrics; idempotence and every named bad heartbeat."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.hub.fleet import has_problem, render_dashboard, site_rows
from appliance.store import fleet as fleet_store
from appliance.store.db import Database
from appliance.store.hub_schema import HUB_MIGRATIONS
from tests.support.cleanup import started
from tests.support.hub import HubProcess, client, enroll
from tests.support.peers import MR_DIR, ROOT, PasProcess, storescu, wait_for

FILES = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:20]


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fleet")
    with contextlib.ExitStack() as stack:  # a step that raises stops those started
        hub = started(stack, HubProcess(root / "hub").init())
        home = root / "site-a"
        enroll(hub, home, "SITE-A")
        other = enroll(hub, root / "site-b", "SITE-B")  # posts by hand, no daemon
        pas = started(stack, PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                               "PAS_OPS__HEARTBEAT_INTERVAL_S": "1"}))
        viewer = stack.enter_context(
            httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30))
        storescu(FILES, pas.port, calling="CT01")
        yield {"hub": hub, "pas": pas, "viewer": viewer, "site_b": other, "root": root}


@pytest.fixture(scope="module")
def uploaded(fleet: dict[str, Any]) -> dict[str, Any]:
    """The fleet once the appliance holds the hub's receipt for the study sent at set-up:
    every instance confirmed, so the upload's figures (the hub job's progress, written
    bucket by bucket before the commit) are final. A test reading them asks for this
    rather than counting on an earlier test of the module having waited."""
    url = f"http://127.0.0.1:{fleet['pas'].http_port}/metrics"
    wait_for(lambda: metric(httpx.get(url, timeout=10).text, "pas_confirmed_instances")
             == len(FILES), 90, interval=0.2, what="every instance confirmed by the hub")
    return fleet


def _hub_db(hub: HubProcess) -> Database:
    return Database(hub.home / "hub.sqlite", HUB_MIGRATIONS)


def test_heartbeats_reach_the_dashboard(fleet: dict[str, Any]) -> None:
    viewer: httpx.Client = fleet["viewer"]
    db = _hub_db(fleet["hub"])
    wait_for(lambda: (fleet_store.site_status(db, "SITE-A") or {}).get("received", {})
             .get("instances") == len(FILES), 30, what="a heartbeat counting every instance")
    # The study goes up to the hub through the uplink (a real upload); the heartbeat then
    # reports an empty backlog and every instance confirmed.
    wait_for(lambda: (fleet_store.site_status(db, "SITE-A") or {}).get("confirmed_instances")
             == len(FILES), 90, what="the upload confirmed in a heartbeat")
    status = fleet_store.site_status(db, "SITE-A")
    assert status is not None
    assert status["backlog"]["studies"] == 0
    assert status["received"]["bytes"] == fleet["pas"].status()["bytes"]
    assert status["cert_days_left"] > 300
    count = fleet_store.heartbeat_count(db, "SITE-A")
    wait_for(lambda: fleet_store.heartbeat_count(db, "SITE-A") >= count + 2, 15,
             what="two more heartbeats (every 1 s)")

    page = viewer.get("/fleet")
    assert page.status_code == 200
    assert '<tr data-site="SITE-A">' in page.text
    assert 'class="state up">up<' in page.text
    site_page = viewer.get("/fleet/sites/SITE-A")
    assert site_page.status_code == 200
    assert site_page.text.count("<svg") == 2
    assert f"{len(FILES)} instances received" in site_page.text
    assert viewer.get("/fleet/sites/NOWHERE").status_code == 404
    for path in ("/fleet", "/fleet/sites/SITE-A", "/fleet/sites/NOWHERE"):
        headers = viewer.get(path).headers
        policy = headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, path
        assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
        assert headers["x-content-type-options"] == "nosniff"

    scrape = viewer.get("/metrics").text
    assert metric(scrape, "pas_fleet_site_up", site="SITE-A") == 1
    assert metric(scrape, "pas_fleet_site_backlog_studies", site="SITE-A") == 0
    assert metric(scrape, "pas_fleet_site_backlog_oldest_age_seconds", site="SITE-A",
                  priority="routine") == 0
    assert 0 < metric(scrape, "pas_fleet_site_disk_used_ratio", site="SITE-A") < 1  # type: ignore[operator]


def test_appliance_metrics_show_the_link(uploaded: dict[str, Any]) -> None:
    pas: PasProcess = uploaded["pas"]
    text = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    assert metric(text, "pas_hub_link_up") == 1
    assert metric(text, "pas_enrolled") == 1
    assert abs(time.time() - metric(text, "pas_hub_last_contact_timestamp_seconds")) < 60  # type: ignore[operator]
    assert metric(text, "pas_certificate_days_left") > 300  # type: ignore[operator]
    # The upload, read from the hub job's progress: every original byte went, compressed.
    assert metric(text, "pas_upload_original_bytes_total") == pas.status()["bytes"]
    wire = metric(text, "pas_wan_bytes_total", direction="up")
    assert wire is not None and 0 < wire < pas.status()["bytes"]
    assert metric(text, "pas_compression_ratio") == pytest.approx(pas.status()["bytes"] / wire)
    assert metric(text, "pas_prefetch_fetched_7d") is not None
    assert "pas_prefetch_lead_time_seconds_bucket" not in text  # a window is no histogram
    assert metric(text, "pas_destination_link_up", destination="hub") == 1
    page = httpx.get(f"http://127.0.0.1:{pas.http_port}/", timeout=10).text
    assert 'class="state up">up (last contact' in page
    assert '<tr data-destination="hub"><td>hub</td><td><span class="state up">up<' in page


def _doctor(pas: PasProcess) -> tuple[int, dict[str, dict[str, str]]]:
    result = pas.cli("doctor", "--json", check=False)
    return result.returncode, {c["name"]: c for c in json.loads(result.stdout)}


def test_doctor_on_the_enrolled_running_site(fleet: dict[str, Any]) -> None:
    code, checks = _doctor(fleet["pas"])
    for name in ("configuration", "database", "DICOM port", "HTTP port", "enrolment",
                 "certificate", "hub", "clock"):
        assert checks[name]["verdict"] == "ok", checks[name]
    assert code == 0
    assert "knows us as 'SITE-A'" in checks["hub"]["detail"]


def _beat(**changes: Any) -> dict[str, Any]:
    beat = {"site": "SITE-B", "sent_at": time.time(), "version": "0.1.0", "uptime_s": 5,
            "backlog": {"studies": 3, "bytes": 1000, "oldest_age_s": 600.0,
                        "urgent_oldest_age_s": 0.0, "routine_oldest_age_s": 590.0},
            "jobs": {"pending": 3, "running": 0, "failed": 1},
            "disk": {"used_percent": 99.5, "free_bytes": 10},
            "received": {"instances": 7, "bytes": 7000}, "confirmed_instances": 0,
            "cert_days_left": 20.0, "errors": ["job 4 to hub: refused"]}
    beat.update(changes)
    return beat


def test_heartbeat_is_idempotent_and_sortable(fleet: dict[str, Any]) -> None:
    db = _hub_db(fleet["hub"])
    beat = _beat()
    with client(fleet["site_b"]) as http:
        first = http.post("/api/v1/heartbeat", json=beat)
        again = http.post("/api/v1/heartbeat", json=beat)
    assert first.status_code == 201 and first.json() == {"site": "SITE-B", "recorded": True}
    assert again.status_code == 200 and again.json()["recorded"] is False
    assert fleet_store.heartbeat_count(db, "SITE-B") == 1
    viewer: httpx.Client = fleet["viewer"]
    by_disk = viewer.get("/fleet", params={"sort": "disk_used_percent", "dir": "desc"}).text
    assert by_disk.index('data-site="SITE-B"') < by_disk.index('data-site="SITE-A"')
    by_name = viewer.get("/fleet", params={"sort": "site"}).text
    assert by_name.index('data-site="SITE-A"') < by_name.index('data-site="SITE-B"')
    only_b = viewer.get("/fleet", params={"q": "site-b"}).text
    assert 'data-site="SITE-B"' in only_b and 'data-site="SITE-A"' not in only_b
    problems = viewer.get("/fleet", params={"state": "problems"}).text
    assert 'data-site="SITE-B"' in problems
    # SITE-A is a real PAS on this host's disk: sound, but for the file system's figure, over
    # the 85 % the alert rules name on a full CI disk (a run failed so at 85.7 %).
    site_a = next(r for r in site_rows(db) if r["site"] == "SITE-A")
    assert not site_a["errors"] and site_a["failed_jobs"] == 0, site_a
    assert ('data-site="SITE-A"' in problems) == (site_a["disk_used_percent"] > 85), site_a
    none_down = viewer.get("/fleet", params={"state": "down"}).text
    assert "data-site=" not in none_down and "no site" in none_down
    scrape = viewer.get("/metrics").text
    assert metric(scrape, "pas_fleet_site_certificate_days_left", site="SITE-B") == 20.0
    assert metric(scrape, "pas_fleet_site_failed_jobs", site="SITE-B") == 1
    assert metric(scrape, "pas_fleet_site_backlog_oldest_age_seconds", site="SITE-B",
                  priority="routine") == 590.0


def test_a_sites_disk_alert_reaches_the_fleet(fleet: dict[str, Any]) -> None:
    """The site's own disk alert, its heartbeat's first error line (ops/disk_alert.py), is
    read back as ``pas_fleet_site_disk_alert`` (PasSiteDiskAlert, PasSiteRefusingImages):
    a quota refusing C-STOREs on a half-empty disk (12 % here) reached regional ops in no
    figure and no alert. The real daemon's alert into its heartbeat: tests/faults/
    test_disk_full.py."""
    viewer: httpx.Client = fleet["viewer"]
    alerts = {"disk 91.0% used, above the high watermark (90.0%), nothing more may be "
              "evicted (unconfirmed, pinned, within retention or being read)": 1,
              "hard limit: spool 10230 MB of its quota storage.quota_mb=10240: C-STORE "
              "refused with 0xA700": 2}
    with client(fleet["site_b"]) as http:
        for alert, level in alerts.items():
            beat = _beat(disk={"used_percent": 12.0, "free_bytes": 10**12}, jobs={
                "pending": 0, "running": 0, "failed": 0}, errors=[f"disk alert: {alert}"])
            assert http.post("/api/v1/heartbeat", json=beat).status_code == 201
            scrape = viewer.get("/metrics").text
            assert metric(scrape, "pas_fleet_site_disk_alert", site="SITE-B") == level
            assert metric(scrape, "pas_fleet_site_disk_alert", site="SITE-A") == 0
            problems = viewer.get("/fleet", params={"state": "problems"}).text
            assert 'data-site="SITE-B"' in problems and alert in problems
        assert http.post("/api/v1/heartbeat", json=_beat()).status_code == 201
    assert metric(viewer.get("/metrics").text, "pas_fleet_site_disk_alert", site="SITE-B") == 0


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"not json", 422, "Expecting value"),
    (json.dumps(["a list"]).encode(), 422, "must be a JSON object"),
    (json.dumps(_beat(sent_at="yesterday")).encode(), 422, "sent_at: must be a number"),
    (json.dumps(_beat(sent_at=time.time() + 7 * 86400)).encode(), 422,
     "more than a day ahead"),
    (json.dumps({k: v for k, v in _beat().items() if k != "backlog"}).encode(), 422,
     "backlog: must be an object"),
    (json.dumps(_beat(disk={"used_percent": 140})).encode(), 422, "disk.used_percent"),
    (json.dumps(_beat(last_backup_at="yesterday")).encode(), 422,
     "last_backup_at: must be a number"),
    (json.dumps(_beat(site="SITE-A")).encode(), 403, "certificate is for site 'SITE-B'"),
    (b"{" + b" " * 70000 + b"}", 413, "over 65536 bytes"),
    # Python's json reads NaN and Infinity (and 1e999 as infinity); stored, they made the
    # site's row JSON SQLite cannot read: the whole dashboard and /metrics failed.
    (json.dumps(_beat(disk={"used_percent": float("nan")})).encode(), 422,
     "NaN is not a number"),
    (json.dumps(_beat(backlog={"studies": 1, "bytes": 1, "oldest_age_s": float("inf"),
                               "urgent_oldest_age_s": 0})).encode(), 422,
     "Infinity is not a number"),
    (json.dumps(_beat()).replace('"oldest_age_s": 600.0', '"oldest_age_s": 1e999').encode(),
     422, "1e999 is not a finite number"),
    (json.dumps(_beat(extra={"later": float("-inf")})).encode(), 422,
     "-Infinity is not a number"),
    (json.dumps(_beat(backlog={"studies": 10**30, "bytes": 1, "oldest_age_s": 1,
                               "urgent_oldest_age_s": 0})).encode(), 422,
     "backlog.studies: must be at most"),
    (json.dumps(_beat(backlog={"studies": 1, "bytes": 1, "oldest_age_s": 1,
                               "urgent_oldest_age_s": 0, "routine_oldest_age_s": "soon"})
                ).encode(), 422, "backlog.routine_oldest_age_s: must be a number"),
    (json.dumps(_beat(version="1." + "9" * 200)).encode(), 422,
     "version: at most 64 printable characters"),
    (json.dumps(_beat(version="1.0\n# HELP fake")).encode(), 422,
     "version: at most 64 printable characters"),
    (json.dumps(_beat(errors=["refused"] * 1000)).encode(), 422, "errors: at most 20"),
    (json.dumps(_beat(errors=["x" * 5000])).encode(), 422, "errors[0]: at most 2000"),
])
def test_bad_heartbeat_refused_nothing_changed(fleet: dict[str, Any], body: bytes, status: int,
                                               words: str) -> None:
    db = _hub_db(fleet["hub"])
    before = copy.deepcopy(fleet_store.site_status(db, "SITE-B"))
    count = fleet_store.heartbeat_count(db, "SITE-B")
    with client(fleet["site_b"]) as http:
        answer = http.post("/api/v1/heartbeat", content=body,
                           headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]
    assert fleet_store.heartbeat_count(db, "SITE-B") == count
    assert fleet_store.site_status(db, "SITE-B") == before
    assert fleet["viewer"].get("/fleet").status_code == 200


def test_a_sites_non_numbers_leave_the_fleet_view_up(fleet: dict[str, Any]) -> None:
    """One site's heartbeat with NaN (Python's json writes it for a float nan, and reads it)
    made the hub's /fleet answer 500 and /metrics drop the connection, for every site: the
    stored row was JSON SQLite's json_extract refuses. Refused now; the view stays up."""
    db = _hub_db(fleet["hub"])
    count = fleet_store.heartbeat_count(db, "SITE-B")
    answers = []
    with client(fleet["site_b"]) as http:
        for beat in (_beat(disk={"used_percent": float("nan"), "free_bytes": 1}),
                     _beat(backlog={"studies": 1, "bytes": 1, "oldest_age_s": 1,
                                    "urgent_oldest_age_s": 0,
                                    "routine_oldest_age_s": float("inf")}),
                     _beat(uptime_s=float("nan"))):
            answers.append(http.post("/api/v1/heartbeat", content=json.dumps(beat).encode(),
                                     headers={"content-type": "application/json"}))
    viewer: httpx.Client = fleet["viewer"]
    for params in ({}, {"state": "problems"}, {"sort": "backlog_oldest_s"}):
        page = viewer.get("/fleet", params=params)
        assert page.status_code == 200, page.text
        assert 'data-site="SITE-B"' in page.text
    assert viewer.get("/fleet/sites/SITE-B").status_code == 200
    # The hub's root leads to the fleet (it was a 404).
    root = viewer.get("/", follow_redirects=False)
    assert (root.status_code, root.headers["location"]) == (307, "/fleet")
    scrape = viewer.get("/metrics")
    assert scrape.status_code == 200
    assert metric(scrape.text, "pas_fleet_site_up", site="SITE-A") == 1
    assert metric(scrape.text, "pas_fleet_sites") == 2
    assert [a.status_code for a in answers] == [422, 422, 422], [a.text for a in answers]
    assert fleet_store.heartbeat_count(db, "SITE-B") == count


def test_heartbeat_without_client_certificate_is_refused(fleet: dict[str, Any]) -> None:
    hub: HubProcess = fleet["hub"]
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context()) as anonymous:
        assert anonymous.post("/api/v1/heartbeat", json=_beat()).status_code == 401


def test_silent_site_shows_down(fleet: dict[str, Any]) -> None:
    rows = site_rows(_hub_db(fleet["hub"]), at=time.time() + 301)
    assert {r["site"]: r["state"] for r in rows} == {"SITE-A": "down", "SITE-B": "down"}
    html = render_dashboard(rows, "site", False, "", "down")
    assert html.count('class="state down">down<') == 2


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.update({family.name, f"{family.name}_total"})
        names.update(sample.name for sample in family.samples)
    return names


def test_monitoring_files_name_only_exported_metrics(fleet: dict[str, Any]) -> None:
    from tests.test_ops_monitoring import referenced_metric_names

    pas: PasProcess = fleet["pas"]
    exported = exported_names(fleet["viewer"].get("/metrics").text)
    exported |= exported_names(httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics",
                                         timeout=10).text)
    referenced = referenced_metric_names()
    assert len(referenced) >= 15
    assert referenced <= exported, sorted(referenced - exported)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium through Debian's chromedriver (Selenium, no downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="pas-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}",
                 # The hub's certificate comes from the fleet's private CA; the test does not
                 # install that CA into a browser profile.
                 "--ignore-certificate-errors"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _shot(driver: Any, name: str, tmp_path: Path) -> None:
    """Screenshots go to docs/img/ when PAS_UPDATE_SCREENSHOTS=1, else to the test's folder."""
    folder = ROOT / "docs" / "img" if os.environ.get("PAS_UPDATE_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], min(max(height, 400), 1600))
    assert driver.save_screenshot(str(folder / name))


def test_browser_status_page_on_a_phone(fleet: dict[str, Any], browser: Any,
                                        tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    pas: PasProcess = fleet["pas"]
    browser.set_window_size(412, 915)
    browser.get(f"http://127.0.0.1:{pas.http_port}/")
    assert browser.title == "PAS SITE-A"  # the enrolled site's name
    assert browser.find_element(By.CSS_SELECTOR, "#link .state").text.startswith("up")
    rows = browser.find_elements(By.CSS_SELECTOR, "#studies tr[data-study-uid]")
    assert len(rows) == 1
    assert rows[0].find_element(By.CSS_SELECTOR, ".state").text == "confirmed"
    assert f"{len(FILES)}/{len(FILES)}" in rows[0].text
    assert browser.find_element(By.ID, "backlog").text.startswith("Backlog\n0 studies")
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow} px wider than a phone screen"
    table_overflow = browser.execute_script(
        "const t = document.getElementById('studies');"
        "return t.scrollWidth - t.parentElement.clientWidth")
    assert table_overflow <= 0, f"studies table needs {table_overflow} px of sideways scrolling"
    _shot(browser, "status-page.png", tmp_path)


def test_browser_fleet_dashboard_and_site_page(fleet: dict[str, Any], browser: Any,
                                               tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    hub: HubProcess = fleet["hub"]
    browser.set_window_size(1280, 800)
    browser.get(f"{hub.url}/fleet")
    sites = [r.get_attribute("data-site")
             for r in browser.find_elements(By.CSS_SELECTOR, "#fleet tr[data-site]")]
    assert sites == ["SITE-A", "SITE-B"]
    assert browser.execute_script(  # the policy lets the page's own stylesheet apply
        "return getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)"
    browser.find_element(By.LINK_TEXT, "disk %").click()  # sort by disk, fullest first
    sites = [r.get_attribute("data-site")
             for r in browser.find_elements(By.CSS_SELECTOR, "#fleet tr[data-site]")]
    assert sites == ["SITE-B", "SITE-A"]
    row_a = browser.find_element(By.CSS_SELECTOR, 'tr[data-site="SITE-A"]')
    assert row_a.find_element(By.CSS_SELECTOR, ".state").text == "up"
    assert row_a.find_element(By.CSS_SELECTOR, ".backlog").text == "0"
    _shot(browser, "fleet-dashboard.png", tmp_path)
    row_a.find_element(By.LINK_TEXT, "SITE-A").click()
    assert browser.find_element(By.TAG_NAME, "h1").text == "SITE-A"
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg polyline")) == 2
    assert f"{len(FILES)} instances received" in browser.find_element(By.ID, "facts").text
    _shot(browser, "fleet-site.png", tmp_path)


def test_browser_runs_no_script_a_site_sends(fleet: dict[str, Any], browser: Any) -> None:
    """A compromised site controls its heartbeat's version and error strings: the dashboard
    and the site page show them as text and run nothing (each would set the title)."""
    from selenium.webdriver.common.by import By

    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    beat = _beat(version="1.0'\"><script>document.title='pwned'</script>",
                 errors=[hostile, "x\" onmouseover=\"document.title='pwned'"])
    with client(fleet["site_b"]) as http:
        assert http.post("/api/v1/heartbeat", json=beat).status_code == 201
    hub: HubProcess = fleet["hub"]
    for path in ("/fleet", "/fleet/sites/SITE-B"):
        browser.get(hub.url + path)
        wait_for(lambda: browser.execute_script("return document.readyState") == "complete",
                 20, what=f"{path} loaded")
        assert browser.title in ("PAS fleet", "PAS SITE-B"), path
        assert "<script>document.title='pwned'</script>" in browser.find_element(
            By.TAG_NAME, "body").text
    browser.get(hub.url + "/fleet")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-site="SITE-B"]')
    assert hostile in row.text and not row.find_elements(By.TAG_NAME, "img")


def test_each_sites_last_backup_on_the_dashboard_and_in_metrics(fleet: dict[str, Any],
                                                                browser: Any) -> None:
    """The heartbeat's ``last_backup_at``: the dashboard's "last backup" column, warned past
    two days, and ``pas_fleet_site_backup_age_seconds`` for the alert rule. A newer
    appliance's field this hub does not know is ignored; an older appliance's heartbeat
    without the field is accepted and shows "-", with no gauge."""
    from selenium.webdriver.common.by import By

    hub: HubProcess = fleet["hub"]
    pas: PasProcess = fleet["pas"]
    db = _hub_db(hub)

    def cells() -> dict[str, tuple[str, str]]:
        browser.get(f"{hub.url}/fleet")
        return {site: (cell.text, cell.get_attribute("class")) for site in ("SITE-A", "SITE-B")
                for cell in [browser.find_element(
                    By.CSS_SELECTOR, f'tr[data-site="{site}"] td.backup')]}

    # SITE-A, a real daemon: the backup written now is in its next heartbeat.
    destination = fleet["root"] / "backups"
    destination.mkdir()
    pas.cli("backup", str(destination), "--json")
    written_at = pas.status()["backup"]["last_at"]
    wait_for(lambda: fleet_store.site_status(db, "SITE-A").get("last_backup_at") == written_at,
             10, what="the backup's time in SITE-A's heartbeat")
    # SITE-B: three days since its backup, and a field of a later version this hub ignores.
    with client(fleet["site_b"]) as http:
        answer = http.post("/api/v1/heartbeat", json=_beat(
            last_backup_at=time.time() - 3 * 86400, field_of_a_later_version={"x": [1]}))
    assert answer.status_code == 201, answer.text
    assert cells() == {"SITE-A": ("0 min ago", "backup"), "SITE-B": ("3 days ago", "backup warn")}
    scrape = fleet["viewer"].get("/metrics").text
    assert metric(scrape, "pas_fleet_site_backup_age_seconds", site="SITE-A") < 60  # type: ignore[operator]
    age_b = metric(scrape, "pas_fleet_site_backup_age_seconds", site="SITE-B")
    assert age_b is not None and 3 * 86400 <= age_b < 3 * 86400 + 60
    # An older appliance's heartbeat, without the field: accepted, not reported, no gauge.
    with client(fleet["site_b"]) as http:
        answer = http.post("/api/v1/heartbeat", json=_beat(sent_at=time.time() + 1))
    assert answer.status_code == 201, answer.text
    assert cells()["SITE-B"] == ("-", "backup")
    scrape = fleet["viewer"].get("/metrics").text
    assert metric(scrape, "pas_fleet_site_backup_age_seconds", site="SITE-B") is None


def _backlog(studies: int) -> dict[str, Any]:
    return {"studies": studies, "bytes": 1000, "oldest_age_s": 60.0, "urgent_oldest_age_s": 0.0,
            "routine_oldest_age_s": 60.0}


def test_a_site_whose_clock_is_set_back_is_not_frozen(fleet: dict[str, Any]) -> None:
    """The site's row moved only forward in sent_at (the appliance's clock): once a site's
    clock, an hour ahead, was put right, none of its heartbeats updated the row for an hour
    (each recorded in the history, 201): the dashboard kept the old figures and its last
    seen, and showed the site down after 5 minutes while it sent every 30 s. A heartbeat
    that is merely late (sent before the newest one, delivered after) still changes nothing."""
    db = _hub_db(fleet["hub"])
    with client(fleet["site_b"]) as http:
        ahead = http.post("/api/v1/heartbeat", json=_beat(sent_at=time.time() + 3600,
                                                          backlog=_backlog(9)))
        assert ahead.status_code == 201, ahead.text
        fixed_at = time.time()
        fixed = http.post("/api/v1/heartbeat", json=_beat(sent_at=fixed_at,
                                                          backlog=_backlog(4)))
        assert fixed.status_code == 201, fixed.text
        status = fleet_store.site_status(db, "SITE-B")
        assert status is not None
        assert (status["sent_at"], status["backlog"]["studies"]) == (fixed_at, 4)
        assert status["last_seen_at"] >= fixed_at
        late = http.post("/api/v1/heartbeat", json=_beat(sent_at=fixed_at - 5,
                                                         backlog=_backlog(7)))
        assert late.status_code == 201, late.text  # in the history, not the latest state
    status = fleet_store.site_status(db, "SITE-B")
    assert status is not None and status["backlog"]["studies"] == 4
    page = fleet["viewer"].get("/fleet").text
    row = page[page.index('<tr data-site="SITE-B">'):]
    assert "<td class=backlog>4</td>" in row[:row.index("</tr>")]


def test_site_page_stays_bounded_with_a_day_of_one_second_heartbeats(
        fleet: dict[str, Any]) -> None:
    """ops.heartbeat_interval_s may be 1 (and a site may post faster): the site page drew
    every heartbeat of 24 h, 86,400 points per chart, a 1.9 MB page every 30 s refresh. The
    charts hold at most one point a minute. The table here is what an older hub kept (a row
    per heartbeat): the page reads each minute's newest rows only (store.SLOT_ROWS), so its
    count is theirs; the history this hub writes keeps every count and maximum in its rows
    (tests/test_hub_fleet_bound.py)."""
    db = _hub_db(fleet["hub"])
    with client(fleet["site_b"]) as http:
        assert http.post("/api/v1/heartbeat", json=_beat()).status_code == 201
    start = time.time() - 86400 + 60
    with db.transaction() as conn:  # a day of history as a 1 s heartbeat leaves it
        conn.executemany(
            "INSERT OR IGNORE INTO fleet_heartbeats (site, sent_at, received_at, "
            "backlog_studies, backlog_oldest_s, disk_used_percent, received_bytes, "
            "received_instances, failed_jobs) VALUES ('SITE-B', ?, ?, ?, 1.0, 50.0, ?, ?, 0)",
            [(start + i, start + i, 77 if i == 5000 else i % 50, i * 1000, i)
             for i in range(86400 - 120)])
    beats = len(fleet_store.history(db, "SITE-B", time.time() - 86400))
    assert beats >= 86400 - 120
    page = fleet["viewer"].get("/fleet/sites/SITE-B")
    assert page.status_code == 200
    assert len(page.content) < 150_000, len(page.content)
    charts = page.text.split('points="')[1:]
    assert len(charts) == 2
    assert all(len(chart[:chart.index('"')].split()) <= 1441 for chart in charts)
    shown = int(page.text.split(" heartbeats in 24 h")[0].rsplit("· ", 1)[1].replace(",", ""))
    assert 1440 <= shown <= 1441 * fleet_store.SLOT_ROWS, shown


def test_files_missing_at_a_site_reach_the_fleet(uploaded: dict[str, Any]) -> None:
    """A file of SITE-A's spool removed (a lost disk, a file deleted by hand) and flagged by
    pas verify: its heartbeats say how many, and the hub exports it per site
    (pas_fleet_site_files_missing, PasSiteFilesMissing). Regional ops, who scrape only the
    hub, had nothing saying why the site's retrieves were served partly. Put back and
    verified again, the site is clean again (the tests after this one need it so)."""
    pas: PasProcess = uploaded["pas"]
    viewer: httpx.Client = uploaded["viewer"]
    url = f"http://127.0.0.1:{pas.http_port}/metrics"

    def fleet_says() -> float | None:
        return metric(viewer.get("/metrics").text, "pas_fleet_site_files_missing",
                      site="SITE-A")

    assert fleet_says() == 0
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    [(relative,)] = conn.execute("SELECT path FROM instances ORDER BY id LIMIT 1").fetchall()
    conn.close()
    spool_file = pas.home / "spool" / relative
    kept = uploaded["root"] / "kept.dcm"
    spool_file.rename(kept)
    try:
        flagged = pas.cli("verify", check=False)
        assert flagged.returncode == 1, flagged.stdout + flagged.stderr
        assert metric(httpx.get(url, timeout=10).text, "pas_spool_files_missing") == 1
        wait_for(lambda: fleet_says() == 1, 30, interval=0.2,
                 what="SITE-A's heartbeat saying 1 file missing")
        page = viewer.get("/fleet").text
        row = page[page.index('<tr data-site="SITE-A">'):]
        assert "1 file missing from the spool" in row[:row.index("</tr>")]
        problems = viewer.get("/fleet", params={"state": "problems"}).text
        assert 'data-site="SITE-A"' in problems
    finally:
        kept.rename(spool_file)
    clean = pas.cli("verify", check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    wait_for(lambda: fleet_says() == 0, 30, interval=0.2,
             what="SITE-A's heartbeat with no file missing")


def test_files_damaged_at_a_site_reach_the_fleet(uploaded: dict[str, Any]) -> None:
    """A file of SITE-A's spool whose bytes changed (one flipped), found by pas verify: the
    site's heartbeat says it, and the hub's fleet page shows it (only missing files were
    said). Put back and verified again, the site is clean again."""
    pas: PasProcess = uploaded["pas"]
    viewer: httpx.Client = uploaded["viewer"]

    def row() -> str:
        page = viewer.get("/fleet").text
        found = page[page.index('<tr data-site="SITE-A">'):]
        return found[:found.index("</tr>")]

    conn = sqlite3.connect(pas.home / "pas.sqlite")
    [(relative,)] = conn.execute("SELECT path FROM instances ORDER BY id LIMIT 1").fetchall()
    conn.close()
    spool_file = pas.home / "spool" / relative
    original = spool_file.read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    spool_file.write_bytes(bytes(damaged))
    try:
        flagged = pas.cli("verify", check=False)
        assert flagged.returncode == 1, flagged.stdout + flagged.stderr
        wait_for(lambda: "1 file damaged in the spool" in row(), 30, interval=0.2,
                 what="SITE-A's heartbeat saying 1 file damaged")
        assert metric(viewer.get("/metrics").text, "pas_fleet_site_files_damaged",
                      site="SITE-A") == 1
    finally:
        # The daemon's scrub may have set the damaged copy aside meanwhile: written back.
        spool_file.write_bytes(original)
    clean = pas.cli("verify", check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    wait_for(lambda: "damaged" not in row() and "missing" not in row(), 30, interval=0.2,
             what="SITE-A's heartbeat with no file damaged")
    assert metric(viewer.get("/metrics").text, "pas_fleet_site_files_damaged",
                  site="SITE-A") == 0


def test_a_revoked_site_leaves_the_fleet_alerts(fleet: dict[str, Any]) -> None:
    """pas hub revoke SITE (a site closed, or a stolen appliance) refuses its certificate,
    but its row stayed as any site's: "down" five minutes later, for ever, with its
    pas_fleet_site_* series (PasSiteSilent firing, critical, until someone edited the
    hub's database). It is shown as revoked, not a problem, and has no series."""
    hub: HubProcess = fleet["hub"]
    closed = enroll(hub, fleet["root"] / "site-c", "SITE-C")
    with client(closed) as http:
        assert http.post("/api/v1/heartbeat", json=_beat(site="SITE-C")).status_code == 201
    viewer: httpx.Client = fleet["viewer"]
    assert metric(viewer.get("/metrics").text, "pas_fleet_site_up", site="SITE-C") == 1
    hub.cli("revoke", "SITE-C")
    with client(closed) as http:
        assert http.post("/api/v1/heartbeat", json=_beat(site="SITE-C")).status_code == 403
    # Run again: done already (exit 0, said so); a name never enrolled (a typo): exit 1.
    # Both said "no valid certificate of site ... to revoke", exit 1.
    again = hub.cli("revoke", "SITE-C")
    assert "site SITE-C: every certificate already revoked (the last on " in again.stdout
    typo = hub.cli("revoke", "SITE-c", check=False)
    assert typo.returncode == 1 and "no site 'SITE-c' was ever enrolled on this hub" in \
        " ".join(typo.stderr.split()), typo.stderr
    scrape = viewer.get("/metrics").text
    for name in ("pas_fleet_site_up", "pas_fleet_site_last_seen_timestamp_seconds",
                 "pas_fleet_site_failed_jobs", "pas_fleet_site_disk_used_ratio"):
        assert metric(scrape, name, site="SITE-C") is None, name
    assert metric(scrape, "pas_fleet_site_up", site="SITE-A") == 1
    page = viewer.get("/fleet").text
    row = page[page.index('<tr data-site="SITE-C">'):]
    assert 'class="state revoked">revoked<' in row[:row.index("</tr>")]
    problems = viewer.get("/fleet", params={"state": "problems"}).text
    assert 'data-site="SITE-C"' not in problems
    rows = {r["site"]: r for r in site_rows(_hub_db(hub), at=time.time() + 3600)}
    assert rows["SITE-C"]["state"] == "revoked" and not has_problem(rows["SITE-C"])


def test_a_site_enrolled_that_never_sends_a_heartbeat_is_shown_and_goes_down(
        fleet: dict[str, Any]) -> None:
    """A site enrolled whose appliance never came up (or cannot reach the hub) was on no
    page and in no series, while ``pas hub sites`` listed its certificate: never shown down,
    PasSiteSilent never fired, and its page was a 404 "unknown site". It is shown
    ``enrolled``, exported (last seen: its enrolment), and down five minutes after it."""
    hub: HubProcess = fleet["hub"]
    quiet = enroll(hub, fleet["root"] / "site-q", "SITE-Q")
    viewer: httpx.Client = fleet["viewer"]
    page = viewer.get("/fleet").text
    row = page[page.index('<tr data-site="SITE-Q">'):]
    assert 'class="state enrolled">enrolled<' in row[:row.index("</tr>")]
    own = viewer.get("/fleet/sites/SITE-Q")
    assert own.status_code == 200 and "no heartbeat yet" in own.text, own.text
    scrape = viewer.get("/metrics").text
    assert metric(scrape, "pas_fleet_site_up", site="SITE-Q") == 0
    issued = _hub_db(hub).query_one("SELECT min(issued_at) AS at FROM certificates "
                                    "WHERE site = 'SITE-Q'")["at"]
    assert metric(scrape, "pas_fleet_site_last_seen_timestamp_seconds",
                  site="SITE-Q") == pytest.approx(issued)
    later = {r["site"]: r for r in site_rows(_hub_db(hub), at=time.time() + 400)}
    assert later["SITE-Q"]["state"] == "down" and has_problem(later["SITE-Q"])
    assert later["SITE-Q"]["errors"][0].startswith("no heartbeat since its enrolment")
    # Its first heartbeat, with more errors than the table shows: each whole on its page.
    errors = [f"job {n} to hub: " + "refused " * 40 for n in range(3)]
    with client(quiet) as http:
        assert http.post("/api/v1/heartbeat",
                         json=_beat(site="SITE-Q", errors=errors)).status_code == 201
    page = viewer.get("/fleet").text
    row = page[page.index('<tr data-site="SITE-Q">'):]
    row = row[:row.index("</tr>")]
    assert 'class="state up">up<' in row and "(3 errors: the site's page has them all)" in row
    own = viewer.get("/fleet/sites/SITE-Q").text
    assert all(f"<li>{error}</li>" in own for error in errors) and "failed jobs 1" in own
    hub.cli("revoke", "SITE-Q")  # the module's later tests count the sites they made


def _received_total(text: str, name: str) -> float:
    """The sum of a per-calling-AE counter over every AE."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


def test_received_figures_keep_counting_after_eviction(fleet: dict[str, Any]) -> None:
    """The heartbeat's ``received`` is what the site received (the hub's page: "N instances
    received", and its throughput chart from the deltas), as ``pas_received_*_total``: a
    purge of the confirmed study must not take it back. It sent the cache's content
    (instance_totals), which eviction lowers: 0 instances received after the purge."""
    import pydicom

    pas: PasProcess = fleet["pas"]
    db = _hub_db(fleet["hub"])
    study = str(pydicom.dcmread(FILES[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: (fleet_store.site_status(db, "SITE-A") or {}).get("confirmed_instances")
             == len(FILES), 90, what="the study confirmed in a heartbeat")
    sent_bytes = pas.status()["bytes"]  # as filed (the files' meta written by PAS)
    pas.cli("cache", "purge", study)  # confirmed: evictable without --force
    assert pas.status()["files"] == 0
    scrape = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    assert _received_total(scrape, "pas_received_instances_total") == len(FILES)
    assert _received_total(scrape, "pas_received_bytes_total") == sent_bytes
    purged_at = time.time()
    wait_for(lambda: (fleet_store.site_status(db, "SITE-A") or {}).get("sent_at", 0)
             > purged_at + 1, 20, what="a heartbeat sent after the purge")
    status = fleet_store.site_status(db, "SITE-A")
    assert status is not None
    assert status["received"] == {"instances": len(FILES), "bytes": sent_bytes}
    assert status["confirmed_instances"] == 0  # the cache's figure: nothing left to confirm
    page = fleet["viewer"].get("/fleet/sites/SITE-A").text
    assert f"{len(FILES)} instances received" in page


def test_a_sites_tls_certificates_to_renew_reach_the_fleet(fleet: dict[str, Any],
                                                         tmp_path: Path) -> None:
    """A site's TLS certificate expired or expiring within 30 days (its heartbeat's error
    lines, ops/certificates.py, built here from real files) is read back as
    ``pas_fleet_site_tls_certificate_days_left{site, certificate}`` (PasSiteTlsCertificate
    Expiring / Expired), one sample per setting however often a heartbeat says it, and puts
    the site among the problems. The daemon's own lines: tests/test_ops_certificates.py."""
    from appliance.config import load_settings
    from appliance.ops import certificates
    from tests.faults.pki import self_signed

    pki = tmp_path / "pki"
    self_signed(pki, "soon", 12)
    self_signed(pki, "long", 400)
    expired = self_signed(pki, "expired", -3)
    settings = load_settings(environ={
        "PAS_HOME": str(tmp_path / "home"), "PAS_DICOM__TLS__ENABLED": "true",
        "PAS_DICOM__TLS__CERT": str(pki / "long.crt"), "PAS_DICOM__TLS__KEY": str(pki / "long.key"),
        "PAS_DICOM__TLS__CA": str(expired), "PAS_HL7__TLS__ENABLED": "true",
        "PAS_HL7__TLS__CERT": str(pki / "soon.crt"), "PAS_HL7__TLS__KEY": str(pki / "soon.key"),
        "PAS_HL7__TLS__CA": str(pki / "long.crt")})
    said = certificates.heartbeat_errors(settings)
    assert [line.split(":")[0] for line in said] == ["TLS certificate dicom.tls.ca",
                                                     "TLS certificate hl7.tls.cert"], said
    viewer: httpx.Client = fleet["viewer"]
    # A site of its own: SITE-B's heartbeats, posted by the module's other tests, take the
    # hub's burst for a site (hub/fleet_gate.py).
    site_d = enroll(fleet["hub"], fleet["root"] / "site-d", "SITE-D")
    with client(site_d) as http:
        beat = _beat(site="SITE-D", errors=[*said, said[0]])  # said twice: still one sample
        assert http.post("/api/v1/heartbeat", json=beat).status_code == 201
        scrape = viewer.get("/metrics").text
        name = "pas_fleet_site_tls_certificate_days_left"
        expired_days = metric(scrape, name, site="SITE-D", certificate="dicom.tls.ca")
        soon_days = metric(scrape, name, site="SITE-D", certificate="hl7.tls.cert")
        assert expired_days is not None and abs(expired_days + 3) <= 0.1, scrape
        assert soon_days is not None and abs(soon_days - 12) <= 0.1, scrape
        assert scrape.count(f'{name}{{certificate="dicom.tls.ca",site="SITE-D"}}') == 1, scrape
        assert metric(scrape, name, site="SITE-A", certificate="dicom.tls.ca") is None
        problems = viewer.get("/fleet", params={"state": "problems"}).text
        assert 'data-site="SITE-D"' in problems and "expires in 12.0 days" in problems
        assert http.post("/api/v1/heartbeat", json=_beat(site="SITE-D")).status_code == 201
    assert metric(viewer.get("/metrics").text, name, site="SITE-D",
                  certificate="hl7.tls.cert") is None


def test_link_goes_down_when_the_hub_stops(fleet: dict[str, Any]) -> None:
    pas: PasProcess = fleet["pas"]
    fleet["hub"].kill()  # the hub vanishes (power cut, WAN cut): no goodbye
    url = f"http://127.0.0.1:{pas.http_port}/metrics"
    wait_for(lambda: metric(httpx.get(url, timeout=10).text, "pas_hub_link_up") == 0, 20,
             what="pas_hub_link_up 0")
    page = httpx.get(f"http://127.0.0.1:{pas.http_port}/", timeout=10).text
    assert 'class="state down">down: hub unreachable' in page
    code, checks = _doctor(pas)
    assert code == 1
    assert checks["hub"]["verdict"] == "fail" and "cannot reach" in checks["hub"]["detail"]
    # Refused: the hub's host answers, nothing listens (it said "check ... DNS").
    assert checks["hub"]["detail"].endswith("(the hub's host answered but nothing listens on "
                                            "that port)"), checks["hub"]
    assert checks["hub"]["fix"] == ("the hub is stopped, or a firewall rejects the port: ask "
                                    "regional ops")
