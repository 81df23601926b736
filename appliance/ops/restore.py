"""``pas restore``: a ``pas backup`` folder put back in the home, checked before anything
changes.

Owns: deciding whether a backup folder may be restored on this appliance, and putting its
index and enrolment in place. May not touch: the spool (start-up recovery reconciles it with
the restored index: files received since are adopted, indexed ones gone are flagged), the
configuration file (``/etc/pas`` is the operator's; the backup's copy is named for them).

Why a command: the restore was a copy by hand, checked by nothing. Another site's backup
(the backups of a region's sites side by side on one share) started without a word, and the
appliance then spoke to the hub with the other site's certificate, as that site; a backup
written by a newer version stopped the start with a traceback; a truncated or damaged file
was found only once the home's own index had been overwritten. Each is refused here, in one
line naming the problem, before anything in the home is touched. What the home held is set
aside, never deleted: ``pas.sqlite.before-restore-<UTC time>``, ``pki.before-restore-<UTC
time>``.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import Settings, site_origin
from appliance.ops.backup import KIND, MADE_AT_FORMAT
from appliance.ops.backup_folder import MANIFEST, sha256_of
from appliance.store import backups
from appliance.store.damage import SIDE_FILES, damage_of
from appliance.store.db import Database
from appliance.store.ops import schema_version_of
from appliance.store.schema import MIGRATIONS
from appliance.store.spool import fsync_dir

ASIDE = "before-restore"


class RestoreRefused(Exception):
    """A backup folder that may not be restored here; the message names the problem.
    Nothing in the home was changed."""


@dataclass
class Restored:
    manifest: dict[str, Any]
    index_set_aside: Path | None
    pki_set_aside: Path | None
    config_in_backup: Path | None


def check_backup(settings: Settings, folder: Path) -> dict[str, Any]:
    """The backup's manifest, once the folder is found to be a whole ``pas backup`` of this
    site that this software can run (one written before manifests said their kind too:
    :func:`check_kind`): each file its manifest names, with its size and SHA-256; an index
    SQLite finds sound, of a schema this version knows. Raises :class:`RestoreRefused`
    naming the first problem."""
    manifest = read_manifest(folder)
    check_kind(folder, manifest)
    if not _of_this_site(settings, folder, manifest):
        origin = site_origin(settings)
        raise RestoreRefused(
            f"{folder} is the backup of site {_backup_site(folder, manifest)!r}, and this "
            f"appliance is site {settings.site!r} ({ORIGIN_WORDS[origin]}): restored, it "
            f"would speak to the hub as that site. Restore a pas-backup-{settings.site}-... "
            "folder (or put this site's configuration back first). Nothing restored")
    made_at(folder, manifest)
    files = manifest.get("files")
    if not isinstance(files, dict) or "pas.sqlite" not in files:
        raise RestoreRefused(f"{folder}/{MANIFEST} names no pas.sqlite: not a whole backup; "
                             "nothing restored")
    for name, entry in sorted(files.items()):
        check_file(folder, name, entry)
    index = folder / "pas.sqlite"
    known = len(MIGRATIONS)
    try:
        schema = schema_version_of(index)
        finding = damage_of(index)
    except sqlite3.Error as exc:
        raise RestoreRefused(f"{index} cannot be read ({exc}): nothing restored") from None
    if schema > known:
        raise RestoreRefused(
            f"{folder} was written by a newer PAS (version {manifest.get('software')}, index "
            f"schema {schema}; this one knows {known}): install that version or a later one, "
            "then restore. Nothing restored")
    if finding is not None:
        raise RestoreRefused(f"{index} is damaged ({finding}): restore an older backup. "
                             "Nothing restored")
    return manifest


# What the manifest of every pas backup has held, before it said its kind (2026-12-05, with
# --keep) and since (appliance.ops.backup._manifest); "files" names its pas.sqlite. A hub's
# has no site, and names hub.sqlite.
OLDER_MANIFEST_KEYS = ("site", "made_at", "software", "schema", "instances", "studies", "files")
HUB_KIND = "pas hub backup"  # appliance.hub.backup.KIND: pas hub restore puts it back


def check_kind(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse (:class:`RestoreRefused`) a folder whose manifest is not a ``pas backup``'s:
    its ``kind`` says so, or, written before manifests said their kind, it has what a
    ``pas backup`` manifest had (:data:`OLDER_MANIFEST_KEYS`, a ``pas.sqlite`` among its
    files). Until 2026-12-06 every backup written before 2026-12-05 was refused as "kind
    None"."""
    kind = manifest.get("kind")
    if kind == KIND:
        return
    if kind == HUB_KIND:
        raise RestoreRefused(f"{folder} is a hub's backup (its {MANIFEST} says kind "
                             f"{HUB_KIND!r}), not an appliance's: pas hub restore puts it back "
                             "on the hub; nothing restored")
    if kind is not None:
        raise RestoreRefused(f"{folder} is not a pas backup (its {MANIFEST} says kind "
                             f"{kind!r}): nothing restored")
    files = manifest.get("files")
    lacking = [key for key in OLDER_MANIFEST_KEYS if key not in manifest]
    if not lacking and not (isinstance(files, dict) and "pas.sqlite" in files):
        lacking = ["pas.sqlite in files"]
    if lacking:
        raise RestoreRefused(f"{folder} is not a pas backup: its {MANIFEST} names no kind, "
                             "nor has it what an older pas backup's has (no "
                             f"{', '.join(lacking)}): nothing restored")


# How a refusal says where this appliance's site comes from (appliance.config.site_origin).
ORIGIN_WORDS = {"configuration": "site in its configuration",
                "enrolment": "its enrolment's; its configuration names no site",
                "default": "the default: its configuration names no site and it is not "
                           "enrolled"}


def _backup_site(folder: Path, manifest: dict[str, Any]) -> str | None:
    """The site a backup is of: its manifest's. A backup written before manifests said
    where the name came from ("site_from") whose site is the default "PAS" was of a
    configuration that named none: its enrolment's certificate (if it holds one) says
    which site it is, as the appliance now takes that name."""
    site = manifest.get("site")
    if "site_from" not in manifest and site == "PAS":
        from appliance.transfer.enrolment import certificate_cn

        return certificate_cn(folder / "pki" / "client.crt") or site
    return site if isinstance(site, str) else None


def _of_this_site(settings: Settings, folder: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``folder`` may be restored on this appliance as far as its site goes. Its
    site must be this appliance's (the configuration's, else the enrolment's), or, on an
    appliance with no name yet (the configuration names none, not enrolled: a new disk),
    one no configuration named: the backup's enrolment then names the appliance, as a
    backup of such a configuration was always restored there. A backup whose
    configuration named its site needs that configuration back first, as before."""
    if site_origin(settings) == "default":
        named_by = manifest.get("site_from")
        if named_by in ("enrolment", "default") or (
                named_by is None and manifest.get("site") == "PAS"):
            return True
    return _backup_site(folder, manifest) == settings.site


def restore_backup(settings: Settings, folder: Path, actor: str,
                   at: float | None = None) -> Restored:
    """Check ``folder`` (:func:`check_backup`), then, holding the home's lock (``HomeInUse``
    while a daemon runs), set the home's index and enrolment aside and put the backup's in
    their place (modes kept: the key stays 0600). The restored index's audit trail says who
    restored which backup; the next start reconciles it with the spool."""
    from appliance.ops.home_lock import hold_home_lock

    manifest = check_backup(settings, folder)
    home = settings.home
    lock = hold_home_lock(home)
    try:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if at is None else at))
        index_aside = set_index_aside(settings.db_path, stamp)
        incoming = home / ".pas.sqlite.restoring"
        shutil.copy2(folder / "pas.sqlite", incoming)
        with open(incoming, "rb") as handle:
            os.fsync(handle.fileno())
        incoming.rename(settings.db_path)
        pki_aside = None
        if (home / "pki").exists():
            pki_aside = home / f"pki.{ASIDE}-{stamp}"
            (home / "pki").rename(pki_aside)
        has_pki = (folder / "pki").is_dir()
        if has_pki:
            shutil.copytree(folder / "pki", home / "pki")  # copy2: each file's mode kept
            (home / "pki").chmod(0o700)
        fsync_dir(home)
        restored = Database(settings.db_path)  # migrated here when the backup is older
        try:
            # The backup's own export row is not in its index (written after the copy): the
            # restore says which backup this index now is, for pas status and pas doctor.
            backups.record_restore(
                restored, made_at=made_at(folder, manifest), folder=folder.resolve(),
                actor=actor,
                detail=f"pas restore: the index{' and the enrolment' if has_pki else ''} "
                       f"of {folder} "
                       f"(written {manifest.get('made_at')})"
                       + (f"; the home's index set aside as {index_aside.name}"
                          if index_aside else ""))
        finally:
            restored.close()
        # What SQLite reads now, the file and any WAL beside it: the backup's index as it
        # was checked, with the restore's row.
        finding = damage_of(settings.db_path, untouched=True)
        if finding is not None:
            raise RestoreRefused(
                f"the restored index {settings.db_path} is damaged once in place ({finding}): "
                f"the home's index before is {index_aside or 'not there (there was none)'}; "
                "restore an older backup")
    finally:
        lock.close()
    config_name = manifest.get("config_file")
    config = folder / Path(config_name).name if config_name else None
    return Restored(manifest, index_aside, pki_aside,
                    config if config is not None and config.is_file() else None)


def set_index_aside(path: Path, stamp: str) -> Path | None:
    """Rename the home's index and its ``-wal`` and ``-shm`` to
    ``<name>.before-restore-<stamp>[-<n>][-wal|-shm]`` (``-<n>``: a name already taken,
    never replaced); the new name of the index, or of its WAL when only that was there, or
    None when there was nothing. A WAL (and its ``-shm``) left without its index is set
    aside too: the daemon killed, then ``pas.sqlite`` moved by hand. Left in the home, SQLite
    replayed it into the restored index at its first open (pages of another database over
    the backup's): the restore said it was done, and the index was malformed, or silently
    the old one."""
    present = [side for side in ("", *SIDE_FILES) if path.with_name(path.name + side).exists()]
    if not present:
        return None
    target = path.with_name(f"{path.name}.{ASIDE}-{stamp}")
    taken = 1
    while any(target.with_name(target.name + side).exists() for side in ("", *SIDE_FILES)):
        taken += 1
        target = path.with_name(f"{path.name}.{ASIDE}-{stamp}-{taken}")
    for side in reversed(present):  # the database last: it is what marks the index there
        path.with_name(path.name + side).rename(target.with_name(target.name + side))
    return target.with_name(target.name + present[0])


def made_at(folder: Path, manifest: dict[str, Any]) -> float:
    """When the backup was written, from its manifest (``made_at``, UTC, as ``pas backup``
    writes it): the time ``pas status`` and ``pas doctor`` give the last backup once it is
    restored. Raises :class:`RestoreRefused` when it is not such a time."""
    written = manifest.get("made_at")
    try:
        return float(calendar.timegm(time.strptime(str(written), MADE_AT_FORMAT)))
    except ValueError:
        raise RestoreRefused(f"{folder}/{MANIFEST}: made_at {written!r} is not a UTC time "
                             "(YYYY-MM-DDTHH:MM:SSZ): the manifest is damaged; nothing "
                             "restored") from None


def read_manifest(folder: Path, what: str = "pas backup") -> dict[str, Any]:
    """A backup folder's ``MANIFEST.json`` (``what``: the kind of backup, for the refusal),
    or :class:`RestoreRefused` naming why it cannot be read. ``pas hub restore`` reads its
    backups' through it too."""
    if not folder.is_dir():
        raise RestoreRefused(f"{folder} is not a folder"
                             + ("" if folder.exists() else " (it does not exist)"))
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise RestoreRefused(f"{folder} holds no {MANIFEST}: not a {what} (or one cut "
                             "short); nothing restored") from None
    except (OSError, ValueError) as exc:
        raise RestoreRefused(f"{folder}/{MANIFEST} cannot be read ({exc}): the backup is "
                             "damaged; nothing restored") from None
    if not isinstance(manifest, dict):
        raise RestoreRefused(f"{folder}/{MANIFEST} is not a backup manifest: nothing restored")
    return manifest


def check_file(folder: Path, name: str, entry: Any) -> None:
    """One file the manifest names: inside the folder, there, of its size and SHA-256."""
    path = folder / name
    if not isinstance(entry, dict) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise RestoreRefused(f"{folder}/{MANIFEST}: entry {name!r} is not a backup file's: "
                             "nothing restored")
    if not path.is_file():
        raise RestoreRefused(f"{path} is missing (the manifest names it): the backup is not "
                             "whole; nothing restored")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise RestoreRefused(f"{path} is {size} bytes, the manifest says {entry.get('bytes')}"
                             " (truncated or damaged): restore an older backup. Nothing "
                             "restored")
    if sha256_of(path) != entry.get("sha256"):
        raise RestoreRefused(f"{path} does not have the SHA-256 the manifest gives (damaged)"
                             ": restore an older backup. Nothing restored")
