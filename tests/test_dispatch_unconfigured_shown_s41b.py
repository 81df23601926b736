"""Jobs waiting for a destination the configuration no longer names are shown.

Such jobs wait, uncounted, and never fail (1852a8d): neither the failed-jobs row of
``pas doctor`` nor ``pas status`` said anything, only ``pas config check`` did (review s41,
F-C). ``pas doctor`` now has a warn row naming the destinations and how many jobs each, with
the fix; ``pas status --json`` has ``unconfigured_destinations``; the heartbeat's errors
(the hub's fleet dashboard) name them, as they name those waiting for credentials.

Real peers: the daemon (restarted with the renamed destination, as an operator does),
DCMTK's storescu as the modality; the PACS is never up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.config import load_settings
from appliance.ops.heartbeat import build_heartbeat
from appliance.store.db import Database
from tests.support.configs import BACKOFF_QUICK, ct_to_named
from tests.support.peers import closed_port, read_rows, storescu, wait_for
from tests.test_routing import CT_PATIENT


def _write(config: Path, name: str, port: int) -> None:
    ct_to_named(config, name, port, queue=BACKOFF_QUICK)


def test_jobs_waiting_for_an_unconfigured_destination_are_shown(pas_factory: Any,
                                                                tmp_path: Path) -> None:
    down = closed_port()  # the PACS: nothing listens there
    port = down.getsockname()[1]
    config = tmp_path / "appliance.toml"
    _write(config, "pacs", port)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_STUDY__STABLE_AFTER_S": "0.5"})
    database = pas.home / "pas.sqlite"
    storescu(CT_PATIENT, pas.port)
    wait_for(lambda: read_rows(database, "SELECT 1 FROM jobs"), 60, what="the job queued")

    # Nothing to show while the configuration names it.
    assert json.loads(pas.cli("status", "--json").stdout)["unconfigured_destinations"] == []
    doctor = json.loads(pas.cli("doctor", "--json", check=False).stdout)
    assert not [c for c in doctor if c["name"] == "jobs waiting for the configuration"]

    pas.stop()
    _write(config, "pacs_main", port)  # renamed
    pas.start()
    wait_for(lambda: (read_rows(database, "SELECT last_error FROM jobs")[0]["last_error"]
                      or "").startswith("waiting for the configuration: "), 60,
             what="the job waiting for the configuration")

    doctor = json.loads(pas.cli("doctor", "--json", check=False).stdout)
    [row] = [c for c in doctor if c["name"] == "jobs waiting for the configuration"]
    assert row["verdict"] == "warn", row
    assert "1 job names a destination this configuration does not have ('pacs' 1)" in \
        row["detail"], row
    assert "put the name back" in row["fix"] and "pas queue list" in row["fix"], row

    status = json.loads(pas.cli("status", "--json").stdout)
    assert status["unconfigured_destinations"] == [
        {"destination": "pacs", "queued": 1, "failed": 0}]
    shown = " ".join(pas.cli("status").stdout.split())
    assert ("pacs: 1 job waiting for the configuration (the destination is not configured: "
            "put its name back under [destinations] and restart PAS)") in shown, shown

    settings = load_settings(environ={"PAS_HOME": str(pas.home), "PAS_CONFIG": str(config)})
    db = Database(settings.db_path, readonly=True)
    try:
        beat = build_heartbeat(settings, db, started_at=0.0)
    finally:
        db.close()
    assert any(e.startswith("pacs: 1 job waiting for the configuration")
               for e in beat["errors"]), beat["errors"]
    down.close()
