"""A seed's ``[hub] proxy``: the hospital's outgoing HTTP proxy, when the appliance reaches the
hub through it. First boot (image/rootfs/usr/local/sbin/pas-firstboot) writes it into PAS's
configuration (``hub.proxy``, tests/test_hub_proxy.py's end to end) and lets the firewall
out to that address and port alone: not to the hub, whose name the appliance need not even
resolve. No VM needed; the firewall's test loads the shipped ruleset into a namespace.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_settings
from tests.image.test_firewall import _loaded_in, check
from tests.image.test_firstboot import _firstboot
from tests.support.netns import NetNamespace
from tests.support.peers import free_port

SEED = {"site": "CH-Exemple", "ae_title": "PAS", "known_aes": ["CT1"],
        "hub": {"url": "https://hub.region.example:8443", "token": "t",
                "proxy": "http://10.1.2.9:3128", "proxy_username": "pas",
                "proxy_password": 'S3cr"et'}}


def test_the_seeds_proxy_goes_to_pas_and_to_the_firewall_alone(tmp_path: Path) -> None:
    firstboot = _firstboot()
    written = tmp_path / "appliance.toml"
    written.write_text(firstboot.config_text(SEED))
    settings = load_settings(written, {})
    assert settings.hub.proxy == "http://10.1.2.9:3128"
    assert (settings.hub.proxy_username, settings.hub.proxy_password) == ("pas", 'S3cr"et')
    sets = firstboot.firewall_sets({"lan_dicom": ["10.1.2.0/24"]}, SEED["hub"]["proxy"])
    assert "add element inet pas proxy_endpoints { 10.1.2.9 . 3128 }\n" in sets
    assert "hub_addrs" not in sets
    result = check(tmp_path, sets)
    assert result.returncode == 0, result.stderr
    # Without a proxy: nothing of it in either file.
    assert "[hub]" not in firstboot.config_text({**SEED, "hub": {"url": "https://h:8443"}})
    assert "proxy" not in firstboot.firewall_sets({"lan_dicom": ["10.1.2.0/24"]})

    # The later boots' and the hourly step's question: is the hub reached through a proxy?
    firstboot.CONFIG = written
    assert firstboot.proxied()
    written.write_text(firstboot.config_text({"site": "CH-Exemple"}))
    assert not firstboot.proxied()
    firstboot.CONFIG = tmp_path / "absent.toml"
    assert not firstboot.proxied()


@pytest.mark.parametrize("proxy", [
    "http://proxy.chu.example:3128",  # a name: the firewall's set takes addresses
    "https://10.1.2.9:3128", "http://10.1.2.9", "http://10.1.2.9:0", "http://10.1.2.9:70000",
    "http://10.1.2.300:3128", "http://u:p@10.1.2.9:3128", "http://10.1.2.9:3128/path",
])
def test_a_proxy_the_firewall_cannot_let_out_is_refused_before_anything(proxy: str) -> None:
    firstboot = _firstboot()
    problems = firstboot.seed_problems({**SEED, "hub": {**SEED["hub"], "proxy": proxy}})
    assert problems == [
        "hub.proxy: must be http://ADDRESS:PORT, the proxy's IPv4 address (the firewall lets "
        "out to it alone; a name is not resolved here), e.g. \"http://10.1.2.9:3128\", got "
        f"{firstboot.toml_string(proxy)}"]


def test_a_proxy_password_of_the_wrong_kind_is_refused_without_being_shown() -> None:
    firstboot = _firstboot()
    problems = firstboot.seed_problems({**SEED, "hub": {**SEED["hub"],
                                                        "proxy_password": ["S3cret"]}})
    assert problems == ['hub.proxy_password: must be text in quotes (proxy_password = "..."), '
                        "got (not shown)"]


@pytest.fixture
def listeners(request: pytest.FixtureRequest) -> Iterator[tuple[NetNamespace, list[int]]]:
    """A namespace (the appliance's side) and two ports listening on this side's address."""
    ns = NetNamespace("fwproxy").create()
    sockets = []
    try:
        for _ in range(2):
            server = socket.create_server((ns.outer_address, free_port()))
            sockets.append(server)
        yield ns, [s.getsockname()[1] for s in sockets]
    finally:
        for server in sockets:
            server.close()
        ns.delete()


def _connects(ns: NetNamespace, address: str, port: int) -> bool:
    """A TCP connection from inside the namespace within 1.5 s (a dropped SYN: a timeout)."""
    code = (f"import socket; socket.create_connection(({address!r}, {port}), timeout=1.5)")
    return subprocess.run(ns.command(["python3", "-c", code]), capture_output=True,
                          timeout=30).returncode == 0


@pytest.mark.root
def test_the_firewall_lets_out_to_the_proxys_port_and_nothing_else_there(
        tmp_path: Path, listeners: tuple[NetNamespace, list[int]]) -> None:
    ns, (proxy_port, other_port) = listeners
    firstboot = _firstboot()
    assert _connects(ns, ns.outer_address, other_port)  # no firewall yet: both open
    _loaded_in(ns, tmp_path, firstboot.firewall_sets(
        {}, f"http://{ns.outer_address}:{proxy_port}"))
    assert _connects(ns, ns.outer_address, proxy_port)
    assert not _connects(ns, ns.outer_address, other_port)
    # The same ruleset without the proxy: the proxy's port is dropped too.
    _loaded_in(ns, tmp_path, firstboot.firewall_sets({}))
    assert not _connects(ns, ns.outer_address, proxy_port)


def test_proxy_credentials_without_a_proxy_are_refused_not_dropped() -> None:
    """Review s42 F4: first boot wrote them nowhere (config_text writes [hub] for a proxy
    only), without a word; PAS's own configuration refuses the same."""
    firstboot = _firstboot()
    hub = {key: value for key, value in SEED["hub"].items() if key != "proxy"}
    assert firstboot.seed_problems({**SEED, "hub": hub}) == [
        "hub.proxy_username: is set but hub.proxy is not (it would be dropped)",
        "hub.proxy_password: is set but hub.proxy is not (it would be dropped)"]


def test_a_proxied_first_boot_resolves_no_hub_lets_out_the_proxy_and_records_the_hub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a proxy the hub's name is not resolved here (the proxy does), the firewall
    lets out to the proxy alone, and the enrolment runs on the configuration naming it. The
    hub is still recorded as root's (review s42 F7): were the proxy taken out later, the
    hourly step lets the firewall out to it; while proxied that step does nothing."""
    from tests.image.test_firstboot import NFT_CONF, _under

    firstboot, etc, home = _under(tmp_path, monkeypatch, SETS="pas-sets.nft",
                                  HUB_SET="pas-hub.nft")
    monkeypatch.setattr(firstboot, "NFT_CONF", NFT_CONF)
    monkeypatch.setattr(firstboot, "load_seed", lambda: SEED)
    for step in ("write_network", "write_ssh", "write_timezone"):
        monkeypatch.setattr(firstboot, step, lambda _seed: None)

    def getaddrinfo(host: str, *_: object) -> list[Any]:
        raise AssertionError(f"{host} resolved: the proxy resolves the hub's name")

    monkeypatch.setattr(firstboot.socket, "getaddrinfo", getaddrinfo)
    steps: list[str] = []
    real_run = subprocess.run

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        steps.append(" ".join(command[:3]))
        if command[0] == "nft":  # the check before a sets file is written: the real one
            return real_run(command, **kwargs)  # type: ignore[call-overload,no-any-return]
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(firstboot.subprocess, "run", run)
    firstboot.main()
    assert "add element inet pas proxy_endpoints { 10.1.2.9 . 3128 }" in \
        firstboot.SETS.read_text()
    assert not firstboot.HUB_SET.exists()
    assert 'url = "https://hub.region.example:8443"' in firstboot.FIREWALL_HUB.read_text()
    assert "runuser -u pas" in steps and firstboot.MARKER.exists()
    assert firstboot.proxied()  # what later boots and the hourly step ask before resolving
