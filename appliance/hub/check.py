"""``pas hub config check``: what ``pas hub run`` would refuse at its start, found beforehand.

Owns: the checks of a loaded hub configuration against its home (the archive's CA bundle, the
PKI files, the home's databases), each problem one line starting with the key it comes from.
May not touch: anything on disk (it reads; it creates, migrates and locks nothing), the
network, the port (the running hub holds it while a new version is checked).

Why: a hub's configuration gains refusals from one version to the next (an ``http://``
``archive.url`` beyond loopback, an ``archive.ca_file`` that is no PEM bundle), and its
database's schema only goes forward. Without this, the operator of a hub learnt of them when
the upgraded ``pas hub run`` failed to start; the appliance has had ``pas config check``
(run by ``pas-upgrade`` before it switches) for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.hub.config import HubSettings

# The PKI files pas hub run reads before it serves (pas hub init writes them).
PKI_FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "transfer.key")


@dataclass
class HubCheck:
    """The problems found (each ``key: what is wrong``) and what the summary says."""

    problems: list[str] = field(default_factory=list)
    schemas: list[str] = field(default_factory=list)  # "hub.sqlite schema 12" ...


def check_hub(settings: HubSettings) -> HubCheck:
    """Every problem ``pas hub run`` would stop at with these settings, beyond the ones the
    settings' own validation already refused (those never get here: ConfigError)."""
    found = HubCheck()
    _check_ca_file(settings, found)
    _check_host(settings, found)
    if _check_home(settings, found):
        _check_databases(settings, found)
    return found


def _check_host(settings: HubSettings, found: HubCheck) -> None:
    """``http.host`` must be an address this host can bind: "OK" was said for
    ``999.0.0.1`` (or a name that resolves nowhere), which ``pas hub run`` then refused
    ("Name or service not known"). The port is not tried: the running hub holds it."""
    host = settings.http.host
    if host in ("", "0.0.0.0", "::"):
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None,
                                                              type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError) as exc:
        found.problems.append(f"http.host: {host!r} does not resolve "
                              f"({getattr(exc, 'strerror', None) or exc}): the hub could "
                              "not listen there")
        return
    for address in sorted(addresses):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, 0))  # any port: only whether the address is this host's
                return
            except OSError:
                continue
    found.problems.append(f"http.host: {host!r} is no address of this host "
                          f"({', '.join(sorted(addresses))}): the hub could not listen there")


def check_home_only(path: Path | None, environ: dict[str, str] | None = None) -> HubCheck:
    """The home's checks when the settings themselves were refused (ConfigError), so that
    one run names every problem, as with valid settings: the home and the archive's kind
    taken as load_hub_settings would take them (``PAS_HUB_HOME``, else the file's ``home``;
    ``PAS_HUB_ARCHIVE__KIND``, else the file's), whatever else is wrong in the file."""
    from appliance.config import ConfigError, read_toml
    from appliance.hub.config import (
        DEFAULT_HOME,
        ArchiveSection,
        hub_config_path,
        hub_home,
    )

    environ = dict(os.environ) if environ is None else environ
    data: dict[str, Any] = {}
    config = hub_config_path(path, environ)
    if config is not None:
        with contextlib.suppress(ConfigError, OSError):
            data = read_toml(config)
    archive = data.get("archive") if isinstance(data.get("archive"), dict) else {}
    home = (str(hub_home(environ)) if "PAS_HUB_HOME" in environ
            else data.get("home") if isinstance(data.get("home"), str) else DEFAULT_HOME)
    kind = environ.get("PAS_HUB_ARCHIVE__KIND", archive.get("kind"))
    settings = HubSettings.model_construct(home=Path(home), archive=ArchiveSection.model_construct(
        kind=kind if kind in ("embedded", "dicomweb") else "embedded"))
    found = HubCheck()
    if _check_home(settings, found):
        _check_databases(settings, found)
    return found


def _check_ca_file(settings: HubSettings, found: HubCheck) -> None:
    """The bundle is read as the archive's clients read it (archive_verify), so the words
    are the ones ``pas hub run`` prints (``archive.ca_file PATH: not a readable PEM bundle``).
    Only for the ``dicomweb`` archive, as ``pas hub run``: the embedded one reads no bundle
    and starts whatever the key names."""
    if settings.archive.ca_file is None or settings.archive.kind != "dicomweb":
        return
    from appliance.hub.archive import ArchiveTrustError, archive_verify

    try:
        archive_verify(settings.archive)
    except ArchiveTrustError as exc:
        found.problems.append(str(exc))


def _check_home(settings: HubSettings, found: HubCheck) -> bool:
    """The home holds a hub (its PKI, readable) and can be written in (pas hub run creates
    ``buckets/`` and ``work/`` there, and its database's WAL). Whether the databases are
    worth reading: the home is a folder we can read."""
    home = settings.home
    if not home.is_dir():
        found.problems.append(f"home: {home} is not a folder (no hub there: set PAS_HUB_HOME "
                              "or home, or run pas hub init)")
        return False
    if not os.access(home, os.R_OK | os.X_OK):
        found.problems.append(f"home: {home} cannot be read by this user (uid {os.geteuid()}):"
                              " run the check as the hub's user (sudo -u pas-hub)")
        return False
    if not (home / "ca.crt").exists():
        found.problems.append(f"home: no hub under {home} (no ca.crt): run pas hub init, or "
                              "set PAS_HUB_HOME or home to the hub's home")
        return True
    missing = [name for name in PKI_FILES if not (home / name).is_file()]
    unreadable = [name for name in PKI_FILES
                  if name not in missing and not os.access(home / name, os.R_OK)]
    if missing:
        found.problems.append(f"home: {home} lacks {', '.join(missing)} (pas hub init wrote "
                              "them; put them back from the last hub backup)")
    if unreadable:
        found.problems.append(f"home: {', '.join(unreadable)} in {home} cannot be read by "
                              f"this user (uid {os.geteuid()}): run the check as the hub's "
                              "user, or give them back to it")
    if not os.access(home, os.W_OK):
        found.problems.append(f"home: {home} cannot be written by this user (uid "
                              f"{os.geteuid()}): pas hub run writes its database, buckets/ "
                              "and work/ there")
    return True


def _check_databases(settings: HubSettings, found: HubCheck) -> None:
    """The hub's database, and the embedded archive's index: never of a schema newer than
    this version's (pas hub run refuses it: a newer PAS wrote it), never damaged (refused
    too: restore the last backup). Read only (``mode=ro``); a missing one is created at the
    start, which is no problem."""
    from appliance.store.damage import damage_of
    from appliance.store.hub_schema import HUB_MIGRATIONS
    from appliance.store.ops import schema_version_of
    from appliance.store.schema import MIGRATIONS

    databases = [(settings.db_path, "hub database", len(HUB_MIGRATIONS))]
    if settings.archive.kind == "embedded":
        databases.append((settings.archive_dir / "pas.sqlite",
                          "embedded archive's index", len(MIGRATIONS)))
    for path, what, known in databases:
        if not path.exists():
            continue
        try:
            schema = schema_version_of(path, untouched=True)
            finding = damage_of(path, untouched=True)
        except sqlite3.Error as exc:
            found.problems.append(f"home: the {what} {path} cannot be read ({exc})")
            continue
        name = path.relative_to(settings.home)
        if schema > known:
            found.problems.append(
                f"home: the {what} {path} has schema {schema}, newer than this version "
                f"knows ({known}): a newer PAS wrote it; pas hub run refuses it (install "
                "that version or a later one)")
        elif finding is not None:
            found.problems.append(
                f"home: the {what} {path} is damaged ({finding}): pas hub run refuses it; "
                "restore the hub home from its last backup (pas hub restore FOLDER)")
        else:
            state = "migrated at the start" if schema < known else "current"
            found.schemas.append(f"{name} schema {schema} of {known} ({state})")
