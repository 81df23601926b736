"""A copy in another syntax of an object whose large values are not OB..OW, or of a deflated
object, costs bounded memory too (invariant 8), and is byte for byte pydicom's whole-object
result (appliance/store/transcode.py).

Measured on this machine (peak RSS growth of the process re-encoding, each copy in Explicit,
then Implicit VR Little Endian): a 200 MiB private UN value was read whole, then copied again
by pydicom's writer, +400 and +400 MB; a deflated object of 220 MiB inflated (12 MB stored)
was inflated whole in memory by pydicom, +668 and +652 MB. The UN value is now copied from
the file as it is written (+2 and +1 MB); the deflated dataset is inflated a megabyte at a
time into a spool temp file and read from there like any other (+5 and +4 MB).

The copies are made by `write_transcoded` in a child process that measures its own peak RSS
(VmHWM, reset before each copy, as tests/test_transcode_memory.py does on the daemon): the
callers only send the file it writes (that path is measured there). The expected bytes are
tests/test_transcode.py's `whole_decode` (dcmread, then save_as: what the callers did before),
computed in another child: it holds the object several times over, which a libFuzzer harness
run later by the same pytest worker would inherit as its peak.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from tests.test_transcode import large_values

ROOT = Path(__file__).resolve().parent.parent
EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
SIDE = 1024  # frames of 1024 x 1024 16-bit pixels: 2 MiB each
FRAMES = 106  # with the 8 MiB UN value: 220 MiB inflated (ingest refuses past 256 MiB)
UN_MIB = 200
# Peak RSS growth allowed per copy: measured +1 to +5 MB (the 1 MB chunks either side of the
# inflater, the 1 MB write buffer, a chunk read from the file); whole, +400 to +668 MB.
BOUND_MB = 40

# The child: copies each (source, syntax) with write_transcoded after a warm-up copy of a
# small object of the same kind (pydicom's lazy imports), the peak reset before each.
CHILD = """
import hashlib, json, sys
from pathlib import Path
from appliance.store.spool import Spool
from appliance.store.transcode import write_transcoded

def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

spool = Spool(Path(sys.argv[1]), fsync=False)
warm_up, pairs = sys.argv[2], sys.argv[3:]
for syntax in pairs[1::2]:
    spool.remove_temp(write_transcoded(spool, Path(warm_up), syntax))
results = []
for source, syntax in zip(pairs[::2], pairs[1::2]):
    Path("/proc/self/clear_refs").write_text("5")
    before = peak_mb()
    copy = write_transcoded(spool, Path(source), syntax)
    growth = peak_mb() - before
    digest = hashlib.sha256()
    with open(copy, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    spool.remove_temp(copy)
    left = [p.name for p in spool.tmp.glob("*") if p.stat().st_size]
    results.append({"growth": growth, "sha": digest.hexdigest(), "left": left})
print(json.dumps(results))
"""

REFERENCE = """
import hashlib, json, sys
from pathlib import Path
from tests.test_transcode import whole_decode
print(json.dumps([hashlib.sha256(whole_decode(Path(sys.argv[1]), syntax)).hexdigest()
                  for syntax in sys.argv[2:]]))
"""


def _run(script: str, *args: str) -> list:  # type: ignore[type-arg]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                            text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def _copies(tmp_path: Path, source: Path, warm_up: Path) -> list[dict]:  # type: ignore[type-arg]
    """Each syntax's copy: peak RSS growth, SHA-256, temp files left; checked against the
    whole-object result."""
    syntaxes = (EXPLICIT, IMPLICIT)
    copies = _run(CHILD, str(tmp_path / "spool"), str(warm_up),
                  *[arg for syntax in syntaxes for arg in (str(source), syntax)])
    expected = _run(REFERENCE, str(source), *syntaxes)
    for syntax, copy, sha in zip(syntaxes, copies, expected, strict=True):
        print(f"{source.name} as {UID(syntax).name}: peak RSS +{copy['growth']:.0f} MB")
        assert copy["sha"] == sha, syntax  # byte for byte what the whole-object decode gives
        assert not copy["left"]  # the copy went, and the inflated dataset with it
    return copies  # type: ignore[no-any-return]


def _write_object(path: Path, syntax: str, ds: Dataset,
                  large: dict[int, tuple[str, int, Callable[[], Iterator[bytes]]]]) -> Path:
    """``ds`` with ``large`` values (tag -> VR, length, chunks) among its elements, written
    in explicit little endian (deflated, for that syntax) without holding a large value."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflate = UID(syntax).is_deflated
    with open(path, "wb") as out:
        head = DicomFileLike(out)
        head.is_little_endian, head.is_implicit_VR = True, False
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)

        def emit(data: bytes) -> None:
            out.write(compressor.compress(data) if deflate else data)

        for tag in sorted([*ds.keys(), *large]):
            if tag in large:
                vr, length, chunks = large[tag]
                emit(struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length))
                for chunk in chunks():
                    emit(chunk)
                continue
            encoded = DicomBytesIO()
            encoded.is_little_endian, encoded.is_implicit_VR = True, False
            write_data_element(encoded, ds[tag])
            emit(encoded.getvalue())
        if deflate:
            tail = compressor.flush()
            out.write(tail + b"\0" * ((out.tell() + len(tail)) % 2))
    return path


def _header(sop_class: str, **elements: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "BIG1", "BIG^VALUES"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _un_chunks(mib: int, seed: int) -> Callable[[], Iterator[bytes]]:
    """``mib`` MiB, every 8 bytes a different number (a misplaced chunk shows)."""
    def chunks() -> Iterator[bytes]:
        for n in range(mib):
            yield (np.arange(1 << 17, dtype="<u8") + (n << 17) * seed).tobytes()
    return chunks


def _frames() -> Iterator[bytes]:
    for number in range(FRAMES):
        yield ((np.arange(SIDE * SIDE, dtype=np.uint32) * 7 + number * 13) % 4096).astype(
            "<u2").tobytes()


def test_a_220_mb_deflated_object(tmp_path: Path) -> None:
    """106 frames of 2 MiB and an 8 MiB private UN value, deflated. pydicom inflated the
    whole dataset in memory, then read every value out of it."""
    ds = _header("1.2.840.10008.5.1.4.1.1.7", Modality="OT", SamplesPerPixel=1,
                 PhotometricInterpretation="MONOCHROME2", Rows=SIDE, Columns=SIDE,
                 NumberOfFrames=FRAMES, BitsAllocated=16, BitsStored=12, HighBit=11,
                 PixelRepresentation=0)
    ds.add(DataElement(0x7FE10010, "LO", "ACME MOVIE 1.0"))
    big = _write_object(tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian, ds, {
        0x7FE00010: ("OW", FRAMES * SIDE * SIDE * 2, _frames),
        0x7FE11001: ("UN", 8 << 20, _un_chunks(8, 3)),
    })
    assert big.stat().st_size < 20 << 20  # stored small: what makes deflate worth it
    warm_up = large_values(tmp_path / "small.dcm", DeflatedExplicitVRLittleEndian)
    for copy in _copies(tmp_path, big, warm_up):
        assert copy["growth"] < BOUND_MB, copy


def test_a_200_mb_private_un_value(tmp_path: Path) -> None:
    """A Raw Data object of one 200 MiB private value, stored UN by a sender that did not
    know it: it was read whole, then copied whole again by the writer."""
    ds = _header("1.2.840.10008.5.1.4.1.1.66", Modality="OT")
    ds.add(DataElement(0x00430010, "LO", "ACME RAW 1.0"))
    big = _write_object(tmp_path / "raw.dcm", ExplicitVRLittleEndian, ds, {
        0x00431001: ("UN", UN_MIB << 20, _un_chunks(UN_MIB, 5)),
    })
    warm_up = large_values(tmp_path / "small.dcm", ExplicitVRLittleEndian)
    for copy in _copies(tmp_path, big, warm_up):
        assert copy["growth"] < BOUND_MB, copy
