"""The access audit of C-MOVE and C-GET says what the destination stored, not what was sent.

Real peers only: DCMTK movescu/getscu as the viewer, DCMTK storescp as the move destination.
The refusals come from the peers themselves: a storescp whose configuration profile accepts MR
Image Storage only (it rejects the CT presentation contexts), and a storescp, or a getscu,
writing to a 1 MiB tmpfs of its own, which answers 0xA700 (out of resources) once full.
Each audit row is checked against the files the destination really holds and against the
counts of the final C-MOVE/C-GET response pynetdicom sends the viewer.

Also here, on the same PAS: two patients of two issuers sharing PatientID 123456 (a patient-
level retrieve sent both: review 2026-12-07), and a pynetdicom storage SCP that records the
Move Originator of each C-STORE sub-operation (PAS named itself, not the viewer).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
)

from tests.support.cleanup import started
from tests.support.objects import tiny_ct
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    RetrieveAudit,
    StoreSCP,
    free_port,
    on_small_disk,
    storescu,
)
from tests.support.storescp_profiles import one_class_profile

pytestmark = pytest.mark.root  # unshare --mount and a tmpfs: the full disks are real

MR_ONLY_PROFILE = one_class_profile("MROnly", "MRImageStorage")
SMALL_DISK_KB = 1024  # about 11 of the 86 kB MR images


class OriginRecorder:
    """A pynetdicom storage SCP (CT) that records each C-STORE it is sent: (SOP Instance
    UID, Move Originator AE Title, Move Originator Message ID). DCMTK's storescp does not
    say them."""

    ae_title = "ORIGINS"

    def __init__(self) -> None:
        self.port = free_port()
        self.stores: list[tuple[str, str | None, int | None]] = []
        self._lock = threading.Lock()
        self.server: Any = None

    def start(self) -> OriginRecorder:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def _on_store(self, event: Any) -> int:
        request = event.request
        title = request.MoveOriginatorApplicationEntityTitle
        with self._lock:
            self.stores.append((str(request.AffectedSOPInstanceUID),
                                str(title).strip() if title is not None else None,
                                request.MoveOriginatorMessageID))
        return 0x0000

    def taken(self) -> list[tuple[str, str | None, int | None]]:
        """What was stored since the last call."""
        with self._lock:
            stores, self.stores = self.stores, []
        return stores

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


# Two patients of two hospitals sharing a PatientID, two instances each (one study each).
SHARED_PATIENT_ID = "123456"
ISSUERS = {"HOSP_A": "MARTIN^PAUL", "HOSP_B": "DURAND^MARIE"}


def _patients_sharing_an_id(folder: Path) -> dict[str, list[str]]:
    """Write them to ``folder``: issuer -> its instances' SOP Instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    for issuer, name in ISSUERS.items():
        first = tiny_ct(PatientID=SHARED_PATIENT_ID, IssuerOfPatientID=issuer, PatientName=name)
        second = tiny_ct(str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                         PatientID=SHARED_PATIENT_ID, IssuerOfPatientID=issuer,
                         PatientName=name, InstanceNumber=2)
        for ds in (first, second):
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        written[issuer] = sorted(str(ds.SOPInstanceUID) for ds in (first, second))
    return written


class Site(RetrieveAudit):
    """PAS holding the CT and MR sets and two patients of two issuers sharing a PatientID,
    and five move destinations: one that stores everything, one that refuses CT, one whose
    disk fills up, one that rejects every association, one that records the Move
    Originator of what it stores."""

    def __init__(self, root: Path):
        profile = root / "mr-only.cfg"
        root.mkdir(parents=True, exist_ok=True)
        profile.write_text(MR_ONLY_PROFILE)
        self.issuers = _patients_sharing_an_id(root / "issuers")
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self.scp = started(stack, StoreSCP(root / "scp"))
            self.mr_only = started(stack, StoreSCP(root / "mr-only", ae_title="MRONLY"),
                                   ["-xf", str(profile), "MROnly"])
            self.full = started(stack, StoreSCP(root / "full", ae_title="FULLDISK",
                                                disk_kb=SMALL_DISK_KB))
            self.refusing = started(stack, StoreSCP(root / "refusing", ae_title="REFUSING"),
                                    ["--refuse"])
            self.scps = (self.scp, self.mr_only, self.full, self.refusing)
            self.origins = started(stack, OriginRecorder())
            destinations = ", ".join(
                f'{{title = "{scp.ae_title}", host = "127.0.0.1", port = {scp.port}}}'
                for scp in (*self.scps, self.origins))
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                "PAS_SERVING__MOVE_DESTINATIONS": f"[{destinations}]",
            }))
            for folder in (CT_DIR, MR_DIR, root / "issuers"):
                storescu(folder, self.pas.port)
            stack.pop_all()  # set up: stop() stops them from now on

    def stop(self) -> None:
        self.pas.stop()
        for scp in self.scps:
            scp.stop()
        self.origins.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("retrieve-audit"))
    try:
        yield site
    finally:
        site.stop()


def _uids(paths: list[Path], keyword: str) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).get(keyword)) for p in paths]


def _ct_study() -> tuple[str, list[str]]:
    """A CT study of 3 instances: its UID and its SOP Instance UIDs."""
    files = sorted(CT_DIR.glob("A002304_*.dcm"))
    study = _uids(files[:1], "StudyInstanceUID")[0]
    same = [p for p in files if _uids([p], "StudyInstanceUID")[0] == study]
    return study, _uids(same, "SOPInstanceUID")


def _mr_images(count: int) -> list[str]:
    return _uids(sorted(MR_DIR.glob("*.dcm"))[:count], "SOPInstanceUID")


def _mr_study() -> str:
    return _uids(sorted(MR_DIR.glob("*.dcm"))[:1], "StudyInstanceUID")[0]


def _received(files: list[Path]) -> set[str]:
    return set(_uids(files, "SOPInstanceUID"))


def movescu(site: Site, keys: list[str], destination: str,
            *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["movescu", "-d", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem", destination,
            *extra]
    for key in keys:
        args += ["-k", key]
    return subprocess.run([*args, "127.0.0.1", str(site.pas.port)], env=DCMTK_ENV,
                          capture_output=True, text=True, timeout=120)


def final_counts(stderr: str, kind: str) -> dict[str, int]:
    """The sub-operation counts of the final C-MOVE/C-GET response, as DCMTK printed them
    (-d): what pynetdicom told the viewer."""
    marker = {"Move": "Received Final Move Response",
              "Get": "Final status report from last C-GET message"}[kind]
    final = stderr.split(marker)
    assert len(final) == 2, stderr[-3000:]
    counts = {}
    for name in ("Completed", "Failed", "Warning"):
        found = re.search(rf"{name} Suboperations\s*:\s*(\d+)", final[1])
        counts[name.lower()] = int(found.group(1)) if found else 0
    return counts


def test_move_to_a_destination_refusing_a_sop_class_audits_the_failed_ones(
        site: Site) -> None:
    """10 images, 3 CT the destination has no presentation context for: was "success, 10
    instances"."""
    _, ct = _ct_study()
    mr = _mr_images(7)
    before = len(site.retrieves())
    result = movescu(site, ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID=" + "\\".join(ct + mr)],
                     "MRONLY")
    row = site.next_retrieve(before)
    assert row["outcome"] == ("failure: 3 of 10 instances not stored by MRONLY (no "
                              "presentation context accepted for CT Image Storage)")
    assert row["detail"] == "C-MOVE to MRONLY: 7 completed, 3 failed, 0 warning"
    assert row["actor"] == "VIEWER"
    assert _received(site.mr_only.files()) == set(mr)
    assert final_counts(result.stderr, "Move") == {"completed": 7, "failed": 3, "warning": 0}


def test_move_of_a_study_the_destination_refuses_entirely_names_the_refusal(
        site: Site) -> None:
    """Every context rejected: pynetdicom aborts the sub-association and answers 0xA801, as
    for a destination that is down; PAS answers every sub-operation failed (0xA702,
    tests/test_serving_move_not_up.py) and the audit row says why."""
    study, _ = _ct_study()
    before = len(site.retrieves())
    result = movescu(site, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"], "MRONLY")
    row = site.next_retrieve(before)
    assert row["outcome"] == ("failure: 3 of 3 instances not stored by MRONLY (no "
                              "presentation context accepted for CT Image Storage)")
    assert row["detail"] == "C-MOVE to MRONLY: 0 completed, 3 failed, 0 warning"
    assert final_counts(result.stderr, "Move") == {"completed": 0, "failed": 3, "warning": 0}
    assert not _received(site.mr_only.files()) & set(_ct_study()[1])


def test_move_to_a_destination_rejecting_the_association_says_so(site: Site) -> None:
    """storescp --refuse answers A-ASSOCIATE-RJ and closes the connection at once. Under
    load, PAS's DICOM layer (pynetdicom) can see the connection closed before it reads the
    rejection, and then the truth it has is "closed while negotiating": up to three
    moves, each row one of the two, and a rejection named at least once."""
    study, _ = _ct_study()
    where = f"no association with 127.0.0.1:{site.refusing.port}: "
    rejected = f"{where}the destination rejected the association: no reason given)"
    for _attempt in range(3):
        before = len(site.retrieves())
        result = movescu(site, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"],
                         "REFUSING")
        assert "Refused: OutOfResourcesSubOperations" in result.stderr, result.stderr[-2000:]
        row = site.next_retrieve(before)
        assert row["outcome"].startswith("failure: 3 of 3 instances not stored by REFUSING (")
        assert row["outcome"].endswith((rejected, f"{where}closed while negotiating the "
                                                  "association)")), row["outcome"]
        if row["outcome"].endswith(rejected):
            break
    assert row["outcome"].endswith(rejected), row["outcome"]
    assert row["detail"] == "C-MOVE to REFUSING: 0 completed, 3 failed, 0 warning"
    # The journal says it too (pynetdicom's own connect errors are not logged: logs.py).
    assert re.search(r" WARNING .*retrieve by \S+: failure: 3 of 3 instances not stored by "
                     r"REFUSING \(no association with 127\.0\.0\.1:\d+: the destination "
                     r"rejected the association: no reason given\); C-MOVE to REFUSING: 0 "
                     r"completed, 3 failed",
                     site.pas.log()), site.pas.log()[-2000:]


def test_move_to_a_full_disk_audits_what_was_stored(site: Site) -> None:
    """storescp answers 0xA700 once its 1 MiB disk is full: was "success, 20 instances"."""
    mr = _mr_images(20)
    before = len(site.retrieves())
    result = movescu(site, ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID=" + "\\".join(mr)],
                     "FULLDISK")
    row = site.next_retrieve(before)
    stored = _received(site.full.files())
    assert stored <= set(mr) and 0 < len(stored) < 20, len(stored)
    failed = 20 - len(stored)
    assert row["outcome"] == (f"failure: {failed} of 20 instances not stored by FULLDISK "
                              "(0xA700 out of resources)")
    assert row["detail"] == f"C-MOVE to FULLDISK: {len(stored)} completed, {failed} failed, " \
                            "0 warning"
    assert final_counts(result.stderr, "Move") == {
        "completed": len(stored), "failed": failed, "warning": 0}


def test_move_of_a_study_audits_its_completed_count(site: Site) -> None:
    study, sops = _ct_study()
    for old in site.scp.files():
        old.unlink()
    before = len(site.retrieves())
    result = movescu(site, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"],
                     "STORESCP")
    row = site.next_retrieve(before)
    assert row["outcome"] == "success"
    assert row["detail"] == "C-MOVE to STORESCP: 3 completed, 0 failed, 0 warning"
    assert study in row["target"]
    assert _received(site.scp.files()) == set(sops)
    assert final_counts(result.stderr, "Move") == {"completed": 3, "failed": 0, "warning": 0}


def test_a_patient_level_move_s_row_names_the_studies_it_sent(site: Site) -> None:
    """A patient-level C-MOVE's row had ``PATIENT PatientID=X`` as its target: no ``pas audit
    --study`` found it, and its ATNA Study object was that text labelled a Study Instance
    UID. Its target is now the studies it sent, their patient looked up from them."""
    study, sops = _ct_study()
    for old in site.scp.files():
        old.unlink()
    before = len(site.retrieves())
    movescu(site, ["QueryRetrieveLevel=PATIENT", "PatientID=A002304"], "STORESCP", "-P")
    row = site.next_retrieve(before)
    sent = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)
            for p in site.scp.files()}
    assert study in sent and row["outcome"] == "success", row
    assert set(row["target"].split(",")) == sent, row
    assert row["patient"] == "A002304", row
    found = json.loads(site.pas.cli("audit", "--study", study, "--event", "retrieve",
                                    "--json").stdout)
    assert row["id"] in [r["id"] for r in found]


def test_move_matching_nothing_is_a_success_of_nothing(site: Site) -> None:
    """pynetdicom answers a retrieve of 0 instances itself and never resumes the handler:
    this was audited "did not complete (destination unreachable...)"."""
    before = len(site.retrieves())
    movescu(site, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.826.0.1.3680043.9.7"],
            "STORESCP")
    row = site.next_retrieve(before)
    assert row["outcome"] == "success"
    assert row["detail"] == "C-MOVE to STORESCP: 0 completed, 0 failed, 0 warning"


def test_cancelled_move_is_audited_as_cancelled_with_what_was_stored(site: Site) -> None:
    """movescu cancels after the first Pending response of a 520-image move: was audited
    "did not complete (destination unreachable or association lost)"."""
    for old in site.scp.files():
        old.unlink()
    before = len(site.retrieves())
    result = movescu(site, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={_mr_study()}"],
                     "STORESCP", "--cancel", "1")
    row = site.next_retrieve(before)
    assert row["outcome"] == "cancelled", (row, result.stderr[-2000:])
    found = re.fullmatch(r"C-MOVE to STORESCP: (\d+) completed, 0 failed, 0 warning, "
                         r"(\d+) not sent", row["detail"])
    assert found, row["detail"]
    completed, not_sent = int(found.group(1)), int(found.group(2))
    assert completed + not_sent == 520 and not_sent > 0
    assert len(site.scp.files()) == completed


def getscu(site: Site, keys: list[str], out: Path, disk_kb: int | None = None,
           model: str = "-S") -> subprocess.CompletedProcess[str]:
    """getscu storing into ``out``; with ``disk_kb`` it writes to a tmpfs of that size,
    whose files are copied to ``out`` once it has ended. ``model``: -S (Study Root) or -P."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-d", model, "-aet", "VIEWER", "-aec", "PAS"]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(site.pas.port)]
    if disk_kb is None:
        argv = [*args, "-od", str(out)]
    else:
        disk = out.parent / f"{out.name}-disk"
        disk.mkdir()
        keep = 'getscu "$@"; rc=$?; cp -a "$DISK"/. "$KEEP"/; exit $rc'
        argv = on_small_disk(disk, disk_kb, ["sh", "-c", keep, "getscu", *args[1:],
                                             "-od", str(disk)])
        return subprocess.run(argv, env={**DCMTK_ENV, "DISK": str(disk), "KEEP": str(out)},
                              capture_output=True, text=True, timeout=120)
    return subprocess.run(argv, env=DCMTK_ENV, capture_output=True, text=True, timeout=120)


def test_get_of_a_study_audits_its_completed_count(site: Site, tmp_path: Path) -> None:
    before = len(site.retrieves())
    result = getscu(site, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={_mr_study()}"],
                    tmp_path / "get")
    row = site.next_retrieve(before)
    assert row["outcome"] == "success"
    assert row["detail"] == "C-GET: 520 completed, 0 failed, 0 warning"
    assert len(_received(sorted(p for p in (tmp_path / "get").iterdir()))) == 520
    assert final_counts(result.stderr, "Get") == {"completed": 520, "failed": 0, "warning": 0}


def test_get_into_a_full_disk_audits_what_the_viewer_stored(site: Site,
                                                            tmp_path: Path) -> None:
    """getscu answers 0xC000 for the first image its full disk cannot take, then stops the
    C-GET (it releases while PAS is sending the next): was "failure: C-GET did not complete"
    with no count at all, and that row came only at the next garbage collection."""
    mr = _mr_images(20)
    before = len(site.retrieves())
    result = getscu(site, ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID=" + "\\".join(mr)],
                    tmp_path / "get-full", disk_kb=SMALL_DISK_KB)
    assert "cannot write DICOM file" in result.stderr, result.stderr[-2000:]
    row = site.next_retrieve(before)
    stored = _received(sorted(p for p in (tmp_path / "get-full").iterdir()))
    assert stored <= set(mr) and 0 < len(stored) < 20, (len(stored), result.stderr[-2000:])
    assert row["outcome"] == (f"failure: C-GET did not complete (association lost); "
                              f"{20 - len(stored)} of 20 instances not stored by VIEWER "
                              "(0xC000 cannot understand)")
    found = re.fullmatch(rf"C-GET: {len(stored)} completed, (\d+) failed, 0 warning, "
                         r"(\d+) not sent", row["detail"])
    assert found, row["detail"]
    assert int(found.group(1)) >= 1 and int(found.group(1)) + int(found.group(2)) == \
        20 - len(stored)


def test_get_without_role_selection_names_it(site: Site) -> None:
    """A viewer (pynetdicom as the SCU: getscu always sends SCP/SCU Role Selection) that
    proposes MR Image Storage without taking the SCP role cannot be sent MR images (PS3.7
    D.3.3.4): those count as failed, the CT image whose role it took is stored, and the row
    names the missing role selection (it said "no presentation context accepted for MR Image
    Storage" for a context the viewer had proposed and PAS had accepted)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        MRImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    mr, ct = _mr_images(2), _ct_study()[1][:1]
    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="VIEWER")
    for context in (StudyRootQueryRetrieveInformationModelGet, CTImageStorage, MRImageStorage):
        ae.add_requested_context(context)
    before = len(site.retrieves())
    assoc = ae.associate("127.0.0.1", site.pas.port, ae_title="PAS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.SOPInstanceUID = [*ct, *mr]
        responses = [status for status, _ in assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet) if status]
    finally:
        assoc.release()
    final = responses[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations,
            final.NumberOfFailedSuboperations) == (0xB000, 1, 2)
    assert stored == ct
    row = site.next_retrieve(before)
    assert row["outcome"] == ("failure: 2 of 3 instances not stored by VIEWER (MR Image "
                              "Storage proposed without SCP/SCU Role Selection: the viewer "
                              "did not take the SCP role)")
    assert row["detail"] == "C-GET: 1 completed, 2 failed, 0 warning"


def _final_status(result: subprocess.CompletedProcess[str]) -> tuple[str, str | None]:
    """(the final C-MOVE/C-GET response's status, its Error Comment or None) as DCMTK's -d
    dump prints them."""
    log = result.stdout + result.stderr
    statuses = re.findall(r"DIMSE Status\s*: (0x[0-9a-f]{4})", log)
    assert statuses, log[-3000:]
    final = log[log.rindex("DIMSE Status"):]
    comment = re.search(r"\(0000,0902\) LO \[(.*)\]\s+#", final)
    return statuses[-1], comment.group(1) if comment else None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_a_patient_level_retrieve_with_an_issuer_sends_that_patient_only(
        site: Site, tmp_path: Path) -> None:
    """PatientID 123456 is MARTIN^PAUL at HOSP_A and DURAND^MARIE at HOSP_B: a patient-level
    C-GET or C-MOVE that gives IssuerOfPatientID sends that patient's instances and none of
    the other's (both were sent). A PatientID no other issuer shares needs no issuer."""
    for issuer, other in (("HOSP_A", "HOSP_B"), ("HOSP_B", "HOSP_A")):
        keys = ["QueryRetrieveLevel=PATIENT", f"PatientID={SHARED_PATIENT_ID}",
                f"IssuerOfPatientID={issuer}"]
        before = len(site.retrieves())
        result = getscu(site, keys, tmp_path / f"get-{issuer}", model="-P")
        assert _final_status(result) == ("0x0000", None), result.stderr[-2000:]
        assert sorted(_received(_files(tmp_path / f"get-{issuer}"))) == site.issuers[issuer]
        row = site.next_retrieve(before)
        assert (row["outcome"], row["detail"]) == (
            "success", "C-GET: 2 completed, 0 failed, 0 warning"), row

        site.origins.taken()
        before = len(site.retrieves())
        result = movescu(site, keys, site.origins.ae_title, "-P")
        assert _final_status(result) == ("0x0000", None), result.stderr[-2000:]
        moved = sorted(uid for uid, _, _ in site.origins.taken())
        assert moved == site.issuers[issuer] and not set(moved) & set(site.issuers[other])
        assert site.next_retrieve(before)["outcome"] == "success"

    # No collision: PatientID alone, as before.
    ct_patient = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in CT_DIR.glob("A002304_*.dcm")}
    result = getscu(site, ["QueryRetrieveLevel=PATIENT", "PatientID=A002304"],
                    tmp_path / "get-alone", model="-P")
    assert _final_status(result) == ("0x0000", None), result.stderr[-2000:]
    assert _received(_files(tmp_path / "get-alone")) == ct_patient


def test_a_patient_level_retrieve_of_a_patient_id_two_issuers_share_is_refused(
        site: Site, tmp_path: Path) -> None:
    """Without IssuerOfPatientID, PatientID 123456 names two patients here: the C-GET and
    the C-MOVE are refused before any sub-operation (0xA900, the identifier does not name
    one patient: PAS's other identifier refusals), the Error Comment says why and what to
    give, nothing is sent, and the audit row keeps the whole reason."""
    reason = (f"PatientID {SHARED_PATIENT_ID} names 2 patients: give IssuerOfPatientID "
              "(issuers HOSP_A, HOSP_B)")
    keys = ["QueryRetrieveLevel=PATIENT", f"PatientID={SHARED_PATIENT_ID}"]
    before = len(site.retrieves())
    result = getscu(site, keys, tmp_path / "get", model="-P")
    status, comment = _final_status(result)
    assert status == "0xa900", result.stderr[-2000:]
    assert comment is not None and reason.startswith(comment.removesuffix("...")), comment
    assert _files(tmp_path / "get") == []
    row = site.next_retrieve(before)
    assert row["outcome"] == f"failure: {reason}", row

    site.origins.taken()
    before = len(site.retrieves())
    result = movescu(site, keys, site.origins.ae_title, "-P")
    assert _final_status(result)[0] == "0xa900", result.stderr[-2000:]
    assert site.origins.taken() == []
    assert site.next_retrieve(before)["outcome"] == f"failure: {reason}"


def test_a_move_s_sub_operations_name_the_viewer_as_move_originator(site: Site) -> None:
    """PS3.7 9.1.1.1: each C-STORE sub-operation of a C-MOVE names the AE that asked for the
    C-MOVE (movescu -aet VIEWER) and that request's Message ID; pynetdicom named PAS."""
    site.origins.taken()
    keys = ["QueryRetrieveLevel=PATIENT", f"PatientID={SHARED_PATIENT_ID}",
            "IssuerOfPatientID=HOSP_A"]
    result = movescu(site, keys, site.origins.ae_title, "-P")
    assert _final_status(result) == ("0x0000", None), result.stderr[-2000:]
    log = result.stdout + result.stderr
    request = log[log.index("C-MOVE RQ"):]
    message_id = int(re.search(r"Message ID\s*:\s*(\d+)", request).group(1))  # type: ignore[union-attr]
    stores = site.origins.taken()
    assert sorted(uid for uid, _, _ in stores) == site.issuers["HOSP_A"]
    assert {(title, originator_id) for _, title, originator_id in stores} == {
        ("VIEWER", message_id)}

    # Another viewer, whose C-MOVE has another Message ID (pynetdicom as the SCU).
    ae = AE(ae_title="WARD3")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", site.pas.port, ae_title="PAS")
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "PATIENT"
        identifier.PatientID, identifier.IssuerOfPatientID = SHARED_PATIENT_ID, "HOSP_B"
        final = [status for status, _ in assoc.send_c_move(
            identifier, site.origins.ae_title, PatientRootQueryRetrieveInformationModelMove,
            msg_id=4321) if status][-1]
    finally:
        assoc.release()
    assert final.Status == 0x0000
    stores = site.origins.taken()
    assert sorted(uid for uid, _, _ in stores) == site.issuers["HOSP_B"]
    assert {(title, originator_id) for _, title, originator_id in stores} == {("WARD3", 4321)}
