"""Eviction never takes a study from under a viewer reading it.

A real ``pas run`` whose spool is above its high watermark evicts every confirmed study on
its own (``cache.evict_interval_s``). A viewer retrieves a study and is slow to take it:
pynetdicom as the C-GET SCU holds its first C-STORE until the test lets it go; an HTTP
client of WADO-RS reads the first bytes of the answer, then waits. Meanwhile
the region confirms both studies held (the test writes ``confirmed_at``, standing in for the
uplink's receipts, as tests/faults/test_cache_policy.py does). The study nobody reads goes;
the one being read stays until its retrieve ends, and every one of its instances reaches the
viewer with the exact bytes the modality sent. Once the retrieve is over it may go too.

The same for a study on its way from the region (a real Orthanc, PAS's plain DICOMweb
region), whose instances are confirmed as they are filed: fetched through for a viewer's
getscu, or prefetched as a prior for an HL7 order. Neither may be evicted half way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from tests.faults.helpers import dataset_bytes, sha256
from tests.support.cleanup import started
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    Orthanc,
    PasProcess,
    free_port,
    port_open,
    prefetch_requests,
    storescu,
    wait_for,
)

MR_IMAGES = 20


def _study_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _held(home: Path) -> dict[str, int]:
    """Instances indexed per study, read from the daemon's database."""
    conn = sqlite3.connect(home / "pas.sqlite", timeout=30)
    try:
        return {r[0]: r[1] for r in conn.execute(
            "SELECT s.study_uid, count(i.id) FROM studies s JOIN instances i "
            "ON i.study_fk = s.id GROUP BY s.id")}
    finally:
        conn.close()


def _quiet(home: Path, stable_after_s: float = 1.0) -> bool:
    """Every study quiet for ``study.stable_after_s`` (1 s in the tests' daemons): the cache
    takes no study still arriving (appliance/ops/cache_policy.py)."""
    conn = sqlite3.connect(home / "pas.sqlite", timeout=30)
    try:
        newest = conn.execute("SELECT max(last_received_at) FROM studies").fetchone()[0]
    finally:
        conn.close()
    return newest is not None and newest < time.time() - stable_after_s - 0.05


def _confirm_everything(home: Path) -> None:
    """Standing in for the uplink's receipts: every instance confirmed at the region."""
    conn = sqlite3.connect(home / "pas.sqlite", timeout=30)
    try:
        with conn:
            conn.execute("UPDATE instances SET confirmed_at = 1, "
                         "routed_at = coalesce(routed_at, 1)")
    finally:
        conn.close()


# ~3 MB (C-GET) or ~47 MB (WADO-RS) held against a quota ten times that: above a 10 % high
# watermark, and every confirmed study may go (low watermark 0).
def _pas(stack: contextlib.ExitStack, home: Path, quota_mb: int,
         **env: str) -> PasProcess:
    return started(stack, PasProcess(home, {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",  # STORESCU and VIEWER
        "PAS_STORAGE__QUOTA_MB": str(quota_mb),
        "PAS_CACHE__HIGH_WATERMARK_PERCENT": "10",
        "PAS_CACHE__LOW_WATERMARK_PERCENT": "0",
        "PAS_CACHE__EVICT_INTERVAL_S": "0.2",
        "PAS_CACHE__SCRUB_MB_PER_S": "0",
        **env,
    }))


def _two_studies(mr_images: int) -> tuple[list[Path], list[Path], str, str]:
    """The first ``mr_images`` of the MR study (the one read) and a CT study of 3 (not)."""
    mr_files = sorted(MR_DIR.glob("*.dcm"))[:mr_images]
    ct_files = sorted(CT_DIR.glob("A002304_*.dcm"))
    read_study, other_study = _study_uid(mr_files[0]), _study_uid(ct_files[0])
    return mr_files, [p for p in ct_files if _study_uid(p) == other_study], read_study, \
        other_study


def _one_pass_over_both(pas: PasProcess, read_study: str, other_study: str) -> dict[str, int]:
    """Once the region confirmed both: what the next eviction pass leaves. It evicts the
    study nobody reads; on the code before, the same pass went on to the study being read
    (every confirmed study may go)."""
    _confirm_everything(pas.home)
    skipped = f"not evicted: study {read_study} is being read"  # the pass's log line
    wait_for(lambda: other_study not in (held := _held(pas.home)) and (
        read_study not in held or skipped in pas.log()), 30,
        what="an eviction pass over both studies")
    return _held(pas.home)


def test_a_study_being_retrieved_is_not_evicted_under_the_viewer(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        MRImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    mr_files, ct_files, read_study, other_study = _two_studies(MR_IMAGES)
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID):
            sha256(dataset_bytes(p.read_bytes())) for p in mr_files}
    with contextlib.ExitStack() as stack:
        pas = _pas(stack, tmp_path / "pas", quota_mb=10)
        storescu([*mr_files, *ct_files], pas.port)
        assert _held(pas.home) == {read_study: MR_IMAGES, other_study: len(ct_files)}

        on_store, first_store, go_on, received = _slow_viewer()

        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS",
                             ext_neg=[build_role(MRImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        statuses: list[Any] = []

        def retrieve() -> None:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = read_study
            statuses.extend(status for status, _ in assoc.send_c_get(
                identifier, StudyRootQueryRetrieveInformationModelGet) if status)

        viewer = threading.Thread(target=retrieve, daemon=True)
        viewer.start()
        try:
            assert first_store.wait(30), "the first C-STORE of the retrieve never came"
            held_during = _one_pass_over_both(pas, read_study, other_study)
        finally:
            go_on.set()
            viewer.join(60)
            assoc.release()
        assert held_during == {read_study: MR_IMAGES}, held_during
        final = statuses[-1]
        assert (final.Status, final.NumberOfCompletedSuboperations,
                final.get("NumberOfFailedSuboperations", 0)) == (0x0000, MR_IMAGES, 0), final
        assert received == sent  # every instance, the modality's exact bytes
        # Once read, the confirmed study is evictable again: the reader is gone.
        wait_for(lambda: _held(pas.home) == {}, 30, what="the read study evicted after")
        stack.pop_all()
    pas.stop()


def test_a_study_being_moved_is_not_evicted_under_the_destination(tmp_path: Path) -> None:
    """The same with C-MOVE (DCMTK movescu as the viewer): the move destination, a
    pynetdicom storage SCP, is slow to take its first C-STORE."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    mr_files, ct_files, read_study, other_study = _two_studies(MR_IMAGES)
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID):
            sha256(dataset_bytes(p.read_bytes())) for p in mr_files}
    on_store, first_store, go_on, received = _slow_viewer()

    destination = AE(ae_title="SLOWSCP")
    destination.add_supported_context(MRImageStorage, "1.2.840.10008.1.2.1")
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        with contextlib.ExitStack() as stack:
            pas = _pas(stack, tmp_path / "pas", quota_mb=10,
                       PAS_SERVING__MOVE_DESTINATIONS=f'[{{title = "SLOWSCP", host = '
                                                      f'"127.0.0.1", port = {port}}}]')
            storescu([*mr_files, *ct_files], pas.port)
            moving = subprocess.Popen(
                ["movescu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem", "SLOWSCP",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={read_study}",
                 "127.0.0.1", str(pas.port)],
                env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert first_store.wait(30), "the first C-STORE of the move never came"
                held_during = _one_pass_over_both(pas, read_study, other_study)
            finally:
                go_on.set()
                _, stderr = moving.communicate(timeout=60)
            assert held_during == {read_study: MR_IMAGES}, held_during
            assert moving.returncode == 0, stderr[-2000:]
            assert received == sent  # every instance, the modality's exact bytes
            wait_for(lambda: _held(pas.home) == {}, 30, what="the moved study evicted after")
            stack.pop_all()
        pas.stop()
    finally:
        server.shutdown()


def _readers_shown(home: Path) -> int:
    """The daemon's readers as the index shows them to pas cache evict/purge."""
    conn = sqlite3.connect(home / "pas.sqlite", timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM study_readers").fetchone()[0])
    finally:
        conn.close()


def test_pas_cache_evict_and_purge_leave_a_study_the_daemon_is_reading(tmp_path: Path) -> None:
    """``pas cache evict`` and ``pas cache purge``, run by an IT admin while a viewer's C-GET
    is under way, run in a process of their own: the daemon's readers are not theirs to
    see, and on the code before the purge deleted the study under the viewer (exit 0,
    "purged study ...: 20 instances") and the viewer got 1 of 20. Now the purge is refused
    naming the reader, the pass evicts the study nobody reads and says which it left; once
    the retrieve is over, the same commands take the read studies. The viewer reads two
    studies at once (the MR and a CT: one C-GET, both UIDs), a third is read by nobody."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        MRImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    mr_files, ct_files, mr_study, ct_study = _two_studies(MR_IMAGES)
    others = [p for p in sorted(CT_DIR.glob("A002304_*.dcm")) if _study_uid(p) != ct_study]
    other_study = _study_uid(others[0])
    sent = {_sop_uid(p): sha256(dataset_bytes(p.read_bytes())) for p in mr_files}
    with contextlib.ExitStack() as stack:
        # The daemon's own pass runs at its start (nothing confirmed yet), then not again:
        # what goes is what the CLI takes.
        pas = _pas(stack, tmp_path / "pas", quota_mb=10, PAS_CACHE__EVICT_INTERVAL_S="3600")
        storescu([*mr_files, *ct_files, *others], pas.port)
        assert _held(pas.home) == {mr_study: MR_IMAGES, ct_study: len(ct_files),
                                   other_study: len(others)}
        # What PAS holds of each instance read (DCMTK's storescu re-encodes these CT files
        # a little as it sends them: the MR's are the files' own bytes, checked below).
        held = {_sop_uid(f): sha256(dataset_bytes(f.read_bytes()))
                for f in (pas.home / "spool").rglob("*.dcm")}
        held = {uid: held[uid] for uid in {*sent, *map(_sop_uid, ct_files)}}
        assert {uid: held[uid] for uid in sent} == sent
        on_store, first_store, go_on, received = _slow_viewer()
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for storage in (MRImageStorage, CTImageStorage):
            ae.add_requested_context(storage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS",
                             ext_neg=[build_role(MRImageStorage, scp_role=True),
                                      build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        statuses: list[Any] = []

        def retrieve() -> None:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = [mr_study, ct_study]
            statuses.extend(status for status, _ in assoc.send_c_get(
                identifier, StudyRootQueryRetrieveInformationModelGet) if status)

        viewer = threading.Thread(target=retrieve, daemon=True)
        viewer.start()
        try:
            assert first_store.wait(30), "the first C-STORE of the retrieve never came"
            _confirm_everything(pas.home)
            wait_for(lambda: _quiet(pas.home), 10, what="the studies quiet for stable_after_s")
            purged = pas.cli("cache", "purge", mr_study, check=False)
            held_after_purge = _held(pas.home)
            evicted = pas.cli("cache", "evict", check=False)
            held_after_evict = _held(pas.home)
        finally:
            go_on.set()
            viewer.join(60)
            assoc.release()
        refusal = " ".join(purged.stderr.split())  # rich wraps long lines
        assert purged.returncode == 1, (purged.stdout, purged.stderr)
        assert f"study {mr_study} is being read by the running daemon" in refusal, refusal
        assert "C-GET by VIEWER at 127.0.0.1 since" in refusal and "--force" in refusal
        assert held_after_purge == {mr_study: MR_IMAGES, ct_study: len(ct_files),
                                    other_study: len(others)}
        said = " ".join(evicted.stdout.split())
        assert evicted.returncode == 0, (evicted.stdout, evicted.stderr)
        assert "evicted 1 study" in said, said
        for study in (mr_study, ct_study):
            assert f"not evicted: study {study} is being read by the running daemon" in said
        assert held_after_evict == {mr_study: MR_IMAGES, ct_study: len(ct_files)}
        final = statuses[-1]
        assert (final.Status, final.NumberOfCompletedSuboperations,
                final.get("NumberOfFailedSuboperations", 0)) == (0x0000, len(held), 0), final
        assert received == held  # every instance of both, byte for byte

        # The read over, its studies may go: by the purge, and by the pass.
        wait_for(lambda: _readers_shown(pas.home) == 0, 30, what="the readers' rows gone")
        purged = pas.cli("cache", "purge", mr_study)
        assert f"purged study {mr_study}: {MR_IMAGES} instances" in purged.stdout
        evicted = pas.cli("cache", "evict")
        assert "evicted 1 study" in evicted.stdout and "not evicted" not in evicted.stdout
        assert re.search(r"[\d.]+ [kMG]?B freed; used [\d.]+ [kMG]?B of ", evicted.stdout), \
            evicted.stdout
        assert _held(pas.home) == {}
        stack.pop_all()
    pas.stop()


def _parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related answer's parts."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    assert boundary, content_type
    chunks = body.split(b"--" + boundary.group(1).encode())[1:-1]
    return [chunk.split(b"\r\n\r\n", 1)[1][:-2] for chunk in chunks]


def test_a_study_read_through_wado_rs_is_not_evicted_under_the_viewer(tmp_path: Path) -> None:
    """The whole MR study (520 images, 45 MB: more than the sockets buffer), read slowly."""
    mr_files, ct_files, read_study, other_study = _two_studies(520)
    with contextlib.ExitStack() as stack:
        pas = _pas(stack, tmp_path / "pas", quota_mb=400)
        storescu([*mr_files, *ct_files], pas.port)
        assert _held(pas.home) == {read_study: len(mr_files), other_study: len(ct_files)}
        stored = {p.name.removesuffix(".dcm") for p in (pas.home / "spool").rglob("*.dcm")}
        url = f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{read_study}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        with httpx.stream("GET", url, headers={"Accept": accept}, timeout=60) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            body = [next(chunks)]  # the answer is under way; the viewer is slow
            held_during = _one_pass_over_both(pas, read_study, other_study)
            body.extend(chunks)
        assert held_during == {read_study: len(mr_files)}, held_during
        parts = _parts(b"".join(body), response.headers["content-type"])
        # Every image, each the stored file byte for byte (its name is its SHA-256).
        assert len(parts) == len(mr_files)
        assert {hashlib.sha256(p).hexdigest() for p in parts} <= stored
        assert len({hashlib.sha256(p).hexdigest() for p in parts}) == len(mr_files)
        wait_for(lambda: _held(pas.home) == {}, 30, what="the read study evicted after")
        stack.pop_all()
    pas.stop()


def _fetched_through(pas: PasProcess, study: str, viewer: str, out: Path) -> set[str]:
    """The SOP Instance UIDs a viewer got of ``study``: getscu (C-GET), or WADO-RS."""
    if viewer == "getscu":
        out.mkdir()
        got = subprocess.run(
            ["getscu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(pas.port), "-od", str(out)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stderr[-2000:]
        return {_sop_uid(p) for p in out.iterdir()}
    answer = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{study}",
                       headers={"Accept": 'multipart/related; type="application/dicom"; '
                                          "transfer-syntax=*"}, timeout=300)
    assert answer.status_code == 200, answer.text[:500]
    return {str(dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)
            for part in _parts(answer.content, answer.headers["content-type"])}


@pytest.mark.root  # Orthanc in a network namespace of its own
@pytest.mark.parametrize("viewer", ["getscu", "wado-rs"])
def test_a_study_fetched_through_for_a_viewer_is_not_evicted_half_way(tmp_path: Path,
                                                                      viewer: str) -> None:
    """A study only the region holds (a real Orthanc, PAS's plain DICOMweb region), asked
    for by getscu or by WADO-RS: each instance fetched is confirmed as it is filed (the
    region served it). Past the high watermark the eviction pass took the study half
    fetched, before the retrieve planned it: the viewer got what was filed after the last
    pass (getscu: 19, then 5 of 100, with a final Success)."""
    mr_files = sorted(MR_DIR.glob("*.dcm"))[:100]  # 8.6 MB; past 2 MB the pass runs
    study = _study_uid(mr_files[0])
    sent = {_sop_uid(p) for p in mr_files}
    with contextlib.ExitStack() as stack:
        region = started(stack, Orthanc(tmp_path / "region"))
        storescu(mr_files, region.dicom_port, host=region.host, called="ORTHANC")
        pas = _pas(stack, tmp_path / "pas", quota_mb=20,
                   PAS_PREFETCH__ENABLED="false", PAS_PREFETCH__DICOMWEB_URL=region.dicomweb,
                   PAS_PREFETCH__ALLOW_CLEARTEXT="true")  # Orthanc's http:// in its namespace
        received = _fetched_through(pas, study, viewer, tmp_path / "viewer")
        assert len(received) == len(mr_files), (len(received), pas.log()[-2000:])
        assert received == sent  # every instance of the study
        # Read, the study goes like any confirmed one.
        wait_for(lambda: _held(pas.home) == {}, 30, what="the study evicted after")
        stack.pop_all()
    pas.stop()
    region.stop()


def _orm(patient: str) -> str:
    return "\r".join([
        "MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261205120000||ORM^O01|EVICT1|P|2.5",
        f"PID|1||{patient}^^^^MR||DOE^JOHN",
        "ORC|NW|ORD-EVICT1|||SC",
        "OBR|1|ORD-EVICT1||MRHEAD^MR head||||||||||||||ACC-EVICT1||||||MR",
    ])


@pytest.mark.root  # Orthanc in a network namespace of its own
def test_a_prior_being_prefetched_is_not_evicted_half_way(tmp_path: Path) -> None:
    """An order (HL7 ORM over MLLP) brings the patient's prior from the region (a real
    Orthanc, PAS's plain DICOMweb region). Each instance fetched is confirmed as it is
    filed (the region served it); the prior was pinned only once the whole study was
    fetched. Past the high watermark the eviction pass took the prior half fetched: the
    request said "fetched", 100 instances, and the cache held the few filed after the last
    pass, pinned for the pin's days."""
    from hl7.client import MLLPClient

    mr_files = sorted(MR_DIR.glob("*.dcm"))[:100]  # 8.6 MB; past 2 MB the pass runs
    study = _study_uid(mr_files[0])
    patient = str(dcmread(mr_files[0], stop_before_pixels=True).PatientID)
    with contextlib.ExitStack() as stack:
        region = started(stack, Orthanc(tmp_path / "region"))
        for path in mr_files:  # Orthanc's REST API keeps each file byte for byte
            answer = httpx.post(f"{region.url}/instances", content=path.read_bytes(),
                                timeout=60)
            assert answer.status_code == 200, answer.text
        hl7_port = free_port()
        pas = _pas(stack, tmp_path / "pas", quota_mb=20,
                   PAS_PREFETCH__DICOMWEB_URL=region.dicomweb, PAS_PREFETCH__ALLOW_CLEARTEXT="true",
                   PAS_HL7__HOST="127.0.0.1", PAS_HL7__PORT=str(hl7_port),
                   PAS_PREFETCH__CHECK_INTERVAL_S="0.2", PAS_PREFETCH__PIN_DAYS="30")
        wait_for(lambda: port_open("127.0.0.1", hl7_port), 15, what="the HL7 listener")
        with MLLPClient("127.0.0.1", hl7_port) as client:
            assert "MSA|AA|EVICT1" in client.send_message(_orm(patient)).decode()
        (request,) = wait_for(lambda: [r for r in prefetch_requests(pas)
                                       if r["state"] in ("fetched", "failed")], 120,
                              what="the prefetch request done")
        assert (request["state"], request["instances_fetched"]) == ("fetched", len(mr_files))
        # The prior whole on site, pinned: no eviction pass takes it for 30 days.
        assert _held(pas.home) == {study: len(mr_files)}
        conn = sqlite3.connect(pas.home / "pas.sqlite", timeout=30)
        try:
            (pinned_until,) = conn.execute("SELECT pinned_until FROM studies WHERE "
                                           "study_uid = ?", (study,)).fetchone()
        finally:
            conn.close()
        assert pinned_until > time.time() + 29 * 86400
        stack.pop_all()
    pas.stop()
    region.stop()


def _slow_viewer() -> tuple[Any, threading.Event, threading.Event, dict[str, str]]:
    """A viewer's C-STORE handler that takes the first image, then waits for ``go_on``
    (the retrieve is under way meanwhile); what it received, SOP Instance UID -> SHA-256."""
    first_store, go_on = threading.Event(), threading.Event()
    received: dict[str, str] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = sha256(
            event.request.DataSet.getvalue())
        first_store.set()
        go_on.wait(60)
        return 0x0000

    return on_store, first_store, go_on, received
