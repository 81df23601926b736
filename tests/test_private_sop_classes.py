"""Private storage SOP classes (``dicom.extra_storage_sop_classes``, docs/ingest.md "Private
SOP classes"): a Siemens CSA Non-Image object is taken, stored bit-exact, indexed, forwarded,
uplinked and served back like any image of its study; a private class not configured is still
refused, and PAS's log names it and the key that would accept it.

Found (2026-12-04): PAS accepted only the storage SOP classes pynetdicom knows, so the
presentation context of a Siemens MR's CSA Non-Image objects (1.3.12.2.1107.5.9.1) was
rejected (abstract syntax not supported) whatever the configuration said, with no line on
PAS's side; the modality logged failures and the study reached the region incomplete.

The modality is DCMTK's storescu with an association profile (``-xf``): with ``-R`` it refuses
to propose a SOP class it does not know ("unknown storage SOP class in file"), with a profile
it proposes any UID. The C-GET viewer is pynetdicom: getscu proposes only DCMTK's own list of
storage classes (it has no profile option), so it cannot ask for a private one with the SCP
role; storescp ``-pm`` (promiscuous) is the C-MOVE destination and the hospital PACS that
accepts private classes, storescp without it the one that does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from tests.support.archived import orthanc_hashes
from tests.support.cleanup import started
from tests.support.hub import HubProcess
from tests.support.peers import (
    DCMTK_ENV,
    MR_DIR,
    Orthanc,
    PasProcess,
    StoreSCP,
    read_rows,
    storescu,
    wait_for,
)
from tests.test_config import check
from tests.test_ingest import dataset_part, index_rows
from tests.test_routing import jobs_of
from tests.test_uplink_hub import (
    FEW_FILES_STABLE,
    enrolled_pas,
    stored_hashes,
    wait_jobs_finished,
)

pytestmark = pytest.mark.root

CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"          # Siemens CSA Non-Image Storage
PHILIPS_SPECTRUM = "1.3.46.670589.11.0.0.12.1"  # Philips Private MR Spectrum Storage
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
KEY = "dicom.extra_storage_sop_classes"
# The real MR set: its first file becomes the CSA object (same study, series, instance UID),
# the next three stay MR images of that study.
CSA_SOURCE, MR_IMAGES = sorted(MR_DIR.glob("*.dcm"))[0], sorted(MR_DIR.glob("*.dcm"))[1:4]


def private_copy(source: Path, sop_class: str, out: Path) -> Path:
    """``source`` with its SOP Class (and the file meta's) changed to ``sop_class``: nothing
    else, pixel data included, as a modality's private object of that study would be."""
    ds = dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def modality_profile(folder: Path) -> list[str]:
    """storescu's arguments proposing the private classes and MR Image Storage, as a Siemens
    or Philips MR does (PAS must decide, not storescu's own list)."""
    path = folder / "modality.cfg"
    path.write_text(textwrap.dedent(f"""
        [[TransferSyntaxes]]
        [Uncompressed]
        TransferSyntax1 = LittleEndianExplicit
        TransferSyntax2 = LittleEndianImplicit
        [[PresentationContexts]]
        [Scanner]
        PresentationContext1 = {CSA_NON_IMAGE}\\Uncompressed
        PresentationContext2 = {PHILIPS_SPECTRUM}\\Uncompressed
        PresentationContext3 = MRImageStorage\\Uncompressed
        [[Profiles]]
        [Scanner]
        PresentationContexts = Scanner
        """))
    return ["-xf", str(path), "Scanner"]


def send_study(pas: PasProcess, folder: Path) -> dict[str, bytes]:
    """The CSA object and three MR images of one study, sent as the scanner does; SOP
    Instance UID -> the dataset bytes sent."""
    csa = private_copy(CSA_SOURCE, CSA_NON_IMAGE, folder / "study" / "csa.dcm")
    files = [csa, *MR_IMAGES]
    result = storescu(files, pas.port, extra=modality_profile(folder), check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_part(p)
            for p in files}


def spool_datasets(pas: PasProcess) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID -> (SOP Class UID, dataset bytes) of what PAS stored."""
    return {r["sop_instance_uid"]: (r["sop_class_uid"],
                                    dataset_part(pas.home / "spool" / r["path"]))
            for r in index_rows(pas.home)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_csa_non_image_is_taken_by_default_and_an_unlisted_class_refused_naming_the_key(
        pas_factory: Any, tmp_path: Path) -> None:
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false"})
    sent = send_study(pas, tmp_path)
    stored = spool_datasets(pas)
    assert set(stored) == set(sent)
    csa_uid = str(dcmread(CSA_SOURCE, stop_before_pixels=True).SOPInstanceUID)
    assert stored[csa_uid][0] == CSA_NON_IMAGE
    for uid, dataset in sent.items():
        assert sha(stored[uid][1]) == sha(dataset), uid  # the dataset as sent, bit for bit
    [row] = [r for r in index_rows(pas.home) if r["sop_instance_uid"] == csa_uid]
    assert row["sha256"] == sha((pas.home / "spool" / row["path"]).read_bytes())

    philips = private_copy(MR_IMAGES[0], PHILIPS_SPECTRUM, tmp_path / "philips" / "p.dcm")
    refused = storescu(philips, pas.port, extra=modality_profile(tmp_path), check=False)
    assert refused.returncode != 0
    assert f"No presentation context for: (unknown SOP class) {PHILIPS_SPECTRUM}" \
        in refused.stderr
    assert len(index_rows(pas.home)) == 4  # nothing more stored
    lines = [line for line in pas.log().splitlines() if PHILIPS_SPECTRUM in line]
    assert lines and all(CSA_NON_IMAGE not in line for line in lines), lines
    assert (f"presentation context for SOP class {PHILIPS_SPECTRUM} from STORESCU "
            f"(127.0.0.1) refused: not a storage SOP class PAS takes; to accept it, add "
            f'"{PHILIPS_SPECTRUM}" to {KEY}') in lines[0]
    # Said once for this modality and class, not at every association.
    storescu(MR_IMAGES[:1], pas.port, extra=modality_profile(tmp_path))
    assert len([line for line in pas.log().splitlines()
                if f"presentation context for SOP class {PHILIPS_SPECTRUM}" in line]) == 1
    # The association's store row says its class was refused: it said "success (1 instance
    # stored, 0 refused)", the modality unable to send that class at all.
    def last_store() -> Any:
        rows = read_rows(pas.home / "pas.sqlite", "SELECT outcome, detail FROM audit "
                         "WHERE event = 'store' ORDER BY id DESC LIMIT 1")
        return rows[0] if rows and PHILIPS_SPECTRUM in (rows[0]["detail"] or "") else None

    row = wait_for(last_store, 10, what="the association's store row")
    assert row["outcome"] == "failure: 1 SOP class refused", dict(row)
    assert (f"presentation contexts refused for 1 SOP class ({PHILIPS_SPECTRUM}): the log "
            "says why") in row["detail"], dict(row)
    # A viewer's C-GET proposes DCMTK's whole storage list in the SCP role only (retired
    # print and standalone classes PAS does not take among them): it will send none of them,
    # so nothing is said about it.
    get = subprocess.run(["getscu", "-aet", "GETSCU", "-aec", "PAS", "-k",
                          "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3",
                          "-od", str(tmp_path), "127.0.0.1", str(pas.port)],
                         env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert get.returncode == 0, get.stderr[-2000:]
    assert wait_for(lambda: "audit retrieve by GETSCU" in pas.log(), 10, what="the C-GET")
    assert "from GETSCU" not in pas.log()


@pytest.mark.parametrize("direct_receive", ["true", "false"])
def test_a_configured_private_class_is_stored_on_either_receive_path(
        pas_factory: Any, tmp_path: Path, direct_receive: str) -> None:
    """dicom.direct_receive: the C-STORE taken off the socket, or by pynetdicom."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
                       "PAS_DICOM__DIRECT_RECEIVE": direct_receive,
                       "PAS_DICOM__EXTRA_STORAGE_SOP_CLASSES": f'["{PHILIPS_SPECTRUM}"]'})
    philips = private_copy(MR_IMAGES[0], PHILIPS_SPECTRUM, tmp_path / "philips" / "p.dcm")
    storescu(philips, pas.port, extra=modality_profile(tmp_path))
    [(sop_class, dataset)] = spool_datasets(pas).values()
    assert (sop_class, sha(dataset)) == (PHILIPS_SPECTRUM, sha(dataset_part(philips)))
    # The list replaces the default: CSA Non-Image is not listed here, so it is refused.
    csa = private_copy(CSA_SOURCE, CSA_NON_IMAGE, tmp_path / "csa" / "csa.dcm")
    assert storescu(csa, pas.port, extra=modality_profile(tmp_path), check=False).returncode
    assert f'add "{CSA_NON_IMAGE}" to {KEY}' in pas.log()


def test_the_refusal_line_is_said_again_after_its_interval_and_its_memory_is_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    from appliance.ingest.policy import RefusedSopClassLog

    said = RefusedSopClassLog(every_s=3600)
    for _ in range(3):
        said.refused("MR2", "10.1.2.7", {PHILIPS_SPECTRUM})
    assert len(caplog.records) == 1
    said.every_s = 0  # the hour has passed
    said.refused("MR2", "10.1.2.7", {PHILIPS_SPECTRUM})
    assert caplog.records[-1].getMessage().endswith(
        f"to {KEY}; refused 2 more times since it was last said")
    said.every_s = 3600
    for number in range(said.MAX_REMEMBERED + 10):  # any AE, any UID: accept_unknown
        said.refused(f"AE{number}", "10.1.2.8", {f"1.2.3.{number}"})
    assert len(said._last) <= said.MAX_REMEMBERED


def test_config_check_names_each_bad_uid_and_its_place(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(textwrap.dedent(f"""
        [dicom]
        extra_storage_sop_classes = ["{CSA_NON_IMAGE}", "1.2.04", "1.2.840.10008.1.1",
                                     "1.3.12.2.1107.5.9.1 "]
        """))
    result = check(config)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"{KEY}.1: is not a UID" in out and "got '1.2.04'" in out
    assert f"{KEY}.2: is the standard UID of Verification SOP Class" in out
    assert f"{KEY}.0" not in out and f"{KEY}.3" not in out  # surrounding spaces are not wrong


# --- served back, forwarded, uplinked ----------------------------------------------------


class Site:
    """PAS holding the study, a C-MOVE destination and two hospital PACS: one that accepts
    private classes (storescp -pm) and one that does not."""

    def __init__(self, root: Path):
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self.move_scp = started(stack, StoreSCP(root / "move", ae_title="VIEWERSCP"),
                                    ["-pm"])
            self.pacs = started(stack, StoreSCP(root / "pacs", ae_title="PACS"), ["-pm"])
            self.strict = started(stack, StoreSCP(root / "strict", ae_title="STRICT"))
            config = root / "appliance.toml"
            config.write_text(textwrap.dedent(f"""
                [queue]
                max_attempts = 2
                backoff_initial_s = 0.2
                backoff_max_s = 0.5
                [routing.fallback]
                destinations = ["pacs", "strict"]
                [destinations.pacs]
                kind = "dicom"
                ae_title = "PACS"
                host = "127.0.0.1"
                port = {self.pacs.port}
                [destinations.strict]
                kind = "dicom"
                ae_title = "STRICT"
                host = "127.0.0.1"
                port = {self.strict.port}
                [[serving.move_destinations]]
                title = "VIEWERSCP"
                host = "127.0.0.1"
                port = {self.move_scp.port}
                """))
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                "PAS_PREFETCH__ENABLED": "false"}))
            self.sent = send_study(self.pas, root)
            self.stored = spool_datasets(self.pas)
            stack.pop_all()  # set up: stop() stops them from now on
        self.study = str(dcmread(CSA_SOURCE, stop_before_pixels=True).StudyInstanceUID)

    def stop(self) -> None:
        self.pas.stop()
        for scp in (self.move_scp, self.pacs, self.strict):
            scp.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("private"))
    try:
        yield site
    finally:
        site.stop()


def received(files: list[Path]) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (SOP Class UID, SHA-256 of the dataset) of the files a peer got."""
    out = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = (str(ds.SOPClassUID), sha(dataset_part(path)))
    return out


def expected(site: Site) -> dict[str, tuple[str, str]]:
    return {uid: (sop_class, sha(dataset)) for uid, (sop_class, dataset) in site.stored.items()}


def test_forwarded_to_a_pacs_that_takes_it_and_named_by_one_that_does_not(site: Site) -> None:
    wait_for(lambda: len(jobs_of(site.pas.home)) == 2 and all(
        j["state"] in ("done", "failed") for j in jobs_of(site.pas.home)), 60,
        what="both forwarding jobs finished")
    jobs = {j["destination"]: j for j in jobs_of(site.pas.home)}
    assert jobs["pacs"]["state"] == "done", jobs["pacs"]["last_error"]
    assert received(site.pacs.files()) == expected(site)  # all four, bit-exact
    strict = jobs["strict"]
    assert (strict["state"], strict["attempts"]) == ("failed", 1)  # permanent, not retried
    assert (f"STRICT@127.0.0.1:{site.strict.port} accepted no presentation context for "
            f"SOP class {CSA_NON_IMAGE}, proposed in ") in strict["last_error"]
    assert "; 1 instance not sent" in strict["last_error"]
    assert {uid for uid, (c, _) in received(site.strict.files()).items()} == {
        uid for uid, (c, _) in expected(site).items() if c == MR_IMAGE}  # the images went


def test_c_move_sends_the_private_object_bit_exact(site: Site) -> None:
    for old in site.move_scp.files():
        old.unlink()
    result = subprocess.run(
        ["movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem", "VIEWERSCP",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={site.study}",
         "127.0.0.1", str(site.pas.port)], env=DCMTK_ENV, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Received Final Move Response (Success)" in result.stderr, result.stderr[-2000:]
    got = wait_for(lambda: len(site.move_scp.files()) == 4 and site.move_scp.files(), 30,
                   what="the four instances moved")
    assert received(got) == expected(site)


def test_c_get_sends_the_private_object_bit_exact(site: Site) -> None:
    datasets: dict[str, tuple[str, str]] = {}

    def on_store(event: Any) -> int:
        datasets[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.request.AffectedSOPClassUID), sha(event.request.DataSet.getvalue()))
        return 0x0000

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in (CSA_NON_IMAGE, MR_IMAGE):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", site.pas.port, ae_title="PAS",
                         ext_neg=[build_role(c, scp_role=True) for c in (CSA_NON_IMAGE, MR_IMAGE)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", site.study
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert (final.Status, final.NumberOfCompletedSuboperations,
            final.get("NumberOfFailedSuboperations", 0)) == (0x0000, 4, 0)
    assert datasets == expected(site)


def test_wado_rs_serves_the_stored_file(site: Site) -> None:
    csa = dcmread(CSA_SOURCE, stop_before_pixels=True)
    [row] = [r for r in index_rows(site.pas.home) if r["sop_class_uid"] == CSA_NON_IMAGE]
    url = (f"http://127.0.0.1:{site.pas.http_port}/dicom-web/studies/{site.study}/series/"
           f"{csa.SeriesInstanceUID}/instances/{csa.SOPInstanceUID}")
    response = httpx.get(url, timeout=30, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert response.status_code == 200, response.text[:500]
    assert (site.pas.home / "spool" / row["path"]).read_bytes() in response.content


@pytest.mark.parametrize("archive", ["embedded", "dicomweb"])
def test_uplinked_through_the_hub_into_the_regional_archive_bit_exact(
        pas_factory: Any, tmp_path: Path, archive: str) -> None:
    """The hub's own archive, or a real Orthanc behind it (STOW-RS), as the region."""
    orthanc = Orthanc(tmp_path / "orthanc") if archive == "dicomweb" else None
    regional = HubProcess(tmp_path / "hub", {"PAS_HUB_ARCHIVE__KIND": archive})
    try:
        if orthanc is not None:
            orthanc.start()
            regional.env["PAS_HUB_ARCHIVE__URL"] = orthanc.dicomweb
        regional.init().start()
        # Four instances in one storescu run: the suite's 1 s to be stable, not the 3 s
        # enrolled_pas gives hundreds (a delta job would be awaited and checked the same).
        pas = enrolled_pas(pas_factory, regional, tmp_path / "site", FEW_FILES_STABLE)
        sent = send_study(pas, tmp_path)
        finished = wait_jobs_finished(pas, len(sent), 180)
        assert {j["state"] for j in finished} == {"done"}, [j["last_error"] for j in finished]
        stored = stored_hashes(pas)
        assert set(stored) == set(sent)
        if orthanc is not None:
            assert orthanc_hashes(orthanc) == stored  # downloaded back from the region, hashed
        else:
            archived = {r["sop_instance_uid"]: (r["sha256"], r["path"]) for r in read_rows(
                regional.home / "archive" / "pas.sqlite",
                "SELECT sop_instance_uid, sha256, path FROM instances")}
            assert {uid: sha256 for uid, (sha256, _) in archived.items()} == stored
            for sha256, path in archived.values():
                assert sha((regional.home / "archive" / "spool" / path).read_bytes()) == sha256
        classes = {r["sop_class_uid"] for r in read_rows(
            pas.home / "pas.sqlite", "SELECT sop_class_uid FROM instances")}
        assert classes == {CSA_NON_IMAGE, MR_IMAGE}
        assert pas.status()["confirmed_instances"] == 4
    finally:
        regional.kill()
        if orthanc is not None:
            orthanc.stop()
