"""The appliance firewall: the shipped ruleset and the sets first boot writes are valid nft."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.peers import ROOT

RULES = ROOT / "image" / "rootfs" / "etc" / "nftables.conf"


def check(tmp_path: Path, sets: str) -> subprocess.CompletedProcess[str]:
    include = tmp_path / "nftables.d"
    include.mkdir(exist_ok=True)
    (include / "pas-sets.nft").write_text(sets)
    conf = tmp_path / "nftables.conf"
    conf.write_text(RULES.read_text().replace("/etc/nftables.d", str(include)))
    return subprocess.run(["nft", "-c", "-f", str(conf)], capture_output=True, text=True)


def test_shipped_ruleset_is_valid_before_and_after_first_boot(tmp_path: Path) -> None:
    shipped = (ROOT / "image/rootfs/etc/nftables.d/pas-sets.nft").read_text()
    assert check(tmp_path, shipped).returncode == 0
    seeded = ("add element inet pas mgmt_nets { 10.9.0.0/16 }\n"
              "add element inet pas hub_addrs { 198.18.0.10 }\n"
              "add element inet pas lan_dicom { 10.1.2.0/24, 10.1.3.7 }\n")
    result = check(tmp_path, seeded)
    assert result.returncode == 0, result.stderr
    broken = check(tmp_path, "add element inet pas nosuchset { 10.0.0.0/8 }\n")
    assert broken.returncode != 0 and "nosuchset" in broken.stderr


def test_policy_is_drop_both_ways_with_named_openings() -> None:
    text = RULES.read_text()
    assert text.count("policy drop;") == 3  # input, output, forward
    for opening in ("tcp dport $DICOM_PORTS accept", "ip saddr @mgmt_nets tcp dport 22 accept",
                    "ip daddr @hub_addrs tcp dport $HUB_PORTS accept", "udp dport 123 accept"):
        assert opening in text
