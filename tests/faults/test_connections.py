"""Connections on the DICOM port that never become associations (a port scan, a flood, a
client that connects and says nothing), against a real daemon, DCMTK's storescu and
pynetdicom as a client that holds its association open.

``dicom.max_associations`` counts associations from their A-ASSOCIATE-RQ; connections that
have not sent one are bounded by ``dicom.max_connections`` (appliance/dicomnet/server.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support import raw_ul
from tests.support.cleanup import started
from tests.support.peers import CT_DIR, DCMTK_ENV, PasProcess, read_rows, wait_for

CT_FILE = sorted(CT_DIR.rglob("*.dcm"))[0]
# An A-ABORT PDU (PS3.8 9.3.8): service user, no reason.
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def _store(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1", str(port),
                           str(CT_FILE)], env=DCMTK_ENV, capture_output=True, text=True,
                          timeout=60)


@contextlib.contextmanager
def _silent(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to the port that send nothing, closed at the end."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
               for _ in range(count)]


@contextlib.contextmanager
def _write_lock_held(pas: PasProcess) -> Iterator[None]:
    """Another writer's long transaction on PAS's database (a backup, an eviction, ``pas``
    commands): SQLite's write lock held until the block ends."""
    other = sqlite3.connect(pas.home / "pas.sqlite", isolation_level=None, timeout=30)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def _refusals(pas: PasProcess) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(  # every reason exported: at 0
        r'^pas_access_refused_total\{channel="dicom",reason="([\w-]+)"\} (\S+)$', text, re.M)
        if float(m.group(2))}


def _connections(pas: PasProcess) -> float:
    text = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    return float(re.search(r"^pas_dicom_connections (\S+)$", text, re.M).group(1))


def _threads(pas: PasProcess) -> int:
    assert pas.proc is not None
    return len(os.listdir(f"/proc/{pas.proc.pid}/task"))


def small_listener(home: Path) -> PasProcess:
    """A daemon (not started) whose DICOM port takes 2 associations and 6 connections: a
    few raw connections reach its bounds."""
    return PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                             "PAS_DICOM__MAX_ASSOCIATIONS": "2",
                             "PAS_DICOM__MAX_CONNECTIONS": "6",
                             "PAS_CACHE__SCRUB_MB_PER_S": "0"})


@pytest.fixture
def pas(tmp_path: Path) -> Iterator[PasProcess]:
    daemon = small_listener(tmp_path / "pas")
    try:
        yield daemon.start()
    finally:
        daemon.stop()


def test_silent_connections_take_no_association_place(pas: PasProcess) -> None:
    """Four connections that sent nothing, over max_associations (2) but under
    max_connections (6): a modality's C-STORE is served. pynetdicom counted every open
    connection against the association limit: storescu was rejected "Local Limit
    Exceeded" until the silent ones timed out (30 s)."""
    with _silent(pas.port, 4):
        sent = _store(pas.port)
        assert sent.returncode == 0, sent.stderr
    assert pas.status()["instances"] == 1


def test_associations_over_the_limit_are_rejected_from_the_request(pas: PasProcess) -> None:
    """Two associations held open: a third is rejected (A-ASSOCIATE-RJ, transient, local
    limit exceeded), logged naming dicom.max_associations and counted; once one is
    released, the C-STORE goes through."""
    client = AE(ae_title="VIEWER")
    client.add_requested_context(Verification)
    held = [client.associate("127.0.0.1", pas.port, ae_title="PAS") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        refused = _store(pas.port)
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stderr, refused.stderr
        # Counted after the rejection is sent (ingest/scp.py): awaited.
        wait_for(lambda: _refusals(pas) == {"too-many-associations": 1.0}, 10,
                 what="the refusal counted")
        assert re.search(r"WARNING pas\.ingest: association from CT1 \(127\.0\.0\.1\) rejected: "
                         r"2 associations already open \(dicom\.max_associations\)", pas.log())
        held.pop().release()
        wait_for(lambda: _store(pas.port).returncode == 0, 30, what="the C-STORE served")
    finally:
        for assoc in held:
            assoc.release()
    assert pas.status()["instances"] == 1


def test_connections_over_the_bound_are_closed_at_once(pas: PasProcess) -> None:
    """Six silent connections fill max_connections: a seventh is closed by PAS at once,
    the refusal logged, counted and audited (one row for the source); a flood of 60 more
    adds no thread (each held two until pynetdicom's 30 s timeout, 1,000 of them took
    +44 MB). Once the silent ones go, a modality is served again."""
    # The start's probe of the port (a connection closed at once) is over.
    wait_for(lambda: _connections(pas) == 0, 10, what="no connection open")
    with _silent(pas.port, 6) as silent:
        wait_for(lambda: _connections(pas) == 6, 10, what="the six connections counted")
        threads_held = _threads(pas)
        with socket.create_connection(("127.0.0.1", pas.port), timeout=10) as seventh:
            assert seventh.recv(1) == b""  # closed by PAS, not by the timeout (10 s)
        with _silent(pas.port, 60) as flood:
            for connection in flood:
                assert connection.recv(1) == b""
        assert _threads(pas) <= threads_held
        # Counted (and audited) by the listener's reporting thread, off the accept loop.
        wait_for(lambda: _refusals(pas) == {"too-many-connections": 61.0}, 10,
                 what="the 61 refusals counted")
        assert "connection closed: 6 connections already open (dicom.max_connections) " \
               "from 127.0.0.1" in pas.log()
        assert _store(pas.port).returncode != 0  # the bound holds for everyone
        for connection in silent:
            connection.close()
        wait_for(lambda: _store(pas.port).returncode == 0, 30, what="the C-STORE served")
    rows = read_rows(pas.home / "pas.sqlite", "SELECT actor, source, outcome FROM audit "
                     "WHERE event = 'security' ORDER BY id")
    assert [tuple(row) for row in rows] == [
        ("-", "127.0.0.1", "failure: connection closed: 6 connections already open "
                           "(dicom.max_connections)")]


def test_a_connection_that_sends_something_else_first_frees_its_place_when_it_ends(
        pas: PasProcess) -> None:
    """Six probes that send something other than an A-ASSOCIATE-RQ, then close: an HTTP
    request (PAS answers A-ABORT) and an A-ABORT, three of each. pynetdicom's association
    thread waited its 30 s ACSE timeout for a request that could no longer come: each probe
    kept its place among max_connections (6) that long after it had gone, and storescu was
    closed out ("6 connections already open")."""
    wait_for(lambda: _connections(pas) == 0, 10, what="no connection open")
    for first in [b"GET / HTTP/1.0\r\n\r\n", A_ABORT] * 3:
        with socket.create_connection(("127.0.0.1", pas.port), timeout=10) as probe:
            probe.sendall(first)
            assert probe.recv(64)[:1] in (b"\x07", b"")  # PAS aborts (A-ABORT), or closes
    wait_for(lambda: _connections(pas) == 0, 5, what="the probes' places free (not in 30 s)")
    sent = _store(pas.port)
    assert sent.returncode == 0, sent.stderr
    assert pas.status()["instances"] == 1
    assert "too-many-connections" not in _refusals(pas)


def test_a_connection_over_the_bound_does_not_stop_the_port_while_the_audit_waits(
        pas: PasProcess) -> None:
    """The refusal of a connection over max_connections is audited (a SQLite write): it
    was written on the accept loop, which waited for the database's write lock while
    another writer held it (up to 30 s), and accepted no one meanwhile: a C-ECHO with a
    place free waited for its A-ASSOCIATE-AC until its ACSE timeout. Now the echo is
    served at once, and the refusal's row is written once the lock is free."""
    wait_for(lambda: _connections(pas) == 0, 10, what="no connection open")
    with _silent(pas.port, 6) as silent:
        wait_for(lambda: _connections(pas) == 6, 10, what="the six connections counted")
        with _write_lock_held(pas):
            with socket.create_connection(("127.0.0.1", pas.port), timeout=10) as seventh:
                assert seventh.recv(1) == b""  # over the bound: closed
            silent[0].close()
            wait_for(lambda: _connections(pas) == 5, 10, what="a place free")
            # Answered while the lock is still held: before, the accept loop waited for it
            # (the daemon's busy timeout, 30 s) and the echo's 10 s ran out first.
            echo = subprocess.run(["echoscu", "-ta", "10", "-aec", "PAS", "-aet", "CT1",
                                   "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                                  capture_output=True, text=True, timeout=60)
            assert echo.returncode == 0, echo.stderr
        rows = wait_for(lambda: read_rows(
            pas.home / "pas.sqlite", "SELECT actor, source, outcome FROM audit "
            "WHERE event = 'security'"), 30, what="the refusal's audit row")
    assert [tuple(row) for row in rows] == [
        ("-", "127.0.0.1", "failure: connection closed: 6 connections already open "
                           "(dicom.max_connections)")]
    wait_for(lambda: _refusals(pas) == {"too-many-connections": 1.0}, 10,
             what="the refusal counted")


def test_a_stop_with_silent_connections_open_ends_them_without_a_traceback(
        pas: PasProcess) -> None:
    """Six connections that sent nothing, open at the stop. PAS asked an A-ABORT of each:
    pynetdicom's state machine has none before an A-ASSOCIATE-RQ, and each DUL thread died
    on it ("Invalid event 'Evt15' for the current state 'Sta2'"), a traceback in the
    journal per connection at every stop (64 with dicom.max_connections' default). Now
    each connection is closed and the daemon exits 0, with nothing of the kind logged."""
    wait_for(lambda: _connections(pas) == 0, 10, what="no connection open")
    with _silent(pas.port, 6) as silent:
        wait_for(lambda: _connections(pas) == 6, 10, what="the six connections counted")
        pas.stop()
        assert pas.proc is not None and pas.proc.returncode == 0
        for connection in silent:
            assert connection.recv(1) == b""
    log = pas.log()
    assert "Invalid event" not in log and "Traceback" not in log, log[-3000:]
    assert "PAS stopped" in log


def _sent_together(connections: list[socket.socket], pdu: bytes) -> list[int | None]:
    """``pdu`` sent on every connection at the same instant; the type of each answer."""
    together = threading.Barrier(len(connections))
    answers: list[int | None] = [None] * len(connections)

    def send(index: int) -> None:
        together.wait()
        connections[index].sendall(pdu)
        answers[index] = raw_ul.RawAssociation(connections[index]).read_pdu()[0]

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(connections))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_requests_arriving_together_take_every_free_place(pas: PasProcess) -> None:
    """Three A-ASSOCIATE-RQs sent at the same instant, with both places of
    max_associations (2) free: two are accepted and one rejected, in every round. Each
    request counted every other association past its A-ASSOCIATE-RQ, those waiting in the
    same check too: requests arriving together each counted the others, and more were
    rejected than the limit asked (with one place free and two requests, both were
    rejected in 17 rounds of 40; here, one or none accepted)."""
    request = raw_ul.associate_rq([(1, str(Verification), "1.2.840.10008.1.2")], "PAS",
                                  "CT1", 0)
    for _ in range(10):
        wait_for(lambda: _connections(pas) == 0, 10, what="no connection open")
        connections = [socket.create_connection(("127.0.0.1", pas.port), timeout=10)
                       for _ in range(3)]
        wait_for(lambda: _connections(pas) == 3, 10, what="the three connections open")
        answers = _sent_together(connections, request)
        for connection, answer in zip(connections, answers, strict=True):
            if answer == 0x02:  # A-ASSOCIATE-AC
                raw_ul.RawAssociation(connection).release()
            else:
                connection.close()
        assert sorted(answers) == [0x02, 0x02, 0x03]  # two AC, one RJ
    wait_for(lambda: _refusals(pas) == {"too-many-associations": 10.0}, 10,
             what="the ten refusals counted")  # each after its rejection was sent


def test_an_unknown_ae_is_told_so_even_when_every_place_is_taken(tmp_path: Path) -> None:
    """Every place of dicom.max_associations held by a known viewer: an unknown AE's
    request is rejected as unknown (permanent, "Calling AE Title Not Recognized", audited),
    not as busy (transient: it would try again for ever, and the trail would not have it)."""
    daemon = PasProcess(tmp_path / "pas", {"PAS_DICOM__KNOWN_AES": '[{title = "VIEWER"}]',
                                           "PAS_DICOM__MAX_ASSOCIATIONS": "2",
                                           "PAS_CACHE__SCRUB_MB_PER_S": "0"})
    with contextlib.ExitStack() as stack:
        started(stack, daemon)
        client = AE(ae_title="VIEWER")
        client.add_requested_context(Verification)
        for _ in range(2):
            assoc = client.associate("127.0.0.1", daemon.port, ae_title="PAS")
            assert assoc.is_established
            stack.callback(assoc.release)
        refused = _store(daemon.port)  # calling AE CT1: not in dicom.known_aes
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr, refused.stderr
        wait_for(lambda: _refusals(daemon) == {"unknown-ae": 1.0}, 10,
                 what="the refusal counted")  # after the rejection was sent (ingest/scp.py)


def test_the_stop_waits_one_grace_for_refusals_and_associations_together(
        tmp_path: Path) -> None:
    """Another writer holds the database's write lock through the stop: the audit row of a
    connection refused over max_connections (6) waits for it, and so does a C-STORE being
    filed (pynetdicom's handler, dicom.direct_receive = false). The listener's stop gave
    the refusals' audit 10 s before even aborting the associations, then gave those 10 s
    more (20 s: the daemon's whole stop budget, none left for the other parts, the web
    server's socket closed under it). Now the sender is told at once (A-ABORT), and the
    audit and the associations share one grace."""
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_DICOM__MAX_ASSOCIATIONS": "2",
                                        "PAS_DICOM__MAX_CONNECTIONS": "6",
                                        "PAS_DICOM__DIRECT_RECEIVE": "false",
                                        "PAS_CACHE__SCRUB_MB_PER_S": "0"})
    sent = tmp_path / "storescu.txt"
    try:
        pas.start()
        wait_for(lambda: _connections(pas) == 0, 10, what="no connection open")
        with _write_lock_held(pas), sent.open("w") as output:
            store = subprocess.Popen(["storescu", "-v", "-aec", "PAS", "-aet", "CT1",
                                      "127.0.0.1", str(pas.port), str(CT_FILE)],
                                     env=DCMTK_ENV, stdout=output, stderr=subprocess.STDOUT)
            try:
                with _silent(pas.port, 5):
                    wait_for(lambda: _connections(pas) == 6, 10, what="six connections open")
                    wait_for(lambda: "XMIT" in sent.read_text(), 10, what="the C-STORE sent")
                    with socket.create_connection(("127.0.0.1", pas.port),
                                                  timeout=10) as seventh:
                        assert seventh.recv(1) == b""  # over the bound: its audit row waits
                    assert pas.proc is not None
                    pas.proc.send_signal(signal.SIGTERM)
                    started = time.monotonic()
                    store.wait(30)
                    told = time.monotonic() - started
                    wait_for(lambda: "refused connections not all audited" in pas.log(), 30,
                             what="the refusals' grace over")
            finally:
                store.kill()
                store.wait()
    finally:
        pas.stop(60)
    assert "Peer aborted Association" in sent.read_text(), sent.read_text()
    assert told < 5, f"the sender was aborted {told:.1f} s after the stop began"
    log = pas.log()
    # The first SIGTERM's line (the test's own stop at the end sends another).
    stop_line = next(line for line in log.splitlines() if "signal 15: stopping" in line)
    stopped_at = datetime.datetime.strptime(stop_line[:23], "%Y-%m-%d %H:%M:%S,%f")
    for line in ("refused connections not all audited after 10 s", "still busy after 10 s"):
        if line in log:  # the C-STORE may have been aborted before its handler began
            waited = pas.logged_at(line) - stopped_at.timestamp()
            assert waited < 11.5, f"{line!r} {waited:.1f} s after the stop began"
    # The parts after the listener had their time: the web server's, given none, had its
    # socket closed under it (a traceback in its thread).
    assert "Traceback" not in log, log[-3000:]
