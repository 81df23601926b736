"""pas-upgrade install when the new version does not start, and the rollback's check of the
older version against the database it will run on.

A review found: ``pas-upgrade install`` of a build that could not open the database (an
older build on a schema a newer one migrated) switched to it, then ``systemctl start``
failed and ``set -e`` ended the script with exit 1 and nothing on stdout: PAS stopped on the
new version, restarted by systemd every 5 s for ever, nothing said of the saved database or
of ``pas-upgrade rollback``. Now the failed start is rolled back at once (the rollback's
checks first), and what cannot be rolled back is said.

The script runs as shipped in the temporary root of test_upgrade_env.py, its systemctl
stand-in failing ``start`` as told (start.fails: always; else only on the new version).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.image.test_upgrade_env import identity, make_upgrade_root


def _root(tmp_path: Path, fails: str = "new version") -> Path:
    root = make_upgrade_root(tmp_path)
    systemctl = root / "bin/systemctl"
    # As systemctl start of a Type=notify unit whose process exits before it is ready.
    systemctl.write_text(systemctl.read_text() + f"""
if [ "$1" = start ] && {{ [ -f {root}/start.fails ] || \\
    [ "$(readlink {root}/opt/pas/current)" != 1.0 ]; }}; then
  echo "Job for pas.service failed because the control process exited with error code." >&2
  exit 1
fi
""")
    if fails == "always":
        (root / "start.fails").touch()
    return root


def _install(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(root / "usr/local/sbin/pas-upgrade"), "install",
                           str(root / "wheels")], capture_output=True, text=True, timeout=60,
                          env=env)


def _said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join(result.stdout.split())


def _calls(root: Path) -> list[str]:
    return (root / "systemctl.log").read_text().splitlines()


def test_a_version_that_does_not_start_is_rolled_back_at_once(tmp_path: Path) -> None:
    root = _root(tmp_path)
    new = identity(root)
    live = root / "var/lib/pas/pas.sqlite"
    result = _install(root)
    assert result.returncode == 1, result.stdout + result.stderr
    said = _said(result)
    assert (f"{new} did not start (systemctl's words above; why: journalctl -u pas -b); "
            "rolling back to 1.0.") in said, said
    assert f"rolled back {new} -> 1.0" in said
    assert (f"the upgrade to {new} failed and was undone: 1.0 runs again. Read why {new} did "
            "not start in journalctl -u pas -b") in said
    # Stopped at once (not started again by systemd while the rollback was checked), then
    # the rollback's own stop and start.
    assert _calls(root) == ["stop pas.service", "start pas.service", "stop pas.service",
                            "stop pas.service", "start pas.service"]
    assert os.readlink(root / "opt/pas/current") == "1.0"
    assert (root / "etc/pas-release").read_text() == "PAS_VERSION=1.0\nPAS_COMMIT=abc\n"
    assert not (root / "opt/pas/previous").exists()
    assert live.exists()  # the copy saved before the upgrade, back in its place
    assert (root / f"var/lib/pas/pas.sqlite.after-{new}").exists()  # what the new one left


def test_a_failed_start_that_cannot_be_rolled_back_says_pas_is_stopped(
        tmp_path: Path) -> None:
    root = _root(tmp_path)
    new = identity(root)
    (root / "opt/pas/1.0/venv/bin/pas").unlink()  # the version to go back to is gone
    result = _install(root)
    assert result.returncode == 1, result.stdout + result.stderr
    said = _said(result)
    assert "1.0, to roll back to, is not installed" in said and "not rolled back." in said
    assert "PAS was not stopped" not in said  # it was
    assert (f"PAS IS STOPPED, on {new}, which did not start, and the rollback was refused "
            f"(above). The database saved before the upgrade is "
            f"{root}/var/lib/pas/pas.sqlite.before-{new}. Read why {new} did not start in "
            "journalctl -u pas -b; then pas-upgrade rollback goes back to 1.0") in said, said
    assert os.readlink(root / "opt/pas/current") == new
    assert (root / "opt/pas/previous").read_text() == "1.0\n"  # a rollback still possible
    assert _calls(root) == ["stop pas.service", "start pas.service", "stop pas.service"]


def test_when_neither_version_starts_the_rollback_says_so(tmp_path: Path) -> None:
    root = _root(tmp_path, fails="always")
    new = identity(root)
    result = _install(root)
    assert result.returncode == 1, result.stdout + result.stderr
    said = _said(result)
    assert (f"PAS IS STOPPED: rolled back {new} -> 1.0, but 1.0 did not start either "
            "(systemctl's words above; why: journalctl -u pas -b): what stops it is not the "
            f"version. The database {new} ran on is kept as "
            f"{root}/var/lib/pas/pas.sqlite.after-{new}.") in said, said
    assert os.readlink(root / "opt/pas/current") == "1.0"


def test_the_rollback_checks_the_older_version_on_the_database_it_gets_back(
        tmp_path: Path) -> None:
    """A version whose check reads the database would refuse the one the newer version
    migrated: the rollback's check reads the copy it puts back (--database), for a version
    that has the option; an older one is asked as before."""
    for older_has_it in (True, False):
        root = make_upgrade_root(tmp_path / str(older_has_it))
        env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}"}
        script = str(root / "usr/local/sbin/pas-upgrade")
        subprocess.run(["bash", script, "install", str(root / "wheels")], check=True,
                       capture_output=True, env=env, timeout=60)
        new = identity(root)
        if not older_has_it:
            (root / "no-database-option.1.0").touch()
        result = subprocess.run(["bash", script, "rollback"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        argv = json.loads((root / "check.json").read_text())["argv"]
        conf = f"{root}/etc/pas/appliance.toml"
        before = f"{root}/var/lib/pas/pas.sqlite.before-{new}"
        assert argv == (["config", "check", conf, "--database", before] if older_has_it
                        else ["config", "check", conf])
