"""The fleet PKI: CA, the hub's server certificate, its X25519 transfer key, enrolment tokens,
client certificates, receipt signatures.

Owns: the key and certificate files under ``$PAS_HUB_HOME`` (mode 0600): ``ca.key``,
``ca.crt``, ``server.key``, ``server.crt``, ``transfer.key`` and ``transfer.pub`` (raw X25519,
32 bytes each), and ``.init-partial/``, where :meth:`HubPKI.init` makes them before moving them
in (``ca.crt``, the mark of an initialised hub, last). May not touch: the database (tokens and
issued certificates are recorded by the caller through ``appliance.store.hub``), the network.

Keys are ECDSA P-256 (small, fast, what every TLS 1.3 stack speaks). A token is
``SITE.SECRET.CAFP``: the hub keeps only the SHA-256 of SECRET; CAFP is the hex SHA-256 of the
CA certificate (DER), so the appliance can authenticate the hub before it trusts it. A token
is valid for a while (:data:`DEFAULT_TOKEN_VALIDITY`, at most :data:`MAX_TOKEN_VALIDITY`): one
printed for a site never installed used to stay good for ever, and leaked, enrolled a rogue
appliance years later. Logs and listings name a token by :meth:`HubPKI.token_id`, a keyed
hash: a plain hash of the secret would let whoever reads the logs confirm a guessed token.

Also the journal's record of who issued a token and who revoked a site
(:func:`log_token_issued`, :func:`log_site_revoked`): the hub has no audit table.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.store.spool import fsync_dir
from appliance.transfer.enrolment import ca_fingerprint, write_private
from appliance.words import counted

log = logging.getLogger("pas.hub.pki")

DEFAULT_ADDRESSES = ("127.0.0.1", "localhost")
# Where pas hub init makes the files before moving them in (HubPKI.init).
INIT_PARTIAL = ".init-partial"
CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 825
DEFAULT_TOKEN_VALIDITY = timedelta(days=7)
# Longer than a quarter, a token is a standing key to the fleet again: issue it nearer the
# installation instead.
MAX_TOKEN_VALIDITY = timedelta(days=90)
# 96 bits: no two of a fleet's tokens share an identifier (birthday bound ~2^48 tokens).
TOKEN_ID_HEX = 24
_TOKEN_ID_INFO = b"pas-hub enrolment token id v1"
_VALIDITY_RE = re.compile(r"^\s*(?P<n>[0-9]+)\s*(?P<unit>[smhd])\s*\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class PKIError(Exception):
    """A PKI operation was refused; the message says why."""


@dataclass(frozen=True)
class IssuedCertificate:
    site: str
    serial: str  # hex
    not_after: datetime
    pem: bytes


def _now() -> datetime:
    return datetime.now(UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# A DNS name of the server certificate (RFC 1123): dot-separated labels of letters, digits
# and hyphens, none starting or ending with a hyphen; a wildcard first label is allowed.
_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*")


def address_problems(addresses: list[str]) -> list[str]:
    """What is wrong with each address the server certificate is to name: an IP address or a
    DNS name. ``--address ""`` ended ``pas hub init`` in a traceback half-way (the CA written,
    the server certificate not: "already initialised" at the next try); ``http://hub``,
    ``bad name!`` or ``999.1.1.1`` went into the certificate as DNS names no appliance would
    ever match."""
    problems = []
    for address in addresses:
        try:
            ipaddress.ip_address(address)
            continue
        except ValueError:
            pass
        if re.fullmatch(r"[0-9.]+", address) or len(address) > 253 or \
                not _DNS_NAME.fullmatch(address):
            problems.append(f"--address {address!r}: not an IP address or a DNS name (the "
                            "name or address the appliances reach the hub by, e.g. "
                            "hub.region.example or 198.18.0.2; no scheme, port or path)")
    return problems


def _san(addresses: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    return x509.SubjectAlternativeName(names)


class HubPKI:
    """The PKI files of one hub home."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self._token_id_key: bytes | None = None

    # paths ------------------------------------------------------------------------------
    @property
    def ca_key_path(self) -> Path:
        return self.home / "ca.key"

    @property
    def ca_cert_path(self) -> Path:
        return self.home / "ca.crt"

    @property
    def server_key_path(self) -> Path:
        return self.home / "server.key"

    @property
    def server_cert_path(self) -> Path:
        return self.home / "server.crt"

    @property
    def transfer_key_path(self) -> Path:
        return self.home / "transfer.key"

    @property
    def transfer_pub_path(self) -> Path:
        return self.home / "transfer.pub"

    def exists(self) -> bool:
        """The hub is initialised: ``ca.crt`` is the mark :meth:`init` puts in place last."""
        return self.ca_cert_path.exists()

    def missing(self) -> list[str]:
        """The key and certificate files :meth:`init` makes that are not in the home."""
        return [path.name for path in self.files() if not path.is_file()]

    def files(self) -> list[Path]:
        """Every file :meth:`init` makes, ``ca.crt`` (the mark that it is done) last."""
        return [self.ca_key_path, self.server_key_path, self.server_cert_path,
                self.transfer_key_path, self.transfer_pub_path, self.ca_cert_path]

    # creation ---------------------------------------------------------------------------
    def init(self, addresses: list[str] | None = None, name: str = "PAS fleet CA",
             before_done: Callable[[], None] | None = None) -> None:
        """Create CA, server certificate and transfer key. Refuses to replace an existing CA
        (every enrolled appliance pins it); the server certificate alone can be re-issued
        with :meth:`issue_server_certificate`.

        Everything is made in ``.init-partial/`` under the home, then ``before_done`` runs
        (``pas hub init`` creates the database there), then the files are moved in with
        ``ca.crt``, the mark of an initialised hub, last. An init interrupted anywhere (a
        Ctrl-C, a kill, a full disk) leaves no ``ca.crt``, and the next one starts again
        from the beginning: it wrote the CA first and the rest one by one, and the next
        said "already initialised" of a hub with no transfer key and no database (the
        caller makes sure a home with no ``ca.crt`` issued nothing: see ``pas hub init``)."""
        addresses = list(addresses or DEFAULT_ADDRESSES)
        if problems := address_problems(addresses):
            raise PKIError("; ".join(problems))  # before anything is written
        if self.exists():
            raise PKIError(f"{self.ca_cert_path} exists: this hub is already initialised")
        try:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # a file where the home should be: was a traceback
            raise PKIError(f"cannot make the hub's home {self.home}: "
                           f"{exc.strerror or exc}") from None
        if not self.home.is_dir():
            raise PKIError(f"the hub's home {self.home} is not a folder")
        partial = self.home / INIT_PARTIAL
        shutil.rmtree(partial, ignore_errors=True)  # what an interrupted init left
        partial.mkdir(mode=0o700)
        staged = HubPKI(partial)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        ca_cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(staged.ca_key_path, _key_pem(ca_key))
        write_private(staged.ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        staged.issue_server_certificate(addresses)
        staged.new_transfer_key()
        if before_done is not None:
            before_done()
        for staged_file, final in zip(staged.files(), self.files(), strict=True):
            os.replace(staged_file, final)  # ca.crt last
        fsync_dir(self.home)
        shutil.rmtree(partial, ignore_errors=True)

    def finish(self, addresses: list[str] | None = None) -> list[str]:
        """Make what an older version's interrupted init left out of a home that has its
        CA (``ca.key``, ``ca.crt``): the server certificate, the transfer key. The files it
        made. Only for a hub that issued nothing (no appliance holds its transfer key yet);
        the caller (``pas hub init``) makes sure of that."""
        addresses = list(addresses or DEFAULT_ADDRESSES)
        if problems := address_problems(addresses):
            raise PKIError("; ".join(problems))
        if not self.ca_key_path.is_file():
            raise PKIError(f"{self.ca_cert_path} exists without {self.ca_key_path.name}: "
                           "put it back from the last hub backup")
        made = []
        if not (self.server_key_path.is_file() and self.server_cert_path.is_file()):
            self.issue_server_certificate(addresses)
            made += [self.server_key_path.name, self.server_cert_path.name]
        if not (self.transfer_key_path.is_file() and self.transfer_pub_path.is_file()):
            self.new_transfer_key()
            made += [self.transfer_key_path.name, self.transfer_pub_path.name]
        return made

    def new_transfer_key(self) -> None:
        """The hub's X25519 transfer key pair (``transfer.key``, ``transfer.pub``)."""
        private = x25519.X25519PrivateKey.generate()
        write_private(self.transfer_key_path, private.private_bytes_raw())
        write_private(self.transfer_pub_path, private.public_key().public_bytes_raw())

    def issue_server_certificate(self, addresses: list[str]) -> None:
        """The hub's TLS certificate, valid for exactly these DNS names and IP addresses."""
        if not addresses:
            raise PKIError("at least one address is needed for the server certificate")
        ca_key, ca_cert = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=SERVER_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(addresses), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(self.server_key_path, _key_pem(key))
        write_private(self.server_cert_path, cert.public_bytes(serialization.Encoding.PEM))

    # reading ----------------------------------------------------------------------------
    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.exists():
            raise PKIError(f"no CA under {self.home}: run `pas hub init` first")
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())

    def ca_pem(self) -> bytes:
        return self.ca_cert_path.read_bytes()

    def ca_fingerprint(self) -> str:
        return ca_fingerprint(self.ca_pem())

    def transfer_private_key(self) -> bytes:
        return self.transfer_key_path.read_bytes()

    def transfer_public_key(self) -> bytes:
        return self.transfer_pub_path.read_bytes()

    # tokens and client certificates -----------------------------------------------------
    def new_token(self, site: str) -> tuple[str, str]:
        """A one-time token for ``site``: (token to print, SHA-256 of its secret to record).
        Its validity is recorded beside the digest (``appliance.store.hub.add_token``)."""
        secret = secrets.token_urlsafe(24)
        return f"{site}.{secret}.{self.ca_fingerprint()}", secret_digest(secret)

    def token_id(self, secret_sha256: str) -> str:
        """How logs and ``pas hub tokens`` name a token: HMAC-SHA256 of the digest the hub
        records, under a key derived from the CA key, first :data:`TOKEN_ID_HEX` hex digits.

        Why keyed: the journal travels further than the CA key (log collectors, support
        bundles); an unkeyed hash there would confirm a guessed token offline. Why of the
        digest and not of the secret: tokens issued before this identifier existed get one
        too, from the row the hub kept."""
        if self._token_id_key is None:
            ca_key, _cert = self._ca()
            scalar = ca_key.private_numbers().private_value.to_bytes(32, "big")
            self._token_id_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                      info=_TOKEN_ID_INFO).derive(scalar)
        return hmac.new(self._token_id_key, secret_sha256.encode(),
                        hashlib.sha256).hexdigest()[:TOKEN_ID_HEX]

    def sign_csr(self, csr_pem: bytes, site: str) -> IssuedCertificate:
        """Issue a client certificate (CN = site) for the key in the CSR.

        The CSR's own signature must verify (proof the requester holds the key); its subject
        is ignored: the site comes from the token, never from the requester.
        """
        csr = _checked_csr(csr_pem)
        ca_key, ca_cert = self._ca()
        now = _now()
        not_after = now + timedelta(days=CLIENT_DAYS)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
            .issuer_name(ca_cert.subject).public_key(csr.public_key())
            .serial_number(serial)
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return IssuedCertificate(site, format(serial, "x"), not_after,
                                 cert.public_bytes(serialization.Encoding.PEM))

    # receipts ---------------------------------------------------------------------------
    def sign(self, document: dict[str, Any]) -> str:
        """Base64 ECDSA-SHA256 signature by the server key over :func:`canonical_json`."""
        key = serialization.load_pem_private_key(self.server_key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return base64.b64encode(key.sign(canonical_json(document),
                                         ec.ECDSA(hashes.SHA256()))).decode()


def _checked_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """The certificate request, once its signature verified (the requester holds the key)
    and its key is an EC key; raises PKIError naming what is wrong."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PKIError(f"csr_pem is not a PEM certificate request ({exc})") from None
    if not csr.is_signature_valid:
        raise PKIError("the CSR's signature does not verify")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise PKIError("the CSR's key must be an EC key")
    return csr


def csr_key_sha256(csr_pem: bytes) -> str:
    """Hex SHA-256 of the public key (SubjectPublicKeyInfo DER) of a certificate request
    whose signature verifies: what the hub records of the key that spent a token, to answer
    the same certificate to the same key again (``appliance.store.hub.answer_again``).
    Raises PKIError as :meth:`HubPKI.sign_csr` does."""
    der = _checked_csr(csr_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def utc_text(epoch: float) -> str:
    """``2026-12-12T16:40:05Z``: how a token's times are shown (CLI, refusal, log)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_token_issued(site: str, token_id: str, expires_at: float, actor: str) -> None:
    """One WARNING line, as ``pas hub backup`` and ``restore`` write theirs (kept at any
    ``log_level``; journald fields ``ACTOR``, ``TARGET``, ``SITE``, ``TOKEN_ID``): who let a
    site in, and when. Nothing recorded it: a token spent by the wrong box could not be
    traced to the operator who issued it. The token's identifier, never its secret."""
    log.warning("enrolment token %s issued for site %s, valid until %s, by %s on %s",
                token_id, site, utc_text(expires_at), actor, socket.gethostname(),
                extra={"ACTOR": actor, "TARGET": site, "SITE": site, "TOKEN_ID": token_id})


def log_site_revoked(site: str, certificates: int, tokens: int, actor: str) -> None:
    """The same for ``pas hub revoke SITE`` once it changed something (certificates
    revoked, unspent tokens voided): a site cut off with no trace of who did it looked,
    from the region's journal, like a fault of its appliance."""
    log.warning("site %s revoked by %s on %s: %s revoked, %s voided", site, actor,
                socket.gethostname(), counted(certificates, "certificate"),
                counted(tokens, "unspent enrolment token"),
                extra={"ACTOR": actor, "TARGET": site, "SITE": site})


def parse_validity(text: str) -> timedelta:
    """``72h``, ``7d``, ``30m``, ``90s`` -> a token's validity; raises PKIError naming the
    problem: no unit (is ``7`` days or hours?), not positive, or over
    :data:`MAX_TOKEN_VALIDITY`."""
    match = _VALIDITY_RE.match(text)
    if not match:
        raise PKIError(f"validity {text!r}: expected a whole number and a unit, s, m, h or d "
                       "(e.g. 72h, 7d)")
    seconds = int(match["n"]) * _UNITS[match["unit"]]  # compared as a number: 10**30d
    if seconds <= 0:                                    # overflows a timedelta
        raise PKIError(f"validity {text!r}: must be positive")
    if seconds > MAX_TOKEN_VALIDITY.total_seconds():
        raise PKIError(f"validity {text!r}: at most {MAX_TOKEN_VALIDITY.days}d (a token "
                       "valid longer is a standing key to the fleet: issue it nearer the "
                       "installation)")
    return timedelta(seconds=seconds)


def canonical_json(document: dict[str, Any]) -> bytes:
    """Sorted keys, no spaces, ASCII (json.dumps defaults): the bytes a receipt's signature
    covers (``signature`` itself excluded)."""
    body = {k: v for k, v in document.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def verify_receipt(receipt: dict[str, Any], server_cert_pem: bytes) -> bool:
    """True when ``receipt['signature']`` is the hub server key's signature over the rest."""
    cert = x509.load_pem_x509_certificate(server_cert_pem)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    try:
        public.verify(base64.b64decode(receipt["signature"]), canonical_json(receipt),
                      ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, KeyError, ValueError):
        return False
    return True


def certificate_identity(der: bytes) -> tuple[str, str]:
    """(CN, hex serial) of a DER certificate, as the TLS layer handed it over."""
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(names[0].value) if names else ""), format(cert.serial_number, "x")
