"""WADO-RS of a whole study costs bounded memory (invariant 8), and its answer is still every
instance's bytes, in order.

Found in review (2026-12-04): a study's WADO-RS retrieve read every instance row of the study
(about 1.2 kB each in Python) and the syntax of each part before the first byte: peak RSS of
`pas run` grew with the study. The rows are now read a page at a time as the parts go; what
is held up front is the retrieve plan (8 bytes an instance).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx

from tests.support.peers import PasProcess, read_rows
from tests.test_serving_memory import NO_SCRUB, _growth, _study_of_many_instances

INSTANCES = 50_000


def _retrieved(url: str) -> tuple[int, str, str, int]:
    """(status, boundary, SHA-256 of the body, its size) of a WADO-RS retrieve, the body
    hashed as it streams."""
    digest = hashlib.sha256()
    size = 0
    with httpx.stream("GET", url, timeout=600, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as r:
        for chunk in r.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
        found = re.search(r"boundary=([^;\s]+)", r.headers.get("content-type", ""))
    return r.status_code, found.group(1) if found else "", digest.hexdigest(), size


def _expected(boundary: str, content: bytes, syntax: str, parts: int) -> tuple[str, int]:
    """(SHA-256, size) of a multipart/related body of ``parts`` copies of ``content``."""
    part = (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}"
            "\r\n\r\n").encode() + content + b"\r\n"
    digest = hashlib.sha256()
    for _ in range(parts):
        digest.update(part)
    end = f"--{boundary}--\r\n".encode()
    digest.update(end)
    return digest.hexdigest(), len(part) * parts + len(end)


def test_wado_rs_of_a_study_of_50000_instances_reads_its_rows_as_it_goes(
        tmp_path: Path) -> None:
    home = tmp_path / "pas"
    home.mkdir()
    study, real = _study_of_many_instances(home, INSTANCES)
    row = read_rows(home / "pas.sqlite", "SELECT i.path, i.transfer_syntax_uid, "
                    "se.series_uid FROM instances i JOIN series se ON se.id = i.series_fk "
                    "LIMIT 1")[0]
    # Every row of the study names the one file stored: the bytes of each part.
    content = (home / "spool" / row["path"]).read_bytes()
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", **NO_SCRUB}).start()
    base = f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{study}"
    try:
        # Warm-up (modules, the threadpool's database connections): one instance.
        status, boundary, sha, size = _retrieved(
            f"{base}/series/{row['series_uid']}/instances/{real}")
        assert status == 200
        assert (sha, size) == _expected(boundary, content, row["transfer_syntax_uid"], 1)
        # The study (a series is the same path with one more filter: not asked again here,
        # for the suite's time; the series route's own tests are in test_serving_dicomweb).
        growth, (status, boundary, sha, size) = _growth(  # type: ignore[misc]
            pas, lambda: _retrieved(base))
        print(f"WADO-RS of {INSTANCES + 1} instances ({size} bytes): peak RSS +{growth:.1f} MB")
        assert status == 200
        # Every part, the stored bytes of each, byte for byte.
        assert (sha, size) == _expected(boundary, content, row["transfer_syntax_uid"],
                                        INSTANCES + 1)
        assert growth < 25, growth
        rows = read_rows(home / "pas.sqlite", "SELECT outcome, detail FROM audit WHERE "
                                              "event = 'retrieve' ORDER BY id")
        assert [(r["outcome"], r["detail"]) for r in rows[-1:]] == \
            [("success", f"{INSTANCES + 1} instances (WADO-RS)")]
    finally:
        pas.stop()
