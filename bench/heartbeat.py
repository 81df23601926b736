"""Load test of the hub's fleet endpoint: N simulated appliances heartbeating over mutual TLS.

A real ``pas hub run`` on loopback (tests/support/hub.py). N sites are enrolled through the
real /enroll route (each its own key and certificate), then each keeps one TLS connection and
posts a heartbeat every INTERVAL seconds (random phase) for DURATION seconds. In the same run,
the same clients then send ``GET /api/v1/whoami`` at the same rate: the same TLS, gate and
certificate lookup without the heartbeat's validation and write. The figures are the
heartbeat's latency percentiles, that latency as a ratio of the whoami peer's, and the hub
process's CPU (from /proc, % of one core).

    make bench-heartbeat            # 500 appliances, every 10 s, 40 s per phase
    .venv/bin/python bench/heartbeat.py --appliances 50 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.hub.pki import DEFAULT_TOKEN_VALIDITY, HubPKI  # noqa: E402
from appliance.store import fleet as fleet_store  # noqa: E402
from appliance.store.hub import add_token, open_hub_db  # noqa: E402
from appliance.transfer.enrolment import Enrolment, enroll  # noqa: E402
from tests.support.hub import HubProcess  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def heartbeat(site: str, n: int) -> dict[str, Any]:
    return {"site": site, "sent_at": time.time(), "version": "0.1.0", "uptime_s": 10.0 * n,
            "backlog": {"studies": random.randint(0, 5), "bytes": random.randint(0, 10**9),
                        "oldest_age_s": random.uniform(0, 3600), "urgent_oldest_age_s": 0.0},
            "jobs": {"pending": 2, "running": 1, "failed": 0},
            "disk": {"used_percent": round(random.uniform(20, 90), 1), "free_bytes": 10**11},
            "received": {"instances": 1000 * n, "bytes": 500_000_000 * n},
            "confirmed_instances": 900 * n, "cert_days_left": 820.5, "errors": []}


def enrol_sites(hub: HubProcess, root: Path, count: int) -> list[Enrolment]:
    pki = HubPKI(hub.home)
    db = open_hub_db(hub.home / "hub.sqlite")
    tokens = []
    for index in range(count):
        site = f"SITE-{index:04d}"
        token, digest = pki.new_token(site)
        add_token(db, site, digest, time.time() + DEFAULT_TOKEN_VALIDITY.total_seconds())
        tokens.append((root / site, token))
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda pair: enroll(pair[0], hub.url, pair[1]), tokens))


async def phase(enrolments: list[Enrolment], kind: str, interval: float,
                duration: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def one(enrolment: Enrolment) -> None:
        nonlocal errors
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=enrolment.url, verify=enrolment.ssl_context(),
                                     limits=limits, timeout=30) as client:
            await asyncio.sleep(random.uniform(0, interval))
            n = 0
            while time.monotonic() < deadline:
                n += 1
                started = time.perf_counter()
                try:
                    if kind == "heartbeat":
                        response = await client.post("/api/v1/heartbeat",
                                                     json=heartbeat(enrolment.site, n))
                        ok = response.status_code == 201
                    else:
                        response = await client.get("/api/v1/whoami")
                        ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                if ok:
                    latencies.append(elapsed)
                else:
                    errors += 1
                await asyncio.sleep(max(interval - elapsed, 0))

    await asyncio.gather(*(one(e) for e in enrolments))
    return latencies, errors


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appliances", type=int, default=500)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per phase")
    args = parser.parse_args()
    random.seed(8)
    with tempfile.TemporaryDirectory(prefix="pas-bench-heartbeat-") as tmp:
        root = Path(tmp)
        hub = HubProcess(root / "hub", {"PAS_HUB_LOG_LEVEL": "warning"}).init().start()
        try:
            started = time.monotonic()
            enrolments = enrol_sites(hub, root / "sites", args.appliances)
            enrol_s = time.monotonic() - started
            assert hub.proc is not None
            results = {}
            for kind in ("heartbeat", "whoami"):
                cpu0, t0 = cpu_seconds(hub.proc.pid), time.monotonic()
                self0 = resource.getrusage(resource.RUSAGE_SELF)
                latencies, errors = asyncio.run(phase(enrolments, kind, args.interval,
                                                      args.duration))
                wall = time.monotonic() - t0
                self1 = resource.getrusage(resource.RUSAGE_SELF)
                results[kind] = {
                    "requests": len(latencies), "errors": errors,
                    "rate": len(latencies) / wall,
                    "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
                    "max": max(latencies, default=float("nan")),
                    "mean": statistics.fmean(latencies) if latencies else float("nan"),
                    "hub_cpu": 100 * (cpu_seconds(hub.proc.pid) - cpu0) / wall,
                    "client_cpu": 100 * ((self1.ru_utime + self1.ru_stime)
                                         - (self0.ru_utime + self0.ru_stime)) / wall,
                }
            db = open_hub_db(hub.home / "hub.sqlite")
            recorded = fleet_store.heartbeat_count(db)
            sites = len(fleet_store.list_sites(db))
        finally:
            hub.stop()
    beat, peer = results["heartbeat"], results["whoami"]
    print(f"\nhub heartbeat load: {args.appliances} appliances (mutual TLS, one connection "
          f"each), every {args.interval:g} s, {args.duration:g} s per phase, loopback, "
          f"{os.cpu_count()} cores; enrolment of all sites took {enrol_s:.1f} s\n")
    print(f"| {'phase':<22} | {'requests':>8} | {'errors':>6} | {'req/s':>6} | {'p50 ms':>7} "
          f"| {'p99 ms':>7} | {'max ms':>7} | {'hub CPU % of 1 core':>19} | "
          f"{'load generator CPU %':>20} |")
    print("|" + "|".join("-" * w for w in (24, 10, 8, 8, 9, 9, 9, 21, 22)) + "|")
    for name, r in (("POST heartbeat", beat), ("GET whoami (peer)", peer)):
        print(f"| {name:<22} | {r['requests']:>8} | {r['errors']:>6} | {r['rate']:>6.1f} | "
              f"{1000 * r['p50']:>7.1f} | {1000 * r['p99']:>7.1f} | {1000 * r['max']:>7.1f} | "
              f"{r['hub_cpu']:>19.1f} | {r['client_cpu']:>20.1f} |")
    print(f"\nheartbeat p99 / whoami p99 = {beat['p99'] / peer['p99']:.2f}x; "
          f"heartbeat p99 / interval = {beat['p99'] / args.interval:.4f}; "
          f"hub CPU per heartbeat/s = {beat['hub_cpu'] / max(beat['rate'], 1e-9):.2f} % "
          f"of a core")
    print(f"recorded at the hub: {recorded} heartbeats from {sites} sites "
          f"(accepted: {beat['requests']})")
    if recorded != beat["requests"] or sites != args.appliances:
        raise SystemExit("MISMATCH: the hub did not record every accepted heartbeat")


if __name__ == "__main__":
    main()
