"""/metrics and the local status page of a real daemon, fed by DCMTK storescu, delivering to a
DCMTK storescp that rejects associations at first (a failed job; a node not listening would
make the job wait for the link, uncounted), then accepts (the retry button delivers)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from tests.support.browser import chromium
from tests.support.cleanup import started
from tests.support.peers import MR_DIR, PasProcess, StoreSCP, read_rows, storescu, wait_for

FILES = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:12]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def refusing_node(stack: contextlib.ExitStack, root: Path) -> tuple[StoreSCP, StoreSCP]:
    """``scp``, its port reserved and not started (the tests start it: the node once
    fixed), and a storescp on that port refusing every association, started."""
    scp = StoreSCP(root / "scp")
    stack.callback(scp.stop)
    refusing = StoreSCP(root / "refusing")
    refusing.port = scp.port
    started(stack, refusing, ["--refuse"])
    return scp, refusing


def failing_destination(scp: StoreSCP) -> dict[str, str]:
    """A daemon's environment: every study to ``scp`` (a ``dicom`` destination, one
    attempt). (A node not listening would make the job wait for the link, uncounted, not
    fail: hence a refusing one on its port.)"""
    return {"PAS_QUEUE__MAX_ATTEMPTS": "1", "PAS_DESTINATIONS__LOCAL__KIND": "dicom",
            "PAS_DESTINATIONS__LOCAL__AE_TITLE": scp.ae_title,
            "PAS_DESTINATIONS__LOCAL__HOST": "127.0.0.1",
            "PAS_DESTINATIONS__LOCAL__PORT": str(scp.port),
            "PAS_ROUTING__FALLBACK__DESTINATIONS": '["local"]'}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One daemon whose only destination (a storescp) rejects associations while the study
    arrives: the job fails. ``scp`` (on that port, not started) is the node once fixed."""
    root = tmp_path_factory.mktemp("ops_web")
    with contextlib.ExitStack() as stack:  # a step that raises stops those started
        scp, refusing = refusing_node(stack, root)
        pas = started(stack, PasProcess(root / "pas", {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true",
            # Named: an unknown title is counted under calling_ae="other" (metrics.OTHER_AE).
            "PAS_DICOM__KNOWN_AES": '[{title = "MODALITY1"}]', **failing_destination(scp)}))
        storescu(FILES, pas.port, calling="MODALITY1")
        base = f"http://127.0.0.1:{pas.http_port}"
        wait_for(lambda: pas.status()["jobs"].get("failed") == 1, 60, what="the job to fail")
        refusing.stop()  # the node, down until a test starts scp on its port
        yield {"pas": pas, "scp": scp, "base": base}


def test_metrics_count_what_arrived(site: dict[str, Any]) -> None:
    pas: PasProcess = site["pas"]
    response = httpx.get(f"{site['base']}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = samples(response.text)
    total_bytes = pas.status()["bytes"]
    assert values[("pas_received_instances_total", (("calling_ae", "MODALITY1"),))] == len(FILES)
    assert values[("pas_received_bytes_total", (("calling_ae", "MODALITY1"),))] == total_bytes
    assert values[("pas_cstore_duration_seconds_count", (("outcome", "success"),))] == len(FILES)
    assert values[("pas_jobs_failed", (("destination", "local"),))] == 1
    assert values[("pas_cache_instances", ())] == len(FILES)
    assert 0 < values[("pas_disk_used_ratio", ())] < 1
    assert values[("pas_enrolled", ())] == 0
    names = {name for name, _ in values}
    assert all(name.startswith("pas_") for name in names), sorted(names)


def test_another_site_cannot_post_the_retry(site: dict[str, Any], tmp_path: Path) -> None:
    """auth = "none" needs no credentials, but another site's page must not make the browser
    of someone on the appliance's network post the retry (cross-site request forgery): the
    browser's Origin names that site, and the POST is refused."""
    from selenium.webdriver.common.by import By

    pas: PasProcess = site["pas"]
    job_id = int(json.loads(pas.cli("queue", "list", "--json").stdout)[0]["id"])
    forged = (f"<form method=post action='{site['base']}/jobs/{job_id}/retry'></form>"
              "<script>document.forms[0].submit()</script>")
    driver = chromium(tmp_path / "chromium")
    try:
        driver.get("data:text/html," + forged)
        wait_for(lambda: driver.current_url.startswith(site["base"]), 20,
                 what="the forged POST's answer")
        body = driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
    assert "refused" in body and pas.status()["jobs"].get("failed") == 1
    for source in ({"Origin": "http://evil.example"},
                   {"Referer": "http://evil.example/page.html"}, {"Origin": "null"}):
        answer = httpx.post(f"{site['base']}/jobs/{job_id}/retry", headers=source, timeout=10)
        assert answer.status_code == 403, source
    assert pas.status()["jobs"].get("failed") == 1


def test_status_page_shows_failed_job_and_retry_delivers(site: dict[str, Any]) -> None:
    pas: PasProcess = site["pas"]
    scp: StoreSCP = site["scp"]
    page = httpx.get(f"{site['base']}/", timeout=10)
    assert page.status_code == 200
    body = page.text
    assert 'http-equiv="refresh"' in body and 'name="viewport"' in body
    assert 'class="state failed">failed<' in body
    job_id = int(json.loads(pas.cli("queue", "list", "--json").stdout)[0]["id"])
    assert f'action="/jobs/{job_id}/retry"' in body
    assert "not enrolled" in body

    scp.start()
    answer = httpx.post(f"{site['base']}/jobs/{job_id}/retry", timeout=10)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    # In the audit trail, written with the retry (none was: a resend of patient data that
    # anyone on the network could trigger with auth = "none", untraced).
    [row] = read_rows(pas.home / "pas.sqlite", "SELECT * FROM audit WHERE event = 'retry'")
    assert (row["actor"], row["source"], row["outcome"]) == ("anonymous", "127.0.0.1",
                                                             "success")
    assert row["target"] == str(dcmread(FILES[0], stop_before_pixels=True).StudyInstanceUID)
    assert row["detail"].startswith(f"job {job_id} (dicom) to local, failed after 1 attempt")
    wait_for(lambda: pas.status()["jobs"].get("done") == 1, 60, what="the retried job")
    wait_for(lambda: len(scp.files()) == len(FILES), 30, what="files at storescp")
    sent = sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in FILES)
    got = sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files())
    assert got == sent
    after = httpx.get(f"{site['base']}/", timeout=10).text
    assert 'class="state delivered">delivered<' in after
    assert f'action="/jobs/{job_id}/retry"' not in after


@pytest.mark.parametrize(("path", "status", "words"), [
    ("/jobs/abc/retry", 400, "must be a number"),
    ("/jobs/%C2%B2/retry", 400, "must be a number"),  # "\u00b2".isdigit(): int() raised, a 500
    ("/jobs/999999/retry", 404, "job 999999 does not exist"),
])
def test_bad_retry_is_refused_and_daemon_keeps_serving(site: dict[str, Any], path: str,
                                                       status: int, words: str) -> None:
    before = site["pas"].status()["jobs"]
    answer = httpx.post(f"{site['base']}{path}", timeout=10)
    assert answer.status_code == status
    assert words in answer.text
    assert site["pas"].status()["jobs"] == before
    assert httpx.get(f"{site['base']}/metrics", timeout=10).status_code == 200


def test_browser_runs_no_script_a_modality_sends(site: dict[str, Any], tmp_path: Path) -> None:
    """PatientID, StudyDescription and Modality come from whatever sent the study: the page
    shows them as text and runs nothing (each would set the title)."""
    from selenium.webdriver.common.by import By

    hostile = dcmread(FILES[0])
    hostile.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77001"
    hostile.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77002"
    hostile.PatientID = "<img src=x onerror=\"document.title='pwned'\">"
    hostile.StudyDescription = "\"><script>document.title='pwned'</script>"
    with pytest.warns(UserWarning):  # pydicom: not a valid CS
        hostile.Modality = "<b>MR"
    path = tmp_path / "hostile.dcm"
    hostile.save_as(path)
    storescu([path], site["pas"].port)
    driver = chromium(tmp_path / "chromium")
    try:
        driver.get(f"{site['base']}/")
        row = driver.find_element(By.CSS_SELECTOR,
                                  f'tr[data-study-uid="{hostile.StudyInstanceUID}"]')
        assert driver.title == "PAS"  # the default site is not said twice
        assert hostile.PatientID in row.text and hostile.StudyDescription in row.text
        assert not row.find_elements(By.CSS_SELECTOR, "img, script, b")
    finally:
        driver.quit()


def test_calling_ae_label_is_bounded_by_the_configuration(pas_factory: Any) -> None:
    """With ``dicom.accept_unknown``, any sender chooses its calling AE: each title it made
    up was a new ``calling_ae`` series of ``pas_received_*_total`` for ever (the counters are
    durable), the unbounded label Prometheus warns against. The titles of ``dicom.known_aes``
    keep their own series; every other title is counted under ``other``, totals unchanged."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_DICOM__KNOWN_AES": '[{title = "CT01"}]'})
    storescu(FILES[:2], pas.port, calling="CT01")
    for number, path in enumerate(FILES[2:]):
        storescu([path], pas.port, calling=f"MADEUP{number:02d}")
    assert pas.status()["files"] == len(FILES)
    text = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    by_ae = {labels: value for (name, labels), value in samples(text).items()
             if name == "pas_received_instances_total"}
    assert by_ae == {(("calling_ae", "CT01"),): 2,
                     (("calling_ae", "other"),): len(FILES) - 2}, by_ae
    received = {labels: value for (name, labels), value in samples(text).items()
                if name == "pas_received_bytes_total"}
    assert set(received) == set(by_ae)
    assert sum(received.values()) == pas.status()["bytes"]


def test_refusal_counters_are_exported_at_zero_from_the_start(pas_factory: Any) -> None:
    """Prometheus's increase() does not count a series' first value: a counter child made at
    the first refusal (prometheus_client's labels are lazy) appeared at 1, or at 40 for a
    burst within one scrape interval, and PasApplianceDicomTurningAway
    (increase(...[10m]) > 0) never fired for it. Every channel and reason the docs list is
    exported at 0 from the start, so the first refusal is an increase."""
    pas = pas_factory({"PAS_DICOM__KNOWN_AES": '[{title = "CT01"}]'})
    url = f"http://127.0.0.1:{pas.http_port}/metrics"

    def refused() -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: value for (name, labels), value in
                samples(httpx.get(url, timeout=10).text).items()
                if name == "pas_access_refused_total"}

    before = refused()
    for reason in ("unknown-ae", "rate-limit", "unaccepted-context", "invalid-pdu",
                   "tls-certificate", "too-many-associations", "too-many-connections"):
        assert before.get((("channel", "dicom"), ("reason", reason))) == 0, (reason, before)
    assert before.get((("channel", "http"), ("reason", "bearer-token"))) == 0, before
    answer = storescu(FILES[:1], pas.port, calling="STRANGER", check=False)
    assert answer.returncode != 0
    wait_for(lambda: refused().get((("channel", "dicom"), ("reason", "unknown-ae"))) == 1, 10,
             what="the unknown AE counted")


def test_backlog_counts_a_study_once_whatever_its_destinations(pas_factory: Any) -> None:
    """A study routed to two destinations is one study waiting: the status page's Backlog
    card (and the heartbeat's backlog.studies, the hub's fleet row) summed the studies of
    each destination and said 2, while /metrics and pas status count it per destination."""
    from tests.support.peers import free_port

    env: dict[str, str] = {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                           "PAS_ROUTING__FALLBACK__DESTINATIONS": '["pacs", "archive"]'}
    for name in ("PACS", "ARCHIVE"):  # nothing listens: the jobs wait for the link
        env |= {f"PAS_DESTINATIONS__{name}__KIND": "dicom",
                f"PAS_DESTINATIONS__{name}__AE_TITLE": name,
                f"PAS_DESTINATIONS__{name}__HOST": "127.0.0.1",
                f"PAS_DESTINATIONS__{name}__PORT": str(free_port())}
    pas = pas_factory(env)
    storescu(FILES[:3], pas.port, calling="CT01")
    wait_for(lambda: {row["destination"]: row["studies"] for row in pas.status()["backlog"]}
             == {"pacs": 1, "archive": 1}, 30, what="one study waiting for each destination")
    page = httpx.get(f"http://127.0.0.1:{pas.http_port}/", timeout=10).text
    card = page[page.index('id="backlog"'):]
    assert card.startswith('id="backlog">Backlog<b>1 study</b>'), card[:80]
    from appliance.config import load_settings
    from appliance.ops.heartbeat import build_heartbeat
    from appliance.store.db import Database
    from appliance.store.schema import MIGRATIONS

    settings = load_settings(environ=dict(pas.env))
    beat = build_heartbeat(settings, Database(pas.home / "pas.sqlite", MIGRATIONS), 0.0)
    assert beat["backlog"]["studies"] == 1, beat["backlog"]
