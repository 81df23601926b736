"""Downloads share the link with uploads: an urgent upload waiting keeps the WAN for itself.

In-process: a PrefetchService over a temporary store, fetching from a real Orthanc (DICOMweb
plugin, in its own network namespace) through the real region client. An urgent hub job is
pending: the fetch finds the prior, then steps aside before the first instance and fetches
nothing until the job is done; then every instance arrives byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from appliance.config import Settings, load_settings
from appliance.ingest.receive import Receiver
from appliance.prefetch.service import PrefetchService
from appliance.store import jobs as job_store
from appliance.store import prefetch as store
from appliance.store.db import Database
from appliance.store.spool import Spool
from appliance.transfer.region import RegionClient, RegionError
from tests.support.peers import CT_DIR, MR_DIR, Orthanc, wait_for


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One regional Orthanc for the module (its start is most of these tests' time)."""
    if os.geteuid() != 0:
        pytest.fail("Orthanc runs in a network namespace: the tests must run as root")
    peer = Orthanc(tmp_path_factory.mktemp("link_orthanc")).start()
    yield peer
    peer.stop()


def _prior_at_region(orthanc: Orthanc, pattern: str) -> list[Path]:
    """The CT files matching ``pattern``, stored at the regional Orthanc."""
    prior = sorted(CT_DIR.glob(pattern))
    for path in prior:
        httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(),
                   timeout=60).raise_for_status()
    return prior


def _site(tmp_path: Path) -> tuple[Settings, Database, Receiver]:
    """Settings, index and receive path of a site home under ``tmp_path``."""
    settings = load_settings(environ={"PAS_HOME": str(tmp_path / "pas")})
    db = Database(settings.db_path)
    return settings, db, Receiver(db, Spool(settings.spool_dir, fsync=False))


def test_urgent_upload_keeps_the_link_then_the_prior_arrives(tmp_path: Path,
                                                              orthanc: Orthanc) -> None:
    patient = "A002304"
    prior = _prior_at_region(orthanc, f"{patient}_*_19001231-*.dcm")
    settings, db, receiver = _site(tmp_path)
    # A local urgent study waiting for the hub (say, a stroke CT).
    local = receiver.receive_file(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    study_fk = int(db.query_one("SELECT study_fk FROM instances WHERE id = ?",
                                (local.instance_id,))["study_fk"])
    job_store.route_study(db, study_fk, [local.instance_id],
                          [job_store.NewJob("hub", "hub", 0, "stroke", [local.instance_id])])

    service = PrefetchService(settings, db, receiver,
                              region_factory=lambda: RegionClient(orthanc.dicomweb))
    request_id = store.schedule(db, store.NewRequest("manual:t", "manual", patient)).request_id
    (request,) = store.claim_due(db)
    worker = threading.Thread(target=service.fetcher.process, args=(request,))
    worker.start()
    try:
        wait_for(lambda: service.fetcher.stepped_aside > 0, 30, what="the fetch to step aside")
        row = store.get_request(db, request_id)
        assert row is not None and row["studies_found"] == 1
        assert row["instances_fetched"] == 0  # nothing downloaded while the urgent job waits
        job = job_store.claim_next(db, "uplink-test", 60)
        assert job is not None and job.priority == 0
        job_store.finish(db, job.id, "uplink-test")
        worker.join(60)
        assert not worker.is_alive()
    finally:
        service.stopping.set()
        worker.join(10)
        service.stop()
    row = store.get_request(db, request_id)
    assert row is not None and row["state"] == "fetched"
    assert row["instances_fetched"] == len(prior)
    held = {r["sha256"]: r["path"] for r in db.query("SELECT sha256, path FROM instances")}
    for path in prior:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest in held
        assert str(dcmread(settings.spool_dir / held[digest]).PatientID) == patient


def test_series_stream_yields_each_file_byte_for_byte(orthanc: Orthanc) -> None:
    """region.stream_series against a real Orthanc: one request, every file exact."""
    files = sorted(MR_DIR.rglob("*.dcm"))[:24]
    for path in files:
        httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(),
                   timeout=60).raise_for_status()
    first = dcmread(files[0], stop_before_pixels=True)
    client = RegionClient(orthanc.dicomweb)
    try:
        got = [hashlib.sha256(part).hexdigest() for part in
               client.stream_series(str(first.StudyInstanceUID), str(first.SeriesInstanceUID))]
        with pytest.raises(RegionError, match="HTTP 404"):
            list(client.stream_series("1.2.3", "4.5.6"))
    finally:
        client.close()
    assert sorted(got) == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)


def test_a_fetch_cut_short_resumes_with_only_the_missing_instances(
        tmp_path: Path, orthanc: Orthanc) -> None:
    """One of the prior's instances is already held (a fetch interrupted by a crash): the
    next attempt downloads only the others, and the study ends complete and pinned."""
    patient = "A027284"
    prior = _prior_at_region(orthanc, f"{patient}_*_19000925-*.dcm")
    settings, db, receiver = _site(tmp_path)
    # Stored, then the crash: not yet marked routed/confirmed. The restart's recovery (what
    # PrefetchService.start runs) marks it, so routing never uploads it back.
    receiver.receive_file(prior[0].read_bytes(), source=store.REGION_SOURCE, origin="regional")
    assert store.recover(db) == 0  # no request was running; the instance is marked
    service = PrefetchService(settings, db, receiver,
                              region_factory=lambda: RegionClient(orthanc.dicomweb))
    try:
        request_id = store.schedule(db, store.NewRequest("manual:r", "manual", patient)
                                    ).request_id
        (request,) = store.claim_due(db)
        service.fetcher.process(request)
    finally:
        service.stop()
    row = store.get_request(db, request_id)
    assert row is not None and row["state"] == "fetched"
    assert row["instances_fetched"] == len(prior) - 1
    study_uid = str(dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID)
    assert store.local_instance_count(db, study_uid) == len(prior)
    pinned = db.query_one("SELECT pinned_until FROM studies WHERE study_uid = ?", (study_uid,))
    assert pinned is not None and pinned["pinned_until"] > time.time() + 29 * 86400
    assert db.query_one("SELECT count(*) AS n FROM instances WHERE routed_at IS NULL "
                        "OR confirmed_at IS NULL")["n"] == 0  # type: ignore[index]
