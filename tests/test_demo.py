"""`make demo`, the README's first command, as a newcomer runs it: ``scripts/demo.sh``
(what the target runs once ``.venv`` exists) starts a local hub, enrols PAS with it and runs
PAS; a study sent with the ``storescu`` line the banner prints is in the cache, then
confirmed by the region and held by the hub's embedded archive, bit for bit; Ctrl-C stops
both daemons. Nothing else tested the script, so a change of a CLI option or of the hub's
start could break the first thing a reader tries.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

from pydicom import dcmread

from tests.support.peers import DCMTK_ENV, free_port, port_open, read_rows, wait_for

REPO = Path(__file__).resolve().parents[1]
CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-covid19-ny-sbu"


def _studies(home: Path) -> list[dict]:
    out = subprocess.run([str(REPO / ".venv" / "bin" / "pas"), "studies", "--json"],
                         env={**os.environ, "PAS_HOME": str(home)}, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_make_demo_runs_receives_a_study_and_sends_it_to_its_hub(tmp_path: Path) -> None:
    files = sorted(CT.glob("A002304_*_19010112-*.dcm"))  # one study: 3 series of 1 image
    assert len(files) == 3, files
    home, dicom_port, hub_port = tmp_path / "var", free_port(), free_port()
    env = {**os.environ, "PAS_DICOM__PORT": str(dicom_port),
           "PAS_HUB_HTTP__PORT": str(hub_port),
           # The other listeners on free loopback ports (the defaults may be taken here).
           "PAS_HTTP__HOST": "127.0.0.1", "PAS_HTTP__PORT": str(free_port()),
           "PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(free_port()),
           "PAS_DICOM__HOST": "127.0.0.1",
           "PAS_STUDY__STABLE_AFTER_S": "1", "PAS_STUDY__CHECK_INTERVAL_S": "0.2",
           "PAS_QUEUE__POLL_INTERVAL_S": "0.2", "PAS_STORAGE__MIN_FREE_MB": "0"}
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen(["bash", "scripts/demo.sh", str(home)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            assert demo.poll() is None, log.read_text()
            return "PAS ready" in log.read_text() and port_open("127.0.0.1", dicom_port)
        wait_for(ready, 60, what=f"the demo's PAS (log: {log})")
        banner = log.read_text()
        line = re.search(r"Send a study \(DCMTK\):\s+(.+)", banner)
        assert line, banner
        argv = shlex.split(line.group(1))
        assert argv[:3] == ["TCP_NODELAY=1", "storescu", "-aec"] and str(dicom_port) in argv
        # The status page, where a newcomer looks next.
        assert f"http://localhost:{env['PAS_HTTP__PORT']}/" in banner, banner
        # The enrolment token went through a pipe: no warning that `ps` could show it.
        assert "visible to other users" not in banner, banner
        # The banner's command, on one study's files instead of the whole set.
        sent = subprocess.run([*argv[1:-1], *map(str, files)], env=DCMTK_ENV,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr

        def confirmed() -> dict | None:
            rows = _studies(home)
            return next((r for r in rows if r["instances"] == len(files)
                         and r["confirmed"] == len(files)), None)
        row = wait_for(confirmed, 60, what=f"the study confirmed by the hub (log: {log})")
        archive = home.parent / "var-hub" / "archive"
        [held] = [r for r in _studies(archive) if r["study_uid"] == row["study_uid"]]
        assert held["instances"] == len(files)
        # The site as the hub knows it, also for pas status run from another shell.
        status = subprocess.run([str(REPO / ".venv" / "bin" / "pas"), "status", "--json"],
                                env={**os.environ, "PAS_HOME": str(home)}, capture_output=True,
                                text=True, timeout=60, check=True)
        assert json.loads(status.stdout)["site"] == "DEMO", status.stdout[:300]
        sent_uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
        local, regional = ({r["sop_instance_uid"]: r["sha256"] for r in read_rows(
            db, "SELECT sop_instance_uid, sha256 FROM instances")}
            for db in (home / "pas.sqlite", archive / "pas.sqlite"))
        assert set(local) == sent_uids
        # The region holds each instance with the SHA-256 PAS kept of it as sent.
        assert {uid: regional.get(uid) for uid in sent_uids} == local
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole group
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    wait_for(lambda: not port_open("127.0.0.1", hub_port), 15, what="the demo's hub stopped")
    assert not port_open("127.0.0.1", dicom_port)


def test_the_demos_data_is_never_committed() -> None:
    """``make demo`` writes the hub's CA key, server key and transfer key under var-hub/
    (beside var/): a ``git add -A`` must not take them."""
    ignored = {line.strip() for line in (REPO / ".gitignore").read_text().splitlines()}
    script = (REPO / "scripts" / "demo.sh").read_text()
    demo_home = re.search(r'home="\$\{1:-\./([^}"]+)\}"', script)
    assert demo_home, "scripts/demo.sh: where its data goes"
    assert {f"{demo_home.group(1)}/", f"{demo_home.group(1)}-hub/"} <= ignored, ignored
