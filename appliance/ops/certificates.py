"""When the TLS certificates the settings name expire: the listeners', the destinations',
the audit copy's, and the CAs they trust.

Owns: listing the certificate files the configuration uses (by the key that names them,
``dicom.tls.cert``, ``destinations.pacs.tls_ca``), and reading how many days each has left
(the earliest expiry of the certificates in the file: a CA bundle holds several). Read by
``/metrics`` (``pas_tls_certificate_days_left``) and ``pas doctor``. May not touch: the
network, the database, or any file it is not named.

Also owns how an expiring one is said to regional ops: the heartbeat's error line
(:func:`heartbeat_errors`) and the days the hub reads back from it (:func:`days_said`:
``pas_fleet_site_tls_certificate_days_left``), as ops/disk_alert.py does for the disk.

Also owns what this daemon loaded (:func:`remember_loaded`, at start): a listener's files
(and the audit copy's) are loaded once, when its service starts. Renewed on disk without a
restart, the file read sound while the listener still served the old certificate, and the
alert cleared until the day every handshake failed. The daemon's figures (``/metrics``,
the heartbeat) count from the one it serves, and say the file waits for a restart;
``pas doctor``, its own process, reads the files.

Why: an expired certificate stops a service without a word from the service that holds it.
The DICOM listener's turns every modality's handshake away, the HL7 listener's the RIS's,
a destination's CA file every forward to it; each side only sees handshakes fail. The hub
client certificate had its figure (``pas_certificate_days_left``); none of these had one.
"""

from __future__ import annotations

import re
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

    @property
    def ca(self) -> bool:
        """A file of CAs PAS trusts (a bundle, maybe), not a certificate PAS shows."""
        return not self.key.endswith("cert")


def in_use(settings: Settings) -> list[CertificateFile]:
    """The certificate and CA files the configuration uses, each only where PAS loads it:
    a listener's while it runs with TLS, a client certificate with its key, a destination's
    when it is reached over TLS, the HTTP port's client CA under ``client_cert`` auth. A
    file left named where it is not used (``enabled = false``, an ``http://`` archive)
    would raise alerts for nothing."""
    found: list[CertificateFile] = []

    def add(key: str, path: Path | None, needs: object = True) -> None:
        if path is not None and needs:
            found.append(CertificateFile(key, path))

    dicom = settings.dicom
    listener_tls = dicom.tls.enabled
    # The listener's certificate and CA also serve the associations PAS opens over TLS to
    # the site's own nodes (ops/security.py OutgoingDicomTls), with the listener's TLS on
    # or off: C-MOVE sub-associations, and Storage Commitment reports to the modalities
    # with an address (ingest/commitment.py) while dicom.storage_commitment is on.
    reports = dicom.storage_commitment and any(
        (listener_tls if ae.tls is None else ae.tls) and ae.host and ae.port
        for ae in dicom.known_aes)
    outgoing = reports or any(node.uses_tls(listener_tls)
                              for node in settings.serving.move_destinations)
    add("dicom.tls.cert", dicom.tls.cert, (listener_tls or outgoing) and dicom.tls.key)
    add("dicom.tls.ca", dicom.tls.ca, listener_tls or outgoing)
    hl7 = settings.hl7
    hl7_runs = hl7.enabled and settings.prefetch.enabled and hl7.tls.enabled
    add("hl7.tls.cert", hl7.tls.cert, hl7_runs)
    add("hl7.tls.ca", hl7.tls.ca, hl7_runs)
    serving = settings.serving
    if settings.http.enabled:
        add("serving.tls_cert", serving.tls_cert, serving.tls_key)
        add("serving.tls_client_ca", serving.tls_client_ca, serving.auth == "client_cert")
    for name, destination in settings.destinations.items():
        key = f"destinations.{name}"
        if destination.kind == "dicom" and destination.tls:
            add(f"{key}.tls_cert", destination.tls_cert, destination.tls_key)
            add(f"{key}.tls_ca", destination.tls_ca)
        elif destination.kind == "stowrs" and str(destination.url).startswith("https://"):
            # Its key may be in the same PEM file (client_key unset): loaded either way.
            add(f"{key}.client_cert", destination.client_cert)
            add(f"{key}.ca_file", destination.ca_file)
    prefetch = settings.prefetch
    add("prefetch.dicomweb_ca_file", prefetch.dicomweb_ca_file,
        str(prefetch.dicomweb_url or "").startswith("https://"))
    audit = settings.audit
    if audit.syslog_host:
        add("audit.syslog_cert", audit.syslog_cert, audit.syslog_key)
        add("audit.syslog_ca", audit.syslog_ca)
    # The fleet CA pinned at enrolment: every call to the hub checks the hub against it.
    # Watched once enrolled; a pki/ folder this user may not enter (pas doctor run by
    # another user than pas) is left to the read, which says so.
    pki = settings.home / "pki"
    try:
        enrolled = (pki / "hub.json").exists()
    except OSError:
        enrolled = True
    add("enrolment.ca", pki / "ca.crt", enrolled)
    return found


def first_expiry(path: Path) -> datetime:
    """When the first certificate of ``path`` to expire does: in a CA bundle too, where an
    expired root no peer chains to any more still counts (a bundle reading sound while
    the CA its modalities chain to has expired would hide the one that matters; the old
    root is to be removed). Raises ``OSError`` (missing, unreadable) or ``ValueError`` (too
    big, no PEM certificate in it), each naming the file."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes, not a certificate file")
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path}: no PEM certificate in it") from None
    return min(cert.not_valid_after_utc for cert in certificates)


@dataclass(frozen=True)
class _Loaded:
    path: Path
    expires: datetime


# The files a service loads once, when the daemon starts: the listeners' (DICOM, HL7, the
# HTTP port) and the audit copy's. A destination's (a context per association or request)
# is read again as it is used: its file on disk is what counts. So is the fleet CA's: it
# changes only with ``pas enroll --replace``, which the docs follow with a restart. The
# DICOM listener's files also serve the outgoing C-MOVE and Storage Commitment TLS, whose
# context is made at its first use: without the listener's TLS they are not noted.
LOADED_AT_START = ("dicom.tls.", "hl7.tls.", "serving.", "audit.")

# What this process loaded at its start, by key (empty in a process that serves nothing:
# pas doctor, pas status). Replaced whole, never changed in place: read by other threads.
_loaded: dict[str, _Loaded] = {}


def remember_loaded(settings: Settings) -> None:
    """Note the expiry of each file in use as the daemon loads it (at start)."""
    global _loaded
    found: dict[str, _Loaded] = {}
    for cert in in_use(settings):
        if not cert.key.startswith(LOADED_AT_START) or (
                cert.key.startswith("dicom.tls.") and not settings.dicom.tls.enabled):
            continue
        try:
            found[cert.key] = _Loaded(cert.path, first_expiry(cert.path))
        except (OSError, ValueError):
            continue  # unreadable: its service could not load it either; said as unread
    _loaded = found


def in_service(cert: CertificateFile) -> tuple[datetime, datetime | None]:
    """The expiry that counts for ``cert`` and, when the file on disk was renewed since
    this process loaded it, the file's (it is served from the next start); else None.
    Raises as :func:`first_expiry` does for the file as it is now."""
    on_disk = first_expiry(cert.path)
    loaded = _loaded.get(cert.key)
    if loaded is not None and loaded.path == cert.path and loaded.expires < on_disk:
        return loaded.expires, on_disk
    return on_disk, None


def days_in_service(cert: CertificateFile, now: datetime | None = None) -> float:
    """Days until :func:`in_service`'s expiry (negative: expired)."""
    expires, _renewed = in_service(cert)
    return (expires - (now or datetime.now(UTC))).total_seconds() / 86400


# The heartbeat's line: "TLS certificate dicom.tls.cert: expires in 12.4 days (2026-12-18)",
# "... expired 2.0 days ago (2026-12-04): its TLS handshakes fail", "... cannot be read: ...".
HEARTBEAT_PREFIX = "TLS certificate "
_SAID = re.compile(r"^TLS certificate ([A-Za-z0-9_.-]{1,200}): "
                   r"(?:expires in ([0-9]+\.[0-9]) days|expired ([0-9]+\.[0-9]) days ago)")


def heartbeat_errors(settings: Settings, now: datetime | None = None) -> list[str]:
    """The heartbeat's error lines, the most urgent first: one per certificate file in use
    that cannot be read, has expired or expires within :data:`SOON_DAYS` (none when all
    are sound)."""
    now = now or datetime.now(UTC)
    urgent: list[tuple[float, str]] = []  # (days left, the line): unread ones first
    for cert in in_use(settings):
        try:
            expires, renewed = in_service(cert)
        except (OSError, ValueError) as exc:
            urgent.append((float("-inf"), f"{HEARTBEAT_PREFIX}{cert.key}: cannot be read: "
                                           f"{exc}"))
            continue
        days = (expires - now).total_seconds() / 86400
        restart = (f"; its file was renewed ({renewed:%Y-%m-%d}): restart PAS to serve it"
                   if renewed is not None else "")
        if days < 0:
            urgent.append((days, f"{HEARTBEAT_PREFIX}{cert.key}: expired {-days:.1f} days "
                                 f"ago ({expires:%Y-%m-%d}): its TLS handshakes fail"
                                 f"{restart}"))
        elif days < SOON_DAYS:
            urgent.append((days, f"{HEARTBEAT_PREFIX}{cert.key}: expires in {days:.1f} days "
                                 f"({expires:%Y-%m-%d}){restart}"))
    return [line for _, line in sorted(urgent, key=lambda pair: pair[0])]


def days_said(error: str) -> tuple[str, float] | None:
    """(the setting, its days left; negative: expired) a heartbeat error of
    :func:`heartbeat_errors` says; None for any other line, or one of a file unread."""
    said = _SAID.match(error)
    if said is None:
        return None
    return (said[1], float(said[2])) if said[2] is not None else (said[1], -float(said[3]))

