"""Routing and the dicom destination: rules, stability, deltas, the durable queue, retries."""

from __future__ import annotations

import json
import logging
import sqlite3
import textwrap
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from appliance.config import QueueSection, Settings
from appliance.routing.backoff import next_delay
from appliance.routing.rules import explain
from appliance.store import jobs as job_store
from appliance.store.db import Database
from tests.support.objects import tiny_ct
from tests.support.peers import CT_DIR, StoreSCP, run_pas, storescu, wait_for
from tests.test_ingest import dataset_part, index_rows, sop_uid

CT_PATIENT = sorted(CT_DIR.glob("A002304_*_19001231-*.dcm"))  # one study, 3 instances


def jobs_of(home: Path) -> list[dict]:
    conn = sqlite3.connect(home / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
    finally:
        conn.close()


def write_config(path: Path, scp: StoreSCP | None, extra: str = "") -> Path:
    pacs = ""
    if scp is not None:
        pacs = f"""
        [destinations.pacs]
        kind = "dicom"
        ae_title = "{scp.ae_title}"
        host = "127.0.0.1"
        port = {scp.port}
        """
    path.write_text(textwrap.dedent(f"""
        [[routing.rules]]
        name = "emergency CT"
        match = {{ calling_ae = "^CT_URG$", modality = "^CT$" }}
        destinations = ["pacs"]
        priority = "urgent"
        {pacs}
        """) + textwrap.dedent(extra))
    return path


def test_urgent_ct_goes_to_the_local_pacs_whole_and_exact(pas_factory, storescp: StoreSCP,
                                                           tmp_path: Path) -> None:
    config = write_config(tmp_path / "appliance.toml", storescp)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    storescu(CT_PATIENT, pas.port, calling="CT_URG")
    wait_for(lambda: any(j["state"] == "done" for j in jobs_of(pas.home)), 60,
             what="the pacs job done")
    [job] = jobs_of(pas.home)
    assert (job["kind"], job["destination"], job["priority"], job["rule"]) == (
        "dicom", "pacs", 0, "emergency CT")
    received = {sop_uid(p): p for p in storescp.files()}
    assert set(received) == {sop_uid(p) for p in CT_PATIENT}
    stored = {r["sop_instance_uid"]: pas.home / "spool" / r["path"] for r in index_rows(pas.home)}
    for uid, path in received.items():  # forwarded as stored: byte for byte
        assert dataset_part(path) == dataset_part(stored[uid])
    # Another AE's CT matches no rule and no fallback: kept locally, no job.
    storescu(sorted(CT_DIR.glob("A027284_*_19000925-*.dcm")), pas.port, calling="CT_ROUTINE")
    wait_for(lambda: "no destination (kept locally)" in pas.log(), 30, what="routing pass")
    assert len(jobs_of(pas.home)) == 1


def test_late_instances_form_a_delta_routed_again(pas_factory, storescp: StoreSCP,
                                                  tmp_path: Path) -> None:
    config = write_config(tmp_path / "appliance.toml", storescp)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    storescu(CT_PATIENT[:2], pas.port, calling="CT_URG")
    wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done"], 60, what="first job")
    storescu(CT_PATIENT, pas.port, calling="CT_URG")  # two re-sent, one new
    wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done", "done"], 60,
             what="delta job")
    listing = json.loads(pas.cli("queue", "list", "--json").stdout)
    assert sorted(j["instances"] for j in listing) == [1, 2]
    # The priority as the table says it, beside its rank.
    assert {(j["priority"], j["priority_name"]) for j in listing} == {(0, "urgent")}
    assert len(storescp.files()) == 3


def test_rejecting_destination_counts_attempts_fails_then_retries(pas_factory,
                                                                  tmp_path: Path) -> None:
    """A node that answers but rejects the association (storescp --refuse: A-ASSOCIATE-RJ)
    is the peer answering, not an outage: each attempt counts, and the job is failed after
    ``queue.max_attempts`` (an unreachable node waits for the link instead,
    tests/test_dispatch_link_down.py). Once the node accepts, `pas queue retry` delivers."""
    refusing = StoreSCP(tmp_path / "refusing").start(["--refuse"])
    config = write_config(tmp_path / "appliance.toml", refusing)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_QUEUE__MAX_ATTEMPTS": "2", "PAS_QUEUE__BACKOFF_INITIAL_S": "0.2",
                       "PAS_QUEUE__BACKOFF_MAX_S": "0.5"})
    try:
        storescu(CT_PATIENT, pas.port, calling="CT_URG")
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["failed"], 60,
                 what="job failed after 2 attempts")
    finally:
        refusing.stop()
    [job] = jobs_of(pas.home)
    assert job["attempts"] == 2, job
    # The rejection with its reason (storescp --refuse gives none); now and then "(aborted)":
    # storescp closes the connection right after its A-ASSOCIATE-RJ, and pynetdicom may see
    # the close first (seen once).
    assert "pacs: association with STORESCP@" in job["last_error"], job["last_error"]
    assert job["last_error"].endswith((" not established (rejected by the peer: no reason "
                                       "given)", " not established (aborted)")), job["last_error"]
    assert not job["last_error"].startswith(job_store.WAITING_FOR_LINK)
    status = pas.status()
    assert status["jobs"] == {"failed": 1}
    assert status["links"]["pacs"]["state"] == "down"
    # pas doctor says so (it said nothing of failed jobs: all ok, exit 0).
    doctor = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json", check=False).stdout)}
    assert doctor["jobs"]["verdict"] == "warn", doctor["jobs"]
    assert doctor["jobs"]["detail"].startswith("1 job failed (pacs 1); the last: pacs: "
                                                "association with STORESCP@"), doctor["jobs"]
    assert "pas queue retry ID" in doctor["jobs"]["fix"]
    assert "not established" in status["links"]["pacs"]["last_error"]
    scp = StoreSCP(tmp_path / "late")
    scp.port = refusing.port  # the node, fixed, on the same port
    scp.start()
    try:
        assert "will be retried now" in pas.cli("queue", "retry", str(job["id"])).stdout
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done"], 60,
                 what="retried job done")
        assert len(scp.files()) == 3
    finally:
        scp.stop()
    # A retry that changes nothing says why: it was one sentence for all of these.
    done = pas.cli("queue", "retry", str(job["id"]), check=False)
    assert done.returncode == 1
    assert f"job {job['id']} is done: every instance of it was delivered" in done.stderr
    unknown = pas.cli("queue", "retry", "999", check=False)
    assert unknown.returncode == 1 and "job 999 does not exist" in unknown.stderr
    [listed] = json.loads(pas.cli("queue", "list", "--json").stdout)
    pas.cli("cache", "purge", "--force", listed["study_uid"])
    purged = " ".join(pas.cli("queue", "retry", str(job["id"]), check=False).stderr.split())
    assert f"job {job['id']} does not exist (a study's jobs go with it when the cache evicts " \
           "it or an operator purges it" in purged, purged


def test_an_expired_lease_is_claimed_again_and_resumes(tmp_path: Path) -> None:
    """A worker that died leaves its lease; the job is taken up again where it stopped."""
    from appliance.store import index
    from appliance.store.index import InstanceRecord, StoredFile

    db = Database(tmp_path / "pas.sqlite")
    ids = []
    for n in range(3):
        record = InstanceRecord(f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                "1.2.3", "1.2.3.9", patient_id="P")
        ids.append(index.record_instance(db, record, StoredFile(f"f{n}", 1, f"{n}" * 64))
                   .instance_id)
    job_store.route_study(db, 1, ids, [job_store.NewJob("dicom", "pacs", 2, "r", ids)])
    first = job_store.claim_next(db, "dead-worker", lease_s=0.0)
    assert first is not None and first.attempts == 1
    job_store.mark_sent(db, first.id, ids[:1])
    again = job_store.claim_next(db, "new-worker", lease_s=60)
    assert again is not None and again.id == first.id and again.attempts == 2
    assert [r["id"] for r in job_store.job_files(db, again.id)] == ids[1:]
    assert job_store.claim_next(db, "third", lease_s=60) is None  # the live lease holds
    assert not job_store.renew_lease(db, first.id, "dead-worker", 60)


def _one_job(tmp_path: Path) -> tuple[Database, int]:
    from appliance.store import index
    from appliance.store.index import InstanceRecord, StoredFile

    db = Database(tmp_path / "pas.sqlite")
    record = InstanceRecord("1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            "1.2.3", "1.2.3.9", patient_id="P")
    instance = index.record_instance(db, record, StoredFile("f1", 1, "1" * 64)).instance_id
    job_store.route_study(db, 1, [instance], [job_store.NewJob("dicom", "pacs", 2, "r",
                                                                [instance])])
    return db, instance


def test_a_job_that_kills_the_daemon_at_every_restart_ends_failed(tmp_path: Path) -> None:
    """A poison job (its sending segfaults or OOMs the daemon): each start-up releases the
    dead process's lease; the attempt stays counted, so max_attempts ends it as failed
    instead of a crash loop for ever (the attempt used to be given back)."""
    from appliance.store.cache import release_host_leases

    db, _instance = _one_job(tmp_path)
    for pid in range(1, 4):
        job = job_store.claim_next(db, f"box:{pid}:t:0", lease_s=300, max_attempts=3)
        assert job is not None and job.attempts == pid
        assert release_host_leases(db, "box") == 1  # the daemon restarted after the crash
    assert job_store.claim_next(db, "box:4:t:0", lease_s=300, max_attempts=3) is None
    row = db.query_one("SELECT state, attempts, last_error, lease_owner FROM jobs")
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("failed", 3, None)
    assert row["last_error"] == ("no attempt left (3 of 3); the last: the worker died while "
                                 "sending it (the daemon stopped during attempt 3)")


def test_a_job_whose_leases_keep_expiring_ends_failed(tmp_path: Path) -> None:
    db, _instance = _one_job(tmp_path)
    for n in range(1, 4):  # each worker dies: its lease expires
        job = job_store.claim_next(db, f"w{n}", lease_s=0.0, max_attempts=3)
        assert job is not None and job.attempts == n
    assert job_store.claim_next(db, "w4", lease_s=60, max_attempts=3) is None
    row = db.query_one("SELECT state, last_error FROM jobs")
    assert row["state"] == "failed"
    assert row["last_error"] == ("no attempt left (3 of 3); the last: the worker died while "
                                 "sending it (its lease expired during attempt 3)")


def test_one_kill_during_a_send_resumes_the_job(tmp_path: Path) -> None:
    """docs/reliability.md: kill -9 during a send, restart, the job resumes (not failed)."""
    from appliance.store.cache import release_host_leases

    db, instance = _one_job(tmp_path)
    first = job_store.claim_next(db, "box:1:t:0", lease_s=300, max_attempts=10)
    assert first is not None
    release_host_leases(db, "box")
    again = job_store.claim_next(db, "box:2:t:0", lease_s=300, max_attempts=10)
    assert again is not None and again.id == first.id and again.attempts == 2
    assert [r["id"] for r in job_store.job_files(db, again.id)] == [instance]
    job_store.finish(db, again.id, "box:2:t:0")
    assert db.query_one("SELECT state, last_error FROM jobs")[0] == "done"


def test_backoff_grows_with_jitter_and_stops_at_max_attempts() -> None:
    queue = QueueSection(max_attempts=5, backoff_initial_s=1, backoff_max_s=20)
    delays = [next_delay(queue, n) for n in range(1, 5)]
    assert all(d is not None and 0 < d <= 20 for d in delays)
    assert delays[3] > delays[0]  # exponential, jitter notwithstanding
    assert next_delay(queue, 5) is None


def test_rules_explain_and_cli(pas_factory, tmp_path: Path) -> None:
    config = write_config(tmp_path / "appliance.toml", StoreSCP(tmp_path / "x"), """
        [[routing.rules]]
        name = "chest"
        match = { study_description = "chest|thorax" }
        destinations = ["pacs"]
        """)
    settings = Settings.model_validate({"routing": {"rules": [
        {"name": "mr", "match": {"modality": "^MR$"}, "destinations": ["hub"],
         "continue": True},
        {"name": "all", "destinations": ["hub"], "priority": "urgent"},
    ]}})
    results, routes = explain(settings.routing, {"modality": "MR"})
    assert [r.matched for r in results] == [True, True]
    assert [(r.destination, r.priority) for r in routes] == [("hub", 0)]
    pas = pas_factory({"PAS_CONFIG": str(config)}, start=False)
    shown = pas.cli("rules", "test", str(CT_PATIENT[0]), "--calling-ae", "CT_URG").stdout
    assert "MATCH rule 'emergency CT'" in shown and "-> pacs (urgent" in shown
    description = dcmread(CT_PATIENT[0]).get("StudyDescription", "")
    other = pas.cli("rules", "test", str(CT_PATIENT[0]), "--calling-ae", "OTHER").stdout
    assert "calling_ae 'OTHER' does not match /^CT_URG$/" in other
    assert ("-> pacs (routine, from chest)" in other) == bool(
        description and ("CHEST" in description.upper() or "THORAX" in description.upper()))
    # --json: the same verdicts, for a hospital's own checks of its rules.
    answer = json.loads(pas.cli("rules", "test", str(CT_PATIENT[0]), "--calling-ae", "CT_URG",
                                "--json").stdout)
    header = dcmread(CT_PATIENT[0], stop_before_pixels=True)
    assert answer["file"] == str(CT_PATIENT[0])
    assert answer["attributes"] == {
        "calling_ae": "CT_URG", "called_ae": "PAS", "modality": "CT",
        "sop_class": header.SOPClassUID, "study_description": str(description),
        "body_part": str(header.get("BodyPartExamined", ""))}
    assert [(r["name"], r["matched"]) for r in answer["rules"]] == [
        ("emergency CT", True), ("chest", False)], answer["rules"]
    assert answer["rules"][1]["reasons"][-1] == "(not evaluated: an earlier rule decided)"
    assert answer["routes"] == [{"destination": "pacs", "priority": "urgent",
                                 "rule": "emergency CT"}]
    # Refused in an operator's words: pydicom's ended "Use force=True to force reading."
    bad = pas.cli("rules", "test", str(config), "--json", check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert " ".join(bad.stderr.split()) == (
        f"{config}: not a DICOM file (no 128-byte preamble followed by 'DICM', as DICOM Part "
        "10 files begin)")


def test_instances_fetched_from_the_region_are_never_routed_back(tmp_path: Path) -> None:
    """Fetch-through and prefetch file with origin="regional": held by the region already."""
    from appliance.routing.stability import Router
    from appliance.store import index
    from appliance.store.index import InstanceRecord, StoredFile

    db = Database(tmp_path / "pas.sqlite")
    settings = Settings.model_validate({"study": {"stable_after_s": 0}})
    for n, origin in enumerate(("regional", "local")):
        record = InstanceRecord(f"1.2.7.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", f"1.2.7.{n}.1", f"1.2.7.{n}.2",
                                patient_id="P")
        index.record_instance(db, record, StoredFile(f"x{n}", 1, f"{n}" * 64), origin=origin)
    router = Router(settings, db, lambda: ["hub"])
    assert router.route_ready() == 1  # the local study only
    [job] = job_store.list_jobs(db)
    assert job["study_uid"] == "1.2.7.1.1"
    assert index.totals(db)["confirmed_instances"] == 1  # the regional one


def test_a_job_carries_only_the_current_version_of_a_conflicting_instance(tmp_path: Path) -> None:
    from appliance.routing.stability import Router
    from appliance.store import index
    from appliance.store.index import InstanceRecord, StoredFile

    db = Database(tmp_path / "pas.sqlite")
    record = InstanceRecord("1.2.8.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            "1.2.8", "1.2.8.2", patient_id="P")
    index.record_instance(db, record, StoredFile("v1", 1, "1" * 64))
    newest = index.record_instance(db, record, StoredFile("v2", 1, "2" * 64))
    assert newest.conflict
    Router(Settings.model_validate({"study": {"stable_after_s": 0}}), db,
           lambda: ["hub"]).route_ready()
    [job] = job_store.list_jobs(db)
    assert [r["id"] for r in job_store.job_files(db, job["id"])] == [newest.instance_id]
    assert index.studies_ready_to_route(db, quiet_since=1e12) == []  # both versions routed


def test_rules_test_names_the_hub_an_enrolled_appliance_sends_to_by_default(
        pas_factory, tmp_path: Path) -> None:
    """docs/install.md: ``pas rules test FILE.dcm --calling-ae CT_URG`` shows which rule a file
    would follow. On an enrolled appliance a file no rule matches goes to the hub (the
    default route); ``pas rules test`` said "no destination: kept locally only" meanwhile."""
    from tests.support.hub import HubProcess, enroll

    hub = HubProcess(tmp_path / "hub").init().start()
    try:
        home = tmp_path / "site"
        home.mkdir()
        enroll(hub, home, "SITE")
        config = tmp_path / "appliance.toml"  # install.md's one rule: CT_URG only
        config.write_text(textwrap.dedent("""
            [[routing.rules]]
            name = "emergency CT"
            match = { calling_ae = "^CT_URG$" }
            destinations = ["hub"]
            priority = "urgent"
            """))
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                           "PAS_PREFETCH__ON_ARRIVAL": "false"}, home=home)
        shown = pas.cli("rules", "test", str(CT_PATIENT[0]), "--calling-ae", "MR1").stdout
        # What the daemon does with the same file from the same AE:
        storescu(CT_PATIENT, pas.port, calling="MR1")
        wait_for(lambda: jobs_of(home), 60, what="a job for the study")
        [job] = jobs_of(home)
        assert (job["destination"], job["priority"]) == ("hub", 2)
        assert "-> hub (routine, from fallback)" in shown, shown
        assert "kept locally only" not in shown
        # Not enrolled, the same configuration keeps it locally, and says so.
        bare = pas_factory({"PAS_CONFIG": str(config)}, start=False)
        alone = bare.cli("rules", "test", str(CT_PATIENT[0]), "--calling-ae", "MR1").stdout
        assert "-> no destination: kept locally only" in alone
    finally:
        hub.kill()


def test_a_pattern_that_backtracks_for_ever_gives_up_and_routing_goes_on(
        pas_factory, storescp: StoreSCP, tmp_path: Path) -> None:
    """``(a|aa)+`` passes ``pas config check`` (its nested-repeat heuristic does not see
    overlapping alternatives), and on 'a' * 60 + 'b' Python's re backtracks for hours holding
    the GIL: the stability pass froze the whole daemon. Each match now gives up after 50 ms
    (appliance/routing/patterns.py): that condition counts as not matching, the error names
    the rule, the study goes where the other rules or the fallback send it, and a value the
    pattern can decide on is still routed by it."""
    config = tmp_path / "appliance.toml"
    config.write_text(textwrap.dedent(f"""
        [[routing.rules]]
        name = "slow"
        match = {{ study_description = "^(a|aa)+$" }}
        destinations = ["pacs"]
        priority = "urgent"

        [routing.fallback]
        destinations = ["pacs"]

        [destinations.pacs]
        kind = "dicom"
        ae_title = "{storescp.ae_title}"
        host = "127.0.0.1"
        port = {storescp.port}
        """))
    checked = run_pas(["config", "check", str(config)], timeout=60)
    assert checked.returncode == 0, checked.stderr  # the heuristic lets it through
    hostile_study = generate_uid()
    hostiles = [tmp_path / f"hostile{n}.dcm" for n in range(3)]
    for path in hostiles:
        tiny_ct(hostile_study, StudyDescription="a" * 60 + "b").save_as(
            path, enforce_file_format=True)
    hostile, plain = hostiles[0], tmp_path / "plain.dcm"
    tiny_ct(StudyDescription="aaaa").save_as(plain, enforce_file_format=True)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    storescu([*hostiles, plain], pas.port, timeout=30)
    wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done", "done"], 30,
             what="both studies routed and sent")
    rules = {job["study_uid"]: (job["rule"], job["priority"])
             for job in json.loads(pas.cli("queue", "list", "--json").stdout)}
    assert rules == {dcmread(hostile).StudyInstanceUID: ("fallback", 2),
                     dcmread(plain).StudyInstanceUID: ("slow", 0)}
    assert len(storescp.files()) == 4
    # Logged once for the study, not once per instance (the verdict is remembered).
    assert pas.log().count("routing rule 'slow': study_description: /^(a|aa)+$/ did not "
                           f"finish on '{'a' * 60}b' within 50 ms") == 1
    shown = pas.cli("rules", "test", str(hostile)).stdout
    assert "within 50 ms" in " ".join(shown.split())
    assert "-> pacs (routine, from fallback)" in shown


def test_a_retry_of_a_running_job_says_whether_its_worker_is_alive(tmp_path: Path) -> None:
    """`pas queue retry` of a job left running by a daemon that was stopped or killed said
    it was not failed or pending: the operator could not tell it would go on by itself."""
    db, _instance = _one_job(tmp_path)
    job = job_store.claim_next(db, "worker", lease_s=60)
    assert job is not None and not job_store.retry(db, job.id, actor="operator:test")
    assert job_store.why_not_retried(db, job.id) == (
        f"job {job.id} is being sent right now: nothing to retry")
    with db.transaction() as conn:  # the worker died: its lease ran out
        conn.execute("UPDATE jobs SET lease_until = 0 WHERE id = ?", (job.id,))
    assert job_store.why_not_retried(db, job.id) == (
        f"job {job.id} was being sent when its worker stopped (its lease expired): the "
        "daemon takes it up again by itself, where it stopped")



def test_queue_list_says_when_it_shows_only_the_newest(pas_factory, tmp_path: Path) -> None:
    """`pas queue list` shows the newest 200 jobs; its title read "200 jobs" with 3,000 queued
    after an outage, and the operator took it for the backlog."""
    pas = pas_factory(home=tmp_path / "home", start=False)
    db, instance = _one_job(pas.home)
    for _ in range(2):  # three jobs in all
        job_store.route_study(db, 1, [], [job_store.NewJob("dicom", "pacs", 2, "r",
                                                           [instance])])
    part = pas.cli("queue", "list", "--limit", "2").stdout
    assert "the 2 newest of 3 jobs (--limit for more)" in part, part
    assert "3 jobs" in pas.cli("queue", "list").stdout
    assert len(json.loads(pas.cli("queue", "list", "--limit", "2", "--json").stdout)) == 2


def test_a_study_that_cannot_be_routed_does_not_hold_the_others(
        pas_factory, storescp: StoreSCP, tmp_path: Path) -> None:
    """The first study's row unreadable (its description no longer UTF-8, as a torn page
    leaves text): it stopped every routing pass, so the study after it never left. It is
    passed over and said once in the log; the other is delivered; once readable it goes."""
    config = write_config(tmp_path / "appliance.toml", storescp)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_ROUTING__FALLBACK__DESTINATIONS": '["pacs"]',
                       "PAS_STUDY__STABLE_AFTER_S": "3", "PAS_STUDY__CHECK_INTERVAL_S": "0.2"})
    first, second = CT_PATIENT, sorted(CT_DIR.glob("A027284_*_19000925-*.dcm"))
    first_uid = dcmread(first[0], stop_before_pixels=True).StudyInstanceUID
    storescu(first, pas.port)
    conn = sqlite3.connect(pas.home / "pas.sqlite", timeout=30)
    try:
        with conn:
            torn = conn.execute(
                "UPDATE studies SET description = CAST(x'c3ff' AS TEXT) WHERE study_uid = ? "
                "AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.study_fk = studies.id "
                "AND i.routed_at IS NOT NULL)", (first_uid,)).rowcount
    finally:
        conn.close()
    assert torn == 1, "the first study was routed before its row could be torn"
    storescu(second, pas.port)

    wait_for(lambda: len(storescp.files()) == len(second), 60,
             what="the second study delivered past the first")
    assert {sop_uid(p) for p in storescp.files()} == {sop_uid(p) for p in second}
    wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done"], 30,
             what="the second study's job done (the first has none)")
    said = "routing study 1 (index row) failed; the others go on"
    wait_for(lambda: said in pas.log(), 10, what="the unroutable study in the log")
    assert pas.log().count("Could not decode to UTF-8") == 1  # its traceback, once

    conn = sqlite3.connect(pas.home / "pas.sqlite", timeout=30)
    try:
        with conn:
            conn.execute("UPDATE studies SET description = 'CT chest' WHERE study_uid = ?",
                         (first_uid,))
    finally:
        conn.close()
    wait_for(lambda: len(storescp.files()) == len(first) + len(second), 60,
             what="the first study delivered once readable")
    assert f"{said}: works again after" in pas.log()


def test_a_database_refusing_as_a_whole_ends_the_routing_pass_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The index's write lock held past the busy timeout (as a full disk or an I/O error,
    every study's routing fails the same way): each study was passed over in turn, waiting
    the busy timeout (the daemon's 30 s) and logging its own traceback, so five ready
    studies made a pass of five timeouts and five tracebacks (then five counts every 5 min).
    The pass ends at the first: the routing loop says it once; all are routed after."""
    from appliance.routing.stability import Router

    path = tmp_path / "pas.sqlite"
    db = Database(path, busy_timeout_ms=300)
    _file_studies(db, 5)
    router = Router(Settings.model_validate({"study": {"stable_after_s": 0}}), db,
                    lambda: ["hub"])
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's long write
        with caplog.at_level(logging.INFO, logger="pas.routing"), \
                pytest.raises(sqlite3.OperationalError, match="database is locked"):
            router.route_ready()
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert router.route_ready() == 5
    assert len(job_store.list_jobs(db)) == 5
    db.close()


def test_a_stop_ends_the_routing_pass_between_two_studies(tmp_path: Path) -> None:
    """A stop set while a pass goes through a backlog: the study being routed finishes (its
    jobs in one transaction), the next ones wait for the next start. The pass went on to
    the end of the backlog, and the stop waited for it."""
    import threading

    from appliance.routing.stability import Router

    db = Database(tmp_path / "pas.sqlite")
    _file_studies(db, 5)
    router = Router(Settings.model_validate({"study": {"stable_after_s": 0}}), db,
                    lambda: ["hub"])
    stopping = threading.Event()
    router.on_stable.append(lambda study_fk: stopping.set())  # the stop comes during study 1
    assert router.route_ready(stopping) == 1
    assert len(job_store.list_jobs(db)) == 1
    stopping.clear()
    assert router.route_ready(stopping) == 1  # the next start's pass goes on, one by one
    router.on_stable.clear()
    stopping.clear()
    assert router.route_ready(stopping) == 3
    assert len(job_store.list_jobs(db)) == 5
    db.close()


def _file_studies(db: Database, count: int) -> None:
    """``count`` one-instance CT studies of patient P, filed in ``db``."""
    from appliance.store import index
    from appliance.store.index import InstanceRecord, StoredFile

    for n in range(count):
        record = InstanceRecord(f"1.2.9.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", f"1.2.9.{n}.1", f"1.2.9.{n}.2",
                                patient_id="P")
        index.record_instance(db, record, StoredFile(f"x{n}", 1, f"{n}" * 64))
