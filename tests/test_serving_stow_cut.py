"""A STOW-RS request cut before the end of its body, on a real ``pas run``: the client goes
away (a viewer's tab closed, a network drop), or the daemon is killed, after some parts were
filed. Those instances are durable and listed; the request's ``store`` audit row must say so
(PS3.15 "DICOM Instances Transferred"), as a C-STORE association's row does when the
association is aborted or cut by a crash.

Before, a STOW-RS whose client went away wrote no row at all (the instance stored, found by
QIDO-RS, in no ``pas audit``), and the journal got an ERROR traceback ("Exception in ASGI
application", ``ClientDisconnect``); a kill -9 in the middle left no row either, at the next
start nor ever.
"""

from __future__ import annotations

import io
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.support.peers import PasProcess, read_rows, wait_for

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
BOUNDARY = "cut-boundary"
HEAD = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()


def _instance(study: str) -> bytes:
    """CT_small as a new instance of ``study``."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture()
def pas(tmp_path: Path) -> Iterator[PasProcess]:
    pas = PasProcess(tmp_path / "pas", {"PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        yield pas
    finally:
        pas.stop()


def _store_rows(pas: PasProcess) -> list[sqlite3.Row]:
    return read_rows(pas.home / "pas.sqlite", "SELECT * FROM audit WHERE event = 'store'")


def _held(pas: PasProcess, study: str) -> int:
    return int(read_rows(pas.home / "pas.sqlite",
                         "SELECT count(*) AS n FROM instances i JOIN studies s "
                         "ON s.id = i.study_fk WHERE s.study_uid = ?", (study,))[0]["n"])


def _start_stow(pas: PasProcess, study: str) -> socket.socket:
    """A STOW-RS whose first part is whole and its second begun: the daemon files the
    first (waited for in the index) and waits for the rest of the body."""
    first, second = _instance(study), _instance(study)
    body = HEAD + first + b"\r\n" + HEAD + second[:len(second) // 2]
    sock = socket.create_connection(("127.0.0.1", pas.http_port))
    sock.sendall(
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
        f"Content-Length: {len(body) + len(second)}\r\n\r\n".encode() + body)
    wait_for(lambda: _held(pas, study) == 1, what="the first part filed")
    return sock


def test_a_client_gone_mid_body_leaves_the_row_of_what_was_stored(pas: PasProcess) -> None:
    study = generate_uid()
    sock = _start_stow(pas, study)
    sock.close()  # the client goes away with half of its second part sent
    rows = wait_for(lambda: [r for r in _store_rows(pas) if r["target"] == study],
                    what="the request's store row")
    assert [(r["actor"], r["source"], r["detail"]) for r in rows] == [
        ("anonymous", "127.0.0.1", "1 stored (STOW-RS)")]
    assert rows[0]["outcome"] == "failure: the client went away before the end of the body"
    assert _held(pas, study) == 1
    # The request's open note went with its row: a later start writes no second one.
    assert not read_rows(pas.home / "pas.sqlite", "SELECT * FROM open_associations")
    assert "Exception in ASGI application" not in pas.log()
    assert "ClientDisconnect" not in pas.log()
    # Nothing of the cut part left on the spool; the daemon serves the next request.
    assert not [f for f in (pas.home / "spool" / "tmp").glob("*") if f.stat().st_size]
    found = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies",
                      params={"StudyInstanceUID": study}, timeout=30)
    assert found.status_code == 200 and len(found.json()) == 1


def test_a_kill_9_mid_body_leaves_the_row_at_the_next_start(pas: PasProcess) -> None:
    study = generate_uid()
    sock = _start_stow(pas, study)
    try:
        pas.kill()
    finally:
        sock.close()
    assert not [r for r in _store_rows(pas) if r["target"] == study]
    pas.start()
    rows = [r for r in _store_rows(pas) if r["target"] == study]
    assert [(r["actor"], r["source"], r["outcome"]) for r in rows] == [
        ("anonymous", "127.0.0.1",
         "failure: cut by a stop of the daemon (a crash, a power loss)")], [
        dict(r) for r in rows]
    assert rows[0]["detail"].startswith("1 instance stored before the cut"), rows[0]["detail"]
    assert _held(pas, study) == 1
