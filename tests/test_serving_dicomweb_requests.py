"""DICOMweb requests PAS refused or misread, on a real ``pas run``: each bad one is now
refused with the status PS3.18 gives it and a detail naming the problem (audited), each good
one answered. STOW-RS: a preamble before the first boundary line (RFC 2046) was a 400, and a
body without the boundary its Content-Type names a 400 in the parser's words. A UID list in a
resource's path (``/studies/A%5CB``) was served as a C-MOVE UID list. A rendered frame number
of 4301+ digits was a 500 raised in the routing (no audit row). ``fuzzymatching=yes`` was
ignored without a word. (The other edge cases: ``test_serving_dicomweb_edges.py``.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.support.peers import PasProcess, wait_for
from tests.test_serving_dicomweb_edges import (
    CT_SMALL,
    MULTIFRAME,
    STOW_TYPE,
    _base,
    _body,
    _instance_url,
    _instances,
    _last_id,
    _new_instance,
    _rows_after,
    pas_holding_two_objects,
)


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    """PAS holding CT_small (one native frame) and a JPEG-LS multi-frame MR, by STOW-RS."""
    with pas_holding_two_objects(tmp_path_factory.mktemp("requests") / "pas") as pas:
        yield pas


def test_a_stow_body_with_a_preamble_is_read_past_it(pas: PasProcess) -> None:
    """RFC 2046 5.1.1 (multipart/related's syntax, RFC 2387): text before the first boundary
    line is a preamble, which a receiver ignores. PAS refused the whole body, 400
    "Expected boundary character 45, got 84 at index 2" (Orthanc's DICOMweb plugin stores
    it). The instance is stored and served back bit-exact."""
    before = _instances(pas)
    part = _new_instance()
    answer = httpx.post(f"{_base(pas)}/studies", headers={"Content-Type": STOW_TYPE},
                        content=b"This is a preamble.\r\nIt says nothing.\r\n" + _body([part]),
                        timeout=30)
    assert answer.status_code == 200, answer.text
    assert _instances(pas) == before + 1
    url = answer.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    served = httpx.get(f"http://127.0.0.1:{pas.http_port}{url}", timeout=30, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert served.status_code == 200
    parts = served.content.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
    assert hashlib.sha256(parts).hexdigest() == hashlib.sha256(part).hexdigest()


def test_a_stow_body_without_the_boundary_it_names_is_a_400_saying_so(pas: PasProcess) -> None:
    """A Content-Type whose boundary the body does not use was refused with the parser's
    words, "Expected boundary character 111, got 101 at index 2": now the answer names the
    boundary looked for. Nothing is stored; the refusal has its row."""
    before, last = _instances(pas), _last_id(pas)
    answer = httpx.post(f"{_base(pas)}/studies", content=_body([_new_instance()]), timeout=30,
                        headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                                 "boundary=other"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"] == (
        "malformed multipart body: no boundary line '--other' (the boundary of its "
        "Content-Type) in the body")
    assert _instances(pas) == before
    assert [(r["event"], r["outcome"]) for r in _rows_after(pas, last)] == [
        ("store", "failure: malformed multipart body")]


def _two(path: Path, other: Path, keyword: str) -> str:
    """The ``keyword`` UIDs of two files joined as a UID list, as a URL path segment."""
    return "%5C".join(str(dcmread(p, stop_before_pixels=True)[keyword].value)
                      for p in (path, other))


@pytest.mark.parametrize(("method", "where", "event"), [
    ("GET", "/studies/{studies}", "retrieve"),
    ("GET", "/studies/{studies}/metadata", "retrieve"),
    ("GET", "/studies/{studies}/series", "query"),
    ("GET", "/studies/{study}/series/{series}/instances", "query"),
    ("POST", "/studies/{studies}", "store"),
])
def test_a_uid_list_in_the_path_is_a_400_naming_it(pas: PasProcess, method: str, where: str,
                                                   event: str) -> None:
    """A DICOMweb path names one study, series or instance (PS3.18 10.4.1.1, 10.6.1.1).
    ``/studies/A%5CB/metadata`` was read as the UID list of a C-MOVE: a 200 holding both
    studies (the real Orthanc answers 404), under an audit target matching no study, with
    the cache's LRU stamp of neither touched, and fetch-through asked the region for the
    study "A\\B" however much of A and B was held. A STOW to it refused every part (0xA900
    under a 409) after reading the whole body."""
    ct = dcmread(CT_SMALL, stop_before_pixels=True)
    url = _base(pas) + where.format(
        studies=_two(CT_SMALL, MULTIFRAME, "StudyInstanceUID"), study=ct.StudyInstanceUID,
        series=_two(CT_SMALL, MULTIFRAME, "SeriesInstanceUID"))
    keyword = "SeriesInstanceUID" if "{series}" in where else "StudyInstanceUID"
    before, last = _instances(pas), _last_id(pas)
    if method == "POST":
        answer = httpx.post(url, headers={"Content-Type": STOW_TYPE},
                            content=_body([_new_instance()]), timeout=30)
    else:
        answer = httpx.get(url, timeout=30)
    assert answer.status_code == 400, answer.text[:300]
    detail = answer.json()["detail"]
    assert detail.startswith(f"{keyword} '") and detail.endswith(
        "in the path: a path names one UID, not a list"), detail
    assert detail.count("\\") == 1, detail  # quoted as given: repr doubled the backslash
    rows = _rows_after(pas, last)
    assert [(r["event"], r["outcome"].startswith(f"failure: {keyword} '")) for r in rows] == [
        (event, True)], [dict(r) for r in rows]
    assert _instances(pas) == before


@pytest.mark.parametrize("study", ["1.2.840.abc", "1.2.*", "1.2.840%0D5"])
def test_a_stow_to_a_study_that_is_not_a_uid_is_a_400_before_its_body(
        pas: PasProcess, study: str) -> None:
    """A STOW-RS to ``/studies/{study}`` whose study is not a UID read the whole body, then
    refused each part as another study's (0xA900 under a 409), the URL's value quoted into
    the log. It is refused at once now, as the readers' paths are: a 400 naming it, one
    failed store row, nothing stored."""
    before, last = _instances(pas), _last_id(pas)
    answer = httpx.post(f"{_base(pas)}/studies/{study}", headers={"Content-Type": STOW_TYPE},
                        content=_body([_new_instance()]), timeout=30)
    assert answer.status_code == 400, answer.text[:300]
    assert answer.json()["detail"].endswith(
        "in the path is not a UID (digits and dots, at most 64 characters)")
    rows = _rows_after(pas, last)
    assert [(r["event"], r["outcome"].startswith("failure: StudyInstanceUID '"))
            for r in rows] == [("store", True)], [dict(r) for r in rows]
    assert _instances(pas) == before


@pytest.mark.parametrize(("frame", "status", "detail"), [
    ("0", 400, "frame list '0': frame numbers start at 1"),
    ("-1", 400, "frame list '-1': frame numbers start at 1"),
    ("1,2", 400, "frame '1,2': one frame number from 1"),
    ("9" * 5000, 404, "frame 9223372036854775808 asked, the instance has 10"),
])
def test_a_rendered_frame_number_pas_cannot_render_is_refused_naming_it(
        pas: PasProcess, frame: str, status: int, detail: str) -> None:
    """/frames/{n}/rendered took n through Starlette's int route convertor: a number of
    more than 4300 digits made int() raise inside the routing, a 500 with an ERROR
    traceback and no audit row; 0 was a 404 (frames start at 1: /frames/0 is a 400), and
    -1 or a list a bare 404 "Not Found" from the router. Now as /frames reads its list."""
    last, log_size = _last_id(pas), len(pas.log())
    answer = httpx.get(f"{_instance_url(pas, MULTIFRAME)}/frames/{frame}/rendered",
                       timeout=30)
    assert answer.status_code == status, answer.text[:300]
    assert answer.json()["detail"].startswith(detail[:60]), answer.text[:300]
    # (A success row may be an earlier answer's, written once its last byte was taken.)
    rows = [r for r in _rows_after(pas, last) if r["outcome"] != "success"]
    assert [(r["event"], r["detail"].endswith(f"HTTP {status}")) for r in rows] == [
        ("retrieve", True)], [dict(r) for r in rows]
    assert "Exception in ASGI application" not in pas.log()[log_size:]
    rendered = httpx.get(f"{_instance_url(pas, MULTIFRAME)}/frames/10/rendered", timeout=30)
    assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/jpeg"
    # Its row, written once the last byte was taken, before the next test counts rows.
    wait_for(lambda: [r for r in _rows_after(pas, last) if r["outcome"] == "success"],
             what="the rendered image's audit row")


@pytest.mark.parametrize("value", ["yes", "1", "maybe", ""])
def test_a_fuzzymatching_neither_true_nor_false_is_a_400_naming_it(pas: PasProcess,
                                                                   value: str) -> None:
    """PS3.18 8.3.4.1: fuzzymatching is "true" or "false". Any other value was ignored
    without a word: fuzzymatching=yes, meant as true, got a literal answer with no Warning,
    which the viewer took for a fuzzy one (the real Orthanc answers 400 "Not a proper value
    for fuzzy matching (true or false)"). A bad value of a parameter PAS supports is a 400
    naming it, as limit's and offset's are."""
    last = _last_id(pas)
    answer = httpx.get(f"{_base(pas)}/studies", params={"fuzzymatching": value}, timeout=30)
    assert answer.status_code == 400, answer.text[:300]
    assert answer.json()["detail"] == f"fuzzymatching: true or false, got {value!r}"
    assert [(r["event"], r["outcome"]) for r in _rows_after(pas, last)] == [
        ("query", f"failure: fuzzymatching: true or false, got {value!r}")]
    upper = httpx.get(f"{_base(pas)}/studies", params={"fuzzymatching": "TRUE"}, timeout=30)
    assert upper.status_code == 200 and "fuzzymatching" in upper.headers["Warning"]
