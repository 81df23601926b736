"""Prefetch rules: which priors an exam needs, and when the WAN may carry them.

Owns: pure decisions, no I/O: the rule for an ordered modality, the choice of priors among the
region's studies (same patient, never the current accession, at most N, newest first, not
older than max_age_days, same modality / same body part / any), and the WAN time windows.
May not touch: the database or the network.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from appliance.config import PrefetchRule, PrefetchWindow
from appliance.routing import patterns

log = logging.getLogger("pas.prefetch")


@dataclass(frozen=True)
class Candidate:
    """A study the region holds for the patient (from QIDO-RS)."""

    study_uid: str
    study_date: str            # YYYYMMDD or ''
    accession_number: str
    modalities: frozenset[str]
    instances: int | None      # NumberOfStudyRelatedInstances, when the region gives it
    body_parts: frozenset[str] = frozenset()


def rule_for(rules: list[PrefetchRule], modality: str | None) -> PrefetchRule | None:
    """The first rule whose ``modality`` regex matches the ordered modality (a rule without
    one matches everything). A pattern that cannot tell in time (routing/patterns.py) counts
    as not matching, logged: the next rule is tried."""
    for rule in rules:
        if rule.modality is None:
            return rule
        try:
            if patterns.search(rule.modality, modality or ""):
                return rule
        except patterns.PatternTimeout as exc:
            if exc.fresh:
                log.error("prefetch rule %r: modality: %s; counted as not matching",
                          rule.name, exc)
    return None


def choose_priors(rule: PrefetchRule, candidates: list[Candidate], *, modality: str | None,
                  body_part: str | None, accession: str | None,
                  current_study_uid: str | None = None,
                  today: dt.date | None = None) -> list[Candidate]:
    """Newest first, at most ``rule.priors``; the current exam is never its own prior."""
    today = today or dt.date.today()
    chosen = []
    for candidate in candidates:
        if accession and candidate.accession_number == accession:
            continue
        if current_study_uid and candidate.study_uid == current_study_uid:
            continue
        if rule.max_age_days and candidate.study_date:
            try:
                taken = dt.datetime.strptime(candidate.study_date[:8], "%Y%m%d").date()
            except ValueError:
                taken = None
            if taken is not None and (today - taken).days > rule.max_age_days:
                continue
        if rule.same == "modality" and modality and modality.upper() not in candidate.modalities:
            continue
        if rule.same == "body_part" and body_part and \
                body_part.upper() not in candidate.body_parts:
            continue
        chosen.append(candidate)
    chosen.sort(key=lambda c: c.study_date, reverse=True)
    return chosen[: rule.priors]


def candidate_from_qido(row: dict[str, Any]) -> Candidate | None:
    def first(tag: str) -> Any:
        values = row.get(tag, {}).get("Value")
        return values[0] if values else None

    study_uid = first("0020000D")
    if not study_uid:
        return None
    modalities = frozenset(str(m).upper() for m in row.get("00080061", {}).get("Value", [])
                           if m is not None)  # an empty value is null (PS3.18 F.2.5)
    count = first("00201208")
    return Candidate(str(study_uid), str(first("00080020") or ""),
                     str(first("00080050") or ""), modalities,
                     int(count) if count is not None else None)


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def in_window(windows: list[PrefetchWindow], moment: dt.datetime) -> bool:
    """True when ``moment`` (local time) is inside one window, or when there are none."""
    if not windows:
        return True
    now_min = moment.hour * 60 + moment.minute
    for window in windows:
        start, end = _minutes(window.start), _minutes(window.end)
        inside = start <= now_min < end if start <= end else (now_min >= start or now_min < end)
        if inside:
            return True
    return False


def next_window_start(windows: list[PrefetchWindow], moment: dt.datetime) -> dt.datetime:
    """The next moment a window opens (for deferring a request); ``moment`` if in one."""
    if in_window(windows, moment):
        return moment
    best: dt.datetime | None = None
    for window in windows:
        hours, minutes = (int(x) for x in window.start.split(":"))
        opening = moment.replace(hour=hours, minute=minutes, second=0, microsecond=0)
        if opening <= moment:
            opening += dt.timedelta(days=1)
        if best is None or opening < best:
            best = opening
    assert best is not None
    return best
