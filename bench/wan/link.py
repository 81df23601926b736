"""The emulated WAN link: two network namespaces (site, region) joined by a userspace shaper.

Owns: creating and deleting its two namespaces, compiling and running ``shaper.c`` (rate,
one-way delay, random loss, drop-tail queue, outage switch, byte counters), and starting
commands inside either end. It may not touch anything outside the namespaces it created.

Why userspace: the kernel here has no ``netem``. Each namespace gets a TUN device (``wan0``)
owned by the shaper; the site end is ``198.19.R.1`` and the region end ``198.19.R.2`` (inside
the benchmarking range 198.18.0.0/15), and only traffic between those two addresses crosses the
shaped link. Each namespace also keeps an unshaped veth to the root namespace
(``NetNamespace``), used only for control: reading Orthanc's REST API, loading a site Orthanc.
Why C for the shaper: one packet at 100 Mbit/s is 120 us of line time; a C loop keeps up at any
rate we test with a few % of one core, and the same code serves every link (see the
validation figures in docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import threading
from pathlib import Path

from tests.support.peers import NetNamespace

HERE = Path(__file__).resolve().parent
SHAPER_SOURCE = HERE / "shaper.c"
BUILD_DIR = Path(os.environ.get("PAS_BENCH_BUILD", "/tmp/pas-bench-wan"))
TUN_NAME = "wan0"


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """A link as the regional programmes describe it: rate, round-trip time, loss."""

    name: str
    mbit_s: float
    rtt_ms: float
    loss: float  # probability per packet, each direction
    queue_bytes: int | None = None  # drop-tail limit; default: one bandwidth-delay product

    @property
    def rate_bps(self) -> float:
        return self.mbit_s * 1e6

    @property
    def bytes_per_s(self) -> float:
        return self.rate_bps / 8

    @property
    def queue(self) -> int:
        if self.queue_bytes is not None:
            return self.queue_bytes
        return max(32 * 1024, int(self.bytes_per_s * max(self.rtt_ms, 20) / 1000))

    def label(self) -> str:
        return f"{self.mbit_s:g} Mbit/s {self.rtt_ms:g} ms {self.loss * 100:g} %"


def build_shaper() -> Path:
    """Compile the shaper once per source version (gcc is installed on the bench machines)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    binary = BUILD_DIR / "shaper"
    if not binary.exists() or binary.stat().st_mtime < SHAPER_SOURCE.stat().st_mtime:
        tmp = BUILD_DIR / f"shaper.{os.getpid()}"
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(SHAPER_SOURCE)],
                       check=True, capture_output=True, text=True)
        tmp.replace(binary)
    return binary


@dataclasses.dataclass
class LinkStats:
    """What crossed the shaper since the last reset (bytes of IP packets)."""

    up_in: int  # site -> region, offered to the link (includes what was then dropped)
    up_out: int  # site -> region, delivered
    down_in: int
    down_out: int
    up_drop_loss: int
    up_drop_queue: int
    up_drop_outage: int
    first_up_ns: int
    last_up_ns: int
    now_ns: int

    @property
    def wire_bytes(self) -> int:
        """Both directions, as offered: what a provider would bill (retransmissions included)."""
        return self.up_in + self.down_in


class WanLink:
    """Site and region namespaces with the shaper between them. Use as a context manager."""

    def __init__(self, spec: LinkSpec, seed: int = 1):
        self.spec = spec
        self.seed = seed
        self.site = NetNamespace("wsite")
        self.region = NetNamespace("wregion")
        octet = random.randrange(0, 256)
        self.site_ip = f"198.19.{octet}.1"
        self.region_ip = f"198.19.{octet}.2"
        self.proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> WanLink:
        binary = build_shaper()
        self.site.create()
        self.region.create()
        spec = self.spec
        self.proc = subprocess.Popen(
            [str(binary), f"/var/run/netns/{self.site.name}", f"/var/run/netns/{self.region.name}",
             TUN_NAME, repr(spec.rate_bps), str(int(spec.rtt_ms * 500)), repr(spec.loss),
             str(spec.queue), str(self.seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"shaper did not start (said {ready!r}, rc={self.proc.poll()})")
        for ns, local, peer in ((self.site, self.site_ip, self.region_ip),
                                (self.region, self.region_ip, self.site_ip)):
            _ip("-n", ns.name, "addr", "add", local, "peer", peer, "dev", TUN_NAME)
            # No IPv6 on the link: its autoconfiguration chatter would cross the shaper.
            subprocess.run(ns.command(["sysctl", "-q", "-w",
                                       f"net.ipv6.conf.{TUN_NAME}.disable_ipv6=1"]),
                           capture_output=True)
            _ip("-n", ns.name, "link", "set", TUN_NAME, "up")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self._command("quit", expect_reply=False)
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.site.delete()
        self.region.delete()

    def __enter__(self) -> WanLink:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- control ------------------------------------------------------------------------

    def _command(self, line: str, expect_reply: bool = True) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            if not expect_reply:
                return ""
            reply = self.proc.stdout.readline().strip()
        if reply.startswith("error") or not reply:
            raise RuntimeError(f"shaper: {line!r} -> {reply!r}")
        return reply

    def reset(self) -> None:
        self._command("reset")

    def outage(self, on: bool) -> None:
        self._command(f"outage {1 if on else 0}")

    def reconfigure(self, spec: LinkSpec) -> None:
        self._command(f"set {spec.rate_bps!r} {int(spec.rtt_ms * 500)} {spec.loss!r} "
                      f"{spec.queue}")
        self.spec = spec

    def stats(self) -> LinkStats:
        fields = dict(kv.split("=") for kv in self._command("stats").split())
        v = {k: int(x) for k, x in fields.items()}
        return LinkStats(up_in=v["a2b_in"], up_out=v["a2b_out"], down_in=v["b2a_in"],
                         down_out=v["b2a_out"], up_drop_loss=v["a2b_drop_loss"],
                         up_drop_queue=v["a2b_drop_queue"], up_drop_outage=v["a2b_drop_outage"],
                         first_up_ns=v["first_ns"], last_up_ns=v["last_ns"], now_ns=v["now_ns"])

    # --- running things at either end ---------------------------------------------------

    def in_site(self, args: list[str]) -> list[str]:
        return self.site.command(args)

    def in_region(self, args: list[str]) -> list[str]:
        return self.region.command(args)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
