"""An enrolment whose answer was lost is completed by running ``pas enroll`` again with the
same token; the token still enrols one key only.

Found in review (invariant 6): the hub spends the token and records the certificate before it
answers. An answer lost on the way back (a timeout, a cut link, a Ctrl-C) left the appliance
not enrolled, and ``pas enroll`` run again, as its message invited, made a new key and got
403 "unknown, already used or foreign token": only a new token from regional ops helped,
and the hub kept a valid certificate of the site that nobody held. Now the appliance keeps
its key and CSR in ``pki.pending/`` before it asks (appliance/transfer/enrolment.py
``_pending_key``), and the hub answers the same certificate to the same token and the same
key while the token is valid (appliance/store/hub.py ``answer_again``, hub migration 15).

Real peers: ``pas hub run``, ``pas enroll`` through the real CLI, and a real TCP proxy in
front of the hub that lets the request through and drops the answer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import stat
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.store.hub import open_hub_db, revoke_site
from appliance.transfer.enrolment import load_enrolment
from tests.support.hub import HubProcess, client
from tests.support.peers import run_pas
from tests.support.tcpproxy import TcpProxy, _reset

PENDING_DIR = "pki.pending"  # appliance.transfer.enrolment.PENDING_DIR


class AnswerLost(TcpProxy):
    """Passes everything, until the hub has spent ``site``'s token: from then on the first
    byte coming back from the hub (its answer: the hub commits the spent token before it
    answers) resets the connection instead, as a link cut on the way back does."""

    def __init__(self, hub: HubProcess, site: str):
        super().__init__("127.0.0.1", hub.port)
        self.db, self.site = hub.home / "hub.sqlite", site
        self.lost = 0

    def _spent(self) -> bool:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT used_at FROM enrol_tokens WHERE site = ?",
                             (self.site,)).fetchone()
        return row is not None and row[0] is not None

    def _pump(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        if upward:
            return super()._pump(source, sink, upward)
        try:
            while chunk := source.recv(65536):
                if self._spent():
                    self.lost += 1
                    for sock in (sink, source):
                        _reset(sock)
                    return
                sink.sendall(chunk)
        except OSError:
            pass
        return None


def _pas_enroll(home: Path, url: str, token: str):  # type: ignore[no-untyped-def]
    env = {**os.environ, "PAS_HOME": str(home)}
    env.pop("PAS_CONFIG", None)
    env.pop("PAS_ENROLL_TOKEN", None)
    return run_pas(["enroll", "--hub", url, "--token", "-"], env, input=f"{token}\n",
                   timeout=60)


def _certificates(hub: HubProcess, site: str) -> list[str]:
    db = open_hub_db(hub.home / "hub.sqlite")
    try:
        return [r["serial"] for r in db.query("SELECT serial FROM certificates WHERE site = ?",
                                               (site,))]
    finally:
        db.close()


def test_an_enrolment_whose_answer_was_lost_completes_when_run_again(
        hub: HubProcess, tmp_path: Path) -> None:
    token = hub.token("LOST-ANSWER")
    home = tmp_path / "site"
    proxy = AnswerLost(hub, "LOST-ANSWER").start()
    try:
        first = _pas_enroll(home, f"https://127.0.0.1:{proxy.port}", token)
    finally:
        proxy.stop()
    said = " ".join(first.stderr.split())
    assert first.returncode == 1 and "enrolment request to" in said, first.stdout + said
    # The hub did the work: token spent, a certificate issued; the answer never came back.
    assert proxy.lost >= 1 and load_enrolment(home) is None
    [serial] = _certificates(hub, "LOST-ANSWER")
    pending = home / PENDING_DIR
    kept = {path.name: stat.S_IMODE(path.stat().st_mode)
            for path in (pending, *pending.glob("*"))} if pending.exists() else {}
    kept_text = (pending / "pending.json").read_text() if pending.exists() else ""

    again = _pas_enroll(home, hub.url, token)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "run the same pas enroll again with the same token" in said, said
    assert kept == {PENDING_DIR: 0o700, "client.key": 0o600, "client.csr": 0o600,
                    "pending.json": 0o600}, kept
    assert token.split(".")[1] not in kept_text  # the token's digest only
    enrolment = load_enrolment(home)
    assert enrolment is not None and enrolment.site == "LOST-ANSWER"
    cert = x509.load_pem_x509_certificate(enrolment.client_cert.read_bytes())
    assert format(cert.serial_number, "x") == serial  # the certificate issued the first time
    assert _certificates(hub, "LOST-ANSWER") == [serial]  # and no other
    assert not pending.exists()
    with client(enrolment) as http:
        assert http.get("/api/v1/whoami").json() == {"site": "LOST-ANSWER"}
    assert "enrolment of site LOST-ANSWER answered again: certificate " + serial in hub.log()


def _csr(site: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


def test_a_spent_token_answers_its_own_key_again_and_no_other(hub: HubProcess) -> None:
    """The same token and key: the same certificate, while the token is valid and the
    certificate in force. Another key, the token expired, the site revoked: 403."""
    site = "SAME-KEY"
    token = hub.token(site)
    csr, other = _csr(site), _csr(site)
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30) as http:
        def post(csr_pem: str) -> httpx.Response:
            return http.post("/enroll", json={"token": token, "csr_pem": csr_pem})

        first = post(csr)
        assert first.status_code == 200, first.text
        again = post(csr)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        assert post(other).status_code == 403  # the token enrols one key
        assert _certificates(hub, site) == [format(x509.load_pem_x509_certificate(
            first.json()["certificate_pem"].encode()).serial_number, "x")]
        db = open_hub_db(hub.home / "hub.sqlite")
        try:
            with db.transaction() as conn:  # the token's validity over
                conn.execute("UPDATE enrol_tokens SET expires_at = ? WHERE site = ?",
                             (time.time() - 1, site))
            assert post(csr).status_code == 403
            with db.transaction() as conn:
                conn.execute("UPDATE enrol_tokens SET expires_at = ? WHERE site = ?",
                             (time.time() + 3600, site))
            assert post(csr).status_code == 200
            revoke_site(db, site)  # a revoked certificate is not handed out again
            assert post(csr).status_code == 403
        finally:
            db.close()
