"""A background loop failing at every pass says so without flooding the journal
(appliance/logs.py ``LoopFailures``): the first failure whole, the same one again as a count
at most every ``every_s``, another error whole, and the pass that works again says so."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from appliance.logs import LoopFailures


def _fail(failures: LoopFailures, exc: Exception) -> None:
    try:
        raise exc
    except Exception as caught:  # noqa: BLE001 - as the loops catch it
        failures.failed(caught)


def test_a_loop_failing_every_pass_logs_its_traceback_once_then_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("pas.test.loop")
    clock = [1000.0]
    failures = LoopFailures(log, "routing pass failed", every_s=300, clock=lambda: clock[0])
    damaged = sqlite3.DatabaseError("database disk image is malformed")
    with caplog.at_level(logging.INFO, logger="pas.test.loop"):
        for _ in range(150):  # five minutes of a pass every 2 s
            _fail(failures, damaged)
            clock[0] += 2
        _fail(failures, damaged)  # 300 s after the first: one line with the count
        _fail(failures, OSError("No space left on device"))  # another error: whole
        failures.worked()
    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert records[0] == ("ERROR", "routing pass failed", True)
    assert records[1][0] == "WARNING" and not records[1][2]
    assert records[1][1].startswith("routing pass failed again, 150 times in 300 s "
                                    "(DatabaseError: database disk image is malformed)")
    assert records[2] == ("ERROR", "routing pass failed", True)
    assert "No space left on device" in caplog.records[2].exc_text  # type: ignore[operator]
    assert records[3] == ("INFO", "routing pass failed: works again after 152 failed passes",
                          False)
    assert len(records) == 4
    failures.worked()  # nothing failed since: nothing to say
    assert len(caplog.records) == 4


def test_a_line_carrying_a_peers_huge_value_is_cut_in_the_journal(tmp_path) -> None:
    """A-ASSOCIATE-RQs naming a 60 kB "UID" (a PDU item may be 65,535 bytes), sent to a
    real daemon: each is refused as before, and the log lines that carry the value
    (pydicom's, pynetdicom's and their traceback) are cut. Each such connection wrote 182 kB
    to the log; a C-ECHO is answered meanwhile."""
    import socket
    import struct
    import subprocess

    from tests.support.peers import DCMTK_ENV, PasProcess, read_rows

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    def request(abstract_syntax: bytes) -> bytes:
        context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, abstract_syntax)
                       + item(0x40, b"1.2.840.10008.1.2"))
        user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
        body = (struct.pack(">HH", 1, 0) + b"PAS".ljust(16) + b"PROBE".ljust(16) + bytes(32)
                + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
        return struct.pack(">BBI", 1, 0, len(body)) + body

    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_HTTP__ENABLED": "false"}).start()
    try:
        before = pas.log_path.stat().st_size
        for n in range(5):
            with socket.create_connection(("127.0.0.1", pas.port), timeout=10) as peer:
                peer.sendall(request(b"1.2.%d." % n + b"9" * 60000))
                while peer.recv(65536):  # PAS aborts and closes: the PDU is not decodable
                    pass
        echo = subprocess.run(["echoscu", "-aec", "PAS", "127.0.0.1", str(pas.port)],
                              env=DCMTK_ENV, capture_output=True, timeout=30)
        assert echo.returncode == 0
    finally:
        pas.stop()
    log = pas.log()
    # Each refused and said once by PAS, its description bounded (dicomnet/last_word.py):
    # the decoder's message quotes the 60 kB value.
    said = [line for line in log.splitlines()
            if "sent a PDU of type 0x01 that does not decode" in line
            and "pas.dicomnet" in line]
    assert len(said) == 5, said
    assert all(len(line) < 600 and "characters]" in line for line in said), said
    rows = read_rows(pas.home / "pas.sqlite",
                     "SELECT outcome, detail FROM audit WHERE event = 'security'")
    assert len(rows) >= 1, rows  # one per source and minute (RefusalAudit)
    assert all(len(r["outcome"]) + len(r["detail"] or "") < 1000 for r in rows), [
        dict(r) for r in rows]
    assert "characters cut]" in log
    assert max(len(line) for line in log.splitlines()) < 4200  # a traceback: 4,096 at most
    assert (pas.log_path.stat().st_size - before) / 5 < 20_000


def test_a_log_call_whose_arguments_do_not_fit_never_raises_at_the_caller() -> None:
    """The journal's length filter formats each record: a call whose arguments do not fit
    its format (a library's bug) must still reach logging's own error report, not raise
    where the daemon logged."""
    from appliance.logs import _LongRecordFilter

    record = logging.LogRecord("pynetdicom", logging.ERROR, __file__, 1, "%d of %d", ("x",),
                               None)
    assert _LongRecordFilter().filter(record) is True
    long_record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, "value %s",
                                    ("9" * 60_000,), None)
    assert _LongRecordFilter().filter(long_record) is True
    assert long_record.getMessage().endswith("... [57958 characters cut]")  # 60,006 - 2,048


def test_a_peer_s_value_cannot_write_a_log_line_of_its_own(tmp_path) -> None:
    """A Study Instance UID holding a line break and a forged line ("... CRITICAL pas.audit:
    FORGED") was logged as it came: the log had a line of its own that read as PAS's
    (security review, 2026-12-06). Each control character is written \\xNN now. The value
    comes as a carriage return in a STOW-RS URL's study, which its refusal quotes (a
    dataset's UID with a line break is refused before anything logs it since 2026-12-07,
    not a UID; a line feed in the URL's path matches no route)."""
    import urllib.parse

    import httpx

    from tests.support.peers import CT_DIR, PasProcess, wait_for

    forged = "11:00:00,000 CRITICAL pas.audit: FORGED"
    path = sorted(CT_DIR.glob("*.dcm"))[0]
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_STUDY__STABLE_AFTER_S": "1"}).start()
    try:
        boundary = "pas-test-boundary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
        study = urllib.parse.quote(f"1.2.826.0.1\r{forged}", safe="")
        answer = httpx.post(
            f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{study}", content=body,
            timeout=60, headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                                 f"boundary={boundary}",
                                 "Accept": "application/dicom+json"})
        assert answer.status_code == 400, answer.text  # not a UID: refused before the body
        wait_for(lambda: f"1.2.826.0.1\\x0d{forged}" in pas.log(), 30,
                 what="the value's carriage return written \\x0d")
    finally:
        pas.stop()
    assert not any(line.startswith(forged) for line in pas.log().splitlines())
