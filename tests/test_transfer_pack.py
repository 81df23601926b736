"""Packing is exact to the byte: every real file, every pydicom-data file, across bucket
boundaries, big files split over buckets; bad payloads get clear errors (issue 3)."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

from appliance.transfer import jls, pack
from appliance.transfer.layout import pixel_layout
from appliance.transfer.pack import (
    BucketFormatError,
    PackError,
    PackItem,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)
from tests.support.peers import CT_DIR, MR_DIR


def item_for(path: Path, uid: str | None = None) -> PackItem:
    data = path.read_bytes()
    return PackItem(uid or str(path), path, len(data), hashlib.sha256(data).hexdigest())


def round_trip(items: list[PackItem], target: int = pack.DEFAULT_TARGET,
               level: str = "default",
               first: int | None = None) -> tuple[dict[str, bytes], dict[str, int], int]:
    """Pack and unpack every bucket; rebuild each file from its pieces, checking that the
    pieces tile it exactly. Returns rebuilt files, summed stats and the bucket count."""
    pieces: dict[str, list[pack.Piece]] = {}
    totals: dict[str, int] = {}
    plans = plan_buckets(items, target, first)
    for plan in plans:
        payload, stats = pack_bucket(plan, level)
        assert stats["packed"] == len(payload)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0) + value
        for piece in unpack_bucket(payload):
            pieces.setdefault(piece.sop_instance_uid, []).append(piece)
    rebuilt: dict[str, bytes] = {}
    for uid, parts in pieces.items():
        parts.sort(key=lambda p: p.offset)
        position = 0
        for part in parts:
            assert part.offset == position, f"{uid}: gap or overlap at {position}"
            position += len(part.data)
        assert position == parts[0].total_size
        rebuilt[uid] = b"".join(p.data for p in parts)
    return rebuilt, totals, len(plans)


def assert_exact(items: Iterable[PackItem], rebuilt: dict[str, bytes]) -> None:
    wrong = [i.path.name for i in items
             if hashlib.sha256(rebuilt[i.sop_instance_uid]).hexdigest() != i.sha256]
    assert wrong == []


def test_real_ct_and_mr_sets_round_trip_exactly_with_jpegls() -> None:
    for folder in (CT_DIR, MR_DIR):
        items = [item_for(p) for p in sorted(folder.glob("*.dcm"))]
        assert len(items) > 50
        rebuilt, stats, _ = round_trip(items)
        assert len(rebuilt) == len(items)
        assert_exact(items, rebuilt)
        assert stats["jpegls"] > 0 and stats["jpegls_fallback"] == 0
        assert stats["original"] == sum(i.size for i in items)
        # The lossless limit DESIGN.md states: 3.3x for CT, ~11x for MR.
        assert stats["original"] / stats["packed"] > (3.0 if folder == CT_DIR else 10.0)


@pytest.mark.parametrize("level", ["fast", "default"])
def test_every_pydicom_data_file_round_trips_across_bucket_boundaries(level: str) -> None:
    """Every file of pydicom's test data and pydicom-data (DICOM or not: bytes are bytes), in
    1 MiB buckets so that many files straddle or are split across buckets."""
    paths = sorted({Path(f) for f in get_testdata_files() if Path(f).is_file()})
    readable = 0
    for path in paths:
        try:
            pydicom.dcmread(path)
            readable += 1
        except Exception:
            pass
    assert readable > 200
    items = [item_for(p) for p in paths]
    rebuilt, stats, buckets = round_trip(items, target=1024 * 1024, level=level)
    assert buckets > 40
    assert_exact(items, rebuilt)
    assert stats["jpegls_fallback"] == 0
    assert (stats["jpegls"] > 0) == (level != "fast")


def write_dicom(path: Path, pixels: np.ndarray, *, bits_stored: int, signed: bool,
                big_endian: bool = False, frames: int = 1, samples: int = 1,
                planar: int = 0) -> Path:
    """A minimal valid file whose Pixel Data is exactly ``pixels``' bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    by_pixel = samples == 3 and planar == 0
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if by_pixel else pixels.shape[-2:]
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = planar
        ds.PhotometricInterpretation = "RGB"
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW" if pixels.dtype.itemsize == 2 else "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_hard_pixel_layouts_round_trip_exactly(tmp_path: Path) -> None:
    """Junk in the high bits above BitsStored, signed samples, big endian, odd lengths with
    a padding byte, colour by pixel and by plane: exact, and still JPEG-LS where possible."""
    rng = np.random.default_rng(7)
    smooth = np.cumsum(rng.integers(-2, 3, (96, 128)), axis=1)
    overlay_bits = np.zeros(smooth.shape, dtype=np.int64)  # an overlay plane in bits 12-15
    overlay_bits[20:40, 30:90] = 0xF000
    overlay_bits[60:62, :] = 0x8000
    cases = {
        "junk_high_bits": write_dicom(
            tmp_path / "a.dcm",
            ((smooth % 4096) | overlay_bits).astype("<u2"),
            bits_stored=12, signed=False),
        "signed": write_dicom(tmp_path / "b.dcm", (smooth - 1000).astype("<i2"),
                              bits_stored=16, signed=True),
        "signed_12_of_16": write_dicom(tmp_path / "c.dcm", (smooth % 2048 - 1024).astype("<i2"),
                                       bits_stored=12, signed=True),
        "big_endian": write_dicom(tmp_path / "d.dcm", (smooth + 500).astype(">u2"),
                                  bits_stored=16, signed=False, big_endian=True),
        "odd_length_8bit": write_dicom(
            tmp_path / "e.dcm", (np.abs(np.cumsum(rng.integers(-1, 2, (77, 101)), axis=1))
                                 % 256).astype("u1"), bits_stored=8, signed=False),
        "rgb_by_pixel": write_dicom(
            tmp_path / "f.dcm", np.stack([smooth % 256] * 3, axis=-1).astype("u1"),
            bits_stored=8, signed=False, samples=3, planar=0),
        "rgb_by_plane": write_dicom(
            tmp_path / "g.dcm", np.stack([smooth % 256] * 3).astype("u1"),
            bits_stored=8, signed=False, samples=3, planar=1),
        "multi_frame": write_dicom(
            tmp_path / "h.dcm", np.stack([(smooth + k) % 4096 for k in range(5)]).astype("<u2"),
            bits_stored=12, signed=False, frames=5),
    }
    for name, path in cases.items():
        items = [item_for(path, name)]
        rebuilt, stats, _ = round_trip(items)
        assert_exact(items, rebuilt)
        assert stats["jpegls"] > 0, name
        assert stats["jpegls_fallback"] == 0, name
    assert pydicom.dcmread(cases["odd_length_8bit"]).PixelData[-1:] == b"\x00"


def make_big_multiframe(path: Path, frames: int) -> Path:
    """A real CT slice repeated (shifted, so frames differ) into one big multi-frame file."""
    slice_ = pydicom.dcmread(sorted(CT_DIR.glob("*.dcm"))[0]).pixel_array
    stack = np.stack([np.roll(slice_, k, axis=0) for k in range(frames)]).astype("<i2")
    return write_dicom(path, stack, bits_stored=16, signed=True, frames=frames)


def test_big_file_is_split_over_buckets_and_rebuilt_exactly(tmp_path: Path) -> None:
    big = make_big_multiframe(tmp_path / "big.dcm", 24)  # ~12.6 MB
    small = [item_for(p) for p in sorted(CT_DIR.glob("*.dcm"))[:3]]
    items = [small[0], item_for(big, "big"), *small[1:]]
    target = 2 * 1024 * 1024
    plans = plan_buckets(items, target)
    spans = [p.index for p in plans for (item, _, _) in p.entries if item.sop_instance_uid == "big"]
    assert len(spans) == -(-items[1].size // target)
    rebuilt, stats, _ = round_trip(items, target=target)
    assert_exact(items, rebuilt)
    # Row bands inside the pieces still travel as JPEG-LS: most of the pixel bytes.
    assert stats["jpegls"] > 0.9 * items[1].size


def test_packing_memory_is_bounded_by_the_bucket_not_the_file(tmp_path: Path) -> None:
    big = item_for(make_big_multiframe(tmp_path / "big.dcm", 40), "big")  # ~21 MB
    target = 1024 * 1024
    plans = plan_buckets([big], target)
    tracemalloc.start()
    try:
        peak = 0
        for plan in plans:
            tracemalloc.reset_peak()
            payload, _ = pack_bucket(plan)
            sum(len(p.data) for p in unpack_bucket(payload))
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            del payload
    finally:
        tracemalloc.stop()
    assert big.size > 20 * target
    assert peak < 12 * target, f"peak {peak} bytes for {target}-byte buckets"


def test_plan_is_deterministic_and_keeps_small_files_whole(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    items = [item_for(p) for p in sorted(MR_DIR.glob("*.dcm"))[:40]] + [item_for(empty)]
    target = 512 * 1024
    first = plan_buckets(items, target)
    assert first == plan_buckets(list(items), target)
    seen: dict[str, int] = {}
    for plan in first:
        assert sum(length for _, _, length in plan.entries) <= target
        for item, offset, length in plan.entries:
            assert (offset, length) == (0, item.size)
            seen[item.sop_instance_uid] = seen.get(item.sop_instance_uid, 0) + 1
    assert set(seen.values()) == {1} and len(seen) == len(items)
    rebuilt, _, _ = round_trip(items, target)
    assert_exact(items, rebuilt)


def test_a_smaller_first_bucket_then_buckets_of_the_target(tmp_path: Path) -> None:
    items = [item_for(p) for p in sorted(MR_DIR.glob("*.dcm"))[:60]]
    target, first = 1024 * 1024, 256 * 1024
    plans = plan_buckets(items, target, first)
    assert plans == plan_buckets(list(items), target, first)  # a resumed transfer: the same
    sizes = [sum(length for _, _, length in plan.entries) for plan in plans]
    assert 0 < sizes[0] <= first < sizes[1] <= target
    assert len(plans) == len(plan_buckets(items, target)) + 1
    rebuilt, _, _ = round_trip(items, target, first=first)
    assert_exact(items, rebuilt)
    # A file bigger than the first bucket: cut at the first size, then at the target.
    big = item_for(make_big_multiframe(tmp_path / "big.dcm", 8), "big")
    pieces = [entry for plan in plan_buckets([big], target, first) for entry in plan.entries]
    assert [length for _, _, length in pieces][:2] == [first, target]
    assert sum(length for _, _, length in pieces) == big.size
    rebuilt, _, _ = round_trip([big], target, first=first)
    assert_exact([big], rebuilt)


def test_jpegls_that_is_not_exact_falls_back_to_zstd_and_is_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_encode = jls.encode

    def damaging_encode(samples: bytes, *args: int) -> bytes:
        broken = bytearray(samples)
        broken[len(broken) // 2] ^= 0x01  # a lossy codec: one sample off by one
        return real_encode(bytes(broken), *args)

    monkeypatch.setattr(jls, "encode", damaging_encode)
    # CT slices are bands of their own; MR images are stacked: both kinds fall back.
    items = [item_for(p) for p in sorted(CT_DIR.glob("*.dcm"))[:4]]
    items += [item_for(p) for p in sorted(MR_DIR.glob("*.dcm"))[:10]]
    rebuilt, stats, _ = round_trip(items)
    assert_exact(items, rebuilt)
    assert stats["jpegls"] == 0
    assert stats["jpegls_fallback"] == len(items)


def test_changed_or_truncated_stored_file_is_refused(tmp_path: Path) -> None:
    source = sorted(CT_DIR.glob("*.dcm"))[0]
    copy = tmp_path / "x.dcm"
    copy.write_bytes(source.read_bytes())
    item = item_for(copy)
    copy.write_bytes(source.read_bytes()[:-10])
    with pytest.raises(PackError, match="truncated"):
        pack_bucket(plan_buckets([item])[0])
    data = bytearray(source.read_bytes())
    data[5000] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(PackError, match="SHA-256"):
        pack_bucket(plan_buckets([item])[0])
    with pytest.raises(PackError, match="unknown packing level"):
        pack_bucket(plan_buckets([item_for(source)])[0], level="ultra")


_SAMPLE: list[bytes] = []


def sample() -> bytes:
    """Two real CT slices in one bucket (built once; not a fixture, so that hypothesis does
    not print a megabyte of it when reporting a case)."""
    if not _SAMPLE:
        items = [item_for(p) for p in sorted(CT_DIR.glob("*.dcm"))[:2]]
        _SAMPLE.append(pack_bucket(plan_buckets(items)[0])[0])
    return _SAMPLE[0]


@pytest.fixture(scope="module")
def sample_payload() -> bytes:
    return sample()


def rewrite_header(payload: bytes, change: callable) -> bytes:  # type: ignore[valid-type]
    (length,) = struct.unpack_from(">I", payload, 6)
    header = json.loads(payload[10 : 10 + length])
    change(header)
    encoded = json.dumps(header).encode()
    return payload[:6] + struct.pack(">I", len(encoded)) + encoded + payload[10 + length :]


def test_malformed_payloads_are_rejected_with_clear_errors(sample_payload: bytes) -> None:
    def seg_longer(h: dict) -> None:
        h["entries"][0]["segs"][0][1] += 1

    def blob_out_of_range(h: dict) -> None:
        h["entries"][0]["segs"][1][1] = 99

    def raw_bomb(h: dict) -> None:
        h["raw"] = 10**12

    def bad_dtype(h: dict) -> None:
        h["entries"][0]["segs"][1][6] = "<f8"

    def wrong_rows(h: dict) -> None:
        h["entries"][0]["segs"][1][2] += 1
        h["entries"][0]["length"] += h["entries"][0]["segs"][1][3] * 2
        h["entries"][0]["total"] += h["entries"][0]["segs"][1][3] * 2

    flipped_blob = bytearray(sample_payload)
    flipped_blob[-200] ^= 0xFF
    cases = {
        b"": "truncated",
        b"GARBAGE-GARBAGE": "PASPK",
        sample_payload[:-1]: "truncated or padded",
        sample_payload + b"x": "truncated or padded",
        sample_payload[:6] + b"\xff\xff\xff\xff" + sample_payload[10:]: "header length",
        sample_payload[:10] + b"\xff" + sample_payload[11:]: "not valid JSON",
        rewrite_header(sample_payload, seg_longer): "cover",
        rewrite_header(sample_payload, blob_out_of_range): "blob index",
        rewrite_header(sample_payload, raw_bomb): "raw size",
        rewrite_header(sample_payload, bad_dtype): "sample type",
        rewrite_header(sample_payload, wrong_rows): "JPEG-LS band",
    }
    for payload, message in cases.items():
        with pytest.raises(BucketFormatError, match=message):
            list(unpack_bucket(payload))
            pytest.fail(f"accepted: case {message!r}")
    # A corrupted codestream either fails to decode or decodes to other bytes; never a crash.
    try:
        pieces = list(unpack_bucket(bytes(flipped_blob)))
    except BucketFormatError:
        pieces = []
    assert all(isinstance(p, pack.Piece) for p in pieces)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_unpack_to_anything_else_than_an_error(data: bytes) -> None:
    with pytest.raises(BucketFormatError):
        list(unpack_bucket(data))
    with pytest.raises(BucketFormatError):
        list(unpack_bucket(pack.MAGIC + struct.pack(">I", len(data)) + data))


@settings(max_examples=200, deadline=None)
@given(position=st.one_of(st.integers(min_value=0, max_value=1500), st.integers(min_value=0)),
       value=st.integers(min_value=0, max_value=255))
def test_mutated_payloads_give_pieces_or_a_clear_error(position: int, value: int) -> None:
    """One byte set anywhere (header, zstd frame, JPEG-LS codestreams): a clear error or
    pieces, never another exception, a crash or a hang."""
    mutated = bytearray(sample())
    mutated[position % len(mutated)] = value
    try:
        pieces = list(unpack_bucket(bytes(mutated)))
    except BucketFormatError:
        return
    assert all(len(p.data) <= p.total_size for p in pieces)


def band_dtypes(payload: bytes) -> list[str]:
    (length,) = struct.unpack_from(">I", payload, 6)
    header = json.loads(payload[10 : 10 + length])
    return [seg[6] if seg[0] == 1 else seg[7]
            for entry in header["entries"] for seg in entry["segs"] if seg[0] in (1, 3)]


def test_layout_of_a_same_size_file_is_reused_only_when_its_header_matches(
        tmp_path: Path) -> None:
    """A series' files share one pydicom parse; a file of the same size whose geometry
    differs (8-bit 96x256 vs 16-bit 96x128: same byte count) is parsed on its own."""
    rng = np.random.default_rng(3)
    smooth = np.cumsum(rng.integers(-2, 3, (96, 256)), axis=1)
    paths = [
        write_dicom(tmp_path / "a.dcm", (smooth[:, :128] + 900).astype("<u2"), bits_stored=12,
                    signed=False),
        write_dicom(tmp_path / "b.dcm", (smooth[:, ::-1][:, :128] + 700).astype("<u2"),
                    bits_stored=12, signed=False),
        write_dicom(tmp_path / "c.dcm", (smooth % 200).astype("u1"), bits_stored=8,
                    signed=False),
    ]
    for path in paths:  # equal UID lengths so that the three files have one size
        ds = pydicom.dcmread(path)
        uid = "1.2.3.4." + path.stem.encode().hex()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(path, enforce_file_format=True)
    assert len({p.stat().st_size for p in paths}) == 1
    items = [item_for(p) for p in paths]
    payloads = [pack_bucket(plan_buckets([item])[0])[0] for item in items]
    assert [band_dtypes(p) for p in payloads] == [["<u2"], ["<u2"], ["u1"]]
    rebuilt, stats, _ = round_trip(items)
    assert_exact(items, rebuilt)
    assert stats["jpegls"] == sum(i.size for i in items) - sum(
        pixel_layout(i.path, i.size).start for i in items)


def test_concurrent_packing_is_exact_and_deterministic() -> None:
    """The uplink packs several buckets at once (threads sharing the JPEG-LS pool): each
    payload is the same bytes as when packed alone, so a bucket re-packed after a restart
    carries the same content."""
    from concurrent.futures import ThreadPoolExecutor

    items = [item_for(p) for p in sorted(CT_DIR.glob("*.dcm"))[:8]]
    items += [item_for(p) for p in sorted(MR_DIR.glob("*.dcm"))[:60]]
    plans = plan_buckets(items, 1024 * 1024)
    alone = [pack_bucket(plan)[0] for plan in plans]
    with ThreadPoolExecutor(4) as workers:
        together = list(workers.map(lambda plan: pack_bucket(plan)[0], plans))
    assert together == alone
    rebuilt: dict[str, list[pack.Piece]] = {}
    for payload in together:
        for piece in unpack_bucket(payload):
            rebuilt.setdefault(piece.sop_instance_uid, []).append(piece)
    assert_exact(items, {uid: b"".join(p.data for p in sorted(parts, key=lambda p: p.offset))
                         for uid, parts in rebuilt.items()})


def test_small_images_are_stacked_and_a_bad_stack_row_range_is_refused() -> None:
    items = [item_for(p) for p in sorted(MR_DIR.glob("*.dcm"))[:30]]
    payload, stats = pack_bucket(plan_buckets(items)[0])
    (length,) = struct.unpack_from(">I", payload, 6)
    header = json.loads(payload[10 : 10 + length])
    stacked = [seg for entry in header["entries"] for seg in entry["segs"] if seg[0] == 3]
    assert len(stacked) == len(items) and len({seg[1] for seg in stacked}) == 1
    assert stats["jpegls"] == sum(seg[3] * seg[4] * 2 for seg in stacked)
    rebuilt = {p.sop_instance_uid: p.data for p in unpack_bucket(payload)}
    assert_exact(items, rebuilt)

    def beyond_the_stack(h: dict) -> None:
        last = [seg for seg in h["entries"][-1]["segs"] if seg[0] == 3][0]
        last[2] += 1  # one row past the stack's end

    with pytest.raises(BucketFormatError, match="do not tile its rows"):
        list(unpack_bucket(rewrite_header(payload, beyond_the_stack)))


def replace_blob(payload: bytes, number: int, blob: bytes) -> bytes:
    """The payload with JPEG-LS blob ``number`` replaced (header lengths kept consistent)."""
    (length,) = struct.unpack_from(">I", payload, 6)
    header = json.loads(payload[10 : 10 + length])
    position = 10 + length
    blobs = []
    for size in header["blobs"]:
        blobs.append(payload[position : position + size])
        position += size
    blobs[number] = blob
    header["blobs"] = [len(b) for b in blobs]
    encoded = json.dumps(header).encode()
    return payload[:6] + struct.pack(">I", len(encoded)) + encoded + b"".join(blobs)


def test_a_jpegls_scan_without_its_end_marker_is_refused_before_decoding() -> None:
    """Found by fuzzing: CharLS spends seconds on a scan of random bytes that runs off the end
    of its buffer; such a codestream (no EOI) is refused before CharLS sees it."""
    items = [item_for(p) for p in sorted(MR_DIR.glob("*.dcm"))[:8]]
    payload, _ = pack_bucket(plan_buckets(items)[0])
    (length,) = struct.unpack_from(">I", payload, 6)
    first_blob = 10 + length + json.loads(payload[10 : 10 + length])["blobs"][0]
    blob = payload[first_blob:]
    sos = blob.index(b"\xff\xda")
    header_of_blob = blob[: sos + 2 + int.from_bytes(blob[sos + 2 : sos + 4], "big")]
    noise = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    with pytest.raises(BucketFormatError, match="EOI"):
        list(unpack_bucket(replace_blob(payload, 1, header_of_blob + noise)))


def test_the_fuzzed_slow_codestream_is_refused_at_once() -> None:
    """A reproducer of what the fuzzer found: a 128x24 9-bit scan of one repeated byte (0x44)
    and no EOI, on which CharLS spends 14 s here before failing."""
    samples = (np.arange(128 * 24) % 300).astype("<u2").tobytes()
    valid = jls.encode(samples, 24, 128, 1, 9, 0)
    scan = b"\x44" * (len(valid) - 27)
    with pytest.raises(jls.JlsError, match="EOI"):
        jls.decode(valid[:25] + scan)
    assert jls.decode(valid)[0] == samples
