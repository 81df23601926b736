"""A throw-away PKI for tests: a CA, server and client certificates, a rogue self-signed
one; keys written 0600. Made with ``cryptography``."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: str, issuer_key: rsa.RSAPrivateKey,
          ca: bool = False, days: float = 1) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=max(0.0, -days) + 1))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{name}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)


def make_pki(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("PAS test CA", ca_key, "PAS test CA", ca_key, ca=True)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("server", "client"):
        key = _key()
        _write(folder, name, _cert(name, key, "PAS test CA", ca_key), key)
    rogue_key = _key()
    _write(folder, "rogue", _cert("rogue", rogue_key, "rogue", rogue_key), rogue_key)
    return folder


def self_signed(folder: Path, name: str, days: float) -> Path:
    """``name``.crt (and its 0600 key) in ``folder``, its own CA, expiring in ``days`` (< 0:
    expired that many days ago): a certificate whose expiry a test sets."""
    folder.mkdir(parents=True, exist_ok=True)
    key = _key()
    _write(folder, name, _cert(name, key, name, key, ca=True, days=days), key)
    return folder / f"{name}.crt"

