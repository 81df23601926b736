"""A corrected version of an instance (same SOP Instance UID, other bytes) following its first
version to the hub, real peers only: the region must end up holding the sender's last word,
whatever the order in which the two jobs could run (a slow link, a hub that was down)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.archived import orthanc_hashes
from tests.support.hub import HubProcess
from tests.support.peers import MR_DIR, Orthanc, PasProcess, storescu, wait_for
from tests.support.peers import read_rows as rows
from tests.support.tcpproxy import TcpProxy
from tests.test_uplink_hub import enrolled_pas, jobs, wait_jobs_finished

# A link slow enough that the study's last bucket (version X) is still to come when the
# correction's one-bucket delta could be sent and committed: ~366 KB packed at 0.25 Mbit/s.
SLOW = {"PAS_HUB__MAX_MBPS": "0.25", "PAS_HUB__BUCKET_MB": "0.5",
        "PAS_STUDY__STABLE_AFTER_S": "1"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """A real ``pas hub run`` with the embedded archive."""
    process = HubProcess(tmp_path_factory.mktemp("hub-versions") / "home").init()
    process.start()
    yield process
    process.kill()


def study_and_correction(folder: Path, count: int) -> tuple[Path, Path, str]:
    """``count`` MR images saved to ``folder/study`` as a study of new UIDs, and
    ``folder/y.dcm``: the correction of the study's last image in the order a transfer packs
    them (its highest Instance Number), so that version X travels in the study's last
    bucket. (study folder, Y, UID)."""
    study = folder / "study"
    study.mkdir(parents=True)
    # New UIDs for each test's study: the module's hub refuses to archive a UID another
    # site archived with other bytes (6e507e2), and each test is a site of its own.
    study_uid, series_uids = generate_uid(), {}
    for path in sorted(MR_DIR.glob("*.dcm"))[:count]:
        dataset = dcmread(path)
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uids.setdefault(dataset.SeriesInstanceUID,
                                                           generate_uid())
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(study / path.name, enforce_file_format=True)
    files = sorted(study.glob("*.dcm"))
    last = max(files, key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))
    corrected = dcmread(last)
    corrected.ImageComments = "version Y: corrected"
    corrected.save_as(folder / "y.dcm", enforce_file_format=True)
    return study, folder / "y.dcm", str(corrected.SOPInstanceUID)


def region_current(regional: HubProcess, uid: str) -> list[tuple[str, int]]:
    """The embedded archive's versions of ``uid``: (SHA-256, is_current), oldest first."""
    return [(r["sha256"], r["is_current"]) for r in rows(
        regional.home / "archive" / "pas.sqlite",
        "SELECT sha256, is_current FROM instances WHERE sop_instance_uid = ? ORDER BY version",
        (uid,))]


def site_versions(pas: PasProcess, uid: str) -> list[tuple[str, int, bool]]:
    """The site's versions of ``uid``: (SHA-256, is_current, confirmed), oldest first."""
    return [(r["sha256"], r["is_current"], r["confirmed_at"] is not None) for r in rows(
        pas.home / "pas.sqlite", "SELECT sha256, is_current, confirmed_at FROM instances "
        "WHERE sop_instance_uid = ? ORDER BY version", (uid,))]


def upload_then_correct(pas: PasProcess, study: Path, y_file: Path) -> None:
    """The study sent, its upload under way (a bucket delivered), then the correction."""
    storescu(study, pas.port)
    wait_for(lambda: (j := jobs(pas)) and j[0]["state"] == "running" and j[0]["progress"]
             and json.loads(j[0]["progress"]).get("buckets_sent", 0) >= 1, 60,
             what="the study's upload under way")
    storescu(y_file, pas.port)


def sent_behind_a_cut_link(pas_factory: Any, hub: HubProcess, proxy: TcpProxy, home: Path,
                           study: Path) -> tuple[PasProcess, sqlite3.Row]:
    """The link cut, a site enrolled through ``proxy`` sent ``study``: (the site, its job
    once waiting for the link). One retry of each request, not four: the link is down until
    the test restores it, and the default retries only delayed the job saying so (5.6 s)."""
    proxy.cut()
    pas = enrolled_pas(pas_factory, hub, home, {**SLOW, "PAS_HUB__RETRIES": "1"}, via=proxy)
    storescu(study, pas.port)
    job = wait_for(lambda: next((j for j in jobs(pas) if (j["last_error"] or "")
                                 .startswith("waiting for the link")), None), 60,
                   what="X's job waiting for the link")
    return pas, job


def both_confirmed(pas: PasProcess, uid: str, instances: int) -> tuple[str, str]:
    """Both jobs done, both versions confirmed at the site, Y current: (X's, Y's SHA-256)."""
    finished = wait_jobs_finished(pas, instances, 240)
    assert [j["state"] for j in finished] == ["done", "done"], [j["last_error"] for j in finished]
    versions = site_versions(pas, uid)
    x_sha, y_sha = (sha for sha, _, _ in versions)
    assert versions == [(x_sha, 0, True), (y_sha, 1, True)]
    return x_sha, y_sha


def test_a_correction_sent_while_its_study_uploads_on_a_slow_link_is_what_the_region_serves(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """A 40-image MR study is on its way to the hub over a link capped at 0.25 Mbit/s,
    version X of its last image in the last bucket, when the modality sends X's correction
    Y. Y's delta job, one small bucket, was claimed by the second worker at once and
    committed first; X's bucket came after it, and the embedded archive, which keeps the
    version it received last as current, served the stale X, while both versions were
    confirmed at the site (the cache free to evict Y). Now Y's job waits for X's."""
    study, y_file, uid = study_and_correction(tmp_path / "files", 40)
    pas = enrolled_pas(pas_factory, hub, tmp_path / "site-slow", SLOW)
    upload_then_correct(pas, study, y_file)
    x_sha, y_sha = both_confirmed(pas, uid, 41)
    assert region_current(hub, uid) == [(x_sha, 0), (y_sha, 1)]


def test_a_correction_routed_while_the_hub_is_unreachable_is_what_the_region_serves(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """The link to the hub is cut: X's job and then Y's wait for it. When it is back, both
    were due together and went side by side; Y's one bucket was archived first and X's
    transfer, later, made the stale X current in the region. Now Y's job waits for X's."""
    study, y_file, uid = study_and_correction(tmp_path / "files", 40)
    proxy = TcpProxy("127.0.0.1", hub.port).start()
    try:
        pas, _first = sent_behind_a_cut_link(pas_factory, hub, proxy, tmp_path / "site-down",
                                             study)
        storescu(y_file, pas.port)
        wait_for(lambda: len(jobs(pas)) == 2, 60, what="Y's job routed")
        proxy.restore()
        x_sha, y_sha = both_confirmed(pas, uid, 41)
        assert region_current(hub, uid) == [(x_sha, 0), (y_sha, 1)]
    finally:
        proxy.stop()


def test_a_correction_on_a_slow_link_is_what_an_overwriting_dicomweb_archive_serves(
        pas_factory: Any, tmp_path: Path) -> None:
    """As the slow-link case, into Orthanc through the ``dicomweb`` archive kind, Orthanc
    set to overwrite (``OverwriteInstances: true``, which docs/protocol.md tells regional
    ops to set for corrections to be accepted): Orthanc served X (SHA-256 read back from
    it) while both versions were confirmed at the site."""
    study, y_file, uid = study_and_correction(tmp_path / "files", 40)
    orthanc = Orthanc(tmp_path / "orthanc", extra_config={"OverwriteInstances": True})
    regional = HubProcess(tmp_path / "hub-dicomweb", {"PAS_HUB_ARCHIVE__KIND": "dicomweb"})
    try:
        orthanc.start()
        regional.env["PAS_HUB_ARCHIVE__URL"] = orthanc.dicomweb
        regional.init().start()
        pas = enrolled_pas(pas_factory, regional, tmp_path / "site-web", SLOW)
        upload_then_correct(pas, study, y_file)
        _x_sha, y_sha = both_confirmed(pas, uid, 41)
        assert orthanc_hashes(orthanc)[uid] == y_sha
    finally:
        regional.kill()
        orthanc.stop()


def test_a_failed_job_retried_after_its_correction_went_up_leaves_the_replaced_version_out(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """X's job failed for good (here: set so while the link was down) after it had made its
    transfer; Y's job, held back by nothing failed, went up; then IT ran `pas queue retry`
    on X's job. It sent its transfer as made, X included: the hub saw that transfer begin
    after Y's receipt (its own check of a left transfer did not apply) and made the stale X
    current again. Now the retried job leaves X out and its transfer for a new one: the
    region ends with Y, and gets the study's other images."""
    study, y_file, uid = study_and_correction(tmp_path / "files", 4)
    proxy = TcpProxy("127.0.0.1", hub.port).start()
    try:
        pas, first = sent_behind_a_cut_link(pas_factory, hub, proxy, tmp_path / "site-retry",
                                            study)
        assert json.loads(first["progress"])["transfer_id"]  # made before any request

        def failed_for_good() -> bool:  # standing in for its attempts running out
            with sqlite3.connect(pas.home / "pas.sqlite", timeout=10) as conn:
                return conn.execute(
                    "UPDATE jobs SET state = 'failed', last_error = 'failed for good' "
                    "WHERE id = ? AND state = 'pending'", (first["id"],)).rowcount == 1

        wait_for(failed_for_good, 30, what="X's job failed while not running")
        storescu(y_file, pas.port)
        wait_for(lambda: len(jobs(pas)) == 2, 60, what="Y's job routed")
        proxy.restore()
        wait_for(lambda: jobs(pas)[1]["state"] == "done", 120, what="Y's job delivered")
        y_sha = site_versions(pas, uid)[1][0]
        assert region_current(hub, uid) == [(y_sha, 1)]

        pas.cli("queue", "retry", str(first["id"]))
        finished = wait_jobs_finished(pas, 5, 120)
        assert [j["state"] for j in finished] == ["done", "done"], \
            [j["last_error"] for j in finished]
        assert region_current(hub, uid) == [(y_sha, 1)]
        region_uids = {r["sop_instance_uid"] for r in rows(
            hub.home / "archive" / "pas.sqlite", "SELECT sop_instance_uid FROM instances")}
        site_uids = {r["sop_instance_uid"] for r in rows(
            pas.home / "pas.sqlite", "SELECT sop_instance_uid FROM instances")}
        assert site_uids <= region_uids
        assert (f"job {first['id']}: 1 instance replaced since it was routed (a correction: "
                "the same UID, other bytes) left out, and its transfer") in pas.log()
    finally:
        proxy.stop()
