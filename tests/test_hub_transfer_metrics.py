"""The hub's ``/metrics`` says what it receives and commits: bucket bytes and buckets per
site, transfers and instances committed, and the transfers left open with the age of the
oldest. Real peers: ``pas hub run``, a real ``pas run`` uploading a real MR study, killed
(-9) half-way and started again; the figures are checked against the hub's own records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.hub import HubProcess
from tests.support.peers import read_rows as rows
from tests.test_uplink_hub import RESUME_FILES, _resume_setup, jobs, wait_jobs_finished


def _samples(hub: HubProcess, site: str) -> dict[str, float]:
    """This site's samples of the hub's pas_hub_* transfer families, by sample name."""
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30) as http:
        text = http.get("/metrics").text
    return {sample.name: float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith(("pas_hub_transfer", "pas_hub_bucket_bytes",
                                       "pas_hub_buckets", "pas_hub_instances"))
            and sample.labels.get("site") == site}


def test_a_transfer_left_open_then_resumed_is_counted_as_the_hub_recorded_it(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    site = "SITE-METRICS"
    pas, bucket_count = _resume_setup(pas_factory, hub, tmp_path / site.lower(), None)
    pas.kill()  # half-way: the hub holds an open transfer
    transfer_id = json.loads(jobs(pas)[0]["progress"])["transfer_id"]
    hub_db = hub.home / "hub.sqlite"
    [transfer] = rows(hub_db, "SELECT * FROM transfers WHERE id = ?", (transfer_id,))
    assert transfer["receipt"] is None

    open_now = _samples(hub, site)
    assert open_now["pas_hub_transfers_open"] == 1
    assert 0 <= open_now["pas_hub_transfer_oldest_open_age_seconds"] < 300
    assert open_now["pas_hub_transfers_committed_total"] == 0
    assert open_now["pas_hub_bucket_bytes_received_total"] == transfer["bytes_received"]
    stored = rows(hub_db, "SELECT count(*) AS n FROM buckets WHERE transfer_id = ?",
                  (transfer_id,))[0]["n"]
    assert 0 < open_now["pas_hub_buckets_stored_total"] == stored < bucket_count

    pas.start()
    finished = wait_jobs_finished(pas, len(RESUME_FILES))
    assert finished[0]["state"] == "done", finished[0]["last_error"]
    [transfer] = rows(hub_db, "SELECT * FROM transfers WHERE id = ?", (transfer_id,))
    assert transfer["receipt"] is not None
    done = _samples(hub, site)
    assert done["pas_hub_transfers_open"] == 0
    assert "pas_hub_transfer_oldest_open_age_seconds" not in done
    assert done["pas_hub_transfers_committed_total"] == 1
    assert done["pas_hub_instances_committed_total"] == len(RESUME_FILES)
    assert done["pas_hub_buckets_stored_total"] == transfer["bucket_count"]
    # Every authenticated body, the re-sent ones included, as the hub's own count says.
    assert done["pas_hub_bucket_bytes_received_total"] == transfer["bytes_received"]
    assert transfer["bytes_received"] >= transfer["bytes_stored"]
