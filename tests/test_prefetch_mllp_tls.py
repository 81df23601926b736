"""MLLP over TLS on the HL7 listener (``hl7.tls``), against a real ``pas run`` and real TLS
(Python's ``ssl``, OpenSSL underneath; certificates from ``tests/faults/pki.py``).

Found in the security review's follow-up (2026-12-06): HL7 orders and merges carry the
patient's name, birth date and identifiers, and the listener spoke only plain TCP. An
interface engine on a network the hospital does not trust end to end had no way to send
them encrypted, nor PAS a way to know the engine by its certificate.

What is proven: an engine with a certificate from ``hl7.tls.ca`` gets its ACK and its order
is recorded; plain MLLP to the TLS port, a self-signed certificate and none at all are
refused, nothing of theirs is recorded, each said in the log (a refused certificate also
audited and counted as the DICOM listener's is) and the listener serves the engine after
them; TLS settings that cannot be used leave the HL7 port closed, never open in clear, and
the DICOM side serving.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.pki import make_pki
from tests.support.peers import (
    DCMTK_ENV,
    PasProcess,
    free_port,
    pas_with_hl7,
    port_open,
    run_pas,
    wait_for,
)
from tests.support.peers import prefetch_requests as requests
from tests.test_prefetch_mllp import EB, SB, closed_by_peer, orm, read_blocks


def tls_env(pki: Path, **more: str) -> dict[str, str]:
    return {"PAS_HL7__TLS__ENABLED": "true", "PAS_HL7__TLS__CERT": str(pki / "server.crt"),
            "PAS_HL7__TLS__KEY": str(pki / "server.key"),
            "PAS_HL7__TLS__CA": str(pki / "ca.crt"), **more}


def engine(pki: Path, who: str | None) -> ssl.SSLContext:
    """The interface engine's side: trusts the test CA, shows ``who``'s certificate."""
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.check_hostname = False  # the test server certificate names no host
    if who is not None:
        context.load_cert_chain(str(pki / f"{who}.crt"), str(pki / f"{who}.key"))
    return context


def send_order(port: int, context: ssl.SSLContext, control: str) -> bytes | None:
    """One ORM over TLS: its ACK, or None when the listener closed the connection (a
    refused certificate shows at the handshake in TLS 1.2, at the first read in 1.3)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        with context.wrap_socket(raw) as sock:
            sock.sendall(SB + orm(control, f"ORD{control}") + EB)
            blocks = read_blocks(sock, 1)
            return blocks[0] if blocks else None
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return None
    finally:
        raw.close()


def security_rows(pas: Any) -> list[dict[str, Any]]:
    return [r for r in json.loads(pas.cli("audit", "--event", "security", "--json").stdout)
            if r["detail"].startswith("hl7")]


@pytest.fixture
def pas_tls(tmp_path: Path) -> Any:
    pki = make_pki(tmp_path / "pki")
    pas = pas_with_hl7(tmp_path / "pas", **tls_env(pki))
    yield pas, pki
    pas.stop()


def test_an_engine_with_a_certificate_from_the_ca_is_heard_over_tls(pas_tls: Any) -> None:
    pas, pki = pas_tls
    assert f"HL7 MLLP listener on 127.0.0.1:{pas.hl7_port} (TLS)" in pas.log()
    ack = send_order(pas.hl7_port, engine(pki, "client"), "TLS1")
    assert ack is not None and b"MSA|AA|TLS1" in ack, ack
    # Two orders on one connection: the stream goes on after the first ACK.
    raw = socket.create_connection(("127.0.0.1", pas.hl7_port), timeout=15)
    with engine(pki, "client").wrap_socket(raw) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        sock.sendall(SB + orm("TLS2", "ORDTLS2") + EB + SB + orm("TLS3", "ORDTLS3") + EB)
        acks = read_blocks(sock, 2)
    assert [b"MSA|AA|TLS2" in acks[0], b"MSA|AA|TLS3" in acks[1]] == [True, True], acks
    keys = {r["dedup_key"] for r in requests(pas)}
    assert {"order:P700|HOSP|ORDTLS1", "order:P700|HOSP|ORDTLS2",
            "order:P700|HOSP|ORDTLS3"} <= keys, keys


def test_clear_mllp_and_refused_certificates_are_turned_away_and_said(pas_tls: Any) -> None:
    pas, pki = pas_tls
    port = pas.hl7_port
    # Plain MLLP to the TLS port: no ACK, nothing recorded, the log says why.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(SB + orm("CLEAR1", "ORDCLEAR1") + EB)
        assert closed_by_peer(sock)
    wait_for(lambda: re.search(r"HL7 from 127\.0\.0\.1:\d+: closed, not TLS \(hl7\.tls\."
                               r"enabled: the sender must speak MLLP over TLS to this port\)",
                               pas.log()), 10, what="the clear-text line")
    # An engine offering TLS 1.0 only (under BCP 195's floor): said as such, not "not TLS".
    old = engine(pki, "client")
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1
    old.set_ciphers("ALL:@SECLEVEL=0")
    assert send_order(port, old, "OLD1") is None
    wait_for(lambda: re.search(r"HL7 from 127\.0\.0\.1:\d+: closed, its TLS version is too old "
                               r"\(TLS 1\.2 at least\)", pas.log()), 10, what="the old-TLS line")
    # Another CA's certificate (self-signed), then none.
    assert send_order(port, engine(pki, "rogue"), "ROGUE1") is None
    assert send_order(port, engine(pki, None), "NONE1") is None
    # The engine is served after them.
    ack = send_order(port, engine(pki, "client"), "AFTER1")
    assert ack is not None and b"MSA|AA|AFTER1" in ack, ack
    keys = {r["dedup_key"] for r in requests(pas)}
    assert "order:P700|HOSP|ORDAFTER1" in keys
    assert not keys & {"order:P700|HOSP|ORDCLEAR1", "order:P700|HOSP|ORDROGUE1",
                       "order:P700|HOSP|ORDNONE1", "order:P700|HOSP|ORDOLD1"}, keys
    self_signed = "TLS client certificate refused: self-signed certificate"
    none = "TLS client certificate refused: none presented (one from hl7.tls.ca is required)"
    rows = wait_for(lambda: len(found := security_rows(pas)) >= 2 and found, 10,
                    what="the refusals' audit rows")
    assert sorted((r["source"], r["outcome"]) for r in rows) == sorted([
        ("127.0.0.1", f"failure: HL7 {self_signed}"),
        ("127.0.0.1", f"failure: HL7 {none}")]), rows
    log = pas.log()
    assert re.search(rf"WARNING .*HL7 from 127\.0\.0\.1:\d+: {self_signed} \(connection "
                     r"closed\)", log), log[-3000:]
    assert re.search(rf"HL7 from 127\.0\.0\.1:\d+: {re.escape(none)} \(connection closed\)",
                     log), log[-3000:]
    scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    counted = re.search(r'^pas_access_refused_total\{channel="hl7",reason="tls-certificate"\} '
                        r"(\S+)$", scraped, re.MULTILINE)
    assert counted and float(counted[1]) == 2.0, scraped


def test_tls_settings_that_cannot_be_used_keep_the_port_closed_not_clear(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    (pki / "server.key").chmod(0o644)  # readable by others: refused, as dicom.tls's key
    port = free_port()
    pas = PasProcess(tmp_path / "pas", {
        "PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(port),
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_PREFETCH__DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/x",
        **tls_env(pki)}).start()
    try:
        line = wait_for(lambda: re.search(r"ERROR .*HL7 listener not started: its TLS settings "
                                          r"\(hl7\.tls\) cannot be used: hl7\.tls\.key \S+"
                                          r"server\.key: permissions -rw-r--r-- let others read "
                                          r"it; run `chmod 600 \S+` .*HL7 orders are not "
                                          r"received", pas.log()), 10, what="the error line")
        assert line
        assert not port_open("127.0.0.1", port)
        assert pas.status()["instances"] == 0  # the daemon serves on
        echo = subprocess.run(["echoscu", "-aec", "PAS", "127.0.0.1", str(pas.port)],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
    finally:
        pas.stop()


def test_hl7_tls_without_its_files_is_a_config_error(tmp_path: Path) -> None:
    result = run_pas(["config", "check"], {**os.environ, "PAS_HOME": str(tmp_path),
                                           "PAS_HL7__TLS__ENABLED": "true"}, timeout=60)
    assert result.returncode == 2, result
    said = " ".join(result.stderr.split())
    assert "hl7.tls.cert: required when hl7.tls.enabled (cert and key both are)" in said, said


def test_a_connection_that_never_shakes_hands_gives_its_place_to_the_engine(
        tmp_path: Path) -> None:
    """With ``hl7.max_connections = 1``, a client that connects and sends nothing (a probe
    left open, a stuck engine) holds the only place; the engine's connection takes it after
    the silent one's second (the eviction of idle connections, handshake included).

    Found in review: the handshake's transport was aborted under asyncio's ``start_tls``,
    which then returned no transport; ``StreamWriter.start_tls`` failed on it with an
    AttributeError the task kept until it was collected."""
    pki = make_pki(tmp_path / "pki")
    pas = pas_with_hl7(tmp_path / "pas", PAS_HL7__MAX_CONNECTIONS="1", **tls_env(pki))
    try:
        with socket.create_connection(("127.0.0.1", pas.hl7_port), timeout=15) as silent:
            ack = wait_for(lambda: send_order(pas.hl7_port, engine(pki, "client"), "PLACE1"),
                           15, what="the engine's ACK")
            assert b"MSA|AA|PLACE1" in ack, ack
            assert closed_by_peer(silent)  # the silent one was closed for it
        assert re.search(r"HL7 from 127\.0\.0\.1:\d+: closed after \d+ s without finishing "
                         r"its TLS handshake, for a new connection", pas.log()), pas.log()[-3000:]
        # Its handshake cancelled, not its transport aborted under it (start_tls then failed
        # with an AttributeError, seen only when the task was collected).
        assert "Traceback" not in pas.log() and "AttributeError" not in pas.log()
    finally:
        pas.stop()


def test_allowed_names_hear_only_the_engine_among_the_cas_certificates(tmp_path: Path) -> None:
    """With a CA that issues certificates to every device of the hospital,
    ``hl7.tls.allowed_names`` keeps the port to the interface engine's: another certificate
    of that CA completes the handshake, then is refused for its names, said, audited and
    counted as a certificate refused."""
    pki = make_pki(tmp_path / "pki")
    pas = pas_with_hl7(tmp_path / "pas", **tls_env(pki),
                       PAS_HL7__TLS__ALLOWED_NAMES='["interface-engine.hospital.example"]')
    try:
        assert send_order(pas.hl7_port, engine(pki, "client"), "NAMED1") is None
        refusal = ("TLS client certificate refused: its names (127.0.0.1) are not in "
                   "hl7.tls.allowed_names")
        rows = wait_for(lambda: security_rows(pas), 10, what="the refusal's audit row")
        assert [(r["source"], r["outcome"]) for r in rows] == [
            ("127.0.0.1", f"failure: HL7 {refusal}")], rows
        assert re.search(rf"HL7 from 127\.0\.0\.1:\d+: {re.escape(refusal)} \(connection "
                         r"closed\)", pas.log()), pas.log()[-3000:]
        assert "order:P700|HOSP|ORDNAMED1" not in {r["dedup_key"] for r in requests(pas)}
    finally:
        pas.stop()
    # The engine's own name (its certificate names its address): heard.
    named = pas_with_hl7(tmp_path / "pas2", **tls_env(pki),
                         PAS_HL7__TLS__ALLOWED_NAMES='["interface-engine", "127.0.0.1"]')
    try:
        ack = send_order(named.hl7_port, engine(pki, "client"), "NAMED2")
        assert ack is not None and b"MSA|AA|NAMED2" in ack, ack
    finally:
        named.stop()
    # Names without a certificate asked for: nothing to check them against.
    result = run_pas(["config", "check"], {**os.environ, **tls_env(pki),
                                           "PAS_HOME": str(tmp_path / "x"),
                                           "PAS_HL7__TLS__REQUIRE_CLIENT_CERT": "false",
                                           "PAS_HL7__TLS__ALLOWED_NAMES": '["a"]'},
                     timeout=60)
    assert result.returncode == 2 and "hl7.tls.allowed_names: needs hl7.tls.require_client_cert" \
        " = true" in " ".join(result.stderr.split()), result.stderr
