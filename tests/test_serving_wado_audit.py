"""The ``retrieve`` audit row of each WADO-RS answer says what the viewer was sent.

A real daemon holding the CT and MR sets (stored by DCMTK storescu); httpx as the viewer,
reading part of an answer and closing its connection, or all of it. Each row is checked
against what the viewer received (counts, bytes, pixels) and for when it is written: once the
answer is over, never before its first byte (metadata, frames, rendered images and bulk data
were audited a success as the answer began, whatever the viewer then got).
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.support.peers import (
    CT_DIR,
    MR_DIR,
    PasProcess,
    pas_holding_real_sets,
    read_rows,
    storescu,
    wait_for,
)

MULTIFRAME = Path(get_testdata_file("emri_small_jpeg_ls_lossless.dcm"))  # type: ignore[arg-type]
MR_COUNT = 520


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    pas = pas_holding_real_sets(tmp_path_factory.mktemp("wado-audit") / "pas")
    try:
        storescu([MULTIFRAME], pas.port, extra=["-xt"])  # JPEG-LS proposed: kept as sent
        yield pas
    finally:
        pas.stop()


def _base(pas: PasProcess) -> str:
    return f"http://127.0.0.1:{pas.http_port}/dicom-web"


def _rows_after(pas: PasProcess, last: int) -> list[sqlite3.Row]:
    return read_rows(pas.home / "pas.sqlite", "SELECT * FROM audit WHERE event = 'retrieve' "
                     "AND id > ? ORDER BY id", (last,))


def _last_id(pas: PasProcess) -> int:
    return max([0] + [r["id"] for r in _rows_after(pas, 0)])


def _one_row_after(pas: PasProcess, last: int) -> sqlite3.Row:
    """The one row written since ``last``: waited for (it comes when the answer is over, a
    moment after the viewer has its last byte), then checked to be alone."""
    wait_for(lambda: _rows_after(pas, last), 30, what="the retrieve's audit row")
    rows = _rows_after(pas, last)
    assert len(rows) == 1, [dict(r) for r in rows]
    return rows[0]


def _mr_study() -> str:
    return str(dcmread(sorted(MR_DIR.glob("*.dcm"))[0], stop_before_pixels=True)
               .StudyInstanceUID)


def _instance_url(pas: PasProcess, path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"{_base(pas)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}",
            f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}")


def test_metadata_cut_by_the_viewer_is_a_failure_with_what_was_sent(pas: PasProcess) -> None:
    """The MR study's metadata is 51 MB of DICOM JSON. A viewer that reads 1 MB of it and
    closes its connection: was audited "success, 520 instances" before the first byte."""
    study = _mr_study()
    last = _last_id(pas)
    with httpx.stream("GET", f"{_base(pas)}/studies/{study}/metadata", timeout=60) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/dicom+json"
        taken = 0
        for chunk in answer.iter_raw():
            if not taken:  # the answer has begun: its row is not written yet
                assert _rows_after(pas, last) == []
            taken += len(chunk)
            if taken > 1 << 20:
                break
    row = _one_row_after(pas, last)
    found = re.fullmatch(rf"failure: the client went away before the end, after (\d+) of "
                         rf"{MR_COUNT} instances", row["outcome"])
    assert found, row["outcome"]
    sent = int(found.group(1))
    assert 0 < sent < MR_COUNT
    assert row["detail"] == f"{sent} of {MR_COUNT} instances (WADO-RS metadata)"
    assert row["target"] == study


def test_whole_metadata_is_one_success_row_written_after_the_last_byte(
        pas: PasProcess) -> None:
    study = _mr_study()
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in MR_DIR.glob("*.dcm")}
    last = _last_id(pas)
    body = bytearray()
    with httpx.stream("GET", f"{_base(pas)}/studies/{study}/metadata", timeout=120) as answer:
        assert answer.status_code == 200
        for chunk in answer.iter_bytes():
            if not body:  # 51 MB cannot all be in the sockets' buffers: the answer is on
                assert _rows_after(pas, last) == []
            body.extend(chunk)
    items = json.loads(body)
    assert {item["00080018"]["Value"][0] for item in items} == expected
    assert len(items) == MR_COUNT
    row = _one_row_after(pas, last)
    assert (row["outcome"], row["detail"], row["target"]) == (
        "success", f"{MR_COUNT} instances (WADO-RS metadata)", study)


def test_frames_rendered_and_bulk_data_each_get_one_success_row_naming_the_study(
        pas: PasProcess) -> None:
    """Each row names the instance's UIDs only (the frame list and the tag were part of the
    target) and counts the instance sent."""
    url, uids = _instance_url(pas, MULTIFRAME)
    pixels = dcmread(MULTIFRAME).pixel_array

    last = _last_id(pas)
    frames = httpx.get(f"{url}/frames/2,5", timeout=30)
    assert frames.status_code == 200
    parts = _octet_parts(frames)
    assert parts == [pixels[1].astype("<u2").tobytes(), pixels[4].astype("<u2").tobytes()]
    row = _one_row_after(pas, last)
    assert (row["outcome"], row["detail"], row["target"]) == (
        "success", "1 instance (WADO-RS frames 2,5)", uids)

    last = row["id"]
    png = httpx.get(f"{url}/frames/3/rendered", headers={"Accept": "image/png"}, timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert int(png.headers["content-length"]) == len(png.content)
    assert Image.open(io.BytesIO(png.content)).size == (pixels.shape[2], pixels.shape[1])
    row = _one_row_after(pas, last)
    assert (row["outcome"], row["detail"], row["target"]) == (
        "success", "1 instance (WADO-RS rendered image/png)", uids)

    ct_url, ct_uids = _instance_url(pas, sorted(CT_DIR.glob("*.dcm"))[0])
    last = row["id"]
    bulk = httpx.get(f"{ct_url}/bulkdata/7FE00010", timeout=30)
    assert bulk.status_code == 200
    stored = dcmread(sorted(CT_DIR.glob("*.dcm"))[0]).PixelData
    assert _octet_parts(bulk) == [stored]
    row = _one_row_after(pas, last)
    assert (row["outcome"], row["detail"], row["target"]) == (
        "success", f"1 instance (WADO-RS bulk data 7FE00010, {len(stored)} bytes)", ct_uids)


def _octet_parts(answer: httpx.Response) -> list[bytes]:
    boundary = re.search(r"boundary=([^;]+)", answer.headers["content-type"]).group(1)  # type: ignore[union-attr]
    chunks = answer.content.split(f"--{boundary}".encode())
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n", chunks[-1][:100]
    return [c.split(b"\r\n\r\n", 1)[1][:-2] for c in chunks[1:-1]]


def test_an_unreadable_instance_is_a_500_and_a_failure_row(pas: PasProcess,
                                                           tmp_path: Path) -> None:
    """A stored file that is not DICOM any more: metadata, frames and rendered were a 500
    with no audit row at all (the row came after the work, which raised)."""
    copy = dcmread(sorted(CT_DIR.glob("*.dcm"))[0])
    copy.StudyInstanceUID, copy.SeriesInstanceUID, copy.SOPInstanceUID = (
        generate_uid(), generate_uid(), generate_uid())
    copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
    copy.save_as(tmp_path / "copy.dcm")
    storescu([tmp_path / "copy.dcm"], pas.port)
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    try:
        [(stored,)] = conn.execute("SELECT path FROM instances WHERE sop_instance_uid = ?",
                                   (str(copy.SOPInstanceUID),)).fetchall()
    finally:
        conn.close()
    (pas.home / "spool" / stored).write_bytes(b"no longer DICOM " * 64)
    url, uids = _instance_url(pas, tmp_path / "copy.dcm")
    for tail, what in (("/metadata", "WADO-RS metadata"), ("/frames/1", "WADO-RS frames 1"),
                       ("/rendered", "WADO-RS rendered image/jpeg")):
        last = _last_id(pas)
        answer = httpx.get(url + tail, timeout=30)
        assert answer.status_code == 500, (tail, answer.text[:300])
        assert answer.json()["detail"].startswith("the instance could not be read: ")
        row = _one_row_after(pas, last)
        assert row["outcome"] == f"failure: {answer.json()['detail']}, after 0 of 1 instance"
        assert (row["detail"], row["target"]) == (f"0 of 1 instance ({what}), HTTP 500", uids)
    # A study PAS does not hold: refused, and audited as the attempt it was.
    last = _last_id(pas)
    missing = httpx.get(f"{_base(pas)}/studies/1.2.826.0.1.3680043.9.7/metadata", timeout=30)
    assert missing.status_code == 404
    row = _one_row_after(pas, last)
    assert (row["outcome"], row["detail"], row["target"]) == (
        "failure: no instance matches 1.2.826.0.1.3680043.9.7",
        "nothing sent (WADO-RS metadata), HTTP 404", "1.2.826.0.1.3680043.9.7")
    # The daemon serves everyone else as before.
    good, _ = _instance_url(pas, sorted(CT_DIR.glob("*.dcm"))[0])
    assert httpx.get(f"{good}/metadata", timeout=30).status_code == 200
