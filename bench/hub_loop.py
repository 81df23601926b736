"""How long a small request waits while the hub takes in a big manifest (`make bench-hub-loop`).

A real `pas hub run` on loopback and one enrolled site. A prober thread sends
``GET /api/v1/whoami`` every 5 ms on its own connection; meanwhile a 100,000-instance
manifest (about 20 MB of JSON, 4.7 MB gzipped) is POSTed, then its first bucket is PUT (the
hub then needs the transfer's key). The slowest probe during each is how long the hub's
event loop was held: every other site's requests wait that long. Printed per round, with the
idle figures first. No peer: the figure is the hub's own, compared before and after a change
(docs/benchmarks.md, "Bucket bodies across sites and the event loop").

    make bench-hub-loop   (or .venv/bin/python bench/hub_loop.py [ROUNDS] [INSTANCES])
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, as bench/hub.py

from appliance.transfer import seal  # noqa: E402
from tests.support.hub import HubProcess, enroll  # noqa: E402

PROBE_EVERY_S = 0.005


def big_manifest(site_key: Any, instances: int) -> tuple[str, bytes, dict[str, Any]]:
    """A transfer id, its key and a manifest of ``instances`` instances in one bucket."""
    transfer_id = str(uuid.uuid4())
    key = seal.new_transfer_key()
    wrapped = base64.b64encode(seal.wrap_key(key, site_key, transfer_id)).decode()
    manifest = {
        "transfer_id": transfer_id, "study_uid": "1.2.3", "priority": 2,
        "wrapped_key": wrapped, "bucket_count": 1,
        "instances": [{"sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{n}",
                       "sop_class_uid": "1.2", "size": 100_000 + n,
                       "sha256": hashlib.sha256(str(n).encode()).hexdigest(), "buckets": [0]}
                      for n in range(instances)]}
    return transfer_id, key, manifest


def probed(client: httpx.Client, action: Callable[[], Any]) -> tuple[Any, float, list[float]]:
    """``action``'s result and seconds, and the probe latencies measured while it ran."""
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            client.get("/api/v1/whoami")
            latencies.append(time.perf_counter() - started)
            time.sleep(PROBE_EVERY_S)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.2)
    started = time.perf_counter()
    result = action()
    took = time.perf_counter() - started
    time.sleep(0.2)
    stop.set()
    prober.join()
    return result, took, latencies


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    instances = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    home = Path(tempfile.mkdtemp(prefix="hub-loop-"))
    hub = HubProcess(home / "hub").init().start()
    try:
        site = enroll(hub, home / "site", "CHU-BIG")
        small = httpx.Client(base_url=hub.url, verify=site.ssl_context(), timeout=60)
        big = httpx.Client(base_url=hub.url, verify=site.ssl_context(), timeout=120)
        for _ in range(20):
            small.get("/api/v1/whoami")
        _, _, idle = probed(small, lambda: time.sleep(1))
        print(f"idle: probe median {ms(statistics.median(idle))}, max {ms(max(idle))}")
        for _ in range(rounds):
            transfer_id, key, manifest = big_manifest(site.hub_transfer_key, instances)
            body = gzip.compress(json.dumps(manifest, separators=(",", ":")).encode(), 6,
                                 mtime=0)
            answer, took, during = probed(small, lambda body=body: big.post(
                "/api/v1/transfers", content=body,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}))
            print(f"POST manifest ({len(body) / 1e6:.1f} MB gzipped) -> {answer.status_code} "
                  f"in {ms(took)}; probe median {ms(statistics.median(during))}, "
                  f"max {ms(max(during))}")
            sealed = seal.seal_bucket(key, transfer_id, 0, b"x" * 1000)
            answer, took, during = probed(small, lambda tid=transfer_id, sealed=sealed: big.put(
                f"/api/v1/transfers/{tid}/buckets/0", content=sealed))
            print(f"PUT first bucket -> {answer.status_code} in {ms(took)}; probe median "
                  f"{ms(statistics.median(during))}, max {ms(max(during))}")
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
