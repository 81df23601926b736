"""An appliance enrolled as one site whose configuration names another is refused, with the
way out, before it speaks to anyone.

The hub knows an appliance by its certificate's CN (the site of the token it enrolled with);
the appliance's audit trail, status, metrics and backups use the configuration's ``site``.
A file edited or copied from another appliance to say ``CHU-B`` on an appliance enrolled as
``CHU-A`` used to start: its studies and heartbeats went to the region as CHU-A while
everything local said CHU-B. Real peers: ``pas hub run``, ``pas run``, ``pas config check``,
``pas doctor`` and ``pas enroll`` as child processes.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

from appliance.store.hub import list_tokens, open_hub_db
from appliance.transfer.enrolment import SHIPPED_SITE
from tests.support.hub import HubProcess, enroll
from tests.support.peers import PAS_BIN, PasProcess, port_open, run_pas, wait_for


def _pas(env: dict[str, str], *args: str, token: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return run_pas(list(args), env, input=token, timeout=120)


def _unspent(hub: HubProcess, site: str) -> int:
    db = open_hub_db(hub.home / "hub.sqlite")
    try:
        return sum(1 for row in list_tokens(db) if row["site"] == site and row["used_at"] is None)
    finally:
        db.close()


def test_a_configuration_naming_another_site_than_the_enrolment_is_refused_with_the_way_out(
        hub: HubProcess, tmp_path: Path) -> None:
    home = tmp_path / "home"
    enroll(hub, home, "CHU-A")
    config = tmp_path / "appliance.toml"
    config.write_text(f'site = "CHU-B"\nhome = "{home}"\n')
    pas = PasProcess(home)
    env = {**pas.env, "PAS_CONFIG": str(config)}
    certificate = home / "pki" / "client.crt"
    problem = (f"the configuration says site = \"CHU-B\", but this appliance is enrolled "
               f"with the hub as site 'CHU-A' (its certificate {certificate})")
    way_out = ('put back site = "CHU-A", or enrol it as \'CHU-B\' (pas hub token CHU-B at the '
               "region, then pas enroll --replace)")

    # pas run: one line, exit 1, before the home is locked or the index created, no port.
    run = subprocess.Popen([str(PAS_BIN), "run"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: run.poll() is not None or port_open("127.0.0.1", pas.port), 60,
                 what="pas run to exit or open its DICOM port")
        opened = run.poll() is None
    finally:
        if run.poll() is None:
            run.kill()
        out, errors = run.communicate(timeout=30)
    assert not opened, f"pas run started as 'CHU-B' with CHU-A's certificate:\n{errors}"
    assert run.returncode == 1, out + errors
    said = " ".join(errors.split())  # rich wraps long lines at its console's width
    assert said.startswith(f"cannot start: site: {problem}"), said
    assert way_out[1:] in said and "Traceback" not in said, said
    assert not (home / "pas.sqlite").exists() and not (home / "pas.lock").exists()

    # pas config check (pas-upgrade's check before it switches versions): exit 2.
    check = _pas(env, "config", "check", str(config))
    assert check.returncode == 2, check.stdout + check.stderr
    said = " ".join(check.stderr.split())
    assert said.startswith(f"config error site: {problem}") and way_out[1:] in said, said
    answer = _pas(env, "config", "check", str(config), "--json")
    assert answer.returncode == 2, answer.stdout + answer.stderr
    (listed,) = json.loads(answer.stdout)["problems"]
    assert " ".join(listed.split()) == said.removeprefix("config error "), listed

    doctor = _pas(env, "doctor", "--json")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    (site_check,) = [c for c in json.loads(doctor.stdout) if c["name"] == "site"]
    assert site_check["verdict"] == "fail" and site_check["fix"] == way_out, site_check
    assert site_check["detail"].startswith(problem), site_check

    # A token of the enrolled site is refused by a configuration naming another, before
    # anything is sent: the token stays unspent, the enrolment as it was.
    token_a = hub.token("CHU-A")
    before = certificate.read_bytes()
    again = _pas(env, "enroll", "--replace", "--hub", hub.url, "--token", "-",
                 token=f"{token_a}\n")
    assert again.returncode == 1, again.stdout + again.stderr
    said = " ".join(again.stderr.split())
    assert ("the token is for site 'CHU-A' and the configuration says site = \"CHU-B\"" in said
            and "nothing sent to the hub" in said), said
    assert _unspent(hub, "CHU-A") == 1 and certificate.read_bytes() == before

    # The ways out: site put back, or a token of the configured site.
    config.write_text(f'site = "CHU-A"\nhome = "{home}"\n')
    assert _pas(env, "config", "check", str(config)).returncode == 0
    config.write_text(f'site = "CHU-B"\nhome = "{home}"\n')
    token_b = hub.token("CHU-B")
    again = _pas(env, "enroll", "--replace", "--hub", hub.url, "--token", "-",
                 token=f"{token_b}\n")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "enrolled as site CHU-B" in again.stdout
    check = _pas(env, "config", "check", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "configuration OK: site CHU-B" in check.stdout


def test_a_site_differing_only_by_spaces_or_case_is_said_so_and_never_offered_as_a_site(
        hub: HubProcess, tmp_path: Path) -> None:
    """``site = "CHU-A "`` (a space left after the name) on an appliance enrolled as CHU-A
    was told to "enrol it as 'CHU-A ' (pas hub token CHU-A at the region ...)": a name the
    hub refuses to issue a token for, and a command that names the enrolled site again.
    ``site = ""`` got "pas hub token  at the region", the shipped file's placeholder left as
    it was "enrol it as 'CHANGE-ME'", and pas enroll on it "ask regional ops for a token of
    site 'CHANGE-ME'". The refusal stays (the name is not the enrolment's); its words say
    what differs, and offer only the way that exists."""
    home = tmp_path / "home"
    enroll(hub, home, "CHU-A")
    config = tmp_path / "appliance.toml"
    env = {**PasProcess(home).env, "PAS_CONFIG": str(config)}
    env.pop("PAS_SITE", None)
    shipped = tomllib.loads((Path(__file__).parents[1] / "config" / "appliance.toml")
                            .read_text())["site"]
    assert shipped == SHIPPED_SITE  # the placeholder the messages recognise
    said = {}
    for site in ("CHU-A ", "", "chu-a", shipped):
        config.write_text(f'site = {json.dumps(site)}\nhome = "{home}"\n')
        check = _pas(env, "config", "check", str(config))
        assert check.returncode == 2, check.stdout + check.stderr
        said[site] = " ".join(check.stderr.split())
    assert "(they differ only by the spaces around the configured name). Put back site = " \
        '"CHU-A" ("CHU-A " is not a name the hub can enrol (letters, digits, \'-\' or \'_\', ' \
        "at most 64))" in said["CHU-A "], said["CHU-A "]
    assert 'Put back site = "CHU-A" ("" is not a name the hub can enrol' in said[""], said
    assert 'Put back site = "CHU-A" ("CHANGE-ME" is the shipped file\'s placeholder, never ' \
        "set)" in said[shipped], said[shipped]
    for site in ("CHU-A ", "", shipped):
        assert "enrol it as" not in said[site] and "pas hub token" not in said[site], said
    # Another case is another site at the hub: it can be enrolled, and the case is named.
    assert ("(they differ only in case: the hub's site names are case-sensitive). Put back "
            "site = \"CHU-A\", or enrol it as 'chu-a' (pas hub token chu-a at the region, "
            "then pas enroll --replace)") in said["chu-a"], said["chu-a"]
    # pas enroll with a token of CHU-A says to set the name, not to ask for a token of
    # 'CHU-A ' or 'CHANGE-ME' (the token stays unspent); pas doctor's fix is the way out.
    token = hub.token("CHU-A")
    unspent = _unspent(hub, "CHU-A")
    for site, why in (("CHU-A ", "is not a name the hub can enrol (letters, digits, '-' or "
                                 "'_', at most 64)"),
                      (shipped, "the shipped file's placeholder, never set")):
        config.write_text(f'site = {json.dumps(site)}\nhome = "{home}"\n')
        again = _pas(env, "enroll", "--replace", "--hub", hub.url, "--token", "-",
                     token=f"{token}\n")
        assert again.returncode == 1, again.stdout + again.stderr
        assert (f"the configuration says site = {json.dumps(site)} ({why.removeprefix('is ')}"
                f"): set site = \"CHU-A\" first; nothing sent to the hub") in \
            " ".join(again.stderr.split()), again.stderr
    assert _unspent(hub, "CHU-A") == unspent
    doctor = _pas(env, "doctor", "--json")
    (site_check,) = [c for c in json.loads(doctor.stdout) if c["name"] == "site"]
    assert site_check["fix"] == ('put back site = "CHU-A" ("CHANGE-ME" is the shipped '
                                 "file's placeholder, never set)"), site_check
