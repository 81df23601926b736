"""kill -9 at random instants while DCMTK storescu sends: nothing acknowledged is ever lost.

Each round starts ``pas run`` on the same home (start-up recovery runs every time), sends a
random slice of the real MR set with storescu, and kills the daemon with SIGKILL at a random
instant. At the end: every instance whose Success storescu saw is indexed, its file's
SHA-256 matches the index and its dataset bytes equal the original; no duplicate rows, no
orphan file, no row without a file, no half-written or temp file.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from pathlib import Path

from tests.faults.helpers import (
    assert_consistent,
    assert_kept_exactly,
    stored_successes,
)
from tests.support.peers import DCMTK_ENV, MR_DIR, PasProcess

ROUNDS = int(os.environ.get("PAS_FAULT_ROUNDS", "8"))
SLICE = 80


def test_kill9_during_ingest_loses_nothing(tmp_path: Path) -> None:
    home = tmp_path / "pas"
    files = sorted(str(p) for p in MR_DIR.glob("*.dcm"))
    rng = random.Random(int(os.environ.get("PAS_FAULT_SEED", str(time.time_ns()))))
    acknowledged: list[str] = []
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
           "PAS_CACHE__SCRUB_MB_PER_S": "0"}
    for _round in range(ROUNDS):
        pas = PasProcess(home, env).start()
        start = rng.randrange(0, len(files) - SLICE)
        batch = files[start:start + SLICE]
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "PAS", "-aet", "MODALITY", "127.0.0.1", str(pas.port),
             *batch],
            env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        # The fault itself: SIGKILL at a random instant of the transfer (not a wait).
        time.sleep(rng.uniform(0.05, 1.0))
        pas.kill()
        output, _ = sender.communicate(timeout=60)
        acknowledged.extend(stored_successes(output))

    # One last start runs recovery on whatever the last kill left; then a clean stop.
    final = PasProcess(home, env).start()
    final.stop()
    state = assert_consistent(home)
    assert_kept_exactly(home, acknowledged)
    distinct = set(acknowledged)
    assert len(distinct) > 0, "no C-STORE was acknowledged in any round: the test proved nothing"

    # Every instance the index holds came from the set, and the set re-sent is all duplicates
    # for what is held: counts stay exact.
    log = (home / "pas.log").read_text(errors="replace")
    recoveries = re.findall(r"start-up recovery: (\{.*\})", log)
    print(f"\nkill -9 ingest: {ROUNDS} rounds, {len(acknowledged)} acknowledged C-STOREs "
          f"({len(distinct)} distinct), {state['rows']} rows, lost 0, duplicates "
          f"{state['duplicates']}, orphans {len(state['orphans'])}, recoveries with work: "
          f"{recoveries}")
    assert state["rows"] >= len(distinct)


def test_orphan_from_lost_commit_is_adopted_not_dropped(tmp_path: Path) -> None:
    """The window kill -9 rarely hits: file renamed into place, index commit lost."""
    from appliance.store.spool import Spool

    home = tmp_path / "pas"
    spool = Spool(home / "spool")
    source = sorted(MR_DIR.glob("*.dcm"))[0]
    stored, created = spool.write([source.read_bytes()])
    assert created
    (home / "spool" / "tmp" / "dead.part").write_bytes(b"half a write")
    pas = PasProcess(home, {"PAS_HTTP__ENABLED": "false"}).start()
    pas.stop()
    state = assert_consistent(home)
    assert state["rows"] == 1
    assert next(iter(state["by_sop"].values()))["path"] == stored.path
    assert "orphans_adopted=1" in pas.log() and "temp_files_removed=1" in pas.log()
