"""The warm interpreter (tests/support/zygote.py) runs a ``pas`` command as a new one would:
the same output and exit status, the command's own environment and directory, its name in
/proc, and a daemon that stops on SIGTERM and reports death by signal as Popen does."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import zygote
from tests.support.peers import PAS_BIN, PasProcess


def _both(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str],
                                                          subprocess.CompletedProcess[str]]:
    forked = zygote.run(args, env, timeout=60)
    executed = subprocess.run([str(PAS_BIN), *args], env=env, capture_output=True, text=True,
                              timeout=60)
    return forked, executed


def test_a_refused_configuration_reads_the_same_forked_and_executed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 0\n")
    env = {**os.environ, "COLUMNS": "200"}
    forked, executed = _both(["config", "check", str(bad)], env)
    assert forked.returncode == executed.returncode == 2
    assert "dicom.port" in forked.stdout + forked.stderr
    assert (forked.stdout, forked.stderr) == (executed.stdout, executed.stderr)


def test_a_command_that_succeeds_ends_as_executed_its_output_whole(tmp_path: Path) -> None:
    """The forked command ends without the interpreter's teardown (zygote._exit_as_sys_exit):
    what it printed is all there, and its exit status is the same, on success too."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAS_")}
    env.update({"PAS_HOME": str(tmp_path / "home"), "COLUMNS": "200"})
    PasProcess(tmp_path / "home").start().stop()  # a home and its database
    for args in (["--help"], ["config", "check"], ["queue", "list"], ["studies", "--json"]):
        forked, executed = _both(args, env)
        assert forked.returncode == executed.returncode == 0, (args, forked.stderr)
        assert forked.stdout and forked.stdout == executed.stdout, args
        assert forked.stderr == executed.stderr, args


def test_the_command_gets_its_own_environment_and_no_more(tmp_path: Path) -> None:
    """A variable of the warm interpreter's own that the command's environment lacks is not
    seen: the home named is the command's."""
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAS_")}
    env["PAS_HOME"] = str(home)
    forked, executed = _both(["status", "--json"], env)
    assert forked.returncode == executed.returncode == 1
    assert f"no database at {home}/pas.sqlite" in forked.stderr
    assert forked.stderr == executed.stderr


def test_a_forked_daemon_is_named_pas_stops_on_sigterm_and_dies_by_sigkill(
        tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "home")
    assert pas._warm()  # the case under test: forked, not executed
    pas.start()
    assert isinstance(pas.proc, zygote.ForkedProcess)
    assert Path(f"/proc/{pas.proc.pid}/comm").read_text().strip() == "pas"
    assert os.readlink(f"/proc/{pas.proc.pid}/cwd") == str(pas.home)
    assert pas.status()["instances"] == 0
    pas.stop()
    assert pas.proc.returncode == 0
    assert "PAS stopped" in pas.log()

    pas.start()
    with pytest.raises(subprocess.TimeoutExpired):
        pas.proc.wait(0.01)  # a wait that runs out says so, as Popen's does
    pas.proc.send_signal(signal.SIGKILL)
    assert pas.proc.wait(30) == -signal.SIGKILL
    assert pas.proc.poll() == -signal.SIGKILL


def test_a_python_variable_of_its_own_sends_the_command_to_a_new_interpreter(
        tmp_path: Path) -> None:
    assert zygote.suits(dict(os.environ))
    assert not zygote.suits({**os.environ, "PYTHONPATH": str(tmp_path)})


def test_a_command_that_outlives_its_timeout_is_killed(tmp_path: Path) -> None:
    """As subprocess.run does: TimeoutExpired, and the child is gone (a daemon left running
    would hold its ports and home for the rest of the session)."""
    pas = PasProcess(tmp_path / "home")
    pas.home.mkdir(parents=True)
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run(["run"], pas.env, timeout=1, cwd=pas.home)
    left = [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()
            and _cwd(entry) == str(pas.home)]
    assert left == []


def _cwd(entry: Path) -> str | None:
    try:
        return os.readlink(entry / "cwd")
    except OSError:  # ended meanwhile, or not ours to read
        return None
