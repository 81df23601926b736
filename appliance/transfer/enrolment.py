"""The appliance's enrolment with its regional hub: the files it leaves, and how to make them.

Owns: ``$PAS_HOME/pki/`` (directory 0700, files 0600): ``client.key``, ``client.crt``,
``ca.crt`` (the pinned fleet CA) and ``hub.json`` (url, site, the hub's X25519 transfer key,
when). The appliance is enrolled when ``hub.json`` exists; it is written last, so a crash
half-way leaves an appliance that is simply not enrolled yet. Also ``$PAS_HOME/pki.pending/``:
the key and CSR of an enrolment under way, kept for a rerun with the same token. May not
touch: the database, the spool, the hub's own files.

The uplink reads these through :func:`load_enrolment`; ``pas enroll`` writes them through
:func:`enroll`. The token is ``SITE.SECRET.CAFP``: CAFP (hex SHA-256 of the CA certificate DER)
authenticates the hub before the secret is sent, so a man in the middle never sees the secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.store.spool import fsync_dir
from appliance.transfer.http import http_client, proxy_words

PKI_DIR = "pki"
# The key and CSR of an enrolment under way (files 0600, folder 0700), kept from before the
# request to the hub until the enrolment is in place, with the SHA-256 of the token they were
# made for: a rerun with that token sends the same CSR, and the hub answers the certificate
# it issued to that key again (an answer lost on the way back spent the token for nothing).
PENDING_DIR = "pki.pending"
# The hub's refusals of an enrolment (appliance.hub.app, its "error"): the token or the CSR
# will never enrol that key, which is then thrown away. Any other answer (a proxy's 403, a
# 5xx) keeps it: the token may be spent on it already.
HUB_REFUSALS = frozenset({"bad_token", "token_expired", "bad_csr", "bad_request"})
# A site's name as the hub issues tokens and certificates for it (pas hub token SITE).
SITE_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
TOKEN_RE = re.compile(rf"^(?P<site>{SITE_NAME})\.(?P<secret>[A-Za-z0-9_-]{{16,}})"
                      r"\.(?P<cafp>[0-9a-f]{64})\Z")
# config/appliance.toml's site (the image's /etc/pas/appliance.toml): a name to replace.
SHIPPED_SITE = "CHANGE-ME"


def not_a_site(name: str) -> str | None:
    """Why the configured ``name`` is no site to enrol as (None: the hub can enrol it): the
    shipped file's placeholder, or a name the hub never issues a token for."""
    if name == SHIPPED_SITE:
        return "the shipped file's placeholder, never set"
    if not re.fullmatch(SITE_NAME, name):
        return "not a name the hub can enrol (letters, digits, '-' or '_', at most 64)"
    return None


class EnrolmentError(Exception):
    """Enrolment failed; the message says why. Nothing was written but the key kept for a
    rerun with the same token (:data:`PENDING_DIR`)."""


class SiteMismatch(EnrolmentError):
    """The configuration names one site and the enrolment is another's (see
    :func:`check_site`): ``problem`` says which, ``way_out`` the ways to put it right.

    Enrolling as the configured site is offered only when it is a site's name
    (:func:`not_a_site`): ``site = "CHU-A "`` (a trailing space) or ``""`` was answered "enrol
    it as 'CHU-A ' (pas hub token CHU-A ...)", a token the hub refuses to issue or that names
    the enrolled site again; the shipped file's ``CHANGE-ME``, left as it was, "enrol it as
    'CHANGE-ME'". A name that differs from the enrolment's only in case or by spaces around it
    is said to: the one character to fix is not easy to see in two quoted names."""

    def __init__(self, configured: str, enrolled: str, certificate: Path):
        self.configured, self.enrolled = configured, enrolled
        self.problem = (f"the configuration says site = {json.dumps(configured)}, but "
                        f"this appliance is enrolled with the hub as site {enrolled!r} (its "
                        f"certificate {certificate}): the hub would take its studies and "
                        f"heartbeats as {enrolled!r} while its audit trail and status say "
                        f"{configured!r}")
        if configured.strip() == enrolled:
            self.problem += " (they differ only by the spaces around the configured name)"
        elif configured.strip().casefold() == enrolled.casefold():
            self.problem += (" (they differ only in case: the hub's site names are "
                             "case-sensitive)" if configured.strip() == configured else
                             " (they differ only in case and by spaces)")
        self.way_out = f"put back site = {json.dumps(enrolled)}"
        why_not = not_a_site(configured)
        if why_not is None:
            self.way_out += (f", or enrol it as {configured!r} (pas hub token {configured} "
                             "at the region, then pas enroll --replace)")
        else:
            self.way_out += f" ({json.dumps(configured)} is {why_not})"
        # As a configuration error is said: the key path first (pas config check, pas run).
        super().__init__(f"site: {self.problem}. {self.way_out[0].upper()}{self.way_out[1:]}")


@dataclass(frozen=True)
class Enrolment:
    """What the appliance knows about its hub once enrolled."""

    pki_dir: Path
    url: str
    site: str
    hub_transfer_key: bytes  # raw X25519 public key (32 bytes)
    enrolled_at: str

    @property
    def client_key(self) -> Path:
        return self.pki_dir / "client.key"

    @property
    def client_cert(self) -> Path:
        return self.pki_dir / "client.crt"

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.crt"

    def expired_at(self, at: datetime | None = None) -> datetime | None:
        """When this appliance's certificate expired, if it has (None: still valid, or
        unreadable, which the start-up check reports). The hub refuses an expired one at the
        TLS handshake, where TLS 1.3 gives the client no reason, only a closed connection:
        this is how the appliance tells that from a link down."""
        try:
            cert = x509.load_pem_x509_certificate(self.client_cert.read_bytes())
        except (OSError, ValueError):
            return None
        expiry = cert.not_valid_after_utc
        return expiry if expiry <= (at or datetime.now(UTC)) else None

    def certificate_site(self) -> str | None:
        """The site the hub knows this appliance by: its certificate's CN, the one name the
        hub reads (hub/pki.certificate_identity), whatever ``hub.json`` says. None when
        the certificate cannot be read (the start-up and doctor checks say that)."""
        return certificate_cn(self.client_cert)

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.3 only, the pinned fleet CA only, hostname checked, our client cert loaded."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def certificate_cn(path: Path) -> str | None:
    """The CN of the PEM certificate at ``path`` (an enrolment's site), None when there is
    none or it cannot be read."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def pki_dir(home: Path) -> Path:
    """The enrolment's folder; finishes a replacement a crash interrupted (see
    :func:`_swap_in`): the new folder complete, the old one already moved aside."""
    directory = Path(home) / PKI_DIR
    staged = directory.with_name(directory.name + ".new")
    if not directory.exists() and (staged / "hub.json").exists():
        with contextlib.suppress(FileNotFoundError):
            os.replace(staged, directory)
    return directory


def _swap_in(staged: Path, directory: Path) -> None:
    """Put a new enrolment's folder in place of the old one: old aside, new in, old gone.
    A crash between the two renames leaves only the complete new folder, which
    :func:`pki_dir` moves in; until the second rename the old enrolment stays whole."""
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(staged, directory)
    fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_enrolment(home: Path) -> Enrolment | None:
    """The enrolment under ``home`` (``$PAS_HOME``), or None when the appliance is not enrolled."""
    directory = pki_dir(home)
    try:
        data = json.loads((directory / "hub.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EnrolmentError(f"{directory / 'hub.json'}: unreadable ({exc})") from None
    try:
        enrolment = Enrolment(pki_dir=directory, url=str(data["url"]).rstrip("/"),
                              site=str(data["site"]),
                              hub_transfer_key=base64.b64decode(data["hub_transfer_key"]),
                              enrolled_at=str(data.get("enrolled_at", "")))
    except (KeyError, ValueError) as exc:
        raise EnrolmentError(f"{directory / 'hub.json'}: missing or bad field ({exc})") from None
    # As enroll() checks: the file is plain JSON, and edited to http:// every call to the hub
    # (manifests with every SOP Instance UID, heartbeats) went in clear (invariant 5).
    if urlsplit(enrolment.url).scheme != "https":
        raise EnrolmentError(f"{directory / 'hub.json'}: url must start with https:// (nothing "
                             f"leaves the site in clear), got {enrolment.url!r}")
    return enrolment


def enrolled_site(home: Path) -> str | None:
    """The site the hub knows the appliance under ``home`` by (its certificate's CN, else
    ``hub.json``'s), None when not enrolled or when the enrolment cannot be read (``pas
    doctor`` and ``pas run`` say why; a command run by a user who may not read ``pki/``
    keeps the default). appliance.config.with_enrolled_site makes it the site when the
    configuration names none."""
    try:
        enrolment = load_enrolment(home)
    except (EnrolmentError, OSError):
        return None
    if enrolment is None:
        return None
    return enrolment.certificate_site() or enrolment.site


def check_site(home: Path, configured: str | None) -> Enrolment | None:
    """The enrolment under ``home``, once checked to be of the site the configuration names.

    ``configured`` is the configuration's ``site`` when it names one (the file's key or
    ``PAS_SITE``; None when it names none, and the enrolment's name stands). An appliance
    enrolled as A whose file was edited or copied to say B spoke to the hub with A's
    certificate (the hub knows it as A, whatever it claims) while its audit trail, status
    and backups said B: raises :class:`SiteMismatch` naming both and the ways out, for
    ``pas run`` to refuse before its ports open (``pas config check``, ``pas doctor``)."""
    enrolment = load_enrolment(home)
    if enrolment is None or configured is None:
        return enrolment
    enrolled = enrolment.certificate_site() or enrolment.site
    if enrolled != configured:
        raise SiteMismatch(configured, enrolled, enrolment.client_cert)
    return enrolment


def parse_token(token: str) -> tuple[str, str, str]:
    """``SITE.SECRET.CAFP`` -> (site, secret, cafp); raises EnrolmentError naming the problem."""
    match = TOKEN_RE.match(token.strip())
    if not match:
        raise EnrolmentError("malformed token: expected SITE.SECRET.CAFP (as printed by "
                             "`pas hub token SITE`)")
    return match["site"], match["secret"], match["cafp"]


def ca_fingerprint(ca_pem: bytes) -> str:
    """Hex SHA-256 of the certificate's DER encoding."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as written to ``client.key`` (PEM, PKCS#8, unencrypted: the file is
    0600 in a 0700 folder, and the daemon reads it unattended)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _fetch_ca(url: str, cafp: str, timeout: float, proxy: httpx.Proxy | None) -> bytes:
    """Get the fleet CA without trusting anything yet, and accept it only if it hashes to CAFP."""
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    unverified.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with http_client(verify=unverified, timeout=timeout, proxy=proxy) as client:
            response = client.get(f"{url}/enroll/ca")
    except httpx.HTTPError as exc:
        raise EnrolmentError(f"cannot reach the hub at {url}{proxy_words(proxy)}: "
                             f"{exc}") from None
    if response.status_code != 200:
        raise EnrolmentError(f"hub at {url} answered {response.status_code} for its CA")
    ca_pem = response.content
    try:
        actual = ca_fingerprint(ca_pem)
    except ValueError:
        raise EnrolmentError(f"hub at {url} sent something that is not a certificate") from None
    if actual != cafp:
        raise EnrolmentError(f"the hub's CA does not match the token (token {cafp[:16]}..., "
                             f"hub {actual[:16]}...): wrong hub, or someone in between")
    return ca_pem


def _pending_key(home: Path, token: str, site: str
                 ) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """The key and CSR (PEM) to enrol with ``token``: those an earlier run with the same
    token kept in :data:`PENDING_DIR`, else new ones, kept there before anything is sent.

    Why: the hub spends the token and records the certificate before it answers; an answer
    lost on the way back (a timeout, a cut link, a Ctrl-C) left a spent token, a key
    thrown away, and a rerun the hub refused (only a new token helped). The hub answers a
    rerun with the same token and the same key with the same certificate. The token is kept
    as its SHA-256 only; ``pending.json``, written last, marks the folder complete."""
    folder = Path(home) / PENDING_DIR
    digest = hashlib.sha256(token.encode()).hexdigest()
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        if json.loads((folder / "pending.json").read_text()).get("token_sha256") == digest:
            kept = serialization.load_pem_private_key((folder / "client.key").read_bytes(),
                                                      None)
            csr_pem = (folder / "client.csr").read_bytes()
            csr = x509.load_pem_x509_csr(csr_pem)
            der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            if (isinstance(kept, ec.EllipticCurvePrivateKey) and csr.is_signature_valid
                    and csr.public_key().public_bytes(*der)
                    == kept.public_key().public_bytes(*der)):
                return kept, csr_pem
    shutil.rmtree(folder, ignore_errors=True)  # another token's, or half made
    key = ec.generate_private_key(ec.SECP256R1())
    csr_pem = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    write_private(folder / "client.key", _key_pem(key))
    write_private(folder / "client.csr", csr_pem)
    write_private(folder / "pending.json", json.dumps({
        "token_sha256": digest,
        "made_at": datetime.now(UTC).isoformat(timespec="seconds")}).encode())
    return key, csr_pem


def enroll(home: Path, url: str, token: str, timeout: float = 30.0, *,
           replace: bool = False, configured_site: str | None = None,
           proxy: httpx.Proxy | None = None) -> Enrolment:
    """Enrol this appliance: new key + CSR, pinned CA checked against the token, files 0600.
    A rerun with the same token reuses the key and CSR of the run before
    (:func:`_pending_key`): the hub answers it the certificate it already issued.

    Refuses to overwrite an existing enrolment unless ``replace`` (a certificate revoked or
    about to expire, a new token from regional ops): the new files are then made beside the
    old ones and swapped in only once the hub has issued the certificate, so a refused
    token or an unreachable hub leaves the old enrolment as it was.

    ``configured_site``: the site the configuration names, if it names one; a token of
    another site is refused before anything is sent (the token stays unspent), since
    ``pas run`` would then refuse the enrolment it made (:func:`check_site`).

    ``proxy``: the hospital's outgoing proxy (``hub.proxy``: :func:`transfer.http.hub_proxy`).
    """
    url = url.rstrip("/")
    if urlsplit(url).scheme != "https":
        raise EnrolmentError(f"hub URL must start with https://, got {url!r}")
    if proxy is not None and ":" in (urlsplit(url).hostname or ""):
        # httpx's CONNECT names such a host without its brackets (CONNECT 2001:db8::1:8443),
        # which no proxy can read (review s42 F6).
        raise EnrolmentError(f"through a proxy (hub.proxy) the hub must be named by its "
                             f"host name or IPv4 address, not an IPv6 one: got {url!r}")
    site, _secret, cafp = parse_token(token)
    if configured_site is not None and site != configured_site:
        # A token of the configured site only when it is a site's name (SiteMismatch).
        why_not = not_a_site(configured_site)
        ask = (f": ask regional ops for a token of site {configured_site!r} (pas hub token "
               f"{configured_site}), or " if why_not is None else f" ({why_not}): ")
        raise EnrolmentError(
            f"the token is for site {site!r} and the configuration says site = "
            f"{json.dumps(configured_site)}{ask}set site = "
            f"{json.dumps(site)} first; nothing sent to the hub, the token is still unspent")
    directory = pki_dir(home)
    if (directory / "hub.json").exists() and not replace:
        raise EnrolmentError(f"already enrolled ({directory / 'hub.json'} exists): to enrol "
                             "again with a new token, add --replace")
    ca_pem = _fetch_ca(url, cafp, timeout, proxy)

    key, csr_pem = _pending_key(home, token.strip(), site)
    with tempfile.NamedTemporaryFile(suffix=".pem") as ca_file:
        ca_file.write(ca_pem)
        ca_file.flush()
        pinned = ssl.create_default_context(cafile=ca_file.name)
    pinned.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with http_client(verify=pinned, timeout=timeout, proxy=proxy) as client:
            response = client.post(
                f"{url}/enroll", json={"token": token.strip(), "csr_pem": csr_pem.decode()})
    except httpx.HTTPError as exc:
        raise EnrolmentError(
            f"enrolment request to {url}{proxy_words(proxy)} failed: {exc}. The hub may "
            f"have spent the token already: run the same pas enroll again with the same "
            f"token (the key is kept in "
            f"{Path(home) / PENDING_DIR}, and the hub answers the certificate it issued to "
            "it again while the token is valid)") from None
    body: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        body = response.json()
    if response.status_code != 200:
        if body.get("error") in HUB_REFUSALS:  # the hub's own answer: that key is no use
            shutil.rmtree(Path(home) / PENDING_DIR, ignore_errors=True)
        raise EnrolmentError(f"hub refused the enrolment ({response.status_code}): "
                             f"{body.get('detail') or response.text[:200]}")
    cert_pem = str(body.get("certificate_pem", "")).encode()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        transfer_key = base64.b64decode(body["hub_transfer_key"], validate=True)
    except (ValueError, KeyError) as exc:
        raise EnrolmentError(f"hub answered with an unusable certificate or key ({exc})") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise EnrolmentError("hub returned a certificate for another key")
    if len(transfer_key) != 32:
        raise EnrolmentError("hub transfer key is not a 32-byte X25519 public key")

    final, directory = directory, directory.with_name(directory.name + ".new")
    shutil.rmtree(directory, ignore_errors=True)  # a replacement a crash left half made
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    write_private(directory / "client.key", _key_pem(key))
    write_private(directory / "client.crt", cert_pem)
    write_private(directory / "ca.crt", ca_pem)
    info = {"url": url, "site": site,
            "hub_transfer_key": base64.b64encode(transfer_key).decode(),
            "enrolled_at": datetime.now(UTC).isoformat(timespec="seconds")}
    write_private(directory / "hub.json", json.dumps(info, indent=2).encode())
    _swap_in(directory, final)
    shutil.rmtree(Path(home) / PENDING_DIR, ignore_errors=True)
    enrolment = load_enrolment(home)
    assert enrolment is not None
    return enrolment
