"""kill -9 of PAS and of the hub at random instants while 20 studies are ingested and
uploaded: in the end every study is confirmed, the hub's archive holds each instance exactly
once with the SHA-256 PAS stored, and the appliance's spool and index are consistent.

Real peers: DCMTK storescu as the modality, ``pas hub run`` (embedded archive) as the
region, the appliance enrolled with the real ``pas enroll``. Rounds alternate: most kill the
appliance (mid-ingest, mid-bucket, mid-commit, wherever the instant falls), every third kills
the hub and restarts it (a hub restart during a commit when the instant falls there).
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.faults.helpers import assert_consistent, sha256
from tests.support.hub import HubProcess, enroll
from tests.support.peers import CT_DIR, DCMTK_ENV, PasProcess, storescu, wait_for

ROUNDS = int(os.environ.get("PAS_FAULT_UPLOAD_ROUNDS", "5"))


def _rows(db: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub").init()
    process.start()
    yield process
    process.kill()


def test_kill9_during_ingest_and_upload_confirms_everything_once(hub: HubProcess,
                                                                 tmp_path: Path) -> None:
    home = tmp_path / "site"
    enroll(hub, home, "FAULTS")
    env: dict[str, Any] = {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_CACHE__SCRUB_MB_PER_S": "0", "PAS_QUEUE__BACKOFF_INITIAL_S": "0.3",
        "PAS_QUEUE__BACKOFF_MAX_S": "1", "PAS_QUEUE__MAX_ATTEMPTS": "1000",
        "PAS_QUEUE__LEASE_S": "10",
    }
    rng = random.Random(int(os.environ.get("PAS_FAULT_SEED", str(time.time_ns()))))
    files = sorted(str(p) for p in CT_DIR.glob("*.dcm"))
    sender: subprocess.Popen[str] | None = None
    kills = {"pas": 0, "hub": 0}
    for number in range(ROUNDS):
        pas = PasProcess(home, env).start()
        if number == 0:  # the modality starts sending; the first kills fall mid-ingest
            sender = subprocess.Popen(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1",
                                       str(pas.port), *files], env=DCMTK_ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 2.5))  # the fault's instant, not a wait
        if number % 3 == 2:
            hub.kill()
            kills["hub"] += 1
            hub.start()
        pas.kill()
        kills["pas"] += 1
    if sender is not None:
        sender.wait(60)

    pas = PasProcess(home, env).start()
    try:
        # Whatever the kills cut short; re-sends are no-ops. The same calling AE: PAS writes
        # it into the file meta (Source AE Title), so another AE would make other bytes,
        # i.e. a second version of the instance (the spine's conflict rule).
        storescu(files, pas.port, calling="CT1")
        uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        db = home / "pas.sqlite"

        def all_confirmed() -> bool:
            row = _rows(db, "SELECT count(*) AS n, count(confirmed_at) AS c FROM instances "
                            "WHERE is_current = 1")[0]
            busy = _rows(db, "SELECT count(*) AS n FROM jobs WHERE state IN "
                             "('pending', 'running')")[0]
            return bool(row["n"] == len(uids) == row["c"] and busy["n"] == 0)

        wait_for(all_confirmed, 240, interval=0.3, what=f"all confirmed (log {pas.log_path})")
    finally:
        pas.stop()

    state = assert_consistent(home)
    assert set(state["by_sop"]) == uids
    archive = _rows(hub.home / "archive" / "pas.sqlite",
                    "SELECT sop_instance_uid, sha256, path FROM instances")
    archived_uids = [r["sop_instance_uid"] for r in archive]
    assert len(archived_uids) == len(set(archived_uids)), "duplicates at the hub"
    assert set(archived_uids) == uids
    for row in archive:
        data = (hub.home / "archive" / "spool" / row["path"]).read_bytes()
        assert sha256(data) == row["sha256"] == state["by_sop"][row["sop_instance_uid"]]["sha256"]
    failed = _rows(home / "pas.sqlite", "SELECT count(*) AS n FROM jobs WHERE state = 'failed'")
    assert failed[0]["n"] == 0
    studies = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    print(f"\nkill -9 upload: {ROUNDS} rounds ({kills['pas']} PAS kills, {kills['hub']} hub "
          f"kills), {len(studies)} studies, {len(uids)} instances confirmed, lost 0, "
          f"duplicates at the hub 0")
