"""When the TLS certificates the settings name expire: the listeners', the destinations',
the audit copy's, and the CAs they trust.

Owns: listing the certificate files the configuration uses (by the key that names them,
``dicom.tls.cert``, ``destinations.pacs.tls_ca``), and reading how many days each has left
(the earliest expiry of the certificates in the file: a CA bundle holds several). Read by
``/metrics`` (``pas_tls_certificate_days_left``) and ``pas doctor``. May not touch: the
network, the database, or any file it is not named.

Why: an expired certificate stops a service without a word from the service that holds it.
The DICOM listener's turns every modality's handshake away, the HL7 listener's the RIS's,
a destination's CA file every forward to it; each side only sees handshakes fail. The hub
client certificate had its figure (``pas_certificate_days_left``); none of these had one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from appliance.config import Settings

# Past this a certificate (or a CA) is said to expire soon: pas doctor warns and alert
# PasApplianceTlsCertificateExpiring fires (image/monitoring/alerts.yml).
SOON_DAYS = 30
# A file read for its certificates: PEM certificates are a few kB; a bundle of a national
# PKI's CAs some hundreds. A bigger file named by mistake (a database, an image) is not read.
MAX_FILE_BYTES = 4 << 20


@dataclass(frozen=True)
class CertificateFile:
    """A certificate file the settings use: ``key`` is the setting naming it."""

    key: str
    path: Path


def in_use(settings: Settings) -> list[CertificateFile]:
    """The certificate and CA files the configuration uses, in the file's order: those of a
    listener only when its TLS is on (a file left named under ``enabled = false`` is not
    used), those of a destination, the HTTP port and the audit copy when named."""
    found: list[CertificateFile] = []

    def add(key: str, path: Path | None) -> None:
        if path is not None:
            found.append(CertificateFile(key, path))

    for section, tls in (("dicom.tls", settings.dicom.tls), ("hl7.tls", settings.hl7.tls)):
        if tls.enabled:
            add(f"{section}.cert", tls.cert)
            add(f"{section}.ca", tls.ca)
    serving = settings.serving
    if settings.http.enabled:
        add("serving.tls_cert", serving.tls_cert)
        add("serving.tls_client_ca", serving.tls_client_ca)
    for name, destination in settings.destinations.items():
        for field in ("tls_cert", "tls_ca", "client_cert", "ca_file"):
            add(f"destinations.{name}.{field}", getattr(destination, field, None))
    audit = settings.audit
    if audit.syslog_host:
        add("audit.syslog_cert", audit.syslog_cert)
        add("audit.syslog_ca", audit.syslog_ca)
    return found


def first_expiry(path: Path) -> datetime:
    """When the first certificate of ``path`` to expire does. Raises ``OSError`` (missing,
    unreadable) or ``ValueError`` (too big, no PEM certificate in it), each naming the
    file."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes, not a certificate file")
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path}: no PEM certificate in it") from None
    return min(cert.not_valid_after_utc for cert in certificates)


def days_left(path: Path, now: datetime | None = None) -> float:
    """Days until the first certificate of ``path`` to expire does (negative: expired);
    raises as :func:`first_expiry`."""
    return (first_expiry(path) - (now or datetime.now(UTC))).total_seconds() / 86400
