"""A prior fetched from the region is not uploaded as this site's study after the index was
rebuilt (docs/protocol.md "Holdings", docs/operations.md "A damaged index database").

Found by reading the code (2026-12-05): instances fetched from the region (prefetch,
fetch-through) are filed ``regional``: confirmed at once, never routed. After ``pas cache
rebuild-index`` start-up recovery adopted their spool files as if a modality had sent them;
their studies were routed, the holdings question found no receipt of THIS site for them, and
the hub destination uploaded another hospital's study to the region as this site's own (the
WAN cost of a rebuild: every prior in the cache; the region's receipts: this site sent it).
Now the hub's statement also lists the asked pairs its embedded archive holds that this site
never sent (naming no site, no transfer), and the appliance files those instances as regional
again, confirmed, without sending them.

Real peers only: ``pas hub run`` (embedded archive), another site's transfer committed through
the real API, the appliance daemon enrolled with the hub fetching the prior by its prefetch,
DCMTK storescu as the modality for the site's own study.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from appliance.store.db import Database
from appliance.store.jobs import list_jobs
from appliance.transfer.enrolment import load_enrolment
from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import CT_DIR, PasProcess, StoreSCP, storescu, wait_for
from tests.support.peers import read_rows as rows
from tests.support.tcpproxy import TcpProxy
from tests.test_uplink_holdings import (
    FAST,
    STUDY_FILES,
    STUDY_UID,
    ask,
    confirmed,
    hub_counts,
    rebuilt_and_restarted,
)
from tests.test_uplink_hub import enrolled_pas, wait_jobs_finished

PRIOR_FILES = sorted(CT_DIR.glob("A002304_*_19001231-*.dcm"))  # another patient, 3 instances
PRIOR_UID = str(dcmread(PRIOR_FILES[0], stop_before_pixels=True).StudyInstanceUID)
PRIOR_PATIENT = "A002304"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("hub-priors") / "home").init()
    process.start()
    yield process
    process.kill()


def sent_by_another_site(hub: HubProcess, home: Path, site: str = "CHU-OTHER",
                         files: list[Path] = PRIOR_FILES) -> dict[str, str]:
    """A study (the prior) sent to the region by another hospital, committed:
    UID -> SHA-256."""
    other = enroll(hub, home, site)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    shipment = ship(pack_items(files), other.hub_transfer_key, study_uid=study_uid)
    with client(other) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        shipment.put_all(http)
        assert http.post(shipment.url + "/commit").status_code == 200
    return shipment.originals


def studies(pas: PasProcess) -> dict[str, str]:
    """Study Instance UID -> origin, as the index files each study."""
    return {r["study_uid"]: r["origin"] for r in rows(
        pas.home / "pas.sqlite", "SELECT study_uid, origin FROM studies")}


def site_with_prior(pas_factory: Any, hub: HubProcess, home: Path, patient: str,
                    prior: dict[str, str], own: dict[str, str]) -> PasProcess:
    """A site whose cache holds the prior, fetched by its prefetch, beside ``own`` (what it
    confirmed so far)."""
    pas = enrolled_pas(pas_factory, hub, home, {**FAST, "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2"})
    pas.cli("prefetch", "patient", patient)
    wait_for(lambda: confirmed(pas) == {**own, **prior}, 30,
             what=f"the prior fetched from the region (log {pas.log_path})")
    return pas


def received_uids(scp: StoreSCP) -> list[str]:
    """The SOP Instance UIDs of what the local PACS received, one per file written."""
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files())


def test_a_prior_fetched_from_the_region_is_filed_regional_not_uploaded_after_a_rebuild(
        pas_factory: Any, hub: HubProcess, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Also routed to the hospital's own PACS (DCMTK storescp): the site's own study goes
    there again after the rebuild, as before; the prior does not (it never went there)."""
    prior = sent_by_another_site(hub, tmp_path / "other")
    local_pacs = StoreSCP(tmp_path / "local-pacs", ae_title="LOCALPACS").start()
    request.addfinalizer(local_pacs.stop)
    link = TcpProxy("127.0.0.1", hub.port).start()
    request.addfinalizer(link.stop)
    pas = enrolled_pas(pas_factory, hub, tmp_path / "site-priors", via=link, env={
        **FAST, "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2",
        "PAS_DESTINATIONS__PACS__KIND": "dicom", "PAS_DESTINATIONS__PACS__AE_TITLE": "LOCALPACS",
        "PAS_DESTINATIONS__PACS__HOST": "127.0.0.1",
        "PAS_DESTINATIONS__PACS__PORT": str(local_pacs.port),
        "PAS_ROUTING__FALLBACK__DESTINATIONS": '["hub", "pacs"]'})
    storescu(STUDY_FILES, pas.port)  # this site's own study, uploaded and confirmed
    wait_jobs_finished(pas, len(STUDY_FILES))
    own = confirmed(pas)
    assert len(own) == len(STUDY_FILES)
    pas.cli("prefetch", "patient", PRIOR_PATIENT)
    wait_for(lambda: confirmed(pas) == {**own, **prior}, 30,
             what=f"the prior fetched from the region (log {pas.log_path})")
    assert studies(pas) == {STUDY_UID: "local", PRIOR_UID: "regional"}
    own_uids = sorted(own)
    assert received_uids(local_pacs) == own_uids
    pas.stop()
    before = hub_counts(hub)

    # Rebuilt and restarted with the WAN down: the hub cannot answer yet, and the prior's
    # job to the local PACS waits for its answer instead of forwarding it as a new study.
    link.cut()
    pas.cli("cache", "rebuild-index", "--force")
    pas.start()

    def local_prior_job() -> dict[str, Any] | None:
        return next((j for j in list_jobs(Database(pas.home / "pas.sqlite"))
                     if j["study_uid"] == PRIOR_UID and j["destination"] == "pacs"
                     and (j["state"] == "done" or j["waits_for_job"])), None)

    waiting = wait_for(local_prior_job, 30, what=f"the prior's local job (log {pas.log_path})")
    assert waiting["state"] == "pending" and waiting["sent"] == 0, waiting
    assert received_uids(local_pacs) == own_uids
    link.restore()
    finished = wait_jobs_finished(pas, len(STUDY_FILES) + len(PRIOR_FILES), 60)

    # Nothing went to the hub: no transfer, no bucket, no PUT; both studies confirmed, each
    # instance under the SHA-256 of its bytes; the prior filed regional again.
    assert hub_counts(hub) == before
    assert confirmed(pas) == {**own, **prior}
    assert studies(pas) == {STUDY_UID: "local", PRIOR_UID: "regional"}
    assert {j["state"] for j in finished} == {"done"}
    progress = {r["study_uid"]: json.loads(r["progress"]) for r in rows(
        pas.home / "pas.sqlite", "SELECT s.study_uid, j.progress FROM jobs j "
        "JOIN studies s ON s.id = j.study_fk WHERE j.kind = 'hub'")}
    # The local PACS: the site's own study again (the same instances), not the prior; its
    # job for the prior waited for the hub's answer and says why it sent nothing.
    assert received_uids(local_pacs) == sorted(own_uids * 2)
    [local_job] = rows(pas.home / "pas.sqlite", "SELECT j.state, j.last_error, "
                       "(SELECT count(*) FROM job_instances ji WHERE ji.job_id = j.id) AS n "
                       "FROM jobs j JOIN studies s ON s.id = j.study_fk "
                       "WHERE j.kind = 'dicom' AND s.study_uid = ?", (PRIOR_UID,))
    assert (local_job["state"], local_job["n"]) == ("done", 0)
    assert local_job["last_error"].startswith("not forwarded: the region's instances")
    assert progress[PRIOR_UID]["holdings"] == {"state": "answered", "asked": 3, "held": 3,
                                               "region_held": 3}
    assert progress[STUDY_UID]["holdings"] == {"state": "answered", "asked": 3, "held": 3}
    assert not any("transfer_id" in p for p in progress.values())
    said = f"study {PRIOR_UID}: 3 instances are the region's (a prior): filed as regional, not sent"
    assert said in pas.log()
    audited = rows(pas.home / "pas.sqlite", "SELECT actor, target FROM audit "
                   "WHERE event = 'recovery' AND detail = ?", (said,))
    assert [(r["actor"], r["target"]) for r in audited] == [("system", PRIOR_UID)]

    # The hub's statement: the prior's pairs as the region's, naming no site nor transfer;
    # this site's own receipts (``instances``) say nothing of them. To the site that sent
    # it, the same pairs are its own receipts, and nothing is the region's from elsewhere.
    site = load_enrolment(pas.home)
    assert site is not None
    with client(site) as http:
        answer = ask(http, PRIOR_UID, prior)
    assert answer.status_code == 200, answer.text
    statement = answer.json()
    assert statement["instances"] == []
    assert sorted((i["sop_instance_uid"], i["sha256"]) for i in statement["region_instances"]
                  ) == sorted(prior.items())
    assert all(set(i) == {"sop_instance_uid", "sha256"} for i in statement["region_instances"])
    assert "CHU-OTHER" not in answer.text
    other = load_enrolment(tmp_path / "other")
    assert other is not None
    with client(other) as http:
        theirs = ask(http, PRIOR_UID, prior).json()
    assert len(theirs["instances"]) == len(prior) and theirs["region_instances"] == []


def test_a_prior_holding_an_instance_of_this_site_stays_its_study_and_sends_nothing(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """A prior to which this site added an instance of its own (a presentation state, a key
    image note made here on the prior: same Study Instance UID), uploaded and receipted:
    after the rebuild the prior's instances are confirmed as the region's and not sent, the
    site's own one as its own receipt says, and the study stays this site's."""
    files = sorted(CT_DIR.glob("A027284_*_19000925-*.dcm"))
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    prior = sent_by_another_site(hub, tmp_path / "other-mixed", "CHU-MIXED", files)
    pas = site_with_prior(pas_factory, hub, tmp_path / "site-mixed", "A027284", prior, {})
    added = dcmread(files[0])
    added.SOPInstanceUID = added.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    added.InstanceNumber = 999
    added.save_as(tmp_path / "added.dcm", enforce_file_format=True)
    storescu([tmp_path / "added.dcm"], pas.port)
    wait_jobs_finished(pas, len(files) + 1)
    held = confirmed(pas)
    assert len(held) == len(files) + 1
    pas.stop()
    before = hub_counts(hub)

    [job] = rebuilt_and_restarted(pas, len(files) + 1)

    assert hub_counts(hub) == before
    assert confirmed(pas) == held
    assert studies(pas) == {study_uid: "local"}
    assert json.loads(job["progress"])["holdings"] == {
        "state": "answered", "asked": 4, "held": 4, "region_held": 3}
    said = (f"study {study_uid}: 3 instances are the region's, sent by another site: "
            "confirmed, not sent; the study stays this site's (it holds instances of its own)")
    assert said in pas.log()
    assert rows(pas.home / "pas.sqlite", "SELECT count(*) AS n FROM audit "
                "WHERE event = 'recovery' AND detail = ?", (said,))[0]["n"] == 1
