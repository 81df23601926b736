"""DICOM TLS (BCP 195) on the listener and towards a ``dicom`` destination, key permissions,
and the per-source association limit, against DCMTK's echoscu/storescu/storescp (OpenSSL).

A test CA, a server, a client and a rogue (self-signed) client certificate come from
``tests/faults/pki.py``; keys are written 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from appliance.config import ConfigError, MoveDestination, load_settings
from tests.faults.helpers import assert_consistent, assert_kept_exactly, stored_successes
from tests.faults.pki import make_pki
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    PasProcess,
    StoreSCP,
    free_port,
    read_rows,
    run_pas,
    storescu,
    wait_for,
)


def _tls(pki: Path, who: str) -> list[str]:
    return ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.crt"), "+cf", str(pki / "ca.crt")]


def _echo(port: int, tls: list[str], calling: str = "ECHO") -> int:
    return subprocess.run(["echoscu", "-aec", "PAS", "-aet", calling, *tls, "127.0.0.1",
                           str(port)], env=DCMTK_ENV, capture_output=True, timeout=30).returncode


def _tls_env(pki: Path) -> dict[str, str]:
    return {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
            "PAS_CACHE__SCRUB_MB_PER_S": "0", "PAS_DICOM__TLS__ENABLED": "true",
            "PAS_DICOM__TLS__CERT": str(pki / "server.crt"),
            "PAS_DICOM__TLS__KEY": str(pki / "server.key"),
            "PAS_DICOM__TLS__CA": str(pki / "ca.crt")}


def test_scp_tls_requires_a_client_certificate_from_the_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    pas = PasProcess(tmp_path / "pas", _tls_env(pki)).start()
    try:
        assert _echo(pas.port, _tls(pki, "client")) == 0
        files = sorted(str(p) for p in CT_DIR.glob("*.dcm"))[:3]
        sent = subprocess.run(["storescu", "-v", "-aec", "PAS", "-aet", "CT1",
                               *_tls(pki, "client"), "127.0.0.1", str(pas.port), *files],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
        acknowledged = stored_successes(sent.stdout + sent.stderr)
        assert len(acknowledged) == 3, sent.stderr[-2000:]
        # Refused: plain TCP, TLS without a certificate, a certificate from another CA.
        assert _echo(pas.port, []) != 0
        assert _echo(pas.port, ["+tla", "+cf", str(pki / "ca.crt")]) != 0
        assert _echo(pas.port, _tls(pki, "rogue")) != 0
        # The daemon kept serving the legitimate client.
        assert _echo(pas.port, _tls(pki, "client")) == 0
        state = assert_consistent(pas.home)
        assert state["rows"] == 3
        assert_kept_exactly(pas.home, acknowledged)
        assert "PRIVATE KEY" not in pas.log()
    finally:
        pas.stop()


def test_a_silent_client_on_the_tls_port_blocks_neither_others_nor_the_stop(
        tmp_path: Path) -> None:
    """A TCP connection to the TLS port that sends nothing (a port scan, a device set up for
    plain DICOM waiting for the A-ASSOCIATE-AC) held pynetdicom's accept loop in its TLS
    handshake: the next client's echo was never answered, and SIGTERM left the daemon running
    (> 20 s, until systemd's kill). The handshake now runs in the connection's thread."""
    pki = make_pki(tmp_path / "pki")
    pas = PasProcess(tmp_path / "pas", _tls_env(pki)).start()
    try:
        with socket.create_connection(("127.0.0.1", pas.port)):  # accepted first: FIFO
            echo = subprocess.run(["echoscu", "-ta", "10", "-aec", "PAS", "-aet", "ECHO",
                                   *_tls(pki, "client"), "127.0.0.1", str(pas.port)],
                                  env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
            assert echo.returncode == 0, echo.stderr[-2000:]
            # Stopped with the silent client still connected, its handshake still waiting
            # (dicom.network_timeout_s, 60 s): the stop ends it.
            started = time.monotonic()
            assert pas.proc is not None
            pas.proc.send_signal(signal.SIGTERM)
            try:
                returncode = pas.proc.wait(10)
            except subprocess.TimeoutExpired:
                pytest.fail("pas run still running 10 s after SIGTERM")
            assert returncode == 0 and time.monotonic() - started < 5
        assert "PAS stopped" in pas.log()
    finally:
        pas.stop()


def test_a_tls_handshake_not_completed_in_the_network_timeout_is_closed(
        tmp_path: Path) -> None:
    """The connection's thread waits for the handshake at most ``dicom.network_timeout_s``,
    then closes the connection and says so (it waited for ever)."""
    pki = make_pki(tmp_path / "pki")
    pas = PasProcess(tmp_path / "pas", {**_tls_env(pki),
                                        "PAS_DICOM__NETWORK_TIMEOUT_S": "2"}).start()
    try:
        with socket.create_connection(("127.0.0.1", pas.port)) as silent:
            silent.settimeout(15)
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by PAS
            assert 1.5 < time.monotonic() - started < 10
        wait_for(lambda: "TLS: 127.0.0.1 connected but completed no handshake in 2 s "
                         "(dicom.network_timeout_s): connection closed" in pas.log(), 10,
                 what="the handshake time-out in the log")
        assert _echo(pas.port, _tls(pki, "client")) == 0  # still serving
    finally:
        pas.stop()


def test_a_refused_client_certificate_is_logged_and_audited(tmp_path: Path) -> None:
    """A handshake refused for the client's certificate (another CA's, none) is a refused
    access: a warning naming the address and why, a ``security`` row in the audit trail and
    the counter. pynetdicom's accept loop dropped it without a word (the handshake's own
    thread then logged it at debug level): a modality whose certificate expired could not
    send and nothing on the site said why. A port probe that only connects stays quiet."""
    pki = make_pki(tmp_path / "pki")
    pas = PasProcess(tmp_path / "pas", _tls_env(pki)).start()
    try:
        socket.create_connection(("127.0.0.1", pas.port)).close()  # a probe: not a refusal
        assert _echo(pas.port, _tls(pki, "rogue")) != 0
        assert _echo(pas.port, _tls(pki, "rogue")) != 0  # the same minute: counted, one row
        assert _echo(pas.port, ["+tla", "+cf", str(pki / "ca.crt")]) != 0
        assert _echo(pas.port, _tls(pki, "client")) == 0  # still serving
        rows = wait_for(lambda: len(found := _security_rows(pas.home)) >= 2 and found, 10,
                        what="the refusals' audit rows")
        assert [(r["actor"], r["source"], r["outcome"], r["detail"]) for r in rows] == [
            ("-", "127.0.0.1", "failure: TLS client certificate refused: self-signed "
                               "certificate", "dicom"),
            ("-", "127.0.0.1", "failure: TLS client certificate refused: none presented (one "
                               "from dicom.tls.ca is required)", "dicom")]
        log = pas.log()
        assert log.count("TLS: 127.0.0.1 refused: TLS client certificate refused: "
                         "self-signed certificate (connection closed)") == 2
        assert log.count("TLS: 127.0.0.1 refused: TLS client certificate refused: none "
                         "presented") == 1
        assert "EOF occurred" not in log  # the probe
    finally:
        pas.stop()
    rows = _security_rows(pas.home)
    assert len(rows) == 3 and rows[2]["detail"].startswith(
        "dicom; 1 more attempt refused in the 60 s from "), rows


def test_allowed_names_keep_the_port_to_the_listed_modalities(tmp_path: Path) -> None:
    """``dicom.tls.allowed_names``: with a CA that issues certificates to every device of
    the hospital, only the listed modalities' certificates are taken. Another of that CA
    completes the handshake, then is refused for its names: logged, audited, counted."""
    pki = make_pki(tmp_path / "pki")
    pas = PasProcess(tmp_path / "pas", {**_tls_env(pki), "PAS_HTTP__ENABLED": "true",
                                        "PAS_DICOM__TLS__ALLOWED_NAMES": '["ct-1.hospital"]'})
    pas.start()
    try:
        assert _echo(pas.port, _tls(pki, "client")) != 0
        refusal = ("TLS client certificate refused: its names (127.0.0.1) are not in "
                   "dicom.tls.allowed_names")
        rows = wait_for(lambda: _security_rows(pas.home), 10, what="the refusal's audit row")
        assert [(r["source"], r["outcome"], r["detail"]) for r in rows] == [
            ("127.0.0.1", f"failure: {refusal}", "dicom")], rows
        assert f"TLS: 127.0.0.1 refused: {refusal} (connection closed)" in pas.log()
        scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
        assert 'pas_access_refused_total{channel="dicom",reason="tls-certificate"} 1.0' in \
            scraped
    finally:
        pas.stop()
    pas.env["PAS_DICOM__TLS__ALLOWED_NAMES"] = '["ct-1.hospital", "127.0.0.1"]'
    pas.start()
    try:
        assert _echo(pas.port, _tls(pki, "client")) == 0  # its name (its address) listed
    finally:
        pas.stop()


@pytest.mark.parametrize(("subject", "alt", "allowed", "taken"), [
    (["ris.hospital"], [], ["RIS.Hospital"], True),  # ASCII letter case aside
    # Found in review: casefold() mapped these onto ASCII names a CA may let anyone write.
    (["ri\u017f.hospital"], [], ["ris.hospital"], False),  # long s
    (["\u212aiosk-ct"], [], ["kiosk-ct"], False),  # Kelvin sign
    # A certificate with subjectAltNames is named by them alone (RFC 6125), not its CN.
    (["ris.hospital"], [("DNS", "laptop-42")], ["ris.hospital"], False),
    (["laptop-42"], [("DNS", "ris.hospital")], ["ris.hospital"], True),
    # An IPv6 address in either form (Python writes 2001:DB8:0:0:0:0:0:10).
    (["x"], [("IP Address", "2001:DB8:0:0:0:0:0:10")], ["2001:db8::10"], True),
    (["ris.hospital\x00.evil"], [], ["ris.hospital"], False),
    ([], [], ["ris.hospital"], False),  # no name at all
])
def test_a_certificate_is_named_as_rfc_6125_says_in_ascii(
        subject: list[str], alt: list[tuple[str, str]], allowed: list[str],
        taken: bool) -> None:
    from appliance.ops.security import name_refusal

    peer = {"subject": tuple((("commonName", name),) for name in subject),
            "subjectAltName": tuple(alt)}
    assert (name_refusal(peer, allowed, "dicom.tls") is None) == taken


def test_allowed_names_that_no_certificate_carries_are_a_config_error() -> None:
    for odd in ("", " ris", "ri\u017f"):
        with pytest.raises(ConfigError) as refused:
            load_settings(environ={"PAS_DICOM__TLS__ALLOWED_NAMES": json.dumps([odd])})
        assert "dicom.tls.allowed_names" in str(refused.value.problems), refused.value.problems


def test_readable_key_is_refused_at_start_with_the_fix(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    (pki / "server.key").chmod(0o644)
    pas = PasProcess(tmp_path / "pas", _tls_env(pki))
    result = run_pas(["run"], pas.env, timeout=60)
    assert result.returncode == 1
    message = result.stdout + result.stderr
    assert "server.key" in message and "chmod 600" in message, message
    assert "PRIVATE KEY" not in message
    assert not (tmp_path / "pas" / "spool").exists() or not any(
        (tmp_path / "pas" / "spool").rglob("*.dcm"))


def _tls_node_and_pas(tmp_path: Path, pki: Path, key: Path,
                      **env: str) -> tuple[StoreSCP, PasProcess]:
    """A DCMTK storescp behind DICOM TLS (AE NODE) and a PAS forwarding every study to it,
    showing the client certificate with ``key``."""
    node = StoreSCP(tmp_path / "node", ae_title="NODE")
    node.start(extra=["+tls", str(pki / "server.key"), str(pki / "server.crt"),
                      "+cf", str(pki / "ca.crt")])
    try:
        pas = PasProcess(tmp_path / "pas", {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
            "PAS_DESTINATIONS__NODE__KIND": "dicom", "PAS_DESTINATIONS__NODE__AE_TITLE": "NODE",
            "PAS_DESTINATIONS__NODE__HOST": "127.0.0.1",
            "PAS_DESTINATIONS__NODE__PORT": str(node.port),
            "PAS_DESTINATIONS__NODE__TLS": "true",
            "PAS_DESTINATIONS__NODE__TLS_CA": str(pki / "ca.crt"),
            "PAS_DESTINATIONS__NODE__TLS_CERT": str(pki / "client.crt"),
            "PAS_DESTINATIONS__NODE__TLS_KEY": str(key),
            "PAS_ROUTING__FALLBACK__DESTINATIONS": '["node"]', **env,
        }).start()
    except BaseException:
        node.stop()
        raise
    return node, pas


def test_forward_to_a_tls_dicom_node(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    node, pas = _tls_node_and_pas(tmp_path, pki, pki / "client.key")
    try:
        files = sorted(str(p) for p in CT_DIR.glob("*.dcm"))[:3]
        subprocess.run(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1", str(pas.port),
                        *files], env=DCMTK_ENV, check=True, capture_output=True, timeout=60)
        wait_for(lambda: len(node.files()) == 3, 60, what="3 files at the TLS node")
        # pas doctor's C-ECHO goes over TLS too (it went in clear, and failed).
        check = _doctor_checks(pas)["destination node"]
        assert check["verdict"] == "ok" and check["detail"].endswith("over TLS: success"), check
    finally:
        pas.stop()
        node.stop()


def _doctor_checks(pas: PasProcess) -> dict[str, dict[str, str]]:
    result = run_pas(["doctor", "--json"], pas.env, timeout=120)
    return {c["name"]: c for c in json.loads(result.stdout)}


def test_c_move_to_a_tls_workstation_goes_over_tls(tmp_path: Path) -> None:
    """A C-MOVE's sub-association to a ``serving.move_destinations`` entry with ``tls``
    goes over TLS, PAS showing ``dicom.tls.cert`` (unset, ``tls`` follows
    ``dicom.tls.enabled``): a workstation whose storescp speaks TLS only and requires a
    certificate of the CA gets every image. Before, PAS opened it in clear whatever the
    configuration: the handshake failed, the viewer got 0xA801 and nothing. The viewer
    here, DCMTK's movescu, has no TLS: PAS's listener is in clear."""
    pki = make_pki(tmp_path / "pki")
    workstation = StoreSCP(tmp_path / "ws", ae_title="WS").start(extra=_tls(pki, "client"))
    pas = PasProcess(tmp_path / "pas", {
        **_tls_env(pki), "PAS_DICOM__TLS__ENABLED": "false", "PAS_SERVING__MOVE_DESTINATIONS":
            f'[{{title = "WS", host = "127.0.0.1", port = {workstation.port}, tls = true}}]'}
    ).start()
    try:
        files = sorted(CT_DIR.glob("*.dcm"))[:3]
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        files = [f for f in sorted(CT_DIR.glob("*.dcm"))
                 if str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) == study][:3]
        subprocess.run(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1", str(pas.port),
                        *map(str, files)], env=DCMTK_ENV,
                       check=True, capture_output=True, timeout=60)
        moved = subprocess.run(["movescu", "-v", "-S", "-aec", "PAS", "-aet", "VIEWER",
                                "-aem", "WS", "-k", "QueryRetrieveLevel=STUDY", "-k",
                                f"StudyInstanceUID={study}", "127.0.0.1", str(pas.port)],
                               env=DCMTK_ENV,
                               capture_output=True, text=True, timeout=60)
        assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr[-2000:]
        held = {dcmread(f).SOPInstanceUID: hashlib.sha256(dcmread(f).PixelData).hexdigest()
                for f in files}
        got = {dcmread(f).SOPInstanceUID: hashlib.sha256(dcmread(f).PixelData).hexdigest()
               for f in workstation.files()}
        assert got == held
        check = _doctor_checks(pas)["move destination WS"]  # over TLS, as the C-MOVE went
        assert check["verdict"] == "ok" and check["detail"].endswith("over TLS: success"), check
    finally:
        pas.stop()
        workstation.stop()


def test_a_move_destination_s_certificate_must_name_its_host_when_told(tmp_path: Path) -> None:
    """``serving.move_destinations[].tls_check_hostname``: the workstation's certificate
    (made for 127.0.0.1, its only subjectAltName) must name the entry's ``host``. Reached
    as ``localhost`` it is refused: no image goes, the viewer is told, ``pas doctor``
    says why. Found in review: the listener's ``allowed_names`` keep other devices of a
    hospital-wide CA out, but any of them, given the workstation's address, received its
    images (the CA's word alone was checked)."""
    pki = make_pki(tmp_path / "pki")
    workstation = StoreSCP(tmp_path / "ws", ae_title="WS").start(extra=_tls(pki, "client"))

    def moving(host: str) -> PasProcess:
        return PasProcess(tmp_path / f"pas-{host}", {
            **_tls_env(pki), "PAS_DICOM__TLS__ENABLED": "false",
            "PAS_SERVING__MOVE_DESTINATIONS": f'[{{title = "WS", host = "{host}", port = '
                                              f'{workstation.port}, tls = true, '
                                              "tls_check_hostname = true}]"}).start()

    files = sorted(CT_DIR.glob("*.dcm"))
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    files = [f for f in files
             if str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) == study][:2]

    def move(pas: PasProcess) -> subprocess.CompletedProcess[str]:
        subprocess.run(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1", str(pas.port),
                        *map(str, files)], env=DCMTK_ENV, check=True, capture_output=True,
                       timeout=60)
        return subprocess.run(["movescu", "-v", "-S", "-aec", "PAS", "-aet", "VIEWER",
                               "-aem", "WS", "-k", "QueryRetrieveLevel=STUDY", "-k",
                               f"StudyInstanceUID={study}", "127.0.0.1", str(pas.port)],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=60)

    try:
        pas = moving("localhost")
        try:
            moved = move(pas)
            said = moved.stdout + moved.stderr
            assert "Received Final Move Response (Refused" in said, said[-2000:]
            assert workstation.files() == []
            check = _doctor_checks(pas)["move destination WS"]
            assert check["verdict"] == "warn", check
            assert "certificate is not valid for 'localhost'" in check["detail"], check
        finally:
            pas.stop()
        pas = moving("127.0.0.1")
        try:
            moved = move(pas)
            assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr[-2000:]
            wait_for(lambda: len(workstation.files()) == 2, 30, what="2 images at WS")
            assert _doctor_checks(pas)["move destination WS"]["verdict"] == "ok"
        finally:
            pas.stop()
    finally:
        workstation.stop()


def test_a_tls_move_destination_without_a_ca_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"PAS_SERVING__MOVE_DESTINATIONS":
                               '[{title = "WS", host = "10.1.1.9", port = 104, tls = true}]'})
    assert ("serving.move_destinations[0].tls: WS is reached over TLS: dicom.tls.ca (the CA "
            "its certificate chains to) is required") in str(refused.value)
    # Implied by the listener's TLS: the same, where the TLS settings name no CA.
    with pytest.raises(ConfigError, match=r"serving\.move_destinations\[0\]\.tls"):
        load_settings(environ={
            "PAS_DICOM__TLS__ENABLED": "true", "PAS_DICOM__TLS__CERT": "/x.crt",
            "PAS_DICOM__TLS__KEY": "/x.key", "PAS_DICOM__TLS__REQUIRE_CLIENT_CERT": "false",
            "PAS_SERVING__MOVE_DESTINATIONS":
            '[{title = "WS", host = "10.1.1.9", port = 104}]'})
    # Unset, ``tls`` follows the listener's (the C-MOVE path asks it so, serving/qr_retrieve.py).
    assert MoveDestination(title="WS", host="h", port=104).uses_tls(True) is True
    assert MoveDestination(title="WS", host="h", port=104).uses_tls(False) is False
    assert MoveDestination(title="WS", host="h", port=104, tls=False).uses_tls(True) is False


def test_association_attempts_are_limited_per_source(tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__MAX_ASSOCIATION_ATTEMPTS_PER_MINUTE": "5",
        "PAS_DICOM__KNOWN_AES": '[{title = "CT_PINNED", host = "127.0.0.1"}]'}).start()
    try:
        outcomes = [_echo(pas.port, []) for _ in range(8)]
        assert outcomes[:5] == [0] * 5 and all(rc != 0 for rc in outcomes[5:]), outcomes
        assert "attempts in a minute" in pas.log()
        # A known AE pinned to this address is exempt (one association per image is common).
        assert [_echo(pas.port, [], "CT_PINNED") for _ in range(6)] == [0] * 6
    finally:
        pas.stop()
    assert free_port() and os.path.exists(pas.log_path)
    # In the audit trail: the first refusal, then (at the stop) the two after it.
    rows = _security_rows(pas.home)
    assert [(r["actor"], r["source"], r["outcome"]) for r in rows] == [
        ("ECHO", "127.0.0.1",
         "failure: association rejected: more than 5 attempts in a minute")] * 2
    assert rows[0]["detail"] == "dicom"
    assert rows[1]["detail"].startswith("dicom; 2 more attempts refused in the 60 s from ")


def test_loosened_key_directory_is_tightened_at_start_and_audited(tmp_path: Path) -> None:
    home = tmp_path / "pas"
    pki = make_pki(home / "pki")  # the layout enrolment leaves, keys loosened by a restore
    pki.chmod(0o755)
    (pki / "client.key").chmod(0o644)
    pas = PasProcess(home, {"PAS_HTTP__ENABLED": "false"}).start()
    pas.stop()
    assert pki.stat().st_mode & 0o777 == 0o700
    assert (pki / "client.key").stat().st_mode & 0o777 == 0o600
    assert (pki / "ca.crt").stat().st_mode & 0o777 == 0o600
    assert "permissions tightened" in pas.log() and "PRIVATE KEY" not in pas.log()
    import sqlite3

    conn = sqlite3.connect(home / "pas.sqlite")
    details = [r[0] for r in conn.execute("SELECT detail FROM audit WHERE event = 'security'")]
    conn.close()
    assert any("client.key -> 0600" in d for d in details), details


def _security_rows(home: Path) -> list[dict[str, object]]:
    return [dict(r) for r in read_rows(home / "pas.sqlite",
                                       "SELECT * FROM audit WHERE event = 'security' "
                                       "AND outcome LIKE 'failure:%' ORDER BY id")]


def test_refused_access_is_audited_once_per_source_and_minute(tmp_path: Path) -> None:
    """An unknown calling AE and requests without a valid bearer token are refused, and the
    audit trail says so (PS3.15 Security Alert): one row per source and reason at first,
    the attempts after it counted and written at the stop, every one in the counter; a known
    AE and a good token are served meanwhile."""
    token = "s3cret"
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__KNOWN_AES": '[{title = "CT1"}]',
        "PAS_SERVING__AUTH": "bearer", "PAS_SERVING__BEARER_TOKENS": f'["{token}"]'}).start()
    base = f"http://127.0.0.1:{pas.http_port}"
    try:
        assert [_echo(pas.port, [], "INTRUDER") for _ in range(4)] != [0] * 4
        assert all(_echo(pas.port, [], "INTRUDER") != 0 for _ in range(2))
        assert _echo(pas.port, [], "CT1") == 0  # a known AE is served meanwhile
        [row] = wait_for(lambda: _security_rows(pas.home), 10, what="the refusal's audit row")
        assert row["actor"] == "INTRUDER" and row["source"] == "127.0.0.1"
        assert row["target"] == "PAS" and row["detail"] == "dicom"
        assert row["outcome"] == ("failure: association rejected: calling AE 'INTRUDER' from "
                                  "127.0.0.1 is not a known AE (dicom.known_aes)")
        asked = [({}, 3), ({"Authorization": "Bearer wrong"}, 2),
                 ({"Authorization": f"Basic {token}"}, 1)]
        for headers, times in asked:
            for _ in range(times):
                assert httpx.get(f"{base}/api/status", headers=headers,
                                 timeout=10).status_code == 401
        good = {"Authorization": f"Bearer {token}"}

        def refused_counts() -> dict[str, float]:
            metrics = httpx.get(f"{base}/metrics", headers=good, timeout=10)
            assert metrics.status_code == 200
            return {m.group(1): float(m.group(2)) for m in re.finditer(
                r'^pas_access_refused_total\{channel="\w+",reason="([\w-]+)"\} (\S+)$',
                metrics.text, re.M) if float(m.group(2))}  # every reason exported, 0 first

        # Each refusal is counted once its 401 was answered (appliance/web/auth.py): awaited.
        expected = {"unknown-ae": 6.0, "bearer-token": 6.0}
        wait_for(lambda: refused_counts() == expected, 10, what="the refusals counted")
        # Each row is written once its 401 was answered (appliance/web/auth.py): awaited.
        http_rows = wait_for(lambda: len(rows := [r for r in _security_rows(pas.home)
                                                  if r["detail"] == "http"]) >= 3 and rows,
                             10, what="the three HTTP refusals' rows")
        assert [(r["actor"], r["source"], r["target"], r["outcome"]) for r in http_rows] == [
            ("anonymous", "127.0.0.1", "/api/status", f"failure: HTTP request refused (401): "
             f"{reason}") for reason in ("no bearer token", "a bearer token that is not one "
                                         "of serving.bearer_tokens", "an Authorization header "
                                         "that is not a bearer token")]
    finally:
        pas.stop()
    # At the stop, what each first row did not count: 5 more INTRUDER associations, 2 and 1
    # more requests; nothing for the single one.
    later = [(r["actor"], r["detail"]) for r in _security_rows(pas.home)[4:]]
    assert sorted(later) == sorted([
        ("INTRUDER", "dicom; 5 more attempts refused in the 60 s from " + _minute(later, 0)),
        ("anonymous", "http; 2 more attempts refused in the 60 s from " + _minute(later, 1)),
        ("anonymous", "http; 1 more attempt refused in the 60 s from " + _minute(later, 2)),
    ]), later
    trail = read_rows(pas.home / "pas.sqlite", "SELECT count(*) AS n FROM audit "
                      "WHERE event = 'security'")[0]["n"]
    assert trail == 7
    # What the privacy officer runs: the same seven rows, newest first.
    shown = pas.cli("audit", "--event", "security", "--failures", "--json")
    assert [r["actor"] for r in json.loads(shown.stdout)][::-1] == [
        r["actor"] for r in _security_rows(pas.home)]


def _minute(rows: list[tuple[object, object]], index: int) -> str:
    """The window start written in a row (its clock is the daemon's)."""
    return str(rows[index][1]).rsplit(" from ", 1)[1]


def test_what_pas_writes_is_not_world_readable_whatever_the_umask(tmp_path: Path) -> None:
    """``pas run`` started with the usual umask 022 (by hand, outside pas.service and its
    UMask=0027) wrote the index (patients' names) and each stored image 0644: any local
    user could read them. Now 0640 at most, as under the unit."""
    previous = os.umask(0o022)  # the child inherits it
    try:
        pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                            "PAS_HTTP__ENABLED": "false"}).start()
    finally:
        os.umask(previous)
    try:
        storescu(sorted(CT_DIR.glob("*.dcm"))[:2], pas.port)
        written = [pas.home / "pas.sqlite", *(pas.home / "spool").rglob("*")]
        assert sum(p.is_file() for p in written) >= 3, written  # the index and two images
        readable = {str(p): stat.filemode(p.stat().st_mode) for p in written
                    if p.stat().st_mode & stat.S_IRWXO}
        assert not readable, readable
    finally:
        pas.stop()


def test_a_dicom_destination_key_others_can_read_makes_its_jobs_wait(tmp_path: Path) -> None:
    """A ``dicom`` destination's ``tls_key`` readable by others was refused by a generic
    error: each job to it counted an attempt, backed off and failed in the end, for a file
    mode. Now its jobs wait for the credentials, as a STOW-RS destination's do: the key and
    its fix named, no attempt counted, nothing sent."""
    pki = make_pki(tmp_path / "pki")
    key = tmp_path / "readable-client.key"
    key.write_bytes((pki / "client.key").read_bytes())
    key.chmod(0o644)
    node, pas = _tls_node_and_pas(tmp_path, pki, key, PAS_STUDY__STABLE_AFTER_S="0.5",
                                  PAS_QUEUE__POLL_INTERVAL_S="0.2")
    try:
        files = sorted(str(p) for p in CT_DIR.glob("*.dcm"))[:3]
        subprocess.run(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1", str(pas.port),
                        *files], env=DCMTK_ENV, check=True, capture_output=True, timeout=60)

        def tried() -> dict | None:
            rows = read_rows(pas.home / "pas.sqlite",
                             "SELECT state, attempts, last_error FROM jobs")
            return dict(rows[0]) if rows and rows[0]["last_error"] else None

        job = wait_for(tried, 60, what="the job's first try")
        assert job["last_error"].startswith("waiting for credentials: "), job
        assert f"destinations.node.tls_key {key}" in job["last_error"], job
        assert f"chmod 600 {key}" in job["last_error"], job
        assert job["state"] == "pending" and job["attempts"] == 0, job
        # pas queue list shows what to do too (its column was cut at 60 characters).
        pas.env["COLUMNS"] = "2000"  # one line per row: the check reads the cell whole
        assert f"chmod 600 {key}" in pas.cli("queue", "list").stdout
        assert node.files() == []
    finally:
        pas.stop()
        node.stop()


@pytest.mark.parametrize("check_hostname", [False, True])
def test_a_destination_s_certificate_must_name_its_host_when_told(
        tmp_path: Path, check_hostname: bool) -> None:
    """``tls_check_hostname``: the node's certificate (made for 127.0.0.1, its only
    subjectAltName) must name the destination's ``host``. Reached as ``localhost``, the
    node is trusted on its CA's word alone without the check, as before; with it, the jobs
    wait for credentials with the handshake's own words (pynetdicom only logged them: the
    job said "refused, timed out, no route or the TLS handshake failed"), nothing is sent,
    and ``pas doctor`` says the same. Reached as 127.0.0.1 with the check, it passes."""
    pki = make_pki(tmp_path / "pki")
    node, pas = _tls_node_and_pas(
        tmp_path, pki, pki / "client.key", PAS_DESTINATIONS__NODE__HOST="localhost",
        PAS_DESTINATIONS__NODE__TLS_CHECK_HOSTNAME=str(check_hostname).lower(),
        PAS_STUDY__STABLE_AFTER_S="0.5", PAS_QUEUE__POLL_INTERVAL_S="0.2")
    try:
        files = sorted(str(p) for p in CT_DIR.glob("*.dcm"))[:2]
        subprocess.run(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1", str(pas.port),
                        *files], env=DCMTK_ENV, check=True, capture_output=True, timeout=60)
        if not check_hostname:
            wait_for(lambda: len(node.files()) == 2, 60, what="2 files at the TLS node")
            return

        def tried() -> dict | None:
            rows = read_rows(pas.home / "pas.sqlite",
                             "SELECT state, attempts, last_error FROM jobs")
            return dict(rows[0]) if rows and rows[0]["last_error"] else None

        job = wait_for(tried, 60, what="the job's first try")
        assert job["last_error"] == (
            f"waiting for credentials: node: the certificate of localhost:{node.port} was "
            "refused at the TLS handshake: Hostname mismatch, certificate is not valid for "
            "'localhost'."), job
        assert job["state"] == "pending" and job["attempts"] == 0, job
        assert node.files() == []
        check = _doctor_checks(pas)["destination node"]
        assert check["verdict"] == "fail", check
        assert "certificate is not valid for 'localhost'" in check["detail"], check

        pas.stop()  # the same node reached by the address its certificate names
        pas.env["PAS_DESTINATIONS__NODE__HOST"] = "127.0.0.1"
        pas.start()
        wait_for(lambda: len(node.files()) == 2, 60, what="2 files at the TLS node")
    finally:
        pas.stop()
        node.stop()
