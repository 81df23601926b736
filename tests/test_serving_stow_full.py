"""STOW-RS at the spool's hard limit: 507 Insufficient Storage, nothing half-written."""

from __future__ import annotations

import httpx

from tests.support.peers import CT_DIR
from tests.test_ingest import assert_spool_consistent


def stow(port: int, files: list) -> httpx.Response:  # type: ignore[type-arg]
    boundary = "pas-test-boundary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + f.read_bytes() + b"\r\n" for f in files) + f"--{boundary}--\r\n".encode()
    return httpx.post(f"http://127.0.0.1:{port}/dicom-web/studies", content=body, timeout=60,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                               f"boundary={boundary}",
                               "Accept": "application/dicom+json"})


def test_stow_at_the_quota_answers_507_and_writes_nothing(pas_factory) -> None:
    pas = pas_factory({"PAS_STORAGE__QUOTA_MB": "1"})
    files = sorted(CT_DIR.glob("A002304_*.dcm"))
    first = stow(pas.http_port, files[:1])
    assert first.status_code == 200, first.text
    full = stow(pas.http_port, files[1:3])  # 2 x 0.5 MB more: over the 1 MiB quota
    assert full.status_code == 507, full.text
    assert pas.status()["instances"] == 1
    assert_spool_consistent(pas.home)
