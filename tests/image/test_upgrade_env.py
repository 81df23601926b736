"""pas-upgrade checks the new version on the configuration pas.service really runs on.

No VM needed. Before, ``pas-upgrade install`` ran the new ``pas config check`` with
``PAS_HOME`` only: a drop-in of pas.service (``systemctl edit pas``:
``Environment=PAS_SITE=...``, any ``PAS_<SECTION>__<KEY>``, an ``EnvironmentFile=``)
changes what the service runs on, so the check could pass while the upgraded service
refused to start, or the reverse; and its closing hint said "Fix the file" whatever the
refusal (a site mismatch's way out may be to enrol again).

The script runs here as it is shipped, in a temporary root (its /opt/pas, /var/lib/pas,
/etc/pas and /etc/pas-release paths pointed there), with stand-ins on PATH for what this
machine has not: ``systemctl`` (no systemd here; it answers ``show`` in systemd's own output
format and records stop/start), ``runuser`` (runs the command as is), ``python3 -m venv`` and
its ``pip`` (record what they were asked), and each version's ``pas`` (records the environment
and arguments the check ran with, answers as told). test_upgrade_rollback.py uses the same
root (:func:`make_upgrade_root`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.peers import ROOT
from tests.support.scripts import script_module

SCRIPT = ROOT / "image" / "rootfs" / "usr" / "local" / "sbin" / "pas-upgrade"
UNIT_ENV = ROOT / "image" / "rootfs" / "usr" / "local" / "lib" / "pas" / "unit-env"

# What `systemctl show pas.service -p Environment --value` prints for pas.service with a
# drop-in (systemd quotes a word holding a space, a quote or a $, escaping \ " $ ` inside).
SHOW_ENVIRONMENT = ('PAS_HOME=/srv/pas PYTHONUNBUFFERED=1 "PAS_SITE=CH Exemple" '
                    '"PAS_HUB__URL=https://hub.example:8443/x?a=\\"b\\"&c=\\$d\\\\e" '
                    'PAS_DICOM__AE_TITLE=OLD\n')
SITE_REFUSAL = ('config error site "CH Exemple" is not the site this appliance is enrolled '
                'as ("CH-B"): put back site = "CH-B", or enrol again as "CH Exemple"')


def _unit_env() -> ModuleType:
    return script_module(UNIT_ENV, "pas_unit_env")


def test_systemctl_shows_words_are_read_back_whole() -> None:
    unit_env = _unit_env()
    words = unit_env.split_show_words(SHOW_ENVIRONMENT)
    assert words == ["PAS_HOME=/srv/pas", "PYTHONUNBUFFERED=1", "PAS_SITE=CH Exemple",
                     'PAS_HUB__URL=https://hub.example:8443/x?a="b"&c=$d\\e',
                     "PAS_DICOM__AE_TITLE=OLD"]
    # C escapes inside quotes (a tab, an octal byte) and the $'...' form.
    assert unit_env.split_show_words('"A=x\\ty\\033z" $\'B=it\\\'s\'') == [
        "A=x\ty\x1bz", "B=it's"]
    assert unit_env.split_show_words("") == []
    # An older systemd's placeholder for a value with a space is refused, not guessed.
    with pytest.raises(unit_env.UnitEnvError, match="not KEY=VALUE"):
        unit_env.assignments(unit_env.split_show_words("PAS_HOME=/x [unprintable]"))
    with pytest.raises(unit_env.UnitEnvError, match="unterminated"):
        unit_env.split_show_words('"PAS_SITE=a b')


def test_environment_files_override_environment_in_systemds_order(tmp_path: Path) -> None:
    unit_env = _unit_env()
    first, second = tmp_path / "first.env", tmp_path / "second.env"
    first.write_text("# site of the drop-in\nPAS_SITE='CH B'\n; comment\n\n"
                     'PAS_HUB__URL="https://h/\\"q\\""\nOTHER=1\n')
    second.write_text("PAS_SITE=CH\\ C  \n")
    shown = {"Environment": "PAS_HOME=/srv/pas PAS_SITE=A\n",
             "EnvironmentFiles": (f"{first} (ignore_errors=no)\n"
                                  f"{tmp_path / 'absent.env'} (ignore_errors=yes)\n"
                                  f"{second} (ignore_errors=no)\n")}
    found = unit_env.unit_environment("pas.service", lambda _unit, prop: shown[prop])
    assert found == {"PAS_HOME": "/srv/pas", "PAS_SITE": "CH C",
                     "PAS_HUB__URL": 'https://h/"q"'}
    shown["EnvironmentFiles"] = f"{tmp_path / 'absent.env'} (ignore_errors=no)\n"
    with pytest.raises(unit_env.UnitEnvError, match="would not start"):
        unit_env.unit_environment("pas.service", lambda _unit, prop: shown[prop])


def _stand_in(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


# The version pas-upgrade's stand-in environment makes (python3 -m venv, then pip): its pas
# records how it was run (check.json, the last; checks.log, one line each: the version and
# the file) and answers as told: the words of check.said and the status of check.status, or,
# when the file checked holds the word written in refuse.<identity>, a refusal naming it
# (an older version meeting a key added for a newer one). Its ``config check --help`` lists
# --database (a version whose check reads the database) unless no-database-option.<identity>
# exists (an older one), and records nothing.
PAS_STAND_IN = """#!/bin/bash
me="$(basename "$(dirname "$(dirname "$(dirname "$0")")")")"
if [ "$3" = --help ]; then
  echo "Usage: pas config check [OPTIONS] [PATH]"
  [ -f "{root}/no-database-option.$me" ] || echo "  --database  PATH  the index database"
  exit 0
fi
{python} -c 'import json,os,sys; json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, \\
open("{root}/check.json", "w"))' "$@"
echo "$me $3" >> {root}/checks.log
if [ -f "{root}/refuse.$me" ] && grep -qF "$(cat "{root}/refuse.$me")" "$3"; then
  echo "config error unknown key $(cat "{root}/refuse.$me") (in $3)"
  exit 2
fi
cat {root}/check.said 2>/dev/null
exit "$(cat {root}/check.status 2>/dev/null || echo 0)"
"""


def make_upgrade_root(tmp_path: Path, running: str = "1.0",
                      wheels: tuple[str, ...] = ("pas_appliance-2.0-py3-none-any.whl",)
                      ) -> Path:
    """A temporary root: pas-upgrade (its paths pointed here) and lib/pas/unit-env beside it,
    /opt/pas/current -> ``running`` (installed: its pas answers config check), its
    /etc/pas/appliance.toml and database, the ``wheels`` (each file's bytes its name), and
    the stand-ins on PATH."""
    sbin, lib = tmp_path / "usr/local/sbin", tmp_path / "usr/local/lib/pas"
    sbin.mkdir(parents=True)
    lib.mkdir(parents=True)
    text = SCRIPT.read_text()
    for shipped, here in (("home=/var/lib/pas\n", f"home={tmp_path}/var/lib/pas\n"),
                          ("root=/opt/pas\n", f"root={tmp_path}/opt/pas\n"),
                          ("etc=/etc/pas\n", f"etc={tmp_path}/etc/pas\n"),
                          (" /etc/pas-release", f" {tmp_path}/etc/pas-release")):
        assert shipped in text, shipped
        text = text.replace(shipped, here)
    (sbin / "pas-upgrade").write_text(text)
    (sbin / "pas-upgrade").chmod(0o755)
    if UNIT_ENV.exists():
        shutil.copy(UNIT_ENV, lib / "unit-env")
    stand_in = tmp_path / "pas-stand-in"
    _stand_in(stand_in, PAS_STAND_IN.removeprefix("#!/bin/bash\n").format(
        python=sys.executable, root=tmp_path))
    (tmp_path / "opt/pas" / running / "venv/bin").mkdir(parents=True)
    shutil.copy(stand_in, tmp_path / "opt/pas" / running / "venv/bin/pas")
    (tmp_path / "opt/pas/current").symlink_to(running)
    (tmp_path / "var/lib/pas").mkdir(parents=True)
    subprocess.run([sys.executable, "-c", "import sqlite3,sys; sqlite3.connect(sys.argv[1])"
                    ".execute('CREATE TABLE t (x)')", str(tmp_path / "var/lib/pas/pas.sqlite")],
                   check=True)
    (tmp_path / "etc/pas").mkdir(parents=True)
    (tmp_path / "etc/pas/appliance.toml").write_text('site = "CH-B"\n')
    (tmp_path / "etc/pas-release").write_text(f"PAS_VERSION={running}\nPAS_COMMIT=abc\n")
    (tmp_path / "wheels").mkdir()
    for name in wheels:
        (tmp_path / "wheels" / name).write_bytes(name.encode())
    (tmp_path / "wheels/numpy-2.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"np")
    (tmp_path / "unit.env").write_text(SHOW_ENVIRONMENT)
    (tmp_path / "unit.files").write_text("")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _stand_in(bin_ / "systemctl", f"""
if [ "$1" = show ]; then
  case "$4" in
    Environment) cat {tmp_path}/unit.env ;;
    EnvironmentFiles) cat {tmp_path}/unit.files ;;
    *) exit 1 ;;
  esac
  exit 0
fi
echo "$*" >> {tmp_path}/systemctl.log
""")
    _stand_in(bin_ / "runuser", 'while [ "$1" != -- ]; do shift; done; shift; exec "$@"\n')
    # The new version's environment: python3 -m venv [options] DIR makes its pip (recording
    # what it installs) and its pas.
    _stand_in(bin_ / "python3", f"""
if [ "$1 $2" = "-m venv" ]; then
  echo "$*" >> {tmp_path}/venv.log
  dir="${{@: -1}}"
  mkdir -p "$dir/bin"
  printf '#!/bin/bash\\necho "$*" >> {tmp_path}/pip.log\\n' > "$dir/bin/pip"
  cp {stand_in} "$dir/bin/pas"
  chmod 755 "$dir/bin/pip"
  exit 0
fi
exec {sys.executable} "$@"
""")
    return tmp_path


def identity(root: Path, name: str = "pas_appliance-2.0-py3-none-any.whl") -> str:
    """What pas-upgrade names the install of the wheel ``name`` of ``root``'s wheels."""
    version = name.split("-")[1]
    return f"{version}-{hashlib.sha256((root / 'wheels' / name).read_bytes()).hexdigest()[:12]}"


@pytest.fixture
def upgrade_root(tmp_path: Path) -> Path:
    return make_upgrade_root(tmp_path)


def _upgrade(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
           # The admin's shell's own PAS_* must not reach the check: the unit does not have it.
           "PAS_DICOM__PORT": "104", "PAS_SITE": "FROM-THE-SHELL"}
    return subprocess.run(["bash", str(root / "usr/local/sbin/pas-upgrade"), "install",
                           str(root / "wheels")], capture_output=True, text=True, timeout=60,
                          env=env)


def test_the_check_runs_with_the_units_environment(upgrade_root: Path) -> None:
    root = upgrade_root
    extra = root / "pas.env"
    extra.write_text('PAS_DICOM__AE_TITLE="PAS MAIN"\n')
    (root / "unit.files").write_text(f"{extra} (ignore_errors=no)\n")
    result = _upgrade(root)
    assert result.returncode == 0, result.stdout + result.stderr
    check = json.loads((root / "check.json").read_text())
    assert check["argv"] == ["config", "check", f"{root}/etc/pas/appliance.toml"]
    assert {k: v for k, v in check["env"].items() if k.startswith("PAS_")} == {
        "PAS_HOME": "/srv/pas", "PAS_SITE": "CH Exemple",
        "PAS_HUB__URL": 'https://hub.example:8443/x?a="b"&c=$d\\e',
        "PAS_DICOM__AE_TITLE": "PAS MAIN"}
    assert (root / "systemctl.log").read_text().splitlines() == ["stop pas.service",
                                                                 "start pas.service"]
    assert os.readlink(root / "opt/pas/current") == identity(root)


def test_a_refusal_is_said_in_the_checks_words_and_nothing_is_switched(
        upgrade_root: Path) -> None:
    root = upgrade_root
    (root / "check.said").write_text(SITE_REFUSAL + "\n")
    (root / "check.status").write_text("2")
    result = _upgrade(root)
    assert result.returncode == 1, result.stdout + result.stderr
    said = [" ".join(line.split()) for line in result.stdout.splitlines() if line.strip()]
    assert said == [SITE_REFUSAL, (
        f"pas-upgrade: {identity(root)} refuses the configuration pas.service runs on "
        f"({root}/etc/pas/appliance.toml PAS_HOME PAS_SITE PAS_HUB__URL PAS_DICOM__AE_TITLE), in "
        "its words above; nothing was switched, 1.0 still runs. Do what it says, then run "
        "pas-upgrade install again.")], result.stdout
    assert not (root / "systemctl.log").exists()  # never stopped
    assert os.readlink(root / "opt/pas/current") == "1.0"
    assert (root / "etc/pas-release").read_text() == "PAS_VERSION=1.0\nPAS_COMMIT=abc\n"

    # An environment that cannot be read as systemd gives it stops the upgrade too.
    (root / "unit.files").write_text(f"{root / 'absent.env'} (ignore_errors=no)\n")
    result = _upgrade(root)
    assert result.returncode == 1
    assert f"EnvironmentFile={root / 'absent.env'} of pas.service does not exist" in \
        result.stderr
    assert "nothing was switched, 1.0 still runs" in result.stdout
    assert not (root / "systemctl.log").exists()


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
