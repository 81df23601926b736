"""A job naming a destination the configuration no longer has waits for it, uncounted.

A destination renamed (or removed) in the TOML while studies were queued for it: each of
its jobs failed for good at its next attempt ("destination 'pacs' is not configured"), and
``pas queue retry`` failed it again the same way, so putting the name back did not help
(review s41, F5). Now such a job waits, its attempts not counted, saying so in its
``last_error``; ``pas config check`` warns how many queued jobs name a destination it does
not have; and once a configuration names it again, the restart that puts it in force sends
them.

Real peers: the daemon (restarted with each configuration, as an operator does), DCMTK's
storescu as the modality and DCMTK's storescp as the PACS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.store.jobs import WAITING_FOR_LINK
from tests.support.configs import BACKOFF_QUICK, ct_to_named
from tests.support.peers import PasProcess, StoreSCP, read_rows, run_pas, storescu, wait_for
from tests.test_ingest import sop_uid
from tests.test_routing import CT_PATIENT

MAX_ATTEMPTS = 2
WAITING_FOR_CONFIG = "waiting for the configuration: "  # jobs.WAITING_FOR_CONFIG, spelt out


def _write(config: Path, name: str, port: int) -> None:
    ct_to_named(config, name, port, queue=f"max_attempts = {MAX_ATTEMPTS}\n" + BACKOFF_QUICK)


def _job(pas: PasProcess) -> dict[str, Any]:
    [job] = read_rows(pas.home / "pas.sqlite", "SELECT * FROM jobs")
    return dict(job)


def test_a_renamed_destination_s_jobs_wait_and_go_once_it_is_named_again(
        pas_factory: Any, tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS")  # its port chosen, not started yet
    config = tmp_path / "appliance.toml"
    _write(config, "pacs", scp.port)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_STUDY__STABLE_AFTER_S": "0.5"})
    storescu(CT_PATIENT, pas.port)
    wait_for(lambda: read_rows(pas.home / "pas.sqlite", "SELECT 1 FROM jobs")
             and (_job(pas)["last_error"] or "").startswith(WAITING_FOR_LINK), 60,
             what="the job to the PACS queued (the PACS down)")

    # The PACS renamed in the configuration, PAS restarted: the queued job names a
    # destination the configuration no longer has.
    pas.stop()
    _write(config, "pacs_main", scp.port)
    pas.start()
    said = "not counted as an attempt): destination 'pacs' is not configured"
    wait_for(lambda: pas.log().count(said) > MAX_ATTEMPTS or _job(pas)["state"] == "failed",
             60, what=f"more than {MAX_ATTEMPTS} tries of the job")
    job = wait_for(lambda: (j := _job(pas))["state"] != "running" and j, 30,
                   what="the job between two tries")
    assert (job["state"], job["attempts"]) == ("pending", 0), job
    assert job["last_error"].startswith(
        f"{WAITING_FOR_CONFIG}destination 'pacs' is not configured"), job["last_error"]

    checked = run_pas(["config", "check"], pas.env, timeout=60)
    assert checked.returncode == 0, checked.stderr
    warning = ("warning 1 queued job names destination 'pacs', which this configuration "
               "does not have (renamed or removed?): they wait, uncounted")
    assert warning in " ".join(checked.stderr.split()), checked.stderr
    assert "configuration OK" in checked.stdout, checked.stdout
    as_json = run_pas(["config", "check", "--json"], pas.env, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    [said_json] = json.loads(as_json.stdout)["warnings"]
    assert said_json.startswith("1 queued job names destination 'pacs'"), said_json

    # The name put back, and PAS restarted: the job goes at once, to the PACS now up.
    scp.start()
    try:
        pas.stop()
        _write(config, "pacs", scp.port)
        pas.start()
        wait_for(lambda: _job(pas)["state"] == "done", 60, what="the job delivered")
        received = sorted(sop_uid(p) for p in scp.files())
    finally:
        scp.stop()
    assert received == sorted(sop_uid(p) for p in CT_PATIENT)
    assert _job(pas)["attempts"] == 1
    checked = run_pas(["config", "check"], pas.env, timeout=60)
    assert checked.returncode == 0 and "warning" not in checked.stderr, checked.stderr
