"""Security hardening shared by the DICOM and HL7 listeners and the ``dicom`` destinations.

Owns: the TLS contexts (BCP 195 profile: TLS 1.2 minimum, the recommended AEAD suites,
certificate verification) and the words for a client certificate refused, the rule that
private keys and secrets are readable by their owner only, and the per-source limit on
association attempts. May not touch: SQL, files other than reading the key, certificate or
secret files it is given (a token file), or the network itself.

Why a key with group/other permissions is refused rather than fixed: the file may be
shared with something else on purpose; the operator must decide. The message names the
file, its mode and the fix, never the key's content.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.config_sections import DicomDestination

# BCP 195 (RFC 7525 / 9325) recommended TLS 1.2 suites; TLS 1.3 suites are all AEAD and
# are left at OpenSSL's defaults. DICOM PS3.15 B.9 ("BCP 195 TLS profile") points here.
BCP195_TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
])


class SecretFileError(PermissionError):
    """A key or secret file that is missing or readable by others than its owner."""


def check_secret_file(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path}: file not found") from None
    _refuse_shared(path, mode, what)


def _refuse_shared(path: Path, mode: int, what: str) -> None:
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(
            f"{what} {path}: permissions {stat.filemode(mode)} let others read it; "
            f"run `chmod 600 {path}` (keys and secrets must be 0600)"
        )


def read_secret_file(path: Path, what: str, limit: int) -> bytes:
    """The content of a secret handed over in a file (``pas enroll --token-file``), refused
    as a key is when others than its owner may read it. The checks are made on the file
    opened, not on its name, so the file read is the file checked; a FIFO or a device (which
    could block or never end) is no secret file, and one over ``limit`` bytes is not what
    was asked for (the message never shows the content)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path}: file not found") from None
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: cannot open it ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # a directory too: fdopen would raise before any check
            raise SecretFileError(f"{what} {path}: not a regular file")
        _refuse_shared(path, mode, what)
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        try:
            data = file.read(limit + 1)
        except OSError as exc:
            raise SecretFileError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    if len(data) > limit:
        raise SecretFileError(f"{what} {path}: over {limit} bytes, not the secret expected")
    return data


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def server_context(cert: Path, key: Path, ca: Path | None,
                   require_client_cert: bool, section: str = "dicom.tls") -> ssl.SSLContext:
    """The listener's side (``section``: the settings it is made from, for the messages):
    our certificate; with ``require_client_cert`` only peers whose certificate chains to
    ``ca`` complete the handshake."""
    check_secret_file(key, f"{section}.key")
    context = _base_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else (
        ssl.CERT_OPTIONAL if ca is not None else ssl.CERT_NONE)
    return context


# OpenSSL's reason when a client sent no certificate and one is required (TLS 1.2 and 1.3).
_NO_CERTIFICATE = {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"}


def certificate_refusal(exc: BaseException, section: str = "dicom.tls") -> str | None:
    """Why a failed server-side handshake refused the client's certificate (the audit row's
    and the log line's words), or None when it failed for anything else (a port probe, a
    health check, plain TCP). ``section``: the listener's TLS settings, whose ``ca`` the
    message names."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS client certificate refused: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError) and exc.reason in _NO_CERTIFICATE:
        return (f"TLS client certificate refused: none presented (one from {section}.ca is "
                "required)")
    return None


def certificate_names(peer_certificate: dict[str, Any] | None) -> list[str]:
    """The names a peer's certificate gives (``SSLSocket.getpeercert()``'s form): its
    subjectAltName's DNS names and IP addresses or, when it has none, its subject's common
    names (RFC 6125 6.4.4: a certificate with subjectAltNames is not also named by its CN,
    which a CA may let the requester write freely)."""
    certificate = peer_certificate or {}
    alt = [str(value) for kind, value in certificate.get("subjectAltName", ())
           if kind in ("DNS", "IP Address")]
    if alt:
        return alt
    return [str(value) for rdn in certificate.get("subject", ()) for key, value in rdn
            if key == "commonName"]


def _comparable(name: str) -> str | None:
    """A name as compared: an IP address in its one form (``2001:DB8:0:0:0:0:0:10`` is
    ``2001:db8::10``), an ASCII name in lower case; None for any other (a non-ASCII name
    could fold onto an ASCII one: ``riſ`` and ``ris``, the Kelvin sign and ``k``)."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    return name.lower() if name.isascii() and name.isprintable() and name else None


def name_refusal(peer_certificate: dict[str, Any] | None, allowed: Sequence[str],
                 section: str) -> str | None:
    """Why a client certificate that completed the handshake is refused for its names
    (``{section}.allowed_names``), in the words of :func:`certificate_refusal`; None when
    the list is empty or one of its names is in it (ASCII letter case aside)."""
    if not allowed:
        return None
    names = certificate_names(peer_certificate)
    wanted = {_comparable(name) for name in allowed} - {None}
    if any(_comparable(name) in wanted for name in names):
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"TLS client certificate refused: its names ({shown or 'none'}) are not in "
            f"{section}.allowed_names")


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None,
                   check_hostname: bool = False) -> ssl.SSLContext:
    """The SCU side (a ``dicom`` destination): the peer must chain to ``ca``; DICOM nodes
    are usually addressed by IP, so the host name check is opt-in (a destination's
    ``tls_check_hostname``, see :func:`destination_tls_args`)."""
    context = _base_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca))
    if cert is not None and key is not None:
        check_secret_file(key, "destination client key")
        context.load_cert_chain(str(cert), str(key))
    return context


def destination_tls_args(destination: DicomDestination) -> tuple[ssl.SSLContext, str | None] | None:
    """pynetdicom's ``tls_args`` for a ``dicom`` destination (None: in clear): the context,
    and the host name its certificate must name when ``tls_check_hostname`` is set. Shared
    by the forwarding jobs and ``pas doctor``'s C-ECHO, so the check is the one the jobs
    meet."""
    if not (destination.tls and destination.tls_ca):
        return None
    context = client_context(destination.tls_ca, destination.tls_cert, destination.tls_key,
                             check_hostname=destination.tls_check_hostname)
    return context, destination.host if destination.tls_check_hostname else None


def tls_handshake_refusal(tls_args: tuple[ssl.SSLContext, str | None], host: str,
                          port: int, timeout_s: float) -> tuple[bool, str] | None:
    """Why a TLS handshake with ``host``:``port`` fails, asked again once an association
    over TLS did not open: pynetdicom only logs the handshake's error, and the job's
    message listed every cause a connection may have ("refused, timed out, no route or the
    TLS handshake failed"). None: the handshake succeeds now, or no connection opened (the
    caller's message stands). Else ``(certificate, what)``: ``certificate`` when the
    node's certificate was refused (another CA, expired, a host name it does not carry):
    no retry cures that, the jobs wait for credentials."""
    context, server_hostname = tls_args
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=server_hostname):
            return None
    except ssl.SSLCertVerificationError as exc:
        return True, (f"the certificate of {host}:{port} was refused at the TLS handshake: "
                      f"{exc.verify_message or exc.reason}")
    except ssl.SSLError as exc:  # a port that does not speak TLS, our certificate refused
        return False, f"the TLS handshake with {host}:{port} failed: {exc.reason or exc}"
    except OSError:
        return None


class OutgoingDicomTls:
    """DICOM TLS on the associations PAS opens to the site's own nodes (Storage Commitment
    reports to a modality, C-MOVE sub-associations to a workstation): the node's certificate
    must chain to ``dicom.tls.ca``, PAS shows its listener's certificate. The context is
    built at the first use (configuration validation made sure ``ca`` is set wherever TLS
    is used) and shared by every association after it."""

    def __init__(self, ca: Path | None, cert: Path | None, key: Path | None):
        self.ca, self.cert, self.key = ca, cert, key
        # Without and with the host name check (``check_host``).
        self._contexts: dict[bool, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def tls_args(self, use_tls: bool, check_host: str | None = None
                 ) -> tuple[ssl.SSLContext, str | None] | None:
        """pynetdicom's ``tls_args``, or None in clear. Nodes are mostly addressed by an IP
        their certificate does not name, so the host name is checked only when asked: with
        ``check_host`` (a move destination's ``tls_check_hostname``) the certificate must
        also name it, so that another certificate of the hospital-wide CA, on a device
        given the workstation's address, does not receive its images."""
        if not use_tls:
            return None
        checked = check_host is not None
        with self._lock:
            if checked not in self._contexts:
                assert self.ca is not None
                self._contexts[checked] = client_context(self.ca, self.cert, self.key,
                                                         check_hostname=checked)
            return self._contexts[checked], check_host


class AssociationRateLimiter:
    """At most ``per_minute`` association attempts per source address in any 60 s window.

    A probe or a looping misconfigured modality is refused early (A-ASSOCIATE-RJ, transient,
    local limit exceeded) instead of costing a thread and a database look-up each time.
    Memory is bounded: at most ``max_sources`` addresses are tracked (oldest dropped).
    """

    def __init__(self, per_minute: int, max_sources: int = 4096, window_s: float = 60.0):
        self.per_minute = per_minute
        self.window_s = window_s
        self.max_sources = max_sources
        self._attempts: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, address: str) -> bool:
        if self.per_minute <= 0:
            return True
        at = time.monotonic()  # immune to wall-clock jumps
        with self._lock:
            attempts = self._attempts.pop(address, None) or deque()
            while attempts and at - attempts[0] > self.window_s:
                attempts.popleft()
            allowed = len(attempts) < self.per_minute
            if allowed:
                attempts.append(at)
            self._attempts[address] = attempts
            while len(self._attempts) > self.max_sources:
                self._attempts.popitem(last=False)
            return allowed


def tighten_secret_dir(directory: Path) -> list[str]:
    """Start-up: PAS's own key directory (``$PAS_HOME/pki``, written by enrolment) must be
    0700 and every file in it 0600. Loosened modes (a restore from backup, a copy by hand)
    are tightened and reported by name; contents are never read here."""
    fixed: list[str] = []
    if not directory.is_dir():
        return fixed
    if directory.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        directory.chmod(0o700)
        fixed.append(f"{directory} -> 0700")
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o600)
            fixed.append(f"{path} -> 0600")
    return fixed
