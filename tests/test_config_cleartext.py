"""Invariant 5, nothing in clear on the WAN: an ``http://`` URL PAS sends patient data to
(``prefetch.dicomweb_url``, a ``stowrs`` destination's ``url``) whose host is not this
machine's loopback is refused by ``pas config check`` and at ``pas run``, naming the key and
the opt-in for a peer on the hospital's own network (``allow_cleartext``, per destination).

Before, both took ``http://`` to any host without a word: a region's DICOMweb or a regional
archive reached across the WAN got every image (and a STOW-RS bearer token or password)
unencrypted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_settings
from tests.support.peers import free_port, run_pas

# The opt-in each refusal names, as the operator reads it.
PREFETCH_REFUSED = ("prefetch.dicomweb_url: http:// sends patient data in clear; use https:// "
                    "(or set prefetch.allow_cleartext = true for a host on the hospital's own "
                    "network)")


def _stow_refused(name: str, what: str = "patient data") -> str:
    return (f"destinations.{name}.url: http:// sends {what} in clear; use https:// (or set "
            f"destinations.{name}.allow_cleartext = true for a host on the hospital's own "
            "network)")


def _pas(args: list[str], tmp_path: Path, timeout: float = 60,
         **env: str) -> subprocess.CompletedProcess[str]:
    """``pas ARGS`` with only the given PAS_* variables and a home of its own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    return run_pas(list(args), {**clean, "PAS_HOME": str(tmp_path / "home"), **env},
                   timeout=timeout)


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8042/dicom-web", "http://127.9.8.7/dicom-web", "http://[::1]:8042/x",
    "http://localhost:8042/dicom-web", "http://LocalHost/dicom-web",
    "https://198.18.0.2/dicom-web", "https://pacs.region.example/dicom-web",
])
def test_loopback_or_https_needs_no_opt_in(url: str) -> None:
    settings = load_settings(environ={
        "PAS_PREFETCH__DICOMWEB_URL": url, "PAS_DESTINATIONS__A__KIND": "stowrs",
        "PAS_DESTINATIONS__A__URL": url, "PAS_DESTINATIONS__A__BEARER_TOKEN": "t"})
    assert settings.prefetch.dicomweb_url == url
    assert settings.destinations["a"].url == url  # type: ignore[union-attr]


@pytest.mark.parametrize("url", [
    "http://198.18.0.2:8042/dicom-web", "http://10.1.2.3/dicom-web",
    "http://pacs.region.example/dicom-web",
    # Names that only look like this machine: not resolved, not loopback.
    "http://127.0.0.1.region.example/x", "http://localhost.region.example/x",
    "http://[::ffff:198.18.0.2]/x",
    # A trailing dot: a fully qualified name the resolver asks DNS for (neither the hosts
    # file's localhost nor an address literal), so DNS decides where it goes (review s40 F3).
    "http://localhost./dicom-web", "http://127.0.0.1.:8080/dicom-web",
    "http://LOCALHOST./dicom-web",
])
def test_http_beyond_loopback_is_refused_naming_the_key(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"PAS_PREFETCH__DICOMWEB_URL": url,
                               "PAS_DESTINATIONS__A__KIND": "stowrs",
                               "PAS_DESTINATIONS__A__URL": url})
    # Each named with the variable that set it (config.name_the_variables).
    assert raised.value.problems == [
        f"{PREFETCH_REFUSED} (set by PAS_PREFETCH__DICOMWEB_URL)",
        f"{_stow_refused('a')} (set by PAS_DESTINATIONS__A__URL)"]


def test_a_url_without_host_or_scheme_is_named() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"PAS_PREFETCH__DICOMWEB_URL": "region.example/dicom-web",
                               "PAS_DESTINATIONS__A__KIND": "stowrs",
                               "PAS_DESTINATIONS__A__URL": "http:///dicom-web"})
    assert raised.value.problems == [
        "prefetch.dicomweb_url: must start with http:// or https://, got "
        "'region.example/dicom-web' (set by PAS_PREFETCH__DICOMWEB_URL)",
        "destinations.a.url: names no host, got 'http:///dicom-web' "
        "(set by PAS_DESTINATIONS__A__URL)"]


def test_config_check_refuses_the_file_and_each_opt_in_covers_its_own_key(
        tmp_path: Path) -> None:
    """Every problem at once, each naming its key; the opt-in of one destination lets only
    that one through (not the prefetch region, not another destination)."""
    config = tmp_path / "appliance.toml"
    config.write_text(
        '[prefetch]\ndicomweb_url = "http://198.18.0.2:8042/dicom-web"\n'
        '[destinations.lan]\nkind = "stowrs"\nurl = "http://198.18.0.3/dicom-web"\n'
        'allow_cleartext = true\n'
        '[destinations.region]\nkind = "stowrs"\nurl = "http://pacs.region.example/dicom-web"\n'
        'bearer_token = "secret"\n')
    result = _pas(["config", "check", str(config)], tmp_path)
    assert result.returncode == 2, _lines(result)
    assert _lines(result) == [
        f"config error {PREFETCH_REFUSED}",
        f"config error {_stow_refused('region', 'patient data and credentials')}"]
    assert not (tmp_path / "home").exists()

    text = config.read_text().replace("[prefetch]\n", "[prefetch]\nallow_cleartext = true\n")
    config.write_text(text.replace('bearer_token = "secret"\n',
                                   'bearer_token = "secret"\nallow_cleartext = true\n'))
    result = _pas(["config", "check", str(config)], tmp_path)
    assert result.returncode == 0, _lines(result)
    assert "configuration OK" in result.stdout and "2 destinations" in result.stdout


def test_config_check_refuses_an_environment_override_and_takes_its_opt_in(
        tmp_path: Path) -> None:
    region = "http://198.18.0.2:8042/dicom-web"
    result = _pas(["config", "check"], tmp_path, PAS_PREFETCH__DICOMWEB_URL=region,
                  PAS_DESTINATIONS__ARCHIVE__KIND="stowrs",
                  PAS_DESTINATIONS__ARCHIVE__URL=region)
    assert result.returncode == 2, _lines(result)
    assert _lines(result) == [
        f"config error {PREFETCH_REFUSED} (set by PAS_PREFETCH__DICOMWEB_URL)",
        f"config error {_stow_refused('archive')} (set by PAS_DESTINATIONS__ARCHIVE__URL)"]

    result = _pas(["config", "check"], tmp_path, PAS_PREFETCH__DICOMWEB_URL=region,
                  PAS_PREFETCH__ALLOW_CLEARTEXT="true",
                  PAS_DESTINATIONS__ARCHIVE__KIND="stowrs",
                  PAS_DESTINATIONS__ARCHIVE__URL=region,
                  PAS_DESTINATIONS__ARCHIVE__ALLOW_CLEARTEXT="true")
    assert result.returncode == 0, _lines(result)
    assert "configuration OK" in result.stdout


def test_pas_run_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    """Nothing started, nothing written: no home, no database. Its ports are free ones on
    loopback, so that the code before the check (which started) bound nothing of others'."""
    config = tmp_path / "appliance.toml"
    config.write_text('[destinations.region]\nkind = "stowrs"\n'
                      'url = "http://pacs.region.example/dicom-web"\n'
                      '[routing.fallback]\ndestinations = ["region"]\n')
    ports = {f"PAS_{key}__PORT": str(free_port()) for key in ("DICOM", "HTTP", "HL7")}
    try:
        result = _pas(["run", "--config", str(config)], tmp_path, timeout=30,
                      PAS_DICOM__HOST="127.0.0.1", PAS_HL7__HOST="127.0.0.1",
                      PAS_PREFETCH__ENABLED="false", **ports)
    except subprocess.TimeoutExpired:
        pytest.fail("pas run started with an http:// destination beyond loopback")
    assert result.returncode == 2, _lines(result)
    assert _lines(result) == [f"config error {_stow_refused('region')}"]
    assert not (tmp_path / "home").exists()
