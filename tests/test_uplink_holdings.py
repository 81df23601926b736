"""What the region already holds is not sent again after the index was rebuilt or restored
(docs/protocol.md "Holdings", docs/operations.md "A damaged index database").

Found by reading the code (2026-12-05): after ``pas cache rebuild-index`` start-up recovery
adopts every spool file, their studies are routed again, and the region's confirmations went
with the old index: the hub destination created a new transfer for each study and uploaded
every bucket again (a 1.5 TB cache on a 20 Mbit/s line: a week of saturated uplink). Now the
appliance asks the hub about the instances it adopted, confirms those the hub's signed
statement names, and uploads only the rest.

Real peers only: ``pas hub run`` (embedded archive), the appliance daemon enrolled with it,
mutual TLS, DCMTK storescu as the modality; the hub's own database counts what arrived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydicom import dcmread
from pydicom.uid import generate_uid

from appliance.store.spool import Spool
from appliance.transfer.client import verify_receipt
from appliance.transfer.enrolment import Enrolment, load_enrolment
from tests.support.archived import orthanc_hashes
from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import CT_DIR, MR_DIR, Orthanc, PasProcess, storescu, wait_for
from tests.support.peers import read_rows as rows
from tests.test_uplink_hub import enrolled_pas, jobs, wait_jobs_finished

STUDY_FILES = sorted(CT_DIR.glob("A046441_*_19001111-*.dcm"))  # one study, 3 instances
STUDY_UID = str(dcmread(STUDY_FILES[0], stop_before_pixels=True).StudyInstanceUID)
REQUEST_LIMIT = 8000  # limits.max_manifest_bytes, which bounds a holdings question too
FAST = {"PAS_STUDY__STABLE_AFTER_S": "1"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("hub-holdings") / "home",
                         {"PAS_HUB_LIMITS__MAX_MANIFEST_BYTES": str(REQUEST_LIMIT)}).init()
    process.start()
    yield process
    process.kill()


def hub_counts(hub: HubProcess) -> dict[str, int]:
    """What the hub received so far: transfers, buckets stored, bucket PUTs. A committed
    transfer's bucket rows went with its commit (hub schema 13): it stored all of its."""
    [row] = rows(hub.home / "hub.sqlite",
                 "SELECT (SELECT count(*) FROM transfers) AS transfers, "
                 "(SELECT count(*) FROM buckets) + (SELECT coalesce(sum(bucket_count), 0) "
                 "FROM transfers WHERE receipt IS NOT NULL) AS buckets, "
                 "(SELECT coalesce(sum(puts), 0) FROM transfers) AS puts")
    return dict(row)


def confirmed(pas: PasProcess) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of every current instance the region confirmed."""
    return {r["sop_instance_uid"]: r["sha256"] for r in rows(
        pas.home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances "
        "WHERE is_current = 1 AND confirmed_at IS NOT NULL")}


def sent_and_confirmed(pas_factory: Any, hub: HubProcess, home: Path,
                       env: dict[str, str] | None = None) -> tuple[PasProcess, dict[str, str]]:
    """The study sent through the hub and confirmed; PAS stopped. (PAS, UID -> SHA-256)."""
    pas = enrolled_pas(pas_factory, hub, home, {**FAST, **(env or {})})
    storescu(STUDY_FILES, pas.port)
    wait_jobs_finished(pas, len(STUDY_FILES))
    held = confirmed(pas)
    assert len(held) == len(STUDY_FILES)
    pas.stop()
    return pas, held


def spooled_extra_instance(pas: PasProcess, tmp_path: Path) -> tuple[str, str]:
    """A fourth instance of the study, which the region never received, put in the spool
    of a stopped PAS (an instance whose index commit was lost with the damaged index).
    (SOP Instance UID, SHA-256)."""
    extra = dcmread(STUDY_FILES[0])
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    extra.InstanceNumber = 999
    extra.save_as(tmp_path / "extra.dcm", enforce_file_format=True)
    stored, _ = Spool(pas.home / "spool").write([(tmp_path / "extra.dcm").read_bytes()])
    return str(extra.SOPInstanceUID), stored.sha256


def rebuilt_and_restarted(pas: PasProcess, instances: int) -> list[Any]:
    """``pas cache rebuild-index`` and a start: every spool file adopted, its study routed
    again; the jobs once they are done."""
    pas.cli("cache", "rebuild-index", "--force")
    pas.start()
    finished = wait_jobs_finished(pas, instances, 60)
    assert {j["state"] for j in finished} == {"done"}, [j["last_error"] for j in finished]
    return finished


def test_a_rebuilt_index_sends_nothing_the_region_holds(pas_factory: Any, hub: HubProcess,
                                                        tmp_path: Path) -> None:
    pas, held = sent_and_confirmed(pas_factory, hub, tmp_path / "site-rebuilt")
    before = hub_counts(hub)

    [job] = rebuilt_and_restarted(pas, len(STUDY_FILES))

    # Every instance confirmed again, each with the SHA-256 of its bytes, on the hub's
    # signed statement; the hub received no transfer, no bucket, no PUT.
    assert confirmed(pas) == held
    assert hub_counts(hub) == before
    progress = json.loads(job["progress"])
    assert progress["holdings"] == {"state": "answered", "asked": 3, "held": 3}
    assert "transfer_id" not in progress
    said = (f"the region already holds 3 of 3 instances of study {STUDY_UID}: "
            "confirmed from its signed statement, sending 0")
    assert said in pas.log()
    audited = rows(pas.home / "pas.sqlite", "SELECT actor, target, detail FROM audit "
                   "WHERE event = 'recovery' AND detail = ?", (said,))
    assert [(r["actor"], r["target"]) for r in audited] == [("system", STUDY_UID)]


def test_only_the_instance_the_region_lacks_is_uploaded(pas_factory: Any, hub: HubProcess,
                                                       tmp_path: Path) -> None:
    pas, held = sent_and_confirmed(pas_factory, hub, tmp_path / "site-partial")
    extra_uid, extra_sha = spooled_extra_instance(pas, tmp_path)
    before = hub_counts(hub)

    [job] = rebuilt_and_restarted(pas, len(STUDY_FILES) + 1)

    assert confirmed(pas) == {**held, extra_uid: extra_sha}
    after = hub_counts(hub)
    progress = json.loads(job["progress"])
    assert progress["holdings"] == {"state": "answered", "asked": 4, "held": 3}
    # One new transfer, carrying that instance alone.
    [transfer] = rows(hub.home / "hub.sqlite", "SELECT * FROM transfers WHERE id = ?",
                      (progress["transfer_id"],))
    receipt = json.loads(transfer["receipt"])  # its manifest's text went with the commit
    assert [(i["sop_instance_uid"], i["sha256"]) for i in receipt["instances"]] == [
        (extra_uid, extra_sha)]
    assert after["transfers"] == before["transfers"] + 1
    assert after["buckets"] - before["buckets"] == transfer["bucket_count"] == 1
    assert (f"the region already holds 3 of 4 instances of study {STUDY_UID}: "
            "confirmed from its signed statement, sending 1") in pas.log()


def test_a_kill_9_after_the_statement_settled_resumes_with_the_rest(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """SIGKILL right after the transaction that confirmed what the region holds (the job's
    progress says so): the next start does not ask again and uploads the missing instance
    alone, once."""
    pas, held = sent_and_confirmed(pas_factory, hub, tmp_path / "site-killed")
    extra_uid, extra_sha = spooled_extra_instance(pas, tmp_path)
    before = hub_counts(hub)
    pas.cli("cache", "rebuild-index", "--force")
    killed = subprocess.run(
        [sys.executable, "-m", "tests.faults.crash_at", "appliance.store.jobs", "confirm_held",
         "after", "run"], cwd=REPO, env=pas.env, capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert confirmed(pas) == held  # committed before the kill
    [job] = jobs(pas)
    assert json.loads(job["progress"])["holdings"] == {"state": "answered", "asked": 4,
                                                       "held": 3}
    assert hub_counts(hub) == before

    pas.start()
    [job] = wait_jobs_finished(pas, len(STUDY_FILES) + 1, 60)
    assert job["state"] == "done", job["last_error"]
    assert confirmed(pas) == {**held, extra_uid: extra_sha}
    after = hub_counts(hub)
    assert (after["transfers"], after["buckets"]) == (before["transfers"] + 1,
                                                     before["buckets"] + 1)
    assert hub.log().count(f"site SITE-KILLED: study {STUDY_UID}: the region holds") == 1


def test_a_statement_whose_signature_does_not_verify_confirms_nothing(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """The hub signs with a key that is not its TLS certificate's (its key file replaced on
    disk while it runs): the appliance refuses the statement, confirms nothing, uploads
    nothing; once the hub signs right again, the retry confirms from its statement."""
    pas, held = sent_and_confirmed(pas_factory, hub, tmp_path / "site-forged")
    before = hub_counts(hub)
    key_file = hub.home / "server.key"
    saved = key_file.read_bytes()
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    try:
        key_file.write_bytes(other)
        pas.cli("cache", "rebuild-index", "--force")
        pas.start()
        refused = wait_for(lambda: next((j for j in jobs(pas) if j["last_error"]), None), 30,
                           what=f"the study's first try (log {pas.log_path})")
        assert (f"the hub's holdings statement for study {STUDY_UID} does not "
                "verify") in refused["last_error"]
        assert "nothing confirmed from it" in refused["last_error"]
        assert confirmed(pas) == {}
        assert hub_counts(hub) == before
        assert "holdings" not in json.loads(refused["progress"] or "{}")
    finally:
        key_file.write_bytes(saved)
    wait_jobs_finished(pas, len(STUDY_FILES), 30)
    assert confirmed(pas) == held
    assert hub_counts(hub) == before


@pytest.fixture
def older_hub(tmp_path: Path) -> Iterator[HubProcess]:
    """A hub without the holdings call, as every hub before it: the same hub with that one
    route provider taken out when it starts (a ``sitecustomize`` on its PYTHONPATH)."""
    patch = tmp_path / "older-hub"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(textwrap.dedent("""\
        import appliance.hub.app as app

        _providers = app.default_route_providers
        app.default_route_providers = lambda: [
            p for p in _providers() if p.__name__ != "holdings_routes"]
        """))
    path = os.pathsep.join(p for p in (str(patch), os.environ.get("PYTHONPATH")) if p)
    process = HubProcess(tmp_path / "hub-older", {"PYTHONPATH": path}).init()
    process.start()
    yield process
    process.kill()


def test_an_older_hub_without_the_call_gets_the_study_sent(
        pas_factory: Any, older_hub: HubProcess, tmp_path: Path) -> None:
    pas, held = sent_and_confirmed(pas_factory, older_hub, tmp_path / "site-older")
    before = hub_counts(older_hub)

    [job] = rebuilt_and_restarted(pas, len(STUDY_FILES))

    assert confirmed(pas) == held
    progress = json.loads(job["progress"])
    assert progress["holdings"] == {"state": "the hub has no holdings call", "asked": 3,
                                    "held": 0}
    # Sent again whole, as before the call existed: one new transfer of the 3 instances.
    after = hub_counts(older_hub)
    assert after["transfers"] == before["transfers"] + 1
    [transfer] = rows(older_hub.home / "hub.sqlite", "SELECT instance_count FROM transfers "
                      "WHERE id = ?", (progress["transfer_id"],))
    assert transfer["instance_count"] == 3


# --- the hub's side of the call ------------------------------------------------------------


def committed_shipment(hub: HubProcess, site: Enrolment, study_uid: str) -> dict[str, str]:
    """Two MR images sent by ``site`` as one transfer and committed: UID -> SHA-256."""
    files = sorted(MR_DIR.glob("*.dcm"))[:2]
    shipment = ship(pack_items(files), site.hub_transfer_key, study_uid=study_uid)
    with client(site) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        shipment.put_all(http)
        assert http.post(shipment.url + "/commit").status_code == 200
    return shipment.originals


def ask(http: Any, study_uid: str, pairs: dict[str, str], **extra: Any) -> Any:
    return http.post("/api/v1/holdings", json={
        "study_uid": study_uid, "nonce": "n" * 22,
        "instances": [{"sop_instance_uid": u, "sha256": s} for u, s in pairs.items()],
        **extra})


def test_the_hub_states_what_this_site_holds_signed_and_refuses_bad_questions(
        hub: HubProcess, tmp_path: Path) -> None:
    site_a = enroll(hub, tmp_path / "site-a", "CHU-A")
    site_b = enroll(hub, tmp_path / "site-b", "CHU-B")
    study = generate_uid()
    originals = committed_shipment(hub, site_a, study)
    never_sent = {generate_uid(): "0" * 64}
    other_bytes = {next(iter(originals)): "f" * 64}

    with client(site_a) as http:
        answer = ask(http, study, {**originals, **never_sent})
        assert answer.status_code == 200, answer.text
        statement = answer.json()
        certificate = http.get("/api/v1/whoami").extensions["network_stream"] \
            .get_extra_info("ssl_object").getpeercert(True)
        verify_receipt(statement, certificate)  # signed as a receipt is
        assert (statement["statement"], statement["site"], statement["study_uid"],
                statement["nonce"], statement["asked"]) == (
            "holdings", "CHU-A", study, "n" * 22, 3)
        assert {(i["sop_instance_uid"], i["sha256"]) for i in statement["instances"]} == \
            set(originals.items())
        # The same UID with other bytes is not held.
        assert ask(http, study, other_bytes).json()["instances"] == []

        # Bad questions: the clear 4xx, naming the problem; the hub goes on serving.
        bad = [(b"not json", 400, "bad_json", "the body is not JSON"),
               (json.dumps({"study_uid": study, "instances": []}).encode(), 422,
                "bad_request", "nonce: Field required"),
               (json.dumps({"study_uid": study, "nonce": "n" * 22, "instances": [
                   {"sop_instance_uid": "1.2", "sha256": "XYZ"}]}).encode(), 422,
                "bad_request", "instances.0.sha256: must be 64 lowercase hex digits"),
               (json.dumps({"study_uid": study, "nonce": "n" * 22, "instances": [
                   {"sop_instance_uid": 12, "sha256": "0" * 64}]}).encode(), 422,
                "bad_request", "instances.0.sop_instance_uid: Input should be a valid string"),
               (json.dumps({"study_uid": study, "nonce": "n" * 22, "instances": [
                   {"sop_instance_uid": "1.2", "sha256": "0" * 64}] * 2}).encode(), 422,
                "bad_request", "instances: SOP Instance UID 1.2 appears twice"),
               (b" " * (REQUEST_LIMIT + 1), 413, "too_large",
                f"holdings request over {REQUEST_LIMIT} bytes")]
        for body, status, error, detail in bad:
            answer = http.post("/api/v1/holdings", content=body,
                               headers={"Content-Type": "application/json"})
            assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
            assert detail in answer.json()["detail"], answer.text
        assert http.get("/api/v1/whoami").json() == {"site": "CHU-A"}

    # Another site asking about site A's study and bytes: its own committed transfers only.
    with client(site_b) as http:
        answer = ask(http, study, originals)
        assert answer.status_code == 200 and answer.json()["instances"] == []
        assert answer.json()["site"] == "CHU-B"
    # Without a client certificate: refused as every /api/v1 call.
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context()) as anonymous:
        assert ask(anonymous, study, originals).status_code in (401, 403)


@pytest.fixture
def own_hub(tmp_path: Path) -> Iterator[HubProcess]:
    """A hub of the test's own, for a correction of STUDY_FILES: on the module's hub other
    sites archived these UIDs with the first bytes, and the hub refuses another version of
    a UID another site archived (docs/protocol.md, tests/test_hub_another_site.py)."""
    process = HubProcess(tmp_path / "hub-own").init()
    process.start()
    yield process
    process.kill()


def sent_corrected_and_confirmed(pas_factory: Any, hub: HubProcess, home: Path
                                 ) -> tuple[PasProcess, set[tuple[str, str]]]:
    """The study sent, then a correction of its first instance (same SOP Instance UID, other
    bytes), both versions receipted; PAS stopped. (PAS, every (UID, SHA-256) confirmed)."""
    pas, _held = sent_and_confirmed(pas_factory, hub, home)
    corrected = dcmread(STUDY_FILES[0])
    corrected.ImageComments = "corrected"
    corrected.save_as(home.parent / f"{home.name}-corrected.dcm", enforce_file_format=True)
    pas.start()
    storescu([home.parent / f"{home.name}-corrected.dcm"], pas.port)
    wait_jobs_finished(pas, len(STUDY_FILES) + 1)
    versions = {(r["sop_instance_uid"], r["sha256"]) for r in rows(
        pas.home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances "
        "WHERE confirmed_at IS NOT NULL")}
    assert len(versions) == len(STUDY_FILES) + 1  # both versions receipted
    pas.stop()
    return pas, versions


def region_versions(hub: HubProcess, uid: str) -> list[tuple[str, int]]:
    """The embedded archive's versions of ``uid``: (SHA-256, is_current), oldest first."""
    return [(r["sha256"], r["is_current"]) for r in rows(
        hub.home / "archive" / "pas.sqlite", "SELECT sha256, is_current FROM instances "
        "WHERE sop_instance_uid = ? ORDER BY version", (uid,))]


def test_the_older_version_of_a_corrected_instance_is_confirmed_again(
        pas_factory: Any, own_hub: HubProcess, tmp_path: Path) -> None:
    """A study whose instance was corrected (same SOP Instance UID, other bytes), both versions
    receipted by the region. After the rebuild the older version is adopted beside the
    correction, not current, never sent: it was left unconfirmed for ever, and eviction
    (every version confirmed) never took the study again. Found in review (2026-12-05)."""
    pas, versions = sent_corrected_and_confirmed(pas_factory, own_hub,
                                                 tmp_path / "site-corrected")
    before = hub_counts(own_hub)

    rebuilt_and_restarted(pas, len(STUDY_FILES) + 1)

    after = rows(pas.home / "pas.sqlite", "SELECT sop_instance_uid, sha256, is_current, "
                 "confirmed_at FROM instances")
    assert {(r["sop_instance_uid"], r["sha256"]) for r in after
            if r["confirmed_at"] is not None} == versions, \
        [dict(r) for r in after if r["confirmed_at"] is None]
    assert sum(1 for r in after if not r["is_current"]) == 1
    assert hub_counts(own_hub) == before  # nothing uploaded again
    assert (f"the region already holds 3 of 3 instances of study {STUDY_UID} and 1 older "
            "version: confirmed from its signed statement, sending 0") in pas.log()


def test_an_overwriting_archive_is_stated_to_hold_only_the_version_it_took_last(
        tmp_path: Path) -> None:
    """Orthanc set to overwrite (``OverwriteInstances: true``, as docs/protocol.md tells
    regional ops) behind the ``dicomweb`` archive kind keeps only the version of a UID it took
    last. A site sends a study's instance, its correction, then the first version again (a
    restored index's job that was waiting at the backup). The statement named every version
    ever receipted, the one Orthanc no longer holds included: the site would have confirmed
    the correction on it, and evicted the only copy left. Found in review (2026-12-05)."""
    first = sorted(MR_DIR.glob("*.dcm"))[0]
    dataset = dcmread(first)
    dataset.ImageComments = "corrected"
    dataset.save_as(tmp_path / "corrected.dcm", enforce_file_format=True)
    uid, study = str(dataset.SOPInstanceUID), str(dataset.StudyInstanceUID)
    orthanc = Orthanc(tmp_path / "orthanc", extra_config={"OverwriteInstances": True})
    regional = HubProcess(tmp_path / "hub-dicomweb", {"PAS_HUB_ARCHIVE__KIND": "dicomweb"})
    try:
        orthanc.start()
        regional.env["PAS_HUB_ARCHIVE__URL"] = orthanc.dicomweb
        regional.init().start()
        site = enroll(regional, tmp_path / "site", "CHU-W")
        with client(site) as http:
            shas = []
            for path in (first, tmp_path / "corrected.dcm", first):
                shipment = ship(pack_items([path]), site.hub_transfer_key, study_uid=study)
                assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
                shipment.put_all(http)
                assert http.post(shipment.url + "/commit").status_code == 200
                shas.append(shipment.originals[uid])
                # Asked one version at a time: what the region holds of each.
                stated = {sha: ask(http, study, {uid: sha}).json()["instances"] != []
                          for sha in set(shas)}
                assert stated == {sha: sha == shas[-1] for sha in set(shas)}, len(shas)
                # Behind a PACS whose bytes the hub cannot know: nothing about the region's
                # holdings from elsewhere (docs/protocol.md).
                assert "region_instances" not in ask(http, study, {uid: shas[0]}).json()
                assert orthanc_hashes(orthanc)[uid] == shas[-1]
    finally:
        regional.kill()
        orthanc.stop()


def test_a_correction_the_region_holds_as_an_older_version_is_sent_again(
        pas_factory: Any, own_hub: HubProcess, tmp_path: Path) -> None:
    """The region took the first version again after the correction (a restored index's job,
    waiting at the backup, sent it after the restore): the embedded archive holds both, the
    first one current. The statement named the correction held, the site confirmed it and
    sent nothing: the region kept serving the version the sender had corrected. Now a pair
    that is not the last version the region took is confirmed (its bytes are there) and sent
    again, so the region ends with the sender's last word. Found in review (2026-12-05)."""
    pas, versions = sent_corrected_and_confirmed(pas_factory, own_hub, tmp_path / "site-stale")
    uid = str(dcmread(STUDY_FILES[0], stop_before_pixels=True).SOPInstanceUID)
    [older] = rows(pas.home / "pas.sqlite", "SELECT path FROM instances "
                   "WHERE sop_instance_uid = ? AND is_current = 0", (uid,))
    site = load_enrolment(pas.home)
    assert site is not None
    first = ship(pack_items([Spool(pas.home / "spool").path(older["path"])]),
                 site.hub_transfer_key, study_uid=STUDY_UID)
    with client(site) as http:  # the first version again, as that site
        assert http.post("/api/v1/transfers", json=first.manifest).status_code == 201
        first.put_all(http)
        assert http.post(first.url + "/commit").status_code == 200
    old_sha = first.originals[uid]
    [new_sha] = [sha for u, sha in versions if u == uid and sha != old_sha]
    assert region_versions(own_hub, uid) == [(old_sha, 1), (new_sha, 0)]
    before = hub_counts(own_hub)

    [job] = rebuilt_and_restarted(pas, len(STUDY_FILES) + 1)

    assert region_versions(own_hub, uid) == [(old_sha, 0), (new_sha, 1)]
    progress = json.loads(job["progress"])
    assert progress["holdings"] == {"state": "answered", "asked": 3, "held": 2,
                                    "older_asked": 1, "older_held": 1, "not_last": 1}
    [transfer] = rows(own_hub.home / "hub.sqlite",
                      "SELECT receipt FROM transfers WHERE id = ?", (progress["transfer_id"],))
    assert [(i["sop_instance_uid"], i["sha256"])
            for i in json.loads(transfer["receipt"])["instances"]] == [(uid, new_sha)]
    assert hub_counts(own_hub)["transfers"] == before["transfers"] + 1
    assert {(r["sop_instance_uid"], r["sha256"]) for r in rows(
        pas.home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances "
        "WHERE confirmed_at IS NOT NULL")} == versions
