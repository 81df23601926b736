"""Studies received before the enrolment reach the region once the appliance is enrolled.

An appliance may receive before it is enrolled: the first boot's enrolment failed (the hub
not reachable yet), or the site enrols later (docs/install.md). A study that went stable
then, and that no rule and no fallback sent anywhere, was marked routed with no job: the
default route to the hub did not exist. Enrolled (``pas enroll``) and restarted, the
appliance never sent it; the region never had it, and the cache could never evict it. Now
routing files such instances for the hub (appliance/store/awaiting_hub.py) and the first
enrolled start sends them. Real peers: ``pas run``, ``pas hub run`` with its archive, the
real ``pas enroll``, DCMTK storescu.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.hub import HubProcess, enroll
from tests.support.peers import MR_DIR, PasProcess, read_rows, storescu, wait_for


def test_a_study_received_before_the_enrolment_goes_to_the_region_after_it(
        hub: HubProcess, tmp_path: Path) -> None:
    home = tmp_path / "pas"
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:6]
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    pas.start()
    try:
        storescu(files, pas.port)
        wait_for(lambda: "sent to the region once this appliance is enrolled" in pas.log(),
                 30, what="the stable study kept for the hub")
        status = pas.status()
        assert status["jobs"] == {} and status["confirmed_instances"] == 0
        assert status["awaiting_enrolment"] == {"instances": 6, "studies": 1}
        said = " ".join(pas.cli("status").stdout.split())
        assert ("not enrolled: 6 instances of 1 study wait for the enrolment to go to the "
                "region (pas enroll, then restart PAS)") in said, said
        checks = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json",
                                                           check=False).stdout)}
        assert checks["enrolment"]["detail"] == (
            "not enrolled with a regional hub: 6 instances of 1 study received meanwhile "
            "wait for it to go to the region"), checks["enrolment"]
    finally:
        pas.stop()

    enroll(hub, home, "EARLY", cli=True)
    pas.start()
    try:
        wait_for(lambda: pas.status()["confirmed_instances"] == 6, 90,
                 what="the six instances confirmed by the region")
        status = pas.status()
        assert status["awaiting_enrolment"] == {"instances": 0, "studies": 0}
        assert status["jobs_by_kind"] == {"hub": {"done": 1}}
        assert ("start-up: 6 instances of 1 study received before this appliance was "
                "enrolled routed again: they go to the hub now") in pas.log()
        (row,) = [r for r in json.loads(pas.cli("audit", "--event", "recovery",
                                                "--json").stdout)
                  if "before the enrolment" in (r["detail"] or "")]
        assert row["detail"] == ("6 instances of 1 study received before the enrolment "
                                 "routed again, to the hub")
    finally:
        pas.stop()
    # The region holds each instance with the bytes the modality sent.
    sent = {r["sop_instance_uid"]: r["sha256"] for r in read_rows(
        home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances")}
    confirmed = {r["sop_instance_uid"]: r["sha256"] for r in read_rows(
        home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances "
                             "WHERE confirmed_at IS NOT NULL")}
    assert len(sent) == 6 and confirmed == sent

    # Started again, nothing is sent twice: the instances wait for nothing any more.
    pas.start()
    try:
        assert pas.status()["jobs_by_kind"] == {"hub": {"done": 1}}
        assert pas.log().count("received before this appliance was enrolled") == 1
    finally:
        pas.stop()
