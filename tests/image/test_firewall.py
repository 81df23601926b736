"""The appliance firewall: the shipped ruleset and the sets first boot writes are valid nft,
and, loaded into a network namespace in front of a real ``pas run``, admit what they name."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.image.test_firstboot import _firstboot
from tests.support.netns import NetNamespace
from tests.support.peers import DCMTK_ENV, ROOT, PasProcess

RULES = ROOT / "image" / "rootfs" / "etc" / "nftables.conf"


def check(tmp_path: Path, sets: str, hub: str | None = None) -> subprocess.CompletedProcess[str]:
    """``nft -c`` of the shipped ruleset with ``sets`` as pas-sets.nft (and ``hub`` as
    pas-hub.nft, the hub's addresses' own file): True to what nftables.service would load."""
    include = tmp_path / "nftables.d"
    include.mkdir(exist_ok=True)
    (include / "pas-sets.nft").write_text(sets)
    (include / "pas-hub.nft").unlink(missing_ok=True)
    if hub is not None:
        (include / "pas-hub.nft").write_text(hub)
    conf = tmp_path / "nftables.conf"
    conf.write_text(RULES.read_text().replace("/etc/nftables.d", str(include)))
    return subprocess.run(["nft", "-c", "-f", str(conf)], capture_output=True, text=True)


def test_shipped_ruleset_is_valid_before_and_after_first_boot(tmp_path: Path) -> None:
    shipped = (ROOT / "image/rootfs/etc/nftables.d/pas-sets.nft").read_text()
    assert check(tmp_path, shipped).returncode == 0
    seeded = ("add element inet pas mgmt_nets { 10.9.0.0/16 }\n"
              "add element inet pas hub_addrs { 198.18.0.10 }\n"
              "add element inet pas lan_dicom { 10.1.2.0/24, 10.1.3.7 }\n"
              "add element inet pas http_nets { 10.1.4.0/24 }\n")
    result = check(tmp_path, seeded)
    assert result.returncode == 0, result.stderr
    # What a seed may say: a mask written out, which nft refuses as typed (and, before, left
    # the appliance with no firewall); networks inside or beside another, which nft refused
    # in an interval set ("conflicting intervals") before the sets' auto-merge, and which
    # IT may still type by hand into the files. As first boot writes them, they load.
    typed = {"management": ["10.9.0.0/255.255.0.0"], "lan_dicom": ["10.1.2.0/24", "10.1.2.50"],
             "http": ["10.1.4.0/25", "10.1.4.128/25", "10.1.4.7"]}
    assert check(tmp_path, "add element inet pas mgmt_nets { 10.9.0.0/255.255.0.0 }\n"
                 ).returncode != 0
    by_hand = check(tmp_path, "add element inet pas lan_dicom { 10.1.2.0/24, 10.1.2.50 }\n")
    assert by_hand.returncode == 0, by_hand.stderr
    written = _firstboot().firewall_sets(typed)
    assert written.splitlines()[1:] == [
        "add element inet pas mgmt_nets { 10.9.0.0/16 }",
        "add element inet pas lan_dicom { 10.1.2.0/24 }",
        "add element inet pas http_nets { 10.1.4.0/24 }"]
    result = check(tmp_path, written, "add element inet pas hub_addrs { 198.18.0.10 }\n")
    assert result.returncode == 0, result.stderr
    # The hub's addresses in two files, neighbours: nft 1.0.6 refuses the whole ruleset
    # ("File exists", auto-merge or not). Why they are in their own file alone.
    before = written.replace("\nadd element inet pas lan_dicom",
                             "\nadd element inet pas hub_addrs { 198.18.0.10 }\n"
                             "add element inet pas lan_dicom")  # as first boot wrote it
    assert "hub_addrs" in before
    refused = check(tmp_path, before, "add element inet pas hub_addrs { 198.18.0.11 }\n")
    assert refused.returncode != 0 and "File exists" in refused.stderr, refused.stderr
    broken = check(tmp_path, "add element inet pas nosuchset { 10.0.0.0/8 }\n")
    assert broken.returncode != 0 and "nosuchset" in broken.stderr


def test_policy_is_drop_both_ways_with_named_openings() -> None:
    text = RULES.read_text()
    assert text.count("policy drop;") == 3  # input, output, forward
    for opening in ("tcp dport $DICOM_PORTS accept", "ip saddr @mgmt_nets tcp dport 22 accept",
                    "ip daddr @hub_addrs tcp dport $HUB_PORTS accept", "udp dport 123 accept"):
        assert opening in text


def _loaded_in(ns: NetNamespace, tmp_path: Path, sets: str) -> None:
    """The shipped ruleset and ``sets`` made the namespace's firewall, as nftables.service
    loads them on the appliance (``flush ruleset`` first: each load replaces the last)."""
    assert check(tmp_path, sets).returncode == 0
    subprocess.run(ns.command(["nft", "-f", str(tmp_path / "nftables.conf")]), check=True)


def _http_answers(url: str) -> bool:
    """The status page's port answered, or False when nothing came back within 1.5 s: the
    firewall drops the SYN (policy drop), so an unadmitted client sees a timeout, not a
    refusal."""
    try:
        return httpx.get(url, timeout=1.5).status_code == 200
    except httpx.ConnectTimeout:
        return False


@pytest.mark.root
def test_the_status_page_port_admits_the_networks_the_seed_names_and_dicom_stays_open(
        tmp_path: Path, pas_factory: Callable[..., PasProcess]) -> None:
    """The sets first boot writes (pas-firstboot's firewall_sets), loaded with the shipped
    ruleset into a namespace where a real ``pas run`` listens on the appliance's ports
    (11112, 8080), reached from this side of the link. Before, the status page and DICOMweb
    port (patient IDs, every cached study, STOW-RS into the region) was admitted from every
    network, with no way for the seed to narrow it; SSH already came from the management
    networks only."""
    firstboot = _firstboot()
    ns = NetNamespace("fw").create()
    try:
        pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                           "PAS_DICOM__HOST": ns.inner_address, "PAS_DICOM__PORT": "11112",
                           "PAS_HTTP__HOST": ns.inner_address, "PAS_HTTP__PORT": "8080"},
                          start=False)
        pas.port, pas.http_port = 11112, 8080
        pas.launcher = tuple(ns.command([]))
        pas.start()
        page = f"http://{ns.inner_address}:8080/healthz"
        here = f"{ns.outer_address}/32"

        def echoed() -> bool:
            result = subprocess.run(["echoscu", "-aec", "PAS", ns.inner_address, "11112"],
                                    env=DCMTK_ENV, capture_output=True, timeout=30)
            return result.returncode == 0

        # A seed naming no http networks: every IPv4 network, as before the set.
        _loaded_in(ns, tmp_path, firstboot.firewall_sets({"management": ["10.9.0.0/16"]}))
        assert _http_answers(page) and echoed()
        # Networks named, this side not among them: dropped; the modalities' port is not.
        _loaded_in(ns, tmp_path, firstboot.firewall_sets(
            {"management": ["10.9.0.0/16"], "http": ["10.1.4.0/24"]}))
        assert not _http_answers(page)
        assert echoed()
        # This side named by http, or by management with http empty: admitted.
        _loaded_in(ns, tmp_path, firstboot.firewall_sets({"http": ["10.1.4.0/24", here]}))
        assert _http_answers(page)
        _loaded_in(ns, tmp_path, firstboot.firewall_sets({"management": [here], "http": []}))
        assert _http_answers(page)
    finally:
        ns.delete()


def test_the_hub_hosts_opening_loads_with_the_sets_and_admits_8443_only(tmp_path: Path) -> None:
    """The file a hub host enables (/etc/nftables.d.available/pas-hub-host.nft, shipped by
    the image: build.sh copies rootfs/) loads beside first boot's sets, and opens the hub's
    port and no other: the Vagrantfile's hub enables it (the sites' enrolments to its 8443
    were dropped by the appliance's firewall)."""
    opening = ROOT / "image/rootfs/etc/nftables.d.available/pas-hub-host.nft"
    rules = [line for line in opening.read_text().splitlines()
             if line and not line.startswith("#")]
    assert rules == ["insert rule inet pas input tcp dport 8443 accept"]
    sets = _firstboot().firewall_sets({"lan_dicom": ["192.168.56.11"]})
    result = check(tmp_path, sets + opening.read_text())
    assert result.returncode == 0, result.stderr
    vagrantfile = (ROOT / "Vagrantfile").read_text()
    assert "ln -sf /etc/nftables.d.available/pas-hub-host.nft /etc/nftables.d/" in vagrantfile
