"""pas-firstboot (image/rootfs/usr/local/sbin/pas-firstboot), no VM needed: the seed and the
console questions, what it writes (the configuration, the firewall's sets), the enrolment
and its later tries, the hub's addresses let out by the firewall. Its steps that touch the
system are recorded, or pointed at files under the test's folder; ``pas config check`` is
this checkout's where the test says so. The booted image is tests/image/test_image.py's.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.peers import PAS_BIN, ROOT
from tests.support.scripts import script_module

NFT_CONF = ROOT / "image" / "rootfs" / "etc" / "nftables.conf"


def test_the_configuration_first_boot_writes_keeps_the_home_and_the_shipped_keys(
        tmp_path: Path) -> None:
    """No VM needed. pas-firstboot replaces the shipped /etc/pas/appliance.toml with one made
    from the seed; it left out ``home``, so on every seeded appliance ``pas status`` in an
    administrator's shell read ./var (docs/operations.md says it reads /var/lib/pas), and
    dropped the shipped ``storage.min_free_mb``."""
    import tomllib

    from appliance.config import load_settings

    firstboot = _firstboot()

    # A title given twice is one entry (PAS refuses a title listed twice).
    seed = {"site": "CH-Exemple", "ae_title": "PAS", "known_aes": ["CT_URG", "MR1", "CT_URG "]}
    written = tmp_path / "appliance.toml"
    written.write_text(firstboot.config_text(seed))
    shell: dict[str, str] = {}  # an administrator's shell: no PAS_HOME, no PAS_CONFIG
    settings = load_settings(written, shell)
    unit = (ROOT / "image" / "systemd" / "pas.service").read_text()
    (unit_home,) = re.findall(r"^Environment=PAS_HOME=(\S+)$", unit, re.M)
    assert str(settings.home) == unit_home
    assert settings.site == "CH-Exemple" and settings.dicom.ae_title == "PAS"
    assert [a.title for a in settings.dicom.known_aes] == ["CT_URG", "MR1"]
    assert not settings.dicom.accept_unknown
    assert settings.http.host == "0.0.0.0"
    # Every key the shipped file sets and the seed does not answer keeps its shipped value.
    shipped = tomllib.loads((ROOT / "config" / "appliance.toml").read_text())
    mine = tomllib.loads(written.read_text())
    for key, value in shipped.items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                if (key, inner) != ("dicom", "known_aes"):
                    assert mine.get(key, {}).get(inner) == inner_value, f"{key}.{inner}"
        elif key != "site":
            assert mine.get(key) == value, key


def test_first_boot_enrols_on_the_configuration_the_unit_runs_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No VM needed. pas-firstboot's ``pas enroll`` names the file pas.service's ``pas run``
    reads (``--config``), so the enrolment lands under the home the daemon uses, whatever the
    environment runuser passes on. The token goes through standard input, never the
    command line (which every local user reads in the process list)."""
    firstboot = _firstboot()
    commands: list[tuple[list[str], object]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append((command, kwargs.get("input")))
        return subprocess.CompletedProcess(command, 0, "enrolled", "")

    monkeypatch.setattr(firstboot.subprocess, "run", run)
    token = "SITE-A.SECRET"
    assert firstboot.enrol({"hub": {"url": "https://hub.example:8443", "token": token}})
    ((command, given),) = commands
    unit = (ROOT / "image" / "systemd" / "pas.service").read_text()
    (unit_config,) = re.findall(r"^ExecStart=/usr/bin/pas run --config (\S+)$", unit, re.M)
    assert command[command.index("enroll"):] == [
        "enroll", "--config", unit_config, "--hub", "https://hub.example:8443", "--token", "-"]
    assert given == f"{token}\n" and not any(token in word for word in command)


def _under(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           **in_etc: str) -> tuple[Any, Path, Path]:
    """pas-firstboot with its files under ``tmp_path``: /etc/pas as ``etc`` (and each of
    ``in_etc``'s constants a file named there), /var/lib/pas as ``var``."""
    firstboot = _firstboot()
    etc, home = tmp_path / "etc", tmp_path / "var"
    etc.mkdir()
    for name, value in (("CONFIG", etc / "appliance.toml"), ("HOME", str(home)),
                        ("MARKER", home / ".firstboot-done"),
                        ("CONFIGURED", etc / ".firstboot-configured"),
                        ("PENDING_HUB", etc / "firstboot-hub.toml"),
                        ("FIREWALL_HUB", etc / "firewall-hub.toml"),
                        *((constant, etc / file) for constant, file in in_etc.items())):
        monkeypatch.setattr(firstboot, name, value)
    return firstboot, etc, home


def test_first_boot_writes_the_site_once_and_only_retries_the_enrolment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No VM needed. A first boot whose enrolment failed (the hub not reachable yet) ran whole
    again at every boot: /etc/pas/appliance.toml, the network and the firewall sets were
    written again from the seed, undoing what IT had changed since. Now the site's files are
    written once; later boots only enrol, with the seed's hub kept root-only until then; an
    appliance enrolled by hand meanwhile counts as enrolled."""
    firstboot, etc, home = _under(tmp_path, monkeypatch)
    seed = {"site": "SITE-A", "known_aes": ["CT1"],
            "hub": {"url": "https://hub.example:8443", "token": "SITE-A.SECRET"}}
    seeds_read: list[int] = []
    monkeypatch.setattr(firstboot, "load_seed", lambda: seeds_read.append(1) or seed)
    written: list[str] = []
    for step in ("write_network", "write_firewall", "write_ssh"):
        monkeypatch.setattr(firstboot, step, lambda _seed, step=step: written.append(step))
    monkeypatch.setattr(firstboot, "allow_hub", lambda _seed: written.append("allow_hub"))
    hub_up = {"up": False}
    enrolments: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if "enroll" in command:
            enrolments.append([*command, str(kwargs.get("input"))])
            if not hub_up["up"]:
                return subprocess.CompletedProcess(command, 1, "", "hub unreachable")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(firstboot.subprocess, "run", run)

    firstboot.main()  # first boot: the hub cannot be reached yet
    assert not firstboot.MARKER.exists() and firstboot.CONFIGURED.exists()
    assert written == ["write_network", "write_firewall", "write_ssh"]
    assert firstboot.PENDING_HUB.stat().st_mode & 0o777 == 0o600
    config = firstboot.CONFIG.read_text()
    assert 'title = "CT1"' in config
    firstboot.CONFIG.write_text(config.replace('title = "CT1"', 'title = "CT1" }, { title = "MR2"'))
    changed = firstboot.CONFIG.read_text()

    firstboot.main()  # second boot: still unreachable, IT's change kept
    hub_up["up"] = True
    firstboot.main()  # third boot: enrolled
    assert seeds_read == [1]
    assert written == ["write_network", "write_firewall", "write_ssh", "allow_hub", "allow_hub"]
    assert firstboot.CONFIG.read_text() == changed
    assert len(enrolments) == 3
    assert all(c[-5:] == ["--hub", "https://hub.example:8443", "--token", "-",
                          "SITE-A.SECRET\n"] for c in enrolments)
    assert firstboot.MARKER.exists() and not firstboot.PENDING_HUB.exists()

    # Enrolled by hand after a failed first boot: the next boot does not enrol again.
    for path in (firstboot.MARKER, firstboot.CONFIGURED):
        path.unlink()
    hub_up["up"] = False
    firstboot.main()
    assert not firstboot.MARKER.exists()
    (home / "pki").mkdir(parents=True)
    (home / "pki" / "hub.json").write_text("{}")
    firstboot.main()
    assert firstboot.MARKER.exists() and len(enrolments) == 4


def _firstboot() -> Any:
    """/usr/local/sbin/pas-firstboot as a module (a script without .py), to call its parts."""
    return script_module(ROOT / "image" / "rootfs" / "usr" / "local" / "sbin" / "pas-firstboot",
                         "pas_firstboot")


def _console(tmp_path: Path, answers: list[tuple[str, str]]) -> tuple[dict[str, Any], bytes]:
    """pas-firstboot's questions (``ask()``) on a pty, as on the console: each answer typed
    once the line shown so far holds its prompt's words, in order. The seed they make and
    everything the terminal showed."""
    import json
    import pty
    import select
    import sys

    out = tmp_path / "seed.json"
    out.unlink(missing_ok=True)
    script = ROOT / "image" / "rootfs" / "usr" / "local" / "sbin" / "pas-firstboot"
    child = ("import importlib.machinery, importlib.util, json, sys\n"
             f"loader = importlib.machinery.SourceFileLoader('fb', {str(script)!r})\n"
             "spec = importlib.util.spec_from_loader('fb', loader)\n"
             "fb = importlib.util.module_from_spec(spec); loader.exec_module(fb)\n"
             f"open({str(out)!r}, 'w').write(json.dumps(fb.ask()))\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal, as the console is
        os.execv(sys.executable, [sys.executable, "-c", child])
    shown = b""
    pending = list(answers)
    while True:
        ready, _, _ = select.select([fd], [], [], 30)
        assert ready, f"no question after 30 s; the console showed {shown!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child ended and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
        if pending and pending[0][0].encode() in shown.rsplit(b"\n", 1)[-1] + chunk:
            os.write(fd, pending.pop(0)[1].encode() + b"\n")
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, shown.decode(errors="replace")
    assert not pending, shown.decode(errors="replace")
    return json.loads(out.read_text()), shown


# The console's firewall questions, each answered with Enter.
NO_NETWORKS = [("PACS and workstations", ""), ("Management networks", ""),
               ("status page and DICOMweb", "")]


def _token(site: str, secret: str = "s3cretTokenPart0123") -> str:
    """A token as ``pas hub token SITE`` prints it (SITE.SECRET.CAFP)."""
    return f"{site}.{secret}.{'ab' * 32}"


def test_a_hub_name_that_did_not_resolve_at_first_boot_is_let_out_at_a_later_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No VM needed. The firewall lets out to the hub only its addresses, resolved when first
    boot writes the sets. A hub name that did not resolve then (DNS not up yet) was never
    added, though first boot said "allowing it after the next boot": later boots only tried
    the enrolment, which the firewall dropped at every boot. Now each later boot's try
    resolves the hub again into a file of its own, loaded before the enrolment; the site's
    sets are left as IT may have changed them."""
    from tests.image.test_firewall import check

    firstboot, etc, home = _under(tmp_path, monkeypatch, SETS="pas-sets.nft",
                                  HUB_SET="pas-hub.nft")
    monkeypatch.setattr(firstboot, "NFT_CONF", NFT_CONF)
    seed = {"site": "SITE-A", "firewall": {"management": ["10.9.0.0/16"]},
            "hub": {"url": "https://hub.region.example:8443", "token": "SITE-A.SECRET"}}
    monkeypatch.setattr(firstboot, "load_seed", lambda: seed)
    for step in ("write_network", "write_ssh"):
        monkeypatch.setattr(firstboot, step, lambda _seed: None)
    dns = {"up": False}

    def getaddrinfo(host: str, *_: object) -> list[tuple[Any, ...]]:
        assert host == "hub.region.example"
        if not dns["up"]:
            raise OSError("Temporary failure in name resolution")
        return [(2, 1, 6, "", ("198.18.5.10", 0)), (2, 2, 17, "", ("198.18.5.10", 0))]

    monkeypatch.setattr(firstboot.socket, "getaddrinfo", getaddrinfo)
    steps: list[str] = []
    real_run = subprocess.run

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        steps.append(" ".join(command[:3]))
        if command[0] == "nft":  # the check before a sets file is written: the real one
            return real_run(command, **kwargs)  # type: ignore[call-overload,no-any-return]
        failed = "enroll" in command and not firstboot.HUB_SET.exists()  # the firewall drops
        return subprocess.CompletedProcess(command, 1 if failed else 0, "", "")

    monkeypatch.setattr(firstboot.subprocess, "run", run)

    firstboot.main()  # first boot: no DNS yet
    assert "hub_addrs" not in firstboot.SETS.read_text()
    assert not firstboot.MARKER.exists() and not firstboot.HUB_SET.exists()
    sets = firstboot.SETS.read_text()
    dns["up"] = True
    steps.clear()
    firstboot.main()  # a later boot: resolved, let out, enrolled
    assert firstboot.HUB_SET.read_text().splitlines()[1:] == [
        "add element inet pas hub_addrs { 198.18.5.10 }"]
    assert steps == ["nft -c -f", "systemctl reload-or-restart nftables.service",
                     "runuser -u pas"]
    assert firstboot.MARKER.exists() and firstboot.SETS.read_text() == sets
    loaded = check(tmp_path, sets, firstboot.HUB_SET.read_text())  # one ruleset, valid nft
    assert loaded.returncode == 0, loaded.stderr


def test_the_hourly_step_follows_the_enrolled_hubs_addresses_and_keeps_them_in_an_outage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No VM needed. Once enrolled nothing resolved the hub again: a hub the region moved to
    another address was dropped by every appliance's firewall until someone edited the set
    on each. Now ``pas-firstboot --hub-addresses`` (pas-hub-addresses.timer, hourly) resolves
    the hub root recorded (FIREWALL_HUB), rewrites the hub's own file (checked by nft beside the
    site's sets and whatever else the folder holds) and reloads the firewall only when the
    addresses changed; a name that does not resolve keeps the last ones; an enrolment it
    cannot read changes nothing, without a traceback."""
    import json

    firstboot = _firstboot()
    home = tmp_path / "var"
    (home / "pki").mkdir(parents=True)
    enrolled = home / "pki" / "hub.json"
    enrolled.write_text(json.dumps({"url": "https://hub.region.example:8443", "site": "SITE-A"}))
    record = tmp_path / "firewall-hub.toml"
    record.write_text('[hub]\nurl = "https://hub.region.example:8443"\n')
    folder = tmp_path / "nftables.d"
    folder.mkdir()
    # The folder as on an appliance: first boot's sets (the hub's address once in them, as
    # before this file existed, would make a neighbour a conflict), a hub host's opening by
    # symlink, and an editor's lock file, a dangling symlink nft's include does not read.
    (folder / "pas-sets.nft").write_text(firstboot.firewall_sets({"management": ["10.9.0.0/16"]}))
    (folder / "pas-hub-host.nft").symlink_to(
        ROOT / "image/rootfs/etc/nftables.d.available/pas-hub-host.nft")
    (folder / ".#pas-sets.nft").symlink_to("root@pas.1234:1700000000")
    for name, value in (("HOME", str(home)), ("PENDING_HUB", tmp_path / "none.toml"),
                        ("FIREWALL_HUB", record),
                        ("HUB_SET", folder / "pas-hub.nft"), ("NFT_CONF", NFT_CONF)):
        monkeypatch.setattr(firstboot, name, value)
    answer: dict[str, list[str]] = {"addresses": ["198.18.5.10"]}

    def getaddrinfo(host: str, *_: object) -> list[tuple[Any, ...]]:
        assert host == "hub.region.example"
        if not answer["addresses"]:
            raise OSError("Temporary failure in name resolution")
        return [(2, 1, 6, "", (address, 0)) for address in answer["addresses"]]

    monkeypatch.setattr(firstboot.socket, "getaddrinfo", getaddrinfo)
    reloads: list[list[str]] = []
    real_run = subprocess.run

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if command[0] == "nft":  # the check before the file is written: the real one
            return real_run(command, **kwargs)  # type: ignore[call-overload,no-any-return]
        reloads.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(firstboot.subprocess, "run", run)

    def hourly() -> list[str]:  # what the service's --hub-addresses runs
        firstboot.allow_hub(firstboot.firewall_hub(), "try-reload-or-restart")
        return firstboot.HUB_SET.read_text().splitlines()[1:]

    assert hourly() == ["add element inet pas hub_addrs { 198.18.5.10 }"]
    assert hourly() == ["add element inet pas hub_addrs { 198.18.5.10 }"]
    # Once, unchanged after; a firewall an administrator stopped is not started by the hour.
    assert reloads == [["systemctl", "try-reload-or-restart", "nftables.service"]]
    answer["addresses"] = ["198.18.5.11"]  # moved next door: the old one no longer let out
    assert hourly() == ["add element inet pas hub_addrs { 198.18.5.11 }"]
    answer["addresses"] = ["198.18.7.20", "198.18.5.11", "198.18.5.10"]  # more of them
    assert hourly() == ["add element inet pas hub_addrs { 198.18.5.10/31, 198.18.7.20 }"]
    answer["addresses"] = []  # a DNS outage: the link is not cut
    assert hourly() == ["add element inet pas hub_addrs { 198.18.5.10/31, 198.18.7.20 }"]
    assert len(reloads) == 3
    # What it cannot read changes nothing: an enrolment without its URL, a pending hub that
    # is not TOML.
    before = firstboot.HUB_SET.read_text()
    record.write_text("[hub]\n")
    assert hourly()[0].endswith("198.18.7.20 }")
    record.write_text('[hub]\nurl = "https://hub.region.example:8443\n')
    assert firstboot.firewall_hub() == {}
    record.unlink()
    firstboot.PENDING_HUB.write_text('[hub]\nurl = "https://hub.region.example:8443\n')
    assert firstboot.firewall_hub() == {}
    assert firstboot.HUB_SET.read_text() == before and len(reloads) == 3
    # A file nft would refuse is not written, and nothing reloads: the rules in force stay.
    assert not firstboot.install_sets(firstboot.HUB_SET,
                                      "add element inet pas nosuchset { 10.0.0.0/8 }\n")
    assert firstboot.HUB_SET.read_text() == before and len(reloads) == 3
    assert sorted(p.name for p in folder.iterdir()) == [
        ".#pas-sets.nft", "pas-hub-host.nft", "pas-hub.nft", "pas-sets.nft"]  # nothing staged


def _hourly_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                resolves: dict[str, list[str]]) -> tuple[Any, list[list[str]]]:
    """pas-firstboot with its files under ``tmp_path`` (/etc/pas as etc, the firewall's
    folder as nftables.d beside the shipped nftables.conf), names resolved from
    ``resolves`` only (any other name is a failure of the test), nft's check the real one
    and every other command recorded."""
    firstboot, etc, home = _under(tmp_path, monkeypatch)
    folder = tmp_path / "nftables.d"
    folder.mkdir()
    for name, value in (("HUB_SET", folder / "pas-hub.nft"), ("SETS", folder / "pas-sets.nft"),
                        ("NFT_CONF", NFT_CONF)):
        monkeypatch.setattr(firstboot, name, value)

    def getaddrinfo(host: str, *_: object) -> list[tuple[Any, ...]]:
        assert host in resolves, f"resolved {host!r}, a name root was never given"
        return [(2, 1, 6, "", (address, 0)) for address in resolves[host]]

    monkeypatch.setattr(firstboot.socket, "getaddrinfo", getaddrinfo)
    commands: list[list[str]] = []
    real_run = subprocess.run

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if command[0] == "nft":
            return real_run(command, **kwargs)  # type: ignore[call-overload,no-any-return]
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(firstboot.subprocess, "run", run)
    (home / "pki").mkdir(parents=True)
    return firstboot, commands


def test_the_hourly_step_never_lets_the_firewall_out_to_a_host_pas_wrote_in_its_enrolment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """No VM needed. The hourly step ran as root on pki/hub.json's URL, a file PAS's user
    writes: a compromised daemon that put its own host there had the egress firewall opened
    to that host within the hour. Now root follows only the hub it was told (the seed's, or
    ``--enrol URL``'s: FIREWALL_HUB, root's); another name in pki/hub.json is said, not
    resolved. An appliance first booted before that record is given the enrolled hub only
    when the firewall already lets out to all its addresses, which root wrote."""
    import json

    hub, other = "hub.region.example", "exfil.example"
    firstboot, commands = _hourly_rig(tmp_path, monkeypatch,
                                      {hub: ["198.18.5.10"], other: ["198.18.9.9"]})
    enrolled = tmp_path / "var" / "pki" / "hub.json"

    def hourly() -> str:
        firstboot.allow_hub(firstboot.firewall_hub(), "try-reload-or-restart")
        return firstboot.HUB_SET.read_text() if firstboot.HUB_SET.exists() else ""

    firstboot.write_firewall({"hub": {"url": f"https://{hub}:8443"}})  # first boot's seed
    assert firstboot.FIREWALL_HUB.stat().st_mode & 0o777 == 0o644
    let_out = firstboot.HUB_SET.read_text()
    assert "{ 198.18.5.10 }" in let_out
    enrolled.write_text(json.dumps({"url": f"https://{hub}:8443", "site": "SITE-A"}))
    assert hourly() == let_out
    capsys.readouterr()
    enrolled.write_text(json.dumps({"url": f"https://{other}:443", "site": "SITE-A"}))
    assert hourly() == let_out and "198.18.9.9" not in hourly()
    said = capsys.readouterr().out
    assert f"names the hub {other!r}, not {hub!r}" in said and "--enrol URL" in said

    # First booted before FIREWALL_HUB: pki/hub.json's hub only once all its addresses are
    # already let out; then recorded, and followed hourly from the record.
    firstboot.FIREWALL_HUB.unlink()
    capsys.readouterr()
    assert hourly() == let_out and not firstboot.FIREWALL_HUB.exists()
    said = capsys.readouterr().out
    assert f"the enrolled hub {other!r} (198.18.9.9) is not one the firewall lets out" in said
    enrolled.write_text(json.dumps({"url": f"https://{hub}:8443", "site": "SITE-A"}))
    assert hourly() == let_out
    assert firstboot.firewall_hub() == {"hub": {"url": f"https://{hub}:8443"}}
    assert [c for c in commands if c[0] == "systemctl"] == [
        ["systemctl", "reload-or-restart", "nftables.service"]] * 2  # first boot's only


def test_enrolling_by_hand_lets_the_firewall_out_to_the_hub_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """No VM needed. An appliance whose seed named no hub was told to enrol by hand with
    ``runuser -u pas -- pas enroll``, through a firewall that let out to no hub: the
    enrolment could not connect. ``pas-firstboot --enrol URL`` (root) records the hub,
    lets the firewall out to it, then runs ``pas enroll`` as PAS's user on the unit's
    configuration with the arguments given after the URL; an address that is not https://
    changes nothing."""
    import sys

    hub = "hub.region.example"
    firstboot, commands = _hourly_rig(tmp_path, monkeypatch, {hub: ["198.18.5.10"]})
    monkeypatch.setattr(sys, "argv", ["pas-firstboot", "--enrol", f"http://{hub}:8443"])
    assert firstboot.enrol_by_hand(f"http://{hub}:8443", []) == 2
    assert "hub.url: must start with https://" in capsys.readouterr().out
    assert not firstboot.FIREWALL_HUB.exists() and not firstboot.HUB_SET.exists()
    assert commands == []

    assert firstboot.enrol_by_hand(f"https://{hub}:8443", ["--replace"]) == 0
    assert firstboot.firewall_hub() == {"hub": {"url": f"https://{hub}:8443"}}
    assert "{ 198.18.5.10 }" in firstboot.HUB_SET.read_text()
    unit = (ROOT / "image" / "systemd" / "pas.service").read_text()
    (unit_config,) = re.findall(r"^ExecStart=/usr/bin/pas run --config (\S+)$", unit, re.M)
    assert commands == [
        ["systemctl", "reload-or-restart", "nftables.service"],
        ["runuser", "-u", "pas", "--", "/usr/bin/pas", "enroll", "--config",
         str(firstboot.CONFIG), "--hub", f"https://{hub}:8443", "--replace"]]
    assert str(firstboot.CONFIG).endswith("appliance.toml") and unit_config.endswith(
        "/etc/pas/appliance.toml")
    assert "systemctl restart pas" in capsys.readouterr().out


def test_the_hub_address_units_verify_and_run_the_step_hourly(tmp_path: Path) -> None:
    """The service and its timer as the image installs them (build.sh installs and enables
    the timer), with the script at this checkout's path for systemd-analyze."""
    units = ROOT / "image" / "systemd"
    script = ROOT / "image" / "rootfs" / "usr" / "local" / "sbin" / "pas-firstboot"
    for name in ("pas-hub-addresses.service", "pas-hub-addresses.timer"):
        (tmp_path / name).write_text((units / name).read_text().replace(
            "/usr/local/sbin/pas-firstboot", str(script)))
    result = subprocess.run(["systemd-analyze", "verify",
                             *(str(tmp_path / f"pas-hub-addresses.{kind}")
                               for kind in ("service", "timer"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    service = (units / "pas-hub-addresses.service").read_text()
    assert re.search(r"^ExecStart=/usr/local/sbin/pas-firstboot --hub-addresses$", service, re.M)
    assert re.search(r"^OnUnitActiveSec=1h$", (units / "pas-hub-addresses.timer").read_text(),
                     re.M)
    build = (ROOT / "image" / "build.sh").read_text()
    assert '"$here/systemd/pas-hub-addresses.timer"' in build
    assert "pas-hub-addresses.timer" in build.split("systemctl enable", 1)[1].split("\n\n")[0]


def test_the_console_questions_do_not_show_the_enrolment_token(tmp_path: Path) -> None:
    """At the console (no seed), pas-firstboot asks its questions on a terminal that a KVM
    switch, a shared screen or a recorder may show: the enrolment token (a credential that
    enrols a site) is read without echo, the other answers are shown as typed."""
    token = _token("CHU-NORD")
    seed, shown = _console(tmp_path, [
        ("Site name", "CHU-NORD"), ("AE title", ""), ("Modality AE", "CT1,MR1"),
        ("Static address", ""), ("Time zone", ""), *NO_NETWORKS, ("Regional hub URL", "https://hub.example:8443"),
        ("Enrolment token", token)])
    assert seed["hub"] == {"url": "https://hub.example:8443", "token": token}
    assert seed["site"] == "CHU-NORD" and seed["known_aes"] == ["CT1", "MR1"]
    assert b"CHU-NORD" in shown and b"hub.example" in shown  # other answers echo as typed
    assert token.encode() not in shown and b"s3cret" not in shown, shown.decode(errors="replace")


def test_the_console_asks_the_firewalls_networks_and_again_until_they_are_ones(
        tmp_path: Path) -> None:
    """No VM needed. Set up at the console, the appliance had empty firewall sets: every
    DICOM connection out was dropped (forwarding to the site's PACS and C-MOVEs to its
    workstations timed out) and no SSH came in; only a seed could name the networks. Now the
    console asks them; a value that is not an IPv4 network is said and the line asked again.
    No status page networks typed: the port stays open to every network (the set's
    default, written by firewall_sets)."""
    first = [("Site name", "CHU-EST"), ("AE title", ""), ("Modality AE", "CT1"),
             ("Static address", ""), ("Time zone", "")]
    seed, shown = _console(tmp_path, [
        *first, ("PACS and workstations", "10.1.2.0/24, 10.1.3.7"),
        ("Management networks", "fd00::/8"), ("Management networks", "10.9.0.0/16"),
        ("status page and DICOMweb", "10.1.4.0/24"), ("Regional hub URL", "")])
    said = shown.decode(errors="replace")
    assert "fd00::/8 is not an IPv4 network (e.g. 10.1.2.0/24 or 10.1.2.50): type them " \
           "again." in said, said
    assert seed["firewall"] == {"lan_dicom": ["10.1.2.0/24", "10.1.3.7"],
                                "management": ["10.9.0.0/16"], "http": ["10.1.4.0/24"]}
    firstboot = _firstboot()
    assert firstboot.seed_problems(seed) == []
    assert firstboot.firewall_sets(seed["firewall"]).splitlines()[1:] == [
        "add element inet pas mgmt_nets { 10.9.0.0/16 }",
        "add element inet pas lan_dicom { 10.1.2.0/24, 10.1.3.7 }",
        "add element inet pas http_nets { 10.1.4.0/24 }"]
    seed, _ = _console(tmp_path, [*first, *NO_NETWORKS, ("Regional hub URL", "")])
    assert seed["firewall"] == {"lan_dicom": [], "management": []}
    assert firstboot.firewall_sets(seed["firewall"]).splitlines()[1:] == [
        "add element inet pas http_nets { 0.0.0.0/0 }"]


def test_the_console_says_a_token_of_another_site_at_once_and_asks_again(
        tmp_path: Path) -> None:
    """The site is asked first, the token later. A token of another site than the one typed
    was taken as it was: ``pas enroll`` then refused it (the token unspent), and every later
    boot tried again until /etc/pas was fixed by hand. Now the mismatch is said at once and
    the site asked again, the token's the default; another answer asks that site's token.
    A token that is not one is asked again; no site typed takes the token's."""
    sud, nord = _token("CHU-SUD", "sudSecretPart012345"), _token("CHU-NORD", "nordSecretPart01234")
    first = [("Site name", "CHU-NORD"), ("AE title", ""), ("Modality AE", "CT1"),
             ("Static address", ""), ("Time zone", ""), *NO_NETWORKS,
             ("Regional hub URL", "https://hub.example:8443")]

    # The token's site kept: Enter at the question asked again.
    seed, shown = _console(tmp_path, [*first, ("Enrolment token", sud), ("Site name", "")])
    said = shown.decode(errors="replace")
    assert ("This token is for site CHU-SUD, not CHU-NORD: the hub would enrol the appliance "
            "as CHU-SUD.") in said, said
    assert "[CHU-SUD]: " in said.rsplit("This token is for site", 1)[1], said
    assert seed["site"] == "CHU-SUD" and seed["hub"]["token"] == sud
    assert "sudSecret" not in said

    # The site typed kept: its token asked again (a mistyped one said and asked once more).
    seed, shown = _console(tmp_path, [*first, ("Enrolment token", sud), ("Site name", "CHU-NORD"),
                                      ("Enrolment token", "CHU-NORD.typo"),
                                      ("Enrolment token", nord)])
    said = shown.decode(errors="replace")
    assert "That is not an enrolment token (SITE.SECRET.CAFP" in said, said
    assert seed["site"] == "CHU-NORD" and seed["hub"]["token"] == nord
    assert "Secret" not in said and "typo" not in said

    # No site typed: the token's. No token (enrol later): the site typed, no hub.
    seed, _ = _console(tmp_path, [("Site name", ""), *first[1:], ("Enrolment token", sud)])
    assert seed["site"] == "CHU-SUD" and seed["hub"]["token"] == sud
    seed, _ = _console(tmp_path, [*first, ("Enrolment token", "")])
    assert seed["site"] == "CHU-NORD" and "hub" not in seed


def test_a_seed_whose_site_is_not_its_tokens_is_refused_in_one_line_before_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No VM needed. A seed saying site = "CHU-B" with a token of CHU-A was written whole (the
    configuration, network, firewall, SSH keys, the site marked configured), then ``pas
    enroll`` refused the token at this boot and every later one, until IT found and fixed
    /etc/pas by hand. Now the seed is checked first: one line naming both sites and the
    fix, nothing written, no command run; fixed, the next boot configures and enrols."""
    import tomllib

    booting = _SeededBoot(tmp_path, monkeypatch)
    firstboot, seed_file, refused = booting.firstboot, booting.seed_file, booting.refused
    token = _token("CHU-A", "theSecretPart012345")
    hub = f'[hub]\nurl = "https://hub.example:8443"\ntoken = "{token}"\n'

    seed_file.write_text(f'site = "CHU-B"\nknown_aes = ["CT1"]\n{hub}')
    assert refused() == (
        f'pas-firstboot: {seed_file} says site = "CHU-B" but its [hub] token is for site '
        "CHU-A (the hub would enrol the appliance as CHU-A): nothing configured. Put site = "
        '"CHU-A" in the seed, or a token of CHU-B (pas hub token CHU-B at the region), then '
        "reboot (or systemctl start pas-firstboot)")
    seed_file.write_text('site = "CHU-A"\n[hub]\nurl = "https://hub.example:8443"\n'
                         'token = "CHU-A.short"\n')
    assert refused().startswith(f"pas-firstboot: {seed_file}: [hub] token is not an enrolment "
                                "token (SITE.SECRET.CAFP")

    # Fixed (the site left out: the token's): configured and enrolled at the next boot.
    seed_file.write_text(f'known_aes = ["CT1"]\n{hub}')
    firstboot.main()
    assert tomllib.loads(firstboot.CONFIG.read_text())["site"] == "CHU-A"
    assert firstboot.MARKER.exists() and booting.written == ["write_network",
                                                             "write_firewall", "write_ssh"]
    (enrolment,) = [c for c in booting.commands if "enroll" in c]
    assert enrolment[-1] == f"{token}\n"


class _SeededBoot:
    """pas-firstboot (``_firstboot()``) on a seed file under ``tmp_path``: its files there,
    its steps that touch the system recorded instead (network, firewall, SSH keys, every
    command: ``pas config check`` and ``pas enroll`` answer success; with ``real_check``,
    ``pas config check`` is this tree's own)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 real_check: bool = False) -> None:
        self.firstboot = _firstboot()
        self.etc, self.home = tmp_path / "etc", tmp_path / "var"
        self.etc.mkdir()
        self.seed_file = tmp_path / "boot" / "pas-seed.toml"
        self.seed_file.parent.mkdir()
        for name, value in (("CONFIG", self.etc / "appliance.toml"), ("HOME", str(self.home)),
                            ("MARKER", self.home / ".firstboot-done"),
                            ("CONFIGURED", self.etc / ".firstboot-configured"),
                            ("PENDING_HUB", self.etc / "firstboot-hub.toml"),
                            ("SEEDS", [self.seed_file])):
            monkeypatch.setattr(self.firstboot, name, value)
        self.written: list[str] = []
        for step in ("write_network", "write_firewall", "write_ssh", "allow_hub"):
            monkeypatch.setattr(self.firstboot, step,
                                lambda _seed, step=step: self.written.append(step))
        self.commands: list[list[str]] = []
        real_run = subprocess.run  # the script's module is this one: patched below

        def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
            self.commands.append([*command, str(kwargs.get("input") or "")])
            if real_check and command[:3] == ["/usr/bin/pas", "config", "check"]:
                clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
                return real_run([str(PAS_BIN), *command[1:]], capture_output=True,
                                text=True, env=clean, timeout=60)
            return subprocess.CompletedProcess(command, 0, "", "")

        monkeypatch.setattr(self.firstboot.subprocess, "run", run)

    def refused(self) -> str:
        """The one line a refused seed stops first boot with (SystemExit: the unit fails),
        once shown that nothing was written and no command but modprobe ran (the token is
        not spent)."""
        with pytest.raises(SystemExit) as stopped:
            self.firstboot.main()
        line = str(stopped.value.code)
        assert "\n" not in line and "theSecret" not in line, line
        assert sorted(p.name for p in self.etc.iterdir()) == [] and not self.home.exists()
        assert self.written == []
        assert [c[0] for c in self.commands] == ["modprobe"] * len(self.commands)
        return line


def test_a_seed_that_is_not_toml_or_not_of_its_types_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No VM needed. A seed that was not TOML (an array left open) stopped first boot on a
    Python traceback (tomllib.TOMLDecodeError) that named no file; ``site = 5`` on another
    (AttributeError); ``known_aes = "CT1"`` was configured as the three modalities C, T and
    1, a [hub] without url as "no hub in the seed" (the token never used), and both ended
    "configured". Now each is one line naming the seed file, where or which key, and the fix;
    nothing written, no command run, the token unspent; fixed, the next boot configures."""
    import tomllib

    booting = _SeededBoot(tmp_path, monkeypatch)
    seed_file, refused = booting.seed_file, booting.refused
    token = _token("CHU-A", "theSecretPart012345")
    hub = f'[hub]\nurl = "https://hub.example:8443"\ntoken = "{token}"\n'
    fix = "nothing configured. Fix the seed, then reboot (or systemctl start pas-firstboot)"

    seed_file.write_text(f'site = "CHU-A"\nknown_aes = ["CT1", "MR1"\n{hub}')
    assert refused() == (f"pas-firstboot: {seed_file} is not valid TOML (Unclosed array (at "
                         f"line 3, column 1)): {fix}")
    seed_file.write_bytes(b'site = "CHU-\xe9"\n')  # Latin-1, as an old editor saves it
    assert refused() == f"pas-firstboot: {seed_file} is not UTF-8 text (byte 12): {fix}"

    for seed, problem in (
            ("site = 5\n", 'site: must be text in quotes (site = "..."), got 5'),
            ('known_aes = "CT1"\n', "known_aes: must be a list of texts in quotes (known_aes "
                                    '= ["...", "..."]), got "CT1"'),
            (f'[hub]\ntoken = "{token}"\n', "hub.url: missing (a [hub] needs it)"),
            (f'hub = "{token}"\n', "hub: must be a table ([hub] on its own line, its keys "
                                   "below), got (not shown)"),
            ("accept_unknown = 1\n", "accept_unknown: must be true or false (accept_unknown "
                                     "= true), got 1"),
            ('known_ae = ["CT1"]\n', "known_ae: unknown key (the seed's keys: site, "
                                     "ae_title, known_aes, accept_unknown, timezone, network, "
                                     "firewall, hub, ssh)"),
            ('[network]\naddress = "10.1.2.300/24"\ngateway = "10.1.2.1"\n',
             'network.address: must be an address with its prefix, e.g. "10.1.2.20/24", got '
             '"10.1.2.300/24"'),
            # The firewall's sets are IPv4: an IPv6 network failed the whole ruleset's load.
            ('[firewall]\nhttp = ["fd00:1::/64"]\n',
             'firewall.http: must be IPv4 networks, e.g. ["10.1.2.0/24"], got "fd00:1::/64"'),
            (f'[hub]\nurl = "http://hub.example:8443"\ntoken = "{token}"\n',
             'hub.url: must start with https:// (the hub\'s address, e.g. '
             '"https://hub.region.example:8443"), got "http://hub.example:8443"')):
        seed_file.write_text(seed)
        assert refused() == f"pas-firstboot: {seed_file}: {problem}: {fix}", seed

    seed_file.write_text(f'site = 5\nknown_aes = "CT1"\n{hub}')  # every problem, one line
    assert refused().startswith(f"pas-firstboot: {seed_file}: site: must be text in quotes "
                                '(site = "..."), got 5; known_aes: must be')

    seed_file.write_text(f'site = "CHU-A"\nknown_aes = ["CT1", "MR1"]\n{hub}')  # fixed
    booting.firstboot.main()
    config = tomllib.loads(booting.firstboot.CONFIG.read_text())
    assert config["site"] == "CHU-A"
    assert [entry["title"] for entry in config["dicom"]["known_aes"]] == ["CT1", "MR1"]
    (enrolment,) = [c for c in booting.commands if "enroll" in c]
    assert enrolment[-1] == f"{token}\n" and booting.firstboot.MARKER.exists()


def test_the_configuration_names_no_site_when_first_boot_was_given_none(
        tmp_path: Path) -> None:
    """No VM needed. No site and no token (enrol later): first boot wrote site = "PAS", and
    the ``pas enroll`` the docs then give refused every real site's token (the configuration
    names another site). Now no site is named: the enrolment names it. The token pattern is
    the appliance's own."""
    from appliance.config import configured_site, load_settings
    from appliance.transfer.enrolment import TOKEN_RE

    firstboot = _firstboot()
    written = tmp_path / "appliance.toml"
    written.write_text(firstboot.config_text({"ae_title": "PAS", "known_aes": ["CT1"]}))
    assert configured_site(load_settings(written, {})) is None
    written.write_text(firstboot.config_text({"site": "CHU-A"}))
    assert configured_site(load_settings(written, {})) == "CHU-A"
    assert firstboot.TOKEN_RE.pattern == TOKEN_RE.pattern


def test_a_seed_pas_refuses_leaves_the_shipped_configuration_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No VM needed; this tree's real ``pas config check``. A seed of the right form whose
    values PAS refuses (an AE title of 25 characters) replaced the shipped
    /etc/pas/appliance.toml with the refused one, so pas.service (ordered after first boot,
    not requiring it) failed to start too, and the words came on two lines, the second
    without ``pas-firstboot:``. Now the configuration is checked beside it first: one line
    with PAS's own words, the shipped file byte for byte, nothing else written, the token
    unspent; fixed, the next boot configures."""
    import hashlib

    booting = _SeededBoot(tmp_path, monkeypatch, real_check=True)
    firstboot = booting.firstboot
    shipped = (ROOT / "config" / "appliance.toml").read_bytes()
    firstboot.CONFIG.write_bytes(shipped)
    token = _token("CHU-A", "theSecretPart012345")
    hub = f'[hub]\nurl = "https://hub.example:8443"\ntoken = "{token}"\n'
    booting.seed_file.write_text(f'ae_title = "THIS_AE_TITLE_IS_TOO_LONG"\n{hub}')

    with pytest.raises(SystemExit) as stopped:
        firstboot.main()
    line = str(stopped.value.code)
    assert line == (
        "pas-firstboot: the site's answers make a configuration PAS refuses (config error "
        "dicom.ae_title: must be 1-16 printable characters without backslash, got "
        "'THIS_AE_TITLE_IS_TOO_LONG'): nothing configured. Fix the seed (or the answers at "
        "the console), then reboot (or systemctl start pas-firstboot)"), line
    assert hashlib.sha256(firstboot.CONFIG.read_bytes()).digest() == \
        hashlib.sha256(shipped).digest()
    assert [p.name for p in booting.etc.iterdir()] == ["appliance.toml"]
    assert not booting.home.exists() and booting.written == []
    assert not [c for c in booting.commands if "enroll" in c]

    booting.seed_file.write_text(f'ae_title = "PAS_CHU_A"\n{hub}')  # fixed
    firstboot.main()
    assert 'ae_title = "PAS_CHU_A"' in firstboot.CONFIG.read_text()
    assert sorted(p.name for p in booting.etc.iterdir()) == [".firstboot-configured",
                                                             "appliance.toml"]
    (enrolment,) = [c for c in booting.commands if "enroll" in c]
    assert enrolment[-1] == f"{token}\n" and firstboot.MARKER.exists()


def test_a_seeds_time_zone_is_set_at_first_boot_as_timedatectl_sets_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No VM needed; the zone files are this machine's. The image's Debian base is UTC and
    nothing set another zone, yet PAS reads HL7 times without an offset, the WAN rate and
    prefetch windows and the worklist's day in local time: at a French site each ran 1 to
    2 h late (clock review, F4). Now the seed's ``timezone`` is checked against the zone
    files before anything is written, and applied as timedatectl does: /etc/localtime a
    symlink to the zone's file (the C library's local time then is the site's), its name in
    /etc/timezone. A seed without it keeps the image's zone untouched."""
    import sys
    import tomllib

    real_run = subprocess.run  # _SeededBoot records the module's commands instead
    booting = _SeededBoot(tmp_path, monkeypatch)
    firstboot, seed_file, refused = booting.firstboot, booting.seed_file, booting.refused
    zoneinfo = firstboot.ZONEINFO
    localtime, timezone = booting.etc / "localtime", booting.etc / "timezone"
    monkeypatch.setattr(firstboot, "LOCALTIME", localtime)
    monkeypatch.setattr(firstboot, "TIMEZONE", timezone)
    token = _token("CHU-A", "theSecretPart012345")
    hub = f'[hub]\nurl = "https://hub.example:8443"\ntoken = "{token}"\n'
    fix = "nothing configured. Fix the seed, then reboot (or systemctl start pas-firstboot)"

    for zone in ("Europe/Pariss", "Europe", "../../../etc/passwd", "/usr/share/zoneinfo/UTC",
                 "right/Europe/Paris", ""):
        seed_file.write_text(f'timezone = "{zone}"\n{hub}')
        assert refused() == (f"pas-firstboot: {seed_file}: timezone: must be a time zone of "
                             f'/usr/share/zoneinfo, e.g. "Europe/Paris", got "{zone}": {fix}')
    seed_file.write_text(f"timezone = 1\n{hub}")
    assert "timezone: must be text in quotes" in refused()

    seed_file.write_text(f'site = "CHU-A"\ntimezone = "Europe/Paris"\n{hub}')
    firstboot.main()
    assert firstboot.MARKER.exists()
    assert os.readlink(localtime) == str(zoneinfo / "Europe" / "Paris")
    assert timezone.read_text() == "Europe/Paris\n"
    assert "timezone" not in tomllib.loads(firstboot.CONFIG.read_text())  # the system's
    # The C library reads it (TZ=:FILE is how it reads /etc/localtime): CET in January,
    # CEST in July, so an 08:00 window is 08:00 at the site.
    offsets = real_run(
        [sys.executable, "-c", "import time; print(*(time.localtime(t).tm_gmtoff for t in "
         "(1767268800, 1782907200)))"],  # 2026-01-01 and 2026-07-01, 12:00 UTC
        env={**os.environ, "TZ": f":{localtime}"}, capture_output=True, text=True, check=True)
    assert offsets.stdout.split() == ["3600", "7200"]

    # No zone in the seed: nothing written, the image's stays.
    (tmp_path / "again").mkdir()
    booting2 = _SeededBoot(tmp_path / "again", monkeypatch)
    monkeypatch.setattr(booting2.firstboot, "LOCALTIME", booting2.etc / "localtime")
    monkeypatch.setattr(booting2.firstboot, "TIMEZONE", booting2.etc / "timezone")
    booting2.seed_file.write_text(hub)
    booting2.firstboot.main()
    assert booting2.firstboot.MARKER.exists()
    assert not (booting2.etc / "localtime").exists() and not (booting2.etc / "timezone").exists()


def test_the_console_asks_the_time_zone_and_again_until_it_is_one(tmp_path: Path) -> None:
    """No VM needed. Set up at the console, the appliance stayed in the image's UTC (no
    question asked it). Now the console asks the zone; one that is not a zone of
    /usr/share/zoneinfo is said and asked again; Enter keeps UTC (``pas doctor`` warns)."""
    first = [("Site name", "CHU-EST"), ("AE title", ""), ("Modality AE", "CT1"),
             ("Static address", "")]
    seed, shown = _console(tmp_path, [
        *first, ("Time zone", "Europe/Pariss"), ("Time zone", "Europe/Paris"), *NO_NETWORKS,
        ("Regional hub URL", "")])
    said = shown.decode(errors="replace")
    assert "Europe/Pariss is not a time zone of /usr/share/zoneinfo (e.g. Europe/Paris, " \
           "America/Martinique, Indian/Reunion): type it again." in said, said
    assert seed["timezone"] == "Europe/Paris" and _firstboot().seed_problems(seed) == []
    seed, _ = _console(tmp_path, [*first, ("Time zone", ""), *NO_NETWORKS,
                                  ("Regional hub URL", "")])
    assert "timezone" not in seed


def test_the_image_has_the_zone_files_the_seed_names() -> None:
    """The image is Debian's minbase plus a package list: without tzdata there is no
    /usr/share/zoneinfo, every seed's ``timezone`` is refused and PAS's local times stay UTC."""
    build = (ROOT / "image" / "build.sh").read_text()
    (listed,) = re.findall(r"^packages=\(\n(.*?)^\)", build, re.M | re.S)
    assert "tzdata" in listed.split()
