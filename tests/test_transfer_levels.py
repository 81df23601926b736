"""The packing level follows the link: strongest compression while the CPU keeps up, lighter
when packing would become the bottleneck (issue 4's "adapts instead of slowing")."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from appliance.transfer import levels
from appliance.transfer.pack import PackItem, pack_bucket, plan_buckets, unpack_bucket
from tests.support.peers import CT_DIR


@pytest.fixture(autouse=True)
def fresh_levels() -> Iterator[None]:
    levels.reset()
    yield
    levels.reset()


def test_unknown_link_means_default() -> None:
    assert levels.choose_level() == "default"


def test_choice_maximises_delivered_bytes_from_measurements() -> None:
    # Measured: JPEG-LS 3.4x at 40 MB/cpu-s, zstd 2.1x at 200, max no better than default.
    for _ in range(5):
        levels.record("default", 34_000_000, 10_000_000, 34 / 40)
        levels.record("fast", 34_000_000, 16_190_000, 34 / 200)
        levels.record("max", 34_000_000, 9_990_000, 34 / 10)
    # 20 Mbit/s: the line is the limit; max delivers as much as default and saves bytes.
    assert levels.choose_level(20, cores=2) in ("max", "default")
    # 100 Mbit/s: default (2 x 0.75 x 40 = 60 MB/s >= 12.5 x 3.4) beats max (15 MB/s).
    assert levels.choose_level(100, cores=2) == "default"
    # 1 Gbit/s on 2 cores: JPEG-LS would pack at 60 MB/s; zstd alone delivers 262 MB/s.
    assert levels.choose_level(1000, cores=2) == "fast"
    levels.set_link_mbps(1000)
    assert levels.choose_level(cores=2) == "fast"


def test_auto_level_packs_exactly_and_records_what_it_measured() -> None:
    items = [PackItem(p.name, p, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
             for p in sorted(CT_DIR.glob("*.dcm"))[:4]]
    levels.set_link_mbps(20)
    payload, stats = pack_bucket(plan_buckets(items)[0], "auto")
    chosen = [k for k in stats if k.startswith("level_")]
    assert len(chosen) == 1 and stats["cpu_us"] > 0
    rebuilt = {p.sop_instance_uid: p.data for p in unpack_bucket(payload)}
    assert all(hashlib.sha256(rebuilt[i.sop_instance_uid]).hexdigest() == i.sha256
               for i in items)
    ratio, speed = levels.estimates()[chosen[0].removeprefix("level_")]
    assert ratio == pytest.approx(stats["original"] / stats["packed"])
    assert speed > 0
