"""Under systemd, PAS logs to journald with structured fields (CALLING_AE, STUDY_UID, JOB_ID).

A real systemd-journald runs in a private mount namespace (tmpfs over /run/systemd, /run/log
and /var/log/journal, so the host's journal is untouched); ``pas run`` starts inside it with
``JOURNAL_STREAM`` set as systemd sets it, a DCMTK storescu from an unknown AE is refused,
and journalctl must show that refusal with its CALLING_AE field.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.peers import (
    DCMTK_ENV,
    MR_DIR,
    PAS_BIN,
    free_port,
    port_open,
    read_rows,
    wait_for,
)

SCRIPT = r"""
set -eu
for dir in /run/systemd /run/log /var/log/journal; do
  mkdir -p "$dir"; mount -t tmpfs none "$dir"
done
mkdir -p /run/systemd/journal /run/log/journal
/lib/systemd/systemd-journald >"$WORK/journald.log" 2>&1 &
journald=$!
for _ in $(seq 1 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.1; done
JOURNAL_STREAM=0:0 INVOCATION_ID=test "$PAS" run >"$WORK/pas.out" 2>&1 &
pas=$!
for _ in $(seq 1 600); do [ -e "$WORK/done" ] && break; sleep 0.1; done
kill -TERM "$pas"; wait "$pas" || true
journalctl -D /run/log/journal -o json --no-pager >"$WORK/journal.json"
kill "$journald"; wait "$journald" || true
"""


def _journal_around(tmp_path: Path, action: Callable[[int], None],
                    **env: str) -> list[dict[str, Any]]:
    """``pas run`` under a private journald; ``action(dicom_port)`` while it runs; then
    PAS stopped (SIGTERM) and the journal's entries written by PAS."""
    # systemd-python (a test dependency) provides the JournalHandler PAS uses under systemd.
    from systemd import journal  # noqa: F401

    port = free_port()
    env = {**DCMTK_ENV, "WORK": str(tmp_path), "PAS": str(PAS_BIN),
           "PAS_HOME": str(tmp_path / "home"), "PAS_DICOM__HOST": "127.0.0.1",
           "PAS_DICOM__PORT": str(port), "PAS_HTTP__PORT": str(free_port()),
           "PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(free_port()),
           "PAS_STORAGE__MIN_FREE_MB": "0", "PAS_OPS__HEARTBEAT": "false", **env}
    (tmp_path / "home").mkdir()
    runner = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c",
                               SCRIPT], env=env)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 60, what="pas run inside the namespace")
        action(port)
    finally:
        (tmp_path / "done").touch()
        runner.wait(60)
    entries = [json.loads(line) for line in (tmp_path / "journal.json").read_text().splitlines()
               if line.strip()]
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "pas"]
    assert ours, (tmp_path / "pas.out").read_text()[-2000:]
    return ours


@pytest.mark.root
def test_structured_fields_reach_journald(tmp_path: Path) -> None:
    def rogue(port: int) -> None:
        refused = subprocess.run(["storescu", "-aec", "PAS", "-aet", "ROGUE", "127.0.0.1",
                                  str(port), str(next(p for p in MR_DIR.iterdir()))],
                                 env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0  # unknown AE: association rejected

    ours = _journal_around(tmp_path, rogue)
    refused = [e for e in ours if "association rejected" in str(e.get("MESSAGE", ""))]
    assert refused, [e.get("MESSAGE") for e in ours][-20:]
    assert refused[0]["CALLING_AE"] == "ROGUE"
    assert refused[0]["PRIORITY"] == "4"  # warning
    assert refused[0]["LOGGER"].startswith("pas.")


@pytest.mark.root
def test_the_journal_copy_of_an_audit_row_names_its_patient(tmp_path: Path) -> None:
    """An association stores one MR image: the journal entry of its ``store`` row carries
    the patient the row records (AUDIT_PATIENT, as ``pas audit --patient`` finds it) and
    the row's id (AUDIT_ID). The journal copy had the event, actor and outcome only: a
    journal could not be searched by patient as the table and the ATNA copy can."""
    from pydicom import dcmread

    image = sorted(MR_DIR.iterdir())[0]
    patient = str(dcmread(image, stop_before_pixels=True).PatientID)

    def store(port: int) -> None:
        subprocess.run(["storescu", "-aec", "PAS", "-aet", "MR1", "127.0.0.1", str(port),
                        str(image)], env=DCMTK_ENV, check=True, capture_output=True,
                       timeout=60)
        home = tmp_path / "home"
        wait_for(lambda: read_rows(home / "pas.sqlite",
                                   "SELECT 1 FROM audit WHERE event = 'store'"), 30,
                 what="the store row")

    ours = _journal_around(tmp_path, store, PAS_DICOM__ACCEPT_UNKNOWN="true")
    [stored] = [e for e in ours if e.get("AUDIT_EVENT") == "store"]
    assert (stored["AUDIT_ACTOR"], stored["AUDIT_PATIENT"]) == ("MR1", patient)
    [row] = read_rows(tmp_path / "home" / "pas.sqlite",
                      "SELECT id, patient FROM audit WHERE event = 'store'")
    assert (stored["AUDIT_ID"], row["patient"]) == (str(row["id"]), patient)
