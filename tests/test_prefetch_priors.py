"""Priors searched, chosen and downloaded in one round trip (issue 6, the WAN target): real peers.

A real Orthanc (DICOMweb plugin) behind a real hub (``pas hub run``, mutual TLS, archive
``dicomweb``); the site is an in-process PrefetchService over a temporary store, enrolled with
the hub, whose connection to the hub has learned that the hub offers ``POST
/api/v1/downloads/priors``. Proven: requests due together go as ONE priors request (no search
request, no separate download request) and every prior arrives byte for byte; a study the site
holds whole is not sent and one it holds in part is sent but for what it holds; bad priors
requests get a clear error naming the field.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.store import prefetch as store
from tests.support.hub import HubProcess, client, enroll
from tests.support.peers import wait_for
from tests.test_prefetch_batched import PATIENTS, Site, dicomweb_region, sha256

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with dicomweb_region(tmp_path_factory.mktemp("priors")) as made:
        yield made


def warm_site(hub: HubProcess, home: Path, name: str, **env: str) -> Site:
    site = Site(hub, home, name, env=env)
    downloads = site.service.downloads()
    assert downloads is not None
    downloads.warm()  # as the running service does at start: the hub lists its features
    assert downloads.hub_has_priors
    return site


def test_orders_due_together_are_one_priors_request(region: dict[str, Any],
                                                    tmp_path: Path) -> None:
    hub: HubProcess = region["hub"]
    site = warm_site(hub, tmp_path / "pas", "SITE-ONE", PAS_HUB__LINK_MBPS="400")
    rows = site.run(site.order(PATIENTS))
    site.assert_fetched(rows, region["priors"], PATIENTS)
    # One request to the hub for the three patients: no search, no separate download.
    assert site.service.fetcher.priors.requests == 1
    assert site.service.fetcher.searcher.requests == 0 and site.service.fetcher.batcher.batches == 0
    assert "priors for SITE-ONE: 3 patients searched, 3 studies to send" in hub.log()
    assert "download for SITE-ONE over 4 lanes" in hub.log()
    # Logged when the hub's side of the stream is done, after the site has read it: awaited.
    wait_for(lambda: re.search(r"batched download for SITE-ONE sent: 3 studies in one stream",
                               hub.log()), 10, what="the hub's log of the stream")


def test_requests_claimed_together_are_one_request_however_late_their_threads(
        region: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen in a full run (2 requests, not 1): each request reads what the site holds before
    it joins the batch, and on a loaded machine one got there after the 12 ms quiet time. A
    straggler 300 ms late (its read held up, as a loaded machine does) still joins: the
    batch waits for the requests claimed with it."""
    hub: HubProcess = region["hub"]
    site = warm_site(hub, tmp_path / "pas", "SITE-LATE")
    read = store.held_by_patient

    def late_for_the_last(db: Any, patient_id: str, limit: int) -> Any:
        if patient_id == PATIENTS[-1]:
            time.sleep(0.3)
        return read(db, patient_id, limit)

    monkeypatch.setattr(store, "held_by_patient", late_for_the_last)
    rows = site.run(site.order(PATIENTS))
    site.assert_fetched(rows, region["priors"], PATIENTS)
    assert site.service.fetcher.priors.requests == 1
    assert "priors for SITE-LATE: 3 patients searched, 3 studies to send" in hub.log()


def test_what_the_site_holds_is_not_sent_again(region: dict[str, Any], tmp_path: Path) -> None:
    """Patient 0's prior is on site whole, patient 1's in part: the hub sends only patient 1's
    missing instances and patient 2's study."""
    hub: HubProcess = region["hub"]
    site = warm_site(hub, tmp_path / "pas", "SITE-HELD")
    whole, partial = region["priors"][PATIENTS[0]][1], region["priors"][PATIENTS[1]][1]
    for path in [*whole, partial[0]]:
        site.receiver.receive_file(path.read_bytes())
    ids = site.order(PATIENTS)
    rows = site.run(ids)
    for row, patient in zip(rows, PATIENTS, strict=True):
        assert row["state"] == "fetched", row["last_error"]
        site.assert_on_site(region["priors"][patient][1])
    assert site.service.fetcher.priors.requests == 1
    assert "priors for SITE-HELD: 3 patients searched, 2 studies to send" in hub.log()
    partial_uid, _ = region["priors"][PATIENTS[1]]
    held = wait_for(lambda: re.search(rf"download of study {re.escape(partial_uid)} for "
                                      r"SITE-HELD sent: (\d+) instances? \((\d+) held",
                                      hub.log()), 10, what="the hub's line for the study")
    assert int(held.group(2)) == 1
    assert int(held.group(1)) == len({sha256(p.read_bytes()) for p in partial}) - 1
    states = {r["study_uid"]: r["state"] for i in ids for r in store.studies_of_request(
        site.db, i)}
    assert states[region["priors"][PATIENTS[0]][0]] == "on_site"
    assert states[partial_uid] == "fetched"


def test_bad_priors_requests_get_a_clear_error(region: dict[str, Any], tmp_path: Path) -> None:
    hub: HubProcess = region["hub"]
    enrolment = enroll(hub, tmp_path / "site", "SITE-BADPRIORS")
    good = {"patient_id": "A002304", "rule": {"priors": 2}}
    cases = [
        ({"patients": []}, "patients: must not be empty"),
        ({"patients": [{"rule": {"priors": 2}}]}, "patients:"),
        ({"patients": [{"patient_id": "A1"}]}, "patients[0].rule"),
        ({"patients": [{**good, "rule": {"priors": 0}}]}, "patients[0].rule.priors"),
        ({"patients": [{**good, "rule": {"priors": 2, "same": "body_part"}}]},
         "patients[0].rule.same"),
        ({"patients": [{**good, "rule": {"priors": 2, "max_age_days": -1}}]},
         "patients[0].rule.max_age_days"),
        # JSON true passed isinstance(int) and was one prior; the site's rule is strict now.
        ({"patients": [{**good, "rule": {"priors": True}}]}, "patients[0].rule.priors"),
        ({"patients": [{**good, "rule": {"priors": 2, "max_age_days": False}}]},
         "patients[0].rule.max_age_days"),
        ({"patients": [good, {**good, "current_study_uid": "1.2.x"}]},
         "patients[1].current_study_uid"),
        ({"patients": [{**good, "held": {"1.2.3": "all"}}]}, "patients[0].held"),
        ({"patients": [{**good, "modality": "C" * 65}]}, "patients[0].modality"),
        ({"patients": [good], "bucket_bytes": 1}, "bucket_bytes"),
        ({"patients": [good], "lanes": {"id": "a" * 32, "count": 0, "rate_bps": 1}},
         "lanes.count"),
    ]
    with client(enrolment) as http:
        for body, named in cases:
            answer = http.post("/api/v1/downloads/priors", json=body)
            assert answer.status_code == 422, (body, answer.text)
            problem = answer.json()
            assert problem["error"] == "bad_request" and named in problem["detail"], problem
        assert http.post("/api/v1/downloads/priors", content=b"[nope",
                         headers={"content-type": "application/json"}).status_code == 400
        # The streamed form (what PAS sends: NDJSON, options then a patient per line).
        ndjson = {"content-type": "application/x-ndjson"}
        streamed_cases = [
            (b"", "line 1: must be the options object"),
            (b'{"bucket_bytes": 1}\n' + json.dumps(good).encode(), "bucket_bytes"),
            (b"{}\n", "patients: must not be empty"),
            (b"{}\n" + json.dumps(good).encode() + b"\n" + json.dumps(
                {**good, "rule": {"priors": 2, "same": "body_part"}}).encode(),
             "patients[1].rule.same"),
            (b"{}\n" + json.dumps(good).encode() + b'\n{"issuer": "x"}\n', "patients[1]:"),
        ]
        for content, named in streamed_cases:
            answer = http.post("/api/v1/downloads/priors", content=content, headers=ndjson)
            assert answer.status_code == 422, (content, answer.text)
            problem = answer.json()
            assert problem["error"] == "bad_request" and named in problem["detail"], problem
        answer = http.post("/api/v1/downloads/priors", content=b"{}\n{nope\n", headers=ndjson)
        assert answer.status_code == 422 and "line 2: not JSON" in answer.json()["detail"]
        answer = http.post("/api/v1/downloads/priors", content=b"[nope\n", headers=ndjson)
        assert answer.status_code == 400 and "line 1: not JSON" in answer.json()["detail"]
        # A patient the region does not know: found nothing, nothing to send, a clean end.
        answer = http.post("/api/v1/downloads/priors",
                           json={"patients": [{"patient_id": "NOBODY", "rule": {"priors": 3}}]})
        assert answer.status_code == 200 and b'"found":{"patient":0,"studies":[]}' in answer.content
        assert b'"end":true' in answer.content
    assert hub.proc is not None and hub.proc.poll() is None  # still serving
    wait_for(lambda: not list((hub.home / "downloads").iterdir()), 30,
             what="no staging folder left on the hub")


def test_a_wildcard_patient_id_takes_not_its_burst_off_the_priors_route(
        region: dict[str, Any], tmp_path: Path) -> None:
    """The hub refuses the whole priors request (422) when one patient_id holds a wildcard:
    the burst took the two-step path, whose batched search the hub refused too, and every
    request failed. Now that request fails alone, before the batch, naming the character;
    the others go as one priors request."""
    hub: HubProcess = region["hub"]
    site = warm_site(hub, tmp_path / "pas", "SITE-WILDCARD", PAS_PREFETCH__MAX_ATTEMPTS="1")
    rows = site.run(site.order((*PATIENTS, "A05?642")))
    site.assert_fetched(rows[:-1], region["priors"], PATIENTS)
    assert rows[-1]["state"] == "failed"
    assert "patient_id 'A05?642' holds '?'" in rows[-1]["last_error"]
    assert site.service.fetcher.priors.requests == 1
    assert site.service.fetcher.searcher.requests == 0
