"""Presentation context negotiation on the ingest listener (docs/ingest.md, "The way through"
and "Transfer syntaxes"): which transfer syntax PAS takes when a context proposes several,
and what the journal says about a context it refuses.

Found at a go-live walkthrough (a modality field engineer's):

- PAS made modalities decompress lossless images. pynetdicom's acceptor takes the first of
  ITS list that a context proposes, and PAS's list began with Explicit then Implicit VR
  Little Endian. DCMTK's dcmsend proposes one context [JPEG-LS Lossless, Explicit LE,
  Explicit BE, Implicit LE] for a JPEG-LS file: PAS took Explicit LE, dcmsend decompressed,
  and PAS stored 3.2 times the bytes, not the modality's own encoding.
- A context refused because PAS reads none of its transfer syntaxes (JPEG XL, which pydicom
  3.0 does not know) left no line at all; only refused SOP classes were said.
- An association whose every context for a class of images was refused left no store row
  in the audit trail (it was written from the first C-STORE on) and no figure anywhere: a
  modality none of whose images could come was seen only in the journal. A class refused in
  one context and accepted in another was written as refused in the association's row.
- A standard non-storage SOP class (MPPS, worklist, print; Storage Commitment when
  dicom.storage_commitment is off) was said with advice that cannot work: add it to
  dicom.extra_storage_sop_classes, which ``pas config check`` refuses for a standard UID.

The modality is DCMTK (dcmsend, getscu) or pynetdicom, against a real ``pas run``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
)
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.peers import CT_DIR, DCMTK_ENV, PasProcess, read_rows, storescu, wait_for
from tests.test_ingest import dataset_part, index_rows

JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"  # pydicom 3.0 names them, cannot read them
JPEG_XL = "1.2.840.10008.1.2.4.112"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
ONE_CT, OTHER_CT = (CT_DIR / "A002304_axial_19001231-076.dcm",
                    CT_DIR / "A002304_coronal_19001231-076.dcm")  # one study


def accepting(pas_factory: Any, **env: str) -> PasProcess:
    return pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
                        **env})


def negotiate(pas: PasProcess, calling: str, contexts: list[tuple[str, list[str]]]
              ) -> dict[int, tuple[int, str]]:
    """One association proposing ``contexts`` (SOP class, transfer syntaxes), then
    Verification (pynetdicom aborts an association with no context accepted), released at
    once: context ID -> (result, transfer syntax), as the requestor read the A-ASSOCIATE-AC.
    Once released, PAS has handled its EVT_ACCEPTED (it answers the release after)."""
    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(sop_class, syntaxes)
                             for sop_class, syntaxes in contexts] + [build_context(VERIFICATION)]
    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
    assert assoc.is_established
    try:
        return {cx.context_id: (cx.result, str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts + assoc.rejected_contexts}
    finally:
        assoc.release()


def jpeg_ls(source: Path, out: Path) -> Path:
    """``source`` as a modality holding JPEG-LS lossless would have it (DCMTK dcmcjpls)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dcmcjpls", str(source), str(out)], check=True, env=DCMTK_ENV,
                   capture_output=True, timeout=60)
    assert str(dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID) == \
        JPEGLSLossless
    return out


def lines_with(pas: PasProcess, text: str) -> list[str]:
    return [line for line in pas.log().splitlines() if text in line]


def classes_refused(pas: PasProcess) -> dict[str, float]:
    """pas_dicom_image_classes_refused_total by reason, as /metrics says."""
    scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    return {match[1]: float(match[2]) for match in re.finditer(
        r'^pas_dicom_image_classes_refused_total\{reason="([^"]+)"\} (\S+)$', scraped,
        re.MULTILINE)}


def store_rows(pas: PasProcess) -> list[tuple[str, str, str]]:
    """(actor, outcome, detail) of the audit trail's association rows, oldest first."""
    return [(r["actor"], r["outcome"], r["detail"]) for r in read_rows(
        pas.home / "pas.sqlite", "SELECT actor, outcome, detail FROM audit "
        "WHERE event = 'store' ORDER BY id")]


# --- which transfer syntax -----------------------------------------------------------------


def test_dcmsend_of_a_jpeg_ls_file_is_stored_as_the_modality_encoded_it(
        pas_factory: Any, tmp_path: Path) -> None:
    pas = accepting(pas_factory)
    sent = jpeg_ls(ONE_CT, tmp_path / "jls" / "ct.dcm")
    result = subprocess.run(["dcmsend", "-d", "-aet", "CT9", "-aec", "PAS", "127.0.0.1",
                             str(pas.port), str(sent)], env=DCMTK_ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    # What dcmsend really proposes: one context, its file's syntax first, then it would
    # decompress (the case this test is about).
    proposed = re.search(r"Context ID:\s+1 \(Proposed\).*?Proposed Transfer Syntax\(es\):\s*"
                         r"((?:\S+:\s+=\S+\s*)+)", out, re.S)
    assert proposed, out[-3000:]
    assert re.findall(r"=(\S+)", proposed.group(1)) == [
        "JPEGLSLossless", "LittleEndianExplicit", "BigEndianExplicit", "LittleEndianImplicit"]
    assert re.findall(r"Accepted Transfer Syntax: =(\S+)", out) == ["JPEGLSLossless"], \
        re.findall(r"Accepted Transfer Syntax: .*|Converting transfer syntax: .*", out)
    [row] = index_rows(pas.home)
    assert row["transfer_syntax_uid"] == JPEGLSLossless
    stored = pas.home / "spool" / row["path"]
    assert dataset_part(stored) == dataset_part(sent)  # the modality's bytes, bit for bit
    # The compressed size, not the 3.2 times of the decompressed CT.
    assert row["size"] == stored.stat().st_size < ONE_CT.stat().st_size / 2


def test_several_syntaxes_in_one_context_lossless_first_never_lossy_over_uncompressed(
        pas_factory: Any) -> None:
    pas = accepting(pas_factory)
    proposals = [
        ([ExplicitVRLittleEndian, JPEGBaseline8Bit], ExplicitVRLittleEndian),
        ([JPEGBaseline8Bit, JPEG2000, ImplicitVRLittleEndian], ImplicitVRLittleEndian),
        # pynetdicom's own default contexts: Deflated must not win over the uncompressed.
        ([ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
          ExplicitVRBigEndian], ExplicitVRLittleEndian),
        ([JPEGBaseline8Bit, JPEGLSLossless, ImplicitVRLittleEndian], JPEGLSLossless),
        ([ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.70"], "1.2.840.10008.1.2.4.70"),
        ([ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.90", JPEG2000],
         "1.2.840.10008.1.2.4.90"),
        ([ExplicitVRLittleEndian, "1.2.840.10008.1.2.5"], "1.2.840.10008.1.2.5"),
        ([JPEGBaseline8Bit], JPEGBaseline8Bit),  # a lossy syntax alone: taken as it comes
    ]
    results = negotiate(pas, "CT10", [(CTImageStorage, syntaxes) for syntaxes, _ in proposals])
    got = [results[2 * n + 1] for n in range(len(proposals))]  # context IDs 1, 3, 5...
    assert got == [(0x00, expected) for _, expected in proposals]
    # A real C-STORE on the first kind of context: stored uncompressed, not lossy.
    ae = AE(ae_title="CT10")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, JPEGBaseline8Bit])
    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
    try:
        assert assoc.send_c_store(dcmread(ONE_CT)).Status == 0x0000
    finally:
        assoc.release()
    assert [r["transfer_syntax_uid"] for r in index_rows(pas.home)] == [ExplicitVRLittleEndian]


def test_a_c_get_viewer_proposing_lossless_first_still_gets_every_instance(
        pas_factory: Any, tmp_path: Path) -> None:
    """The other side of the order: a C-GET viewer receives on its storage contexts, and
    DCMTK getscu ``+xt`` proposes one context [JPEG-LS Lossless, Explicit LE, ...] per class.
    Taken in the ingest order, JPEG-LS would be accepted and the CT PAS holds uncompressed
    could not be sent; those contexts keep the uncompressed-first order (PAS converts)."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    storescu([ONE_CT], pas.port)
    sent = jpeg_ls(OTHER_CT, tmp_path / "jls" / "other.dcm")
    subprocess.run(["dcmsend", "-aet", "CT11", "-aec", "PAS", "127.0.0.1", str(pas.port),
                    str(sent)], env=DCMTK_ENV, check=True, capture_output=True, timeout=120)
    assert sorted(r["transfer_syntax_uid"] for r in index_rows(pas.home)) == [
        ExplicitVRLittleEndian, JPEGLSLossless]
    study = str(dcmread(ONE_CT, stop_before_pixels=True).StudyInstanceUID)
    assert study == str(dcmread(OTHER_CT, stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "viewer"
    out.mkdir()
    result = subprocess.run(["getscu", "-v", "-S", "+xt", "-aet", "VIEWER", "-aec", "PAS",
                             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                             "-od", str(out), "127.0.0.1", str(pas.port)],
                            env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in out.iterdir())}
    assert set(got) == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                        for p in (ONE_CT, OTHER_CT)}, result.stderr[-3000:]
    for path in (ONE_CT, OTHER_CT):
        ds = got[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
        assert str(ds.file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, dcmread(path).pixel_array)  # lossless


# --- what a refused context leaves in the journal ------------------------------------------


def test_a_context_of_syntaxes_pas_cannot_read_is_said_naming_them_once_an_hour(
        pas_factory: Any) -> None:
    pas = accepting(pas_factory, PAS_HTTP__ENABLED="true")
    results = negotiate(pas, "CT12", [(CT_IMAGE, [JPEG_XL_LOSSLESS, JPEG_XL]),
                                      (CT_IMAGE, [ExplicitVRLittleEndian])])
    assert results[1] == (0x04, JPEG_XL_LOSSLESS)  # transfer syntaxes not supported
    assert results[3] == (0x00, ExplicitVRLittleEndian)
    expected = (f"presentation context for SOP class CT Image Storage ({CT_IMAGE}) from CT12 "
                f"(127.0.0.1) refused: PAS reads none of the transfer syntaxes proposed (JPEG "
                f"XL Lossless ({JPEG_XL_LOSSLESS}), JPEG XL ({JPEG_XL})); the modality must "
                "also propose one PAS reads, e.g. Explicit VR Little Endian")
    [line] = wait_for(lambda: lines_with(pas, expected), 10, what="the refusal line")
    assert " WARNING " in line and line.endswith(expected), line
    # The same proposal again (in the other order too): not said again within the hour.
    negotiate(pas, "CT12", [(CT_IMAGE, [JPEG_XL_LOSSLESS, JPEG_XL])])
    negotiate(pas, "CT12", [(CT_IMAGE, [JPEG_XL, JPEG_XL_LOSSLESS])])
    # Another set of syntaxes, or another calling AE: said.
    negotiate(pas, "CT12", [(CT_IMAGE, [JPEG_XL])])
    negotiate(pas, "CT13", [(CT_IMAGE, [JPEG_XL_LOSSLESS, JPEG_XL])])
    refusals = lines_with(pas, "PAS reads none of the transfer syntaxes proposed")
    assert len(refusals) == 3, refusals
    assert any(f"from CT12 (127.0.0.1) refused: PAS reads none of the transfer syntaxes "
               f"proposed (JPEG XL ({JPEG_XL}));" in line for line in refusals), refusals
    assert any("from CT13 (127.0.0.1)" in line for line in refusals), refusals
    # Counted and written per association that could send no CT image at all: the four
    # after the first (whose CT images had Explicit VR Little Endian).
    refused_row = ("failure: 1 SOP class refused", "0 instances stored, 0 refused; "
                   f"presentation contexts refused for 1 SOP class ({CT_IMAGE}): the log "
                   "says why")
    wait_for(lambda: len(store_rows(pas)) >= 4, 10, what="the four associations' store rows")
    rows = store_rows(pas)
    assert rows == [("CT12", *refused_row)] * 3 + [("CT13", *refused_row)], rows
    assert classes_refused(pas) == {"sop-class": 0.0, "transfer-syntax": 4.0}


def test_the_syntax_refusal_line_counts_its_repeats_and_its_memory_is_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    from appliance.ingest.policy import RefusedTransferSyntaxLog

    said = RefusedTransferSyntaxLog(every_s=3600)
    for _ in range(3):
        said.refused("US4", "10.1.2.9", [(CT_IMAGE, [JPEG_XL_LOSSLESS])])
    assert len(caplog.records) == 1 and caplog.records[0].levelname == "WARNING"
    said.every_s = 0  # the hour has passed
    said.refused("US4", "10.1.2.9", [(CT_IMAGE, [JPEG_XL_LOSSLESS])])
    assert caplog.records[-1].getMessage().endswith(
        "e.g. Explicit VR Little Endian; refused 2 more times since it was last said")
    said.every_s = 3600
    for number in range(said.MAX_REMEMBERED + 10):  # any AE, any UID: accept_unknown
        said.refused(f"AE{number}", "10.1.2.8", [(CT_IMAGE, [f"1.2.3.{number}"])])
    assert len(said._last) <= said.MAX_REMEMBERED
    many = [f"1.2.3.{n}" for n in range(20)]
    said.refused("US5", "10.1.2.9", [(CT_IMAGE, many)])
    assert caplog.records[-1].getMessage().count("1.2.3.") == said.SHOWN
    assert f"and {20 - said.SHOWN} more)" in caplog.records[-1].getMessage()


def test_standard_services_pas_does_not_provide_are_said_with_where_they_belong(
        pas_factory: Any) -> None:
    pas = accepting(pas_factory, PAS_DICOM__STORAGE_COMMITMENT="false",
                    PAS_HTTP__ENABLED="true")
    mpps, worklist = "1.2.840.10008.3.1.2.3.3", "1.2.840.10008.5.1.4.31"
    grayscale_print, commitment = "1.2.840.10008.5.1.1.9", "1.2.840.10008.1.20.1"
    private = "1.3.46.670589.11.0.0.12.1"
    results = negotiate(pas, "CT14", [(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
                                      for uid in (mpps, worklist, grayscale_print, commitment,
                                                  private, CT_IMAGE)])
    assert [results[n][0] for n in sorted(results)] == [0x03] * 5 + [0x00, 0x00]
    head = "presentation context for SOP class {} from CT14 (127.0.0.1) refused: "
    expected = {
        mpps: head.format(f"Modality Performed Procedure Step SOP Class ({mpps})")
        + "PAS does not provide Modality Performed Procedure Step: point the modality's MPPS "
          "at the RIS (or the system that provides it)",
        worklist: head.format(f"Modality Worklist Information Model - FIND ({worklist})")
        + "PAS does not provide Modality Worklist Information Model - FIND: point the "
          "modality's worklist at the RIS (or the system that provides it)",
        grayscale_print: head.format(
            f"Basic Grayscale Print Management Meta SOP Class ({grayscale_print})")
        + "PAS does not provide Basic Grayscale Print Management Meta: point the modality's "
          "printing at the film printer (or the system that provides it)",
        commitment: head.format(f"Storage Commitment Push Model SOP Class ({commitment})")
        + "PAS does not provide Storage Commitment Push Model here: dicom.storage_commitment "
          "is off",
        # A private class keeps the key that would accept it.
        private: head.format(private) + f'not a storage SOP class PAS takes; to accept it, '
                                        f'add "{private}" to dicom.extra_storage_sop_classes',
    }
    for uid, line in expected.items():
        [said] = wait_for(lambda u=uid: lines_with(pas, f"SOP class {u}")
                          or lines_with(pas, f"({u}) from CT14"), 10, what=f"the line of {uid}")
        assert line in said, said
        assert " WARNING " in said
        if uid != private:
            assert "extra_storage_sop_classes" not in said, said
    # Of the five, only the private class is one of images: the association's row and the
    # figure name it alone (the standard services are the journal's, not images refused).
    rows = wait_for(lambda: store_rows(pas), 10, what="the association's store row")
    assert rows == [("CT14", "failure: 1 SOP class refused",
                     "0 instances stored, 0 refused; presentation contexts refused for 1 SOP "
                     f"class ({private}): the log says why")], rows
    assert classes_refused(pas) == {"sop-class": 1.0, "transfer-syntax": 0.0}
