"""``pas hub config check [PATH]`` (appliance/hub/check.py): what ``pas hub run`` refuses at
its start, found before a hub upgrade switches versions.

The hub had no check: its configuration gains refusals over time (an ``http://``
``archive.url`` beyond loopback unless ``archive.allow_cleartext``, an ``archive.ca_file``
that is no PEM bundle) and its database's schema only goes forward, and a hub operator
learnt of them when the upgraded ``pas hub run`` failed to start. Real ``pas hub init`` homes
and real ``pas hub config check`` runs: every problem is one line naming its key, exit 2,
and the home is left byte for byte as it was (nothing created, migrated or locked).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.store.schema import MIGRATIONS
from tests.support.hub import HubProcess
from tests.support.peers import run_pas

CLEARTEXT_REFUSED = ("archive.url: http:// sends every study the sites send in clear; use "
                     "https:// (or set archive.allow_cleartext = true for a host on the data "
                     "centre's own network)")


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One hub home made by ``pas hub init``, copied by each test that changes it."""
    home = tmp_path_factory.mktemp("hub") / "home"
    HubProcess(home).init()
    return home


def _home(initialised: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(initialised, home)
    return home


def _check(home: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    """``pas hub config check ARGS`` with the hub's home and only these PAS_* variables:
    its exit status and every line it printed (stdout and stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    result = run_pas(["hub", "config", "check", *args],
                     {**clean, "PAS_HUB_HOME": str(home), **env}, timeout=60)
    lines = [" ".join(line.split()) for line in (result.stdout + result.stderr).splitlines()
             if line.strip()]
    return result.returncode, lines


def _json(home: Path, *args: str, status: int = 0) -> dict[str, Any]:
    """``pas hub config check ARGS --json``: what it printed on stdout, nothing on stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    result = run_pas(["hub", "config", "check", *args, "--json"],
                     {**clean, "PAS_HUB_HOME": str(home)}, timeout=60)
    assert (result.returncode, result.stderr) == (status, ""), result.stdout + result.stderr
    return json.loads(result.stdout)


def _tree(home: Path) -> dict[str, tuple[str, int]]:
    """Every file of the home, its SHA-256 and mode: what a check must leave as it was."""
    return {str(p.relative_to(home)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mode)
            for p in sorted(home.rglob("*")) if p.is_file()}


def _set_schema(database: Path, version: int) -> None:
    conn = sqlite3.connect(database)
    try:
        conn.execute(f"PRAGMA user_version={version}")
        conn.commit()
    finally:
        conn.close()


def test_a_good_configuration_is_ok_and_nothing_in_the_home_changes(
        initialised: Path, tmp_path: Path) -> None:
    home = _home(initialised, tmp_path)
    (home / "hub.toml").write_text('[http]\nport = 9443\n[archive]\nkind = "embedded"\n')
    before = _tree(home)
    status, lines = _check(home)
    assert status == 0, lines
    assert lines == [f"hub configuration OK: home {home}, https on 0.0.0.0:9443, archive "
                     f"embedded; hub.sqlite schema {len(HUB_MIGRATIONS)} of "
                     f"{len(HUB_MIGRATIONS)} (current)"], lines
    # Read only: no -wal/-shm beside the stopped hub's database, no lock, no buckets/.
    assert _tree(home) == before
    assert sorted(p.name for p in home.iterdir()) == sorted(before)

    # A PATH names the file (pas-hub.service's /etc/pas/hub.toml), a dicomweb archive with
    # the opt-in and a real PEM bundle as ca_file (the fleet CA is one): taken, no network.
    other = tmp_path / "hub.toml"
    other.write_text(f'[archive]\nkind = "dicomweb"\nurl = "http://pacs.dc.example/dicom-web"\n'
                     f'allow_cleartext = true\nca_file = "{home / "ca.crt"}"\n')
    status, lines = _check(home, str(other))
    assert status == 0, lines
    assert lines[0].startswith(f"hub configuration OK: home {home}, https on 0.0.0.0:8443, "
                               "archive dicomweb http://pacs.dc.example/dicom-web;"), lines
    assert lines[1:] == [_ca_file_unused(home / "ca.crt", HTTP_WHY.format(
        url="http://pacs.dc.example/dicom-web"))], lines
    # --json: the same, named (a configuration management's check reads it).
    answer = _json(home, str(other))
    assert answer == {
        "ok": True, "problems": [], "warnings": answer["warnings"],
        "config_file": str(other), "home": str(home),
        "http_host": "0.0.0.0", "http_port": 8443, "archive_kind": "dicomweb",
        "archive_url": "http://pacs.dc.example/dicom-web",
        "databases": [f"hub.sqlite schema {len(HUB_MIGRATIONS)} of {len(HUB_MIGRATIONS)} "
                      "(current)"]}, answer
    assert [" ".join(w.split()) for w in answer["warnings"]] == [
        line.removeprefix("warning: ") for line in lines[1:]], answer
    assert _tree(home) == before


def test_each_refusal_is_named_by_its_key_and_exits_2(initialised: Path,
                                                      tmp_path: Path) -> None:
    home = _home(initialised, tmp_path)
    before = _tree(home)
    bad = tmp_path / "bad.toml"

    # The settings' own refusals, every one at once, as pas hub run says them.
    bad.write_text('[http]\nport = 70000\n[archive]\nkind = "dicomweb"\n'
                   'url = "http://198.18.0.2:8042/dicom-web"\n[limits]\nbucketz = 2\n')
    status, lines = _check(home, str(bad))
    assert status == 2, lines
    assert sorted(lines) == sorted([
        f"config error {CLEARTEXT_REFUSED}",
        "config error limits.bucketz: unknown key",
        "config error http.port: must be 1-65535, got 70000"]), lines
    assert _json(home, str(bad), status=2) == {
        "ok": False, "problems": [line.removeprefix("config error ") for line in lines]}

    # A PACS's url with the embedded archive (kind left at its default): its studies would
    # have stayed on the hub's disk, confirmed to their sites, and never reached the PACS.
    bad.write_text('[archive]\nurl = "https://pacs.region.example/dicom-web"\n')
    status, lines = _check(home, str(bad))
    assert (status, lines) == (2, [
        "config error archive.url: set (https://pacs.region.example/dicom-web) but kind is "
        "'embedded': the region's studies would stay on the hub's own disk and none would go "
        'there; set kind = "dicomweb" to archive to it, or remove url']), lines

    # The same refusal from the environment pas-hub.service may set (a drop-in), naming the
    # variable: the operator searched hub.toml for a value the unit's environment gave.
    status, lines = _check(home, PAS_HUB_ARCHIVE__KIND="dicomweb",
                           PAS_HUB_ARCHIVE__URL="http://198.18.0.2:8042/dicom-web")
    assert (status, lines) == (2, [
        f"config error {CLEARTEXT_REFUSED} (set by PAS_HUB_ARCHIVE__URL)"])
    status, lines = _check(home, PAS_HUB_HTTP__PORT="abc", PAS_HUB_LOG_LEVEL="loud")
    assert (status, sorted(lines)) == (2, [
        "config error http.port: must be an integer, got 'abc' (set by PAS_HUB_HTTP__PORT)",
        "config error log_level: must be one of 'debug', 'info', 'warning', 'error', got "
        "'loud' (set by PAS_HUB_LOG_LEVEL)"]), lines

    # A refused value of the file that a variable replaces now: pas hub run refuses the
    # file the day the variable goes (as pas config check says for the appliance).
    bad.write_text('[archive]\nkind = "dicomweb"\nurl = "http://198.18.0.2:8042/dicom-web"\n')
    status, lines = _check(home, str(bad),
                           PAS_HUB_ARCHIVE__URL="https://pacs.region.example/dicom-web")
    assert (status, lines) == (2, [
        f"config error in {bad} (a PAS_HUB_* variable replaces it now; without it pas hub run "
        f"refuses the file): {CLEARTEXT_REFUSED}"])
    # With a problem the variables do not hide, both in the same run (the hidden one was
    # said only once the other was fixed).
    bad.write_text('[archive]\nkind = "dicomweb"\nurl = "http://198.18.0.2:8042/dicom-web"\n'
                   '[http]\nport = 0\n')
    status, lines = _check(home, str(bad),
                           PAS_HUB_ARCHIVE__URL="https://pacs.region.example/dicom-web")
    assert (status, lines) == (2, [
        "config error http.port: must be 1-65535, got 0",
        f"config error in {bad} (a PAS_HUB_* variable replaces it now; without it pas hub run "
        f"refuses the file): {CLEARTEXT_REFUSED}"]), lines

    # archive.ca_file: missing, or a file that is no PEM bundle (pas hub run's words).
    garbage = tmp_path / "region-ca.pem"
    garbage.write_text("not a certificate\n")
    for ca_file, why in ((tmp_path / "missing.pem", "No such file or directory"),
                         (garbage, "")):
        bad.write_text(f'[archive]\nkind = "dicomweb"\nurl = "https://pacs.region.example/x"\n'
                       f'ca_file = "{ca_file}"\n')
        status, lines = _check(home, str(bad))
        assert status == 2, lines
        assert len(lines) == 1 and lines[0].startswith(
            f"config error archive.ca_file {ca_file}: not a readable PEM bundle of CA "
            "certificates ("), lines
        assert why in lines[0]
    assert _tree(home) == before


EMBEDDED_WHY = ('the archive is embedded (archive.kind = "embedded": files on the hub itself, '
                "no connection whose certificate it could verify)")
HTTP_WHY = ("archive.url is http:// ({url}): no TLS, no certificate to verify, the archive "
            "link is not verified")


def _ca_file_unused(ca_file: Path, why: str) -> str:
    return (f"warning: archive.ca_file ({ca_file}) has no effect: {why}; it verifies only an "
            "https:// dicomweb archive")


def test_a_ca_file_that_verifies_nothing_is_said_by_check_and_run(initialised: Path,
                                                                  tmp_path: Path) -> None:
    """``archive.ca_file`` verifies an ``https://`` dicomweb archive only. Set with the
    embedded archive, or an ``http://`` url, it was taken without a word (check: "OK"; run:
    serving), and the operator who set it believed the archive link verified. Now both
    commands say so in one warning line naming the key and why, and still check OK / serve."""
    home = _home(initialised, tmp_path)
    bundle = home / "ca.crt"  # a real PEM bundle: only its use is in question
    ok = f"hub configuration OK: home {home}, https on 0.0.0.0:8443, archive"

    (home / "hub.toml").write_text(f'[archive]\nca_file = "{bundle}"\n')  # embedded, default
    status, lines = _check(home)
    assert status == 0 and lines[0].startswith(f"{ok} embedded;"), lines
    assert lines[1:] == [_ca_file_unused(bundle, EMBEDDED_WHY)], lines

    url = "http://127.0.0.1:8042/dicom-web"  # loopback: allowed in clear, still unverified
    (home / "hub.toml").write_text(f'[archive]\nkind = "dicomweb"\nurl = "{url}"\n'
                                   f'ca_file = "{bundle}"\n')
    status, lines = _check(home)
    assert status == 0 and lines[0].startswith(f"{ok} dicomweb {url};"), lines
    assert lines[1:] == [_ca_file_unused(bundle, HTTP_WHY.format(url=url))], lines

    url = "https://pacs.region.example/dicom-web"  # where it verifies: no warning
    (home / "hub.toml").write_text(f'[archive]\nkind = "dicomweb"\nurl = "{url}"\n'
                                   f'ca_file = "{bundle}"\n')
    status, lines = _check(home)
    assert status == 0 and len(lines) == 1 and lines[0].startswith(f"{ok} dicomweb {url};")

    # pas hub run, the key from the environment (a pas-hub.service drop-in): the warning,
    # then it serves.
    (home / "hub.toml").unlink()
    hub = HubProcess(home, env={"PAS_HUB_ARCHIVE__CA_FILE": str(bundle)}).start()
    try:
        said = [" ".join(line.split()) for line in hub.log().splitlines()]
        assert _ca_file_unused(bundle, EMBEDDED_WHY) in said, said
        assert any(line.startswith("hub serving on https://127.0.0.1:") for line in said), said
    finally:
        hub.stop()


def test_archive_credentials_with_the_embedded_archive_are_said(initialised: Path,
                                                                 tmp_path: Path) -> None:
    """A PACS's credentials with ``kind`` left at "embedded": taken without a word, the
    operator believing the region's studies went to that PACS (they stay on the hub)."""
    home = _home(initialised, tmp_path)
    (home / "hub.toml").write_text('[archive]\nusername = "hub"\npassword = "s3cret-pw"\n')
    status, lines = _check(home)
    assert status == 0, lines
    assert lines[1:] == ["warning: archive.username, archive.password has no effect: the "
                         'archive is embedded (archive.kind = "embedded": files on the hub '
                         'itself, no PACS to sign in to); set kind = "dicomweb" and url to '
                         "archive to a PACS"], lines
    assert "s3cret-pw" not in " ".join(lines)


def test_a_home_that_is_no_hub_is_refused(tmp_path: Path) -> None:
    status, lines = _check(tmp_path / "absent")
    assert (status, lines) == (2, [f"config error home: {tmp_path / 'absent'} is not a "
                                   "folder (no hub there: set PAS_HUB_HOME or home, or run "
                                   "pas hub init)"])
    empty = tmp_path / "empty"
    empty.mkdir()
    status, lines = _check(empty)
    assert (status, lines) == (2, [f"config error home: no hub under {empty} (no ca.crt): run "
                                   "pas hub init, or set PAS_HUB_HOME or home to the hub's "
                                   "home"])
    assert list(empty.iterdir()) == []


def test_a_database_newer_than_this_version_is_refused_and_left_as_it_is(
        initialised: Path, tmp_path: Path) -> None:
    """A hub restored from a newer version's backup, or a downgrade: pas hub run refuses the
    database (SchemaTooNew); the check says it first, for the hub's database and for the
    embedded archive's index, and never migrates or touches either."""
    home = _home(initialised, tmp_path)
    newer = len(HUB_MIGRATIONS) + 1
    _set_schema(home / "hub.sqlite", newer)
    (home / "archive").mkdir()
    index = home / "archive" / "pas.sqlite"
    _set_schema(index, len(MIGRATIONS) + 3)
    before = _tree(home)
    status, lines = _check(home)
    assert status == 2, lines
    assert lines == [
        f"config error home: the hub database {home / 'hub.sqlite'} has schema {newer}, newer "
        f"than this version knows ({len(HUB_MIGRATIONS)}): a newer PAS wrote it; pas hub run "
        "refuses it (install that version or a later one)",
        f"config error home: the embedded archive's index {index} has schema "
        f"{len(MIGRATIONS) + 3}, newer than this version knows ({len(MIGRATIONS)}): a newer "
        "PAS wrote it; pas hub run refuses it (install that version or a later one)"], lines
    assert _tree(home) == before
    assert not any(p.name.endswith(("-wal", "-shm")) for p in home.rglob("*"))

    # With a setting refused as well, one run still names every problem.
    bad = tmp_path / "bad.toml"
    bad.write_text("[http]\nport = 70000\n")
    status, both = _check(home, str(bad))
    assert (status, both) == (2, ["config error http.port: must be 1-65535, got 70000",
                                  *lines]), both
    assert _tree(home) == before


@pytest.mark.parametrize(("host", "said"), [
    # A name the resolver refuses by its syntax alone: no DNS query leaves this host (one
    # like 999.0.0.1 does fail the same way, after asking the configured resolver).
    ("bad host!", "http.host: 'bad host!' does not resolve"),
    ("198.51.100.7", "http.host: '198.51.100.7' is no address of this host (198.51.100.7)"),
])
def test_a_host_the_hub_cannot_listen_on_is_refused(initialised: Path, host: str,
                                                     said: str) -> None:
    """``PAS_HUB_HTTP__HOST=999.0.0.1 pas hub config check`` said "hub configuration OK",
    and ``pas hub run`` then failed ("Name or service not known"); an address of another
    host (TEST-NET-2 here) the same at its bind. The port is not tried: the hub holds it."""
    status, lines = _check(initialised, PAS_HUB_HTTP__HOST=host)
    assert status == 2 and any(line.startswith(f"config error {said}") for line in lines), \
        lines
    status, _ = _check(initialised, PAS_HUB_HTTP__HOST="127.0.0.1")
    assert status == 0


def test_the_units_file_is_read_when_the_home_has_none_and_no_file_is_said(
        initialised: Path, tmp_path: Path) -> None:
    """pas-hub.service runs ``--config /etc/pas/hub.toml`` with no ``hub.toml`` in its home:
    an operator's ``pas hub backup`` as the docs wrote it (``PAS_HUB_HOME`` set, no
    ``--config``) left the configuration out without a word, and ``pas hub config check``
    said the built-in defaults were OK. The unit's file is now read when the home has none,
    and a command that found no file says so."""
    from appliance.hub.config import SYSTEM_HUB_CONFIG, hub_config_path

    home = _home(initialised, tmp_path)
    environ = {"PAS_HUB_HOME": str(home)}
    system = tmp_path / "etc-pas-hub.toml"
    assert hub_config_path(None, environ, system) is None
    system.write_text('[archive]\nkind = "embedded"\n')
    assert hub_config_path(None, environ, system) == system  # the unit's
    (home / "hub.toml").write_text("")
    assert hub_config_path(None, environ, system) == home / "hub.toml"  # the home's first
    assert hub_config_path(tmp_path / "named.toml", environ, system) == tmp_path / "named.toml"
    (home / "hub.toml").unlink()

    # This host has no /etc/pas/hub.toml (a hub host's would be read): none found, said.
    assert not SYSTEM_HUB_CONFIG.exists(), "a hub configuration in /etc/pas on the test host"
    status, lines = _check(home)
    assert status == 0, lines
    assert lines[1:] == ["no configuration file checked: none was found ($PAS_HUB_HOME/"
                         "hub.toml, /etc/pas/hub.toml): this hub runs on its built-in defaults "
                         "and PAS_HUB_* variables; --config FILE names another"], lines
    assert _json(home)["config_file"] is None
    destination = tmp_path / "backups"
    destination.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    made = run_pas(["hub", "backup", str(destination), "--json"],
                   {**clean, "PAS_HUB_HOME": str(home)}, timeout=60)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["config_file"] is None
    assert "no configuration file in the backup: none was found" in " ".join(
        made.stderr.split()), made.stderr
