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
    # 20 Mbit/s: the line is the limit; max delivers no more than default (0.1 % fewer bytes):
    # a tie goes to the lighter level, whose CPU adds less latency.
    assert levels.choose_level(20, cores=2) == "default"
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


def test_link_share_is_inferred_from_the_callers_pace() -> None:
    """No link rate given: a worker that took 4 s to send a 2 MB bucket has a 0.5 MB/s share
    (a slow line: JPEG-LS's bytes saved win; max's 3 % more is not worth its slow zstd 19);
    one that sent it in 10 ms is on a fast line where JPEG-LS's CPU costs more time than its
    bytes save."""
    for level, wall in (("max", 8.0), ("default", 30.0), ("fast", 150.0)):
        levels.record(level, 6_000_000, {"max": 1_700_000, "default": 1_760_000,
                                         "fast": 2_850_000}[level], 6 / (wall * 1.2))
        levels.end_bucket(level, 6_000_000, 2_000_000, 6 / wall, now=100.0)
    assert levels.choose_level() == "default"  # no pace observed yet
    levels.begin_bucket(now=104.0)  # 2 MB sent in 4 s
    assert levels.choose_level() == "default"
    levels.reset()
    for level, wall in (("max", 8.0), ("default", 30.0), ("fast", 150.0)):
        levels.end_bucket(level, 6_000_000, 2_000_000, 6 / wall, now=100.0)
    levels.begin_bucket(now=100.01)  # 200 MB/s per worker
    assert levels.choose_level() == "fast"
    levels.end_bucket("fast", 6_000_000, 2_000_000, 0.04, now=200.0)
    levels.begin_bucket(now=200.0 + levels.MAX_SEND_GAP_S + 1)  # idle, not sending
    assert levels.choose_level() == "fast"  # an idle gap changes nothing


def test_choice_for_a_share_weighs_pack_time_against_send_time() -> None:
    walls = {"max": 8.0, "default": 30.0, "fast": 150.0}
    ratios = {"max": 3.45, "default": 3.41, "fast": 2.11}
    assert levels.choose_for_share(0.5e6, walls, ratios) == "default"
    assert levels.choose_for_share(0.5e6, walls, {**ratios, "max": 4.0}) == "max"
    assert levels.choose_for_share(5e6, walls, ratios) == "default"
    assert levels.choose_for_share(100e6, walls, ratios) == "fast"


def test_a_known_link_never_gets_max() -> None:
    """max is chosen only when configured: even measured 10 % smaller, zstd 19's CPU and
    memory (RSS 190 -> 341 MB in bench-wan) are not what a link-rate choice should buy."""
    for _ in range(5):
        levels.record("default", 34_000_000, 10_000_000, 34 / 40)
        levels.record("max", 34_000_000, 9_000_000, 34 / 30)
    assert levels.choose_level(4, cores=2) == "default"
    assert levels.choose_level(20, cores=2) == "default"
