"""``pas rules test FILE.dcm`` reads a file as the daemon's ingest does, so that its verdict
is the daemon's.

It read the attributes with ``str(ds.get(...))``: a value of several (BodyPartExamined
``HEAD\\NECK``, as modalities write it) became Python's list, ``['HEAD', 'NECK']``, where the
index and routing see ``HEAD\\NECK``; and text in UTF-8 with no Specific Character Set was
read as Latin-1 (``CrÃ¢ne``) where the index keeps ``Crâne``. A rule on such a value was
said not to match while the daemon followed it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.configs import everything_to
from tests.support.objects import tiny_ct
from tests.support.peers import StoreSCP, free_port, storescu, wait_for
from tests.test_routing import jobs_of


def test_rules_test_matches_a_multi_valued_body_part_as_the_daemon_routes_it(
        pas_factory, tmp_path: Path) -> None:
    """Before the fix: ``pas rules test`` showed body_part "['HEAD', 'NECK']", the rule not
    matching and the file going to the fallback, while the daemon sent the study by the
    rule, urgent."""
    node = StoreSCP(tmp_path / "pacs", ae_title="PACS")
    node.port = free_port()  # nothing listens: the job is made, it need not go
    config = everything_to(tmp_path / "appliance.toml", node, before="""
        [[routing.rules]]
        name = "head"
        match = { body_part = "^head\\\\\\\\neck$", study_description = "^crâne$" }
        destinations = ["pacs"]
        priority = "urgent"
        """)
    ds = tiny_ct(BodyPartExamined=["HEAD", "NECK"])
    ds.add_new(0x00081030, "LO", "Crâne".encode())  # UTF-8, no Specific Character Set
    path = tmp_path / "head-neck.dcm"
    ds.save_as(path, enforce_file_format=True)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    answer = pas.cli("rules", "test", str(path), "--json")
    assert "stored as received" not in answer.stderr  # the ingest's log line: nothing stored
    shown = json.loads(answer.stdout)
    assert (shown["attributes"]["body_part"], shown["attributes"]["study_description"]) == (
        "HEAD\\NECK", "Crâne"), shown["attributes"]
    assert [(r["name"], r["matched"]) for r in shown["rules"]] == [("head", True)], shown
    assert shown["routes"] == [{"destination": "pacs", "priority": "urgent", "rule": "head"}]
    # What the daemon does with the same file:
    storescu(path, pas.port)
    wait_for(lambda: jobs_of(pas.home), 60, what="the study routed")
    [job] = jobs_of(pas.home)
    assert (job["destination"], job["rule"], job["priority"]) == ("pacs", "head", 0), job


def test_rules_test_refuses_a_file_the_daemon_would_refuse(pas_factory,
                                                           tmp_path: Path) -> None:
    """A file without a Study Instance UID is refused by the daemon's ingest: it is not
    routed at all, and ``pas rules test`` says so instead of showing a route."""
    ds = tiny_ct()
    del ds.StudyInstanceUID
    path = tmp_path / "no-study.dcm"
    ds.save_as(path, enforce_file_format=True)
    pas = pas_factory({}, start=False)
    result = pas.cli("rules", "test", str(path), "--json", check=False)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert " ".join(result.stderr.split()) == (
        f"{path}: PAS would refuse this file: StudyInstanceUID is missing (nothing to route)")
