"""The access audit of C-MOVE and C-GET says what the destination stored, not what was sent.

Real peers only: DCMTK movescu/getscu as the viewer, DCMTK storescp as the move destination.
The refusals come from the peers themselves: a storescp whose configuration profile accepts MR
Image Storage only (it rejects the CT presentation contexts), and a storescp, or a getscu,
writing to a 1 MiB tmpfs of its own, which answers 0xA700 (out of resources) once full.
Each audit row is checked against the files the destination really holds and against the
counts of the final C-MOVE/C-GET response pynetdicom sends the viewer.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.support.cleanup import started
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    RetrieveAudit,
    StoreSCP,
    on_small_disk,
    storescu,
)
from tests.support.storescp_profiles import one_class_profile

pytestmark = pytest.mark.root  # unshare --mount and a tmpfs: the full disks are real

MR_ONLY_PROFILE = one_class_profile("MROnly", "MRImageStorage")
SMALL_DISK_KB = 1024  # about 11 of the 86 kB MR images


class Site(RetrieveAudit):
    """PAS holding the CT and MR sets, and four move destinations: one that stores
    everything, one that refuses CT, one whose disk fills up, one that rejects every
    association."""

    def __init__(self, root: Path):
        profile = root / "mr-only.cfg"
        root.mkdir(parents=True, exist_ok=True)
        profile.write_text(MR_ONLY_PROFILE)
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self.scp = started(stack, StoreSCP(root / "scp"))
            self.mr_only = started(stack, StoreSCP(root / "mr-only", ae_title="MRONLY"),
                                   ["-xf", str(profile), "MROnly"])
            self.full = started(stack, StoreSCP(root / "full", ae_title="FULLDISK",
                                                disk_kb=SMALL_DISK_KB))
            self.refusing = started(stack, StoreSCP(root / "refusing", ae_title="REFUSING"),
                                    ["--refuse"])
            self.scps = (self.scp, self.mr_only, self.full, self.refusing)
            destinations = ", ".join(
                f'{{title = "{scp.ae_title}", host = "127.0.0.1", port = {scp.port}}}'
                for scp in self.scps)
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                "PAS_SERVING__MOVE_DESTINATIONS": f"[{destinations}]",
            }))
            for folder in (CT_DIR, MR_DIR):
                storescu(folder, self.pas.port)
            stack.pop_all()  # set up: stop() stops them from now on

    def stop(self) -> None:
        self.pas.stop()
        for scp in self.scps:
            scp.stop()


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


def getscu(site: Site, keys: list[str], out: Path,
           disk_kb: int | None = None) -> subprocess.CompletedProcess[str]:
    """getscu storing into ``out``; with ``disk_kb`` it writes to a tmpfs of that size,
    whose files are copied to ``out`` once it has ended."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-d", "-S", "-aet", "VIEWER", "-aec", "PAS"]
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
