"""A stored instance re-encoded in little endian (appliance/store/transcode.py) is, byte for
byte, what pydicom's whole-object decode gives (the frames decoded one at a time, large values
copied from the file, a deflated dataset inflated into a temp file), keeps its SOP Instance
UID, and leaves no temp file behind, also when it fails. The memory it saves is measured on
the daemon in tests/test_transcode_memory.py, and on large UN values and a deflated object
in tests/test_transcode_large_values_memory.py."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import appliance.store.transcode as transcode
from appliance.store import inflate
from appliance.store.spool import Spool, SpoolFull
from appliance.store.transcode import TranscodeError, open_transcoded, transcoded
from tests.test_transfer_pack import write_dicom

EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_to_little_endian(ds: Dataset) -> None:
    """The dicom destination's former whole-object swap (appliance/dispatch/target_types/
    dicom.py until the transcoder), kept as the reference for big endian objects."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    for elem in ds.iterall():
        size = WORD_SIZE.get(str(elem.VR))
        if size is None or not isinstance(elem.value, bytes | bytearray):
            continue
        if elem.tag == 0x7FE00010 and size == 2 and bits in (32, 64):
            size = bits // 8
        if len(elem.value) % size:
            continue
        elem.value = np.frombuffer(elem.value, dtype=f">u{size}").astype(f"<u{size}").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True, ds.original_character_set)


def whole_decode(path: Path, syntax: str) -> bytes:
    """What the three senders produced before: the whole object decoded by pydicom (same SOP
    Instance UID), then written in ``syntax``."""
    ds = dcmread(path)
    stored = ds.file_meta.TransferSyntaxUID
    if stored.is_compressed:
        # The samples stored (a YBR_FULL image stays YBR_FULL); only the lossy JPEG
        # processes' colour goes RGB, as decompress() gives it by default.
        ds.decompress(as_rgb=stored in (JPEGBaseline8Bit, JPEGExtended12Bit),
                      generate_instance_uid=False)
        if ds.PhotometricInterpretation == "YBR_FULL_422":  # upsampled by the decoder
            ds.PhotometricInterpretation = "YBR_FULL"
    elif not stored.is_little_endian:
        _swap_to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _smooth(shape: tuple[int, ...], seed: int, high: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.integers(-3, 4, shape), axis=-1) % high


def _compressed(path: Path, syntax: str, pixels: np.ndarray, *, bits_stored: int,
                signed: bool = False, samples: int = 1) -> Path:
    """A multi-frame object compressed by pydicom's own encoders."""
    frames = pixels.shape[0]
    write_dicom(path, pixels, bits_stored=bits_stored, signed=signed, frames=frames,
                samples=samples)
    ds = dcmread(path)
    ds.compress(syntax, pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def _big_endian(folder: Path) -> Path:
    """Explicit VR Big Endian, 32-bit pixels (each cell swapped whole), 3 frames of 96 kB:
    the Pixel Data is above the deferral threshold, so it is swapped while copied."""
    pixels = _smooth((3, 96, 256), 5, 1 << 20).astype(">u4")
    path = write_dicom(folder / "be32.dcm", pixels, bits_stored=20, signed=False,
                       big_endian=True, frames=3)
    ds = dcmread(path)
    ds["PixelData"].VR = "OW"  # words of a big endian value (write_dicom says OB above 16 bits)
    ds.save_as(path, enforce_file_format=True)
    return path


def _blob(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def un_element(tag: int, value: bytes) -> DataElement:
    """An element stored with the VR UN whatever pydicom's dictionary says (a sender that did
    not know it); pydicom would give a standard one its dictionary VR."""
    elem = DataElement(tag, "OB", value)
    elem.VR = "UN"
    return elem


def large_values(path: Path, syntax: str) -> Path:
    """An object with large values other than OB..OW, in a Latin-1 character set: text (UT
    with trailing spaces, LT), and, stored explicit, UN ones: private unknown to pydicom
    (200 kB, and 300 bytes), private known to its dictionary (the Siemens CSA header, OB once
    converted), standard sent UN (Study Description past 64 kB; Institutional Department Name
    short, LO once converted), standard unknown to the dictionary. Stored implicit, the
    private ones have no VR."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jörg"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    ds.add(DataElement(0x0040A160, "UT", "Befund: Läsion ä ö ü ß " * 4000 + "  "))
    ds.add(DataElement(0x00104000, "LT", ("Kommentar é " * 250)[:3000]))
    ds.add(DataElement(0x00090010, "LO", "ACME 1.0"))
    ds.add(DataElement(0x00290010, "LO", "SIEMENS CSA HEADER"))
    implicit = syntax == ImplicitVRLittleEndian
    make = (lambda tag, value: DataElement(tag, "OB", value)) if implicit else un_element
    ds.add(make(0x00091001, _blob(200_000, 1)))
    ds.add(make(0x00091002, _blob(300, 2)))
    ds.add(make(0x00291010, _blob(100_000, 3)))
    if not implicit:
        ds.add(un_element(0x00081030, _blob(70_000, 4)))
        ds.add(un_element(0x00081040, b"Radiology  " * 30))
        ds.add(un_element(0x00209998, _blob(100_000, 5)))
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(256, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _first_frames(path: Path, name: str, frames: int) -> Path:
    """pydicom's ``name``, an encapsulated multi-frame file, cut to its first ``frames``
    frames (their fragments as they are). color3d's whole 120 YBR frames took ~9 s per
    combination to decode three times over (21 s in a loaded CI run) for nothing more than
    four frames show: a frame at a time, the colour space converted, the fragments' order."""
    ds = dcmread(_testdata(name))
    kept = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    ds.PixelData = encapsulate(kept[:frames])
    ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)
    return path


def rle_ybr_full(path: Path, frames: int = 2) -> Path:
    """RLE Lossless colour stored as YBR_FULL (PS3.5 8.2.2 allows it): pydicom's
    SC_ybr_full_uncompressed given ``frames`` frames (each after the first its samples
    inverted, a YBR value outside the RGB gamut among them), compressed by pydicom."""
    ds = dcmread(_testdata("SC_ybr_full_uncompressed.dcm"))
    one = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(ds.Rows, ds.Columns, 3)
    stack = np.stack([one if n % 2 == 0 else 255 - one for n in range(frames)])
    stack[0, 0, 0] = (255, 0, 0)  # Y 255 with Cb 0: no RGB colour has it
    ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_lossless_ybr_full_copy_keeps_its_samples(tmp_path: Path) -> None:
    """An RLE YBR_FULL image copied to Explicit VR LE holds the very samples stored, still
    YBR_FULL: it was converted to RGB (decompress()'s default), and 10 % of the samples
    could not be got back (review s40/bitexact finding 1). The lossy JPEG baseline YBR
    image still goes RGB, as every decoder gives it."""
    source = rle_ybr_full(tmp_path / "rle-ybr.dcm")
    spool = Spool(tmp_path / "spool", fsync=False)
    with open_transcoded(spool, source, EXPLICIT) as handle:
        got = dcmread(io.BytesIO(handle.read()))
    assert got.PhotometricInterpretation == "YBR_FULL"
    assert got.file_meta.TransferSyntaxUID == EXPLICIT
    assert np.array_equal(pixel_array(got, as_rgb=False),
                          pixel_array(str(source), as_rgb=False))
    baseline = _first_frames(tmp_path / "ybr.dcm", "color3d_jpeg_baseline.dcm", 1)
    with open_transcoded(spool, baseline, EXPLICIT) as handle:
        assert dcmread(io.BytesIO(handle.read())).PhotometricInterpretation == "RGB"


def _temp_bytes(spool: Spool) -> list[Path]:
    """Temp files with bytes (the empty ones are created ahead for the next writes)."""
    return [p for p in spool.tmp.glob("*") if p.stat().st_size]


def _testdata(name: str) -> Path:
    return Path(get_testdata_file(name))  # type: ignore[arg-type]


CASES = {
    "rle-16bit-signed": lambda d: _compressed(
        d / "rle16.dcm", RLELossless, (_smooth((5, 64, 80), 1, 4096) - 2048).astype("<i2"),
        bits_stored=12, signed=True),
    "rle-rgb": lambda d: _compressed(
        d / "rle-rgb.dcm", RLELossless, _smooth((3, 40, 50, 3), 2, 256).astype(np.uint8),
        bits_stored=8, samples=3),
    "rle-ybr-full": lambda d: rle_ybr_full(d / "rle-ybr.dcm"),
    "jpeg-ls": lambda d: _compressed(
        d / "jls.dcm", JPEGLSLossless, _smooth((4, 100, 120), 3, 4096).astype("<u2"),
        bits_stored=12),
    "jpeg-ls-emri": lambda d: _testdata("emri_small_jpeg_ls_lossless.dcm"),
    "jpeg-baseline-ybr": lambda d: _first_frames(d / "ybr.dcm", "color3d_jpeg_baseline.dcm", 4),
    "jpeg-2000": lambda d: _testdata("emri_small_jpeg_2k_lossless.dcm"),
    "big-endian-mr": lambda d: _testdata("MR_small_bigendian.dcm"),
    "big-endian-32bit": _big_endian,
    "implicit": lambda d: _testdata("MR_small_implicit.dcm"),
    "explicit": lambda d: _testdata("CT_small.dcm"),
    "un-explicit": lambda d: large_values(d / "un.dcm", ExplicitVRLittleEndian),
    "un-implicit": lambda d: large_values(d / "un-implicit.dcm", ImplicitVRLittleEndian),
    # Big endian: the UN values are read whole and copied unswapped, as the old whole-object
    # swap left them (their structure is unknown).
    "un-big-endian": lambda d: large_values(d / "un-big-endian.dcm", ExplicitVRBigEndian),
    "deflated": lambda d: large_values(d / "deflated.dcm", DeflatedExplicitVRLittleEndian),
    "deflated-image": lambda d: _testdata("image_dfl.dcm"),
}


COMBINATIONS = [(case, syntax, defer) for case in sorted(CASES)
                for syntax in (EXPLICIT, IMPLICIT) for defer in (transcode.DEFER_BYTES, 256)]


@pytest.mark.parametrize(("case", "syntax", "defer"), COMBINATIONS)
def test_the_copy_is_what_pydicoms_whole_decode_gives(tmp_path: Path, case: str, syntax: str,
                                                      defer: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``defer`` 256: nearly every value is copied from the file rather than read (the path
    a large object takes), and must come out the same."""
    monkeypatch.setattr(transcode, "DEFER_BYTES", defer)
    source = CASES[case](tmp_path)
    spool = Spool(tmp_path / "spool", fsync=False)
    expected = whole_decode(source, syntax)
    with open_transcoded(spool, source, syntax) as handle:
        copy = handle.read()
    assert copy == expected  # every element, the file meta, the pixels: byte for byte
    got, original = dcmread(io.BytesIO(copy)), dcmread(source)
    assert got.file_meta.TransferSyntaxUID == syntax
    assert got.SOPInstanceUID == got.file_meta.MediaStorageSOPInstanceUID \
        == original.SOPInstanceUID  # the same instance, never a new UID
    assert np.array_equal(got.pixel_array, original.pixel_array)
    assert not _temp_bytes(spool)  # the copy went with its handle


def _fragments(path: Path) -> tuple[bytes, list[bytes]]:
    """A single-fragment-per-frame encapsulated file split into (everything before the first
    fragment item, the fragments)."""
    data = path.read_bytes()
    start = data.index(struct.pack("<HHI", 0x7FE0, 0x0010, 0)[:4])
    offset = start + 12  # tag, OB, reserved, undefined length
    _, _, bot = struct.unpack_from("<HHI", data, offset)
    offset += 8 + bot
    head, fragments = data[:offset], []
    while True:
        group, element, length = struct.unpack_from("<HHI", data, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            return head, fragments
        fragments.append(data[offset + 8:offset + 8 + length])
        offset += 8 + length


def _encapsulated(head: bytes, fragments: list[bytes]) -> bytes:
    items = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f for f in fragments)
    return head + items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def test_a_copy_that_cannot_be_made_names_the_problem_and_leaves_nothing(
        tmp_path: Path) -> None:
    source = CASES["rle-16bit-signed"](tmp_path)
    spool = Spool(tmp_path / "spool", fsync=False)
    head, fragments = _fragments(source)
    assert len(fragments) == 5

    # A frame missing: the header announced 5 (Number of Frames is written before them).
    short = tmp_path / "short.dcm"
    short.write_bytes(_encapsulated(head, fragments[:4]))
    with pytest.raises(TranscodeError, match="4 frames decoded, Number of Frames is 5"):
        open_transcoded(spool, short, EXPLICIT)
    assert not _temp_bytes(spool)

    # A damaged third frame: decoding fails mid-write. An RLE header of no segment is
    # refused by every decoder; half a frame made pylibjpeg-rle panic (a BaseException that
    # would have ended the thread serving the viewer).
    for broken in (b"\x00" * 64, fragments[2][:len(fragments[2]) // 2]):
        damaged = tmp_path / "damaged.dcm"
        damaged.write_bytes(_encapsulated(head, [*fragments[:2], broken, *fragments[3:]]))
        with pytest.raises(TranscodeError, match="cannot be re-encoded"):
            open_transcoded(spool, damaged, IMPLICIT)
        assert not _temp_bytes(spool)

    with pytest.raises(TranscodeError, match="not produced here"):
        open_transcoded(spool, source, str(JPEGLSLossless))

    # The copy would cut into the free-space floor kept for the modalities' C-STOREs.
    full = Spool(tmp_path / "full", fsync=False, min_free_bytes=1 << 62)
    with pytest.raises(SpoolFull, match="temporary copy"):
        open_transcoded(full, source, EXPLICIT)
    assert not _temp_bytes(full)

    # Whatever the sender does with the copy, it is removed when the sender is done.
    with pytest.raises(ConnectionError), transcoded(spool, source, EXPLICIT) as path:
        assert path.stat().st_size > 5 * 64 * 80 * 2
        raise ConnectionError("the peer went away")
    assert not path.exists() and not _temp_bytes(spool)


def test_a_copy_counts_against_the_spool_quota_with_what_the_spool_holds(
        tmp_path: Path) -> None:
    """``storage.quota_mb`` is the operator's bound on the disk PAS takes: a temporary copy
    fits next to what the spool holds (the index's total) and the copies already made, or
    is refused (SpoolFull, naming the quota, the bytes needed and those in use) before a
    byte is written. It was checked against the free-space floor only: a decompressed copy
    took the spool past its quota."""
    source = CASES["rle-16bit-signed"](tmp_path)
    rooms: list[int] = []

    class Measuring(Spool):
        def open_temp(self, room: int = 0) -> tuple[Path, int]:
            rooms.append(room)
            return super().open_temp(room)

    with open_transcoded(Measuring(tmp_path / "measure", fsync=False), source, EXPLICIT):
        pass
    [room] = rooms
    assert room >= 5 * 64 * 80 * 2  # the decoded frames, at least

    quota, held = 1 << 20, [0]
    spool = Spool(tmp_path / "spool", fsync=False, quota_bytes=quota,
                  held_bytes=lambda: held[0])

    held[0] = quota - room + 1  # one byte short
    with pytest.raises(SpoolFull) as refused:
        open_transcoded(spool, source, EXPLICIT)
    assert str(refused.value) == (
        f"spool quota reached: {room} bytes needed for a temporary copy, {held[0]} in use, "
        f"quota {quota} ({held[0]} filed, 0 in other temporary copies)")
    assert not _temp_bytes(spool)

    held[0] = quota - 2 * room  # room for exactly two copies
    with open_transcoded(spool, source, EXPLICIT) as first, \
            transcoded(spool, source, IMPLICIT) as second:
        # Both held (the first already unlinked, its bytes kept by its handle): a third
        # does not fit beside them.
        with pytest.raises(SpoolFull, match=rf"{room} bytes needed for a temporary copy, "
                                            rf"{quota} in use, quota {quota} \({held[0]} "
                                            rf"filed, {2 * room} in other temporary copies\)"):
            open_transcoded(spool, source, EXPLICIT)
        assert first.read(4) and second.stat().st_size
    # Let go (the handle closed, the file removed): their room is free again.
    with open_transcoded(spool, source, EXPLICIT), transcoded(spool, source, EXPLICIT):
        pass
    # A dropped handle lets its room go too (the garbage collector closes it).
    open_transcoded(spool, source, EXPLICIT)
    with open_transcoded(spool, source, EXPLICIT), transcoded(spool, source, EXPLICIT):
        pass
    assert not _temp_bytes(spool)

    # Without a quota only the free-space floor counts, as before.
    held[0] = 10 * quota
    with open_transcoded(Spool(tmp_path / "free", fsync=False, held_bytes=lambda: held[0]),
                         source, EXPLICIT) as handle:
        assert handle.read(4)


def _dataset_start(path: Path) -> int:
    """Where the dataset starts: after the preamble, the prefix and the file meta group."""
    meta = read_file_meta_info(path)
    return 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)


def _copies_held() -> list[str]:
    """Descriptors this process holds on removed spool temp files (a copy, or an inflated
    dataset, not let go)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.endswith(".part (deleted)"):
                held.append(target)
    return held


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("stored", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_large_values_written_as_read_are_copied_from_the_file(
        tmp_path: Path, stored: str, syntax: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large value that pydicom's writer writes as the bytes read is copied from the file,
    never read whole: UN values that stay UN (private, or standard past 64 kB), a private one
    pydicom knows as OB, and, implicit in and out, the text too. Only the text value the
    writer converts (the 92 kB UT; the 3 kB LT is under the deferral threshold) is read."""
    source = large_values(tmp_path / "large.dcm", stored)
    expected = whole_decode(source, syntax)
    read: list[int] = []
    real = transcode.read_deferred_data_element

    def reading(*args: Any) -> Any:
        read.append(int(args[3].tag))
        return real(*args)

    monkeypatch.setattr(transcode, "read_deferred_data_element", reading)
    spool = Spool(tmp_path / "spool", fsync=False)
    with open_transcoded(spool, source, syntax) as handle:
        assert handle.read() == expected
    implicit_kept = stored == ImplicitVRLittleEndian and syntax == IMPLICIT
    assert read == ([] if implicit_kept else [0x0040A160])  # Text Value (UT)
    assert not _temp_bytes(spool)


def test_a_deflated_object_is_inflated_into_a_temp_file_a_chunk_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom inflates a deflated dataset whole, in memory (zlib.decompress): it goes to a
    spool temp file a chunk at a time instead, is read from there with its large values left
    in it, and the file goes with the copy."""
    source = large_values(tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    expected = {syntax: whole_decode(source, syntax) for syntax in (EXPLICIT, IMPLICIT)}
    inflated = len(zlib.decompress(source.read_bytes()[_dataset_start(source):],
                                   -zlib.MAX_WBITS))
    spool = Spool(tmp_path / "spool", fsync=False)

    def whole(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("the deflated dataset was inflated whole")

    monkeypatch.setattr(zlib, "decompress", whole)
    monkeypatch.setattr(inflate, "INFLATE_CHUNK", 4096)  # many chunks, either side
    monkeypatch.setattr(inflate, "ROOM_STEP", 64 << 10)
    held: list[int] = []
    real = transcode.dcmwrite

    def writing(fp: Any, ds: Any, **kwargs: Any) -> None:
        held.extend(p.stat().st_size for p in _temp_bytes(spool))
        real(fp, ds, **kwargs)

    monkeypatch.setattr(transcode, "dcmwrite", writing)
    for syntax in (EXPLICIT, IMPLICIT):
        with open_transcoded(spool, source, syntax) as handle:
            assert handle.read() == expected[syntax]
        assert not _temp_bytes(spool) and not _copies_held()
    assert held == [inflated, inflated]  # the inflated dataset, while each copy was written


class _FillingSpool(Spool):
    """A spool whose disk fills after ``room_checks`` asks for temp file room (None: never;
    ``asked`` counts them)."""

    def __init__(self, root: Path, room_checks: int | None):
        super().__init__(root, fsync=False)
        self.room_checks, self.asked = room_checks, 0

    def check_temp_room(self, room: int) -> None:
        self.asked += 1
        if self.room_checks is not None and self.asked > self.room_checks:
            raise SpoolFull("disk nearly full (the test's)")


def test_a_deflated_object_that_cannot_be_copied_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inflated dataset goes whatever stops the copy: a stream cut short, data that is
    not deflate, the disk filling while it inflates or before the copy is written, a
    failure while the copy is written."""
    source = large_values(tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    data, start = source.read_bytes(), _dataset_start(source)
    spool = Spool(tmp_path / "spool", fsync=False)

    def nothing_left(spool: Spool) -> None:
        assert not _temp_bytes(spool) and not _copies_held()

    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:start + (len(data) - start) // 2])
    with pytest.raises(TranscodeError, match="cut short"):
        open_transcoded(spool, cut, EXPLICIT)
    nothing_left(spool)

    garbage = tmp_path / "garbage.dcm"  # a block of the reserved type 3: invalid
    garbage.write_bytes(data[:start] + b"\xff" * 4096)
    with pytest.raises(TranscodeError, match="cannot be re-encoded.*invalid block type"):
        open_transcoded(spool, garbage, IMPLICIT)
    nothing_left(spool)

    monkeypatch.setattr(inflate, "INFLATE_CHUNK", 4096)
    monkeypatch.setattr(inflate, "ROOM_STEP", 64 << 10)  # asked again every 64 kB
    counting = _FillingSpool(tmp_path / "counting", None)
    with open_transcoded(counting, source, EXPLICIT):
        pass
    # Asked for the inflated file, as it grows (~570 kB), for the copy.
    assert counting.asked >= 2 + 8
    for room_checks in (0, 3, counting.asked - 1):
        full = _FillingSpool(tmp_path / f"full-{room_checks}", room_checks)
        with pytest.raises(SpoolFull, match="the test's"):
            open_transcoded(full, source, EXPLICIT)
        assert full.asked == room_checks + 1
        nothing_left(full)

    def failing(fp: Any, ds: Any, **kwargs: Any) -> None:
        fp.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transcode, "dcmwrite", failing)
    with pytest.raises(TranscodeError, match="No space left"):
        open_transcoded(spool, source, IMPLICIT)
    nothing_left(spool)
