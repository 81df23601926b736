"""High-Throughput JPEG 2000 (HTJ2K, PS3.5 A.4.11) from the modality to every reader.

PAS accepts HTJ2K Lossless (``1.2.840.10008.1.2.4.201``) first among a context's syntaxes
(appliance/ingest/policy.py: the sender's own lossless encoding is kept). Until now no test
held a real HTJ2K object, and the notes said PAS had no decoder for one: a node or a viewer
without HTJ2K could not have been served. pydicom 3 decodes it through pylibjpeg-openjpeg
(OpenJPEG 2.5), the decoder every other JPEG 2000 object here goes through.

The objects: the real CT and MR sets' pixels encoded by OpenJPH (``imagecodecs``, reversible
HTJ2K), checked to decode back equal before anything is sent. The modality is pynetdicom:
DCMTK 3.6.7's storescu cannot send HTJ2K ("unable to convert dataset"), nor does its storescp
accept it, which makes storescp the node that needs PAS to decode. Each reader's pixels are
compared with the original array, value for value (lossless end to end).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import imagecodecs
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless, ImplicitVRLittleEndian
from pynetdicom import AE, build_context

from tests.support.configs import everything_to, quick_retries
from tests.support.peers import CT_DIR, DCMTK_ENV, MR_DIR, PasProcess, StoreSCP, wait_for
from tests.test_ingest import dataset_part, index_rows
from tests.test_routing import jobs_of

CT_FILES = sorted(p for p in CT_DIR.iterdir() if p.is_file())[:2]
MR_FILES = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:1]


def htj2k(source: Path, out: Path) -> Path:
    """``source`` as a modality encoding HTJ2K Lossless would send it: its pixels encoded
    reversibly by OpenJPH, one fragment, the same SOP Instance UID."""
    ds = dcmread(source)
    pixels = ds.pixel_array
    codestream = imagecodecs.htj2k_encode(pixels, reversible=True)
    assert np.array_equal(imagecodecs.htj2k_decode(codestream), pixels)  # lossless, or no test
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """SOP Instance UID -> (the original file, its HTJ2K copy)."""
    folder = tmp_path_factory.mktemp("htj2k")
    copies = {}
    for number, source in enumerate([*CT_FILES, *MR_FILES]):
        copy = htj2k(source, folder / f"{number}.dcm")
        copies[str(dcmread(copy, stop_before_pixels=True).SOPInstanceUID)] = (source, copy)
    return copies


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """The hospital's PACS: DCMTK storescp, which does not know HTJ2K."""
    scp = StoreSCP(tmp_path_factory.mktemp("node"), ae_title="OLDPACS").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory, node: StoreSCP,
        sent: dict[str, tuple[Path, Path]]) -> Iterator[PasProcess]:
    folder = tmp_path_factory.mktemp("pas")
    config = everything_to(folder / "appliance.toml", node, timeout_s=20,
                           before=quick_retries(2))
    pas = PasProcess(folder / "home", {"PAS_CONFIG": str(config),
                                       "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                       "PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        ae = AE(ae_title="CT_HTJ2K")
        classes = sorted({str(dcmread(copy, stop_before_pixels=True).SOPClassUID)
                          for _, copy in sent.values()})
        assert len(classes) == 2  # CT and MR Image Storage
        ae.requested_contexts = [build_context(sop_class, [HTJ2KLossless,
                                                           ExplicitVRLittleEndian])
                                 for sop_class in classes]
        assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
        assert assoc.is_established
        try:
            accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
            assert accepted == {HTJ2KLossless}  # the modality's encoding taken, not asked off
            for _, copy in sent.values():
                assert assoc.send_c_store(copy).Status == 0x0000
        finally:
            assoc.release()
        yield pas
    finally:
        pas.stop()


def test_htj2k_is_stored_as_the_modality_sent_it(pas: PasProcess,
                                                 sent: dict[str, tuple[Path, Path]]) -> None:
    rows = {r["sop_instance_uid"]: r for r in index_rows(pas.home)}
    assert set(rows) == set(sent)
    for uid, (_, copy) in sent.items():
        assert rows[uid]["transfer_syntax_uid"] == HTJ2KLossless
        stored = pas.home / "spool" / rows[uid]["path"]
        assert (hashlib.sha256(dataset_part(stored)).hexdigest()
                == hashlib.sha256(dataset_part(copy)).hexdigest())


def test_a_node_without_htj2k_gets_the_same_pixels_decoded(
        pas: PasProcess, node: StoreSCP, sent: dict[str, tuple[Path, Path]]) -> None:
    wait_for(lambda: jobs_of(pas.home)
             and all(j["state"] in ("done", "failed") for j in jobs_of(pas.home)), 60,
             what="the forwarding jobs finished")
    assert {j["state"] for j in jobs_of(pas.home)} == {"done"}, jobs_of(pas.home)
    received = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, node.files())}
    assert set(received) == set(sent)
    for uid, (original, _) in sent.items():
        ds = received[uid]
        assert ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert np.array_equal(ds.pixel_array, dcmread(original).pixel_array)


def test_a_c_get_viewer_without_htj2k_gets_the_same_pixels(
        pas: PasProcess, sent: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    study = str(dcmread(CT_FILES[0], stop_before_pixels=True).StudyInstanceUID)
    result = subprocess.run(["getscu", "-S", "-aet", "VIEWER", "-aec", "PAS",
                             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                             "-od", str(tmp_path), "127.0.0.1", str(pas.port)],
                            env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, tmp_path.iterdir())}
    in_study = {uid for uid, (original, _) in sent.items()
                if str(dcmread(original, stop_before_pixels=True).StudyInstanceUID) == study}
    assert set(got) == in_study and in_study, result.stderr[-3000:]
    for uid in in_study:
        assert got[uid].file_meta.TransferSyntaxUID != HTJ2KLossless
        assert np.array_equal(got[uid].pixel_array, dcmread(sent[uid][0]).pixel_array)


def _frame(pas: PasProcess, copy: Path, accept: str) -> httpx.Response:
    ds = dcmread(copy, stop_before_pixels=True)
    return httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/"
                     f"{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                     f"{ds.SOPInstanceUID}/frames/1", headers={"Accept": accept}, timeout=30)


def _single_part(answer: httpx.Response) -> tuple[str, bytes]:
    boundary = answer.headers["content-type"].split("boundary=")[1].encode()
    [chunk] = answer.content.split(b"--" + boundary)[1:-1]
    head, _, body = chunk.partition(b"\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if line)
    return fields["Content-Type"], body[:-2]


def test_dicomweb_frames_as_the_htj2k_bitstream_or_as_pixels(
        pas: PasProcess, sent: dict[str, tuple[Path, Path]]) -> None:
    for uid, (original, copy) in sent.items():
        stream = _frame(pas, copy, 'multipart/related; type="image/jphc"')
        assert stream.status_code == 200, stream.text
        part_type, body = _single_part(stream)
        assert part_type == f"image/jphc; transfer-syntax={HTJ2KLossless}"
        [stored_frame] = generate_frames(dcmread(copy).PixelData, number_of_frames=1)
        assert hashlib.sha256(body).digest() == hashlib.sha256(stored_frame).digest()
        native = _frame(pas, copy, 'multipart/related; type="application/octet-stream"')
        assert native.status_code == 200, native.text
        part_type, body = _single_part(native)
        assert part_type == "application/octet-stream"
        assert body == np.ascontiguousarray(dcmread(original).pixel_array).tobytes(), uid


def test_a_rendered_htj2k_image_is_the_image(pas: PasProcess,
                                             sent: dict[str, tuple[Path, Path]]) -> None:
    for _, copy in sent.values():
        ds = dcmread(copy, stop_before_pixels=True)
        answer = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/"
                           f"{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                           f"{ds.SOPInstanceUID}/rendered", headers={"Accept": "image/png"},
                           timeout=30)
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(answer.content))
        assert image.size == (ds.Columns, ds.Rows)
        assert len(np.unique(np.asarray(image))) > 16  # an image, not a blank frame
