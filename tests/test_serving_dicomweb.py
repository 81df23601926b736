"""DICOMweb on the appliance, driven by dicomweb-client (the PyPI client web viewers use).

PAS holds the real CT and MR sets (C-STORE from DCMTK) and a multi-frame JPEG-LS MR sent by
STOW-RS. Search, retrieve, metadata, frames and rendered images are checked against the files
themselves (UIDs, SHA-256, pixel arrays); bad inputs get a 4xx naming the problem and change
nothing; bearer and client-certificate authentication refuse what they must.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import ipaddress
import json
import re
import sqlite3
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import generate_uid
from requests import HTTPError

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
TOKEN = "s3cret-viewer-token"


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    pas = pas_holding_real_sets(tmp_path_factory.mktemp("dw") / "pas")
    try:
        yield pas
    finally:
        pas.stop()


@pytest.fixture(scope="module")
def client(pas: PasProcess) -> DICOMwebClient:
    return DICOMwebClient(f"http://127.0.0.1:{pas.http_port}/dicom-web")


def _headers(folder: Path) -> list:
    return [dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


def _count(pas: PasProcess) -> int:
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    try:
        return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    finally:
        conn.close()


def test_stow_then_search_retrieve_metadata_frames(pas: PasProcess,
                                                   client: DICOMwebClient) -> None:
    original = dcmread(MULTIFRAME)
    before = _count(pas)
    response = client.store_instances([original])
    assert str(response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == \
        str(original.SOPInstanceUID)
    assert _count(pas) == before + 1
    study, series, sop = (str(original.StudyInstanceUID), str(original.SeriesInstanceUID),
                          str(original.SOPInstanceUID))
    found = client.search_for_instances(study_instance_uid=study)
    assert [i["00080018"]["Value"][0] for i in found] == [sop]
    frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[2, 5])
    pixels = original.pixel_array
    assert frames[0] == pixels[1].astype("<u2").tobytes()
    assert frames[1] == pixels[4].astype("<u2").tobytes()
    retrieved = client.retrieve_instance(study, series, sop)
    assert np.array_equal(retrieved.pixel_array, pixels)
    assert str(retrieved.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.80"  # as stored


def test_search_for_studies_matches_the_files(client: DICOMwebClient) -> None:
    expected = {str(h.StudyInstanceUID) for h in _headers(CT_DIR) + _headers(MR_DIR)}
    studies = client.search_for_studies()
    found = {s["0020000D"]["Value"][0] for s in studies}
    assert expected <= found
    ct = [h for h in _headers(CT_DIR) if h.PatientID == "A002304"]
    filtered = client.search_for_studies(search_filters={"PatientID": "A002304"})
    assert {s["0020000D"]["Value"][0] for s in filtered} == {str(h.StudyInstanceUID) for h in ct}
    per_study = {s["0020000D"]["Value"][0]: s["00201208"]["Value"][0] for s in filtered}
    for uid in per_study:
        assert per_study[uid] == len({str(h.SOPInstanceUID) for h in ct
                                      if str(h.StudyInstanceUID) == uid})
    page = client.search_for_studies(limit=2, offset=1)
    assert len(page) == 2
    wildcard = client.search_for_studies(search_filters={"PatientName": "a00230*"},
                                         fuzzymatching=False)
    assert {s["0020000D"]["Value"][0] for s in wildcard} >= {str(h.StudyInstanceUID) for h in ct}


def test_retrieve_series_bytes_are_the_stored_files(pas: PasProcess,
                                                    client: DICOMwebClient) -> None:
    mr = _headers(MR_DIR)
    study, series = str(mr[0].StudyInstanceUID), str(mr[0].SeriesInstanceUID)
    datasets = client.retrieve_series(study, series)
    assert {str(d.SOPInstanceUID) for d in datasets} == {str(h.SOPInstanceUID) for h in mr}
    # The raw multipart body carries the stored files byte for byte.
    response = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{study}",
                         headers={"Accept": 'multipart/related; type="application/dicom"; '
                                            "transfer-syntax=*"}, timeout=60)
    assert response.status_code == 200
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    paths = [r[0] for r in conn.execute(
        "SELECT i.path FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_uid = ?", (study,))]
    conn.close()
    assert len(paths) == 520
    for path in paths:
        assert (pas.home / "spool" / path).read_bytes() in response.content
        assert hashlib.sha256((pas.home / "spool" / path).read_bytes()).hexdigest() in path
    metadata = client.retrieve_series_metadata(study, series)
    assert len(metadata) == 520
    assert {m["00100020"]["Value"][0] for m in metadata} == {str(mr[0].PatientID)}
    assert all(m["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010") for m in metadata)


def test_metadata_gives_bulk_data_uris_that_resolve_to_the_bytes(pas: PasProcess) -> None:
    """PS3.18 10.4.1.2 / F.2.7: metadata holds every attribute, Pixel Data (and other bulk
    data) as a BulkDataURI whose target is that attribute's bytes (it left Pixel Data out, and
    its BulkDataURIs named the whole instance)."""
    host = f"http://127.0.0.1:{pas.http_port}"
    client = DICOMwebClient(f"{host}/dicom-web")
    client.store_instances([dcmread(MULTIFRAME)])  # idempotent when already there
    for path in (sorted(CT_DIR.glob("*.dcm"))[0], MULTIFRAME):
        original = dcmread(path)
        item = client.retrieve_instance_metadata(str(original.StudyInstanceUID),
                                                   str(original.SeriesInstanceUID),
                                                   str(original.SOPInstanceUID))
        assert {f"{int(e.tag):08X}" for e in original} <= set(item)
        uri = item["7FE00010"]["BulkDataURI"]
        assert uri.endswith(f"/instances/{original.SOPInstanceUID}/bulkdata/7FE00010")
        [data] = client.retrieve_bulkdata(host + uri)
        if original.file_meta.TransferSyntaxUID.is_compressed:  # decoded, as /frames
            assert data == original.pixel_array.astype("<u2").tobytes()
        else:
            assert data == original.PixelData
    base = f"{host}/dicom-web/studies/{original.StudyInstanceUID}/series/" \
           f"{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}"
    assert httpx.get(f"{base}/bulkdata/00100010", timeout=10).status_code == 404  # not bulk
    assert httpx.get(f"{base}/bulkdata/7FE0001", timeout=10).status_code == 400


def test_rendered_png_and_jpeg(pas: PasProcess) -> None:
    ct = _headers(CT_DIR)[0]
    url = (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{ct.StudyInstanceUID}/series/"
           f"{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}")
    png = httpx.get(url + "/rendered", headers={"Accept": "image/png"}, timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (ct.Columns, ct.Rows)
    thumb = httpx.get(url + "/thumbnail?viewport=64,64", timeout=30)
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64


def test_thumbnails_of_an_instance_a_series_and_a_study(pas: PasProcess) -> None:
    """A thumbnail is small (128 pixels at most, unless a viewport is asked) and exists for a
    study and a series too (PS3.18 10.4.1.1.5): a series shows its middle image, a study its
    first series'. Before: the full-size image, and a bare 404 for a study or a series."""
    base = f"http://127.0.0.1:{pas.http_port}/dicom-web"
    by_series: dict[tuple[str, str], list] = {}
    for header in _headers(CT_DIR):
        by_series.setdefault((header.StudyInstanceUID, header.SeriesInstanceUID),
                             []).append(header)
    ct = sorted(by_series[next(iter(by_series))], key=lambda h: int(h.InstanceNumber))
    study = ct[0].StudyInstanceUID
    in_study = sorted((hs[0] for (st, _), hs in by_series.items() if st == study),
                      key=lambda h: int(h.SeriesNumber))
    assert len(in_study) == 3  # axial, coronal, sagittal: one image each

    def thumbnail(url: str) -> bytes:
        answer = httpx.get(url + "/thumbnail", timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/jpeg"
        return answer.content

    def instance_url(h: Any) -> str:
        return (f"{base}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}"
                f"/instances/{h.SOPInstanceUID}")

    first = in_study[0]
    small = thumbnail(instance_url(first))
    assert Image.open(io.BytesIO(small)).size == (128, 128)  # a 512 x 512 CT, shrunk
    full = httpx.get(instance_url(first) + "/rendered", timeout=30).content
    assert Image.open(io.BytesIO(full)).size == (512, 512)
    # A study's: its first series' (the lowest Series Number); a series': its own image.
    assert thumbnail(f"{base}/studies/{study}") == small
    for header in in_study:
        assert thumbnail(f"{base}/studies/{study}/series/{header.SeriesInstanceUID}") == \
            thumbnail(instance_url(header))
    # A series of 520 images shows the middle one (by Instance Number), never enlarged.
    mr = sorted(_headers(MR_DIR), key=lambda h: int(h.InstanceNumber))
    middle = mr[(len(mr) + 1) // 2 - 1]
    assert int(middle.InstanceNumber) == 260
    series_url = f"{base}/studies/{middle.StudyInstanceUID}/series/{middle.SeriesInstanceUID}"
    shown = thumbnail(series_url)
    assert shown == thumbnail(instance_url(middle)) != thumbnail(instance_url(mr[0]))
    assert Image.open(io.BytesIO(shown)).size == (64, 64)  # its own size: not enlarged
    assert httpx.get(f"{base}/studies/{study}/series/1.2.3/thumbnail",
                     timeout=30).status_code == 404


def test_rendered_ct_goes_through_the_modality_lut_before_the_window(pas: PasProcess) -> None:
    """A CT's window is in HU: rendering must rescale stored values first (PS3.3 C.11)."""
    path = sorted(CT_DIR.glob("*.dcm"))[0]
    ct = dcmread(path)
    assert float(ct.RescaleIntercept) != 0 and ct.get("WindowCenter") is not None
    url = (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{ct.StudyInstanceUID}/series/"
           f"{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}/rendered")
    png = httpx.get(url, headers={"Accept": "image/png"}, timeout=30)
    assert png.status_code == 200, png.text
    got = np.asarray(Image.open(io.BytesIO(png.content)), dtype=np.float64)
    windowed = apply_voi_lut(apply_modality_lut(ct.pixel_array, ct).astype(np.float64), ct)
    low, high = float(windowed.min()), float(windowed.max())
    reference = ((windowed - low) / (high - low) * 255.0).clip(0, 255).astype(np.uint8)
    assert got.shape == reference.shape
    assert abs(got.mean() - reference.mean()) < 2.0, (got.mean(), reference.mean())
    assert abs(got.std() - reference.std()) < 2.0, (got.std(), reference.std())
    assert np.abs(got - reference).mean() < 1.0
    assert (got == 255).mean() < 0.10  # not the white disc of stored values windowed as HU


def _dicom_parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """Each part of a multipart/related answer as (its Content-Type, its body)."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = []
    for chunk in response.content.split(b"--" + boundary.encode())[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        parts.append((fields["Content-Type"], body[:-2]))  # the CRLF before the delimiter
    return parts


JPEG_LS = "1.2.840.10008.1.2.4.80"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


@pytest.mark.parametrize(("accept", "ct_syntax", "jls_syntax"), [
    (MULTIPART_DICOM, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1"),  # the default
    ("*/*", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1"),
    (f"{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2", "1.2.840.10008.1.2",
     "1.2.840.10008.1.2"),
    (f"{MULTIPART_DICOM}; transfer-syntax={JPEG_LS}", None, JPEG_LS),  # exactly as stored
    (f"{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2.4.90, "
     f"{MULTIPART_DICOM}; transfer-syntax=*", "1.2.840.10008.1.2.1", JPEG_LS),  # fallback
    (f'{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2.1; q=0.5, '
     f'{MULTIPART_DICOM}; transfer-syntax="*"', "1.2.840.10008.1.2.1", JPEG_LS),  # q-values
    (f"{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2.4.90", None, None),
])
def test_wado_rs_transfer_syntax_negotiation(pas: PasProcess, accept: str,
                                             ct_syntax: str | None,
                                             jls_syntax: str | None) -> None:
    """PS3.18 8.7.3.5: no parameter means Explicit VR LE, '*' and the stored syntax mean the
    stored bytes, Implicit VR LE is produced when asked, the first acceptable range wins, and
    a syntax PAS cannot produce is a 406, never another syntax under a 200."""
    base = f"http://127.0.0.1:{pas.http_port}/dicom-web"
    client = DICOMwebClient(base)
    client.store_instances([dcmread(MULTIFRAME)])  # idempotent when already there
    ct_path = sorted(CT_DIR.glob("*.dcm"))[0]
    for path, expected in ((ct_path, ct_syntax), (MULTIFRAME, jls_syntax)):
        original = dcmread(path)
        response = httpx.get(f"{base}/studies/{original.StudyInstanceUID}/series/"
                             f"{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}",
                             headers={"Accept": accept}, timeout=60)
        if expected is None:
            assert response.status_code == 406, response.text
            # Each syntax PAS offers named once (the explicit VR stored one was twice).
            offered = response.json()["detail"].split("; ask for ")[1]
            names = offered.replace(" or ", ", ").split(", ")
            assert len(names) == len(set(names)) >= 3, offered
            continue
        assert response.status_code == 200, response.text
        [(content_type, body)] = _dicom_parts(response)
        assert content_type == f"application/dicom; transfer-syntax={expected}"
        received = dcmread(io.BytesIO(body))
        assert str(received.file_meta.TransferSyntaxUID) == expected
        assert received.is_implicit_VR == (expected == "1.2.840.10008.1.2")
        assert received.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(received.pixel_array, original.pixel_array)
        if expected == str(original.file_meta.TransferSyntaxUID):
            assert body == _spool_file(pas, str(original.SOPInstanceUID)).read_bytes()


def _spool_file(pas: PasProcess, sop_instance_uid: str) -> Path:
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    try:
        [(path,)] = conn.execute("SELECT path FROM instances WHERE sop_instance_uid = ?",
                                 (sop_instance_uid,)).fetchall()
    finally:
        conn.close()
    return pas.home / "spool" / path


def test_bad_requests_are_refused_naming_the_problem(pas: PasProcess) -> None:
    base = f"http://127.0.0.1:{pas.http_port}/dicom-web"
    # An unsupported parameter is ignored and named (PS3.18 8.3), no longer a 400:
    # tests/test_serving_dicomweb_edges.py. A supported one with a bad value is a 400.
    bad_date = httpx.get(f"{base}/studies?StudyDate=yesterday", timeout=10)
    assert bad_date.status_code == 400 and "StudyDate" in bad_date.json()["detail"]
    missing = httpx.get(f"{base}/studies/1.2.3.4.5", timeout=10)
    assert missing.status_code == 404
    before = _count(pas)
    boundary = "xyz"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + \
        b"not a dicom file at all" + f"\r\n--{boundary}--\r\n".encode()
    garbage = httpx.post(f"{base}/studies", content=body, timeout=10, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert garbage.status_code == 409
    assert "00081198" in garbage.json()  # FailedSOPSequence
    assert _count(pas) == before
    wrong_type = httpx.post(f"{base}/studies", content=b"x", timeout=10,
                            headers={"Content-Type": "application/json"})
    assert wrong_type.status_code == 415
    # Still serving.
    assert httpx.get(f"{base}/studies", timeout=10).status_code == 200


@pytest.mark.parametrize("body", [
    b"this is not multipart at all",
    b"--XX\r\nContent-Type application/dicom\r\n\r\nabc\r\n--XX--\r\n",  # no ':'
    b"--XX\r\nContent-Type: application/dicom\r\n\r\n"
    + sorted(CT_DIR.glob("*.dcm"))[0].read_bytes()[:5000],  # cut: no closing boundary
])
def test_stow_malformed_multipart_is_a_400_and_stores_nothing(pas: PasProcess,
                                                              body: bytes) -> None:
    """Invariant 7: a body that is not multipart/related as it says gets a 400 naming the
    problem (it was a 500 with a traceback), nothing is stored, and PAS keeps serving."""
    base = f"http://127.0.0.1:{pas.http_port}/dicom-web"
    before, log_size = _count(pas), len(pas.log())
    response = httpx.post(f"{base}/studies", content=body, timeout=30, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'})
    assert response.status_code == 400, response.text
    assert "malformed multipart body" in response.json()["detail"]
    assert _count(pas) == before
    assert "Traceback" not in pas.log()[log_size:]
    assert httpx.get(f"{base}/studies", timeout=10).status_code == 200


def _instance_in_study(study: str) -> bytes:
    """A new CT instance (fresh series and SOP Instance UIDs) of ``study``, as Part 10."""
    ds = dcmread(sorted(CT_DIR.glob("*.dcm"))[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = \
        study, generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _stored_sops(pas: PasProcess, uids: list[str]) -> set[str]:
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    try:
        return {r[0] for r in conn.execute(
            f"SELECT sop_instance_uid FROM instances WHERE sop_instance_uid IN "
            f"({', '.join('?' * len(uids))})", uids)}
    finally:
        conn.close()


def test_stow_to_a_study_refuses_instances_of_another_study(pas: PasProcess) -> None:
    """PS3.18 10.5: POST /studies/{study} stores only instances of that study; the others are
    in FailedSOPSequence (0xA900) and nothing of them is written."""
    target, other = generate_uid(), generate_uid()
    mine, foreign = _instance_in_study(target), _instance_in_study(other)
    uid = {data: str(dcmread(io.BytesIO(data)).SOPInstanceUID) for data in (mine, foreign)}
    boundary = "pas-target-study"

    def body(*parts: bytes) -> bytes:
        return b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()

    headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                               f"boundary={boundary}"}
    url = f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{target}"
    response = httpx.post(url, content=body(foreign, mine), headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [uid[mine]]
    [refused] = answer["00081198"]["Value"]
    assert refused["00081155"]["Value"][0] == uid[foreign]
    assert refused["00081197"]["Value"][0] == 0xA900
    assert _stored_sops(pas, [uid[mine], uid[foreign]]) == {uid[mine]}
    only_foreign = httpx.post(url, content=body(foreign), headers=headers, timeout=30)
    assert only_foreign.status_code == 409, only_foreign.text
    assert _stored_sops(pas, [uid[foreign]]) == set()


def test_queries_and_retrieves_are_audited(pas: PasProcess, client: DICOMwebClient) -> None:
    client.search_for_series(search_filters={"Modality": "MR"})
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    rows = conn.execute("SELECT event, actor, target, detail FROM audit "
                        "WHERE event IN ('query', 'retrieve', 'store') ORDER BY id").fetchall()
    conn.close()
    assert rows[-1][0] == "query" and "Modality=MR" in rows[-1][2] and "QIDO" in rows[-1][3]
    assert any(r[0] == "retrieve" and "WADO" in (r[3] or "") for r in rows)
    assert any(r[0] == "store" and "STOW" in (r[3] or "") for r in rows)


def test_bearer_token_required_when_configured(tmp_path: Path) -> None:
    """Only a listed token is served; the audit names the one used by its place in the list,
    never by a hash of it (its SHA-256's first 12 hex digits let whoever reads the audit
    trail check guesses of a token a person chose)."""
    tokens = ["another-viewer-token", TOKEN]
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false",
                                        "PAS_SERVING__AUTH": "bearer",
                                        "PAS_SERVING__BEARER_TOKENS": json.dumps(tokens)}
                     ).start()
    try:
        storescu(next(iter(sorted(CT_DIR.glob("*.dcm")))), pas.port)
        url = f"http://127.0.0.1:{pas.http_port}/dicom-web"
        assert httpx.get(f"{url}/studies", timeout=10).status_code == 401
        assert httpx.get(f"{url}/studies", timeout=10,
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(HTTPError):
            DICOMwebClient(url).search_for_studies()
        authorised = DICOMwebClient(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert len(authorised.search_for_studies()) == 1
        with sqlite3.connect(pas.home / "pas.sqlite") as conn:
            actors = [actor for (actor,) in conn.execute(
                "SELECT actor FROM audit WHERE event = 'query' ORDER BY id")]
        assert actors[-1] == "bearer:token-2"
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        assert not any(digest[:8] in (actor or "") for actor in actors)
    finally:
        pas.stop()


def _issue(subject: str, issuer_key: Any, issuer_name: Any, *, ca: bool = False,
           ip: str | None = None) -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_name or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(folder: Path, name: str, key: Any, cert: Any) -> tuple[str, str]:
    crt, pem = folder / f"{name}.crt", folder / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pem.chmod(0o600)  # as installed: PAS refuses a key others can read
    return str(crt), str(pem)


def test_client_certificate_required_when_configured(tmp_path: Path) -> None:
    ca_key, ca_cert = _issue("viewers CA", None, None, ca=True)
    ca_crt, _ = _write(tmp_path, "ca", ca_key, ca_cert)
    server = _write(tmp_path, "server", *_issue("pas", ca_key, ca_cert.subject, ip="127.0.0.1"))
    viewer = _write(tmp_path, "viewer", *_issue("viewer-1", ca_key, ca_cert.subject))
    rogue_key, rogue_cert = _issue("rogue CA", None, None, ca=True)
    rogue = _write(tmp_path, "rogue", *_issue("viewer-x", rogue_key, rogue_cert.subject))
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
        "PAS_SERVING__AUTH": "client_cert", "PAS_SERVING__TLS_CERT": server[0],
        "PAS_SERVING__TLS_KEY": server[1], "PAS_SERVING__TLS_CLIENT_CA": ca_crt}).start()
    try:
        storescu(next(iter(sorted(CT_DIR.glob("*.dcm")))), pas.port)
        url = f"https://127.0.0.1:{pas.http_port}/dicom-web/studies"
        trusted = ssl.create_default_context(cafile=ca_crt)
        with_cert = ssl.create_default_context(cafile=ca_crt)
        with_cert.load_cert_chain(*viewer)
        studies = wait_for(lambda: httpx.get(url, verify=with_cert, timeout=5).json(), 20,
                           what="DICOMweb over TLS")
        assert len(studies) == 1
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=trusted, timeout=5)  # no client certificate
        foreign = ssl.create_default_context(cafile=ca_crt)
        foreign.load_cert_chain(*rogue)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=foreign, timeout=5)  # a certificate from another CA
        session = requests.Session()
        session.verify, session.cert = ca_crt, viewer
        session.trust_env = False  # else REQUESTS_CA_BUNDLE overrides session.verify
        assert len(DICOMwebClient(url.removesuffix("/studies"), session=session)
                   .search_for_studies()) == 1
        # The session's connection left open, idle: the stop does not wait for its TLS
        # close (its web server's stop gave up after 10 s: appliance/web/bounded.py).
        started = time.monotonic()
        pas.stop()
        assert time.monotonic() - started < 5, pas.log()[-1000:]
    finally:
        pas.stop()


def test_wado_rs_serves_a_big_endian_instance_in_little_endian(pas: PasProcess) -> None:
    """Explicit VR Big Endian (retired) is kept as sent; WADO-RS without a transfer-syntax
    gives it in Explicit VR Little Endian (byte-swapped into a temp file, removed once sent:
    appliance/store/transcode.py), the same instance with the same pixels. It was a 406: the
    whole-object decode could not re-encode it."""
    big_endian = Path(get_testdata_file("MR_small_bigendian.dcm"))  # type: ignore[arg-type]
    storescu(big_endian, pas.port, extra=["-xb"])
    original = dcmread(big_endian)
    stored = dcmread(_spool_file(pas, str(original.SOPInstanceUID)), stop_before_pixels=True)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"  # kept as sent
    response = httpx.get(
        f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{original.StudyInstanceUID}"
        f"/series/{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}",
        headers={"Accept": MULTIPART_DICOM}, timeout=60)
    assert response.status_code == 200, response.text
    [(content_type, body)] = _dicom_parts(response)
    assert content_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    received = dcmread(io.BytesIO(body))
    assert received.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(received.pixel_array, original.pixel_array)
    assert not [p for p in (pas.home / "spool" / "tmp").glob("*") if p.stat().st_size]


def _retrieve_rows_after(pas: PasProcess, last_id: int) -> list[sqlite3.Row]:
    return read_rows(pas.home / "pas.sqlite", "SELECT * FROM audit WHERE event = 'retrieve' "
                     "AND id > ? ORDER BY id", (last_id,))


def test_wado_rs_audit_row_says_what_the_viewer_was_sent(pas: PasProcess) -> None:
    """Written when the answer is over, not before its first byte: a viewer that went away
    after a few instances was audited "success, 520 instances"."""
    study = str(_headers(MR_DIR)[0].StudyInstanceUID)
    url = f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{study}"
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    last = max([0] + [r["id"] for r in _retrieve_rows_after(pas, 0)])
    # A viewer that reads 2 MB of the 45 MB study and closes its connection.
    with httpx.stream("GET", url, headers=accept, timeout=60) as response:
        assert response.status_code == 200
        taken = 0
        for chunk in response.iter_raw():
            taken += len(chunk)
            if taken > 2 * 1024 * 1024:
                break
    [cut] = wait_for(lambda: _retrieve_rows_after(pas, last) or None, 30,
                     what="the audit row of the retrieve cut short")
    found = re.fullmatch(r"failure: the client went away before the end, after (\d+) of "
                         r"520 instances", cut["outcome"])
    assert found, cut["outcome"]
    assert 0 < int(found.group(1)) < 520
    assert cut["detail"] == f"{found.group(1)} of 520 instances (WADO-RS)"
    assert study in cut["target"]
    # Read to its end: a success of every instance.
    response = httpx.get(url, headers=accept, timeout=120)
    assert response.status_code == 200 and len(_dicom_parts(response)) == 520
    [whole] = wait_for(lambda: _retrieve_rows_after(pas, cut["id"]) or None, 30,
                       what="the audit row of the whole retrieve")
    assert (whole["outcome"], whole["detail"]) == ("success", "520 instances (WADO-RS)")
