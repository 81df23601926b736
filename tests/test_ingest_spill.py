"""Large C-STOREs go to disk as they arrive (`dicom.spill_above_mb`): memory stays bounded
whatever the object's size (invariant 8), and what is kept is still the dataset as sent.

Found in review (2026-12-03): one C-STORE was held whole in memory; a 1 GiB instance took
the daemon from 99 to 1,118 MB, and a few tomosynthesis objects at once could have had the
OOM killer end it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.support import raw_ul
from tests.support.peers import CT_DIR, MR_DIR, PasProcess, storescu, wait_for
from tests.test_dicomnet import as_sent, datasets_held
from tests.test_ingest import dataset_part


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def temp_bytes(pas: PasProcess) -> int:
    """Bytes in the spool's temp files (the empty ones are created ahead)."""
    return sum(p.stat().st_size for p in (pas.home / "spool" / "tmp").glob("*.part"))


def test_spilled_datasets_are_kept_as_sent_and_refusals_still_hold(tmp_path: Path) -> None:
    """``spill_above_mb = 0``: every dataset goes through the spill file."""
    files = sorted(CT_DIR.glob("*.dcm"))[:20] + sorted(MR_DIR.rglob("*.dcm"))[:40]
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__SPILL_ABOVE_MB": "0"}).start()
    try:
        storescu(files, pas.port)
        stored = list((pas.home / "spool").rglob("??/*.dcm"))
        assert datasets_held(stored) == as_sent(tmp_path, files)
        assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in stored)
        assert pas.status()["instances"] == len(files)
        # A truncated object spilled is refused as before, and its temp file goes.
        source = files[0]
        truncated = tmp_path / "truncated.dcm"
        content = source.read_bytes()
        truncated.write_bytes(content[: len(content) - len(dataset_part(source)) // 3])
        ds = dcmread(source, stop_before_pixels=True)
        raw = raw_ul.associate(pas.port, [(1, str(ds.SOPClassUID), "1.2.840.10008.1.2.1")])
        try:
            answer = raw.c_store(1, str(ds.SOPClassUID), "1.2.826.0.1.3680043.8.498.77",
                                 dataset_part(truncated))
        finally:
            raw.release()
        assert struct.unpack("<H", answer[0x0900])[0] in (0xC210, 0xA900)
        assert pas.status()["instances"] == len(files)
        wait_for(lambda: temp_bytes(pas) == 0, 10, what="no temp file with bytes left")
    finally:
        pas.stop()


PIXEL_HEADER = struct.Struct("<HH2sHI")  # (7FE0,0010) OB, 2 reserved bytes, 32-bit length


def _small_secondary_capture(megabytes: int) -> Dataset:
    """A Secondary Capture whose header announces ``megabytes`` of 8-bit pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "SPILL1", "BIG^OBJECT", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = megabytes
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def _pixel_chunks(megabytes: int) -> Iterator[bytes]:
    """The Pixel Data element, a megabyte at a time (pseudo-random, not compressible), so
    that the test process itself stays small: libFuzzer, run later by the same pytest
    worker, inherits its peak RSS and would report an out-of-memory at its first input."""
    yield PIXEL_HEADER.pack(0x7FE0, 0x0010, b"OB", 0, megabytes << 20)
    block = np.random.default_rng(7).integers(0, 255, size=1 << 20, dtype=np.uint8).tobytes()
    for index in range(megabytes):
        yield block[index % 251:] + block[:index % 251]


def _big_secondary_capture(path: Path, megabytes: int) -> Path:
    """Written without holding the object: its header by pydicom, then its pixels."""
    _small_secondary_capture(megabytes).save_as(path, enforce_file_format=True)
    with open(path, "ab") as handle:
        for chunk in _pixel_chunks(megabytes):
            handle.write(chunk)
    return path


def _dataset_offset(path: Path) -> int:
    """Where a Part 10 file's dataset starts (after its preamble and file meta)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as handle:
        read_preamble(handle, False)
        _read_file_meta_info(handle)
        return handle.tell()


def _sha256(path: Path, dataset_only: bool = False) -> str:
    """SHA-256 of a file (or of its dataset part), read a megabyte at a time."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if dataset_only:
            read_preamble(handle, False)
            _read_file_meta_info(handle)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_300_mb_object_costs_the_spill_threshold_not_its_size(tmp_path: Path) -> None:
    big = _big_secondary_capture(tmp_path / "big.dcm", 300)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__SPILL_ABOVE_MB": "32"}).start()
    try:
        assert pas.proc is not None
        before = peak_rss_mb(pas.proc.pid)
        storescu([big], pas.port)
        growth = peak_rss_mb(pas.proc.pid) - before
        print(f"peak RSS {before:.0f} MB -> +{growth:.0f} MB for a 300 MB object")
        assert growth < 120, growth  # the 32 MB threshold, PDUs and copies; not 300 MB
        (stored,) = list((pas.home / "spool").rglob("??/*.dcm"))
        assert _sha256(stored, dataset_only=True) == _sha256(big, dataset_only=True)
        assert _sha256(stored) == stored.stem
    finally:
        pas.stop()


def test_an_association_cut_in_the_middle_of_a_spill_leaves_nothing(tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__SPILL_ABOVE_MB": "1"}).start()
    try:
        from appliance.dicomnet.direct_receive import p_data_tf
        from appliance.dicomnet.direct_store import c_store_rq

        ct = str(dcmread(sorted(CT_DIR.glob("*.dcm"))[0], stop_before_pixels=True).SOPClassUID)
        raw = raw_ul.associate(pas.port, [(1, ct, "1.2.840.10008.1.2.1")])
        raw.sock.sendall(p_data_tf(1, 0x03, c_store_rq(ct, "1.2.826.0.1.3680043.8.498.78", 1)))
        for _ in range(40):  # 2.5 MB of a dataset that never ends: over the threshold
            raw.sock.sendall(p_data_tf(1, 0x00, b"\x00" * (64 << 10)))
        wait_for(lambda: temp_bytes(pas) > 1 << 20, 10, what="the dataset spilled")
        raw.sock.close()
        wait_for(lambda: temp_bytes(pas) == 0, 10, what="the spill file removed")
        assert pas.status()["instances"] == 0
        storescu(sorted(MR_DIR.rglob("*.dcm"))[:1], pas.port)  # and the daemon serves on
        assert pas.status()["instances"] == 1
    finally:
        pas.stop()


def test_a_spilled_c_store_refused_before_filing_leaves_no_temp_file(tmp_path: Path) -> None:
    """0x0122 (the SOP class is not its context's) is answered before the dataset is read:
    its spill file and descriptor must go all the same (review: 23 such C-STOREs left 66 MB
    in spool/tmp and 24 open descriptors until a restart)."""
    import os

    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__SPILL_ABOVE_MB": "0"}).start()
    try:
        assert pas.proc is not None
        source = sorted(CT_DIR.glob("*.dcm"))[0]
        uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        mr, explicit = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1"
        raw = raw_ul.associate(pas.port, [(1, mr, explicit)])
        try:
            for _ in range(5):
                answer = raw.c_store(1, "1.2.840.10008.5.1.4.1.1.2", uid, dataset_part(source))
                assert struct.unpack("<H", answer[0x0900])[0] == 0x0122
        finally:
            raw.release()
        assert temp_bytes(pas) == 0
        # No descriptor left on a temp file with bytes (those created ahead are empty).
        for fd in os.listdir(f"/proc/{pas.proc.pid}/fd"):
            try:  # a descriptor closed since the listing (another thread's) is not a leak
                target = os.readlink(f"/proc/{pas.proc.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            assert not ("/spool/tmp/" in target and target.endswith("(deleted)")), target
            if "/spool/tmp/" in target:
                assert Path(target).stat().st_size == 0, target
    finally:
        pas.stop()


def test_a_deflate_bomb_is_refused_without_inflating_it_in_memory(tmp_path: Path) -> None:
    """A deflated dataset whose 300 MB of zeros travel as ~300 kB: pydicom would inflate it
    whole in memory; it is refused while being counted, a megabyte at a time."""
    import zlib
    big = _small_secondary_capture(300)
    head = tmp_path / "head.dcm"
    big.save_as(head, enforce_file_format=True)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(dataset_part(head)),
             packer.compress(PIXEL_HEADER.pack(0x7FE0, 0x0010, b"OB", 0, 300 << 20))]
    zeros = bytes(1 << 20)
    parts += [packer.compress(zeros) for _ in range(300)]
    deflated = b"".join(parts) + packer.flush()
    assert len(deflated) < 2 << 20
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        assert pas.proc is not None
        before = peak_rss_mb(pas.proc.pid)
        sc = str(big.SOPClassUID)
        raw = raw_ul.associate(pas.port, [(1, sc, "1.2.840.10008.1.2.1.99")])
        try:
            answer = raw.c_store(1, sc, str(big.SOPInstanceUID), deflated)
        finally:
            raw.release()
        assert struct.unpack("<H", answer[0x0900])[0] == 0xC210
        assert b"inflates past" in answer[0x0902]
        assert peak_rss_mb(pas.proc.pid) - before < 100
        assert pas.status()["instances"] == 0
    finally:
        pas.stop()


def test_a_big_endian_object_over_the_threshold_is_not_read_into_memory(
        tmp_path: Path) -> None:
    """Explicit VR Big Endian is not walked by the quick header read: pydicom parses it.
    It used to be handed the whole spilled dataset copied into memory (and its pixel data
    read again), ~3x the object; it now reads the mapped file in place, large values left
    unread."""
    import mmap

    from pydicom.uid import ExplicitVRBigEndian

    megabytes = 200
    big = tmp_path / "big-endian.dcm"
    ds = _small_secondary_capture(megabytes)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.save_as(big, enforce_file_format=True)
    chunks = _pixel_chunks(megabytes)
    next(chunks)  # the little-endian element header: this one is big endian
    with open(big, "ab") as handle:
        handle.write(struct.pack(">HH2sHI", 0x7FE0, 0x0010, b"OB", 0, megabytes << 20))
        for chunk in chunks:  # 8-bit pixels: the same bytes in either byte order
            handle.write(chunk)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__SPILL_ABOVE_MB": "32"}).start()
    try:
        assert pas.proc is not None
        before = peak_rss_mb(pas.proc.pid)
        with open(big, "rb") as handle:
            whole = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        dataset = memoryview(whole)[_dataset_offset(big):]
        raw = raw_ul.associate(pas.port, [(1, SecondaryCaptureImageStorage,
                                           ExplicitVRBigEndian)])
        try:  # slices of the mapped file, 64 kB each: the test process stays small
            answer = raw.c_store(1, SecondaryCaptureImageStorage, ds.SOPInstanceUID,
                                 dataset)  # type: ignore[arg-type]
        finally:
            raw.release()
            dataset.release()
            whole.close()
        assert struct.unpack("<H", answer[0x0900])[0] == 0x0000
        growth = peak_rss_mb(pas.proc.pid) - before
        print(f"peak RSS {before:.0f} MB -> +{growth:.0f} MB for a 200 MB big-endian object")
        (stored,) = list((pas.home / "spool").rglob("??/*.dcm"))
        assert dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID \
            == ExplicitVRBigEndian
        assert _sha256(stored, dataset_only=True) == _sha256(big, dataset_only=True)
        assert _sha256(stored) == stored.stem
        assert growth < 120, growth
    finally:
        pas.stop()


def test_a_large_message_on_pynetdicoms_path_is_stopped_not_held(tmp_path: Path) -> None:
    """A C-STORE on the Verification context is not streamed: pynetdicom assembles it in
    memory before it is refused (0x0122). 200 MB of it took the daemon's memory up by as
    much; the association is now aborted past 64 MB, and the daemon serves on."""
    from appliance.dicomnet.direct_receive import p_data_tf
    from appliance.dicomnet.direct_store import c_store_rq

    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        assert pas.proc is not None
        before = peak_rss_mb(pas.proc.pid)
        verification, ct = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2"
        raw = raw_ul.associate(pas.port, [(1, verification, "1.2.840.10008.1.2.1")])
        fragment = p_data_tf(1, 0x00, b"\x00" * (64 << 10))
        sent = 0
        try:
            raw.sock.sendall(p_data_tf(1, 0x03, c_store_rq(ct, "1.2.826.0.1.3680043.8.498.79",
                                                           1)))
            while sent < 200 << 20:
                raw.sock.sendall(fragment)
                sent += 64 << 10
        except OSError:  # the daemon aborted and closed the connection under us
            pass
        kind, _ = raw.read_pdu(30)
        raw.sock.close()
        assert kind in (0x07, None), kind  # A-ABORT, or the connection closed
        assert sent < 200 << 20, "the whole message was taken"
        growth = peak_rss_mb(pas.proc.pid) - before
        print(f"peak RSS {before:.0f} MB -> +{growth:.0f} MB after {sent >> 20} MB sent")
        assert growth < 150, growth
        storescu(sorted(MR_DIR.rglob("*.dcm"))[:1], pas.port)  # the daemon serves on
        assert pas.status()["instances"] == 1
    finally:
        pas.stop()


def test_a_long_indexed_value_is_indexed_whole_on_pydicoms_path(tmp_path: Path) -> None:
    """pydicom's parse leaves values over 1 MB unread (a spilled object is read in place);
    one the index reads must still be read, not indexed empty. Implicit VR allows a 1.5 MB
    StudyDescription; a stray (0002,0013) element at the top sends the dataset to pydicom."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import ImplicitVRLittleEndian

    ds = _small_secondary_capture(1)
    del ds.file_meta
    ds.StudyDescription = "LONG " * (300 << 10)  # 1.5 MB
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    dataset = (struct.pack("<HHI", 0x0002, 0x0013, 4) + b"ODD " + buffer.getvalue()
               + struct.pack("<HHI", 0x7FE0, 0x0010, 1 << 20) + bytes(1 << 20))
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__SPILL_ABOVE_MB": "1"}).start()
    try:
        raw = raw_ul.associate(pas.port, [(1, SecondaryCaptureImageStorage,
                                           ImplicitVRLittleEndian)])
        try:
            answer = raw.c_store(1, SecondaryCaptureImageStorage, ds.SOPInstanceUID, dataset)
        finally:
            raw.release()
        assert struct.unpack("<H", answer[0x0900])[0] == 0x0000
        (study,) = json.loads(pas.cli("studies", "--json").stdout)
        assert study["description"] == ds.StudyDescription.rstrip(), len(
            study["description"] or "")
    finally:
        pas.stop()
