"""An instance sent in another transfer syntax than the one stored costs bounded memory
(invariant 8), and what arrives is the same instance with the pixels pydicom decodes.

Found in review (measured 2026-12, peak RSS of `pas run`, an RLE object of 300 frames of
1 MB, 5 MB stored): the three senders decoded the whole object with pydicom (dcmread,
decompress, then an encoding in memory): WADO-RS asking for Explicit VR Little Endian
+1,383 MB, C-GET by a viewer proposing only uncompressed syntaxes +1,026 MB, routing to a
node accepting only uncompressed +1,090 MB. They now re-encode it into a spool temp file a
frame at a time (appliance/store/transcode.py) and send that file as they send stored ones
(+10, +6 and +6 MB); the temp file goes once sent.

The expected pixels are pydicom's decode of the object, hashed a frame at a time
(iter_pixels; once per worker, the objects built here all having the same frames): a whole
decode in this process would raise its peak RSS by the object's size, which a libFuzzer
harness run later by the same pytest worker inherits.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import struct
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import iter_pixels
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid

from tests.support.configs import everything_to
from tests.support.peers import DCMTK_ENV, PasProcess, StoreSCP, storescu, wait_for
from tests.test_routing import jobs_of
from tests.test_serving_memory import _growth, _single_part

FRAMES = 300
SIDE = 1024  # 300 frames of 1 MiB: 300 MiB decoded
EXPLICIT = "1.2.840.10008.1.2.1"
UNCOMPRESSED = (EXPLICIT, "1.2.840.10008.1.2")
PIXEL_DATA = 0x7FE00010
# Peak RSS growth allowed per send: measured +6 to +10 MB, x2 (a frame decoded and its bytes, the
# 1 MB write buffer, one PDU fragment, the header); the whole-object decode took ~1 GB.
BOUND_MB = 20


def _frame(number: int) -> np.ndarray:
    """Frame ``number``: each row one value, shifted from frame to frame (all differ)."""
    rows = (np.arange(SIDE, dtype=np.uint32) * 7 + number * 13) % 256
    return np.repeat(rows.astype(np.uint8)[:, None], SIDE, axis=1)


def _rle_frame(image: np.ndarray) -> bytes:
    """One RLE Lossless frame (PS3.5 G): one segment, each row 8 replicate runs of 128."""
    segment = b"".join(bytes((0x81, value)) * (SIDE // 128) for value in image[:, 0].tolist())
    return struct.pack("<16I", 1, 64, *[0] * 14) + segment


def _rle_object(path: Path, frames: int = FRAMES) -> Path:
    """A 300 MB (decoded) RLE multi-frame of 5 MB (``frames`` of 1 MiB), written without
    holding it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "RLE1", "BIG^RLE", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = SIDE
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.save_as(path, enforce_file_format=True)
    with open(path, "ab") as handle:
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        handle.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))  # empty basic offset table
        for number in range(frames):
            fragment = _rle_frame(_frame(number))
            handle.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment)
        handle.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return path


def _decoded_sha(path: Path) -> str:
    """SHA-256 of pydicom's decode of the object, a frame at a time; checked against the
    frames it was built from."""
    by_pydicom, built = hashlib.sha256(), hashlib.sha256()
    for number, array in enumerate(iter_pixels(path)):
        by_pydicom.update(array.tobytes())
        built.update(_frame(number).tobytes())
    assert by_pydicom.hexdigest() == built.hexdigest()
    return by_pydicom.hexdigest()


@functools.cache
def _pixels_sha() -> str:
    """:func:`_decoded_sha` of an object :func:`_rle_object` builds, once per worker: every
    object it builds has the same frames, byte for byte (only the UIDs differ), and pydicom's
    decode of 300 frames took ~0.9 s of each test."""
    with tempfile.TemporaryDirectory(prefix="pas-rle-") as tmp:
        return _decoded_sha(_rle_object(Path(tmp) / "rle.dcm"))


def _check_received(path: Path, sop_instance_uid: str, pixels_sha: str) -> str:
    """The received file is the instance, uncompressed, with those pixels; its syntax."""
    ds = dcmread(path, defer_size=1024)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    assert syntax in UNCOMPRESSED, syntax
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == sop_instance_uid
    assert (int(ds.NumberOfFrames), ds.Rows, ds.Columns) == (FRAMES, SIDE, SIDE)
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    assert raw.length == FRAMES * SIDE * SIDE
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(raw.value_tell)
        left = raw.length
        while left:
            chunk = handle.read(min(left, 1 << 20))
            assert chunk, "the received file is short"
            digest.update(chunk)
            left -= len(chunk)
    assert digest.hexdigest() == pixels_sha
    return syntax


def _copies_held(pas: PasProcess) -> list[str]:
    """Temp files with bytes, and descriptors the daemon holds on removed temp files (a
    WADO-RS copy is removed from the folder as soon as it is opened): copies not let go.
    The temp files created ahead for writes are empty."""
    assert pas.proc is not None
    held = [str(p) for p in (pas.home / "spool" / "tmp").glob("*") if p.stat().st_size]
    for fd in os.listdir(f"/proc/{pas.proc.pid}/fd"):
        try:  # a descriptor closed since the listing is not a leak
            target = os.readlink(f"/proc/{pas.proc.pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if "/spool/tmp/" in target and target.endswith("(deleted)"):
            held.append(target)
    return held


def _no_temp_copy(pas: PasProcess) -> None:
    """The temp copy went once sent, or once the send was given up."""
    wait_for(lambda: not _copies_held(pas), 10, what="no temp copy left")


def _part_to_file(url: str, headers: dict[str, str], out: Path) -> tuple[int, str]:
    """(status, part headers) of a WADO-RS answer of one part, its body written to ``out``
    as it streams (the test process stays small)."""
    with httpx.stream("GET", url, headers=headers, timeout=120) as answer:
        if answer.status_code != 200:
            return answer.status_code, answer.read().decode(errors="replace")
        boundary = answer.headers["content-type"].split("boundary=")[1].strip('"')
        closing = f"\r\n--{boundary}--\r\n".encode()
        head, pending = b"", b""
        with open(out, "wb") as handle:
            for chunk in answer.iter_bytes(1 << 20):
                if not head:
                    pending += chunk
                    if b"\r\n\r\n" not in pending:
                        continue
                    head, _, chunk = pending.partition(b"\r\n\r\n")
                    pending = b""
                pending += chunk
                handle.write(pending[:-len(closing)])
                pending = pending[-len(closing):]
        assert pending == closing, pending
        return 200, head.decode()


def _stored(tmp_path: Path, pas: PasProcess) -> tuple[Path, Dataset, str]:
    big = _rle_object(tmp_path / "rle.dcm")
    storescu([big], pas.port, extra=["-xr"])  # RLE proposed: kept RLE
    (stored,) = list((pas.home / "spool").rglob("??/*.dcm"))
    assert dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    return big, dcmread(big, stop_before_pixels=True), _pixels_sha()


def test_wado_rs_of_a_300_mb_rle_object_in_explicit_little_endian(tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        _, header, pixels_sha = _stored(tmp_path, pas)
        url = (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{header.StudyInstanceUID}"
               f"/series/{header.SeriesInstanceUID}/instances/{header.SOPInstanceUID}")
        accept = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'
        received = tmp_path / "wado.dcm"

        def retrieve() -> tuple[int, str]:
            return _part_to_file(url, {"accept": accept}, received)

        growth, (status, head) = _growth(pas, retrieve)  # type: ignore[misc]
        print(f"WADO-RS of a {FRAMES} MB RLE object as {EXPLICIT}: peak RSS +{growth:.0f} MB")
        assert status == 200, head
        assert f"transfer-syntax={EXPLICIT}" in head
        assert _check_received(received, header.SOPInstanceUID, pixels_sha) == EXPLICIT
        assert growth < BOUND_MB, growth  # was +1,383 MB
        _no_temp_copy(pas)
    finally:
        pas.stop()


def test_c_get_of_a_300_mb_rle_object_by_a_viewer_without_rle(tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        _, header, pixels_sha = _stored(tmp_path, pas)
        out = tmp_path / "get"
        out.mkdir()

        def get() -> subprocess.CompletedProcess[str]:
            # getscu proposes only uncompressed syntaxes for storage; +B writes as received.
            return subprocess.run(
                ["getscu", "-aet", "VIEWER", "-aec", "PAS", "-S", "+B", "-od", str(out),
                 "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={header.StudyInstanceUID}",
                 "127.0.0.1", str(pas.port)],
                env=DCMTK_ENV, capture_output=True, text=True, timeout=120)

        growth, result = _growth(pas, get)  # type: ignore[misc]
        print(f"C-GET of a {FRAMES} MB RLE object, uncompressed: peak RSS +{growth:.0f} MB")
        assert result.returncode == 0, result.stderr[-2000:]  # type: ignore[attr-defined]
        (received,) = [p for p in out.rglob("*") if p.is_file()]
        _check_received(received, header.SOPInstanceUID, pixels_sha)
        assert growth < BOUND_MB, growth  # was +1,026 MB
        _no_temp_copy(pas)
    finally:
        pas.stop()


def test_routing_a_300_mb_rle_object_to_a_node_without_rle(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "node", ae_title="OLDPACS").start()  # uncompressed only
    config = everything_to(tmp_path / "appliance.toml", scp)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_CONFIG": str(config)}).start()
    try:
        big = _rle_object(tmp_path / "rle.dcm")
        header = dcmread(big, stop_before_pixels=True)
        storescu([big], pas.port, extra=["-xr"])

        def route() -> list[dict[str, object]]:
            # The job is made once the study has been quiet for a second: the peak is reset
            # (by _growth) before it starts.
            wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] in (["done"], ["failed"]),
                     60, what="the job finished")
            return jobs_of(pas.home)

        growth, jobs = _growth(pas, route)  # type: ignore[misc]
        print(f"routing a {FRAMES} MB RLE object to a node without RLE: peak RSS "
              f"+{growth:.0f} MB")
        assert [(j["state"], j["attempts"]) for j in jobs] == [("done", 1)], jobs  # type: ignore[attr-defined]
        (received,) = scp.files()
        _check_received(received, header.SOPInstanceUID, _pixels_sha())
        assert growth < BOUND_MB, growth  # was +1,090 MB
        _no_temp_copy(pas)
    finally:
        pas.stop()
        scp.stop()


def test_a_send_cut_short_leaves_no_copy_behind(tmp_path: Path) -> None:
    """A WADO-RS client that goes away after 16 MB, a viewer killed in the middle of its
    C-GET: the copy each had started is let go (file and descriptor), and the daemon still
    serves the instance whole."""
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        _, header, pixels_sha = _stored(tmp_path, pas)
        url = (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{header.StudyInstanceUID}"
               f"/series/{header.SeriesInstanceUID}/instances/{header.SOPInstanceUID}")
        with httpx.stream("GET", url, timeout=120) as answer:
            assert answer.status_code == 200
            read = 0
            for chunk in answer.iter_bytes(1 << 20):
                read += len(chunk)
                if read > 16 << 20:
                    break  # the connection is closed with the stream
        _no_temp_copy(pas)

        out = tmp_path / "get"
        out.mkdir()
        viewer = subprocess.Popen(
            ["getscu", "-aet", "VIEWER", "-aec", "PAS", "-S", "+B", "-od", str(out),
             "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={header.StudyInstanceUID}", "127.0.0.1", str(pas.port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                     > 16 << 20 or viewer.poll() is not None, 30, interval=0.005,
                     what="the viewer receiving")
            assert viewer.poll() is None, "the C-GET ended before it could be cut"
            os.kill(viewer.pid, signal.SIGKILL)
        finally:
            viewer.wait()
        _no_temp_copy(pas)

        received = tmp_path / "whole.dcm"
        assert _part_to_file(url, {}, received)[0] == 200
        _check_received(received, header.SOPInstanceUID, pixels_sha)
        _no_temp_copy(pas)
    finally:
        pas.stop()


def test_bulk_data_of_a_300_mb_rle_object_is_decoded_a_frame_at_a_time(tmp_path: Path) -> None:
    """/bulkdata/7FE00010 of compressed pixels (where /metadata's BulkDataURI points): every
    frame decoded, as /frames gives them. It decoded the whole object, then copied it twice."""
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        _, header, pixels_sha = _stored(tmp_path, pas)
        url = (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{header.StudyInstanceUID}"
               f"/series/{header.SeriesInstanceUID}/instances/{header.SOPInstanceUID}"
               "/bulkdata/7FE00010")
        growth, answer = _growth(pas, lambda: _single_part(url))
        print(f"bulk data of a {FRAMES} MB RLE object: peak RSS +{growth:.0f} MB")
        assert answer == (200, pixels_sha, FRAMES * SIDE * SIDE)
        assert growth < BOUND_MB, growth
    finally:
        pas.stop()
