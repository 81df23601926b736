"""Network namespaces for tests and benchmarks: a peer "across the WAN" on its own address
(198.18.0.0/15, the benchmarking range, joined by a veth pair), and the WAN's hard failure
for one of its ports (:class:`BlackHole`). Root only (CI runs as root); nothing here routes
anywhere but between this host and the namespaces it creates and deletes.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import uuid
from collections.abc import Iterator


class NetNamespace:
    """A network namespace joined to this one by a veth pair, 198.18.<n>.1 <-> .2 /30.

    Root only (CI runs as root). The far end's address is ``inner_address``; this side is
    ``outer_address``. Removed with :meth:`delete`.
    """

    def __init__(self, prefix: str = "pas"):
        tag = uuid.uuid4().hex[:6]
        self.name = f"{prefix}-{tag}"
        # A random /30 inside 198.18.0.0/16 (the benchmarking range): .1 here, .2 there;
        # not one this host already holds. Two namespaces alive at once with the same block
        # (another test worker's) routed this one's traffic to the other's peer: an
        # Orthanc's start (its fixed port 8042) was answered in 10 ms by the other worker's
        # Orthanc (seen once in CI).
        taken = _addresses_in_use()
        while True:
            block = random.randrange(1, 16384) * 4
            self.outer_address = f"198.18.{block // 256}.{block % 256 + 1}"
            self.inner_address = f"198.18.{block // 256}.{block % 256 + 2}"
            if self.outer_address not in taken:
                break
        self.outer_if = f"v{tag}a"
        self.inner_if = f"v{tag}b"

    def create(self) -> NetNamespace:
        """Created whole, or not at all: a step that fails deletes what the others made."""
        run = _ip
        run("netns", "add", self.name)  # refused for a name taken: not ours to delete
        try:
            run("link", "add", self.outer_if, "type", "veth", "peer", "name", self.inner_if)
            run("link", "set", self.inner_if, "netns", self.name)
            run("addr", "add", f"{self.outer_address}/30", "dev", self.outer_if)
            run("link", "set", self.outer_if, "up")
            run("-n", self.name, "addr", "add", f"{self.inner_address}/30", "dev",
                self.inner_if)
            run("-n", self.name, "link", "set", self.inner_if, "up")
            run("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _addresses_in_use() -> set[str]:
    """The IPv4 addresses this network namespace holds (``ip -4 -o addr``)."""
    listed = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True)
    return {field.split("/", 1)[0] for line in listed.stdout.splitlines()
            for field in line.split()[3:4]}


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class BlackHole:
    """The WAN's hard failure for one TCP port inside a namespace: every packet to it and from
    it vanishes (nft drop, both ways), so a connect waits for its timeout and a connection
    under way just goes silent: no RST, no ICMP, nothing an error could be raised from at
    once. ``on()``/``off()`` switch it; the rules live in the namespace's own table, gone
    with the namespace whatever happens to the test.
    """

    TABLE = "pas_black_hole"

    def __init__(self, ns: NetNamespace, port: int):
        self.ns = ns
        self.port = port
        self.active = False

    def on(self) -> None:
        if self.active:
            return
        ruleset = (f"table inet {self.TABLE} {{\n"
                   f" chain in {{ type filter hook input priority -100; policy accept;"
                   f" tcp dport {self.port} drop; }}\n"
                   f" chain out {{ type filter hook output priority -100; policy accept;"
                   f" tcp sport {self.port} drop; }}\n}}\n")
        subprocess.run(self.ns.command(["nft", "-f", "-"]), input=ruleset, text=True,
                       check=True, capture_output=True)
        self.active = True

    def off(self) -> None:
        if self.active:
            subprocess.run(self.ns.command(["nft", "delete", "table", "inet", self.TABLE]),
                           check=True, capture_output=True)
            self.active = False

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The link black-holed inside the block, restored after it (also on failure)."""
        self.on()
        try:
            yield
        finally:
            self.off()
