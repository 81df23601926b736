"""The expiry of the TLS certificates and CAs the configuration names (appliance/ops/
certificates.py): ``pas_tls_certificate_days_left`` on a real daemon's ``/metrics``, and
``pas doctor``'s rows.

Found in a review of what an expired certificate looks like on site (2026-12-06): only the
hub client certificate had a figure and a doctor row. The DICOM listener's certificate
expiring turned every modality's handshake away, the HL7 listener's the RIS's, a
destination's CA file every forward to it; each said only that handshakes failed.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from appliance.config import load_settings
from tests.faults.pki import self_signed
from tests.support.peers import PasProcess, free_port, run_pas


def tls_settings(pki: Path, hl7: str, node_ca: str) -> dict[str, str]:
    """DICOM TLS on ``long`` (its own CA), HL7 TLS on ``hl7``, a TLS destination trusting
    ``node_ca``."""
    return {
        "PAS_DICOM__TLS__ENABLED": "true", "PAS_DICOM__TLS__CERT": str(pki / "long.crt"),
        "PAS_DICOM__TLS__KEY": str(pki / "long.key"), "PAS_DICOM__TLS__CA": str(pki / "long.crt"),
        "PAS_HL7__TLS__ENABLED": "true", "PAS_HL7__TLS__CERT": str(pki / f"{hl7}.crt"),
        "PAS_HL7__TLS__KEY": str(pki / f"{hl7}.key"), "PAS_HL7__TLS__CA": str(pki / "long.crt"),
        "PAS_DESTINATIONS__NODE__KIND": "dicom", "PAS_DESTINATIONS__NODE__AE_TITLE": "NODE",
        "PAS_DESTINATIONS__NODE__HOST": "127.0.0.1",
        "PAS_DESTINATIONS__NODE__PORT": str(free_port()),
        "PAS_DESTINATIONS__NODE__TLS": "true", "PAS_DESTINATIONS__NODE__TLS_CA": node_ca,
    }


def test_each_certificate_in_use_has_its_days_and_doctor_names_the_ones_to_renew(
        tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    self_signed(pki, "long", 400)
    self_signed(pki, "soon", 10)
    expired = self_signed(pki, "expired", -2)
    self_signed(pki, "unused", -5)  # named under a listener whose TLS is off: not in use
    pas = PasProcess(tmp_path / "pas", {
        **tls_settings(pki, "soon", str(expired)),
        "PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(free_port()),
        "PAS_AUDIT__SYSLOG_CA": str(pki / "unused.crt"),  # no syslog_host: no copy made
    }).start()
    try:
        scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
        days = {m[1]: float(m[2]) for m in re.finditer(
            r'^pas_tls_certificate_days_left\{certificate="([^"]+)"\} (\S+)$', scraped,
            re.MULTILINE)}
        assert set(days) == {"dicom.tls.cert", "dicom.tls.ca", "hl7.tls.cert", "hl7.tls.ca",
                             "destinations.node.tls_ca"}, days
        for key, expected in (("dicom.tls.cert", 400), ("dicom.tls.ca", 400),
                              ("hl7.tls.cert", 10), ("destinations.node.tls_ca", -2)):
            assert abs(days[key] - expected) < 0.01, (key, days[key])
        doctor = run_pas(["doctor", "--json"], pas.env, timeout=120)
        rows = [c for c in json.loads(doctor.stdout) if c["name"].startswith("TLS certificate")]
        soon = (datetime.now(UTC) + timedelta(days=10)).strftime("%Y-%m-%d")
        gone = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%d")
        assert [(r["verdict"], r["detail"].split(" (")[0]) for r in rows] == [
            ("warn", "hl7.tls.cert"), ("fail", "destinations.node.tls_ca")], rows
        assert f"expires on {soon}" in rows[0]["detail"] and "in 10 days" in rows[0]["detail"]
        assert f"expired on {gone}" in rows[1]["detail"], rows[1]
        assert "its TLS handshakes fail" in rows[1]["detail"]
        assert all("systemctl restart pas" in r["fix"] for r in rows), rows
        assert doctor.returncode != 0  # a fail row
    finally:
        pas.stop()


def test_doctor_says_which_expires_first_or_that_a_file_cannot_be_read(tmp_path: Path) -> None:
    from appliance.ops.doctor_tls import check_tls_certificates

    pki = tmp_path / "pki"
    self_signed(pki, "long", 400)
    self_signed(pki, "later", 700)
    home = {"PAS_HOME": str(tmp_path / "home")}
    assert check_tls_certificates(load_settings(environ=home)) == []  # no TLS: no row
    [ok] = check_tls_certificates(load_settings(environ={**home, **tls_settings(
        pki, "later", str(pki / "later.crt"))}))
    first = (datetime.now(UTC) + timedelta(days=400)).strftime("%Y-%m-%d")
    assert (ok.name, ok.verdict) == ("TLS certificates", "ok"), ok
    assert ok.detail == (f"5 in use; the first to expire: dicom.tls.cert, on {first} "
                         "(400 days)"), ok
    (pki / "not-a-cert.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    rows = check_tls_certificates(load_settings(environ={**home, **tls_settings(
        pki, "later", str(pki / "not-a-cert.crt"))}))
    assert [(r.name, r.verdict) for r in rows] == [("TLS certificate", "fail")], rows
    assert rows[0].detail == (f"destinations.node.tls_ca: cannot be read: {pki}/not-a-cert.crt"
                              ": no PEM certificate in it"), rows[0]
    rows = check_tls_certificates(load_settings(environ={**home, **tls_settings(
        pki, "later", str(pki / "missing.crt"))}))
    assert rows[0].verdict == "fail" and rows[0].detail.startswith(
        "destinations.node.tls_ca: cannot be read: [Errno 2] No such file or directory"), rows


def test_a_big_file_named_as_a_certificate_is_not_read(tmp_path: Path) -> None:
    from appliance.ops import certificates

    big, size = tmp_path / "pas.sqlite", certificates.MAX_FILE_BYTES + 1
    with big.open("wb") as out:
        out.truncate(size)
    with pytest.raises(ValueError, match=rf"pas\.sqlite: {size} bytes, not a certificate file"):
        certificates.days_in_service(certificates.CertificateFile("dicom.tls.cert", big))


def test_the_heartbeat_says_the_most_urgent_certificates_after_the_disk(
        tmp_path: Path) -> None:
    """The heartbeat's error lines (read back by the hub: tests/test_ops_fleet.py): the
    most urgent first, at most two; none while all are sound. Found in review: one line
    per file, said before the store's, with errors capped at six, let a CA's reissue of six
    certificates push the disk alert and the missing files out of the heartbeat (the hub
    then read no alert). The two now go after the store's files and disk lines."""
    from appliance.ops.heartbeat import CERTIFICATE_LINES, build_heartbeat
    from appliance.store.db import Database

    pki = tmp_path / "pki"
    self_signed(pki, "long", 400)
    self_signed(pki, "soon", 10)
    self_signed(pki, "sooner", 5)
    expired = self_signed(pki, "expired", -2)
    home = {"PAS_HOME": str(tmp_path / "home")}
    sound = load_settings(environ={**home, **tls_settings(pki, "long", str(pki / "long.crt"))})
    sound.home.mkdir(parents=True)
    db = Database(sound.db_path)
    assert build_heartbeat(sound, db, 0.0)["errors"] == []
    due = load_settings(environ={**home, **tls_settings(pki, "soon", str(expired)),
                                 "PAS_DICOM__TLS__CERT": str(pki / "sooner.crt"),
                                 "PAS_DICOM__TLS__KEY": str(pki / "sooner.key")})
    errors = build_heartbeat(due, db, 0.0)["errors"]
    sooner = (datetime.now(UTC) + timedelta(days=5)).strftime("%Y-%m-%d")
    gone = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%d")
    assert CERTIFICATE_LINES == 2
    assert errors == [f"TLS certificate destinations.node.tls_ca: expired 2.0 days ago "
                           f"({gone}): its TLS handshakes fail",
                           f"TLS certificate dicom.tls.cert: expires in 5.0 days ({sooner})"
                           ], errors
    assert not any("hl7.tls.cert" in line for line in errors)  # the third: left out


def test_only_the_files_pas_loads_are_watched(tmp_path: Path) -> None:
    """Found in review: a file left named where PAS does not use it (the HL7 listener off,
    ``tls = false``, an ``http://`` archive, a client CA under bearer auth) was watched, and
    its expiry raised alerts for nothing; the listener's certificate and CA, which C-MOVE
    sub-associations over TLS use with the listener's own TLS off, were not."""
    from appliance.ops import certificates

    pki = tmp_path / "pki"
    crt = str(self_signed(pki, "any", 100))
    key = str(pki / "any.key")
    base = {"PAS_HOME": str(tmp_path / "home"), "PAS_DICOM__TLS__CERT": crt,
            "PAS_DICOM__TLS__KEY": key, "PAS_DICOM__TLS__CA": crt,
            "PAS_HL7__TLS__ENABLED": "true", "PAS_HL7__TLS__CERT": crt,
            "PAS_HL7__TLS__KEY": key, "PAS_HL7__TLS__CA": crt,
            "PAS_SERVING__TLS_CERT": crt, "PAS_SERVING__TLS_KEY": key,
            "PAS_SERVING__TLS_CLIENT_CA": crt, "PAS_SERVING__AUTH": "bearer",
            "PAS_SERVING__BEARER_TOKENS": '["a-token-long-enough-for-pas-0123456789"]',
            "PAS_DESTINATIONS__PACS__KIND": "dicom", "PAS_DESTINATIONS__PACS__AE_TITLE": "PACS",
            "PAS_DESTINATIONS__PACS__HOST": "127.0.0.1", "PAS_DESTINATIONS__PACS__PORT": "104",
            "PAS_DESTINATIONS__PACS__TLS_CA": crt,
            "PAS_DESTINATIONS__ARCH__KIND": "stowrs",
            "PAS_DESTINATIONS__ARCH__URL": "http://127.0.0.1:8042/dicom-web",
            "PAS_DESTINATIONS__ARCH__CA_FILE": crt}

    def keys(**more: str) -> list[str]:
        return [c.key for c in certificates.in_use(load_settings(environ={**base, **more}))]

    assert keys() == ["hl7.tls.cert", "hl7.tls.ca", "serving.tls_cert"]
    # A modality called back over TLS: only with an address, and Storage Commitment on.
    modality = '[{title = "CT1", host = "127.0.0.1", port = 11113, tls = true}]'
    no_address = '[{title = "CT1", tls = true}]'
    assert "dicom.tls.ca" in keys(PAS_DICOM__KNOWN_AES=modality)
    assert "dicom.tls.ca" not in keys(PAS_DICOM__KNOWN_AES=no_address)
    assert "dicom.tls.ca" not in keys(PAS_DICOM__KNOWN_AES=modality,
                                      PAS_DICOM__STORAGE_COMMITMENT="false")
    # A client certificate whose key is in the same PEM file (client_key unset): loaded.
    assert "destinations.arch.client_cert" in keys(
        PAS_DESTINATIONS__ARCH__URL="https://127.0.0.1:8443/dicom-web",
        PAS_DESTINATIONS__ARCH__CLIENT_CERT=crt)
    assert keys(PAS_HL7__ENABLED="false", PAS_SERVING__AUTH="client_cert") == [
        "serving.tls_cert", "serving.tls_client_ca"]
    workstation = '[{title = "WS1", host = "127.0.0.1", port = 11113, tls = true}]'
    assert sorted(keys(PAS_HL7__ENABLED="false", PAS_SERVING__MOVE_DESTINATIONS=workstation,
                       PAS_DESTINATIONS__PACS__TLS="true",
                       PAS_DESTINATIONS__ARCH__URL="https://127.0.0.1:8443/dicom-web")) == [
        "destinations.arch.ca_file", "destinations.pacs.tls_ca", "dicom.tls.ca",
        "dicom.tls.cert", "serving.tls_cert"]


def test_a_ca_bundle_counts_from_its_first_certificate_to_expire(tmp_path: Path) -> None:
    """An expired root in a CA bundle counts: a rule that skipped expired roots (tried, and
    found in review) read a bundle as sound while the CA its modalities chain to had
    expired. Doctor's fix for a CA file says to remove the old ones no peer chains to."""
    from appliance.ops import certificates
    from appliance.ops.doctor_tls import check_tls_certificates

    pki = tmp_path / "pki"
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(b"".join(self_signed(pki, name, days).read_bytes()
                                for name, days in (("root", 100), ("old", -3), ("new", 900))))
    days = certificates.days_in_service(certificates.CertificateFile("dicom.tls.ca", bundle))
    assert abs(days + 3) < 0.01
    self_signed(pki, "long", 400)
    [row] = check_tls_certificates(load_settings(environ={
        "PAS_HOME": str(tmp_path / "home"), **tls_settings(pki, "long", str(bundle))}))
    assert (row.verdict, row.detail.split(" (")[0]) == ("fail", "destinations.node.tls_ca")
    assert "remove from a bundle the expired ones no peer chains to" in row.fix, row


def test_a_file_renewed_without_a_restart_counts_from_the_one_served_until_the_restart(
        tmp_path: Path) -> None:
    """Found in review: a certificate file renewed on disk read sound at once (the alert
    cleared), while the DICOM listener served the old one, loaded at start, until it expired
    and every modality's handshake failed. The daemon's figure now counts from the one it
    serves until a restart; then from the renewed one."""
    pki = tmp_path / "pki"
    self_signed(pki, "listener", 10)
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__TLS__ENABLED": "true", "PAS_DICOM__TLS__CERT": str(pki / "listener.crt"),
        "PAS_DICOM__TLS__KEY": str(pki / "listener.key"),
        "PAS_DICOM__TLS__CA": str(pki / "listener.crt"),
    }).start()

    def served_days() -> float:
        scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
        found = re.search(r'^pas_tls_certificate_days_left\{certificate="dicom.tls.cert"\} '
                          r"(\S+)$", scraped, re.MULTILINE)
        assert found is not None, scraped
        return float(found[1])

    try:
        assert abs(served_days() - 10) < 0.01
        self_signed(pki, "listener", 400)  # renewed in place, PAS not restarted
        assert abs(served_days() - 10) < 0.01  # the listener still serves the old one
        pas.stop()
        pas.start()
        assert abs(served_days() - 400) < 0.01
    finally:
        pas.stop()


def test_the_heartbeat_says_a_renewed_file_waits_for_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.ops import certificates

    monkeypatch.setattr(certificates, "_loaded", {})  # this test process's, put back after
    pki = tmp_path / "pki"
    self_signed(pki, "listener", 10)
    self_signed(pki, "node", 10)  # a destination's CA: read at each association
    settings = load_settings(environ={
        "PAS_DESTINATIONS__NODE__KIND": "dicom", "PAS_DESTINATIONS__NODE__AE_TITLE": "NODE",
        "PAS_DESTINATIONS__NODE__HOST": "127.0.0.1", "PAS_DESTINATIONS__NODE__PORT": "11119",
        "PAS_DESTINATIONS__NODE__TLS": "true",
        "PAS_DESTINATIONS__NODE__TLS_CA": str(pki / "node.crt"),
        "PAS_HOME": str(tmp_path / "home"), "PAS_DICOM__TLS__ENABLED": "true",
        "PAS_DICOM__TLS__CERT": str(pki / "listener.crt"),
        "PAS_DICOM__TLS__KEY": str(pki / "listener.key"),
        "PAS_DICOM__TLS__REQUIRE_CLIENT_CERT": "false"})
    certificates.remember_loaded(settings)
    self_signed(pki, "listener", 400)
    self_signed(pki, "node", 400)  # used as it is from the next forward: no line
    served = (datetime.now(UTC) + timedelta(days=10)).strftime("%Y-%m-%d")
    renewed = (datetime.now(UTC) + timedelta(days=400)).strftime("%Y-%m-%d")
    assert certificates.heartbeat_errors(settings) == [
        f"TLS certificate dicom.tls.cert: expires in 10.0 days ({served}); its file was "
        f"renewed ({renewed}): restart PAS to serve it"]
    # The hub reads the days served from it (pas_fleet_site_tls_certificate_days_left).
    assert certificates.days_said(certificates.heartbeat_errors(settings)[0]) == (
        "dicom.tls.cert", 10.0)
    monkeypatch.setattr(certificates, "_loaded", {})  # a process that loaded nothing: pas
    assert certificates.heartbeat_errors(settings) == []  # doctor reads the file as it is
