"""Under systemd, PAS logs to journald with structured fields (CALLING_AE, STUDY_UID, JOB_ID).

A real systemd-journald runs in a private mount namespace (tmpfs over /run/systemd, /run/log
and /var/log/journal, so the host's journal is untouched); ``pas run`` starts inside it with
``JOURNAL_STREAM`` set as systemd sets it, a DCMTK storescu from an unknown AE is refused,
and journalctl must show that refusal with its CALLING_AE field.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.peers import DCMTK_ENV, MR_DIR, PAS_BIN, free_port, port_open, wait_for

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


@pytest.mark.root
def test_structured_fields_reach_journald(tmp_path: Path) -> None:
    # systemd-python (a test dependency) provides the JournalHandler PAS uses under systemd.
    from systemd import journal  # noqa: F401

    port = free_port()
    env = {**DCMTK_ENV, "WORK": str(tmp_path), "PAS": str(PAS_BIN),
           "PAS_HOME": str(tmp_path / "home"), "PAS_DICOM__HOST": "127.0.0.1",
           "PAS_DICOM__PORT": str(port), "PAS_HTTP__PORT": str(free_port()),
           "PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(free_port()),
           "PAS_STORAGE__MIN_FREE_MB": "0", "PAS_OPS__HEARTBEAT": "false"}
    (tmp_path / "home").mkdir()
    runner = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c",
                               SCRIPT], env=env)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 60, what="pas run inside the namespace")
        rogue = subprocess.run(["storescu", "-aec", "PAS", "-aet", "ROGUE", "127.0.0.1",
                                str(port), str(next(p for p in MR_DIR.iterdir()))],
                               env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
        assert rogue.returncode != 0  # unknown AE: association rejected
    finally:
        (tmp_path / "done").touch()
        runner.wait(60)
    entries = [json.loads(line) for line in (tmp_path / "journal.json").read_text().splitlines()
               if line.strip()]
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "pas"]
    assert ours, (tmp_path / "pas.out").read_text()[-2000:]
    refused = [e for e in ours if "association rejected" in str(e.get("MESSAGE", ""))]
    assert refused, [e.get("MESSAGE") for e in ours][-20:]
    assert refused[0]["CALLING_AE"] == "ROGUE"
    assert refused[0]["PRIORITY"] == "4"  # warning
    assert refused[0]["LOGGER"].startswith("pas.")
