"""Validation of an emulated link: UDP round-trip time and one TCP stream's throughput.

Owns: running the probes of ``netprobe.py`` at both ends of a ``WanLink`` and summarising them.
Touches nothing outside the link's namespaces. Used by the benchmark (printed before the
transfer table, so every figure comes with the link it was measured on) and by
tests/test_wan_emulator.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from bench.wan.link import WanLink

PROBE = str(Path(__file__).resolve().parent / "netprobe.py")
PY = sys.executable


@dataclasses.dataclass
class Validation:
    rtt_min_ms: float
    rtt_median_ms: float
    probes_lost: int
    probes: int
    tcp_mbit_s: float  # from the first byte to the last
    tcp_steady_mbit_s: float  # after the first two seconds (slow start excluded)
    wire_up_bytes: int  # what the shaper counted site -> region during the TCP test
    payload_bytes: int


def _server(link: WanLink, args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(link.in_region([PY, PROBE, *args]), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"probe server did not start: {line!r}")
    return proc


def rtt(link: WanLink, probes: int = 20, port: int = 9001) -> dict[str, float]:
    server = _server(link, ["udp-echo", link.region_ip, str(port)])
    try:
        out = subprocess.run(link.in_site([PY, PROBE, "udp-ping", link.region_ip, str(port),
                                           str(probes)]),
                             capture_output=True, text=True, check=True, timeout=60)
        return json.loads(out.stdout)
    finally:
        server.kill()
        server.wait()


def tcp_stream(link: WanLink, seconds: float, port: int = 9002) -> dict[str, object]:
    sink = _server(link, ["tcp-sink", link.region_ip, str(port)])
    try:
        link.reset()
        subprocess.run(link.in_site([PY, PROBE, "tcp-source", link.region_ip, str(port),
                                     str(seconds)]),
                       capture_output=True, text=True, check=True, timeout=seconds + 60)
        assert sink.stdout is not None
        result = json.loads(sink.stdout.readline())
        stats = link.stats()
        result["wire_up_bytes"] = stats.up_in
        return result
    finally:
        sink.kill()
        sink.wait()


def validate(link: WanLink, seconds: float = 6.0, probes: int = 20) -> Validation:
    ping = rtt(link, probes)
    stream = tcp_stream(link, seconds)
    per_second: list[int] = stream["per_second"]  # type: ignore[assignment]
    # Whole seconds after the first two; the last slot is partial and left out.
    steady = per_second[2:-1] or per_second
    return Validation(
        rtt_min_ms=ping["min_ms"], rtt_median_ms=ping["median_ms"],
        probes_lost=int(ping["lost"]), probes=probes,
        tcp_mbit_s=stream["bytes"] * 8 / max(stream["seconds"], 1e-9) / 1e6,  # type: ignore[operator]
        tcp_steady_mbit_s=sum(steady) * 8 / len(steady) / 1e6,
        wire_up_bytes=int(stream["wire_up_bytes"]),  # type: ignore[arg-type]
        payload_bytes=int(stream["bytes"]),  # type: ignore[arg-type]
    )
