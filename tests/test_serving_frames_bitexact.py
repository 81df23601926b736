"""Pixels served and copied by PAS are the samples stored, bit for bit (DESIGN.md invariant 4;
review s40/bitexact findings 1-4), on a real ``pas run`` fed by DCMTK storescu (each object
proposed in its own syntax, kept as sent) and read back by httpx (WADO-RS) and DCMTK getscu.

- An RLE Lossless colour image stored as YBR_FULL: its decoded copies (WADO-RS in Explicit VR
  Little Endian, native /frames, bulk data, a C-GET viewer without RLE) were converted to
  RGB, and 10 % of the samples could not be got back. They hold the YBR_FULL samples now,
  said YBR_FULL; /rendered, a picture for a browser, is still RGB.
- A 1-bit multi-frame (a SEG's frames, 25 and 1517 bits: not whole bytes): frames were cut
  at byte offsets, all but the first shifted. Each frame's own bits now, from bit 0.
- A native YBR_FULL_422 multi-frame: cut at 3 bytes a pixel, frame 1 came with half of
  frame 2. Two bytes a pixel (PS3.3 C.7.6.3.1.2).
- Float and Double Float Pixel Data: /frames was a 404 "no pixel data". A big endian object's
  OF value went into the metadata's InlineBinary (and bulk data) unswapped, under a media
  type whose binary values are little endian.

Expected values come from pydicom reading the file PAS stored: ``pixel_array(as_rgb=False)``
(the samples, no colour conversion) and the stored Pixel Data bytes.
"""

from __future__ import annotations

import base64
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits, pixel_array
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tests.support.peers import DCMTK_ENV, PasProcess, read_rows, storescu
from tests.test_transcode import rle_ybr_full

OCTETS = 'multipart/related; type="application/octet-stream"'
DICOM_LE = f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'


def _image(rows: int, columns: int, bits: int, frames: int, syntax: str,
           photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BITEXACT", "Bit^Exact", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    if bits <= 16:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.NumberOfFrames = frames
    return ds


def _one_bit(path: Path, frames: np.ndarray, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds = _image(frames.shape[1], frames.shape[2], 1, frames.shape[0], syntax)
    ds.PixelData = pack_bits(frames.ravel())  # padded to an even length
    if syntax == ExplicitVRBigEndian:
        ds["PixelData"].VR = "OW"  # 16-bit words, each one's bytes reversed in the file
    ds.save_as(path, enforce_file_format=True)
    return path


def _ybr_422(path: Path) -> Path:
    """pydicom's native YBR_FULL_422 image given a second frame (its bytes inverted)."""
    ds = dcmread(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    ds.PixelData = ds.PixelData + bytes(255 - b for b in ds.PixelData)
    ds.NumberOfFrames = 2
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def _float(path: Path, keyword: str, dtype: str, side: int, frames: int, syntax: str) -> Path:
    ds = _image(side, side, np.dtype(dtype).itemsize * 8, frames, syntax)
    values = np.random.default_rng(side).random((frames, side, side)).astype(dtype)
    setattr(ds, keyword, values.tobytes())
    ds[keyword].VR = "OF" if keyword == "FloatPixelData" else "OD"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("made")
    rng = np.random.default_rng(7)
    seg = np.zeros((3, 5, 5), dtype=np.uint8)
    seg[0, 0, :] = 1  # top row
    seg[1, :, 0] = 1  # left column
    seg[2] = np.eye(5, dtype=np.uint8)  # diagonal
    return {
        "seg-5x5x3": _one_bit(folder / "seg.dcm", seg),
        # 1517 bits a frame, 1707 bytes: past the bulk threshold, read from the file.
        "bits-37x41x9": _one_bit(folder / "bits.dcm",
                                 rng.integers(0, 2, (9, 37, 41), dtype=np.uint8)),
        # Big endian: 63 bits a frame, in 16-bit words whose bytes the file reverses.
        "bits-be-7x9x3": _one_bit(folder / "bits-be.dcm",
                                  rng.integers(0, 2, (3, 7, 9), dtype=np.uint8),
                                  ExplicitVRBigEndian),
        "ybr-422": _ybr_422(folder / "ybr422.dcm"),
        "rle-ybr-full": rle_ybr_full(folder / "rle-ybr.dcm"),
        "float-le": _float(folder / "float-le.dcm", "FloatPixelData", "<f4", 16, 3,
                           ExplicitVRLittleEndian),
        "double-le": _float(folder / "double-le.dcm", "DoubleFloatPixelData", "<f8", 8, 2,
                            ExplicitVRLittleEndian),
        # 1024 bytes: inline in the metadata (InlineBinary), not a BulkDataURI.
        "float-be": _float(folder / "float-be.dcm", "FloatPixelData", ">f4", 16, 1,
                           ExplicitVRBigEndian),
    }


# storescu's option proposing each file's own syntax first.
PROPOSE = {"1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
           "1.2.840.10008.1.2.5": "-xr"}


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory,
        made: dict[str, Path]) -> Iterator[PasProcess]:
    pas = PasProcess(tmp_path_factory.mktemp("bitexact") / "pas",
                     {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                      "PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        for path in made.values():
            syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            storescu([path], pas.port, extra=[PROPOSE[syntax], "-R"])
        yield pas
    finally:
        pas.stop()


def _stored(pas: PasProcess, source: Path) -> Path:
    """The file PAS holds for ``source``, checked to be in the syntax sent."""
    sent = dcmread(source, stop_before_pixels=True)
    rows = read_rows(pas.home / "pas.sqlite", "SELECT path, transfer_syntax_uid FROM instances "
                     "WHERE sop_instance_uid = ?", (str(sent.SOPInstanceUID),))
    assert rows and rows[0]["transfer_syntax_uid"] == sent.file_meta.TransferSyntaxUID
    return pas.home / "spool" / rows[0]["path"]


def _url(pas: PasProcess, path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{ds.StudyInstanceUID}"
            f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")


def _parts(answer: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, bytes) of each part of a multipart/related answer."""
    boundary = answer.headers["content-type"].split("boundary=")[1].strip('"').encode()
    parts = []
    for chunk in answer.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if line)
        parts.append((fields["Content-Type"], body[:-2]))
    return parts


def _get(url: str, accept: str) -> httpx.Response:
    return httpx.get(url, headers={"Accept": accept}, timeout=60)


def _frames(pas: PasProcess, source: Path, numbers: str) -> list[bytes]:
    answer = _get(f"{_url(pas, source)}/frames/{numbers}", OCTETS)
    assert answer.status_code == 200, answer.text
    parts = _parts(answer)
    assert all(kind == "application/octet-stream" for kind, _ in parts)
    return [body for _, body in parts]


def _samples(path: Path | Dataset, index: int | None = None) -> np.ndarray:
    """The decoded samples, no colour conversion."""
    source = str(path) if isinstance(path, Path) else path
    return pixel_array(source, index=index, as_rgb=False)  # type: ignore[arg-type]


def test_rle_ybr_full_is_served_with_its_samples(pas: PasProcess, made: dict[str, Path]) -> None:
    """Native /frames, bulk data and the Explicit VR LE copy of an RLE YBR_FULL image: the
    stored YBR_FULL samples, said YBR_FULL (they were RGB)."""
    source = made["rle-ybr-full"]
    stored = _stored(pas, source)
    samples = [_samples(stored, i) for i in range(2)]
    assert _frames(pas, source, "1,2") == [np.ascontiguousarray(s).tobytes() for s in samples]
    bulk = _get(f"{_url(pas, source)}/bulkdata/7FE00010", OCTETS)
    assert bulk.status_code == 200
    assert _parts(bulk)[0][1] == b"".join(s.tobytes() for s in samples)
    copy = _get(_url(pas, source), DICOM_LE)
    assert copy.status_code == 200
    ds = dcmread(io.BytesIO(_parts(copy)[0][1]))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "YBR_FULL"
    assert np.array_equal(_samples(ds), _samples(stored))


def test_rle_ybr_full_rendered_is_still_an_rgb_picture(pas: PasProcess,
                                                      made: dict[str, Path]) -> None:
    """A rendered picture is for display: its colour converted to RGB, unlike the copies."""
    source = made["rle-ybr-full"]
    answer = _get(f"{_url(pas, source)}/frames/1/rendered", "image/png")
    assert answer.status_code == 200
    image = Image.open(io.BytesIO(answer.content))
    assert image.mode == "RGB"
    expected = pixel_array(str(_stored(pas, source)), index=0, as_rgb=True)
    assert np.array_equal(np.asarray(image), expected)


def test_a_cget_viewer_without_rle_gets_the_ybr_full_samples(pas: PasProcess,
                                                            made: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """getscu accepts the uncompressed syntaxes only: PAS decodes the RLE for it (C-GET
    sub-operations through transcode.py). The copy was RGB, 10 % of its samples off."""
    source = made["rle-ybr-full"]
    ds = dcmread(source, stop_before_pixels=True)
    result = subprocess.run(
        ["getscu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-k", "QueryRetrieveLevel=IMAGE",
         "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
         "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
         "-k", f"SOPInstanceUID={ds.SOPInstanceUID}", "127.0.0.1", str(pas.port),
         "-od", str(tmp_path)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    received = list(tmp_path.iterdir())
    assert len(received) == 1, result.stderr[-2000:]
    got = dcmread(received[0])
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert got.PhotometricInterpretation == "YBR_FULL"
    assert np.array_equal(_samples(got), _samples(_stored(pas, source)))


@pytest.mark.parametrize("name", ["seg-5x5x3", "bits-37x41x9", "bits-be-7x9x3"])
def test_one_bit_frames_are_each_frames_own_bits(pas: PasProcess, made: dict[str, Path],
                                                 name: str, tmp_path: Path) -> None:
    """Frame n of 1-bit pixels starts at bit (n-1)*Rows*Columns (PS3.5 8.1.1): each frame's
    bits, repacked from bit 0 into ceil(Rows*Columns/8) bytes. They were cut at byte
    offsets: 3 bytes for 25 bits, every frame after the first shifted (a big endian one was
    decoded by pydicom frame by frame, which fails on such frames)."""
    source = made[name]
    stored = _stored(pas, source)
    count = int(dcmread(stored, stop_before_pixels=True).NumberOfFrames)
    numbers = list(range(count, 0, -1))  # in another order than stored, too
    if dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            ExplicitVRBigEndian:
        # The bits as DCMTK reads them: dcmconv reverses each 16-bit word of a big endian
        # OW value, as transcode.py does (pydicom 3.0's pixel_array does not, for 1 bit).
        little = tmp_path / "little.dcm"
        subprocess.run(["dcmconv", "+te", str(stored), str(little)], check=True,
                       env=DCMTK_ENV, capture_output=True, timeout=60)
        stored = little
    # The whole array: pydicom 3.0's own decode of one 1-bit frame (index=) fails on a
    # frame that is not whole bytes.
    samples = _samples(stored)
    expected = [np.packbits(samples[n - 1].ravel(), bitorder="little").tobytes()
                for n in numbers]
    assert _frames(pas, source, ",".join(map(str, numbers))) == expected


def test_native_ybr_full_422_frames_are_two_bytes_a_pixel(pas: PasProcess,
                                                         made: dict[str, Path]) -> None:
    source = made["ybr-422"]
    pixels = dcmread(_stored(pas, source)).PixelData
    assert len(pixels) == 40_000
    assert _frames(pas, source, "2,1") == [pixels[20_000:], pixels[:20_000]]


@pytest.mark.parametrize("name", ["float-le", "double-le", "float-be"])
def test_float_pixel_data_frames(pas: PasProcess, made: dict[str, Path], name: str) -> None:
    """Float and Double Float Pixel Data have frames (they were a 404 "no pixel data"),
    little endian whatever the stored byte order."""
    source = made[name]
    stored = _stored(pas, source)
    count = int(dcmread(stored, stop_before_pixels=True).NumberOfFrames)
    expected = []
    for n in range(count):
        frame = _samples(stored, n)
        expected.append(frame.astype(frame.dtype.newbyteorder("<")).tobytes())
    assert _frames(pas, source, ",".join(str(n + 1) for n in range(count))) == expected


def test_big_endian_float_values_are_little_endian_in_metadata_and_bulk_data(
        pas: PasProcess, made: dict[str, Path]) -> None:
    """application/dicom+json with no transfer-syntax parameter: InlineBinary is Explicit VR
    Little Endian (PS3.18 F.2.7; the media type's registration). A big endian OF value was
    written as stored: 0.66 read back as 1e-23."""
    source = made["float-be"]
    values = _samples(_stored(pas, source)).astype("<f4")
    answer = _get(f"{_url(pas, source)}/metadata", "application/dicom+json")
    assert answer.status_code == 200
    inline = answer.json()[0]["7FE00008"]
    assert inline["vr"] == "OF"
    assert base64.b64decode(inline["InlineBinary"]) == values.tobytes()
    bulk = _get(f"{_url(pas, source)}/bulkdata/7FE00008", OCTETS)
    assert bulk.status_code == 200
    assert _parts(bulk)[0][1] == values.tobytes()


@pytest.mark.parametrize("name", ["seg-5x5x3", "bits-37x41x9", "bits-be-7x9x3"])
def test_one_bit_frames_rendered_are_each_frames_own_pixels(
        pas: PasProcess, made: dict[str, Path], name: str, tmp_path: Path) -> None:
    """/frames/N/rendered of a 1-bit multi-frame whose frames are not whole bytes: the
    picture of frame N's own pixels (set pixels bright, the others black), for each frame.
    pydicom's decode of one such frame failed: a 500 for 37x41 (1517 bits a frame)."""
    source = made[name]
    stored = _stored(pas, source)
    if dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            ExplicitVRBigEndian:  # as DCMTK reads it (see the /frames test above)
        little = tmp_path / "little.dcm"
        subprocess.run(["dcmconv", "+te", str(stored), str(little)], check=True,
                       env=DCMTK_ENV, capture_output=True, timeout=60)
        stored = little
    samples = _samples(stored)
    for number in range(len(samples), 0, -1):
        answer = _get(f"{_url(pas, source)}/frames/{number}/rendered", "image/png")
        assert answer.status_code == 200, answer.text
        picture = np.asarray(Image.open(io.BytesIO(answer.content)).convert("L"))
        assert picture.shape == samples[number - 1].shape
        assert np.array_equal(picture > 127, samples[number - 1] == 1), number
        assert set(np.unique(picture)) <= {0, 255}, np.unique(picture)
