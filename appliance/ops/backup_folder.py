"""A backup folder, written whole or not at all: what ``pas backup`` and ``pas hub backup``
share.

Owns: the folder's life (built under a temporary name, 0700, every file fsynced, renamed to
its final name, so a folder with the final name is whole; ``--keep``'s removal of the oldest
ones), the ``MANIFEST.json`` written in it (each file's size and SHA-256), and copying a
private file with its mode. May not touch: what goes in it (each backup's own module decides,
and copies its databases through :func:`copy_database`), any folder that is not a whole backup
of the same kind and owner (:func:`prune_backups`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.store.damage import damage_of
from appliance.store.db import copy_consistent
from appliance.store.spool import fsync_dir

log = logging.getLogger("pas.backup")

MANIFEST = "MANIFEST.json"
STAMP = r"\d{8}T\d{6}Z"  # utc_stamp()'s shape
# A temporary folder is a backup being written, unless nothing in it changed for this long:
# a backup copies databases of at most a few GB, minutes; a day is a crashed run's leftover.
STALE_PARTIAL_AFTER_S = 24 * 3600


class BackupRefused(Exception):
    """A backup that cannot be written where asked, or of a home that is not what it should
    be; the message names the problem. Nothing was left behind."""


def refuse_another_schema(path: Path, known: int, what: str, service: str, command: str
                          ) -> None:
    """Refuse (:class:`BackupRefused`), before anything is copied, a database of another
    schema than this software's: the package upgraded while the running ``service`` (not
    restarted yet, or stopped) is the version before, which migrates it at its start; or an
    older ``command`` on a newer database. Met on the copy, the refusal named the temporary
    folder's file (removed by then); ``pas backup`` ended in a traceback."""
    from appliance.store.ops import schema_version_of

    try:
        version = schema_version_of(path)
    except sqlite3.Error as exc:
        raise BackupRefused(f"{what} {path} cannot be read ({exc}): no backup written; keep "
                            "the last good backup") from None
    if version < known:
        raise BackupRefused(
            f"{what} {path} is at schema {version}, older than this software's ({known}): "
            f"the {service} service is the version before the upgrade (or stopped); restart "
            f"it (systemctl restart {service}: it migrates the database at its start), then "
            "back up again. No backup written")
    if version > known:
        raise BackupRefused(
            f"{what} {path} is at schema {version}, newer than this software knows ({known}):"
            f" run the {command} of the version the {service} service runs. No backup "
            "written")


def utc_stamp(at: float | None = None) -> str:
    """The UTC time a backup folder's name carries: sorts as it reads."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if at is None else at))


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def copy_private(source: Path, target: Path) -> None:
    """Copy one file with its mode (a private key stays 0600), its parents made 0700."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy2(source, target)


def copy_database(source: Path, target: Path) -> None:
    """A database's consistent copy (:func:`appliance.store.db.copy_consistent`), then
    SQLite's ``quick_check`` of it. The online backup copies pages as they are: a damaged
    database gave a damaged backup that looked whole, the newest, the one that would be
    restored. Refused (:class:`BackupRefused`), naming the damage."""
    copy_consistent(source, target)
    finding = damage_of(target)
    if finding is not None:
        raise BackupRefused(f"{source} is damaged ({finding}): no backup written; keep the "
                            "last good backup, it is the one to restore")


def refuse_inside_home(destination: Path, home: Path, whose: str, why: str) -> None:
    """Refuse (:class:`BackupRefused`) a destination in ``home`` or under it: a backup there
    is lost with the home it is meant to bring back, and ``why`` says what else befalls it
    (the hub empties ``downloads/`` at each start: a backup written there was gone after a
    restart, while the fleet page still named it the last good one)."""
    try:
        inside = destination.resolve().is_relative_to(home.resolve())
    except OSError:
        return  # unreadable: write_backup_folder says what is wrong with it
    if inside:
        raise BackupRefused(f"{destination} is inside {whose} home {home}: a backup there is "
                            f"lost with the home{why}; write it on another disk or a share")


def write_backup_folder(destination: Path, name: str,
                        fill: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """Build ``destination/name`` (0700: a backup holds private keys) and return it with its
    manifest. ``fill(folder)`` copies what the backup holds into ``folder`` and returns the
    manifest's fields; ``files`` (each file's size and SHA-256) is added here.

    Refuses (:class:`BackupRefused`) a destination that is not a folder or cannot be written
    in, and a name that exists. Any failure removes the partial folder."""
    if not destination.is_dir():
        raise BackupRefused(f"{destination} is not a folder"
                            + ("" if destination.exists() else " (it does not exist)"))
    final = destination / name
    if final.exists():
        raise BackupRefused(f"{final} already exists")
    building = destination / _partial_name(name)
    # The same name is the same second: the timer and an operator started together. The
    # other run's temporary folder is its backup being written; removed here (as a crash's
    # leftover), that run went on to write its MANIFEST.json into this one's folder and
    # rename it whole, holding what this one had copied so far.
    if building.is_dir() and not building.is_symlink() and \
            time.time() - _last_written(building, time.time()) > STALE_PARTIAL_AFTER_S:
        shutil.rmtree(building, ignore_errors=True)  # a crashed run's, a day untouched
    try:
        building.mkdir(mode=0o700)
    except FileExistsError:
        raise BackupRefused(f"{destination / name} is being written by another run (started "
                            "the same second): nothing written; run it again") from None
    except OSError as exc:
        raise BackupRefused(f"cannot write in {destination}: {exc.strerror or exc}") from None
    try:
        manifest = fill(building)
        manifest["files"] = {str(p.relative_to(building)): {"bytes": p.stat().st_size,
                                                             "sha256": sha256_of(p)}
                             for p in sorted(building.rglob("*")) if p.is_file()}
        (building / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in building.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        for directory in [building, *(p for p in building.rglob("*") if p.is_dir())]:
            fsync_dir(directory)
        building.rename(final)
        fsync_dir(destination)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return final, manifest


# Where a sealed backup's clear copies are made before they are sealed into the backup
# folder: a hidden folder in the home (0700), on the home's own disk, which already holds the
# same bytes in clear. Made in the destination instead, the clear index would have been
# written to the share (its snapshots keep what was deleted).
STAGING_PREFIX = ".backup-staging-"


def seal_backup(home: Path, building: Path, recipient: str,
                fill_clear: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``fill_clear`` the backup into a private staging folder in ``home``, then seal each
    of its files into ``building`` for ``recipient`` (:mod:`appliance.ops.backup_seal`),
    named ``<path>.sealed``; the staging folder is removed whatever happens. Returns the
    manifest's fields, with ``sealed`` saying the format and the key's fingerprint (what
    ``pas restore`` asks for). :class:`BackupRefused` when the home has no room for the
    clear copy."""
    from appliance.ops.backup_seal import (
        FORMAT,
        SUFFIX,
        fingerprint,
        listing_of,
        new_backup_id,
        parse_recipient,
        seal_file,
    )

    public = parse_recipient(recipient)
    remove_dead_staging(home)
    backup_id = new_backup_id()
    staging = home / f"{STAGING_PREFIX}{os.getpid()}-{time.time_ns()}"
    try:
        staging.mkdir(mode=0o700)
        try:
            manifest = fill_clear(staging)
        except (OSError, sqlite3.Error) as exc:
            raise BackupRefused(f"cannot make the copy to seal in {home} ("
                                f"{getattr(exc, 'strerror', None) or exc}; a sealed backup "
                                "needs room there for a copy of the index): no backup written"
                                ) from None
        try:
            listing = listing_of([str(p.relative_to(staging)) for p in staging.rglob("*")
                                  if p.is_file()])
            for path in sorted(staging.rglob("*")):
                relative = path.relative_to(staging)
                if path.is_dir():
                    (building / relative).mkdir(mode=0o700)
                elif path.is_file():
                    seal_file(path, building / f"{relative}{SUFFIX}", public, str(relative),
                              backup_id, listing)
        except OSError as exc:  # the destination full, gone: one line, not a traceback
            raise BackupRefused(f"cannot write in {building.parent}: {exc.strerror or exc}: "
                                "no backup written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest["sealed"] = {"format": FORMAT, "key": fingerprint(public), "backup_id": backup_id}
    return manifest


def remove_dead_staging(home: Path) -> list[Path]:
    """Remove the staging folders (:data:`STAGING_PREFIX`) of backups that are not running
    any more: their process is gone (killed while it copied), or, its pid unreadable,
    nothing in them changed for a day. Each holds a clear copy of the index, the size of
    the index. Called by each sealed backup and at the daemon's start. Returns those
    removed."""
    now = time.time()
    removed = []
    for entry in home.glob(STAGING_PREFIX + "*"):
        if not entry.is_dir() or entry.is_symlink():
            continue
        pid = entry.name[len(STAGING_PREFIX):].split("-", 1)[0]
        alive = pid.isdigit() and _process_alive(int(pid))
        if not alive or now - _last_written(entry, now) > STALE_PARTIAL_AFTER_S:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# A sealed backup opened by pas restore before it is put back (appliance/ops/restore.py):
# in the home (the disk the index goes to, and one that holds it in clear already), never in
# the backup's folder (a share).
OPENING = ".backup-opening"


def remove_clear_leftovers(home: Path) -> list[Path]:
    """What a killed sealed backup or restore left in the home in clear (a copy of the
    index): the staging folders of backups no longer running, and the folder a restore
    opened a backup into. The caller holds the home's lock (the daemon at its start: no
    restore runs then). Left, they stayed until the next sealed backup or restore, one the
    size of the index."""
    removed = remove_dead_staging(home)
    opening = home / OPENING
    if opening.is_dir() and not opening.is_symlink():
        shutil.rmtree(opening, ignore_errors=True)
        removed.append(opening)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: alive
    return True


def _partial_name(name: str) -> str:
    return f".{name}.partial"


def _removing_name(name: str) -> str:
    return f".{name}.removing"


@dataclass
class Pruned:
    """What ``--keep N`` did in a backup folder, by folder name."""

    keep: int
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # Temporary folders of crashed runs (nothing written in them for a day).
    stale_partials_removed: list[str] = field(default_factory=list)
    # Named like a backup of this kind, but without the MANIFEST.json saying so: not ours.
    left_alone: list[str] = field(default_factory=list)
    # Ours, but stamped after the one just written: another run's that finished first, or
    # one written while the clock was ahead. Not this run's to remove, nor counted in N.
    newer_left_alone: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "kept": self.kept, "removed": self.removed,
                "stale_partials_removed": self.stale_partials_removed,
                "left_alone": self.left_alone, "newer_left_alone": self.newer_left_alone,
                "problems": self.problems}


@dataclass
class WrittenBackup:
    """A whole backup folder just written (``pas backup`` or ``pas hub backup``): where it
    is, its manifest, and what ``--keep N`` removed around it (None without ``--keep``)."""

    folder: Path
    manifest: dict[str, Any]
    pruned: Pruned | None = None


def prune_backups(just_written: Path, prefix: str, same: dict[str, Any], keep: int,
                  now: float | None = None) -> Pruned:
    """Keep the ``keep`` newest whole backups named ``<prefix><UTC stamp>`` in
    ``just_written``'s folder, ``just_written`` always among them; remove the older ones.
    One stamped after ``just_written`` (another run's, finished first) is left alone.

    A backup folder is only ever removed when it is one PAS wrote of the same kind and owner:
    its final name (so it was renamed whole) and a ``MANIFEST.json`` whose fields equal
    ``same`` (the kind and site, or the hub's CA). Anything else in the folder, a foreign
    folder, a backup of another site or kind, is left alone. A temporary folder
    (``.<name>.partial``) is a backup being written by another run, and is left alone too,
    unless nothing in it changed for :data:`STALE_PARTIAL_AFTER_S` (a crashed run's
    leftover, removed). A folder is renamed to ``.<name>.removing`` before its files go, so a
    removal cut short never leaves a partial backup under a whole one's name; such leftovers
    are removed by the next run. Failures are collected in ``problems``, not raised: the
    backup just written stands."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    destination = just_written.parent
    now = time.time() if now is None else now
    whole = re.compile(re.escape(prefix) + STAMP)
    partial = re.compile(re.escape("." + prefix) + STAMP + re.escape(".partial"))
    removing = re.compile(re.escape("." + prefix) + STAMP + re.escape(".removing"))
    pruned = Pruned(keep)
    ours: list[Path] = []
    stale: list[Path] = []
    leftovers: list[Path] = []
    for entry in sorted(destination.iterdir()):
        if entry == just_written or entry.is_symlink() or not entry.is_dir():
            continue
        if whole.fullmatch(entry.name):
            if _manifest_says(entry, same):
                ours.append(entry)
            else:
                pruned.left_alone.append(entry.name)
        elif partial.fullmatch(entry.name):
            if now - _last_written(entry, now) > STALE_PARTIAL_AFTER_S:
                stale.append(entry)
        elif removing.fullmatch(entry.name):
            leftovers.append(entry)
    # Two runs at once (the timer and an operator), each --keep 1: each would remove the
    # other's whole backup, and neither was left. A run removes only what is older than its
    # own backup; the stamp sorts as it reads (the same prefix): newest first.
    pruned.newer_left_alone = sorted(p.name for p in ours if p.name > just_written.name)
    ours = sorted((p for p in ours if p.name < just_written.name),
                  key=lambda p: p.name, reverse=True)
    kept, older = ours[:keep - 1], ours[keep - 1:]
    pruned.kept = [just_written.name, *(p.name for p in kept)]
    for folder in older:
        if _remove(folder, destination / _removing_name(folder.name), pruned):
            pruned.removed.append(folder.name)
    for folder in stale:
        if _remove(folder, folder, pruned):
            pruned.stale_partials_removed.append(folder.name)
    for folder in leftovers:
        _remove(folder, folder, pruned)
    for name in pruned.removed:
        log.info("backup %s removed (--keep %d: older than the %d kept)",
                 destination / name, keep, len(pruned.kept))
    for name in pruned.stale_partials_removed:
        log.info("temporary folder %s of a backup that stopped before its end removed "
                 "(nothing written in it for a day)", destination / name)
    for problem in pruned.problems:
        log.warning("--keep %d: %s", keep, problem)
    return pruned


def _manifest_says(folder: Path, same: dict[str, Any]) -> bool:
    """Whether ``folder/MANIFEST.json`` is a backup manifest with every field of ``same``."""
    manifest_path = folder / MANIFEST
    if manifest_path.is_symlink():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
            and all(manifest.get(key) == value for key, value in same.items()))


def _last_written(folder: Path, now: float) -> float:
    """The newest modification time in ``folder`` (a database being copied into it changes
    its file's, not the folder's); ``now`` when it cannot be read (being renamed: alive)."""
    try:
        newest = folder.lstat().st_mtime
        for root, dirs, files in os.walk(folder):
            for name in (*dirs, *files):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    except OSError:
        return now
    return newest


def _remove(folder: Path, renamed: Path, pruned: Pruned) -> bool:
    """Rename ``folder`` out of a whole backup's name, then remove it. A folder another run
    removed meanwhile is not a problem."""
    try:
        if renamed != folder:
            folder.rename(renamed)
        shutil.rmtree(renamed)
    except FileNotFoundError:
        return False
    except OSError as exc:
        pruned.problems.append(f"could not remove {folder}: {exc.strerror or exc}")
        return False
    return True
