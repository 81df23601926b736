"""``pas hub backup``: what a rebuilt hub host needs that no other place holds.

Owns: the hub backup's content and its manifest. May not touch: the live hub's state (the
backup only reads it; it edits its own copy), the bucket files, the embedded archive's image
files.

What is copied, while ``pas hub run`` serves:
- ``hub.sqlite`` through SQLite's online backup API (one moment, without stopping the hub;
  ``cp`` of a WAL database being written can be torn), the copy checked with ``quick_check``
  (:func:`appliance.ops.backup_folder.copy_database`: a damaged one is refused, not copied):
  enrolment tokens, issued certificates and their revocations, transfers with their signed
  receipts, the fleet's heartbeats;
- the PKI files of the home, modes kept (0600): the fleet CA's key and certificate (lost, every
  appliance of the region must be enrolled again: each one pins that CA), the server key and
  certificate (receipts are signed with it), the X25519 transfer key (buckets sealed for it);
- the hub's configuration file, when there is one;
- with the ``embedded`` archive, its index (``archive/pas.sqlite``, same online copy, taken
  after ``hub.sqlite``: every instance the hub says was archived is in it).

Not copied, and why:
- the staging of transfers not committed (``buckets/``, ``work/``): their sites still hold the
  instances (nothing is evicted before a receipt, invariant 2) and send them again. The copy of
  ``hub.sqlite`` says so: those transfers are marked expired, as abandoned ones are
  (:func:`appliance.store.hub.forget_staging_in_copy`), so a restored hub answers "no bucket
  held" instead of promising buckets whose files are not there;
- ``downloads/``: answers being packed for a site, remade on its next request;
- the embedded archive's files (``archive/spool``): the region's images, terabytes, written
  once each and never changed: the storage's backup (snapshots, rsync, a second disk) is the
  tool for them, as for an appliance's spool.

With ``backup.recipient`` set, every file is sealed for that backup key
(:func:`appliance.ops.backup_folder.seal_backup`, :mod:`appliance.ops.backup_seal`): the clear
copy is made in a hidden folder of the hub's home (``.backup-staging-...``, removed after),
each file sealed from it into the backup as ``<name>.sealed``, the manifest (in clear: counts,
versions, the CA fingerprint ``--keep`` compares) saying ``sealed`` (the format, the key's
fingerprint, the backup's random id its files are bound to). In clear, whoever reads the
backup folder (a share, its snapshots) holds the fleet CA's key; ``pas hub run`` warns
(:func:`backup_sealing`).

The hub has no audit trail: the export is one WARNING log line (journald under systemd) naming
who wrote which folder, as the hub logs its other refusals and admin events. Once the folder
has its final name (whole), the LIVE ``hub.sqlite`` records when, where and by whom
(:func:`appliance.store.hub.record_hub_backup`, migration 7): the hub's ``/metrics``
(``pas_hub_backup_age_seconds``, alert ``PasHubBackupOld``) and ``/fleet`` read it, so a
stopped ``pas-hub-backup.timer`` is seen before a restore is needed. A backup refused records
nothing; the copy inside the backup keeps the record as it was before (``pas hub restore``
names this backup in the copy it puts back: :func:`appliance.store.hub.name_restored_backup`).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.hub.config import HubSettings
from appliance.hub.pki import HubPKI
from appliance.ops.backup_folder import (
    MANIFEST,
    BackupRefused,
    WrittenBackup,
    copy_database,
    copy_private,
    prune_backups,
    refuse_another_schema,
    refuse_inside_home,
    seal_backup,
    utc_stamp,
    write_backup_folder,
)
from appliance.store import fleet, hub, index
from appliance.store.db import Database, DatabaseUnavailable
from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.store.schema import MIGRATIONS
from appliance.words import counted

log = logging.getLogger("pas.hub.backup")

ARCHIVE_INDEX = "archive/pas.sqlite"


KIND = "pas hub backup"
PREFIX = "pas-hub-backup-"


def pki_files(pki: HubPKI) -> list[Path]:
    """The PKI files of a hub home, as a backup holds them (and a restore puts them back)."""
    return [pki.ca_key_path, pki.ca_cert_path, pki.server_key_path, pki.server_cert_path,
            pki.transfer_key_path, pki.transfer_pub_path]


def check_hub_home(settings: HubSettings) -> None:
    """Refuse a home that is missing or is not a hub's (no CA, no database): a backup of
    the wrong folder would look whole and restore nothing."""
    home = settings.home
    hint = "set PAS_HUB_HOME or --config to the hub's home"
    if not home.is_dir():
        raise BackupRefused(f"no hub home at {home}: {hint}")
    from appliance.hub.restore import restore_under_way

    if (half_restored := restore_under_way(home)) is not None:  # never a backup of that
        raise BackupRefused(f"{half_restored}: no backup written")
    pki = HubPKI(home)
    for needed in (pki.ca_cert_path, pki.ca_key_path, settings.db_path):
        if not needed.is_file():
            raise BackupRefused(f"{home} is not a hub's home: no {needed.name} "
                                f"(pas hub init creates it; {hint})")


def check_schemas(settings: HubSettings) -> None:
    """The hub database and the embedded archive's index, of this software's schema
    (:func:`refuse_another_schema`: a hub not restarted since the upgrade is refused, saying
    so, before anything is copied)."""
    refuse_another_schema(settings.db_path, len(HUB_MIGRATIONS), "the hub database", "pas-hub",
                          "pas hub backup")
    archive_index = settings.archive_dir / "pas.sqlite"
    if settings.archive.kind == "embedded" and archive_index.is_file():
        refuse_another_schema(archive_index, len(MIGRATIONS), "the embedded archive's index",
                              "pas-hub", "pas hub backup")


def make_hub_backup(settings: HubSettings, config_file: Path | None, destination: Path,
                    actor: str, at: float | None = None, keep: int | None = None) -> WrittenBackup:
    """Write ``destination/pas-hub-backup-<UTC time>/`` (0700) in the home's own layout, so
    that restoring is putting its files back (``pas hub restore``); return it with its
    manifest. Refuses (:class:`BackupRefused`, nothing left behind) a home that is not a
    hub's, a destination that is not a folder or cannot be written in.

    ``keep``: once the backup is whole, the older backups of this hub in ``destination``
    beyond the ``keep`` newest are removed. "This hub" is its fleet CA's fingerprint in the
    manifest: a backup of another hub (or of this host before ``pas hub init`` made a new CA:
    the only copy of the old CA's key) is never removed.

    Once whole, the backup is recorded in the live ``hub.sqlite`` (its time is ``at``, the
    moment copied); :class:`BackupNotRecorded` when that fails (nothing pruned then)."""
    check_hub_home(settings)
    check_schemas(settings)
    destination = destination.absolute()  # the log line and the manifest name it whole
    refuse_inside_home(destination, settings.home, "the hub's",
                       " (and the hub empties downloads/ at each start)")
    config = config_file if config_file is not None else settings.config_path
    pki = HubPKI(settings.home)
    made_at = time.time() if at is None else at

    def fill_clear(building: Path) -> dict[str, Any]:
        copy_database(settings.db_path, building / settings.db_path.name)
        staged = hub.forget_staging_in_copy(building / settings.db_path.name, made_at)
        archive: dict[str, Any] = {"kind": settings.archive.kind}
        archive_index = settings.archive_dir / "pas.sqlite"
        if settings.archive.kind == "embedded" and archive_index.is_file():
            (building / ARCHIVE_INDEX).parent.mkdir(mode=0o700)
            copy_database(archive_index, building / ARCHIVE_INDEX)
            archive.update(_archive_totals(building / ARCHIVE_INDEX))
            archive["not_in_backup"] = "archive/spool (the images: the storage's backup)"
        elif settings.archive.kind == "dicomweb":
            archive["url"] = settings.archive.url
        missing = []
        for path in pki_files(pki):
            if path.is_file():
                copy_private(path, building / path.name)
            else:
                missing.append(path.name)
        if config.is_file():
            copy_private(config, building / config.name)
        return {
            "kind": KIND,
            "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(made_at)),
            "software": __version__,
            "home": str(settings.home.absolute()),
            "config_file": str(config.absolute()) if config.is_file() else None,
            "ca_fingerprint": pki.ca_fingerprint(),
            **_hub_totals(building / settings.db_path.name),
            # Marked expired in the copy: their sites send their buckets again.
            "transfers_staging_not_in_backup": staged,
            "archive": archive,
            "missing": missing,
        }

    def fill_staging(staging: Path) -> dict[str, Any]:
        try:
            return fill_clear(staging)
        except sqlite3.DatabaseError as exc:  # damage said as in clear; a full home, as room
            if not _damaged(exc):
                raise  # seal_backup: "cannot make the copy to seal in HOME (...)"
            raise _unreadable(exc) from None

    def fill(building: Path) -> dict[str, Any]:
        if not settings.backup.recipient:
            return fill_clear(building)
        # Sealed (appliance/ops/backup_seal.py): the clear copy is made in a hidden folder
        # of the hub's home, never in the destination, each of its files sealed from there
        # into the backup folder as <name>.sealed; the manifest says "sealed".
        return seal_backup(settings.home, building, settings.backup.recipient, fill_staging)

    try:
        final, manifest = write_backup_folder(destination,
                                              PREFIX + utc_stamp(made_at), fill)
    except sqlite3.DatabaseError as exc:  # a damaged database: the copy stopped on it
        raise _unreadable(exc) from None
    log.warning("hub backup written to %s by %s on %s: the fleet CA and keys, the database "
                "(%s enrolled, %s committed)%s, %s", final, actor, socket.gethostname(),
                counted(manifest["sites_enrolled"], "site"),
                counted(manifest["transfers_committed"], "transfer"),
                ", the configuration" if manifest["config_file"] else "",
                sealed_words(manifest), extra={"ACTOR": actor, "TARGET": str(final)})
    _record_in_live_hub(settings.db_path, made_at, final, actor)
    pruned = None if keep is None else prune_backups(
        final, PREFIX, {"kind": KIND, "ca_fingerprint": manifest["ca_fingerprint"]}, keep)
    return WrittenBackup(final, manifest, pruned)


def _staging_bytes(settings: HubSettings) -> int:
    """What the clear copy a sealed backup seals from takes in the home, at most: each
    database with its WAL (the copy holds the pages the WAL adds, the file alone counted
    only those checkpointed), the PKI files, the configuration."""
    files = []
    for database in (settings.db_path, settings.archive_dir / "pas.sqlite"):
        files += [database, database.with_name(database.name + "-wal")]
    files += pki_files(HubPKI(settings.home))
    files.append(settings.config_path)
    return sum(path.stat().st_size for path in files if path.is_file())


def backup_sealing(settings: HubSettings, last_folder: str | None) -> tuple[str, str]:
    """The hub's "backup sealing" check, as ``pas doctor``'s on an appliance
    (:func:`appliance.ops.doctor_backup.check_backup_sealing`; ``pas hub run`` logs it at
    its start):
    ("ok", the key) or ("warn", what is wrong and what to do). In clear, a hub backup gives
    whoever reads its folder the fleet CA's private key. With ``backup.recipient`` set, the
    last backup (``last_folder``, the live database's record) is looked at too, one written
    in clear before it was set or sealed for another key is still on the share, and the
    room the clear copy a sealed backup seals from needs in the home."""
    if not settings.backup.recipient:
        return ("warn", "hub backups are written in clear: the fleet CA's private key (whoever "
                "has it issues certificates every appliance of the region trusts), the "
                "server and transfer keys and hub.sqlite, for anyone who can read the backup "
                "folder; make a backup key off the hub (pas backup-key FILE, FILE in the "
                "region's vault) and put the recipient it prints in [backup] of the hub's "
                'configuration (docs/operations.md, "Backing up the hub")')
    from appliance.ops.backup_seal import fingerprint, parse_recipient

    key = fingerprint(parse_recipient(settings.backup.recipient))
    problems = []
    manifest = _manifest_of(Path(last_folder)) if last_folder else None
    if manifest is not None:
        sealed = manifest.get("sealed")
        if not isinstance(sealed, dict):
            problems.append(f"the last hub backup, {last_folder}, is in clear (written before "
                            "backup.recipient was set): the next one is sealed; then remove "
                            "the backups in clear")
        elif sealed.get("key") != key:
            problems.append(f"the last hub backup, {last_folder}, is sealed for the backup key "
                            f"{sealed.get('key')}, not {key} (backup.recipient changed): keep "
                            f"the private key of {sealed.get('key')} until its backups are "
                            "gone")
    from appliance.ops.status import human_size

    try:
        needed = _staging_bytes(settings)
        free = shutil.disk_usage(settings.home).free
    except OSError:
        needed = free = 0
    if needed and free < needed:
        problems.append(f"{human_size(free)} free in {settings.home}, a sealed backup's clear "
                        f"copy there needs {human_size(needed)} (its databases with their "
                        "WAL, keys and configuration): it is refused; free room on the hub "
                        "home's disk")
    if problems:
        return ("warn", "hub backups are sealed for the backup key " + key + ", but "
                + "; ".join(problems))
    return ("ok", f"hub backups are sealed for the backup key {key}")


def _manifest_of(folder: Path) -> dict[str, Any] | None:
    """A backup folder's manifest, when this user can read it (gone, or another user's: the
    backup's age is the fleet page's and PasHubBackupOld's to say)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def sealed_words(manifest: dict[str, Any]) -> str:
    """How a hub backup's files were written, as ``pas hub backup`` and its log line say."""
    sealed = manifest.get("sealed")
    if sealed:
        return f"sealed for the backup key {sealed['key']}"
    return ("in clear (backup.recipient is not set: the fleet CA's key is readable in the "
            "folder; docs/operations.md, \"Backing up the hub\")")


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite's error says the database is damaged (corrupt, not a database), not
    that a disk is full or cannot be written (those reach their own refusal)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _unreadable(exc: sqlite3.DatabaseError) -> BackupRefused:
    return BackupRefused(f"the hub database cannot be read whole ({exc}): no backup written; "
                         "keep the last good backup, it is the one to restore")


class BackupNotRecorded(Exception):
    """The backup folder is whole, but the live ``hub.sqlite`` could not record it (the
    hub's backup age goes on counting from the previous one); the message names both."""


def _record_in_live_hub(db_path: Path, written_at: float, folder: Path, actor: str) -> None:
    """Note the whole backup in the live database, the hub serving meanwhile (WAL: its
    readers go on; the one short write waits for the hub's behind the busy timeout). The
    copy just checked had this software's schema, so opening the live one migrates
    nothing."""
    try:
        live = Database(db_path, HUB_MIGRATIONS)
        try:
            hub.record_hub_backup(live, written_at, folder, actor)
        finally:
            live.close()
    except (sqlite3.Error, RuntimeError, OSError) as exc:
        log.error("hub backup %s is whole, but %s could not record it (%s): the hub's backup "
                  "age does not count it", folder, db_path, exc)
        raise BackupNotRecorded(f"hub backup written to {folder}, but {db_path} could not "
                                f"record it ({exc}): pas_hub_backup_age_seconds and /fleet "
                                "still count from the previous backup") from None


def _hub_totals(copy_path: Path) -> dict[str, Any]:
    try:
        copy = Database(copy_path, HUB_MIGRATIONS, readonly=True)
    except DatabaseUnavailable as exc:
        raise BackupRefused(str(exc)) from None
    try:
        return {"schema": copy.schema_version(), **hub.backup_counts(copy),
                "fleet_sites": len(fleet.list_sites(copy)),
                "heartbeats": fleet.heartbeat_count(copy)}
    finally:
        copy.close()


def _archive_totals(copy_path: Path) -> dict[str, Any]:
    try:
        copy = Database(copy_path, readonly=True)
    except DatabaseUnavailable as exc:
        raise BackupRefused(f"the embedded archive's index: {exc}") from None
    try:
        totals = index.totals(copy)
        return {"schema": copy.schema_version(), "instances": totals["instances"],
                "studies": totals["studies"], "bytes": totals["bytes"]}
    finally:
        copy.close()
