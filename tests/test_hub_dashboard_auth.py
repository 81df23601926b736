"""The hub's fleet dashboard and /metrics behind a user name and password (HTTP Basic).

The dashboard and ``/metrics`` answered anyone who reached the hub's port (every site of
the region does, by design): each site's name, backlog, disk, version and error lines.
With ``dashboard.auth = "basic"`` they need a user of ``dashboard.users`` with its password
(the hash made by the real ``pas hub password``); the sites' routes, enrolment and
``/healthz`` are untouched, and a site's client certificate does not open the dashboard.
Asserted on a real ``pas hub run`` over its TLS, with httpx and a headless Chromium.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.config import ConfigError
from appliance.hub.config import ineffective_settings, load_hub_settings, open_dashboard
from appliance.hub.dashboard_auth import (
    FAILURES_PER_MINUTE,
    DashboardGuard,
    DashboardRefusals,
    guarded,
    hash_password,
    parse_hash,
    password_matches,
    source_key,
)
from tests.support.browser import chromium
from tests.support.hub import HubProcess, client, enroll
from tests.support.peers import run_pas
from tests.test_hub_refused_sites import _beat
from tests.test_ops_fleet import metric

PASSWORD = "correct horse battery staple"


def _hash_line(name: str, password: str) -> subprocess.CompletedProcess[str]:
    return run_pas(["hub", "password", name], input=f"{password}\n", timeout=60)


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("dashboard")
    made = _hash_line("ops", PASSWORD)
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip()
    assert line.startswith('"ops" = "scrypt$') and PASSWORD not in line
    process = HubProcess(root / "hub").init()
    (process.home / "hub.toml").write_text(f'[dashboard]\nauth = "basic"\n\n'
                                           f"[dashboard.users]\n{line}\n")
    process.start()
    started = time.monotonic()
    try:
        site = enroll(process, root / "site", "CHU-NORD")
        with client(site) as http:  # a site's heartbeat: its client certificate, no password
            answer = http.post("/api/v1/heartbeat", json=_beat(studies=3))
            assert answer.status_code == 201, answer.text
        with httpx.Client(base_url=process.url, timeout=60,
                          verify=process.anonymous_context()) as http:
            yield {"hub": process, "site": site, "started": started, "http": http}
    finally:
        # After the client's close: the hub's stop waits up to its 5 s grace for a TLS
        # connection left open, idle, whose peer never answers its close_notify.
        process.stop()


@pytest.mark.parametrize("path", ["/", "/fleet", "/fleet/sites/CHU-NORD", "/metrics"])
def test_the_dashboard_and_metrics_need_a_password(hub: dict[str, Any], path: str) -> None:
    http: httpx.Client = hub["http"]
    refused = http.get(path)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Basic realm="PAS hub", charset="UTF-8"'
    assert "user name and password" in refused.json()["detail"]
    assert "CHU-NORD" not in refused.text
    let_in = http.get(path, headers=_basic("ops", PASSWORD), follow_redirects=True)
    assert let_in.status_code == 200
    if path == "/metrics":
        assert metric(let_in.text, "pas_fleet_site_backlog_studies", site="CHU-NORD") == 3
    else:
        assert "CHU-NORD" in let_in.text


def test_a_wrong_password_or_an_unknown_user_is_refused_alike(hub: dict[str, Any]) -> None:
    http: httpx.Client = hub["http"]
    for user, password in (("ops", "wrong password!"), ("nobody", PASSWORD),
                           ("ops", PASSWORD.upper()), ("ops", ""), ("OPS", PASSWORD)):
        wrong = http.get("/fleet", headers=_basic(user, password))
        assert wrong.status_code == 401
        assert wrong.json()["detail"] == "unknown user name or wrong password"
        assert "CHU-NORD" not in wrong.text
    garbled = http.get("/fleet", headers={"Authorization": "Basic not-base64!"})
    assert garbled.status_code == 401


def test_the_sites_routes_enrolment_and_health_need_no_password(hub: dict[str, Any]) -> None:
    http: httpx.Client = hub["http"]
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/enroll/ca").text.startswith("-----BEGIN CERTIFICATE-----")
    with client(hub["site"]) as site:
        assert site.get("/api/v1/whoami").json() == {"site": "CHU-NORD"}
        assert site.post("/api/v1/heartbeat", json=_beat(studies=4)).status_code == 201
        # A site's certificate (the same fleet CA) does not open the dashboard: one site's
        # box would read every other site's state.
        assert site.get("/fleet").status_code == 401
        assert site.get("/metrics").status_code == 401
    document = http.get("/openapi.json").json()
    assert document["paths"]["/fleet"]["get"]["security"] == [{"basicAuth": []}]
    assert document["paths"]["/api/v1/heartbeat"]["post"]["security"] == [{"mutualTLS": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_refusals_are_counted_and_logged_once_a_minute_per_address(hub: dict[str, Any]) -> None:
    http: httpx.Client = hub["http"]
    process: HubProcess = hub["hub"]
    before = http.get("/metrics", headers=_basic("ops", PASSWORD)).text
    for _ in range(3):
        assert http.get("/fleet", headers={"Authorization": "Bearer abc"}).status_code == 401
    for _ in range(12):
        assert http.get("/metrics").status_code == 401
    after = http.get("/metrics", headers=_basic("ops", PASSWORD)).text
    name = "pas_hub_dashboard_refused_total"
    for reason, more in (("not-basic", 3), ("no-credentials", 12)):
        assert (metric(after, name, reason=reason) or 0) - (
            metric(before, name, reason=reason) or 0) == more
    assert metric(after, name, reason="too-many-failures") is not None  # 0 before any
    log = process.log()
    lines = [line for line in log.splitlines() if "dashboard: refused GET" in line]
    assert lines and "from 127.0.0.1" in lines[0], log
    # One line for the first refusal from the address, then one a minute at most, not one
    # per request (15 in this test alone).
    minutes = int((time.monotonic() - hub["started"]) // 60)
    assert len(lines) <= 1 + minutes, lines
    assert "open_dashboard" not in log and "answer anyone" not in log  # auth is on


def test_a_browser_reads_the_fleet_with_the_password_and_not_without(
        hub: dict[str, Any]) -> None:
    process: HubProcess = hub["hub"]
    profile = tempfile.mkdtemp(prefix="pas-chromium-")
    browser = chromium(profile, ignore_certificate_errors=True)
    try:
        browser.get(f"{process.url}/fleet")  # headless: the sign-in prompt is cancelled
        assert "CHU-NORD" not in browser.page_source
        host = process.url.removeprefix("https://")
        browser.get(f"https://ops:{PASSWORD.replace(' ', '%20')}@{host}/fleet")
        assert 'data-site="CHU-NORD"' in browser.page_source
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_too_many_failures_from_one_address_are_answered_429_even_sent_at_once(
        tmp_path: Path) -> None:
    """Guesses sent at once on parallel connections are all counted before any is hashed:
    at most 10 are checked (401), the others refused unchecked (429, or 503 while two checks
    run), and then the right password too, for the minute. Whatever address each says it
    comes from in X-Forwarded-For (a security review, 2026-12-07)."""
    line = _hash_line("ops", PASSWORD).stdout.strip()
    process = HubProcess(tmp_path / "hub").init()
    (process.home / "hub.toml").write_text(f'[dashboard]\nauth = "basic"\n\n'
                                           f"[dashboard.users]\n{line}\n")
    process.start()
    try:
        async def guesses() -> list[int]:
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(base_url=process.url, limits=limits, timeout=60,
                                         verify=process.anonymous_context()) as http:
                # Each naming another address: a forwarder's header is not believed (uvicorn
                # believed it from loopback, and no guess was ever limited).
                answers = await asyncio.gather(*(
                    http.get("/fleet", headers={**_basic("ops", f"a guess at it {i}"),
                                                "X-Forwarded-For": f"198.18.0.{i + 1}"})
                    for i in range(40)))
            return [answer.status_code for answer in answers]

        statuses = asyncio.run(guesses())
        assert set(statuses) <= {401, 429, 503}, statuses
        assert 1 <= statuses.count(401) <= FAILURES_PER_MINUTE, statuses
        assert statuses.count(429) + statuses.count(503) >= 40 - FAILURES_PER_MINUTE
        with httpx.Client(base_url=process.url, verify=process.anonymous_context(),
                          timeout=60) as http:
            for _ in range(FAILURES_PER_MINUTE - statuses.count(401)):  # the rest of 10
                assert http.get("/fleet", headers=_basic("ops", "one more")).status_code == 401
            blocked = http.get("/fleet", headers=_basic("ops", PASSWORD))
            assert blocked.status_code == 429  # even the right one, for the minute
            assert blocked.headers["retry-after"] == "60"
            assert "failed sign-ins from this address" in blocked.json()["detail"]
            assert http.get("/healthz").status_code == 200  # the hub serves on
            with client(enroll(process, tmp_path / "site", "CHU-SUD")) as site:
                assert site.get("/api/v1/whoami").json() == {"site": "CHU-SUD"}
        log = process.log()
        said = [line for line in log.splitlines() if "dashboard: refused GET /fleet" in line]
        assert len(said) == 1, said  # the burst's first, then one a minute at most
        assert re.search(r"from 127\.0\.0\.1(?: as 'ops')?: (?:wrong password|busy|too many "
                         r"failures)$", said[0]), said
    finally:
        process.stop()


def test_bad_dashboard_settings_are_refused_naming_the_key(tmp_path: Path) -> None:
    home = HubProcess(tmp_path / "hub").init().home  # never started
    config = home / "hub.toml"
    environ = {"PAS_HUB_HOME": str(home)}
    cases = {
        '[dashboard]\nauth = "basic"\n':
            "dashboard.users: required when dashboard.auth = 'basic'",
        f'[dashboard]\nauth = "basic"\nusers = {{ops = "{PASSWORD}"}}\n':
            "is not a password hash made by `pas hub password NAME`",
        '[dashboard]\nauth = "basic"\nusers = {ops = "scrypt$16384$8$1$!!$!!"}\n':
            "is a damaged password hash",
        '[dashboard]\nauth = "password"\n': "dashboard.auth",
        # Costs pas hub password never makes: seconds and hundreds of MiB per sign-in.
        '[dashboard]\nauth = "basic"\nusers = {ops = "scrypt$1048576$32$16$'
        'AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}\n':
            "costs or sizes pas hub password never makes",
    }
    for text, words in cases.items():
        config.write_text(text)
        with pytest.raises(ConfigError) as refused:
            load_hub_settings(config, environ)
        assert words in str(refused.value), (text, str(refused.value))
    line = _hash_line("ops", PASSWORD).stdout.strip()
    config.write_text(f'[dashboard.users]\n{line}\n')  # auth left "none"
    settings = load_hub_settings(config, environ)
    assert any(w.startswith("dashboard.users (ops) has no effect") for w in
               ineffective_settings(settings))
    checked = run_pas(["hub", "config", "check", str(config)], {**os.environ, **environ},
                      timeout=60)
    assert "dashboard.users (ops) has no effect" in checked.stderr, checked.stderr
    assert "answer anyone who reaches" in (open_dashboard(settings) or "")


@pytest.mark.parametrize(("name", "password", "words"), [
    ("ops", "too short", "the password has 9 characters; it needs at least 12"),
    ("a:b", PASSWORD, "user name 'a:b' cannot be used"),
    ("", PASSWORD, "user name '' cannot be used"),
])
def test_pas_hub_password_refuses_what_the_hub_could_not_use(name: str, password: str,
                                                             words: str) -> None:
    made = _hash_line(name, password)
    assert made.returncode == 2
    assert words in made.stderr
    assert made.stdout == ""
    assert json.dumps(password) not in made.stderr


def test_every_path_but_the_sites_enrolment_and_health_is_guarded() -> None:
    for path in ("/", "/fleet", "/fleet/", "/fleet/sites/X", "/metrics", "/metrics/",
                 "/fleet.json", "/anything-a-later-route-adds", "/api/v1x"):
        assert guarded(path), path
    for path in ("/api/v1/heartbeat", "/api/v1/transfers/1", "/enroll", "/enroll/ca",
                 "/healthz", "/openapi.json"):
        assert not guarded(path), path


def test_failures_count_per_address_and_per_ipv6_64() -> None:
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("?") == "?"


def test_a_name_no_user_has_is_checked_at_the_users_costs() -> None:
    stored = parse_hash(hash_password(PASSWORD))
    guard = DashboardGuard(lambda *_: None, {"ops": stored}, DashboardRefusals())
    unknown = guard._unknown  # noqa: SLF001 (what the guard hashes for an unknown name)
    assert (unknown.n, unknown.r, unknown.p) == (stored.n, stored.r, stored.p)
    assert not password_matches(PASSWORD, unknown)
    assert password_matches(PASSWORD, stored)
