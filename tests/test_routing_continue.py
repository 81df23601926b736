"""A ``continue = true`` rule is additive: the fallback and the default route still apply.

A matching ``continue`` rule switched the fallback (``routing.fallback``) and the default
route to the hub of an enrolled appliance off: with one rule "also copy CT to the research
node, continue = true" an enrolled appliance sent its CTs to the research node only. The
region never received them, never confirmed them, and the cache could never evict them.
Now the fallback decides whenever no rule without ``continue`` matched.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from appliance.config import Settings
from appliance.routing.rules import explain
from tests.support.peers import free_port, storescu, wait_for
from tests.test_routing import CT_PATIENT, jobs_of

RESEARCH_COPY = {"name": "copy CT to research", "match": {"modality": "^CT$"},
                 "destinations": ["research"], "continue": True}


def _settings(rules: list[dict], fallback: list[str] = ()) -> Settings:  # type: ignore[assignment]
    node = {"kind": "dicom", "ae_title": "NODE", "host": "127.0.0.1", "port": 11112}
    return Settings.model_validate({
        "routing": {"rules": rules, "fallback": {"destinations": list(fallback)}},
        "destinations": {name: node for name in ("research", "pacs", "urgent")}})


def _routes(settings: Settings, modality: str,
            defaults: list[str] = ()) -> list[tuple[str, str]]:  # type: ignore[assignment]
    return sorted((r.destination, r.rule)
                  for r in explain(settings.routing, {"modality": modality}, defaults)[1])


def test_a_continue_rule_keeps_the_default_route_to_the_hub() -> None:
    """Before the fix: a CT went to [research] only; the hub, the enrolled appliance's
    default route, was left out."""
    settings = _settings([RESEARCH_COPY])
    assert _routes(settings, "CT", ["hub"]) == [("hub", "fallback"),
                                                ("research", "copy CT to research")]
    assert _routes(settings, "MR", ["hub"]) == [("hub", "fallback")]
    # Not enrolled and no fallback: the copy goes, nothing else exists to send to.
    assert _routes(settings, "CT") == [("research", "copy CT to research")]


def test_a_continue_rule_keeps_the_fallback_and_a_later_deciding_rule_still_decides() -> None:
    settings = _settings([RESEARCH_COPY, {"name": "CT urgent", "match": {"modality": "^CT$"},
                                          "destinations": ["urgent"]}], fallback=["pacs"])
    # A rule without continue matched: it decides, the fallback does not apply.
    assert _routes(settings, "CT", ["hub"]) == [("research", "copy CT to research"),
                                                ("urgent", "CT urgent")]
    only_copy = _settings([RESEARCH_COPY], fallback=["pacs"])
    assert _routes(only_copy, "CT", ["hub"]) == [("pacs", "fallback"),
                                                 ("research", "copy CT to research")]


def test_the_daemon_sends_a_study_a_continue_rule_copies_to_the_fallback_too(
        pas_factory, tmp_path: Path) -> None:
    """The daemon's routing and ``pas rules test`` say the same: a job to the research node
    and one to the fallback's PACS (before the fix: the research node's only). The nodes
    do not listen: the jobs are made, they need not go."""
    config = tmp_path / "appliance.toml"
    config.write_text(textwrap.dedent(f"""
        [[routing.rules]]
        name = "copy CT to research"
        match = {{ modality = "^CT$" }}
        destinations = ["research"]
        continue = true

        [routing.fallback]
        destinations = ["pacs"]

        [destinations.research]
        kind = "dicom"
        ae_title = "RESEARCH"
        host = "127.0.0.1"
        port = {free_port()}

        [destinations.pacs]
        kind = "dicom"
        ae_title = "PACS"
        host = "127.0.0.1"
        port = {free_port()}
        """))
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    shown = json.loads(pas.cli("rules", "test", str(CT_PATIENT[0]), "--json").stdout)
    assert sorted((r["destination"], r["rule"]) for r in shown["routes"]) == [
        ("pacs", "fallback"), ("research", "copy CT to research")], shown["routes"]
    storescu(CT_PATIENT, pas.port)
    wait_for(lambda: len(jobs_of(pas.home)) >= 2, 60, what="the study routed")
    assert sorted((j["destination"], j["rule"]) for j in jobs_of(pas.home)) == [
        ("pacs", "fallback"), ("research", "copy CT to research")]
