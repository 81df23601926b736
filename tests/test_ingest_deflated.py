"""A Deflated Explicit VR Little Endian object is received with bounded memory (invariant 8),
indexed as before, and kept as sent (invariant 4).

Found in review (2026-12-04): ingest let pydicom inflate a deflated dataset whole in memory
(``dcmread``: ``zlib.decompress`` of the dataset, then a parse of that copy; the C-STORE path
first copied the dataset behind its header too), refusing only past 256 MiB inflated. One
deflated object of 200 MiB inflated (75 MB as sent) took the daemon's peak RSS up by 3.2
(C-STORE) and 3.7 (STOW-RS) times its inflated size (the STOW-RS handler read each part
twice more with pydicom for its answer). The dataset is now inflated a megabyte at a time into a
spool temp file counted against ``storage.quota_mb`` (appliance/store/inflate.py), mapped,
indexed in place like any explicit little endian one, and removed; the STOW-RS answer names
what the receiver's record read. Measured figures: docs/benchmarks.md.

Real peers: DCMTK storescu proposing deflated (``-xd``: it inflates the file and deflates it
again as it sends), httpx posting the file as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from appliance.ingest import reading, receive
from appliance.ingest.attributes import InvalidInstance
from appliance.store import index
from appliance.store.db import Database
from appliance.store.spool import Spool, SpoolFull
from tests.support import raw_ul
from tests.support.peers import PasProcess, storescu
from tests.test_ingest import dataset_part
from tests.test_ingest_spill import peak_rss_mb
from tests.test_serving_memory import _reset_peak
from tests.test_transcode_large_values_memory import _header, _write_object

DEFLATED = str(DeflatedExplicitVRLittleEndian)
SIDE = 1024  # frames of 1024 x 1024 16-bit pixels: 2 MiB each
FRAMES = 60  # 120 MiB inflated, under reading.MAX_INFLATED_BYTES (200 MiB measured too)
# Peak RSS growth allowed per object: measured +32 to +36 MB (the first 32 MB of the dataset,
# held until dicom.spill_above_mb, and the inflater's megabyte chunks); pydicom's whole
# inflate took +631 MB (C-STORE) and +747 MB (STOW-RS).
BOUND_MB = 80
DEFLATE_ON_THE_WIRE = ["-xd", "+cl", "1"]  # storescu: propose deflated, deflate fast


def _frames(count: int, seed: int) -> Iterator[bytes]:
    """12-bit pixels, a ramp down the rows and 4 bits of noise: deflate makes ~2.6x of them,
    as of real images (a smooth pattern alone deflated 200 MiB to 2 MB)."""
    rng = np.random.default_rng(seed)
    ramp = (np.arange(SIDE * SIDE, dtype=np.uint32) // SIDE * 3) % 4096
    for number in range(count):
        noise = rng.integers(0, 16, SIDE * SIDE, dtype=np.uint32)
        yield ((ramp + number * 13 + noise) % 4096).astype("<u2").tobytes()


def deflated_object(path: Path, frames: int = FRAMES, seed: int = 0) -> Path:
    """A multi-frame of ``frames`` x 2 MiB, deflated, written without holding it."""
    ds = _header("1.2.840.10008.5.1.4.1.1.7", Modality="OT", SamplesPerPixel=1,
                 PhotometricInterpretation="MONOCHROME2", Rows=SIDE, Columns=SIDE,
                 NumberOfFrames=frames, BitsAllocated=16, BitsStored=12, HighBit=11,
                 PixelRepresentation=0, StudyDescription="DEFLATED^BIG")
    return _write_object(path, DEFLATED, ds, {
        0x7FE00010: ("OW", frames * SIDE * SIDE * 2, lambda: _frames(frames, seed))})


def _inflated_sha(path: Path) -> str:
    """SHA-256 of a deflated file's dataset inflated, a megabyte at a time."""
    inflater, digest = zlib.decompressobj(-zlib.MAX_WBITS), hashlib.sha256()
    with open(path, "rb") as handle:
        read_preamble(handle, False)
        _read_file_meta_info(handle)
        while chunk := handle.read(1 << 20):
            while chunk and not inflater.eof:
                digest.update(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
    digest.update(inflater.flush())
    return digest.hexdigest()


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _outcome(call: object) -> object:
    try:
        return dataclasses.asdict(call())  # type: ignore[operator]
    except InvalidInstance as exc:
        return ("refused", str(exc).split(":")[0])


def _old_path(content: bytes) -> object:
    """What ingest did with a deflated file: pydicom's whole read, then the record."""
    def read() -> object:
        try:
            ds = dcmread(BytesIO(content), force=True)
        except Exception as exc:  # noqa: BLE001 - as read_record wrapped pydicom's errors
            raise InvalidInstance(f"cannot parse the dataset: {exc}") from None
        return reading._record(ds, UID(str(ds.file_meta.TransferSyntaxUID)))
    return _outcome(read)


def test_the_record_of_a_deflated_object_is_the_old_paths() -> None:
    """pydicom-data's deflated file gives the record pydicom's whole read gave; so does every
    explicit little endian file of pydicom-data deflated here, over both entries (a Part 10
    file, a network dataset), except where the old path took what the same dataset not
    deflated is refused for (a truncated one, one in implicit VR): it is refused alike now."""
    content = Path(get_testdata_file("image_dfl.dcm")).read_bytes()  # type: ignore[arg-type]
    record = _outcome(lambda: reading.read_record(content))
    assert isinstance(record, dict) and record["transfer_syntax_uid"] == DEFLATED
    assert record == _old_path(content)

    compared = stricter = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files():
            try:
                meta = dcmread(name, stop_before_pixels=True).file_meta
                syntax = UID(str(meta.TransferSyntaxUID))
                if "MediaStorageSOPInstanceUID" not in meta or not syntax.is_transfer_syntax \
                        or syntax.is_implicit_VR or not syntax.is_little_endian \
                        or syntax.is_deflated:
                    continue
                dataset = dataset_part(Path(name))
            except Exception:  # noqa: BLE001 - not a file with a usable meta
                continue
            packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            deflated = packer.compress(dataset) + packer.flush()
            header = receive.part10_header(str(meta.MediaStorageSOPClassUID),
                                           str(meta.MediaStorageSOPInstanceUID), DEFLATED)
            new = _outcome(lambda: reading.read_record(header + deflated))  # noqa: B023
            assert new == _outcome(lambda: reading.read_dataset_record(  # noqa: B023
                header, deflated, DEFLATED)), name  # noqa: B023
            old = _old_path(header + deflated)
            if new != old:  # only ever a refusal the dataset not deflated gets too
                plain = _outcome(lambda: reading.read_dataset_record(  # noqa: B023
                    header, dataset, str(syntax)))  # noqa: B023
                # (the message names the syntax: the deflated one, the file's)
                assert isinstance(new, tuple) and isinstance(plain, tuple), (name, old, new)
                assert new[1].split(" (")[0] == plain[1].split(" (")[0], (name, new, plain)
                stricter += 1
            compared += 1
    assert compared > 150 and stricter <= 5, (compared, stricter)


def test_a_bad_deflate_stream_is_refused_naming_the_problem() -> None:
    source = Path(get_testdata_file("image_dfl.dcm"))  # type: ignore[arg-type]
    meta = dcmread(source, stop_before_pixels=True).file_meta
    header = receive.part10_header(str(meta.MediaStorageSOPClassUID),
                                   str(meta.MediaStorageSOPInstanceUID), DEFLATED)
    deflated = dataset_part(source)
    for bad, reason in ((deflated[:len(deflated) // 2], "is cut short"),
                        (b"\xff" * 4096, "is not valid deflate data")):
        for read in (lambda: reading.read_dataset_record(header, bad, DEFLATED),  # noqa: B023
                     lambda: reading.read_record(header + bad)):  # noqa: B023
            with pytest.raises(InvalidInstance, match=f"the deflated dataset {reason}"):
                read()


def _temp_bytes(spool: Spool) -> int:
    return sum(p.stat().st_size for p in spool.tmp.glob("*.part"))


def test_the_inflated_copy_counts_against_the_quota_and_goes(tmp_path: Path) -> None:
    """Ingest's inflated copy is a temporary copy like a transcoded one: refused (0xA700 /
    507, SpoolFull naming the quota) when it does not fit beside what the spool holds, with
    nothing written; removed once the object is indexed, the file kept as sent. It lived
    in memory before, where the quota did not see it."""
    source = deflated_object(tmp_path / "deflated.dcm", frames=20)  # 40 MiB inflated
    content = source.read_bytes()
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool", fsync=False, quota_bytes=24 << 20,
                  held_bytes=lambda: index.spool_bytes(db))
    receiver = receive.Receiver(db, spool)
    with pytest.raises(SpoolFull, match="spool quota reached: .* temporary copy"):
        receiver.receive_file(content)
    assert not _temp_bytes(spool) and index.spool_bytes(db) == 0

    spool.quota_bytes = 128 << 20
    received = receiver.receive_file(content)
    stored = spool.path(f"{received.sha256[:2]}/{received.sha256}.dcm")
    assert stored.read_bytes() == content  # the deflated bytes as sent
    assert received.sha256 == hashlib.sha256(content).hexdigest()
    assert not _temp_bytes(spool) and not spool._copies  # the inflated copy gone, its room
    row = db.query_one("SELECT transfer_syntax_uid FROM instances")
    assert row is not None and row["transfer_syntax_uid"] == DEFLATED


def test_a_120_mb_deflated_object_costs_its_chunks_not_its_size(tmp_path: Path) -> None:
    """Over C-STORE (DCMTK storescu -xd) and STOW-RS (the file as it is), peak RSS of
    ``pas run``: the inflated dataset is on the spool, not in memory."""
    sent = deflated_object(tmp_path / "c-store.dcm", seed=1)
    posted = deflated_object(tmp_path / "stow.dcm", seed=2)
    # Past dicom.spill_above_mb (32 MB) as sent: both paths read it from their spill file.
    assert 32 << 20 < sent.stat().st_size < 120 << 20
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        assert pas.proc is not None
        url = f"http://127.0.0.1:{pas.http_port}/dicom-web/studies"
        boundary = "pas-deflated"

        def stow(path: Path) -> httpx.Response:
            head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            return httpx.post(url, content=head + path.read_bytes()
                              + f"\r\n--{boundary}--\r\n".encode(), timeout=120,
                              headers={"content-type": f'multipart/related; '
                                       f'type="application/dicom"; boundary={boundary}'})

        # Warm-up: a small deflated object each way (imports, the first temp file, mmap).
        small = deflated_object(tmp_path / "small.dcm", frames=3, seed=3)
        storescu([small], pas.port, extra=DEFLATE_ON_THE_WIRE)
        assert stow(deflated_object(tmp_path / "small2.dcm", frames=3, seed=4)
                    ).status_code == 200

        _reset_peak(pas.proc.pid)
        before = peak_rss_mb(pas.proc.pid)
        storescu([sent], pas.port, extra=DEFLATE_ON_THE_WIRE)
        c_store = peak_rss_mb(pas.proc.pid) - before
        _reset_peak(pas.proc.pid)
        before = peak_rss_mb(pas.proc.pid)
        response = stow(posted)
        stow_rs = peak_rss_mb(pas.proc.pid) - before
        print(f"{FRAMES * 2} MiB deflated ({sent.stat().st_size >> 20} MB sent): peak RSS "
              f"C-STORE +{c_store:.0f} MB, STOW-RS +{stow_rs:.0f} MB")
        assert response.status_code == 200, response.text
        stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                  for p in (pas.home / "spool").rglob("??/*.dcm")}
        assert len(stored) == 4 and pas.status()["instances"] == 4
        sent_uid, posted_uid = (dcmread(p, stop_before_pixels=True).SOPInstanceUID
                                for p in (sent, posted))
        # STOW-RS: the file byte for byte. C-STORE: storescu deflated the dataset again as
        # it sent it; what it sent is kept (its name is its hash), the same dataset inflated.
        assert _sha(stored[posted_uid]) == _sha(posted) == stored[posted_uid].stem
        assert _sha(stored[sent_uid]) == stored[sent_uid].stem
        assert dcmread(stored[sent_uid], stop_before_pixels=True).file_meta \
            .TransferSyntaxUID == DEFLATED
        assert _inflated_sha(stored[sent_uid]) == _inflated_sha(sent)
        assert not [p for p in (pas.home / "spool" / "tmp").glob("*") if p.stat().st_size]
        assert c_store < BOUND_MB and stow_rs < BOUND_MB, (c_store, stow_rs)
    finally:
        pas.stop()


def test_no_room_for_the_inflated_copy_is_out_of_resources_for_each_sender(
        tmp_path: Path) -> None:
    """The quota (24 MB) holds the ~15 MB deflated object, not its 40 MiB inflated copy:
    the C-STORE is answered 0xA700 and STOW-RS 507 (0xA700 in the failed part), each
    naming the quota, nothing written and no temp file left; the daemon serves on."""
    source = deflated_object(tmp_path / "deflated.dcm", frames=20)
    assert source.stat().st_size < 20 << 20
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_STORAGE__QUOTA_MB": "24"}).start()
    try:
        ds = dcmread(source, stop_before_pixels=True)
        sop_class = str(ds.SOPClassUID)
        raw = raw_ul.associate(pas.port, [(1, sop_class, DEFLATED)])
        try:
            answer = raw.c_store(1, sop_class, str(ds.SOPInstanceUID), dataset_part(source))
        finally:
            raw.release()
        assert struct.unpack("<H", answer[0x0900])[0] == 0xA700
        assert b"spool quota reached" in answer[0x0902] and b"temporary copy" in answer[0x0902]

        boundary = "pas-deflated"
        response = httpx.post(
            f"http://127.0.0.1:{pas.http_port}/dicom-web/studies",
            content=f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + source.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), timeout=60,
            headers={"content-type": f'multipart/related; type="application/dicom"; '
                                     f"boundary={boundary}"})
        assert response.status_code == 507, response.text
        [failed] = response.json()["00081198"]["Value"]
        assert failed["00081197"]["Value"][0] == 0xA700
        assert pas.status()["instances"] == 0
        assert not [p for p in (pas.home / "spool" / "tmp").glob("*") if p.stat().st_size]
        storescu([deflated_object(tmp_path / "small.dcm", frames=1)], pas.port,
                 extra=DEFLATE_ON_THE_WIRE)  # 2 MiB inflated: fits, and is filed
        assert pas.status()["instances"] == 1
    finally:
        pas.stop()


# In a child process, the peak RSS growth of one call: VmHWM reset to the current RSS first
# (ru_maxrss keeps the imports' peak, which can hide the call's).
PEAK_PROBE = (
    "import sys\n"
    "from pathlib import Path\n"
    "def peak():\n"
    "    for line in Path('/proc/self/status').read_text().splitlines():\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) // 1024\n"
    "def reset():\n"
    "    Path('/proc/self/clear_refs').write_text('5')\n")


def test_the_pack_stage_reads_no_deflated_dataset_to_find_its_pixel_layout(
        tmp_path: Path) -> None:
    """The uplink's pack stage looks for a native pixel layout (JPEG-LS bands) in each file:
    it let pydicom read a deflated one whole, inflating it in memory (measured: peak RSS +83
    MB for this 40 MiB one; objects up to 256 MiB are accepted), to find no layout it could
    use. It reads the file meta first now (+0 MB).
    A child process, so that its peak RSS is this call's."""
    path = deflated_object(tmp_path / "deflated.dcm", frames=20)  # 40 MiB inflated
    probe = PEAK_PROBE + (
        "from appliance.transfer.layout import _parse_layout\n"
        "_parse_layout(Path(sys.argv[1]))  # warm-up: its lazy imports are not the call\n"
        "reset(); before = peak()\n"
        "found = _parse_layout(Path(sys.argv[1]))\n"
        "print(found is None, peak() - before)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    none, grown_mb = result.stdout.split()
    assert none == "True"  # deflated: no layout, as before
    assert int(grown_mb) < 8, f"peak RSS +{grown_mb} MB to read a deflated file's layout"


def test_the_hubs_embedded_archive_files_a_deflated_object_without_inflating_it_whole(
        tmp_path: Path) -> None:
    """The hub's embedded archive read each rebuilt file's header with pydicom, which
    inflates a deflated dataset whole in memory first (up to 256 MiB per instance, on each
    archiving thread; measured +94 MB for this 40 MiB one). It reads it as the appliance's
    ingest does now (+10 MB: the inflater's in-memory first megabytes). A child process, so
    that its peak RSS is this call's; the index record is the one ingest makes."""
    path = deflated_object(tmp_path / "deflated.dcm", frames=20)  # 40 MiB inflated
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    probe = PEAK_PROBE + (
        "from appliance.hub.archive import EmbeddedArchive, RebuiltInstance\n"
        "archive = EmbeddedArchive(Path(sys.argv[2]))\n"
        "small = Path(sys.argv[5])  # warm-up: the lazy imports, the first temp file\n"
        "archive.store([RebuiltInstance(sys.argv[6], small, small.stat().st_size, "
        "sys.argv[7])], 'SITE')\n"
        "reset(); before = peak()\n"
        "archive.store([RebuiltInstance(sys.argv[3], Path(sys.argv[1]), "
        "Path(sys.argv[1]).stat().st_size, sys.argv[4])], 'SITE')\n"
        "print(peak() - before)\n")
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    small = deflated_object(tmp_path / "small.dcm", frames=1, seed=5)
    small_uid = str(dcmread(small, stop_before_pixels=True).SOPInstanceUID)
    result = subprocess.run([sys.executable, "-c", probe, str(path), str(tmp_path / "archive"),
                             uid, digest, str(small), small_uid,
                             hashlib.sha256(small.read_bytes()).hexdigest()],
                            capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    grown_mb = int(result.stdout.split()[-1])
    db = Database(tmp_path / "archive" / "pas.sqlite")
    row = db.query_one("SELECT sop_instance_uid, sha256, transfer_syntax_uid FROM instances "
                       "WHERE sop_instance_uid = ?", (uid,))
    assert row is not None and tuple(row) == (uid, digest, DEFLATED)
    expected = reading.read_record(path.read_bytes())
    assert db.query_one("SELECT count(*) FROM instances WHERE sop_class_uid = ?",
                        (expected.sop_class_uid,))[0] == 2
    print(f"archived a deflated instance of 40 MiB: peak RSS +{grown_mb} MB")
    assert grown_mb < 12, f"peak RSS +{grown_mb} MB to archive a deflated instance"
