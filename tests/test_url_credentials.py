"""Credentials in a URL (review s40 F1): ``scheme://user:password@host/...`` is refused in every
configured URL (a ``stowrs`` destination's ``url``, ``prefetch.dicomweb_url``, the hub's
``archive.url``), naming the key and where credentials go instead; and whatever message is
built from a URL carries it without userinfo or query string.

Before, the URL was taken: httpx sent its userinfo as HTTP Basic, and every failure wrote the
URL, password included, to the journal, the job's ``last_error``, ``pas status``, the
heartbeat and the hub's fleet pages (open to anyone by default). The hub's ``[archive]`` had
no credential keys: the URL was the only place for the regional PACS's password.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_settings
from tests.support.http_peers import DicomWebRecorder, HangUp
from tests.support.peers import free_port, run_pas

SECRET = "S3cretPassw0rd"
STOW_INSTEAD = ("write the URL without them and put them in destinations.{name}.username and "
                "destinations.{name}.password (HTTP Basic) or destinations.{name}.bearer_token")
HOLDS = ("holds credentials (user:password@host): a URL is written wherever it is shown (log "
         "lines, a job's error, `pas status`, the heartbeat and the hub's fleet pages); ")


def _pas(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    result = run_pas(args, {**clean, **env}, timeout=60)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("url", [
    f"https://pasuser:{SECRET}@pacs.region.example/dicom-web",
    f"http://pasuser:{SECRET}@127.0.0.1:8042/dicom-web",
    "https://token-only@pacs.region.example/dicom-web",
    # A password holding "/", "?" or "#" (a generated or base64 one): urlsplit ends the
    # authority there, and the refusal printed the whole URL ("is not a URL (Port could not
    # be cast to integer value as 'S3cr'), got 'https://pacsuser:S3cr/etPw@...'").
    f"https://pacsuser:{SECRET[:4]}/{SECRET[4:]}@pacs.region.example/dicom-web",
    f"https://pacsuser:{SECRET[:4]}?{SECRET[4:]}@pacs.region.example/dicom-web",
    f"https://pacsuser:{SECRET[:4]}#{SECRET[4:]}@pacs.region.example:8443/dicom-web",
])
def test_credentials_in_a_url_are_refused_naming_the_key_and_the_keys_instead(
        url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"PAS_PREFETCH__DICOMWEB_URL": url,
                               "PAS_DESTINATIONS__A__KIND": "stowrs",
                               "PAS_DESTINATIONS__A__URL": url})
    problems = raised.value.problems
    assert problems == [
        f"prefetch.dicomweb_url: {HOLDS}write the URL without them and put them in "
        "prefetch.dicomweb_username and prefetch.dicomweb_password (HTTP Basic) or "
        "prefetch.dicomweb_bearer_token (set by PAS_PREFETCH__DICOMWEB_URL)",
        f"destinations.a.url: {HOLDS}{STOW_INSTEAD.format(name='a')} "
        "(set by PAS_DESTINATIONS__A__URL)"]
    assert not any(SECRET in problem or SECRET[:4] in problem or SECRET[4:] in problem
                   for problem in problems)


def test_config_check_refuses_a_destination_url_with_credentials(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[destinations.archive]\nkind = "stowrs"\n'
                      f'url = "https://pasuser:{SECRET}@pacs.region.example/dicom-web"\n')
    code, output = _pas(["config", "check", str(config)], {"PAS_HOME": str(tmp_path / "h")})
    assert code == 2, output
    assert output.strip() == (f"config error destinations.archive.url: {HOLDS}"
                              f"{STOW_INSTEAD.format(name='archive')}")
    assert SECRET not in output


def test_hub_config_check_refuses_credentials_in_archive_url_and_takes_its_keys(
        tmp_path: Path) -> None:
    """The hub's archive had no credential keys; now username/password or bearer_token, and
    the cleartext refusal names the credentials when some are set."""
    from appliance.hub.config import ArchiveSection

    with pytest.raises(Exception) as raised:  # noqa: PT011 - pydantic's ValidationError
        ArchiveSection(kind="dicomweb", url=f"https://u:{SECRET}@pacs.dc.example/dicom-web")
    assert "holds credentials" in str(raised.value) and "archive.username" not in str(
        raised.value)  # {section} is filled by the loader, checked below through the CLI
    section = ArchiveSection(kind="dicomweb", url="https://pacs.dc.example/dicom-web",
                             username="hub", password=SECRET)
    assert section.username == "hub"
    with pytest.raises(Exception) as raised:  # noqa: PT011 - a "/" in the password
        ArchiveSection(kind="dicomweb",
                       url=f"https://u:{SECRET[:4]}/{SECRET[4:]}@pacs.dc.example/dicom-web")
    assert "holds credentials" in str(raised.value)
    assert SECRET[:4] not in str(raised.value) and SECRET[4:] not in str(raised.value)
    with pytest.raises(Exception) as raised:  # noqa: PT011
        ArchiveSection(kind="dicomweb", url="http://pacs.dc.example/dicom-web",
                       bearer_token=SECRET)
    assert "every study the sites send and the archive's credentials in clear" in str(
        raised.value)

    home = tmp_path / "hub"
    home.mkdir()
    (home / "hub.toml").write_text(
        '[archive]\nkind = "dicomweb"\n'
        f'url = "https://pacsuser:{SECRET}@pacs.dc.example/dicom-web"\n')
    code, output = _pas(["hub", "config", "check"], {"PAS_HUB_HOME": str(home)})
    assert code == 2, output
    assert (f"archive.url: {HOLDS}write the URL without them and put them in "
            "archive.username and archive.password (HTTP Basic) or archive.bearer_token"
            in " ".join(output.split())), output
    assert SECRET not in output


@pytest.mark.parametrize(("keys", "expected"), [
    ({"username": "hub", "password": SECRET}, "Basic aHViOlMzY3JldFBhc3N3MHJk"),
    ({"bearer_token": SECRET}, f"Bearer {SECRET}"),
])
def test_the_hub_sends_the_archive_credentials_on_qido_and_stow(
        recorder: DicomWebRecorder, tmp_path: Path, keys: dict[str, str], expected: str) -> None:
    from appliance.hub.archive import ArchiveRefused, DicomWebArchive, RebuiltInstance
    from appliance.hub.config import ArchiveSection

    archive = DicomWebArchive(ArchiveSection(kind="dicomweb", url=recorder.url, **keys))
    part = tmp_path / "one.dcm"
    part.write_bytes(b"\0" * 256)
    with contextlib.suppress(ArchiveRefused):  # an empty 200 names no instance stored
        archive.store([RebuiltInstance("1.2.3.4", part, 256, "0" * 64)], "SITE-A")
    assert [(m, p) for m, p, _a in recorder.seen] == [("GET", "/dicom-web/instances"),
                                                      ("POST", "/dicom-web/studies")]
    assert {a for _m, _p, a in recorder.seen} == {expected}


def test_hub_archive_log_lines_carry_no_userinfo(caplog: pytest.LogCaptureFixture,
                                                  tmp_path: Path) -> None:
    """Defence in depth: even a URL that slipped past the check (built without validation
    here) is logged without its userinfo."""
    from appliance.hub.archive import DicomWebArchive, RebuiltInstance
    from appliance.hub.config import ArchiveSection

    port = free_port()  # nothing listens: connection refused
    section = ArchiveSection.model_construct(
        kind="dicomweb", url=f"http://pacsuser:{SECRET}@127.0.0.1:{port}/dicom-web",
        allow_cleartext=False, ca_file=None, instances_per_request=16, timeout_s=5.0,
        bearer_token=None, username=None, password=None)
    archive = DicomWebArchive(section)
    part = tmp_path / "one.dcm"
    part.write_bytes(b"\0" * 16)
    with caplog.at_level(logging.WARNING, logger="pas.hub.archive"), \
            pytest.raises(Exception):  # noqa: B017, PT011 - refused: the archive is down
        archive.store([RebuiltInstance("1.2.3.4", part, 16, "0" * 64)], "SITE-A")
    assert f"QIDO-RS to http://127.0.0.1:{port}/dicom-web failed" in caplog.text
    assert SECRET not in caplog.text and "pacsuser" not in caplog.text


def test_stowrs_failure_message_carries_no_userinfo(tmp_path: Path) -> None:
    """The job's last_error, the uplink row and the pas.dispatch warning are these words."""
    from appliance.config import StowRsDestination
    from appliance.dispatch.target_types.stowrs import StowRsTarget
    from appliance.store.db import Database

    port = free_port()
    config = StowRsDestination.model_construct(
        kind="stowrs", url=f"http://pasuser:{SECRET}@127.0.0.1:{port}/dicom-web",
        allow_cleartext=False, instances_per_request=16, bearer_token=None, username=None,
        password=None, client_cert=None, client_key=None, ca_file=None, timeout_s=5.0)
    target = StowRsTarget("archive", config)
    db = Database(tmp_path / "pas.sqlite")

    class _Context:
        def __init__(self) -> None:
            self.db = db
            self.spool = self

        def path(self, name: str) -> Path:
            path = tmp_path / name
            path.write_bytes(b"\0" * 16)
            return path

    import appliance.dispatch.target_types.stowrs as stowrs

    stowrs.RETRIES, saved = 0, stowrs.RETRIES  # one try: the port refuses at once
    try:
        with target._client() as client, pytest.raises(Exception) as raised:  # noqa: PT011
            target._post(client, _Context(), [{"path": "a.dcm"}])  # type: ignore[arg-type]
    finally:
        stowrs.RETRIES = saved
    assert f"no connection to http://127.0.0.1:{port}/dicom-web/studies" in str(raised.value)
    assert SECRET not in str(raised.value) and "pasuser" not in str(raised.value)
    rows = db.connection().execute("SELECT * FROM uplink_state").fetchall()
    assert rows and SECRET not in json.dumps([list(r) for r in rows], default=str)


def test_the_heartbeat_takes_userinfo_out_of_errors_written_before() -> None:
    """A job failed before the check refused such URLs kept the password in last_error; the
    heartbeat carries it to the hub's fleet pages."""
    from appliance.transfer.http import shown_url, without_userinfo

    old = (f"archive: STOW-RS to http://pasuser:{SECRET}@127.0.0.1:34887/dicom-web/studies "
           "failed: RemoteProtocolError")
    assert without_userinfo(old) == ("archive: STOW-RS to http://127.0.0.1:34887/dicom-web/"
                                     "studies failed: RemoteProtocolError")
    assert without_userinfo(f"to https://u:p@ss{SECRET}@h/x") == "to https://h/x"
    # A password holding "/", "?" or "#" was cut there, and its rest left in the words.
    for mark in "/?#":
        written = f"STOW-RS to https://u:{SECRET[:4]}{mark}{SECRET[4:]}@h/x failed: 'y'"
        assert without_userinfo(written) == "STOW-RS to https://h/x failed: 'y'"
    assert shown_url(f"https://u:{SECRET}@[::1]:8443/a?token={SECRET}#f") == \
        "https://[::1]:8443/a"


def test_pas_run_refuses_a_destination_url_with_credentials_without_echoing_them(
        tmp_path: Path) -> None:
    """Before: it started, and the first failure wrote the password everywhere."""
    import subprocess

    config = tmp_path / "appliance.toml"
    config.write_text('[destinations.archive]\nkind = "stowrs"\n'
                      f'url = "http://pasuser:{SECRET}@127.0.0.1:{free_port()}/dicom-web"\n'
                      '[routing.fallback]\ndestinations = ["archive"]\n')
    ports = {f"PAS_{key}__PORT": str(free_port()) for key in ("DICOM", "HTTP", "HL7")}
    env = {"PAS_HOME": str(tmp_path / "home"), "PAS_DICOM__HOST": "127.0.0.1",
           "PAS_HL7__HOST": "127.0.0.1", "PAS_PREFETCH__ENABLED": "false", **ports}
    try:
        code, output = _pas(["run", "--config", str(config)], env)
    except subprocess.TimeoutExpired:
        pytest.fail("pas run started with user:password@ in a destination's url")
    assert code == 2, output
    assert output.strip() == (f"config error destinations.archive.url: {HOLDS}"
                              f"{STOW_INSTEAD.format(name='archive')}")


def test_the_password_key_is_shown_nowhere_while_the_destination_fails(
        pas_factory, tmp_path: Path) -> None:
    """The way credentials go now (username/password keys): the job fails, and neither the
    journal, ``pas status --json`` nor the job's last_error holds the password. (A guard:
    the keys were not shown before either; the URL was.)"""
    from tests.support.peers import CT_DIR, read_rows, storescu, wait_for

    down = HangUp()
    try:
        config = tmp_path / "appliance.toml"
        config.write_text(
            '[queue]\nmax_attempts = 1\n[routing.fallback]\ndestinations = ["archive"]\n'
            '[destinations.archive]\nkind = "stowrs"\n'
            f'url = "http://127.0.0.1:{down.port}/dicom-web"\n'
            f'username = "pasuser"\npassword = "{SECRET}"\ntimeout_s = 5\n')
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        storescu(sorted(CT_DIR.glob("*.dcm"))[:1], pas.port)
        jobs = wait_for(lambda: [r for r in read_rows(
            pas.home / "pas.sqlite", "SELECT state, last_error FROM jobs")
            if r["state"] == "failed"], timeout=60, what="the job failed")
        assert f"STOW-RS to http://127.0.0.1:{down.port}/dicom-web/studies failed" in \
            jobs[0]["last_error"]
        status = pas.cli("status", "--json").stdout
        assert "STOW-RS to" in status
        for shown in (jobs[0]["last_error"], status, pas.log()):
            assert SECRET not in shown
    finally:
        down.close()
