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
from typing import Any

from tests.support.hub import HubProcess, enroll
from tests.support.peers import CT_DIR, MR_DIR, PasProcess, read_rows, storescu, wait_for


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
        assert "Backlog: none" not in said  # they wait: not "nothing waiting"
        checks = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json",
                                                           check=False).stdout)}
        assert checks["enrolment"]["detail"] == (
            "not enrolled with a regional hub: 6 instances of 1 study received meanwhile "
            "wait for it to go to the region"), checks["enrolment"]
    finally:
        pas.stop()

    try:
        _enrolled_then_confirmed(hub, pas, "EARLY", 6)
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


def test_a_purged_waiting_study_leaves_no_row_for_the_next_instances(
        pas_factory: Any, tmp_path: Path) -> None:
    """``pas cache purge --force`` of a study waiting for the enrolment: its waiting rows go
    with its instances. They stayed; the next instances received took the freed ids and
    were counted waiting (and would have been routed twice at the enrolment) before they
    were even routed."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_STUDY__STABLE_AFTER_S": "1",
                       "PAS_STUDY__CHECK_INTERVAL_S": "0.2"})
    first = sorted(CT_DIR.glob("A002304_*_19010112-*.dcm"))  # one study of 3 images
    storescu(first, pas.port)
    wait_for(lambda: pas.status()["awaiting_enrolment"]["instances"] == 3, 30,
             what="the study kept for the hub")
    [study] = {r["study_uid"] for r in read_rows(pas.home / "pas.sqlite",
                                                  "SELECT study_uid FROM studies")}
    ids = [r["id"] for r in read_rows(pas.home / "pas.sqlite", "SELECT id FROM instances")]
    pas.cli("cache", "purge", "--force", study)
    assert not read_rows(pas.home / "pas.sqlite", "SELECT * FROM awaiting_hub")
    pas.stop()  # the next study must not go stable (routed) before it is looked at
    pas.env["PAS_STUDY__STABLE_AFTER_S"] = "3600"
    pas.start()
    storescu(sorted(CT_DIR.glob("A046441_*_19010101-*.dcm")), pas.port)
    wait_for(lambda: pas.status()["instances"] == 3, 30, what="the next study stored")
    reused = [r["id"] for r in read_rows(pas.home / "pas.sqlite", "SELECT id FROM instances")]
    assert set(reused) & set(ids), (ids, reused)  # the ids freed are taken again
    assert pas.status()["awaiting_enrolment"] == {"instances": 0, "studies": 0}


def test_migration_24_drops_the_rows_left_and_the_trigger_keeps_them_off(
        tmp_path: Path) -> None:
    """An index of schema 23 holding rows a purge left: one of no instance, one older than
    the instance that took its id. They go; the row of an instance that waits stays, and
    goes with its instance."""
    from appliance.store.db import Database
    from appliance.store.index import InstanceRecord, StoredFile
    from appliance.store.schema import MIGRATIONS
    from tests.support.old_schema import record_before_28

    db = Database(tmp_path / "pas.sqlite", MIGRATIONS[:23])
    ct = "1.2.840.10008.5.1.4.1.1.2"
    waits, took_a_freed_id = (record_before_28(
        db, InstanceRecord(uid, ct, "1.2.840.10008.1.2.1", "1.2.9", "1.2.9.2", patient_id="P"),
        StoredFile(uid, 1, sha * 64)).instance_id for uid, sha in (("1.2.9.1", "1"),
                                                                   ("1.2.9.3", "3")))
    [(received,)] = db.connection().execute("SELECT max(received_at) FROM instances")
    with db.transaction() as conn:
        conn.executemany("INSERT INTO awaiting_hub (instance_fk, since) VALUES (?, ?)",
                         [(waits, received + 1), (took_a_freed_id, received - 100),
                          (took_a_freed_id + 50, received)])
    db.close()
    db = Database(tmp_path / "pas.sqlite", MIGRATIONS)
    try:
        rows = [tuple(r) for r in db.connection().execute("SELECT instance_fk FROM awaiting_hub")]
        assert rows == [(waits,)]
        with db.transaction() as conn:  # as an eviction or a purge deletes it
            conn.execute("DELETE FROM instances WHERE id = ?", (waits,))
        assert not db.connection().execute("SELECT 1 FROM awaiting_hub").fetchall()
    finally:
        db.close()


def test_a_rule_naming_the_hub_before_the_enrolment_waits_for_it_then_sends(
        hub: HubProcess, tmp_path: Path) -> None:
    """A rule that names the hub on an appliance not enrolled yet: its job waits for the
    credentials (no attempt counted, none failed), and the start after ``pas enroll`` sends
    it. It failed for good at once before, to be retried by hand."""
    home = tmp_path / "pas"
    home.mkdir()
    (home / "appliance.toml").write_text(
        '[[routing.rules]]\nname = "MR to the region"\nmatch = { modality = "^MR$" }\n'
        'destinations = ["hub"]\n')
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:4]
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_STUDY__STABLE_AFTER_S": "1",
                            "PAS_QUEUE__MAX_ATTEMPTS": "1"})
    pas.env.pop("PAS_CONFIG", None)
    pas.start()
    try:
        storescu(files, pas.port)

        def waiting() -> dict | None:
            rows = read_rows(home / "pas.sqlite", "SELECT * FROM jobs")
            return dict(rows[0]) if rows and rows[0]["last_error"] else None
        job = wait_for(waiting, 30, what="the job to the hub tried once")
        assert (job["destination"], job["state"], job["attempts"]) == ("hub", "pending", 0), job
        assert job["last_error"].startswith("waiting for credentials: destination 'hub': this "
                                            "appliance is not enrolled"), job
        assert "failed for good" not in pas.log()
    finally:
        pas.stop()

    try:
        _enrolled_then_confirmed(hub, pas, "RULED", 4)
    finally:
        pas.stop()


def _enrolled_then_confirmed(hub: HubProcess, pas: PasProcess, site: str, count: int) -> None:
    """``pas enroll`` (the real CLI) while the daemon is stopped, then its start: the
    ``count`` instances received before are confirmed by the region, in one hub job."""
    enroll(hub, pas.home, site, cli=True)
    pas.start()
    wait_for(lambda: pas.status()["confirmed_instances"] == count, 90,
             what=f"the {count} instances confirmed by the region after the enrolment")
    status = pas.status()
    assert status["awaiting_enrolment"] == {"instances": 0, "studies": 0}
    assert status["jobs_by_kind"] == {"hub": {"done": 1}}


def test_a_version_a_correction_replaced_is_not_counted_waiting(tmp_path: Path) -> None:
    """``pas status`` said "625 instances of 42 studies wait for the enrolment" under
    "instances 613": the versions corrections replaced were counted too, and they are never
    sent."""
    from appliance.store import awaiting_hub, index
    from appliance.store import jobs as job_store
    from appliance.store.db import Database
    from appliance.store.index import InstanceRecord, StoredFile

    db = Database(tmp_path / "pas.sqlite")
    record = InstanceRecord("1.2.9.1", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                            "1.2.9", "1.2.9.100", patient_id="P1", modality="MR")
    for version, digest in ((1, "a" * 64), (2, "b" * 64)):  # the second, a correction
        held = index.record_instance(db, record, StoredFile(f"aa/{version}.dcm", 10, digest))
        assert held.version == version
        row = db.query_one("SELECT study_fk FROM instances WHERE id = ?", (held.instance_id,))
        job_store.route_study(db, int(row["study_fk"]), [held.instance_id], [],
                              awaiting_hub_ids=[held.instance_id])
    assert len(db.query("SELECT * FROM awaiting_hub")) == 2
    assert awaiting_hub.waiting(db) == (1, 1)


def test_an_instance_only_a_continue_rule_matched_waits_for_the_hub_too(
        hub: HubProcess, tmp_path: Path) -> None:
    """Before the enrolment, with no fallback, an instance only an additive rule
    (``continue = true``) matched went to that rule's destination and was not filed for the
    hub: the enrolment never sent it to the region, which never confirmed it, so the cache
    kept it for ever. Now it goes to the rule's destination and waits for the hub too."""
    from tests.support.peers import StoreSCP

    home = tmp_path / "pas"
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:3]
    research = StoreSCP(tmp_path / "research").start()
    try:
        pas = PasProcess(home, {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true",
            "PAS_DESTINATIONS__RESEARCH__KIND": "dicom",
            "PAS_DESTINATIONS__RESEARCH__AE_TITLE": research.ae_title,
            "PAS_DESTINATIONS__RESEARCH__HOST": "127.0.0.1",
            "PAS_DESTINATIONS__RESEARCH__PORT": str(research.port),
            "PAS_ROUTING__RULES": '[{name = "copy", destinations = ["research"], '
                                  'continue = true}]'})
        pas.start()
        try:
            storescu(files, pas.port)
            wait_for(lambda: pas.status()["jobs"].get("done") == 1, 30,
                     what="the copy to the research node done")
            assert pas.status()["awaiting_enrolment"] == {"instances": 3, "studies": 1}
            assert "-> research; to the region once this appliance is enrolled" in pas.log()
            assert len(research.files()) == 3
        finally:
            pas.stop()
        enroll(hub, home, "CONT", cli=True)
        pas.start()
        try:
            wait_for(lambda: pas.status()["confirmed_instances"] == 3, 90,
                     what="the 3 instances confirmed by the region after the enrolment")
            assert pas.status()["awaiting_enrolment"] == {"instances": 0, "studies": 0}
        finally:
            pas.stop()
    finally:
        research.stop()
