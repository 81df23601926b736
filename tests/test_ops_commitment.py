"""Hospital IT sees the Storage Commitment reports: ``pas status`` (and ``--json``), the
status page and ``pas doctor`` (appliance/ops/status.py, web.py, doctor.py; docs/
operations.md).

Found in review (2026-12-04): none of them said anything of the reports. A modality whose
reports could not be delivered (no address, switched off) kept every study it sent, its
disk filled, and nothing on PAS's side showed why.

A real daemon on a home whose database holds reports made through the store: CT1 (a known
AE without an address) waiting for 10 minutes, CT2 (an address where nothing listens)
waiting a moment, CT3 (no address, its report taken on its own association so far) and
one report given up. Also what a site's monitoring and regional ops see of them: the
``pas_storage_commitment_*`` gauges (the alert rule is in image/monitoring/) and the
heartbeat's errors, which the fleet dashboard shows (found in review on 2026-12-05: neither
said anything, only doctor and the local status did).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom.uid import CTImageStorage, generate_uid

from appliance.config import load_settings
from appliance.ops.heartbeat import build_heartbeat
from appliance.store import commitment
from appliance.store.db import Database
from tests.support.peers import PasProcess, free_port, read_rows, wait_for
from tests.test_ops_fleet import metric


def _record(db: Database, ae: str, give_up_after_s: float = 86400) -> commitment.Commitment:
    recorded, _ = commitment.record_request(db, generate_uid(), ae, "127.0.0.1",
                                            [(CTImageStorage, generate_uid())],
                                            lambda relative: True, give_up_after_s)
    return recorded


def test_status_json_text_page_and_doctor_show_the_reports_waiting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    db = Database(home / "pas.sqlite")
    waiting = [_record(db, "CT1"), _record(db, "CT1")]
    _record(db, "CT2")
    done = _record(db, "CT3")
    commitment.mark_sent(db, done, "same association")
    late = _record(db, "CT2", give_up_after_s=-1)
    commitment.give_up(db, late, "not delivered by its deadline (3 attempts)")
    db.close()
    with sqlite3.connect(home / "pas.sqlite") as conn:  # CT1's reports: 10 minutes old
        conn.executemany("UPDATE commitment_requests SET requested_at = ? WHERE id = ?",
                         [(time.time() - 600, request.id) for request in waiting])
    pas = PasProcess(home, {"PAS_PREFETCH__ENABLED": "false", "PAS_DICOM__KNOWN_AES":
                            f'[{{title = "CT1"}}, {{title = "CT2", host = "127.0.0.1", '
                            f'port = {free_port()}}}, {{title = "CT3"}}]'}).start()
    try:
        # The daemon tries each pending report at start: the errors IT will read.
        wait_for(lambda: all(r["attempts"] >= 1 for r in read_rows(
            home / "pas.sqlite", "SELECT attempts FROM commitment_requests "
            "WHERE state = 'pending'")), 20, what="a first try of every pending report")
        reports = pas.status()["commitment"]
        assert (reports["pending"], reports["given_up_24h"], reports["given_up_7d"]) == (
            3, 1, 1)
        assert reports["oldest_age_s"] >= 600
        by_ae: dict[str, Any] = {row["calling_ae"]: row for row in reports["by_ae"]}
        assert sorted(by_ae) == ["CT1", "CT2"]
        assert by_ae["CT1"]["pending"] == 2 and by_ae["CT1"]["oldest_age_s"] >= 600
        assert by_ae["CT1"]["last_error"] == (
            "no address for CT1: give it host and port in dicom.known_aes (or list it in "
            "serving.move_destinations)")
        assert by_ae["CT2"]["pending"] == 1 and by_ae["CT2"]["oldest_age_s"] < 120
        assert by_ae["CT2"]["last_error"].startswith("association to CT2 at 127.0.0.1:")

        text = pas.cli("status").stdout
        assert "Storage Commitment reports pending" in text and "no address for CT1" in text
        assert "1 report given up in the last 24 h (1 in the last 7 days)" in text

        page = httpx.get(f"http://127.0.0.1:{pas.http_port}/", timeout=10).text
        assert '<div class="card" id="commitment">Commitment reports<b>3 pending</b>' in page
        assert '<tr data-ae="CT1"><td>CT1</td><td>2</td><td>10 min</td>' in page

        result = pas.cli("doctor", "--json", check=False)
        checks = {c["name"]: c for c in json.loads(result.stdout)}
        stuck = checks["storage commitment CT1"]
        assert stuck["verdict"] == "warn"
        assert stuck["detail"].startswith("2 reports pending for 10 min")
        assert stuck["detail"].endswith("last error: no address for CT1: give it host and "
                                        "port in dicom.known_aes (or list it in "
                                        "serving.move_destinations)")
        assert "dicom.known_aes" in stuck["fix"]
        assert "storage commitment CT2" not in checks  # has an address, waiting a moment
        no_address = checks["storage commitment CT3"]
        assert no_address["verdict"] == "warn"
        assert no_address["detail"].startswith(
            "CT3 asked for Storage Commitment (1 request) but PAS has no address for it")
        given_up = checks["storage commitment"]
        assert given_up["verdict"] == "warn"
        assert given_up["detail"].startswith("1 report given up in the last 24 h")

        # Prometheus, per modality: what the PasApplianceCommitmentReportsStuck alert reads.
        scrape = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
        assert metric(scrape, "pas_storage_commitment_pending", calling_ae="CT1") == 2
        assert metric(scrape, "pas_storage_commitment_pending", calling_ae="CT2") == 1
        assert metric(scrape, "pas_storage_commitment_pending", calling_ae="CT3") is None
        assert metric(scrape, "pas_storage_commitment_oldest_age_seconds",
                      calling_ae="CT1") >= 600  # type: ignore[operator]
        assert metric(scrape, "pas_storage_commitment_oldest_age_seconds",
                      calling_ae="CT2") < 120  # type: ignore[operator]
        assert metric(scrape, "pas_storage_commitment_given_up_24h") == 1

        # The heartbeat tells regional ops what doctor warns of (the dashboard shows its
        # errors): CT1 stuck, one given up; CT2, waiting a moment, not yet.
        reader = Database(home / "pas.sqlite", readonly=True)
        try:
            errors = build_heartbeat(load_settings(environ={"PAS_HOME": str(home)}), reader,
                                     time.time())["errors"]
        finally:
            reader.close()
        stuck_errors = [e for e in errors if e.startswith("storage commitment:")]
        assert stuck_errors == [
            "storage commitment: 2 reports to CT1 waiting 10 min: no address for CT1: give "
            "it host and port in dicom.known_aes (or list it in serving.move_destinations)",
            "storage commitment: 1 report given up in the last 24 h"]
    finally:
        pas.stop()
