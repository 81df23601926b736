"""Configuration, the sections: the shape, defaults and checks of every setting.

Owns: one pydantic model per TOML section (``[dicom]``, ``[hub]``, ``[serving]``...), the
``Clock`` of its windows, each model's defaults (that run on a laptop) and its own checks
within one section (``_cross_field``; the value types are :mod:`appliance.config_types`).
May not touch: files, the environment, the database, the network, the spool; nor checks
across sections (``Settings`` in :mod:`appliance.config` ties the sections
together and checks the names one section gives another).

Import these from :mod:`appliance.config`, which re-exports them: that stays the one door to
the configuration whatever module a section lives in. A new section goes here, its key in
``Settings``, and every key is documented in ``config/appliance.example.toml``.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from appliance.config_types import (
    SIEMENS_CSA_NON_IMAGE,
    AETitle,
    Flag,
    HostName,
    IpAddress,
    IpNetwork,
    Port,
    Priority,
    Regex,
    StorageSopClassUid,
    WebRoot,
    _cross_field,
    _Section,
    credentials_in_url,
    sent_in_clear,
)
from appliance.prefetch.charsets import carries_hl7


def _cleartext(what: str, network: str = "the hospital's own network") -> str:
    """The refusal of an ``http://`` URL beyond loopback (:func:`sent_in_clear`), naming the
    opt-in of the section it is in (``{section}``, filled by config.format_validation_error);
    ``network``: where such a host may be (the hub's archive: the data centre's)."""
    return (f"http:// sends {what} in clear; use https:// (or set "
            f"{{section}}.allow_cleartext = true for a host on {network})")


def _credentials_in_url(instead: str) -> str:
    """The refusal of ``user:password@`` in a URL (:func:`credentials_in_url`), without the
    URL (the operator has it; a refusal may be logged). ``instead``: where this section's
    credentials go, said with ``{section}`` (filled by config.format_validation_error)."""
    return ("holds credentials (user:password@host): a URL is written wherever it is shown "
            "(log lines, a job's error, `pas status`, the heartbeat and the hub's fleet "
            f"pages); write the URL without them and {instead}")


_STOWRS_CREDENTIALS = ("put them in {section}.username and {section}.password (HTTP Basic) "
                       "or {section}.bearer_token")


class KnownAE(_Section):
    """A calling AE allowed to associate; ``host`` pins it to one address when set. ``host``
    and ``port`` together are where its Storage Commitment reports go when it has closed
    the association it asked on (appliance/ingest/commitment.py). ``tls``: whether that
    association speaks DICOM TLS (PAS shows ``dicom.tls.cert``/``key``, the modality's
    certificate must chain to ``dicom.tls.ca``); unset, it follows ``dicom.tls.enabled``:
    a modality that reaches PAS over TLS is called back over TLS, never in clear.
    ``tls_check_hostname``: that certificate must also name ``host`` (an IP address in its
    subjectAltName), as a move destination's: with a CA that issues certificates to every
    device of the hospital, another device given the modality's address would otherwise
    receive its reports (and the modality, never told, keep its images for ever)."""

    title: AETitle
    host: IpAddress | None = None
    port: Port | None = None
    tls: Flag | None = None
    tls_check_hostname: Flag = False

    @model_validator(mode="after")
    def _host_to_check(self) -> KnownAE:
        # Without both, the reports go to a move destination's address under its own flag,
        # or nowhere: the key would be accepted and do nothing.
        if self.tls_check_hostname and (self.host is None or self.port is None):
            raise _cross_field("tls_check_hostname", "needs host and port: where the "
                               "reports go, the address the modality's certificate must "
                               "name")
        return self


class ListenerTlsSection(_Section):
    """TLS on a listener (BCP 195 profile, appliance/ops/security.py). ``key`` must be
    0600. With ``require_client_cert`` only peers whose certificate chains to ``ca``
    complete the handshake."""

    enabled: Flag = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: Flag = True
    # A client certificate must also carry one of these names (its subject's common name,
    # or a DNS name or IP address of its subjectAltName; letter case aside): with a CA that
    # issues certificates to every device of the hospital, only the listed ones are heard.
    # Empty: any certificate ``ca`` issued.
    allowed_names: list[str] = []

    @model_validator(mode="after")
    def _files_when_enabled(self) -> ListenerTlsSection:
        if self.enabled and not (self.cert and self.key):
            raise _cross_field("cert" if not self.cert else "key",
                               "required when {section}.enabled (cert and key both are)")
        if self.enabled and self.require_client_cert and not self.ca:
            raise _cross_field("ca", "required when {section}.require_client_cert")
        odd = [name for name in self.allowed_names
               if not (name and name.isascii() and name.isprintable() and name.strip() == name)]
        if odd:  # never matched (security.name_refusal compares ASCII names only)
            raise _cross_field("allowed_names", f"{odd[0]!r} is no certificate name (ASCII "
                               "letters, digits, dots and hyphens, or an IP address)")
        if self.allowed_names and not self.require_client_cert:
            raise _cross_field("allowed_names", "needs {section}.require_client_cert = true "
                               "(a client without a certificate has no name to check)")
        return self


class DicomTlsSection(ListenerTlsSection):
    """DICOM TLS on the listener: with ``require_client_cert`` only modalities whose
    certificate chains to ``ca`` complete the handshake."""


class Hl7TlsSection(ListenerTlsSection):
    """MLLP over TLS on the HL7 listener. HL7 orders carry the patient's name, birth date
    and identifiers: on a network the hospital does not trust end to end, the interface
    engine (Mirth, Rhapsody, Cloverleaf...) sends them over TLS, and with
    ``require_client_cert`` only an engine whose certificate chains to ``ca`` is heard.
    A plain-TCP sender to a TLS port is not answered (its bytes are no handshake)."""


class DicomSection(_Section):
    ae_title: AETitle = "PAS"
    host: str = "0.0.0.0"
    port: Port = 11112
    accept_unknown: Flag = False
    known_aes: list[KnownAE] = []
    max_associations: int = Field(default=16, ge=1, le=256)
    # Of those places, how many only an association that may send images takes (one
    # proposing a storage SOP class as SCU: a modality); viewers' queries and retrieves, and
    # C-ECHOs, share the rest. 0: no reserve; unset: a quarter of max_associations (4 of 16;
    # none under 4, so a small max_associations set before this key existed still holds).
    reserved_for_storage: int | None = Field(default=None, ge=0)
    # Connections open at once on the DICOM port, those that have not sent their
    # A-ASSOCIATE-RQ (or finished their TLS handshake) yet included: a bound on threads and
    # memory against port scans and floods. Beyond, a new connection is closed at once.
    max_connections: int = Field(default=64, ge=1, le=4096)
    network_timeout_s: float = Field(default=60.0, gt=0)
    # Largest PDU we accept; 0 means unlimited (pynetdicom's convention).
    max_pdu: int = Field(default=262144, ge=0)
    tls: DicomTlsSection = DicomTlsSection()
    # Association attempts accepted per source address per minute (0: no limit).
    # Generous on purpose: some modalities open one association per image (a 2,000-slice CT
    # in two minutes is 1,000/min); the limit is for probes and loops, not for scanners.
    max_association_attempts_per_minute: int = Field(default=1200, ge=0)
    # pynetdicom's association threads wait on their socket and queues instead of polling
    # every 1 ms (appliance/dicomnet/reactor.py). Off only to compare, or on a pynetdicom it
    # does not support (then it stays off by itself).
    event_driven: Flag = True
    # C-STORE requests are read, filed and answered in the association's reading thread,
    # with hand-encoded command sets (appliance/dicomnet/direct_receive.py); everything else
    # goes through pynetdicom. Needs ``event_driven``. Off: pynetdicom handles every C-STORE.
    direct_receive: Flag = True
    # A C-STORE's dataset is held in memory up to this size; beyond, it is written to a spool
    # temp file as it arrives (bounded memory: tomosynthesis, long multi-frame objects).
    spill_above_mb: int = Field(default=32, ge=0)  # 0: every dataset (tests)
    # Storage SOP classes accepted, stored and served besides the standard ones pynetdicom
    # knows: vendors' private objects (appliance/ingest/policy.py, storage_sop_classes). One not
    # listed is refused at negotiation, and the log names it and this key.
    extra_storage_sop_classes: list[StorageSopClassUid] = [SIEMENS_CSA_NON_IMAGE]
    # Storage Commitment Push Model SCP (appliance/ingest/commitment.py): modalities ask
    # whether PAS holds what they sent before deleting their copy. A report PAS cannot
    # deliver is tried again with backoff for this many hours, then given up and logged.
    storage_commitment: Flag = True
    storage_commitment_give_up_h: float = Field(default=24.0, gt=0)
    # Most instances one request may name (a large CT is a few thousand); beyond, the
    # request is refused (0x0213, resource limitation) and nothing is recorded.
    storage_commitment_max_items: int = Field(default=50_000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _connections_for_associations(self) -> DicomSection:
        """Each association is a connection: a bound under the association limit would
        leave places no one could take."""
        if self.reserved_for_storage is not None \
                and self.reserved_for_storage >= self.max_associations:
            raise _cross_field("reserved_for_storage",
                               f"must be less than dicom.max_associations "
                               f"({self.max_associations}), got {self.reserved_for_storage}")
        if self.max_connections < self.max_associations:
            raise _cross_field("max_connections",
                               f"must be at least dicom.max_associations "
                               f"({self.max_associations}), got {self.max_connections}")
        return self

    @property
    def storage_reserve(self) -> int:
        """The places of ``max_associations`` kept for associations that send images."""
        if self.reserved_for_storage is None:
            return self.max_associations // 4
        return self.reserved_for_storage

    @model_validator(mode="after")
    def _one_entry_per_title(self) -> DicomSection:
        """Each calling AE title once: a second entry replaced the first without a word (its
        host pin and callback address lost)."""
        first: dict[str, int] = {}
        for number, known in enumerate(self.known_aes):
            if known.title in first:
                raise _cross_field(
                    f"known_aes[{number}].title",
                    f"{known.title!r} is already known_aes[{first[known.title]}]: one entry "
                    "per AE title (a modality sending from two addresses: no host pin, or "
                    "two AE titles)")
            first[known.title] = number
        return self

    @model_validator(mode="after")
    def _ca_for_tls_callbacks(self) -> DicomSection:
        """A report over TLS checks the modality's certificate against ``dicom.tls.ca``:
        an AE calling back over TLS without it is refused here, not at the first report
        (by default only one with an address to call back: others never get one)."""
        if self.tls.ca is not None:
            return self
        for number, known in enumerate(self.known_aes):
            implied = known.tls is None and self.tls.enabled and known.host and known.port
            if known.tls is True or implied:
                raise _cross_field(f"known_aes[{number}].tls",
                                   f"{known.title} is called back over TLS: dicom.tls.ca "
                                   "(the modalities' CA) is required")
        return self

    @model_validator(mode="after")
    def _hostname_checked_over_tls(self) -> DicomSection:
        """``tls_check_hostname`` on an AE called back in clear checks nothing: refused, not
        accepted as a protection it does not give."""
        for number, known in enumerate(self.known_aes):
            over_tls = self.tls.enabled if known.tls is None else known.tls
            if known.tls_check_hostname and not over_tls:
                raise _cross_field(f"known_aes[{number}].tls_check_hostname",
                                   f"{known.title} is called back in clear (its tls, else "
                                   "dicom.tls.enabled, is false): there is no certificate to "
                                   "check")
        return self


class StorageSection(_Section):
    """Where instances land and how much of the disk they may use.

    ``min_free_mb`` is the hard floor of free space on the spool's filesystem; ``quota_mb``
    (0 = none) caps the spool's own size. Either refuses a C-STORE with 0xA700.
    """

    min_free_mb: int = Field(default=512, ge=0)
    quota_mb: int = Field(default=0, ge=0)
    fsync: Flag = True


class CacheSection(_Section):
    """The cache's disk policy and integrity checks (appliance/ops/cache_policy.py).

    Above ``high_watermark_percent`` of the capacity (``storage.quota_mb`` when set, else the
    spool's file system), the least recently used studies that are confirmed at the region,
    not pinned and older than ``min_retention_days`` are evicted down to
    ``low_watermark_percent``. An unconfirmed study is never evicted (invariant 2).
    """

    high_watermark_percent: float = Field(default=90.0, gt=0, le=100)
    low_watermark_percent: float = Field(default=80.0, ge=0, le=100)
    min_retention_days: float = Field(default=0.0, ge=0)
    evict_interval_s: float = Field(default=30.0, gt=0)
    # Background re-hash of the spool, in MB/s (0: off); pauses between passes.
    scrub_mb_per_s: float = Field(default=10.0, ge=0)
    scrub_pause_s: float = Field(default=3600.0, gt=0)
    # SQLite's quick_check of the index while the daemon runs (appliance/ops/index_check.py),
    # every this many seconds (0: off; the check at start-up stays).
    index_check_interval_s: float = Field(default=86400.0, ge=0)

    @model_validator(mode="after")
    def _low_below_high(self) -> CacheSection:
        if self.low_watermark_percent >= self.high_watermark_percent:
            raise _cross_field("low_watermark_percent",
                               f"must be below high_watermark_percent "
                               f"({self.high_watermark_percent}), got {self.low_watermark_percent}")
        return self


class AuditSection(_Section):
    """Where the audit trail goes besides the database and the journal: an RFC 5424 syslog
    collector over TLS (RFC 5425), messages shaped after DICOM PS3.15 / IHE ATNA. Both
    copies read the table (the outbox, appliance/ops/audit_trail.py)."""

    syslog_host: str | None = None
    syslog_port: Port = 6514
    syslog_ca: Path | None = None
    syslog_cert: Path | None = None
    syslog_key: Path | None = None
    # No longer used: the copies read the database's audit table in batches instead of a
    # queue in memory. Still accepted, so that a configuration file naming it stays valid.
    queue_max: int = Field(default=10000, ge=1)
    # How often the copies look for rows written by another process (the `pas` CLI: a purge,
    # a pin); the daemon's own rows wake them at once.
    outbox_poll_s: float = Field(default=2.0, gt=0, le=60)
    # At a clean stop, what is still queued is sent for at most this long (systemd's
    # TimeoutStopSec=60s covers it and the rest of the stop).
    stop_flush_s: float = Field(default=5.0, ge=0, le=30)

    @model_validator(mode="after")
    def _ca_with_host(self) -> AuditSection:
        if self.syslog_host and not self.syslog_ca:
            raise _cross_field("syslog_ca", "required when audit.syslog_host is set (the "
                                            "collector's certificate must be verified)")
        return self


class BackupSection(_Section):
    """``pas backup`` (and its daily timer): the key its files are sealed for
    (:mod:`appliance.ops.backup_seal`). The private half stays off the appliance, in IT's
    keeping; it is needed only by ``pas restore``."""

    # The backup key's public half (`pas backup-key FILE` prints it). Empty: backups are
    # written in clear, and `pas doctor` says so.
    recipient: str = ""

    @field_validator("recipient")
    @classmethod
    def _a_backup_key(cls, value: str) -> str:
        if value.strip():
            from appliance.ops.backup_seal import BackupKeyError, parse_recipient

            try:
                parse_recipient(value)
            except BackupKeyError as exc:
                raise ValueError(str(exc)) from None
        return value.strip()


class StudySection(_Section):
    stable_after_s: float = Field(default=60.0, ge=0)
    check_interval_s: float = Field(default=2.0, gt=0)
    # An urgent study (a rule of priority "urgent" takes one of its instances) is routed in
    # batches while it arrives, each once its oldest instance is this old, instead of after
    # stable_after_s of quiet (appliance/routing/stability.py); 0: it waits like the others.
    urgent_batch_s: float = Field(default=5.0, ge=0)


class QueueSection(_Section):
    workers: int = Field(default=2, ge=1, le=64)
    max_attempts: int = Field(default=10, ge=1)
    backoff_initial_s: float = Field(default=5.0, ge=0)
    backoff_max_s: float = Field(default=900.0, ge=0)
    lease_s: float = Field(default=300.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0)


class HttpSection(_Section):
    """``allowed_hosts``: names the port answers to besides IP addresses, ``localhost``, the
    machine's host name and FQDN (appliance/web/hosts.py: a Host header naming anything
    else is refused, against DNS rebinding)."""

    host: str = "127.0.0.1"
    port: Port = 8080
    enabled: Flag = True
    allowed_hosts: list[HostName] = []
    # Connections open at once (more are closed as they open), how long a connection may
    # take to send its first whole request, and how long an answer may wait for the client
    # to read any of it (appliance/web/bounded.py).
    max_connections: int = Field(default=1024, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)
    send_timeout_s: float = Field(default=60.0, gt=0)
    # Streamed answers (WADO-RS studies, series, metadata) served at once; one more is
    # answered 503 with Retry-After. Each may hold a few MB while its client reads: with
    # max_connections alone, clients that stop reading could hold 4.6 GB for send_timeout_s.
    max_streaming_answers: int = Field(default=128, ge=1)


class OpsSection(_Section):
    """Operations: the heartbeat that feeds the hub's fleet dashboard (only when enrolled)."""

    heartbeat: Flag = True
    heartbeat_interval_s: float = Field(default=30.0, ge=1)


class Match(_Section):
    """Regular expressions (Python ``re.search``, case-insensitive) that must all match."""

    calling_ae: Regex | None = None
    called_ae: Regex | None = None
    modality: Regex | None = None
    sop_class: Regex | None = None
    study_description: Regex | None = None
    body_part: Regex | None = None


class Rule(_Section):
    name: str
    match: Match = Match()
    destinations: list[str] = Field(min_length=1)
    priority: Priority = "routine"
    # When a rule matches, later rules are not evaluated unless ``continue`` is true.
    continue_: Flag = Field(default=False, alias="continue")


class Fallback(_Section):
    """Where an instance goes when no rule decided it (none matched, or only ``continue``
    rules did, whose destinations it gets as well). Empty: the default route (the hub, once
    enrolled)."""

    destinations: list[str] = []
    priority: Priority = "routine"


class DicomDestination(_Section):
    kind: Literal["dicom"]
    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    # DICOM TLS to this node (BCP 195): the node's certificate must chain to ``tls_ca``;
    # ``tls_cert``/``tls_key`` (0600) are PAS's client certificate when the node asks.
    # ``tls_check_hostname``: the certificate must also name ``host`` (a DNS name, or an IP
    # address in its subjectAltName). Off by default: DICOM nodes are mostly addressed by an
    # IP their certificate does not name, and a CA of the site's own nodes alone vouches
    # for them; on, another certificate of that CA no longer passes for this node.
    tls: Flag = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_check_hostname: Flag = False

    @model_validator(mode="after")
    def _ca_with_tls(self) -> DicomDestination:
        if self.tls and not self.tls_ca:
            raise _cross_field("tls_ca", "required when tls = true")
        return self


class HubDestination(_Section):
    kind: Literal["hub"]


# Through a proxy an http:// request is no tunnel: the proxy takes it whole (images, a bearer
# token) and forwards it (review s43: accepted for a loopback url, which the proxy then
# resolved to itself).
_PROXIED_IN_CLEAR = ("only for an https:// {{section}}.{key}: through the proxy an http:// "
                     "request is handed to it in clear (patient data and credentials), not "
                     "tunnelled")


class StowRsDestination(_Section):
    """DICOMweb STOW-RS to an archive at ``url``. ``http://`` beyond loopback only with
    ``allow_cleartext`` (a peer on the hospital's own network): invariant 5."""

    kind: Literal["stowrs"]
    url: WebRoot
    allow_cleartext: Flag = False
    instances_per_request: int = Field(default=16, ge=1, le=1000)
    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_file: Path | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    # Through the hospital's outgoing proxy (hub.proxy, with its credentials): an archive
    # outside the hospital where only the proxy may go out. Each request a CONNECT tunnel.
    through_proxy: Flag = False

    @model_validator(mode="after")
    def _not_in_clear(self) -> StowRsDestination:
        if credentials_in_url(self.url):
            raise _cross_field("url", _credentials_in_url(_STOWRS_CREDENTIALS))
        if not self.allow_cleartext and sent_in_clear(self.url):
            credentials = self.bearer_token or self.username is not None
            raise _cross_field("url", _cleartext("patient data and credentials" if credentials
                                                 else "patient data"))
        if self.through_proxy and not self.url.lower().startswith("https://"):
            raise _cross_field("through_proxy", _PROXIED_IN_CLEAR.format(key="url"))
        return self


Destination = Annotated[
    DicomDestination | HubDestination | StowRsDestination, Field(discriminator="kind")
]


def _clock(value: str) -> str:
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
        raise ValueError(f"must be HH:MM (00:00-23:59), got {value!r}")
    return value


Clock = Annotated[str, AfterValidator(_clock)]


class RateWindow(_Section):
    """From ``start`` to ``end`` (local time, may wrap past midnight) the uplink is capped at
    ``max_mbps`` (0 = no cap); outside every window ``hub.max_mbps`` applies."""

    start: Clock
    end: Clock
    max_mbps: float = Field(ge=0)


class HubSection(_Section):
    """The uplink to the regional hub (the enrolment itself lives in ``$PAS_HOME/pki``)."""

    parallel_buckets: int = Field(default=4, ge=1, le=32)
    # Bucket PUTs sending at once, shared by every job (one slot stays for the small calls);
    # the pool keeps up to twice as many TCP connections (PUTs sent, awaiting their answer).
    connections: int = Field(default=4, ge=2, le=64)
    bucket_mb: float = Field(default=6.0, gt=0, le=64)
    max_mbps: float = Field(default=0.0, ge=0)
    windows: list[RateWindow] = []
    # The line's own rate, if known (0: unknown). The hub connections are then paced just
    # under it (transfer/pacing.py Pacer), so that parallel PUTs do not overrun the router's
    # queue; it is not a cap (max_mbps is).
    link_mbps: float = Field(default=0.0, ge=0)
    # The line's rate towards the site, if not link_mbps (an asymmetric line; 0: link_mbps).
    # Known, it lets downloads (priors, fetch-through) use prefetch.download_lanes
    # connections, which the hub paces at a share of it (appliance/transfer/lanes.py).
    downlink_mbps: float = Field(default=0.0, ge=0)

    def downlink_bps(self) -> int:
        """The downlink's rate in bit/s, 0 when unknown."""
        return int((self.downlink_mbps or self.link_mbps) * 1e6)

    # Packing level (appliance/transfer/pack.py LEVELS; auto: chosen from the CPU it measures).
    pack_level: Literal["fast", "default", "max", "auto"] = "default"
    timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=4, ge=0, le=20)
    # An urgent job gets a worker of its own so that a long routine upload never delays it.
    urgent_worker: Flag = True
    # The hospital's outgoing HTTP proxy, when the firewall lets nothing else out:
    # ``http://host:port``. Every connection to the hub (enrolment, uploads, heartbeats,
    # downloads, regional queries, ``pas doctor``) is a CONNECT tunnel through it; TLS and
    # the client certificate stay end to end (the proxy sees the hub's name and port, never
    # a byte in clear). Credentials (HTTP Basic on the CONNECT) go in proxy_username and
    # proxy_password, never in the URL. Unset: straight to the hub. Only the hub's
    # connections use it (local destinations and a plain ``prefetch.dicomweb_url`` do not),
    # and PAS never reads HTTP(S)_PROXY from its environment (appliance/transfer/http.py).
    proxy: WebRoot | None = None
    proxy_username: str | None = None
    proxy_password: str | None = None

    @model_validator(mode="after")
    def _proxy(self) -> HubSection:
        if self.proxy is None:
            if self.proxy_username is not None or self.proxy_password is not None:
                raise _cross_field("proxy_username" if self.proxy_username is not None
                                   else "proxy_password", "is set but {section}.proxy is not")
            return self
        if credentials_in_url(self.proxy):
            raise _cross_field("proxy", _credentials_in_url(
                "put them in {section}.proxy_username and {section}.proxy_password"))
        parts = urlsplit(self.proxy)
        if parts.scheme != "http":
            raise _cross_field("proxy", "must be http://host:port (a CONNECT proxy; the "
                               f"tunnel carries the hub's own TLS), got {self.proxy!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise _cross_field("proxy", f"must be http://host:port, with no path, got "
                               f"{self.proxy!r}")
        if (self.proxy_password is not None) != (self.proxy_username is not None):
            raise _cross_field("proxy_password" if self.proxy_username is not None
                               else "proxy_username",
                               "is required with proxy_username" if self.proxy_username
                               is not None else "is required with proxy_password")
        if self.proxy_username is not None and (":" in self.proxy_username
                                                or not self.proxy_username):
            raise _cross_field("proxy_username", "must be a non-empty name without ':' "
                               "(HTTP Basic)")
        return self


class Hl7Section(_Section):
    """The HL7 v2 MLLP listener that receives orders and appointments from the RIS.

    Memory is bounded by ``max_connections`` x 2 x ``max_message_kb`` (a connection buffers
    at most twice the limit before its socket is paused); a connection that stops in the
    middle of a message is refused after ``frame_timeout_s``, one that has not taken (read)
    an answer within ``frame_timeout_s`` is dropped, and one silent between messages is
    closed after ``idle_timeout_s`` (0: never), so that stuck or leaked connections do not
    hold the slots the RIS needs."""

    enabled: Flag = True
    host: str = "0.0.0.0"
    port: Port = 2575
    max_message_kb: int = Field(default=1024, ge=1)
    encoding: str = "utf-8"  # for messages whose MSH-18 is empty or names no known set
    max_connections: int = Field(default=32, ge=1)
    frame_timeout_s: float = Field(default=60.0, gt=0)
    idle_timeout_s: float = Field(default=3600.0, ge=0)
    # MSH-11 processing ids acted on (P production, T training, D debugging); others are
    # refused AR 202 (appliance/prefetch/messages.py refuse_other_processing).
    processing_ids: list[Literal["P", "T", "D"]] = Field(default=["P"], min_length=1)
    # The addresses (or networks, CIDR) of the hosts that may send HL7: the interface
    # engine's. Empty: any host (a connection from another is closed as it opens).
    allowed_sources: list[IpNetwork] = []
    tls: Hl7TlsSection = Hl7TlsSection()

    @field_validator("encoding")
    @classmethod
    def _known_text_encoding(cls, value: str) -> str:
        """Refused here, by name, rather than by a LookupError in the listener for every
        message (no ACK at all, the RIS resending forever). ``"".encode`` also refuses
        codecs that are not text encodings (base64, rot13)."""
        try:
            "".encode(value)
            b"".decode(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        # A codec that does not read ASCII as ASCII, or cannot replace a bad byte: the
        # listener's decode raised (idna: no ACK) or its ACK went out garbled (UTF-7, EBCDIC)
        # for every message whose MSH-18 names no set (review, 2026-12-07).
        if not carries_hl7(value):
            raise ValueError(f"{value!r} cannot carry HL7 over MLLP (its ASCII bytes are not "
                             "read as ASCII, or it cannot replace a bad byte): use utf-8, "
                             "iso-8859-1 or cp1252")
        return value


class PrefetchWindow(_Section):
    """From ``start`` to ``end`` (local time, may wrap past midnight) priors may be fetched."""

    start: Clock
    end: Clock


class PrefetchRule(_Section):
    """Which priors to fetch for an ordered exam whose modality matches ``modality``."""

    name: str
    modality: Regex | None = None          # of the ordered exam; None: any
    priors: int = Field(default=3, ge=0, le=100)
    max_age_days: int = Field(default=0, ge=0)   # 0: no age limit
    same: Literal["any", "modality", "body_part"] = "any"
    push_to: list[str] = []                  # dicom destinations that get the fetched priors


class PrefetchMwl(_Section):
    """Modality Worklist polling: C-FIND MWL SCU against the RIS for the coming hours."""

    enabled: Flag = False
    ae_title: AETitle = "RIS"
    host: str = "127.0.0.1"
    port: Port = 104
    calling_ae_title: AETitle | None = None   # default: dicom.ae_title
    interval_s: float = Field(default=300.0, gt=0)
    hours_ahead: float = Field(default=24.0, gt=0)
    modality: str | None = None               # only this modality's steps (None: all)
    station_ae_title: str | None = None       # only steps scheduled on this station
    timeout_s: float = Field(default=30.0, gt=0)


class PrefetchSection(_Section):
    """Priors on site before the patient arrives (see docs/prefetch.md)."""

    enabled: Flag = True
    on_arrival: Flag = True                  # a new local study fetches that patient's priors
    lead_time_h: float = Field(default=24.0, ge=0)
    windows: list[PrefetchWindow] = []       # empty: any time of day
    pin_days: int = Field(default=30, ge=0)
    rules: list[PrefetchRule] = [PrefetchRule(name="default")]
    # Site issuer (PID-3.4 / IssuerOfPatientID) -> the issuer the regional archive uses.
    # Matched without regard to case (region_issuer).
    issuer_map: dict[str, str] = {}
    dicomweb_url: WebRoot | None = None      # a plain DICOMweb region instead of the hub proxy
    # dicomweb_url may be http:// to a host other than loopback (invariant 5: only for a
    # region reached on the hospital's own network, never across the WAN).
    allow_cleartext: Flag = False
    # Credentials for dicomweb_url (a region read through the hub needs none: the site's
    # certificate is its credential): HTTP Basic, or a bearer token (which wins).
    dicomweb_username: str | None = None
    dicomweb_password: str | None = None
    dicomweb_bearer_token: str | None = None
    # The CA bundle dicomweb_url's certificate chains to, when not a public one (a regional
    # PKI); unset: the public CAs PAS ships with (certifi).
    dicomweb_ca_file: Path | None = None
    # dicomweb_url through the hospital's outgoing proxy (hub.proxy, with its credentials):
    # a region outside the hospital where only the proxy may go out.
    dicomweb_through_proxy: Flag = False
    parallel: int = Field(default=8, ge=1, le=32)   # WADO-RS requests in flight
    # The hub's bucketed download (JPEG-LS + zstd) when it offers one, for priors and for
    # fetch-through; else WADO-RS.
    bucketed: Flag = True
    download_bucket_kb: int = Field(default=4096, ge=64, le=16384)  # original bytes a bucket

    def region_issuer(self, site_issuer: str) -> str | None:
        """The region's name for a site issuer, None when the map has none. Matched without
        regard to case: a key set from the environment arrives in lower case, as every part
        of a variable's name does (``PAS_PREFETCH__ISSUER_MAP__CHU-A`` is ``chu-a``), and
        the RIS writes ``CHU-A``: matched exactly, the map never applied."""
        wanted = site_issuer.casefold()
        return next((region for site, region in self.issuer_map.items()
                     if site.casefold() == wanted), None)
    download_streams: int = Field(default=8, ge=1, le=32)  # bucketed downloads at once
    # Connections one bucketed download is striped over when the downlink's rate is known
    # (hub.link_mbps or hub.downlink_mbps): several TCP windows fill a long line sooner than
    # one (appliance/transfer/lanes.py; 4 measured best at 20 Mbit/s, 70 ms).
    download_lanes: int = Field(default=4, ge=1, le=16)
    check_interval_s: float = Field(default=2.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_after_s: float = Field(default=30.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)
    # Days a finished request, its priors' rows and the HL7 messages of no kept request stay
    # in the index (appliance/store/prefetch_retention.py): that long, the same message or
    # order sent again is still a duplicate. At least 7: the pas_prefetch_..._7d metrics are
    # read from these rows.
    keep_days: float = Field(default=90.0, ge=7)
    mwl: PrefetchMwl = PrefetchMwl()

    @model_validator(mode="after")
    def _not_in_clear(self) -> PrefetchSection:
        credentials = (self.dicomweb_bearer_token is not None
                       or self.dicomweb_username is not None)
        if self.dicomweb_url and credentials_in_url(self.dicomweb_url):
            raise _cross_field("dicomweb_url", _credentials_in_url(
                "put them in {section}.dicomweb_username and {section}.dicomweb_password "
                "(HTTP Basic) or {section}.dicomweb_bearer_token"))
        if not self.dicomweb_url and (credentials or self.dicomweb_password is not None):
            # Through the hub the site's certificate is what the region trusts: credentials
            # set for nothing would read as sent, and a typo in dicomweb_url's name hidden.
            key = ("dicomweb_bearer_token" if self.dicomweb_bearer_token is not None
                   else "dicomweb_username" if self.dicomweb_username is not None
                   else "dicomweb_password")
            raise _cross_field(key, "is for {section}.dicomweb_url, which is not set (the "
                                    "region read through the hub takes the site's certificate)")
        if self.dicomweb_through_proxy and not self.dicomweb_url:
            raise _cross_field("dicomweb_through_proxy", "is for {section}.dicomweb_url, which "
                               "is not set (the region read through the hub goes through "
                               "hub.proxy already, when it is set)")
        if self.dicomweb_through_proxy and self.dicomweb_url and \
                not self.dicomweb_url.lower().startswith("https://"):
            raise _cross_field("dicomweb_through_proxy",
                               _PROXIED_IN_CLEAR.format(key="dicomweb_url"))
        if self.dicomweb_ca_file is not None and not self.dicomweb_url:
            raise _cross_field("dicomweb_ca_file", "is for {section}.dicomweb_url, which is "
                               "not set (the region read through the hub is checked against "
                               "the fleet CA of the enrolment)")
        if self.dicomweb_ca_file is not None and self.dicomweb_url and \
                not self.dicomweb_url.lower().startswith("https://"):
            raise _cross_field("dicomweb_ca_file", "is for an https:// {section}.dicomweb_url "
                               "(an http:// one has no certificate to check)")
        if self.dicomweb_url and not self.allow_cleartext and sent_in_clear(self.dicomweb_url):
            raise _cross_field("dicomweb_url", _cleartext(
                "patient data and credentials" if credentials else "patient data"))
        return self


_ORIGIN = re.compile(r"(?i:(?P<scheme>https?))://(?:(?P<host>[A-Za-z0-9.\-]+)"
                     r"|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])(?::(?P<port>[0-9]{1,5}))?")
_DEFAULT_PORT = {"http": 80, "https": 443}


def _viewer_origin(value: str) -> str:
    """One web origin, never ``*``: with any origin allowed, any page a radiologist's browser
    opens (a site on the internet included) could read the patients' data through that
    browser, which reaches PAS on the hospital's network."""
    if value == "*":
        raise ValueError("'*' would let any web page read patient data through a browser on "
                         "the hospital's network: name each viewer's origin")
    parts = _ORIGIN.fullmatch(value)
    if parts is None:
        raise ValueError(f"{value!r} is not an origin: scheme://host[:port], no path "
                         "(e.g. https://viewer.hospital.example)")
    # As the browser writes its Origin header (RFC 6454, the WHATWG URL serialisation):
    # scheme and host in lower case, an IPv6 address in its shortest form, the port as a
    # number (no leading zeros) and none when it is the scheme's default. The CORS
    # middleware compares the strings as they are, so "https://Viewer.H.example:443" or
    # ":0443" written by IT would otherwise never match, silently.
    scheme = parts["scheme"].lower()
    host = (parts["host"] or "").lower()
    if parts["ipv6"] is not None:
        try:
            host = f"[{ipaddress.IPv6Address(parts['ipv6']).compressed}]"
        except ValueError:
            raise ValueError(f"{value!r}: {parts['ipv6']} is not an IPv6 address") from None
    port = ""
    if parts["port"] is not None:
        number = int(parts["port"])
        if not 1 <= number <= 65535:
            raise ValueError(f"{value!r}: port {number} is not a TCP port (1-65535)")
        port = "" if number == _DEFAULT_PORT[scheme] else f":{number}"
    return f"{scheme}://{host}{port}"


ViewerOrigin = Annotated[str, AfterValidator(_viewer_origin)]


class MoveDestination(_Section):
    """A C-MOVE destination a viewer may name: AE title -> where PAS sends the images.
    ``tls``: whether PAS reaches it over DICOM TLS (PAS shows ``dicom.tls.cert``/``key``,
    the workstation's certificate must chain to ``dicom.tls.ca``); unset, it follows
    ``dicom.tls.enabled``: a site whose listener speaks TLS sends its images over TLS."""

    title: AETitle
    host: str
    port: Port
    tls: Flag | None = None
    # Over TLS, the workstation's certificate must also name ``host`` (a DNS name, or an IP
    # address in its subjectAltName), as a ``dicom`` destination's ``tls_check_hostname``:
    # with a CA that issues certificates to every device, the CA's word alone lets any of
    # them, given the workstation's address, receive the images. Off by default.
    tls_check_hostname: Flag = False

    def uses_tls(self, listener_tls: bool) -> bool:
        return listener_tls if self.tls is None else self.tls


class ServingSection(_Section):
    """Serving local viewers from the cache (appliance/serving/): C-FIND/C-MOVE/C-GET and
    DICOMweb under /dicom-web. ``auth``: none (trusted VLAN), bearer (one of
    ``bearer_tokens``), client_cert (the HTTP port speaks TLS with ``tls_cert``/``tls_key``
    and requires a client certificate issued by ``tls_client_ca``). ``auth`` guards the whole
    HTTP port, status page and /metrics included, also with ``enabled = false``
    (appliance/web/auth.py)."""

    enabled: Flag = True
    move_destinations: list[MoveDestination] = []
    pn_case_sensitive: Flag = False
    max_results: int = Field(default=0, ge=0)          # C-FIND/QIDO answers; 0: no limit
    # With max_results at 0: most results of a QIDO-RS search not confined to one study when
    # the client's limit asks more (it gets this many and the PS3.18 8.3.4.4 Warning; the
    # answer is written as it is read). The page without limit is 1000, or this when lower.
    qido_max_limit: int = Field(default=10000, ge=1)
    auth: Literal["none", "bearer", "client_cert"] = "none"
    bearer_tokens: list[str] = []
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Web viewers served from another origin that may read DICOMweb from their users'
    # browsers (CORS), each "scheme://host[:port]" exactly as the browser sends it.
    cors_origins: list[ViewerOrigin] = []
    fetch_through: Flag = True                         # misses fetched from the region (hub)
    fetch_timeout_s: float = Field(default=120.0, gt=0)
    query_region: Flag = False                         # C-FIND also asks the region
    region_query_timeout_s: float = Field(default=0.5, gt=0, le=30)
    # C-MOVE/C-GET pending responses (optional in PS3.4) at most this often; 0: one per image.
    retrieve_pending_interval_s: float = Field(default=0.1, ge=0, le=10)

    @model_validator(mode="after")
    def _credentials_for_auth(self) -> ServingSection:
        if self.auth == "bearer" and not self.bearer_tokens:
            raise _cross_field("bearer_tokens", "required when serving.auth = 'bearer'")
        missing = [name for name in ("tls_cert", "tls_key", "tls_client_ca")
                   if getattr(self, name) is None]
        if self.auth == "client_cert" and missing:
            raise _cross_field(missing[0], f"required when serving.auth = 'client_cert' "
                                           f"(missing: {', '.join(missing)})")
        if (self.tls_cert is None) != (self.tls_key is None):  # one alone: no TLS, unsaid
            raise _cross_field("tls_key" if self.tls_key is None else "tls_cert",
                               "required with the other: tls_cert and tls_key make the HTTP "
                               "port speak TLS")
        return self


class RoutingSection(_Section):
    rules: list[Rule] = []
    fallback: Fallback = Fallback()
