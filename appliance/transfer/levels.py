"""Choosing the packing level so that packing never slows a transfer below its link.

Owns: the per-level measurements (compression ratio, original bytes per CPU-second) that
``pack.pack_bucket`` records after every bucket, and the choice behind ``level="auto"``.
May not touch: files, the network, the database.

Why: JPEG-LS ("default") sends about 1.6x fewer bytes than zstd alone on CT, but costs about
3x the CPU. On a 20 Mbit/s line the CPU is idle and every byte saved is time saved; on a
100 Mbit/s line with two busy cores, the packer can become the bottleneck. What the study
gets per second is ``min(packing rate, link rate x ratio)``; the chooser takes the level that
maximises it, from what this process actually measured (priors from ``make bench-codec``
until it has measured a level), preferring the stronger level on a tie.
"""

from __future__ import annotations

import os
import threading

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

_lock = threading.Lock()
_measured: dict[str, tuple[float, float]] = {}
_link_mbps: float | None = None


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


def estimates() -> dict[str, tuple[float, float]]:
    """(ratio, MB per CPU-second) per level: measured where measured, else the prior."""
    with _lock:
        return {level: _measured.get(level, prior) for level, prior in PRIORS.items()}


def choose_level(link_mbps: float | None = None, cores: int | None = None) -> str:
    """The level that delivers the most original bytes per second on this link."""
    link = link_mbps if link_mbps is not None else _link_mbps
    if not link:
        return "default"
    usable_cores = max(1.0, (cores or os.cpu_count() or 1) * CPU_SHARE)
    link_bytes = link * 1e6 / 8
    best, best_rate = "default", -1.0
    for level in _CANDIDATES:
        ratio, speed = estimates()[level]
        delivered = min(speed * 1e6 * usable_cores, link_bytes * ratio)
        if delivered > best_rate * 1.05:  # a stronger level keeps the tie
            best, best_rate = level, delivered
    return best


def reset() -> None:
    """Forget measurements and the link rate (a new process state; used by tests)."""
    global _link_mbps
    with _lock:
        _measured.clear()
        _link_mbps = None
