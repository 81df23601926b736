"""WADO-RS /frames of an instance stored compressed go as the stored bitstream when Accept
admits it (PS3.18 8.7.3.3.2, Table 8.7.3-5; ``appliance/serving/wado_frames.py``).

One real ``pas run`` holding pydicom's JPEG 2000 (10 frames), RLE (2 frames, RGB), JPEG-LS,
JPEG baseline and JPEG lossless (one frame in two fragments) objects, each stored by DCMTK
storescu proposing its own syntax; httpx as the viewer. Each part's bytes are compared with
pydicom's frame extraction of the file sent (SHA-256). Before, every frame was decoded: a
viewer asking ``type="image/jls"`` got 406, and OHIF's ``transfer-syntax=*`` got native
pixels several times the size. Also: the native-only request still gets decoded pixels, a
compressed type the instance is not stored in is a 406 naming the stored syntax, reading
one frame of a large multi-frame reads only that frame, and the native pixels of big endian
and deflated objects (kept as sent) are the little-endian pixels they are said to be.
"""

from __future__ import annotations

import hashlib
import io
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tests.support.peers import PasProcess, read_rows, storescu


def _data(name: str) -> Path:
    return Path(get_testdata_file(name))  # type: ignore[arg-type]


J2K = _data("emri_small_jpeg_2k_lossless.dcm")  # 1.2.840.10008.1.2.4.90, 10 frames, no BOT
RLE = _data("SC_rgb_rle_2frame.dcm")  # 1.2.840.10008.1.2.5, 2 frames, BOT
JLS = _data("MR_small_jpeg_ls_lossless.dcm")  # 1.2.840.10008.1.2.4.80, 1 frame
BASELINE = _data("SC_rgb_jpeg_dcmtk.dcm")  # 1.2.840.10008.1.2.4.50, 1 frame
LOSSLESS = _data("JPEG-LL.dcm")  # 1.2.840.10008.1.2.4.70, 1 frame in 2 fragments
# storescu's option proposing each file's own syntax (and the uncompressed ones after it).
PROPOSE = {J2K: "-xv", RLE: "-xr", JLS: "-xt", BASELINE: "-xy", LOSSLESS: "-xs"}
MEDIA = {J2K: "image/jp2", RLE: "image/dicom-rle", JLS: "image/jls", BASELINE: "image/jpeg",
         LOSSLESS: "image/jpeg"}
OHIF = "multipart/related; type=application/octet-stream; transfer-syntax=*"
OCTETS = 'multipart/related; type="application/octet-stream"'


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MR_small in Explicit VR Big Endian and CT_small deflated, as new instances (the MR's
    SOP Instance UID is the JPEG-LS one's): stored as sent, not little endian in the file."""
    folder = tmp_path_factory.mktemp("uncompressed")
    big = dcmread(_data("MR_small_bigendian.dcm"))
    deflated = dcmread(_data("CT_small.dcm"))
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    paths = {}
    for name, ds in (("big-endian", big), ("deflated", deflated)):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths[name] = folder / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory,
        uncompressed: dict[str, Path]) -> Iterator[PasProcess]:
    pas = PasProcess(tmp_path_factory.mktemp("frames") / "pas",
                     {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                      "PAS_PREFETCH__ENABLED": "false"}).start()
    proposed = {**PROPOSE, uncompressed["big-endian"]: "-xb", uncompressed["deflated"]: "-xd"}
    try:
        for path, option in proposed.items():
            storescu([path], pas.port, extra=[option, "-R"])
        stored = {r["sop_instance_uid"]: r["transfer_syntax_uid"] for r in read_rows(
            pas.home / "pas.sqlite", "SELECT sop_instance_uid, transfer_syntax_uid "
                                     "FROM instances")}
        for path in proposed:  # kept in the syntax sent, else nothing here is tested
            ds = dcmread(path, stop_before_pixels=True)
            assert stored[ds.SOPInstanceUID] == ds.file_meta.TransferSyntaxUID, path.name
        yield pas
    finally:
        pas.stop()


def _url(pas: PasProcess, path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{ds.StudyInstanceUID}"
            f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")


def _parts(answer: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, bytes) of each part of a multipart/related answer."""
    boundary = answer.headers["content-type"].split("boundary=")[1].encode()
    parts = []
    for chunk in answer.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if line)
        parts.append((fields["Content-Type"], body[:-2]))
    return parts


def _stored_frames(path: Path) -> list[bytes]:
    """pydicom's frame extraction of the file as sent: what PAS stored, bit for bit."""
    ds = dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _frames(pas: PasProcess, path: Path, numbers: str, accept: str | None) -> httpx.Response:
    headers = {"Accept": accept} if accept is not None else {}
    return httpx.get(f"{_url(pas, path)}/frames/{numbers}", headers=headers, timeout=30)


def _retrieve_rows(pas: PasProcess) -> list[dict[str, str]]:
    return [dict(r) for r in read_rows(pas.home / "pas.sqlite",
                                       "SELECT outcome, detail FROM audit "
                                       "WHERE event = 'retrieve' ORDER BY id")]


@pytest.mark.parametrize("path, numbers, accept", [
    (J2K, "10,1,5", 'multipart/related; type="image/jp2"'),
    (RLE, "2,1", 'multipart/related; type="image/dicom-rle"'),
    (JLS, "1", 'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80'),
    (JLS, "1", 'multipart/related; type="image/x-jls"'),  # the name older clients send
    (BASELINE, "1", 'multipart/related; type="image/jpeg"'),  # listed, not the default
    (LOSSLESS, "1", 'multipart/related; type="image/jpeg"; transfer-syntax=*'),
    (J2K, "3", f'{OCTETS}; transfer-syntax=1.2.840.10008.1.2.4.90'),  # named, as dcm4chee reads it
])
def test_a_frame_asked_in_its_stored_syntax_is_its_stored_bitstream(
        pas: PasProcess, path: Path, numbers: str, accept: str) -> None:
    syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    answer = _frames(pas, path, numbers, accept)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(
        f'multipart/related; type="{MEDIA[path]}"; boundary=')
    parts = _parts(answer)
    stored = _stored_frames(path)
    assert [t for t, _ in parts] == [f"{MEDIA[path]}; transfer-syntax={syntax}"] * len(parts)
    assert [_sha(b) for _, b in parts] == [_sha(stored[int(n) - 1]) for n in numbers.split(",")]
    row = _retrieve_rows(pas)[-1]
    assert row == {"outcome": "success", "detail": f"1 instance (WADO-RS frames {numbers})"}


def test_ohif_leaving_the_syntax_to_pas_gets_every_object_as_stored(pas: PasProcess) -> None:
    """cornerstone's Accept (type unquoted, transfer-syntax=*): the bitstream, each part
    naming its syntax. Every frame of the five objects: 161,410 bytes where the decoded
    pixels they were sent as are 704,400."""
    sent = native = 0
    for path in PROPOSE:
        ds = dcmread(path)
        count = int(ds.get("NumberOfFrames", 1))
        numbers = ",".join(str(n) for n in range(1, count + 1))
        answer = _frames(pas, path, numbers, OHIF)
        assert answer.status_code == 200, (path.name, answer.text)
        parts = _parts(answer)
        assert {t for t, _ in parts} == {
            f"{MEDIA[path]}; transfer-syntax={ds.file_meta.TransferSyntaxUID}"}, path.name
        assert [_sha(b) for _, b in parts] == [_sha(f) for f in _stored_frames(path)]
        sent += sum(len(b) for _, b in parts)
        native += ds.pixel_array.nbytes
    assert (sent, native) == (161_410, 704_400)


@pytest.mark.parametrize("accept, media", [
    (f'{OCTETS}, multipart/related; type="image/jp2"', "image/jp2"),  # equal q: no decoding
    (f'{OCTETS}; q=0.9, multipart/related; type="image/jp2"', "image/jp2"),
    (f'multipart/related; type="image/jp2"; q=0.5, {OCTETS}', "application/octet-stream"),
    (f"{OCTETS}; transfer-syntax=*; q=0.4, {OCTETS}; q=0.8", "application/octet-stream"),
])
def test_q_values_rank_bitstream_and_pixels(pas: PasProcess, accept: str, media: str) -> None:
    answer = _frames(pas, J2K, "2", accept)
    assert answer.status_code == 200, answer.text
    [(part_type, body)] = _parts(answer)
    if media == "image/jp2":
        assert part_type == "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90"
        assert _sha(body) == _sha(_stored_frames(J2K)[1])
    else:
        assert part_type == "application/octet-stream"
        assert body == np.ascontiguousarray(dcmread(J2K).pixel_array[1]).tobytes()


@pytest.mark.parametrize("accept", [
    None, "*/*", OCTETS, f"{OCTETS}; transfer-syntax=1.2.840.10008.1.2.1",
])
def test_a_client_naming_native_pixels_only_still_gets_decoded_pixels(
        pas: PasProcess, accept: str | None) -> None:
    """As before this change (a guard, not a fix: it passes on the code before it too)."""
    for path, numbers in ((J2K, [7, 2]), (RLE, [2])):
        answer = _frames(pas, path, ",".join(map(str, numbers)), accept)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith(
            'multipart/related; type="application/octet-stream"; boundary=')
        pixels = dcmread(path).pixel_array
        assert _parts(answer) == [("application/octet-stream",
                                   np.ascontiguousarray(pixels[n - 1]).tobytes())
                                  for n in numbers]


@pytest.mark.parametrize("name", ["big-endian", "deflated"])
def test_frames_and_pixel_data_of_big_endian_and_deflated_objects_are_little_endian(
        pas: PasProcess, uncompressed: dict[str, Path], name: str) -> None:
    """Native pixels, as the part says: a big endian object's were sent unswapped (every
    16-bit value byte-swapped under a 200), a deflated one's were read at offsets of its
    inflated stream in the deflated file (/frames a 500 "frame 1 is 13998 bytes short",
    /bulkdata cut mid-answer)."""
    path = uncompressed[name]
    pixels = dcmread(path).pixel_array
    expected = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    for tail in ("frames/1", "bulkdata/7FE00010"):
        answer = httpx.get(f"{_url(pas, path)}/{tail}", timeout=30)
        assert answer.status_code == 200, (tail, answer.text)
        [(part_type, body)] = _parts(answer)
        assert part_type == "application/octet-stream"
        assert _sha(body) == _sha(expected), tail


@pytest.mark.parametrize("name", ["big-endian", "deflated"])
def test_rendered_big_endian_and_deflated_objects_are_their_pixels(
        pas: PasProcess, uncompressed: dict[str, Path], name: str) -> None:
    """/rendered of a deflated object was a 500 (pydicom's ``pixel_array`` of the file found
    no Pixel Data in the deflated stream); the PNG is the grayscale pipeline of the pixels
    pydicom reads from the file sent (Modality LUT, the instance's window, min-max)."""
    path = uncompressed[name]
    ds = dcmread(path)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), ds,
                           index=0)
    low, high = float(values.min()), float(values.max())
    expected = ((values - low) / ((high - low) or 1.0) * 255.0).clip(0, 255).astype(np.uint8)
    answer = httpx.get(f"{_url(pas, path)}/rendered", headers={"Accept": "image/png"},
                       timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(answer.content))), expected)


@pytest.mark.parametrize("accept", [
    'multipart/related; type="image/jls"',
    'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.91',
    f"{OCTETS}; transfer-syntax=1.2.840.10008.1.2.4.50",
])
def test_another_compressed_syntax_is_a_406_naming_the_stored_one(pas: PasProcess,
                                                                  accept: str) -> None:
    """No transcoding of frames: the 406 says what the instance is stored in and what PAS
    can send instead; it is audited, and bulk data stays native-only."""
    answer = _frames(pas, J2K, "1", accept)
    assert answer.status_code == 406, answer.text
    detail = answer.json()["detail"]
    assert "stored as 1.2.840.10008.1.2.4.90 (JPEG 2000 Image Compression (Lossless Only))" \
        in detail
    assert 'type="image/jp2"' in detail and 'type="application/octet-stream"' in detail
    row = _retrieve_rows(pas)[-1]
    assert row["outcome"] == f"failure: {detail}, after 0 of 1 instance"
    assert row["detail"] == "0 of 1 instance (WADO-RS frames 1), HTTP 406"
    bulk = httpx.get(f"{_url(pas, JLS)}/bulkdata/7FE00010", timeout=30,
                     headers={"Accept": f"{OCTETS}; transfer-syntax=1.2.840.10008.1.2.4.80"})
    assert bulk.status_code == 406, bulk.text


def test_an_accept_refusing_every_form_of_frames_is_a_406(pas: PasProcess) -> None:
    """q=0 on every range for frames: the client takes none of them (RFC 9110 12.4.2); it
    was sent native pixels under a 200."""
    answer = _frames(pas, J2K, "1", f'{OCTETS}; q=0, multipart/related; type="image/jp2"; q=0')
    assert answer.status_code == 406, answer.text
    assert "transfer-syntax=*" in answer.json()["detail"]


def test_one_frame_of_a_large_multiframe_reads_that_frame_only(tmp_path: Path) -> None:
    """40 frames of 1 MiB, no offset table (the fragment walk): frame 40 costs about one
    frame of memory, not the 40 MiB of Pixel Data (invariant 8)."""
    rng = random.Random(8)
    frames = [rng.randbytes(1 << 20) for _ in range(40)]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 1024, 1024, 40
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate(frames, has_bot=False)
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    # Imported here: the daemon's tests above run (and fail) on the code before this module.
    from appliance.serving.wado_frames import FrameAccept, open_frames

    tracemalloc.start()
    try:
        answer, chunks = open_frames(path, [40, 1], FrameAccept(OHIF))
        last, first = list(chunks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer.part_type == f"image/jls; transfer-syntax={JPEGLSLossless}"
    assert last == frames[39] and first == frames[0]
    assert peak < 4 * (1 << 20), f"{peak / (1 << 20):.1f} MiB for two frames of 1 MiB"
