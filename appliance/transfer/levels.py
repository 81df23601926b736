"""Choosing the packing level so that packing never slows a transfer below its link.

Owns: the per-level measurements (compression ratio, original bytes per CPU-second) that
``pack.pack_bucket`` records after every bucket, and the choice behind ``level="auto"``.
May not touch: files, the network, the database.

Why: JPEG-LS ("default") sends about 1.6x fewer bytes than zstd alone on CT, but costs about
3x the CPU. On a 20 Mbit/s line the CPU is idle and every byte saved is time saved; on a
100 Mbit/s line with two busy cores, the packer can become the bottleneck. What the study
gets per second is ``min(packing rate, link rate x ratio)``; the chooser takes the level that
maximises it, from what this process actually measured (priors from ``make bench-codec``
until it has measured a level); on a known link rate a stronger level must deliver 5 % more
to be chosen (its CPU is latency on a short study).

The link rate comes from ``set_link_mbps`` when the caller knows it (the uplink: the cap in
force, else the rate its PUTs measured, ``transfer.pacing.LinkMeter``). Otherwise it is inferred
from the caller's own pace: an uplink worker packs a bucket, sends it, then packs the next,
so the time between one ``pack_bucket`` returning and the same thread's next call is what
sending the previous bucket's bytes took: that worker's share of the link. Each worker then
wants the level with the shortest ``pack time + send time`` per bucket.
"""

from __future__ import annotations

import os
import threading
import time

# Priors (bench-codec, CT set, idle core): ratio, original MB per CPU-second. Replaced by
# measurements as soon as a level has packed a few buckets.
PRIORS: dict[str, tuple[float, float]] = {
    "fast": (2.1, 110.0),
    "default": (3.4, 42.0),
    "max": (3.4, 25.0),
}
# Share of the cores packing may count on (TLS, AES-GCM, the rest of the daemon need some).
CPU_SHARE = 0.75
SMOOTHING = 0.3  # weight of a new bucket in the running averages
_CANDIDATES = ("max", "default", "fast")  # strongest first: ties go to fewer bytes
# For a known link rate, lightest first; never "max": on the CT and MR sets it saves at most 1 %
# of default's bytes for 1.3-6x its CPU, and zstd 19's contexts took the uplink's RSS from
# ~190 to 341 MB when auto picked it against a priors-only estimate (bench-wan, 100 Mbit/s).
_LINK_CANDIDATES = ("fast", "default")

# A gap longer than this between two buckets of one thread is idleness, not sending.
MAX_SEND_GAP_S = 120.0

_lock = threading.Lock()
_measured: dict[str, tuple[float, float]] = {}
_wall: dict[str, float] = {}  # level -> original MB per wall-second of one pack_bucket call
_link_share: float | None = None  # bytes per second one worker's sends achieve (inferred)
_link_mbps: float | None = None
_thread = threading.local()  # last_return (monotonic), last_packed (bytes)


def set_link_mbps(mbps: float | None) -> None:
    """What the link can carry (the configured cap, or the measured rate); None: unknown,
    and ``auto`` then means ``default``."""
    global _link_mbps
    with _lock:
        _link_mbps = mbps if mbps and mbps > 0 else None


def record(level: str, original: int, packed: int, cpu_s: float) -> None:
    """One packed bucket's figures, folded into the running averages for its level."""
    if level not in PRIORS or original <= 0 or packed <= 0 or cpu_s <= 0:
        return
    ratio, speed = original / packed, original / cpu_s / 1e6
    with _lock:
        old = _measured.get(level)
        if old is not None:
            ratio = old[0] + SMOOTHING * (ratio - old[0])
            speed = old[1] + SMOOTHING * (speed - old[1])
        _measured[level] = (ratio, speed)


def begin_bucket(now: float | None = None) -> None:
    """Called as ``pack_bucket`` starts: the gap since this thread's previous bucket was its
    sending time; fold the rate it implies into the inferred link share. (``now``: a
    monotonic time, for tests.)"""
    global _link_share
    last_return = getattr(_thread, "last_return", None)
    last_packed = getattr(_thread, "last_packed", 0)
    if last_return is None or last_packed <= 0:
        return
    gap = (time.monotonic() if now is None else now) - last_return
    if not 0 < gap <= MAX_SEND_GAP_S:
        return
    rate = last_packed / gap
    with _lock:
        _link_share = rate if _link_share is None else (
            _link_share + SMOOTHING * (rate - _link_share))


def end_bucket(level: str, original: int, packed: int, wall_s: float,
               now: float | None = None) -> None:
    """Called as ``pack_bucket`` returns: its wall speed, and the start of the next gap."""
    _thread.last_return = time.monotonic() if now is None else now
    _thread.last_packed = packed
    if level not in PRIORS or original <= 0 or wall_s <= 0:
        return
    speed = original / wall_s / 1e6
    with _lock:
        old = _wall.get(level)
        _wall[level] = speed if old is None else old + SMOOTHING * (speed - old)


def choose_for_share(share_bytes_s: float, walls: dict[str, float],
                     ratios: dict[str, float]) -> str:
    """The level with the shortest pack + send time per original MB for one worker whose
    sends run at ``share_bytes_s``: 1 / wall MB/s + 1 / (ratio x share MB/s)."""
    share_mb_s = share_bytes_s / 1e6
    best, best_time = "default", float("inf")
    for level in _CANDIDATES:
        seconds = 1 / walls[level] + 1 / (ratios[level] * share_mb_s)
        if seconds < best_time / 1.05:  # a stronger level keeps a near tie
            best, best_time = level, seconds
    return best


def estimates() -> dict[str, tuple[float, float]]:
    """(ratio, MB per CPU-second) per level: measured where measured, else the prior."""
    with _lock:
        return {level: _measured.get(level, prior) for level, prior in PRIORS.items()}


def choose_level(link_mbps: float | None = None, cores: int | None = None) -> str:
    """The level that delivers the most original bytes per second on this link."""
    link = link_mbps if link_mbps is not None else _link_mbps
    if not link:
        with _lock:
            share = _link_share
            walls = {level: _wall.get(level, prior[1]) for level, prior in PRIORS.items()}
        if share is None:
            return "default"
        ratios = {level: ratio for level, (ratio, _) in estimates().items()}
        return choose_for_share(share, walls, ratios)
    usable_cores = max(1.0, (cores or os.cpu_count() or 1) * CPU_SHARE)
    link_bytes = link * 1e6 / 8
    best, best_rate = "fast", -1.0
    for level in _LINK_CANDIDATES:
        ratio, speed = estimates()[level]
        delivered = min(speed * 1e6 * usable_cores, link_bytes * ratio)
        # A stronger level must deliver 5 % more to be chosen: on a tie (the line is the limit
        # for both) its extra CPU only adds latency (MR: max saves 1 % of the bytes of default
        # for 6x the CPU).
        if delivered > best_rate * 1.05:
            best, best_rate = level, delivered
    return best


def reset() -> None:
    """Forget measurements and the link rate (a new process state; used by tests)."""
    global _link_mbps, _link_share
    with _lock:
        _measured.clear()
        _wall.clear()
        _link_mbps = None
        _link_share = None
    _thread.__dict__.clear()
