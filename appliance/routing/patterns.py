"""Regular expressions from the configuration, matched against what senders sent, in bounded time.

Owns: compiling and matching the patterns of the routing rules and the prefetch rules (the
same syntax as Python's ``re``, case-insensitive, ``search``). May not touch: what a match
decides (routing/rules.py, prefetch/rules.py decide that) or the configuration's checks.

Why: a pattern such as ``(a|aa)+$`` backtracks exponentially on a value that almost matches,
and the values come from outside (a modality's StudyDescription, an HL7 order's modality).
Python's ``re`` has no time limit and holds the GIL while it backtracks: one such value froze
the whole daemon, C-STOREs from every modality unanswered. ``pas config check`` refuses the
common catastrophic form (a repeat inside a repeat, config_types.py), a heuristic that
cannot catch every slow pattern. Here each match runs with mrab-regex (the ``regex`` package,
whose default VERSION0 syntax is ``re``'s), which gives up after :data:`MATCH_TIMEOUT_S` and
releases the GIL while it matches: a slow pattern costs one decision that much time, logged,
and the daemon serves on.
"""

from __future__ import annotations

from functools import lru_cache

import regex

from appliance.config import MATCH_TIMEOUT_MS

# A routing or prefetch pattern on a 64-character DICOM value takes microseconds; 50 ms is
# ~1000x that, and short enough that a hostile value delays one study's routing, not ingest.
MATCH_TIMEOUT_S = MATCH_TIMEOUT_MS / 1000


class PatternTimeout(Exception):
    """The pattern did not finish on this value within :data:`MATCH_TIMEOUT_S`. ``fresh``:
    this call timed out (False: the verdict was remembered from an earlier call, e.g. the
    study's previous instance, which has logged it already)."""

    def __init__(self, pattern: str, value: str, fresh: bool):
        self.pattern, self.value, self.fresh = pattern, value, fresh
        super().__init__(f"/{pattern}/ did not finish on {value!r} within "
                         f"{MATCH_TIMEOUT_S * 1000:.0f} ms (catastrophic backtracking): "
                         f"rewrite the pattern without overlapping repeats")


@lru_cache(maxsize=512)
def compiled(pattern: str) -> regex.Pattern[str]:
    """``pattern`` compiled as the rules use it (case-insensitive); raises ``regex.error``."""
    return regex.compile(pattern, regex.IGNORECASE | regex.VERSION0)


@lru_cache(maxsize=4096)
def _verdict(pattern: str, value: str) -> bool | None:
    """Remembered per value: a study's instances share their StudyDescription, and rules are
    evaluated per instance, so a value that times out costs the limit once, not per image."""
    try:
        return compiled(pattern).search(value, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        return None


def search(pattern: str, value: str) -> bool:
    """Whether ``pattern`` matches anywhere in ``value``; :class:`PatternTimeout` if it could
    not tell in time."""
    misses = _verdict.cache_info().misses
    verdict = _verdict(pattern, value)
    if verdict is None:
        raise PatternTimeout(pattern, value, fresh=_verdict.cache_info().misses > misses)
    return verdict
