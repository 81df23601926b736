"""Ordered routing rules, evaluated on one instance's attributes.

A rule matches when every regular expression it names matches (``re.search``, ignoring
case; a missing attribute is the empty string). The first matching rule decides unless it
says ``continue = true``; when none decides, the fallback does (``routing.fallback``, or the
default route to the hub of an enrolled appliance). A ``continue`` rule is additive: its
destinations come on top of what decides. It used to switch the fallback off: an enrolled
appliance with one rule "also copy CT to the research node, continue = true" never sent a CT
to the region, which never confirmed it, so the cache could never evict it. ``explain``
returns the reasoning so that ``pas rules test FILE.dcm`` can show it.

A pattern that cannot tell within its time limit (routing/patterns.py: catastrophic
backtracking on a value from outside) counts as not matching, and the error is logged naming
the rule: the study still goes where the other rules or the fallback send it, rather than
nowhere, and routing goes on for everyone else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from appliance.config import PRIORITY_RANK, RoutingSection, Rule
from appliance.routing import patterns

log = logging.getLogger("pas.routing")

MATCH_KEYS = ("calling_ae", "called_ae", "modality", "sop_class", "study_description",
              "body_part")


@dataclass(frozen=True)
class Route:
    destination: str
    priority: int
    rule: str


@dataclass
class RuleResult:
    name: str
    matched: bool
    reasons: list[str] = field(default_factory=list)


def _check(rule: Rule, attributes: dict[str, str | None]) -> RuleResult:
    result = RuleResult(rule.name, matched=True)
    for key in MATCH_KEYS:
        pattern = getattr(rule.match, key)
        if pattern is None:
            continue
        value = attributes.get(key) or ""
        try:
            matched = patterns.search(pattern, value)
        except patterns.PatternTimeout as exc:
            if exc.fresh:  # once per value, not once per instance of the study
                log.error("routing rule %r: %s: %s; counted as not matching", rule.name, key,
                          exc)
            result.matched = False
            result.reasons.append(f"{key}: {exc}; counted as not matching")
            continue
        if matched:
            result.reasons.append(f"{key} {value!r} matches /{pattern}/")
        else:
            result.matched = False
            result.reasons.append(f"{key} {value!r} does not match /{pattern}/")
    if not result.reasons:
        result.reasons.append("no conditions: matches everything")
    return result


def explain(routing: RoutingSection, attributes: dict[str, str | None],
            default_destinations: list[str] = ()) -> tuple[list[RuleResult], list[Route]]:  # type: ignore[assignment]
    """Every rule's verdict, and the routes that follow from them."""
    results: list[RuleResult] = []
    routes: list[Route] = []
    decided = False
    for rule in routing.rules:
        result = _check(rule, attributes)
        if decided:
            result.reasons.append("(not evaluated: an earlier rule decided)")
            result.matched = False
        results.append(result)
        if result.matched and not decided:
            routes.extend(Route(d, PRIORITY_RANK[rule.priority], rule.name)
                          for d in rule.destinations)
            decided = not rule.continue_
    if not decided:  # no rule, or only additive (continue) ones: the fallback decides
        fallback = routing.fallback
        names = fallback.destinations or list(default_destinations)
        routes.extend(Route(d, PRIORITY_RANK[fallback.priority], "fallback") for d in names)
    # One route per destination: the most urgent priority wins.
    best: dict[str, Route] = {}
    for route in routes:
        if route.destination not in best or route.priority < best[route.destination].priority:
            best[route.destination] = route
    return results, list(best.values())


def routes_for(routing: RoutingSection, attributes: dict[str, str | None],
               default_destinations: list[str] = ()) -> list[Route]:  # type: ignore[assignment]
    return explain(routing, attributes, default_destinations)[1]
