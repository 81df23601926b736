"""DICOM JSON (PS3.18 Annex F) in QIDO-RS answers and WADO-RS metadata, on a real ``pas run``
with a real Orthanc (DICOMweb plugin) holding the same instances as the comparator.

One instance as modalities do send them now and then: a patient name with a trailing
backslash (``ODD^ONE\\``: two values, the second empty), ImageType with an empty value, an IS
and a DS of two values the second empty, a Group Length, and an FD holding a NaN. Before:
its metadata was a 500 ("tuple index out of range"; the NaN alone: "Out of range float
values are not JSON compliant"), and every QIDO-RS search listing it (``/studies``, a
viewer's study list) was a 200 cut mid-answer, every study after it lost. F.2.5: the empty
values are ``null`` (as Orthanc writes them, and its NaN); F.2.2: no Group Length,
attributes in ascending tag order (the Transfer Syntax UID and the BulkDataURIs came last).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from appliance.prefetch.rules import candidate_from_qido
from appliance.serving.fetch import _keywords
from tests.support.peers import CT_DIR, Orthanc, PasProcess
from tests.test_serving_qr import dcmtk

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
# Held as they are by both: a multi-frame Enhanced MR (explicit VR), a multi-frame RT Dose
# (implicit VR: its Rows are read without a VR) and a structured report (no image at all).
AS_THEY_ARE = [Path(get_testdata_file(name))  # type: ignore[arg-type]
               for name in ("emri_small.dcm", "rtdose.dcm", "test-SR.dcm")]
IMAGE_TAGS = {"00280010": "Rows", "00280011": "Columns", "00280100": "BitsAllocated",
              "00280008": "NumberOfFrames"}
BOUNDARY = "json-boundary"
# Values as the file holds them (explicit VR, even length), each with an empty value.
ODD_VALUES = [(0x00080008, "CS", b"ORIGINAL\\\\AXIAL "), (0x00100010, "PN", b"ODD^ONE\\ "),
              (0x00200013, "IS", b"1\\ "), (0x00280030, "DS", b"0.5\\ "),
              (0x00200000, "UL", b"\x00\x00\x00\x00")]


def _odd_instance() -> tuple[bytes, Any]:
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for tag, vr, value in ODD_VALUES:
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    ds.add_new(0x00189087, "FD", float("nan"))  # Diffusion b-value: no JSON number for it
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), ds


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """PAS and Orthanc, each holding the odd instance, a CT of the real set and the files
    of ``AS_THEY_ARE``."""
    if os.geteuid() != 0:
        pytest.fail("Orthanc runs in a network namespace: the tests must run as root")
    folder = tmp_path_factory.mktemp("dicom-json")
    odd, ds = _odd_instance()
    ct = sorted(CT_DIR.rglob("*.dcm"))[0]
    pas = PasProcess(folder / "pas", {"PAS_PREFETCH__ENABLED": "false",
                                      "PAS_DICOM__ACCEPT_UNKNOWN": "true"})  # findscu
    # findscu's AE known to Orthanc (which does not check the host by default).
    orthanc = Orthanc(folder / "orthanc", modalities={"VIEWER": ["VIEWER", "127.0.0.1", 104]})
    try:
        pas.start()
        orthanc.start()
        for data in (odd, ct.read_bytes(), *(path.read_bytes() for path in AS_THEY_ARE)):
            body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                    + f"\r\n--{BOUNDARY}--\r\n".encode())
            stored = httpx.post(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies",
                                content=body, timeout=60, headers={
                                    "Content-Type": 'multipart/related; type="application/dicom"'
                                                    f"; boundary={BOUNDARY}"})
            assert stored.status_code == 200, stored.text
            assert httpx.post(f"{orthanc.url}/instances", content=data,
                              timeout=60).status_code == 200
        yield {"pas": f"http://127.0.0.1:{pas.http_port}/dicom-web",
               "orthanc": orthanc.dicomweb, "odd": ds, "ct": dcmread(ct, stop_before_pixels=True),
               "process": pas, "orthanc_peer": orthanc}
    finally:
        pas.stop()
        orthanc.stop()


def _metadata(base: str, ds: Any) -> httpx.Response:
    return httpx.get(f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                     f"/instances/{ds.SOPInstanceUID}/metadata", timeout=60)


def test_a_search_listing_a_name_with_an_empty_value_is_answered_whole(
        peers: dict[str, Any]) -> None:
    odd = peers["odd"]
    for path in ("/studies", "/series", "/instances", f"/studies/{odd.StudyInstanceUID}/series"):
        answer = httpx.get(peers["pas"] + path, timeout=60)  # was cut: RemoteProtocolError
        assert answer.status_code == 200, (path, answer.text[:300])
        found = [item for item in answer.json()
                 if item["0020000D"]["Value"] == [odd.StudyInstanceUID]]
        assert len(found) == 1, path
        if not path.startswith("/studies/"):  # the study's attributes are in the answer
            assert found[0]["00100010"]["Value"] == [{"Alphabetic": "ODD^ONE"}, None], path
    # Every study was listed, the real CT's after the odd one included.
    listed = {item["0020000D"]["Value"][0]
              for item in httpx.get(peers["pas"] + "/studies", timeout=60).json()}
    assert listed == {odd.StudyInstanceUID, peers["ct"].StudyInstanceUID,
                      *(str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                        for path in AS_THEY_ARE)}


def test_metadata_gives_empty_values_as_null_as_orthanc_does(peers: dict[str, Any]) -> None:
    mine = _metadata(peers["pas"], peers["odd"])
    assert mine.status_code == 200, mine.text[:300]  # was a 500: tuple index out of range
    theirs = _metadata(peers["orthanc"], peers["odd"])
    assert theirs.status_code == 200
    item, reference = mine.json()[0], theirs.json()[0]
    for tag in ("00080008", "00200013", "00280030"):
        assert item[tag] == reference[tag], tag
    assert item["00080008"]["Value"] == ["ORIGINAL", None, "AXIAL"]
    assert item["00200013"]["Value"] == [1, None]
    assert item["00280030"]["Value"] == [0.5, None]
    # Orthanc writes the empty name as {"Alphabetic": " "}; F.2.5 says null.
    assert item["00100010"]["Value"] == [{"Alphabetic": "ODD^ONE"}, None]
    assert "00200000" not in item and "00200000" not in reference  # F.2.2: no group length
    # A NaN was a 500 ("Out of range float values are not JSON compliant"); null, as Orthanc.
    assert item["00189087"] == reference["00189087"] == {"vr": "FD", "Value": [None]}


@pytest.mark.parametrize("which", ["odd", "ct"])
def test_metadata_attributes_are_in_tag_order_and_those_orthanc_gives(
        peers: dict[str, Any], which: str) -> None:
    ds = peers[which]
    item = _metadata(peers["pas"], ds).json()[0]
    reference = _metadata(peers["orthanc"], ds).json()[0]
    assert list(item) == sorted(item)  # F.2.2; (0002,0010) and Pixel Data's URI came last
    assert item["00020010"]["Value"] == ["1.2.840.10008.1.2.1"]  # both stored so
    assert set(item) - {"00020010"} == set(reference)
    assert not [tag for tag in item if tag.endswith("0000")]


def test_a_regional_answer_with_null_values_is_read_as_empty_values() -> None:
    """What reads a region's QIDO-RS answers (Orthanc, or PAS's hub, both writing F.2.5's
    null) takes null for an empty value: it read "None" (a name ``ODD^ONE\\None`` in a
    C-FIND answer of a regional study, a modality "NONE" for the prefetch rules)."""
    row = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]},
           "00100010": {"vr": "PN", "Value": [{"Alphabetic": "ODD^ONE"}, None]},
           "00080061": {"vr": "CS", "Value": ["CT", None]}}
    keywords = _keywords(row)
    assert keywords["PatientName"] == "ODD^ONE\\"
    assert keywords["ModalitiesInStudy"] == "CT\\"
    candidate = candidate_from_qido(row)
    assert candidate is not None and candidate.modalities == frozenset({"CT"})


def _image_attributes(base: str, study: str, query: str = "") -> dict[str, dict[str, Any]]:
    """SOP Instance UID -> the image attributes (IMAGE_TAGS) of an instance search's item,
    as given: an attribute left out is not in the dict."""
    answer = httpx.get(f"{base}/studies/{study}/instances{query}", timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    assert "warning" not in answer.headers, answer.headers["warning"]
    return {item["00080018"]["Value"][0]: {tag: item[tag] for tag in IMAGE_TAGS if tag in item}
            for item in answer.json()}


def test_instance_searches_give_rows_columns_bits_and_frames_as_orthanc_does(
        peers: dict[str, Any]) -> None:
    """PS3.18 Table 10.6.3-5: an instance's Rows, Columns, BitsAllocated and NumberOfFrames
    (a web viewer lists a multi-frame instance's frames from NumberOfFrames). PAS gave none
    of them. Where the instance has none (the SR; NumberOfFrames of a single frame) the
    attribute is left out, as Orthanc leaves it out."""
    files = [peers["odd"], peers["ct"],
             *(dcmread(path, stop_before_pixels=True) for path in AS_THEY_ARE)]
    seen = {}
    for ds in files:
        mine = _image_attributes(peers["pas"], ds.StudyInstanceUID)
        assert mine == _image_attributes(peers["orthanc"], ds.StudyInstanceUID)
        seen.update(mine)
    values = {uid: {IMAGE_TAGS[tag]: attribute["Value"][0]
                    for tag, attribute in attributes.items()}
              for uid, attributes in seen.items()}
    emri, rtdose, report = (str(ds.SOPInstanceUID) for ds in files[2:])
    assert values[emri] == {"Rows": 64, "Columns": 64, "BitsAllocated": 16,
                            "NumberOfFrames": 10}
    assert values[rtdose] == {"Rows": 10, "Columns": 10, "BitsAllocated": 32,
                              "NumberOfFrames": 15}  # read from implicit VR
    assert values[str(peers["ct"].SOPInstanceUID)] == {"Rows": 512, "Columns": 512,
                                                       "BitsAllocated": 16}
    assert values[report] == {}
    # Named by includefield (or all of them), the same; at a series search, none.
    emri_study = files[2].StudyInstanceUID
    for query in ("?includefield=00280010,NumberOfFrames", "?includefield=all"):
        assert _image_attributes(peers["pas"], emri_study, query)[emri] == \
            seen[emri], query
    series = httpx.get(f"{peers['pas']}/studies/{emri_study}/series?includefield=all",
                       timeout=60).json()
    assert not set(IMAGE_TAGS) & set(series[0])
    # Matched as InstanceNumber is: a single value, in the range of its VR.
    found = httpx.get(f"{peers['pas']}/instances", params={"NumberOfFrames": "10"},
                      timeout=60).json()
    assert [item["00080018"]["Value"][0] for item in found] == [emri]
    refused = httpx.get(f"{peers['pas']}/instances", params={"Rows": "70000"}, timeout=60)
    assert refused.status_code == 400 and "Rows: '70000' is out of the range of a US " \
        "value (a 16-bit unsigned integer)" in refused.text


def test_an_image_level_c_find_answers_them_as_orthanc_does(peers: dict[str, Any],
                                                             tmp_path: Path) -> None:
    """Real findscu at IMAGE level asking for the four attributes, of PAS and of Orthanc:
    the same values (PAS answered them empty); asked, an instance without one has it empty."""
    keys = ["QueryRetrieveLevel=IMAGE", "StudyInstanceUID=", "SOPInstanceUID=", "Rows=",
            "Columns=", "BitsAllocated=", "NumberOfFrames="]
    pas, orthanc = peers["process"], peers["orthanc_peer"]
    answers = {}
    for name, host, port, called in (("pas", "127.0.0.1", pas.port, "PAS"),
                                     ("orthanc", orthanc.host, orthanc.dicom_port, "ORTHANC")):
        out = tmp_path / name
        result = dcmtk("findscu", host, port, called, keys, "-S", "-X", out=out)
        assert "Received Final Find Response (Success)" in result.stderr, \
            result.stderr[-2000:]
        answers[name] = {str(ds.SOPInstanceUID): tuple(
            ds.get(keyword) if ds.get(keyword) != "" else None
            for keyword in IMAGE_TAGS.values())
            for ds in map(dcmread, sorted(out.glob("rsp*.dcm")))}
    assert len(answers["pas"]) == 5
    assert answers["pas"] == answers["orthanc"]
    emri = str(dcmread(AS_THEY_ARE[0], stop_before_pixels=True).SOPInstanceUID)
    assert answers["pas"][emri] == (64, 64, 16, 10)
