"""Priors wanted together come down together (issue 6, the WAN target): real peers.

A real Orthanc (DICOMweb plugin, its own network namespace) behind a real hub (``pas hub run``,
mutual TLS, archive ``dicomweb``); the site side is an in-process PrefetchService over a
temporary store, enrolled with the hub, so that the batcher can be read. Proven: requests due
at the same time are searched through the hub's batched search and come down in ONE download
stream, every file byte for byte and pinned; in a batch, a study the archive does not hold
gets its own error while the others arrive; a batched stream cut in the middle resumes, and
the retry asks only for what the site does not hold; bad batched requests get a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.config import load_settings
from appliance.ingest.receive import Receiver
from appliance.prefetch.service import PrefetchService
from appliance.store import prefetch as store
from appliance.store.db import Database, now
from appliance.store.spool import Spool
from appliance.transfer.download import DownloadError, DownloadItem, HubDownloads
from tests.support.hub import HubProcess, client, enroll
from tests.support.peers import Orthanc, wait_for
from tests.test_prefetch_bucketed import CuttingProxy, older_study

pytestmark = pytest.mark.root

PATIENTS = ("A048383", "A056642", "A058062")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def dicomweb_region(base: Path, patients: tuple[str, ...] = PATIENTS,
                    env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A real Orthanc holding each patient's older CT study, behind a real hub (``dicomweb``
    archive): ``{"orthanc", "hub", "priors", "base"}``."""
    priors = {patient: older_study(patient) for patient in patients}
    orthanc = Orthanc(base / "orthanc").start()
    hub = HubProcess(base / "hub", {"PAS_HUB_ARCHIVE__KIND": "dicomweb",
                                    "PAS_HUB_ARCHIVE__URL": orthanc.dicomweb, **(env or {})})
    try:
        for _, files in priors.values():
            for path in files:
                httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(),
                           timeout=60).raise_for_status()
        hub.init().start()
        yield {"orthanc": orthanc, "hub": hub, "priors": priors, "base": base}
    finally:
        hub.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with dicomweb_region(tmp_path_factory.mktemp("batched"),
                         env={"PAS_HUB_LIMITS__LANE_JOIN_WAIT_S": "1"}) as made:
        yield made


class Site:
    """An enrolled site home and its PrefetchService (not started)."""

    def __init__(self, hub: HubProcess, home: Path, name: str, hub_url: str | None = None,
                 env: dict[str, str] | None = None):
        enrolment = enroll(hub, home, name)
        if hub_url:  # through a proxy: the enrolment's hub URL points at it
            path = home / "pki" / "hub.json"
            path.write_text(path.read_text().replace(enrolment.url, hub_url))
        self.settings = load_settings(environ={
            "PAS_HOME": str(home), "PAS_PREFETCH__RETRY_AFTER_S": "0.5",
            "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2", **(env or {})})
        self.db = Database(self.settings.db_path)
        self.receiver = Receiver(self.db, Spool(self.settings.spool_dir, fsync=False))
        self.service = PrefetchService(self.settings, self.db, self.receiver)
        # However loaded the machine, the batch waits for every request resolving.
        self.service.fetcher.batcher.gather_max_s = 120

    def order(self, patients: tuple[str, ...]) -> list[int]:
        return [store.schedule(self.db, store.NewRequest(f"manual:{p}", "manual", p)).request_id
                for p in patients]

    def run(self, ids: list[int]) -> list[dict[str, Any]]:
        """Start the service, wait for the requests to end, stop it: their rows."""
        self.service.start()
        try:
            return self.wait_done(ids)
        finally:
            self.service.stop()

    def wait_done(self, ids: list[int]) -> list[dict[str, Any]]:
        def done() -> list[dict[str, Any]] | None:
            rows = [store.get_request(self.db, i) for i in ids]
            return rows if all(r and r["state"] in ("fetched", "failed") for r in rows) \
                else None  # type: ignore[return-value]

        return wait_for(done, 120, interval=0.1, what="the prefetch requests")

    def assert_fetched(self, rows: list[dict[str, Any]], priors: dict[str, Any],
                       patients: tuple[str, ...]) -> None:
        """Each request fetched, each instance of its prior counted once and on site byte
        for byte."""
        for row, patient in zip(rows, patients, strict=True):
            assert row["state"] == "fetched", row["last_error"]
            _, files = priors[patient]
            assert row["instances_fetched"] == len({sha256(p.read_bytes()) for p in files})
            self.assert_on_site(files)

    def assert_on_site(self, files: list[Path]) -> None:
        held = {row["sha256"]: row["path"] for row in self.db.query(
            "SELECT sha256, path FROM instances WHERE is_current = 1")}
        for path in files:
            digest = sha256(path.read_bytes())
            assert digest in held, f"{path.name} is not on site byte for byte"
            assert sha256((self.settings.spool_dir / held[digest]).read_bytes()) == digest


def test_requests_due_together_come_down_in_one_stream(region: dict[str, Any],
                                                       tmp_path: Path) -> None:
    hub: HubProcess = region["hub"]
    # The line's rate known: the stream is striped over the default four lanes.
    site = Site(hub, tmp_path / "pas", "SITE-BATCH", env={"PAS_HUB__LINK_MBPS": "400"})
    # The two-step path (a batched search, then a batched download) is this test's: the
    # hub's priors route (tests/test_prefetch_priors.py) was taken whenever the keep-warm
    # call had learnt the hub's features before the requests resolved (it failed once in CI
    # under load, with no search made).
    site.service.fetcher.priors_route = False
    # Due now, before the scheduler runs: claimed together.
    rows = site.run(site.order(PATIENTS))
    site.assert_fetched(rows, region["priors"], PATIENTS)
    for patient in PATIENTS:
        study_uid, _ = region["priors"][patient]
        pinned = site.db.query_one("SELECT pinned_until FROM studies WHERE study_uid = ?",
                                   (study_uid,))
        assert pinned is not None and pinned["pinned_until"] > now()
    # One search request at least went to the hub's batched search (no per-patient QIDO),
    # and the three studies came down in one stream.
    assert site.service.fetcher.searcher.requests >= 1
    assert site.service.fetcher.batcher.batches == 1
    # The hub logs it when its side of the stream is done, which may be just after the site
    # has read the last byte: awaited, not read once.
    wait_for(lambda: re.search(r"batched download for SITE-BATCH sent: 3 studies in one "
                               r"stream", hub.log()), 10, what="the hub's log of the stream")
    assert "download for SITE-BATCH over 4 lanes, sharing the site's 400.00 Mbit/s" in hub.log()
    for patient in PATIENTS:  # each study's line follows the stream's, in the same end
        study_uid, _ = region["priors"][patient]
        wait_for(lambda uid=study_uid: re.search(
            rf"download of study {re.escape(uid)} for SITE-BATCH sent: 3 instances \(0 held",
            hub.log()), 10, what="the hub's line for each study")


def test_a_batch_delivers_its_studies_and_names_the_one_the_archive_lacks(
        region: dict[str, Any], tmp_path: Path) -> None:
    hub: HubProcess = region["hub"]
    enrolment = enroll(hub, tmp_path / "site", "SITE-MIX")
    downloads = HubDownloads(enrolment.url, enrolment.ssl_context())
    first, _ = region["priors"][PATIENTS[0]]
    second, _ = region["priors"][PATIENTS[1]]
    unknown = "1.2.826.0.1.3680043.2.1125.404"
    got: dict[str, dict[str, str]] = {first: {}, second: {}, unknown: {}}
    lock = threading.Lock()

    def keep(study: str) -> Any:
        def on_instance(uid: str, data: bytes) -> None:
            with lock:
                got[study][sha256(data)] = uid
        return on_instance

    items = [DownloadItem(first, keep(first)), DownloadItem(unknown, keep(unknown)),
             DownloadItem(second, keep(second))]
    try:
        downloads.fetch_many(items, bucket_bytes=128 * 1024)
        found = downloads.search([(PATIENTS[0], ""), ("NOBODY-HERE", "")])
    finally:
        downloads.close()
    for item, study in ((items[0], first), (items[2], second)):
        assert item.done.is_set() and item.error is None, item.error
        patient = PATIENTS[0] if study == first else PATIENTS[1]
        expected = {sha256(p.read_bytes()) for p in region["priors"][patient][1]}
        assert set(got[study]) == expected and item.result.instances == len(expected)
    assert isinstance(items[1].error, DownloadError) and "unknown_study" in str(items[1].error)
    assert got[unknown] == {}
    # The batched search: the patient's studies as QIDO-RS rows, an empty list for nobody.
    assert not isinstance(found[0], Exception) and first in {
        row["0020000D"]["Value"][0] for row in found[0]}
    assert found[1] == []


def test_a_download_over_lanes_arrives_byte_for_byte(region: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """Three studies in small buckets over three lanes: many chunks, each lane's taken in
    turn; every file rebuilt byte for byte, each study told once."""
    hub: HubProcess = region["hub"]
    enrolment = enroll(hub, tmp_path / "site", "SITE-LANES")
    downloads = HubDownloads(enrolment.url, enrolment.ssl_context(), lanes=3,
                             rate_bps=300_000_000)
    got: dict[str, set[str]] = {patient: set() for patient in PATIENTS}
    lock = threading.Lock()

    def keep(patient: str) -> Any:
        def on_instance(uid: str, data: bytes) -> None:
            with lock:
                got[patient].add(sha256(data))
        return on_instance

    items = [DownloadItem(region["priors"][p][0], keep(p)) for p in PATIENTS]
    try:
        downloads.warm()  # three connections open; the hub says it offers lanes
        assert downloads.hub_has_lanes
        downloads.fetch_many(items, bucket_bytes=64 * 1024)
    finally:
        downloads.close()
    for item, patient in zip(items, PATIENTS, strict=True):
        assert item.done.is_set() and item.error is None, item.error
        expected = {sha256(p.read_bytes()) for p in region["priors"][patient][1]}
        assert got[patient] == expected and item.result.instances == len(expected)
        assert item.result.wire_bytes > 0
    assert "download for SITE-LANES over 3 lanes, sharing the site's 300.00 Mbit/s" in hub.log()
    # Logged when the hub's side of the stream is done, after the site has read it: awaited.
    wait_for(lambda: re.search(r"batched download for SITE-LANES sent: 3 studies", hub.log()),
             10, what="the hub's log of the stream")


@pytest.mark.parametrize(("name", "env", "after"), [
    # Past the searches, inside the stream: its first bucket is one 0.5 MB CT file (about
    # 150 kB packed), so the cut falls after the first instance is complete.
    ("SITE-CUT", {}, 300_000),
    # The WAN drops one lane's connection in the middle: the download stops on both sides
    # (no half stream taken for whole).
    ("SITE-LANECUT", {"PAS_HUB__LINK_MBPS": "400", "PAS_PREFETCH__DOWNLOAD_LANES": "2",
                      "PAS_PREFETCH__DOWNLOAD_BUCKET_KB": "256"}, 400_000),
])
def test_a_cut_batch_resumes_with_only_what_the_site_lacks(
        region: dict[str, Any], tmp_path: Path, name: str, env: dict[str, str],
        after: int, caplog: pytest.LogCaptureFixture) -> None:
    hub: HubProcess = region["hub"]
    proxy = CuttingProxy("127.0.0.1", hub.port, after=after).start()
    site = Site(hub, tmp_path / "pas", name, f"https://localhost:{proxy.port}", env=env)
    patients = PATIENTS[:2]
    try:
        rows = site.run(site.order(patients))
    finally:
        proxy.stop()
    assert proxy.cuts == 1
    # Every instance once: the retry asked only for what the first attempt had not filed.
    site.assert_fetched(rows, region["priors"], patients)
    # Tried again; a link cut is not counted as an attempt (it waits for the link).
    assert "the region is unreachable, waiting for the link" in caplog.text
    assert re.search(rf"batched download for {name} ended early: 2 studies", hub.log())
    # The retry skipped what the cut attempt had filed (its lines follow the stream's end).
    wait_for(lambda: max((int(n) for n in re.findall(
        rf"for {name} sent: \d+ instances? \((\d+) held", hub.log())), default=0) >= 1, 10,
        what="the retry's line with the instances it skipped")
    if "PAS_PREFETCH__DOWNLOAD_LANES" in env:
        assert re.search(rf"download lane \d for {name} cut: the download stops", hub.log())
        assert f"download for {name} over 2 lanes" in hub.log()


def test_bad_batched_requests_get_a_clear_error(region: dict[str, Any], tmp_path: Path) -> None:
    hub: HubProcess = region["hub"]
    enrolment = enroll(hub, tmp_path / "site", "SITE-BAD")
    with client(enrolment) as http:
        cases = [
            ("/api/v1/downloads", {"studies": []}, "studies"),
            ("/api/v1/downloads", {"studies": "1.2.3"}, "studies"),
            ("/api/v1/downloads", {"studies": [{"study_uid": "1.2.3"}, {"study_uid": "x"}]},
             "studies[1].study_uid"),
            ("/api/v1/downloads", {"studies": [{"study_uid": "1.2.3", "have": "all"}]},
             "studies[0].have"),
            ("/api/v1/downloads", {"study_uid": "1.2.3", "lanes": [2]}, "lanes:"),
            ("/api/v1/downloads", {"study_uid": "1.2.3", "lanes": {
                "id": "ABC", "count": 2, "rate_bps": 10**6}}, "lanes.id"),
            ("/api/v1/downloads", {"study_uid": "1.2.3", "lanes": {
                "id": "a" * 32, "count": 17, "rate_bps": 10**6}}, "lanes.count"),
            ("/api/v1/downloads", {"study_uid": "1.2.3", "lanes": {
                "id": "a" * 32, "count": 2, "rate_bps": 0}}, "lanes.rate_bps"),
            ("/api/v1/downloads/lanes", {"id": "a" * 32, "lane": 0}, "\"lane\": 1 to 15"),
            ("/api/v1/downloads/lanes", {"id": "../etc", "lane": 1}, "hexadecimal"),
            ("/api/v1/downloads/search", {"patients": "A002304"}, "patients"),
            ("/api/v1/downloads/search", {"patients": [{"issuer": "x"}]}, "patients"),
        ]
        for path, body, named in cases:
            answer = http.post(path, json=body)
            assert answer.status_code == 422, (body, answer.text)
            problem = answer.json()
            assert problem["error"] == "bad_request" and named in problem["detail"], problem
        assert http.post("/api/v1/downloads/search", content=b"{nope",
                         headers={"content-type": "application/json"}).status_code == 400
        # A lane of a download nobody asked for: 404 once lane_join_wait_s (1 s here) is over.
        answer = http.post("/api/v1/downloads/lanes", json={"id": "b" * 32, "lane": 1})
        assert answer.status_code == 404 and answer.json()["error"] == "unknown_download"
    wait_for(lambda: not list((hub.home / "downloads").iterdir()), 30,
             what="no staging folder left on the hub")
    assert hub.proc is not None and hub.proc.poll() is None  # still serving


def test_an_urgent_upload_keeps_the_link_from_a_batch(region: dict[str, Any],
                                                      tmp_path: Path) -> None:
    """A stroke CT waiting for the hub: the batch of priors steps aside before its stream and
    downloads nothing until the upload is done; then every prior arrives byte for byte."""
    from pydicom.data import get_testdata_file

    from appliance.store import jobs as job_store

    hub: HubProcess = region["hub"]
    site = Site(hub, tmp_path / "pas", "SITE-URGENT")
    local = site.receiver.receive_file(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    study_fk = int(site.db.query_one("SELECT study_fk FROM instances WHERE id = ?",
                                     (local.instance_id,))["study_fk"])
    job_store.route_study(site.db, study_fk, [local.instance_id],
                          [job_store.NewJob("hub", "hub", 0, "stroke", [local.instance_id])])
    patients = PATIENTS[1:]
    ids = site.order(patients)
    site.service.start()
    try:
        wait_for(lambda: site.service.fetcher.stepped_aside > 0, 60, what="the batch to step aside")
        rows = [store.get_request(site.db, i) for i in ids]
        assert all(r is not None and r["instances_fetched"] == 0 for r in rows)
        assert "SITE-URGENT sent" not in hub.log()  # no stream started
        job = job_store.claim_next(site.db, "uplink-test", 60)
        assert job is not None and job.priority == 0
        job_store.finish(site.db, job.id, "uplink-test")
        rows = site.wait_done(ids)
    finally:
        site.service.stop()
    for row, patient in zip(rows, patients, strict=True):
        assert row["state"] == "fetched", row["last_error"]
        site.assert_on_site(region["priors"][patient][1])


def test_a_patient_id_with_a_wildcard_fails_alone_not_its_burst(region: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """The hub refuses ``*``, ``?`` and ``\\`` in a search's patient_id or issuer with a 422
    naming the field, for the whole batched search: one such ID from the RIS failed every
    patient searched with it. Now the site refuses it alone, before the batch, naming the
    character and the field; the others of the burst are fetched at their first attempt."""
    hub: HubProcess = region["hub"]
    # One attempt each: before, the others of the burst failed for good with it.
    site = Site(hub, tmp_path / "pas", "SITE-WILD", env={"PAS_PREFETCH__MAX_ATTEMPTS": "1"})
    site.service.fetcher.priors_route = False  # the batched search (two-step path)
    wild = "A0483*"
    rows = site.run(site.order((*PATIENTS, wild)))
    site.assert_fetched(rows[:-1], region["priors"], PATIENTS)
    assert all(row["attempts"] == 1 for row in rows[:-1])
    refused = rows[-1]
    assert refused["state"] == "failed", refused
    assert "patient_id 'A0483*' holds '*'" in refused["last_error"]
    assert site.service.fetcher.searcher.requests >= 1
    assert "422" not in (refused["last_error"] or "")
