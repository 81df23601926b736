"""A study partly lost on this appliance, the region out of reach: the viewer gets what is
on site, and is told which instances it does not get (docs/operations.md, "Backup and
restore").

After a lost disk and ``pas restore`` (or a file removed by hand), the index rows whose file
is gone are flagged missing at the start, and a retrieve fetches those instances from the
region first. When the region cannot give them back (the WAN down), the whole retrieve was
refused: 0xC000 with the cause, nothing delivered, for a study of which every other image was
on site. A radiologist reading an emergency would rather have those. PS3.4 C.4.2.1.4/C.4.3
says how: deliver what can be, end 0xB000 with the Number of Failed Sub-operations and the
Failed SOP Instance UID List (0008,0058) naming the missing ones; PS3.18: 206 Partial Content
with a Warning.

Real peers: ``pas run`` whose region (``prefetch.dicomweb_url``) refuses connections, DCMTK
storescu as the modality, getscu and movescu (into a storescp) as the viewer, pynetdicom as
the viewer whose final responses are read (``appliance.dicomnet.install()`` first), WADO-RS
over HTTP. A study of 40 MR instances, 3 files removed while the daemon was stopped. Then,
with those files still flagged missing, two patients of two issuers sharing a PatientID: a
PATIENT-level retrieve without the issuer is refused 0xA900 as without lost files.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.support.cleanup import started
from tests.support.objects import tiny_ct
from tests.support.peers import (
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    StoreSCP,
    closed_port,
    read_rows,
    storescu,
)

N = 40
LOST = (4, 17, 33)  # which of the N files the disk lost


def _dataset_sha256(data: bytes) -> str:
    """The SHA-256 of a DICOM file's data set, its file meta left out: what a C-STORE carries
    (getscu and storescp write a file meta of their own before the bytes they received)."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", data[:140]
    return hashlib.sha256(data[144 + int.from_bytes(data[140:144], "little"):]).hexdigest()


def _parts(answer: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related answer."""
    boundary = answer.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    return [chunk.partition(b"\r\n\r\n")[2][:-2]
            for chunk in answer.content.split(b"--" + boundary.encode())[1:-1]]


def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _retrieve(port: int, kind: str, identifier: Dataset,
              destination: str | None = None) -> tuple[Dataset, set[str], set[str]]:
    """A C-GET (``kind`` "get") or C-MOVE by pynetdicom, Patient Root for the PATIENT level
    and Study Root otherwise: the final response, its Failed SOP Instance UID List
    (0008,0058), and the SOP Instance UIDs a C-GET received."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        MRImageStorage,
        PatientRootQueryRetrieveInformationModelGet,
        PatientRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )

    from appliance import dicomnet

    dicomnet.install()  # pynetdicom's own SCU loop can lose an answer (dicomnet/__init__)
    patient = identifier.QueryRetrieveLevel == "PATIENT"
    model = {("get", True): PatientRootQueryRetrieveInformationModelGet,
             ("get", False): StudyRootQueryRetrieveInformationModelGet,
             ("move", True): PatientRootQueryRetrieveInformationModelMove,
             ("move", False): StudyRootQueryRetrieveInformationModelMove}[kind, patient]
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(model)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    received: set[str] = set()

    def on_store(event: Any) -> int:
        received.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = ae.associate("127.0.0.1", port, ae_title="PAS",
                         ext_neg=[build_role(MRImageStorage, scp_role=True),
                                  build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        answers = (assoc.send_c_get(identifier, model) if kind == "get" else
                   assoc.send_c_move(identifier, destination, model))
        final, identifier = list(answers)[-1]
    finally:
        assoc.release()
    value = identifier.get("FailedSOPInstanceUIDList", []) if identifier is not None else []
    return final, {str(v) for v in ([value] if isinstance(value, str) else value)}, received


def _metric(pas: PasProcess, name: str) -> float | None:
    """The value of an unlabelled sample of the daemon's /metrics (None: not exported)."""
    text = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def _retrieves(pas: PasProcess) -> dict[tuple[str, str], float]:
    """pas_retrieve_requests_total by (channel, result)."""
    text = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    return {(channel, result): float(value) for channel, result, value in re.findall(
        r'^pas_retrieve_requests_total\{channel="([\w-]+)",result="(\w+)"\} (\S+)$',
        text, re.M)}


def _counts(final: Dataset) -> tuple[int, int, int, int]:
    return (int(final.Status), int(final.NumberOfCompletedSuboperations),
            int(final.NumberOfFailedSuboperations), int(final.NumberOfWarningSuboperations))


def test_a_partly_lost_study_is_served_without_its_lost_instances(tmp_path: Path) -> None:
    files = sorted(MR_DIR.glob("*.dcm"))[:N]
    head = dcmread(files[0], stop_before_pixels=True)
    study, series, patient = (str(head.StudyInstanceUID), str(head.SeriesInstanceUID),
                              str(head.PatientID))
    lost_uids = _sop_uids([files[i] for i in LOST])
    on_site = _sop_uids(files) - lost_uids
    with contextlib.ExitStack() as stack:
        region = stack.enter_context(closed_port())  # the WAN down: refused at once
        mover = started(stack, StoreSCP(tmp_path / "moved"))
        pas = started(stack, PasProcess(tmp_path / "pas", {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ON_ARRIVAL": "false",
            "PAS_PREFETCH__DICOMWEB_URL":
                f"http://127.0.0.1:{region.getsockname()[1]}/dicom-web",
            "PAS_SERVING__MOVE_DESTINATIONS": (
                f'[{{title = "{mover.ae_title}", host = "127.0.0.1", port = {mover.port}}}]')}))
        storescu(files, pas.port)
        pas.stop()
        db = pas.home / "pas.sqlite"
        rows = {r["sop_instance_uid"]: r for r in read_rows(
            db, "SELECT sop_instance_uid, path, sha256 FROM instances")}
        assert len(rows) == N
        stored = {}  # SOP Instance UID -> the data set's SHA-256 as the modality sent it
        for uid, row in rows.items():
            data = (pas.home / "spool" / row["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
            stored[uid] = _dataset_sha256(data)
        for uid in lost_uids:
            (pas.home / "spool" / rows[uid]["path"]).unlink()
        pas.start()  # start-up recovery flags the three missing
        assert len(read_rows(db, "SELECT id FROM integrity_issues WHERE kind = 'missing' "
                                 "AND resolved_at IS NULL")) == 3
        # What the dashboard and PasApplianceFilesMissing read: no metric said it before.
        assert _metric(pas, "pas_spool_files_missing") == 3.0
        # And the status page's cache card (it showed the counts alone).
        page = httpx.get(f"http://127.0.0.1:{pas.http_port}/", timeout=10)
        assert page.status_code == 200
        assert '<span class="state warn" id="files-missing">3 files missing</span>' in \
            page.text, page.text[:3000]
        assert "pas verify --repair fetches the confirmed ones from the region" in page.text
        log_before = len(pas.log())

        # getscu, study level: the 37 on site, bit-exact (was: refused 0xC000, none).
        out = tmp_path / "viewer"
        out.mkdir()
        got = subprocess.run(["getscu", "-v", "-S", "+B", "-aet", "VIEWER", "-aec", "PAS", "-od",
                              str(out), "-k", "QueryRetrieveLevel=STUDY",
                              "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(pas.port)],
                             capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
        said = got.stdout + got.stderr
        received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                    for p in out.iterdir()}
        assert set(received) == on_site, said
        assert {uid: _dataset_sha256(p.read_bytes()) for uid, p in received.items()} == \
            {uid: stored[uid] for uid in on_site}
        # Its final status (getscu then fails its release: it leaves the final response's
        # data set, the Failed SOP Instance UID List, unread; DCMTK's, not PAS's).
        assert "DIMSE status is: Warning: SubOperationsCompleteOneOrMoreFailures" in said, said
        assert "Number of Completed Suboperations : 37" in said and \
            "Number of Failed Suboperations    : 3" in said, said
        [row] = read_rows(db, "SELECT outcome, detail FROM audit WHERE event = 'retrieve' "
                              "ORDER BY id DESC LIMIT 1")
        assert row["detail"] == "C-GET: 37 completed, 3 failed (3 lost here, not sent), 0 warning"
        assert row["outcome"].startswith(
            "failure: 3 of 40 instances not stored by VIEWER (3 instances lost here, the "
            "region could not be asked: try again later (their file flagged missing: pas "
            f"cache status; {study}: region unavailable: "), row["outcome"]

        # movescu, series level, into a storescp: the same 37, bit-exact.
        move = subprocess.run(["movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem",
                               mover.ae_title, "-k", "QueryRetrieveLevel=SERIES",
                               "-k", f"StudyInstanceUID={study}",
                               "-k", f"SeriesInstanceUID={series}",
                               "127.0.0.1", str(pas.port)],
                              capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
        moved = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                 for p in mover.files()}
        said = move.stdout + move.stderr
        assert set(moved) == on_site, said
        assert "Received Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" \
            in said, said
        assert {uid: _dataset_sha256(p.read_bytes()) for uid, p in moved.items()} == \
            {uid: stored[uid] for uid in on_site}

        # The final responses: 0xB000, the counts, the three lost named (patient level C-GET,
        # instance level C-MOVE of one lost and two on site).
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "PATIENT"
        identifier.PatientID = patient
        final, failed, arrived = _retrieve(pas.port, "get", identifier)
        assert _counts(final) == (0xB000, 37, 3, 0)
        assert arrived == on_site
        assert failed == lost_uids
        some = sorted(lost_uids)[:1] + sorted(on_site)[:2]
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = study
        identifier.SeriesInstanceUID = series
        identifier.SOPInstanceUID = some
        final, failed, _ = _retrieve(pas.port, "move", identifier, mover.ae_title)
        assert _counts(final) == (0xB000, 2, 1, 0)
        assert failed == set(some[:1])
        # Each of the four needed the region and did not get it: a cache miss, not a hit
        # (the hit ratio said 1.0 while every retrieve of the study went without 3 images).
        assert _retrieves(pas) == {("dicom", "hit"): 0.0, ("dicom", "miss"): 4.0,
                                   ("wado-rs", "hit"): 0.0, ("wado-rs", "miss"): 0.0}

        # WADO-RS, study and series: 206, the 37 parts, a Warning naming the three (and the
        # study's metadata: the 37 items).
        web = f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{study}"
        accept = {"Accept": 'multipart/related; type="application/dicom"'}
        for path in (web, f"{web}/series/{series}"):
            answer = httpx.get(path, headers=accept, timeout=60)
            assert answer.status_code == 206, answer.text[:300]
            parts = _parts(answer)
            assert sorted(_dataset_sha256(p) for p in parts) == \
                sorted(stored[uid] for uid in on_site)
            warning = answer.headers["warning"]
            assert warning.startswith(f'299 http://127.0.0.1:{pas.http_port}/dicom-web: "3 of '
                                      "the 40 instances could not be returned: 3 instances of "
                                      f"study {study} asked for lost their file"), warning
            assert set(re.findall(r"[0-9.]{20,}", warning.split("Not returned: ")[1])) == \
                lost_uids
        # Both WADO-RS retrieves were served partly: misses, counted as the C-MOVE/C-GET
        # ones are (they were not counted at all).
        assert _retrieves(pas) == {("dicom", "hit"): 0.0, ("dicom", "miss"): 4.0,
                                   ("wado-rs", "hit"): 0.0, ("wado-rs", "miss"): 2.0}
        metadata = httpx.get(f"{web}/metadata", headers={"Accept": "application/dicom+json"},
                             timeout=60)
        assert metadata.status_code == 206 and "warning" in metadata.headers
        assert {item["00080018"]["Value"][0] for item in metadata.json()} == on_site
        # One WARNING per retrieve naming the study, the count and the cause; none per file.
        # (The audit rows go to the journal too, pas.audit: not counted here.)
        said = pas.log()[log_before:]
        lines = [line for line in said.splitlines()
                 if " WARNING " in line and " pas.audit: " not in line]
        assert len(lines) == 7, lines
        partial = [line for line in lines if "reported as failed sub-operations" in line]
        assert len(partial) == 4, lines
        assert all(f"3 instances (3 of study {study})" in line or
                   f"1 instance (1 of study {study})" in line for line in partial), partial
        assert all("region could not be asked" in line for line in partial), partial
        assert len([line for line in lines if "206 Partial Content" in line]) == 3, lines
        assert "sub-operation failed" not in said
        assert not [line for line in lines if ": retrieve by " in line
                    or "fetch-through of" in line], lines
        # One lost instance asked for alone: as before, 503 (the region could not be asked).
        one = httpx.get(f"{web}/series/{series}/instances/{sorted(lost_uids)[0]}",
                        headers=accept, timeout=60)
        assert one.status_code == 503, one.text[:300]
        assert one.json()["detail"].startswith(
            f"1 instance of study {study} asked for lost their file on this appliance")
        # The 206's audit row: what was sent, and what was not.
        rows = read_rows(db, "SELECT outcome, detail FROM audit WHERE event = 'retrieve' "
                             "AND detail LIKE '%HTTP 206' ORDER BY id")
        assert [r["detail"] for r in rows] == [
            "37 of 37 instances (WADO-RS), HTTP 206"] * 2 + [
            "37 of 37 instances (WADO-RS metadata), HTTP 206"]
        assert all(r["outcome"].startswith(
            f"failure: 3 instances of 40 not sent: 3 instances of study {study} asked for lost "
            "their file") for r in rows), rows

        # The metadata (not a retrieve of instances) and the refusal above (nothing served,
        # as a C-MOVE/C-GET of lost instances only is refused uncounted): no more counted.
        assert _retrieves(pas)[("wado-rs", "miss")] == 2.0

        # Two patients of two issuers sharing PatientID 123456, filed now. With files flagged
        # missing (the three above) and fetch-through on, a PATIENT-level retrieve first
        # plans which studies to fetch; without IssuerOfPatientID it is refused there as on
        # the path without lost files: 0xA900, the Error Comment, the audit row (it was
        # pynetdicom's 0xC413/0xC514, no comment, no row).
        shared = tmp_path / "shared-id"
        shared.mkdir()
        by_issuer: dict[str, set[str]] = {}
        for issuer in ("HOSP_A", "HOSP_B"):
            first = tiny_ct(PatientID="123456", IssuerOfPatientID=issuer)
            second = tiny_ct(str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                             PatientID="123456", IssuerOfPatientID=issuer, InstanceNumber=2)
            for ds in (first, second):
                ds.save_as(shared / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            by_issuer[issuer] = {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
        storescu(shared, pas.port)
        reason = ("PatientID 123456 names 2 patients: give IssuerOfPatientID (issuers "
                  "HOSP_A, HOSP_B)")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "PATIENT"
        identifier.PatientID = "123456"
        for kind in ("get", "move"):
            final, _, arrived = _retrieve(pas.port, kind, identifier, mover.ae_title)
            assert int(final.Status) == 0xA900, final
            assert reason.startswith(str(final.ErrorComment).removesuffix("...")), final
            assert arrived == set()
            [row] = read_rows(db, "SELECT outcome, target FROM audit WHERE event = 'retrieve' "
                                  "ORDER BY id DESC LIMIT 1")
            assert (row["outcome"], row["target"]) == (f"failure: {reason}",
                                                       "PATIENT PatientID=123456"), row
        assert set(moved) == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                              for p in mover.files()}  # nothing more moved
        # With the issuer: that patient's two instances, none of the other's.
        identifier.IssuerOfPatientID = "HOSP_B"
        final, failed, arrived = _retrieve(pas.port, "get", identifier)
        assert _counts(final) == (0x0000, 2, 0, 0)
        assert arrived == by_issuer["HOSP_B"]
