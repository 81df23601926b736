"""Hub settings: ``$PAS_HUB_HOME/hub.toml`` plus ``PAS_HUB_<SECTION>__<KEY>`` overrides.

Owns: the shape and defaults of the hub's configuration. Reuses the appliance's loader helpers
(one error format for both). May not touch: files other than hub.toml, the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

# The appliance's sections' base: unknown keys refused, numbers strict (``port = "8443"`` or
# ``workers = true`` named, as in the appliance's file).
from appliance.config import (
    ConfigError,
    Port,
    _Section,
    build,
    deep_merge,
    env_overrides,
    name_the_variables,
    read_toml,
)
from appliance.config_sections import BackupSection, _cleartext, _credentials_in_url
from appliance.config_types import (
    Flag,
    _cross_field,
    _web_root,
    credentials_in_url,
    sent_in_clear,
)

HUB_ENV_PREFIX = "PAS_HUB_"


class HubHttpSection(_Section):
    """The HTTPS port, and its bounds (appliance/web/bounded.py, as the appliance's HTTP
    port): connections open at once, the time to send a whole first request after the TLS
    handshake, and how long an answer may wait for its client to read any of it (a site's
    WAN may stall: longer than the appliance's LAN bound). uvicorn waited for ever for a
    request's headers: connections that never finished one, from anywhere the port is
    reachable, held the hub's descriptors until none was left for the sites."""

    host: str = "0.0.0.0"
    port: Port = 8443
    max_connections: int = Field(default=4096, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)
    send_timeout_s: float = Field(default=300.0, gt=0)


class ArchiveSection(_Section):
    """``embedded``: files + SQLite under ``$PAS_HUB_HOME/archive``; ``dicomweb``: STOW-RS to
    ``url`` (the DICOMweb root of the regional PACS). ``http://`` beyond loopback only with
    ``allow_cleartext`` (a PACS on the data centre's own network), as the appliance's
    DICOMweb URLs (invariant 5: every study of the region passes there, and it took any
    host in clear). ``ca_file``: the PEM bundle the PACS's certificate is verified with,
    instead of the system's store (a regional PACS under a private CA; hub/archive.py).
    ``username``/``password`` (HTTP Basic) or ``bearer_token``: the PACS's credentials, sent
    on the hub's requests to it (hub/archive.py ``archive_client_options``), as a ``stowrs``
    destination's; ``user:password@`` in ``url`` is refused (the URL is written in log lines,
    where a secret must not be)."""

    kind: Literal["embedded", "dicomweb"] = "embedded"
    url: str | None = None
    allow_cleartext: Flag = False
    ca_file: Path | None = None
    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None
    instances_per_request: int = Field(default=16, ge=1, le=1000)
    timeout_s: float = Field(default=120.0, gt=0)
    # Threads rebuilding and archiving instances while their transfer's buckets arrive.
    workers: int = Field(default=2, ge=1, le=16)
    # Requests to the archive at once (per hub, every transfer): Orthanc stores one request
    # while it parses the next (the MR set: best runs 0.9 s with 4, 1.2 s with 2; medians alike
    # on a shared 2-core machine, docs/benchmarks.md).
    requests: int = Field(default=4, ge=1, le=32)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        # The appliance's DICOMweb roots' rule (scheme, a host, a port that is a number);
        # empty is unset, as before.
        return _web_root(value) if value else value

    @model_validator(mode="after")
    def _url_for_dicomweb(self) -> ArchiveSection:
        if self.url and credentials_in_url(self.url):  # before any message that shows it
            raise _cross_field("url", _credentials_in_url(
                "put them in {section}.username and {section}.password (HTTP Basic) or "
                "{section}.bearer_token"))
        if self.kind == "dicomweb" and not self.url:
            raise ValueError("url is required when kind is 'dicomweb'")
        if self.kind == "embedded" and self.url:
            # Taken without a word before: an operator who set the PACS's url and not the
            # kind believed the region's studies went there; they stayed on the hub's disk,
            # each confirmed to its site, and nothing reached the PACS.
            raise _cross_field("url", f"set ({self.url}) but kind is 'embedded': the region's "
                               "studies would stay on the hub's own disk and none would go "
                               "there; set kind = \"dicomweb\" to archive to it, or remove url")
        if self.url and not self.allow_cleartext and sent_in_clear(self.url):
            credentials = self.bearer_token or self.username is not None
            raise _cross_field("url", _cleartext(
                "every study the sites send" + (" and the archive's credentials"
                                                if credentials else ""),
                "the data centre's own network"))
        return self


class LimitsSection(_Section):
    max_bucket_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_manifest_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_buckets: int = Field(default=100_000, ge=1)
    # A bucket PUT for a transfer this hub does not know waits this long for its manifest
    # before the 404: the appliance sends a new transfer's first buckets without waiting for
    # the manifest's answer (one round trip less per study), on other connections.
    early_bucket_wait_s: float = Field(default=2.0, ge=0, le=30)
    # A download lane (appliance/transfer/lanes.py) waits this long for the download it
    # joins, which the site requested at the same moment on another connection.
    lane_join_wait_s: float = Field(default=5.0, ge=0, le=60)
    # Bytes of bucket PUT bodies held at once, every site together (each PUT reserves its
    # Content-Length before reading): a PUT beyond is answered 503 busy with Retry-After
    # (busy_retry_after_s), unread, nothing stored. 512 MiB: a small hub's memory.
    bucket_bodies_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    busy_retry_after_s: int = Field(default=5, ge=1, le=3600)
    # A bucket reservation (POST .../buckets/{index}/reservation, asked by an appliance the
    # hub turned away busy recently, so that a refusal costs a small request and not a
    # bucket's body) holds its bytes of bucket_bodies_bytes this long for its PUT, and a
    # site holds at most this many at once (one per PUT it sends at once: hub.connections).
    bucket_reservation_s: float = Field(default=30.0, ge=1, le=600)
    bucket_reservations_per_site: int = Field(default=16, ge=1, le=1024)

    @model_validator(mode="after")
    def _room_for_one_bucket(self) -> LimitsSection:
        if self.bucket_bodies_bytes < self.max_bucket_bytes:  # else never accepted
            raise ValueError(f"bucket_bodies_bytes ({self.bucket_bodies_bytes}) must be at "
                             f"least max_bucket_bytes ({self.max_bucket_bytes})")
        return self


class TransfersSection(_Section):
    """Abandoned uploads (appliance/hub/expiry.py): a transfer with no receipt and no manifest
    POST nor bucket PUT for ``abandoned_after_days`` loses its staging (sealed bucket files,
    rebuild work files); its row stays, marked expired, and a site that comes back sends every
    bucket again. 0 keeps staging for ever. Sites resume after days offline: keep it long."""

    abandoned_after_days: float = Field(default=30.0, ge=0)
    expiry_check_interval_s: float = Field(default=3600.0, gt=0)


class DashboardSection(_Section):
    """Who may read the fleet dashboard (``/``, ``/fleet``, ``/fleet/...``), ``/metrics`` and
    any page but the sites' routes, enrolment and health (appliance/hub/dashboard_auth.py).
    ``none``: anyone who reaches the hub's port, which every site of the region reaches by
    design (``pas hub run`` warns); ``basic``: HTTP Basic over the hub's TLS, a name of
    ``users`` with its password. ``users``: name -> the hash ``pas hub password NAME``
    prints, never a password itself."""

    auth: Literal["none", "basic"] = "none"
    users: dict[str, str] = {}

    @field_validator("users", mode="before")
    @classmethod
    def _a_table(cls, users: Any) -> Any:
        # Said without the value: one given by PAS_HUB_DASHBOARD__USERS may be a password,
        # and the error goes to the journal (review, 2026-12-06).
        if not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
            raise ValueError("must be a table of name = the hash `pas hub password NAME` "
                             "prints (the value given is not shown: it may hold a password)")
        return users

    @field_validator("users")
    @classmethod
    def _hashes(cls, users: dict[str, str]) -> dict[str, str]:
        from appliance.hub.dashboard_auth import name_problem, parse_hash

        for name, stored in users.items():
            if (problem := name_problem(name)) is not None:
                raise ValueError(problem)
            try:
                parse_hash(stored)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return users

    @model_validator(mode="after")
    def _users_for_basic(self) -> DashboardSection:
        if self.auth == "basic" and not self.users:
            raise _cross_field("users", "required when dashboard.auth = 'basic': add one with "
                                        "`pas hub password NAME`")
        return self


# The home when neither PAS_HUB_HOME nor the configuration names one: the folder a developer's
# hub runs in, relative to where the command runs (pas-hub.service names /var/lib/pas-hub).
DEFAULT_HOME = "./var-hub"


class HubSettings(_Section):
    home: Path = Path(DEFAULT_HOME)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http: HubHttpSection = HubHttpSection()
    archive: ArchiveSection = ArchiveSection()
    limits: LimitsSection = LimitsSection()
    transfers: TransfersSection = TransfersSection()
    dashboard: DashboardSection = DashboardSection()
    # The appliance's section, the same key and check: ``pas hub backup`` seals every file
    # (the fleet CA's key, hub.sqlite, this file) for the backup key ``recipient`` names.
    backup: BackupSection = BackupSection()

    @property
    def db_path(self) -> Path:
        return self.home / "hub.sqlite"

    @property
    def buckets_dir(self) -> Path:
        return self.home / "buckets"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def archive_dir(self) -> Path:
        return self.home / "archive"

    @property
    def config_path(self) -> Path:
        return self.home / "hub.toml"


def ineffective_settings(settings: HubSettings) -> list[str]:
    """Keys set to what this configuration never uses, each one line naming the key and
    why: ``pas hub config check`` and ``pas hub run`` warn, and run (nothing is wrong with
    the archive link; the operator's belief about it is). ``archive.ca_file`` verifies only
    an ``https://`` dicomweb archive: with the embedded archive, or an ``http://`` url, it
    was taken without a word, and an operator who set it believed the link verified. Users
    of ``dashboard.users`` with ``dashboard.auth = "none"`` guard nothing."""
    lines = []
    if settings.dashboard.users and settings.dashboard.auth == "none":
        lines.append(f"dashboard.users ({', '.join(sorted(settings.dashboard.users))}) has no "
                     'effect: dashboard.auth is "none", the dashboard and /metrics answer '
                     'anyone; set dashboard.auth = "basic" to require them')
    return lines + _ineffective_archive(settings)


def open_dashboard(settings: HubSettings) -> str | None:
    """The warning ``pas hub run`` logs while the dashboard answers anyone (the default)."""
    if settings.dashboard.auth != "none":
        return None
    return ("the fleet dashboard and /metrics answer anyone who reaches "
            f"https://{settings.http.host}:{settings.http.port}/ (dashboard.auth = \"none\"), "
            "and every site of the region reaches that port: set dashboard.auth = \"basic\" "
            "with users made by `pas hub password NAME` (docs/operations.md), or keep the "
            "port's dashboard behind the regional network's access control")


def _ineffective_archive(settings: HubSettings) -> list[str]:
    archive = settings.archive
    lines = []
    given = [key for key in ("username", "password", "bearer_token")
             if getattr(archive, key) is not None]
    if given and archive.kind == "embedded":
        # Credentials of a PACS the hub never calls: the operator believes the region's
        # studies go to that PACS (kind left at its default), and they stay on the hub.
        lines.append(f"archive.{', archive.'.join(given)} has no effect: the archive is "
                     'embedded (archive.kind = "embedded": files on the hub itself, no PACS '
                     'to sign in to); set kind = "dicomweb" and url to archive to a PACS')
    if archive.ca_file is None:
        return lines
    if archive.kind == "embedded":
        why = ('the archive is embedded (archive.kind = "embedded": files on the hub itself, '
               "no connection whose certificate it could verify)")
    elif archive.url and not archive.url.startswith("https://"):
        why = (f"archive.url is http:// ({archive.url}): no TLS, no certificate to verify, "
               "the archive link is not verified")
    else:
        return lines
    return [*lines, f"archive.ca_file ({archive.ca_file}) has no effect: {why}; it verifies "
            "only an https:// dicomweb archive"]


def hub_home(environ: dict[str, str] | None = None) -> Path:
    environ = dict(os.environ) if environ is None else environ
    return Path(environ.get("PAS_HUB_HOME", DEFAULT_HOME))


def home_named(settings: HubSettings, environ: dict[str, str] | None = None) -> bool:
    """Whether ``PAS_HUB_HOME`` or the configuration named the hub's home (else it is
    :data:`DEFAULT_HOME`, in whatever folder the command runs from)."""
    environ = dict(os.environ) if environ is None else environ
    return "PAS_HUB_HOME" in environ or settings.home != Path(DEFAULT_HOME)


def load_hub_settings(path: Path | None = None,
                      environ: dict[str, str] | None = None) -> HubSettings:
    """Defaults, then ``hub.toml`` (:func:`hub_config_path`), then
    ``PAS_HUB_<SECTION>__<KEY>`` variables; validated (ConfigError lists every problem)."""
    environ = dict(os.environ) if environ is None else environ
    data: dict[str, Any] = {"home": str(hub_home(environ))}
    path = hub_config_path(path, environ)
    if path is not None:
        data = deep_merge(data, read_toml(path))
    data = deep_merge(data, env_overrides(environ, HUB_ENV_PREFIX, HubSettings))
    try:
        settings: HubSettings = build(HubSettings, data)
    except ConfigError as exc:  # as the appliance's: a value the unit's environment gave
        # said "http.port: must be an integer, got 'abc'", and its operator searched hub.toml
        raise ConfigError(name_the_variables(exc.problems, environ, HUB_ENV_PREFIX)) from None
    return settings


# The file pas-hub.service runs on (``pas hub run --config /etc/pas/hub.toml``).
SYSTEM_HUB_CONFIG = Path("/etc/pas/hub.toml")


def hub_config_path(path: Path | None = None, environ: dict[str, str] | None = None,
                    system_config: Path = SYSTEM_HUB_CONFIG) -> Path | None:
    """The file :func:`load_hub_settings` reads: ``path``, else ``$PAS_HUB_HOME/hub.toml``
    if present, else ``/etc/pas/hub.toml`` if present, else none (built-in defaults).

    The last is the unit's file. Without it, an operator's ``pas hub backup`` as the docs
    wrote it (``PAS_HUB_HOME=/var/lib/pas-hub``, no ``--config``) found no ``hub.toml`` in
    the home, left the configuration out of the backup without a word, and ``pas hub config
    check`` said the built-in defaults were OK, not the hub's real archive settings."""
    if path is not None:
        return path
    candidate = hub_home(environ) / "hub.toml"
    if candidate.exists():
        return candidate
    return system_config if system_config.is_file() else None


def hub_problems_the_environment_hides(path: Path,
                                       environ: dict[str, str] | None = None) -> list[str]:
    """What is wrong with the file's own values, read without the ``PAS_HUB_*`` overrides
    (``PAS_HUB_HOME`` kept: it names where the file is used): a variable that replaces a
    refused value makes the check say OK, and the day it goes (a drop-in removed, another
    shell) ``pas hub run`` refuses the file. As ``pas config check`` does for the appliance."""
    environ = dict(os.environ) if environ is None else environ
    try:
        build(HubSettings, deep_merge({"home": str(hub_home(environ))}, read_toml(path)))
    except ConfigError as exc:
        return exc.problems
    return []
