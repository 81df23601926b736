"""DICOMweb edge cases a viewer or a PACS client exercises (PS3.18), on a real ``pas run``.

Media negotiation: a QIDO-RS or /metadata client asking for XML, and a /frames or /bulkdata
client asking for a compressed syntax or image/jpeg the object is not sent in, get 406
instead of another format under a 200. Parameters: a viewport of 0 or a frame list of
non-ASCII digits is a 400 naming it (was a 500 and a wrong frame). STOW-RS: a body of JSON
or XML parts is a 415, a ``Boundary=`` in another case is read, and every refused store has
its audit row.
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from tests.support.peers import PasProcess, read_rows

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MULTIFRAME = Path(get_testdata_file("emri_small_jpeg_ls_lossless.dcm"))  # type: ignore[arg-type]
BOUNDARY = "edge-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
OCTETS = 'multipart/related; type="application/octet-stream"'


def _body(parts: list[bytes], content_type: str = "application/dicom") -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode()
    return b"".join(head + p + b"\r\n" for p in parts) + f"--{BOUNDARY}--\r\n".encode()


def _new_instance(**attributes: Any) -> bytes:
    """CT_small as a new instance of a new study (nothing else holds its UIDs), with
    ``attributes`` (keyword=value) set on it."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@contextlib.contextmanager
def pas_holding_two_objects(home: Path) -> Iterator[PasProcess]:
    """PAS holding CT_small (one native frame) and a JPEG-LS multi-frame MR, by STOW-RS."""
    pas = PasProcess(home, {"PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        stored = httpx.post(f"{_base(pas)}/studies", headers={"Content-Type": STOW_TYPE},
                            content=_body([CT_SMALL.read_bytes(), MULTIFRAME.read_bytes()]),
                            timeout=60)
        assert stored.status_code == 200, stored.text
        yield pas
    finally:
        pas.stop()


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    with pas_holding_two_objects(tmp_path_factory.mktemp("edges") / "pas") as pas:
        yield pas


def _base(pas: PasProcess) -> str:
    return f"http://127.0.0.1:{pas.http_port}/dicom-web"


def _instance_url(pas: PasProcess, path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"{_base(pas)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def _last_id(pas: PasProcess) -> int:
    return int(read_rows(pas.home / "pas.sqlite", "SELECT max(id) AS n FROM audit")[0]["n"] or 0)


def _rows_after(pas: PasProcess, last: int) -> list[sqlite3.Row]:
    return read_rows(pas.home / "pas.sqlite",
                     "SELECT event, target, outcome, detail FROM audit WHERE id > ? "
                     "ORDER BY id", (last,))


def _instances(pas: PasProcess) -> int:
    return int(read_rows(pas.home / "pas.sqlite",
                         "SELECT count(*) AS n FROM instances")[0]["n"])


def _octet_parts(response: httpx.Response) -> list[bytes]:
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    chunks = response.content.split(b"--" + boundary)[1:-1]
    return [c.partition(b"\r\n\r\n")[2][:-2] for c in chunks]


# -- media negotiation ------------------------------------------------------------------

@pytest.mark.parametrize("accept", [
    "application/dicom+xml",
    'multipart/related; type="application/dicom+xml"',
    "application/dicom+json; q=0",  # the client takes JSON at no price
    "image/png",
])
def test_qido_and_metadata_refuse_an_accept_they_cannot_answer(pas: PasProcess,
                                                               accept: str) -> None:
    """An XML client got DICOM JSON under a 200, which it could not read: 406 naming what is
    offered, and the refused search is audited."""
    last = _last_id(pas)
    search = httpx.get(f"{_base(pas)}/studies", headers={"Accept": accept}, timeout=30)
    assert search.status_code == 406, search.text
    assert "application/dicom+json" in search.json()["detail"]
    [row] = _rows_after(pas, last)
    assert row["event"] == "query" and row["outcome"].startswith("failure: Accept")
    metadata = httpx.get(f"{_instance_url(pas, CT_SMALL)}/metadata",
                         headers={"Accept": accept}, timeout=30)
    assert metadata.status_code == 406, metadata.text
    [_, row] = _rows_after(pas, last)
    assert row["event"] == "retrieve" and "HTTP 406" in row["detail"]


@pytest.mark.parametrize("accept", [
    None, "application/dicom+json", "application/json", "*/*",
    "text/html,application/xhtml+xml,*/*;q=0.8",  # a browser's
    'multipart/related; type="application/dicom+xml", application/dicom+json;q=0.5',
])
def test_qido_and_metadata_answer_what_takes_dicom_json(pas: PasProcess,
                                                        accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    search = httpx.get(f"{_base(pas)}/studies", headers=headers, timeout=30)
    assert search.status_code == 200, search.text
    assert search.headers["content-type"] == "application/dicom+json"
    studies = {s["0020000D"]["Value"][0] for s in search.json()}
    assert str(dcmread(CT_SMALL).StudyInstanceUID) in studies
    metadata = httpx.get(f"{_instance_url(pas, CT_SMALL)}/metadata", headers=headers,
                         timeout=30)
    assert metadata.status_code == 200, metadata.text
    [item] = metadata.json()
    assert item["00080018"]["Value"] == [str(dcmread(CT_SMALL).SOPInstanceUID)]


@pytest.mark.parametrize("accept", [
    f"{OCTETS}; transfer-syntax=1.2.840.10008.1.2.4.50",  # JPEG baseline: lossy
    f"{OCTETS}; transfer-syntax=1.2.840.10008.1.2.4.90",  # JPEG 2000, which neither is in
    'multipart/related; type="image/jpeg"',
    "image/jpeg",
])
def test_frames_and_bulk_data_in_a_syntax_pas_does_not_send_are_406(pas: PasProcess,
                                                                     accept: str) -> None:
    """Native pixels were sent under a 200 to a client that asked for JPEG frames only.
    (Frames asked in the syntax they are stored in go as stored:
    tests/test_serving_frames_compressed.py.)"""
    for path in (CT_SMALL, MULTIFRAME):
        url = _instance_url(pas, path)
        for what in ("frames/1", "bulkdata/7FE00010"):
            answer = httpx.get(f"{url}/{what}", headers={"Accept": accept}, timeout=30)
            assert answer.status_code == 406, (what, answer.text)
            assert "transfer-syntax=*" in answer.json()["detail"]


@pytest.mark.parametrize("accept", [
    None, "*/*", OCTETS, f"{OCTETS}; transfer-syntax=1.2.840.10008.1.2.1",
    f"{OCTETS}; transfer-syntax=1.2.840.10008.1.2.4.50, {OCTETS};q=0.5",
])
def test_frames_answer_native_pixels_when_accepted(pas: PasProcess, accept: str | None) -> None:
    """(OHIF's ``transfer-syntax=*`` gets the stored JPEG-LS bitstream:
    tests/test_serving_frames_compressed.py.)"""
    original = dcmread(MULTIFRAME)
    headers = {"Accept": accept} if accept else {}
    answer = httpx.get(f"{_instance_url(pas, MULTIFRAME)}/frames/2,1",
                       headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    frames = _octet_parts(answer)
    expected = original.pixel_array
    shape = expected.shape[1:]
    got = [np.frombuffer(f, dtype=expected.dtype.newbyteorder("<")).reshape(shape)
           for f in frames]
    assert len(got) == 2
    assert np.array_equal(got[0], expected[1]) and np.array_equal(got[1], expected[0])


# -- parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("viewport", ["0,0", "0", "64,0", "abc", ",", "-5,-5", "64,64,64"])
def test_a_bad_viewport_is_a_400_naming_it(pas: PasProcess, viewport: str) -> None:
    """viewport=0,0 was a 500 (a division by zero in the thumbnailing)."""
    url = f"{_instance_url(pas, CT_SMALL)}/rendered"
    answer = httpx.get(url, params={"viewport": viewport}, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith(f"viewport {viewport!r}")
    still = httpx.get(url, params={"viewport": "32,16"}, timeout=30)
    assert still.status_code == 200 and still.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("frames", ["1_2", "\u0661", "1,\u0662", "+1"])
def test_a_frame_list_takes_ascii_numbers_only(pas: PasProcess, frames: str) -> None:
    """int() took "1_2" as frame 12 and the Arabic-Indic "١" as frame 1."""
    answer = httpx.get(f"{_instance_url(pas, MULTIFRAME)}/frames/{frames}", timeout=30)
    assert answer.status_code == 400, answer.text
    assert "comma-separated numbers from 1" in answer.json()["detail"]


def test_a_huge_frame_list_is_named_short(pas: PasProcess) -> None:
    answer = httpx.get(f"{_instance_url(pas, MULTIFRAME)}/frames/{'9' * 5000}", timeout=30)
    assert answer.status_code == 404, answer.text
    assert len(answer.text) < 300


# -- STOW-RS --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["application/dicom+json", "application/dicom+xml"])
def test_stow_of_metadata_parts_is_415_and_audited(pas: PasProcess, kind: str) -> None:
    """Such a body was read as DICOM files: each part refused as unparseable under a 409
    (and a DICOM file sent under that type was stored)."""
    before, last = _instances(pas), _last_id(pas)
    answer = httpx.post(f"{_base(pas)}/studies", content=_body([_new_instance()], kind),
                        headers={"Content-Type": f'multipart/related; type="{kind}"; '
                                                 f"boundary={BOUNDARY}"}, timeout=30)
    assert answer.status_code == 415, answer.text
    assert kind in answer.json()["detail"]
    assert _instances(pas) == before
    [row] = _rows_after(pas, last)
    assert row["event"] == "store" and kind in row["outcome"]
    assert row["detail"] == "0 stored (STOW-RS)"


@pytest.mark.parametrize("accept", ["application/dicom+xml",
                                    'multipart/related; type="application/dicom+xml"'])
def test_stow_refuses_an_accept_it_cannot_answer_and_stores_nothing(pas: PasProcess,
                                                                    accept: str) -> None:
    """A STOW-RS asking its answer in XML got DICOM JSON under a 200, its instances stored
    (QIDO-RS and /metadata answered the same Accept 406): now 406 before the body is read,
    nothing stored, the refusal audited."""
    before, last = _instances(pas), _last_id(pas)
    answer = httpx.post(f"{_base(pas)}/studies", content=_body([_new_instance()]),
                        headers={"Content-Type": STOW_TYPE, "Accept": accept}, timeout=30)
    assert answer.status_code == 406, answer.text
    assert "application/dicom+json" in answer.json()["detail"]
    assert _instances(pas) == before
    [row] = _rows_after(pas, last)
    assert row["event"] == "store" and row["outcome"].startswith("failure: Accept")
    assert row["detail"] == "0 stored (STOW-RS)"


@pytest.mark.parametrize("accept", [None, "application/dicom+json", "application/json", "*/*"])
def test_stow_answers_what_takes_dicom_json(pas: PasProcess, accept: str | None) -> None:
    before = _instances(pas)
    with httpx.Client(timeout=30) as client:
        del client.headers["Accept"]  # httpx's own "*/*": None sends no Accept at all
        request = client.build_request(
            "POST", f"{_base(pas)}/studies", content=_body([_new_instance()]),
            headers={"Content-Type": STOW_TYPE, **({"Accept": accept} if accept else {})})
        assert ("accept" in request.headers) == (accept is not None)
        answer = client.send(request)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    assert len(answer.json()["00081199"]["Value"]) == 1
    assert _instances(pas) == before + 1


def test_stow_boundary_parameter_in_any_case(pas: PasProcess) -> None:
    """RFC 2045: parameter names are case-insensitive; "Boundary=" was refused as missing."""
    before = _instances(pas)
    answer = httpx.post(f"{_base(pas)}/studies", content=_body([_new_instance()]),
                        headers={"Content-Type": f'Multipart/Related; Type="application/dicom"'
                                                 f'; Boundary="{BOUNDARY}"'}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert _instances(pas) == before + 1


@pytest.mark.parametrize(("content_type", "body", "status", "reason"), [
    ('multipart/related; type="application/dicom"', b"x", 400,
     "multipart/related without a boundary parameter"),
    ("application/dicom", b"x", 415, "STOW-RS needs Content-Type multipart/related"),
    (STOW_TYPE, f"--{BOUNDARY}--\r\n".encode(), 400, "the request holds no DICOM part"),
])
def test_every_refused_stow_has_its_audit_row(pas: PasProcess, content_type: str, body: bytes,
                                              status: int, reason: str) -> None:
    """These refusals left no row at all: ``pas audit`` did not show the attempt."""
    before, last = _instances(pas), _last_id(pas)
    answer = httpx.post(f"{_base(pas)}/studies", content=body,
                        headers={"Content-Type": content_type}, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"].startswith(reason)
    rows: list[Any] = _rows_after(pas, last)
    assert [(r["event"], r["target"], r["detail"]) for r in rows] == [
        ("store", None, "0 stored (STOW-RS)")]
    assert rows[0]["outcome"].startswith(f"failure: {reason}")
    assert _instances(pas) == before


def test_a_part_that_is_not_a_part_10_file_is_refused_as_it_arrives(pas: PasProcess) -> None:
    """A STOW-RS part is a PS3.10 file: one without "DICM" after the preamble (30 MB of
    zeros, a word) was parsed by pydicom, element by empty element (0.3 s per MB), and
    spilled to the spool first, before its refusal; and why it was refused was said
    nowhere (the answer carries a FailureReason only). Now it is refused on its first 132
    bytes, the rest dropped as it comes, and the journal and the audit row say why."""
    before, last = _instances(pas), _last_id(pas)
    zeros = bytes(30 << 20)
    answer = httpx.post(f"{_base(pas)}/studies", headers={"Content-Type": STOW_TYPE},
                        content=_body([zeros, _new_instance(), b"hello"]), timeout=120)
    assert answer.status_code == 202, answer.text
    result = answer.json()
    assert len(result["00081199"]["Value"]) == 1
    assert [item["00081197"]["Value"] for item in result["00081198"]["Value"]] == [
        [0xC000], [0xC000]]
    assert _instances(pas) == before + 1
    (row,) = [r for r in _rows_after(pas, last) if r["event"] == "store"]
    assert row["outcome"] == (
        "failure: 2 parts refused (first: not a DICOM file: a STOW-RS part is a PS3.10 file, "
        f"and this one ({len(zeros)} bytes) has no 'DICM' after a 128-byte preamble)"), row
    refusals = [line for line in pas.log().splitlines()
                if "part refused (0xC000): not a DICOM file" in line]
    assert len(refusals) >= 2 and "(5 bytes)" in refusals[-1], refusals
    assert not [f for f in (pas.home / "spool" / "tmp").glob("*") if f.stat().st_size]


# -- QIDO-RS --------------------------------------------------------------------------

def test_a_key_not_matched_at_the_level_is_named_in_a_warning(pas: PasProcess) -> None:
    """/studies?Modality=MR (a series attribute; the study's is ModalitiesInStudy) was
    dropped without a word: every study came back and read as the MR ones. The answer is
    the same, and a Warning names what was not matched; the audit row says it too."""
    last = _last_id(pas)
    answer = httpx.get(f"{_base(pas)}/studies", params={"Modality": "MR",
                                                          "OperatorsName": "NOBODY"},
                       timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Warning"] == (
        f'299 {_base(pas)}: "The following attributes are not supported for matching at '
        'this level and were ignored: Modality, OperatorsName."')
    (row,) = [r for r in _rows_after(pas, last) if r["event"] == "query"]
    assert row["detail"].endswith(", not matched on Modality, OperatorsName"), row["detail"]
    matched = httpx.get(f"{_base(pas)}/studies", params={"ModalitiesInStudy": "MR"},
                        timeout=30)
    assert matched.status_code in (200, 204) and "Warning" not in matched.headers


@pytest.mark.parametrize("field", ["00091010", "00431028",  # private (CT_small holds this)
                                   "ReferencedStudySequence.ReferencedSOPClassUID",
                                   "00081032.00080100"])
def test_an_include_field_pas_does_not_return_is_left_out_not_refused(
        pas: PasProcess, field: str) -> None:
    """PS3.18 10.6.3.3 returns the includefield attributes "supported by the origin server":
    a private tag or a path into a sequence was a 400 "unknown query parameter", the whole
    search refused (a viewer's study list empty for one include field it asks)."""
    plain = httpx.get(f"{_base(pas)}/studies", timeout=30)
    asked = httpx.get(f"{_base(pas)}/studies", params={"includefield": f"{field},StudyID"},
                      timeout=30)
    assert asked.status_code == 200, asked.text
    assert asked.json() == plain.json() and "Warning" not in asked.headers


def test_includefield_all_returns_every_study_attribute_pas_holds(pas: PasProcess) -> None:
    """PS3.18 10.6.3.3.1: ``includefield=all`` returns the Patient and Study level Optional
    Keys the server supports. It added nothing to the defaults: IssuerOfPatientID,
    SOPClassesInStudy and NumberOfPatientRelated* came only when named one by one."""
    named = ["IssuerOfPatientID", "SOPClassesInStudy", "NumberOfPatientRelatedStudies",
             "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"]
    every = httpx.get(f"{_base(pas)}/studies", params={"includefield": "all"}, timeout=30)
    one_by_one = httpx.get(f"{_base(pas)}/studies", params={"includefield": ",".join(named)},
                           timeout=30)
    assert every.status_code == one_by_one.status_code == 200, every.text
    assert every.json() == one_by_one.json()
    tags = ["00100021", "00080062", "00201200", "00201202", "00201204"]
    assert every.json() and all(tag in study for study in every.json() for tag in tags)
    series = httpx.get(f"{_base(pas)}/series", params={"includefield": "all"}, timeout=30)
    assert series.status_code == 200
    assert "00080062" not in series.json()[0]  # a study attribute the series search's
    # defaults do not hold is not added: "all" is the series level's own


def test_a_matching_key_on_a_private_tag_or_a_sequence_path_is_named_in_a_warning(
        pas: PasProcess) -> None:
    """Sequence matching (PS3.18 8.3.4.1 ``attribute.attribute``) and private attributes are
    not in PAS's index: such a key was a 400; it is answered as any key PAS cannot apply,
    every match of the others and the 299 Warning naming it."""
    plain = httpx.get(f"{_base(pas)}/studies", timeout=30)
    answer = httpx.get(f"{_base(pas)}/studies", params={"00081032.00080100": "X",
                                                          "00431028": "Y"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == plain.json()
    assert answer.headers["Warning"] == (
        f'299 {_base(pas)}: "The following attributes are not supported for matching at '
        'this level and were ignored: 00081032.00080100, 00431028."')


def test_an_unsupported_query_parameter_is_ignored_and_named(pas: PasProcess) -> None:
    """PS3.18 8.3: "The origin server shall ignore any unsupported Query Parameters" and
    answer as if they were not there. A cache-buster (``_=``), a misspelt keyword, a name
    that is no attribute was a 400 "unknown query parameter", the whole search refused;
    now the answer is the search without them, with a 299 Warning naming them (the audit
    row too). A supported parameter with a bad value is still a 400 naming it."""
    last = _last_id(pas)
    plain = httpx.get(f"{_base(pas)}/studies", timeout=30)
    answer = httpx.get(f"{_base(pas)}/studies?_=1733360000&PatientNmae=X&00081032.Nope=1"
                       "&includefield=StudyID,Nope&0008103=2&bad%0D%0Aname=3&=4&includefield=",
                       timeout=30)  # a blank name or field names nothing
    assert answer.status_code == 200, answer.text
    assert answer.json() == plain.json()
    assert answer.headers["Warning"] == (
        f'299 {_base(pas)}: "The following query parameters are not supported and were '
        'ignored: _, PatientNmae, 00081032.Nope, Nope, 0008103 and 1 more."')
    rows = [r for r in _rows_after(pas, last) if r["event"] == "query"]
    assert rows[-1]["outcome"] == "success"
    assert rows[-1]["detail"].endswith(", ignored parameters _, PatientNmae, 00081032.Nope, "
                                       "Nope, 0008103 and 1 more"), rows[-1]["detail"]
    named = httpx.get(f"{_base(pas)}/studies", params={"bad\r\n\"name\u00e9": "1"}, timeout=30)
    assert named.status_code == 200
    assert named.headers["Warning"].endswith('ignored: bad???name?."')
    bad_value = httpx.get(f"{_base(pas)}/studies", params={"StudyDate": "yesterday"},
                          timeout=30)
    assert bad_value.status_code == 400 and "StudyDate" in bad_value.json()["detail"]


def test_fuzzymatching_asked_is_answered_with_the_warning_of_literal_matching(
        pas: PasProcess) -> None:
    """PS3.18 8.3.4.1: PAS has no fuzzy matching of names; fuzzymatching=true was matched
    literally without a word, so the viewer took a literal answer for a fuzzy one."""
    name = str(dcmread(CT_SMALL).PatientName)
    fuzzy = httpx.get(f"{_base(pas)}/studies",
                      params={"PatientName": name, "fuzzymatching": "true"}, timeout=30)
    assert fuzzy.status_code == 200, fuzzy.text
    assert fuzzy.headers["Warning"] == (
        f'299 {_base(pas)}: "The fuzzymatching parameter is not supported. Only literal '
        'matching has been performed."')
    names = [s["00100010"]["Value"][0]["Alphabetic"] for s in fuzzy.json()]
    assert names and set(names) == {name}  # the fixture's study, and any STOW'd copy of it
    literal = httpx.get(f"{_base(pas)}/studies",
                        params={"PatientName": name, "fuzzymatching": "false"}, timeout=30)
    assert literal.status_code == 200 and "Warning" not in literal.headers
    assert literal.json() == fuzzy.json()


@pytest.mark.parametrize(("accept", "expected"), [
    ("image/png, image/jpeg;q=0.1", "image/png"),  # was a JPEG: the first named won
    ("image/jpeg;q=0.2, image/png", "image/png"),
    ("image/gif", None),  # was a JPEG under a 200
    ("image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8", "image/jpeg"),  # <img>
    (None, "image/jpeg"),
    ("image/png", "image/png"),
])
def test_rendered_media_follows_the_q_values(pas: PasProcess, accept: str | None,
                                             expected: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    answer = httpx.get(f"{_instance_url(pas, CT_SMALL)}/rendered", headers=headers,
                       timeout=30)
    if expected is None:
        assert answer.status_code == 406, answer.text
        assert "image/jpeg or image/png" in answer.json()["detail"]
        return
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == expected
    assert Image.open(io.BytesIO(answer.content)).format == expected.split("/")[1].upper()


def _expected_window(hu: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 to 0..255, written out here from the standard's formulas."""
    if function == "linear":
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        y = ((hu - (center - 0.5)) / (width - 1) + 0.5) * 255
        y = np.where(hu <= low, 0, np.where(hu > high, 255, y))
    elif function == "linear-exact":
        y = np.where(hu <= center - width / 2, 0,
                     np.where(hu > center + width / 2, 255, ((hu - center) / width + 0.5) * 255))
    else:
        y = 255 / (1 + np.exp(-4 * (hu - center) / width))
    return np.rint(y).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("window", "center", "width", "function"), [
    ("-600,1500,linear", -600.0, 1500.0, "linear"),  # a lung window
    ("40,400", 40.0, 400.0, "linear"),  # soft tissue; linear by default
    ("40,400,linear-exact", 40.0, 400.0, "linear-exact"),
    ("300,1500,SIGMOID", 300.0, 1500.0, "sigmoid"),
])
def test_rendered_window_is_the_one_asked(pas: PasProcess, window: str, center: float,
                                          width: float, function: str) -> None:
    """window=center,width,function was ignored: the min-max rendering came back instead."""
    ct = dcmread(CT_SMALL)
    hu = apply_modality_lut(ct.pixel_array, ct).astype(np.float64)
    answer = httpx.get(f"{_instance_url(pas, CT_SMALL)}/rendered", params={"window": window},
                       headers={"Accept": "image/png"}, timeout=30)
    assert answer.status_code == 200, answer.text
    got = np.asarray(Image.open(io.BytesIO(answer.content)))
    expected = _expected_window(hu, center, width, function)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("window", ["40", "40,0", "40,-5", "a,b", "40,400,cubic", "nan,400",
                                    "40,0.5,linear"])
def test_a_bad_window_is_a_400_naming_it(pas: PasProcess, window: str) -> None:
    answer = httpx.get(f"{_instance_url(pas, CT_SMALL)}/rendered", params={"window": window},
                       timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith(f"window {window!r}")


@pytest.mark.parametrize("accept", [
    'multipart/related; type="application/dicom"; q=0',
    'multipart/related; type="application/dicom"; transfer-syntax=*; q=0, */*;q=0',
])
def test_retrieve_refused_by_every_dicom_range_is_406(pas: PasProcess, accept: str) -> None:
    """q=0 says "not this": such a client was sent the instance in the default syntax."""
    last = _last_id(pas)
    answer = httpx.get(_instance_url(pas, CT_SMALL), headers={"Accept": accept}, timeout=30)
    assert answer.status_code == 406, answer.text
    assert answer.json()["detail"] == "Accept refuses every DICOM answer (q=0)"
    [row] = _rows_after(pas, last)
    assert row["event"] == "retrieve" and row["detail"] == "0 of 1 instance (WADO-RS), HTTP 406"


@pytest.mark.parametrize("number", ["99999999999999999999999", "2147483648", "-2147483649"])
def test_an_integer_key_out_of_range_is_a_400_and_audited(pas: PasProcess, number: str) -> None:
    """?InstanceNumber=99999999999999999999999 was a 500 (SQLite's OverflowError), unaudited."""
    last = _last_id(pas)
    answer = httpx.get(f"{_base(pas)}/instances", params={"InstanceNumber": number},
                       timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"] == (f"InstanceNumber: {number!r} is out of the range of an "
                                       "IS value (a 32-bit signed integer)")
    [row] = _rows_after(pas, last)
    assert row["event"] == "query" and row["outcome"].startswith("failure: InstanceNumber")
    fine = httpx.get(f"{_base(pas)}/instances", params={"InstanceNumber": "1"}, timeout=30)
    assert fine.status_code == 200 and fine.json()


def _study_uids(pas: PasProcess, **params: str) -> set[str]:
    answer = httpx.get(f"{_base(pas)}/studies", params=params, timeout=30)
    assert answer.status_code == 200, answer.text
    return {s["0020000D"]["Value"][0] for s in answer.json()}


def test_a_comma_list_matches_as_the_backslash_list_for_codes_and_identifiers(
        pas: PasProcess) -> None:
    """PS3.18 8.3.4.1 writes a list of values with commas; PAS took one for UIDs only:
    ModalitiesInStudy=CT,MR and AccessionNumber=A,B answered an empty 200, where CT%5CMR
    answered every CT and MR study. A comma in a name or in free text is part of the value
    (read literally); in a date, a time or a number it is a 400 naming the key."""
    tag = generate_uid()[-8:]
    accessions = [f"A{tag}{n}" for n in range(3)]
    parts = [_new_instance(AccessionNumber=accessions[0], StudyDescription="THORAX, ABDOMEN",
                           PatientID=f"P{tag}", PatientName="DOE, JANE"),
             _new_instance(AccessionNumber=accessions[1]),
             _new_instance(AccessionNumber=accessions[2])]
    stored = httpx.post(f"{_base(pas)}/studies", content=_body(parts),
                        headers={"Content-Type": STOW_TYPE}, timeout=30)
    assert stored.status_code == 200, stored.text
    studies = [str(dcmread(io.BytesIO(p)).StudyInstanceUID) for p in parts]

    both = _study_uids(pas, ModalitiesInStudy="CT\\MR")
    fixture = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID)
               for f in (CT_SMALL, MULTIFRAME)}
    assert fixture | set(studies) <= both  # a CT study and an MR one, at least
    assert _study_uids(pas, ModalitiesInStudy="CT,MR") == both
    assert _study_uids(pas, ModalitiesInStudy="MR, CT") == both  # spaces are not values'
    assert _study_uids(pas, ModalitiesInStudy="MR") < both

    pair = _study_uids(pas, AccessionNumber="\\".join(accessions[:2]))
    assert pair == set(studies[:2])
    assert _study_uids(pas, AccessionNumber=",".join(accessions[:2])) == pair
    assert _study_uids(pas, AccessionNumber=f"{accessions[0]}, {accessions[2]}") == {
        studies[0], studies[2]}

    # Literal: the comma of a description or of a name is theirs.
    assert _study_uids(pas, StudyDescription="THORAX, ABDOMEN") == {studies[0]}
    assert _study_uids(pas, PatientName="DOE, JANE") == {studies[0]}
    for key, listed in (("StudyDate", "20200101,20200102"), ("StudyTime", "10,11")):
        refused = httpx.get(f"{_base(pas)}/studies", params={key: listed}, timeout=30)
        assert refused.status_code == 400, refused.text
        assert refused.json()["detail"].startswith(f"{key}: {listed!r} is a list"), refused.text

