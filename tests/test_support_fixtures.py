"""Set-ups that fail half-way leave no peer running (tests/support/cleanup.py).

A module fixture's code after ``yield`` runs only if its set-up reached the ``yield``: in a
CI run, ``tests/test_serving_fetch.py``'s set-up failed after its storescp, Orthanc (and its
network namespace) and hub had started, and those ran on for the rest of the session,
holding ports and CPU. Here a real set-up fails at a real later step, and a real start
times out; afterwards nothing they launched is still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.hub import HubProcess
from tests.support.peers import Orthanc, PasProcess
from tests.test_serving_fetch import Setup

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _exec_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """New interpreters, not children of the warm one (tests/support/zygote.py): what is
    left running is found by the command line and environment it was started with."""
    monkeypatch.setenv("PAS_TEST_EXEC", "1")


def running_under(root: Path) -> list[int]:
    """The processes whose command line or environment names a path under ``root`` (a
    peer's folder, config file or home): what a set-up there launched and left running."""
    needle = (str(root) + "/").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # ended meanwhile
            continue
        if needle in seen and state != "Z":
            found.append(int(entry.name))
    return found


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def kill_leftovers(root: Path) -> None:
    """What a failing check found still running, killed with its namespace: this test must
    not leak what it is about."""
    for pid in running_under(root):
        where = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                               text=True).stdout.strip()
        os.kill(pid, signal.SIGKILL)
        if where:
            subprocess.run(["ip", "netns", "del", where], capture_output=True)


def test_a_set_up_that_fails_at_a_later_step_stops_the_peers_it_had_started(
        tmp_path: Path) -> None:
    """test_serving_fetch's set-up, its site already enrolled (a refusal at the enrolment,
    after the storescp, the Orthanc and the hub have started): the error is the
    enrolment's, and the three processes and Orthanc's namespace are gone."""
    root = tmp_path / "fetch"
    (root / "pas" / "pki").mkdir(parents=True)
    (root / "pas" / "pki" / "hub.json").write_text("{}")
    try:
        with pytest.raises(Exception, match="already enrolled") as raised:
            Setup(root)
        # The half-built set-up, reachable only through its constructor's frame.
        setup = next(entry.locals["self"] for entry in raised.traceback
                     if isinstance(entry.locals.get("self"), Setup))
        peers = {"storescp": setup.scp.proc, "orthanc": setup.region.proc,
                 "hub": setup.hub.proc}
        assert all(proc is not None for proc in peers.values())  # all three had started
        assert {name: proc.poll() for name, proc in peers.items()
                if proc.poll() is None} == {}, "still running"
        assert setup.region.ns.name not in namespaces()
        assert running_under(root) == []
    finally:
        kill_leftovers(root)


@pytest.mark.parametrize("make", [
    lambda root: PasProcess(root / "pas"),
    lambda root: HubProcess(root / "hub").init(),
    lambda root: Orthanc(root / "orthanc"),
], ids=["pas", "hub", "orthanc"])
def test_a_start_that_times_out_stops_what_it_launched(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    """A peer not up within its start's timeout (as on a loaded CI machine): the start
    raises, and the process it launched (and an Orthanc's own namespace) is not left
    running; the caller never got the peer back to stop it."""
    peer = make(tmp_path)
    try:
        # No time at all: with 0.01 s, Orthanc answered the one probe begun in time (its
        # namespace's link still coming up held the connection until Orthanc listened).
        with pytest.raises(TimeoutError):
            peer.start(timeout=0)
        assert peer.proc is not None  # launched, then stopped
        assert peer.proc.poll() is not None, "still running"
        assert running_under(tmp_path) == []
        if isinstance(peer, Orthanc):
            assert peer.ns.name not in namespaces()
    finally:
        kill_leftovers(tmp_path)
