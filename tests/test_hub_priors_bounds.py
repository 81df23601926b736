"""The hub's priors search is bounded (review s39, bounds finding 2; invariants 7 and 8).

It read each patient's archive answer whole, with no ``limit``, held all of them at once and
wrote one JSON answer: 8 patients of 2.9 MB answers grew ``pas hub run`` by 285 MiB. A patient
ID ``*`` was sent on (an archive that reads it as QIDO-RS does answers every patient). Now:
``limit`` is sent, each answer is read to a byte cap (past it, that patient's result is an
error naming it), a few searches run at once, wildcards are refused with a 422 naming the
field, and the site reads the hub's combined answer to a cap too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.hub.priors import SEARCH_LIMIT, SEARCHES_AT_ONCE
from appliance.transfer.download import DownloadError, HubDownloads
from appliance.transfer.download_frames import MAX_SEARCH_BYTES
from tests.support.hub import client
from tests.support.priors_archive import BIG, ROW, Archive, priors_hub
from tests.support.serving import serve_in_thread
from tests.test_ingest_spill import peak_rss_mb
from tests.test_serving_memory import _reset_peak


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with priors_hub(tmp_path_factory.mktemp("priors-bounds"), "SITE-P") as hub:
        yield hub


@pytest.mark.parametrize(("path", "patient", "field"), [
    ("/api/v1/downloads/search", {"patient_id": "*"}, "patients[1].patient_id"),
    ("/api/v1/downloads/search", {"patient_id": "P1?"}, "patients[1].patient_id"),
    ("/api/v1/downloads/search", {"patient_id": "P1", "issuer": "H*"}, "patients[1].issuer"),
    ("/api/v1/downloads/priors", {"patient_id": "*", "rule": {"priors": 2}},
     "patients[1].patient_id"),
])
def test_a_wildcard_patient_is_refused_naming_the_field(
        hub: dict[str, Any], path: str, patient: dict[str, Any], field: str) -> None:
    before = len(Archive.seen)
    body = {"patients": [{"patient_id": "P0", "rule": {"priors": 2}}, patient]}
    with client(hub["site"]) as http:
        answer = http.post(path, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith(f"{field}: wildcards"), answer.text
    assert len(Archive.seen) == before  # nothing asked of the archive


def test_the_archive_is_asked_for_a_limit_and_few_searches_run_at_once(
        hub: dict[str, Any]) -> None:
    Archive.most, Archive.delay = 0, 0.1
    try:
        with client(hub["site"]) as http:
            answer = http.post("/api/v1/downloads/search", json={
                "patients": [{"patient_id": f"P{n}"} for n in range(12)]})
    finally:
        Archive.delay = 0.0
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert [len(r["studies"]) for r in document["results"]] == [1] * 12
    assert "priors" in document["features"]
    assert Archive.seen[-1]["limit"] == [str(SEARCH_LIMIT)]
    assert Archive.most <= SEARCHES_AT_ONCE, Archive.most  # was 12


def test_an_archive_answer_past_the_cap_is_an_error_and_costs_the_hub_little(
        hub: dict[str, Any]) -> None:
    """8 patients whose archive answers 2.9 MB each (limit ignored): +285 MiB before."""
    process = hub["hub"].proc
    assert process is not None and len(BIG) > MAX_SEARCH_BYTES
    patients = [{"patient_id": "BIG"}] * 8 + [{"patient_id": "P1"}]
    with client(hub["site"]) as http:
        http.post("/api/v1/downloads/search", json={"patients": patients[-2:]})  # warm-up
        _reset_peak(process.pid)
        before = peak_rss_mb(process.pid)
        answer = http.post("/api/v1/downloads/search", json={"patients": patients})
        growth = peak_rss_mb(process.pid) - before
    print(f"search of 8 patients of 2.9 MB answers: pas hub run peak RSS +{growth:.1f} MB")
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r.get("error") for r in results] == ["archive_answer_too_large"] * 8 + [None]
    assert str(MAX_SEARCH_BYTES) in results[0]["detail"]
    assert len(results[-1]["studies"]) == 1  # the other patient answered
    assert growth < 60, growth


class Hub(BaseHTTPRequestHandler):
    """A stand-in hub whose search answer is ``size`` bytes of valid JSON for one patient."""

    size = 0

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        rows = [ROW] * (type(self).size // len(json.dumps(ROW)) + 1)
        body = json.dumps({"results": [{"studies": rows}], "features": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_site_reads_the_hubs_search_answer_to_a_cap(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    serve_in_thread(server)
    downloads = HubDownloads(f"http://127.0.0.1:{server.server_port}", None)
    try:
        Hub.size = MAX_SEARCH_BYTES // 2
        assert len(downloads.search([("P1", "")])[0]) > 1000  # type: ignore[arg-type]
        Hub.size = 3 * MAX_SEARCH_BYTES
        with pytest.raises(DownloadError, match="answer is over"):
            downloads.search([("P1", "")])
    finally:
        downloads.close()
        server.shutdown()
        server.server_close()
