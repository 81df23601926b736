"""Hub PKI and enrolment through the real CLI, and the mutual-TLS gate of /api/v1.

Real peers: ``pas hub init/token/run/revoke`` and ``pas enroll`` as child processes, real TLS
1.3 on loopback. Bad inputs: no client certificate, a certificate from another CA, a revoked
one (refused at once, even on an open connection), used / forged tokens, a CA that does not
match the token, a hub name the certificate does not cover.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.hub.pki import HubPKI
from appliance.transfer.enrolment import EnrolmentError, load_enrolment
from appliance.transfer.enrolment import enroll as enroll_appliance
from tests.support.hub import HubProcess, client, enroll
from tests.support.peers import PAS_BIN, run_pas, wait_for


def _pas_enroll(home: Path, url: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PAS_HOME": str(home)}
    return run_pas(["enroll", "--hub", url, "--token", token], env, timeout=60)


def test_init_creates_private_files_and_a_server_certificate_for_the_addresses(
        tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").init("hub.region.example", "198.18.0.1", cli=True)
    for name in ("ca.key", "ca.crt", "server.key", "server.crt", "transfer.key",
                 "transfer.pub"):
        mode = stat.S_IMODE((hub.home / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    cert = x509.load_pem_x509_certificate((hub.home / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.region.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.1"]
    assert len((hub.home / "transfer.pub").read_bytes()) == 32
    again = hub.cli("init", check=False)
    assert again.returncode == 1 and "already initialised" in again.stderr


def test_init_refuses_an_address_or_a_home_it_cannot_use_and_writes_nothing(
        tmp_path: Path) -> None:
    """``--address ""`` was a traceback half-way (the CA written, the server certificate not:
    "already initialised" at the next try, and no tool to finish it); ``http://hub``, ``bad
    name!`` and ``999.1.1.1`` went into the certificate as DNS names no appliance matches; a
    home that is a file was a traceback. Each is one line naming it, nothing written."""
    hub = HubProcess(tmp_path / "hub")
    for address in ("", "http://hub", "bad name!", "999.1.1.1", "hub.example:8443"):
        refused = hub.cli("init", "--address", "hub.region.example", "--address", address,
                          check=False)
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert said.startswith(f"--address {address!r}: not an IP address or a DNS name"), said
        assert not hub.home.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    refused = HubProcess(a_file).cli("init", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"cannot make the hub's home {a_file}" in " ".join(refused.stderr.split())
    # Then a good one works on the same home.
    hub.init("hub.region.example", "*.region.example", "198.18.0.1", cli=True)
    assert (hub.home / "server.crt").is_file()


def test_enroll_writes_0600_files_and_talks_mutual_tls(hub: HubProcess, tmp_path: Path) -> None:
    enrolment = enroll(hub, tmp_path / "site", "CHU-NORD", cli=True)
    assert enrolment.site == "CHU-NORD" and enrolment.url == hub.url
    assert enrolment.hub_transfer_key == (hub.home / "transfer.pub").read_bytes()
    assert stat.S_IMODE(enrolment.pki_dir.stat().st_mode) == 0o700
    for name in ("client.key", "client.crt", "ca.crt", "hub.json"):
        assert stat.S_IMODE((enrolment.pki_dir / name).stat().st_mode) == 0o600, name
    assert (enrolment.pki_dir / "ca.crt").read_bytes() == (hub.home / "ca.crt").read_bytes()
    with client(enrolment) as http:
        answer = http.get("/api/v1/whoami")
        assert answer.status_code == 200 and answer.json() == {"site": "CHU-NORD"}
        assert http.get("/api/v1/transfers/nope/buckets").status_code == 404
    sites = hub.cli("sites").stdout
    assert "CHU-NORD" in sites and "valid" in sites


def test_a_token_works_once(hub: HubProcess, tmp_path: Path) -> None:
    token = hub.token("ONCE", cli=True)
    assert _pas_enroll(tmp_path / "a", hub.url, token).returncode == 0
    second = _pas_enroll(tmp_path / "b", hub.url, token)
    assert second.returncode == 1 and "403" in second.stderr
    assert load_enrolment(tmp_path / "b") is None
    assert "enrolment refused for site ONCE: unknown or used token" in hub.log()


def test_enroll_takes_config_like_the_other_appliance_commands(hub: HubProcess,
                                                               tmp_path: Path) -> None:
    """``pas enroll --config FILE`` enrols under that file's home, with no PAS_HOME or
    PAS_CONFIG in the environment (an IT account with /etc/pas/appliance.toml could not
    enrol without setting them: typer answered "No such option: --config"). A bad file is
    refused naming the key, before the one-time token is spent."""
    home = tmp_path / "configured-home"
    config = tmp_path / "etc" / "appliance.toml"
    config.parent.mkdir()
    elsewhere = tmp_path / "cwd"  # the built-in default home is ./var: it must stay unused
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}

    def pas_enroll(*args: str) -> subprocess.CompletedProcess[str]:
        return run_pas(["enroll", *args], env, cwd=elsewhere, timeout=60)

    shown = pas_enroll("--help")
    assert shown.returncode == 0 and "--config" in shown.stdout, shown.stdout + shown.stderr
    token = hub.token("CONFIGURED", cli=True)
    config.write_text(f"home = {json.dumps(str(home))}\n[dicom]\nport = 0\n")
    refused = pas_enroll("--config", str(config), "--hub", hub.url, "--token", token)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "dicom.port: must be 1-65535, got 0" in refused.stderr
    config.write_text(f"home = {json.dumps(str(home))}\n")
    result = pas_enroll("--config", str(config), "--hub", hub.url, "--token", token)
    assert result.returncode == 0, result.stdout + result.stderr
    enrolment = load_enrolment(home)
    assert enrolment is not None and enrolment.site == "CONFIGURED"
    assert str(home / "pki") in result.stdout.replace("\n", "")
    assert not (elsewhere / "var").exists()


def test_forged_and_malformed_tokens_are_refused_and_nothing_is_written(
        hub: HubProcess, tmp_path: Path) -> None:
    real = hub.token("FORGE")
    site, _secret, cafp = real.split(".")
    with pytest.raises(EnrolmentError, match=r"refused the enrolment \(403\)"):
        enroll_appliance(tmp_path / "f", hub.url, f"{site}.{'A' * 32}.{cafp}")
    with pytest.raises(EnrolmentError, match="malformed token"):
        enroll_appliance(tmp_path / "m", hub.url, "not-a-token")
    other_site = real.replace("FORGE.", "OTHER.", 1)  # a token is bound to its site
    with pytest.raises(EnrolmentError, match=r"\(403\)"):
        enroll_appliance(tmp_path / "o", hub.url, other_site)
    for name in ("f", "m", "o"):
        assert not (tmp_path / name / "pki").exists()
    # The real token still works: refusals spent nothing.
    assert enroll_appliance(tmp_path / "ok", hub.url, real).site == "FORGE"


def test_a_hub_whose_ca_does_not_match_the_token_is_not_trusted(
        hub: HubProcess, tmp_path: Path) -> None:
    impostor = HubProcess(tmp_path / "impostor").init()
    impostor.start()
    try:
        token = hub.token("MITM")  # the real hub's token, the impostor's address
        with pytest.raises(EnrolmentError, match="does not match the token"):
            enroll_appliance(tmp_path / "victim", impostor.url, token)
    finally:
        impostor.stop()
    assert "MITM" not in impostor.log()  # the secret never reached the impostor
    assert not (tmp_path / "victim" / "pki").exists()


def test_hostname_is_checked_against_the_server_certificate(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").init("localhost")  # not valid for 127.0.0.1
    hub.start()
    try:
        with pytest.raises(EnrolmentError, match="(?i)certificate"):
            enroll_appliance(tmp_path / "site", f"https://127.0.0.1:{hub.port}",
                             hub.token("NAMECHECK"))
    finally:
        hub.stop()
    assert load_enrolment(tmp_path / "site") is None


def test_an_oversized_enrolment_body_is_413_and_spends_nothing(hub: HubProcess,
                                                               tmp_path: Path) -> None:
    """``/enroll`` needs no certificate: anyone who reaches the port may POST to it. A body over
    64 KiB is refused, declared (Content-Length) or chunked, before it is buffered; a valid
    token inside it is not spent, and the hub goes on serving."""
    token = hub.token("BIG")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "BIG")]))
           .sign(key, hashes.SHA256()))
    body = json.dumps({"token": token, "padding": " " * (200 * 1024),
                       "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for start in range(0, len(body), 16 * 1024):
            yield body[start:start + 16 * 1024]

    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context()) as http:
        for content in (body, chunked()):
            answer = http.post("/enroll", content=content,
                               headers={"Content-Type": "application/json"})
            assert answer.status_code == 413, answer.text
            assert answer.json() == {"error": "too_large",
                                     "detail": "enrolment request over 65536 bytes"}
        assert http.get("/healthz").json() == {"status": "ok"}
    assert "enrolment refused: enrolment request over 65536 bytes" in hub.log()
    assert enroll_appliance(tmp_path / "ok", hub.url, token).site == "BIG"


def test_no_client_certificate_is_401_but_enrolment_routes_answer(hub: HubProcess) -> None:
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context()) as http:
        answer = http.post("/api/v1/transfers", json={})
        assert answer.status_code == 401
        assert answer.json()["error"] == "client_certificate_required"
        assert http.get("/enroll/ca").content == (hub.home / "ca.crt").read_bytes()
        paths = http.get("/openapi.json").json()["paths"]
        assert "post" in paths["/api/v1/transfers/{transfer_id}/commit"]
        assert "put" in paths["/api/v1/transfers/{transfer_id}/buckets/{index}"]
    assert "no client certificate" in hub.log()


def _another_cas_client(hub: HubProcess, tmp_path: Path, site: str) -> ssl.SSLContext:
    """A client context trusting ``hub`` and presenting a certificate for ``site`` that
    another hub's CA issued (same issuer name as the real CA: a forger's best try)."""
    other = HubPKI(tmp_path / "other")
    other.init()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
           .sign(key, hashes.SHA256()))
    (tmp_path / "c.crt").write_bytes(
        other.sign_csr(csr.public_bytes(serialization.Encoding.PEM), site).pem)
    (tmp_path / "c.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = hub.anonymous_context()
    context.load_cert_chain(tmp_path / "c.crt", tmp_path / "c.key")
    return context


def test_a_certificate_from_another_ca_fails_the_handshake(hub: HubProcess,
                                                           tmp_path: Path) -> None:
    context = _another_cas_client(hub, tmp_path, "CHU-NORD")
    with (httpx.Client(base_url=hub.url, verify=context) as http,
          pytest.raises(httpx.TransportError)):
        # TLS 1.3: the server verifies the client's certificate after the client's side of the
        # handshake finished, so the client sees the connection closed with no HTTP answer.
        http.get("/api/v1/whoami")
    # Same issuer name as the real CA (a forger's best try): the signature check fails, and
    # the hub logs the refusal with the certificate presented.
    refused = re.compile(r"TLS handshake refused \(alert (decrypt_error|unknown_ca|"
                         r"bad_certificate)\); client certificate: subject CN=CHU-NORD")
    assert wait_for(lambda: refused.search(hub.log()), 10, what="refusal logged")
    # The same request with this fleet's certificate on the same hub is answered.
    with client(enroll(hub, tmp_path / "real", "CHU-SUD")) as http:
        assert http.get("/api/v1/whoami").json() == {"site": "CHU-SUD"}


def test_refusals_of_unauthenticated_requests_are_logged_once_a_minute(
        hub: HubProcess, tmp_path: Path) -> None:
    """Anyone who reaches the hub may ask to enrol or start a handshake, and each refusal
    was a WARNING line of the journal, the hub's only record of its tokens and revocations
    (200 bad enrolments: 200 lines; a security review, 2026-12-07). Now the first is said,
    then one line a minute per source and kind (per alert and certificate for a handshake),
    with how many; every request is still refused."""
    said = "enrolment refused: body is not {token, csr_pem} JSON"
    before = hub.log().count(said)
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context()) as http:
        answers = [http.post("/enroll", content=b"not json").status_code for _ in range(30)]
    assert answers == [400] * 30
    assert hub.log().count(said) - before <= 1  # 30 before
    assert said in hub.log()

    context = _another_cas_client(hub, tmp_path, "CHU-FLOOD")
    for _ in range(20):
        with (httpx.Client(base_url=hub.url, verify=context) as http,
              pytest.raises(httpx.TransportError)):
            http.get("/api/v1/whoami")
    refused = re.compile(r"TLS handshake refused \(alert \w+\); client certificate: subject "
                         r"CN=CHU-FLOOD")
    wait_for(lambda: refused.search(hub.log()), 10, what="the first refusal logged")
    with client(enroll(hub, tmp_path / "real", "CHU-AFTER")) as http:  # said after the 20
        assert http.get("/api/v1/whoami").json() == {"site": "CHU-AFTER"}
    assert len(refused.findall(hub.log())) == 1


def test_revocation_applies_at_once_even_on_an_open_connection(
        hub: HubProcess, tmp_path: Path) -> None:
    enrolment = enroll(hub, tmp_path / "site", "REVOKED")
    other = enroll(hub, tmp_path / "other", "STILL-OK")
    with client(enrolment) as http, client(other) as http_other:
        assert http.get("/api/v1/whoami").status_code == 200  # keep-alive connection open
        hub.cli("revoke", "REVOKED")
        answer = http.get("/api/v1/whoami")
        assert answer.status_code == 403 and answer.json()["error"] == "certificate_revoked"
        assert http_other.get("/api/v1/whoami").status_code == 200
    assert "certificate" in hub.log() and "is revoked" in hub.log()
    again = hub.cli("revoke", "REVOKED", check=False)  # done already: said so, exit 0
    assert again.returncode == 0 and "every certificate already revoked" in again.stdout


def test_revocation_voids_the_sites_unspent_tokens(hub: HubProcess, tmp_path: Path) -> None:
    """``pas hub revoke SITE`` (a stolen appliance) revoked the certificates only: a token
    of that site issued before and never spent (a first one reported lost, a spare in a
    seed file or a mail) still enrolled, and its holder got a fresh, valid certificate of the
    site: the revocation undone by anyone holding it. A token issued after the revocation
    (the site's own ``pas enroll --replace``) is the way back in."""
    spare = hub.token("STOLEN", cli=True)  # issued, reported lost, never spent
    enroll(hub, tmp_path / "site", "STOLEN", cli=True)  # the site enrolled with another one
    never = hub.token("NEVER-ENROLLED", cli=True)
    revoked = hub.cli("revoke", "STOLEN")
    assert "revoked 1 certificate of site STOLEN" in revoked.stdout
    assert "1 unspent enrolment token" in revoked.stdout
    thief = _pas_enroll(tmp_path / "thief", hub.url, spare)
    assert thief.returncode == 1 and "403" in thief.stderr, thief.stdout + thief.stderr
    assert load_enrolment(tmp_path / "thief") is None
    assert "valid" not in [line for line in hub.cli("sites").stdout.splitlines()
                           if "STOLEN" in line][0]
    # A site with no certificate yet: its token is voided all the same, and said so.
    voided = hub.cli("revoke", "NEVER-ENROLLED")
    assert voided.returncode == 0 and "1 unspent enrolment token" in voided.stdout
    assert _pas_enroll(tmp_path / "never", hub.url, never).returncode == 1
    # The way back in: a token issued after the revocation.
    renewed = _pas_enroll(tmp_path / "renewed", hub.url, hub.token("STOLEN", cli=True))
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    # pas hub tokens tells the voided ones from those an appliance enrolled with (all were
    # "spent"): STOLEN's spare and NEVER-ENROLLED's voided, STOLEN's two others spent.
    states: dict[str, list[str]] = {}
    for line in hub.cli("tokens").stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0] in ("STOLEN", "NEVER-ENROLLED"):
            states.setdefault(cells[0], []).append(cells[4])
    assert sorted(states["STOLEN"]) == ["spent", "spent", "voided (pas hub revoke)"], states
    assert states["NEVER-ENROLLED"] == ["voided (pas hub revoke)"], states


def test_tls_below_1_3_is_refused(hub: HubProcess) -> None:
    context = hub.anonymous_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (httpx.Client(base_url=hub.url, verify=context) as http,
          pytest.raises(httpx.TransportError)):
        http.get("/healthz")


def test_bad_hub_configuration_is_refused_naming_the_key(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").init()
    hub.env["PAS_HUB_HTTP__PORT"] = "0"
    result = hub.cli("run", check=False)
    assert result.returncode == 2 and (
        "http.port: must be 1-65535, got 0 (set by PAS_HUB_HTTP__PORT)" in result.stderr)
    (hub.home / "hub.toml").write_text('[archive]\nkind = "dicomweb"\nspeed = 3\n')
    hub.env["PAS_HUB_HTTP__PORT"] = "8443"
    result = hub.cli("run", check=False)
    assert result.returncode == 2
    assert "archive.speed: unknown key" in result.stderr
    (hub.home / "hub.toml").write_text('[archive]\nkind = "dicomweb"\n')
    result = hub.cli("run", check=False)
    assert result.returncode == 2
    assert "archive: url is required when kind is 'dicomweb'" in result.stderr


def test_enroll_refuses_a_plain_http_hub_url(tmp_path: Path) -> None:
    with pytest.raises(EnrolmentError, match="must start with https://"):
        enroll_appliance(tmp_path, "http://127.0.0.1:9", "A." + "b" * 20 + "." + "0" * 64)
    assert not (tmp_path / "pki").exists()


def test_hub_run_on_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    """uvicorn bound the port itself: a taken one printed "hub serving on ..." and then
    uvicorn's own lines ("[Errno 98] error while attempting to bind ..."). Now, as for `pas run`,
    one line names the key, the address and the cause, exit 1, and the hub started nothing
    (the port is bound before the start-up clean-up, which would remove an interrupted rebuild's
    work folder, and before the archiver resumes)."""
    hub = HubProcess(tmp_path / "hub").init()
    interrupted = hub.home / "work" / "interrupted-rebuild"
    interrupted.mkdir(parents=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hub.env["PAS_HUB_HTTP__PORT"] = str(port)
        result = hub.cli("run", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert len(result.stderr.strip().splitlines()) == 1, output
    assert f"cannot start the hub: http.port {port} on 127.0.0.1: " in result.stderr, output
    assert "address already in use" in result.stderr.lower(), output
    assert "hub serving on" not in output and "error while attempting to bind" not in output
    assert "Traceback" not in output
    assert interrupted.is_dir()  # nothing of the start-up ran


def test_enroll_replace_puts_a_new_certificate_in_place_only_once_the_hub_issued_it(
        hub: HubProcess, tmp_path: Path) -> None:
    """``pas doctor`` said "enrol again: pas enroll" for a revoked or expiring certificate,
    and ``pas enroll`` refused an enrolled appliance with no way forward. ``--replace``
    enrols again; a refused token leaves the old enrolment whole."""
    home = tmp_path / "site"
    assert _pas_enroll(home, hub.url, hub.token("RENEW", cli=True)).returncode == 0
    old = load_enrolment(home)
    assert old is not None
    old_files = {p.name: p.read_bytes() for p in old.pki_dir.iterdir()}
    hub.cli("revoke", "RENEW")
    with client(old) as http:
        assert http.get("/api/v1/whoami").status_code == 403

    def pas_enroll(*args: str) -> subprocess.CompletedProcess[str]:
        return run_pas(["enroll", "--hub", hub.url, *args],
                       {**os.environ, "PAS_HOME": str(home)}, timeout=60)

    token = hub.token("RENEW", cli=True)
    refused = pas_enroll("--token", token)
    assert refused.returncode == 1 and "already enrolled" in refused.stderr
    assert "--replace" in refused.stderr
    site, _secret, cafp = token.split(".")
    forged = pas_enroll("--token", f"{site}.{'A' * 32}.{cafp}", "--replace")
    assert forged.returncode == 1 and "403" in forged.stderr
    assert {p.name: p.read_bytes() for p in old.pki_dir.iterdir()} == old_files
    assert sorted(p.name for p in home.iterdir()) == ["pki"]

    replaced = pas_enroll("--token", token, "--replace")  # not spent by the refusal above
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert "restart PAS" in replaced.stdout
    new = load_enrolment(home)
    assert new is not None and new.site == "RENEW"
    assert (new.pki_dir / "client.crt").read_bytes() != old_files["client.crt"]
    for name in ("client.key", "client.crt", "ca.crt", "hub.json"):
        assert stat.S_IMODE((new.pki_dir / name).stat().st_mode) == 0o600, name
    assert sorted(p.name for p in home.iterdir()) == ["pki"]  # no .new, no .old left
    with client(new) as http:
        answer = http.get("/api/v1/whoami")
        assert answer.status_code == 200 and answer.json() == {"site": "RENEW"}

    # A crash between moving the old folder aside and the new one in: the new one is used.
    (home / "pki").rename(home / "pki.new")
    recovered = load_enrolment(home)
    assert recovered is not None and (home / "pki" / "hub.json").exists()
    assert (recovered.pki_dir / "client.crt").read_bytes() == \
        (new.pki_dir / "client.crt").read_bytes()


def test_an_enrolment_edited_to_a_plain_http_url_stops_start_up_naming_it(
        hub: HubProcess, tmp_path: Path) -> None:
    """``pas enroll`` refuses an http:// hub URL, but ``hub.json`` is a plain file: edited to
    one (the hub moved, a proxy put in front of it), the daemon started and its calls to the
    hub went in clear to that address (keep-warm's GET /api/v1/whoami first, then heartbeats
    and manifests listing every SOP Instance UID). Now start-up is refused naming the file
    and the field, and nothing is sent."""
    from tests.support.peers import PasProcess

    home = tmp_path / "site-plain"
    enroll(hub, home, "SITE-PLAIN")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    hub_json = home / "pki" / "hub.json"
    info = json.loads(hub_json.read_text())
    info["url"] = f"http://127.0.0.1:{listener.getsockname()[1]}"
    hub_json.write_text(json.dumps(info))
    received = bytearray()

    def accept_once() -> bool:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            return False
        with connection:
            connection.settimeout(5)
            received.extend(connection.recv(4096))
        return True

    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    daemon = subprocess.Popen([str(PAS_BIN), "run"], env=pas.env, cwd=home,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: daemon.poll() is not None or accept_once(), 60,
                 what="pas run to exit, or to call the plain http:// address")
        assert not received, f"sent in clear: {bytes(received[:200])!r}"
        output = daemon.communicate(timeout=30)[0]
        assert daemon.returncode == 1, output
        assert "cannot start" in output and "hub.json" in output and "https://" in output, output
        assert "Traceback" not in output
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        listener.close()
