"""How the daemon's disk alert is said outside it: the heartbeat's error line, the level the
hub reads back from it, the level ``/metrics`` exports.

Owns: that phrase and the levels. May not touch: anything else (the hub imports it; no store,
no network).

The cache (ops/cache_policy.py) fills the spool's file system to between its watermarks by
design, so the file system's figure alone is no problem: a sound site sat at 85 % half the
time and was flagged. What is one is the daemon's own alert: past the high watermark with
nothing left to evict (``1``), or the quota or the free-space floor near, where C-STOREs are
refused with 0xA700 (``2``: the alert's text begins "hard limit"). A quota refusing C-STOREs
on a half-empty disk showed in no figure at all.
"""

from __future__ import annotations

PREFIX = "disk alert: "
HARD_LIMIT = "hard limit"
NONE, ABOVE_HIGH_WATERMARK, REFUSING_IMAGES = 0, 1, 2


def heartbeat_error(alert: str) -> str:
    """The heartbeat's error line for the daemon's raised disk alert ``alert``."""
    return PREFIX + alert


def level_of(alert: str | None) -> int:
    """The level of the daemon's disk alert (None: not raised)."""
    if not alert:
        return NONE
    return REFUSING_IMAGES if alert.startswith(HARD_LIMIT) else ABOVE_HIGH_WATERMARK


def level_said(error: str) -> int:
    """The level a heartbeat error of :func:`heartbeat_error` says (0 for any other)."""
    return level_of(error[len(PREFIX):]) if error.startswith(PREFIX) else NONE
