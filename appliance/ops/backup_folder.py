"""A backup folder, written whole or not at all: what ``pas backup`` and ``pas hub backup``
share.

Owns: the folder's life (built under a temporary name, 0700, every file fsynced, renamed to
its final name, so a folder with the final name is whole), the ``MANIFEST.json`` written in
it (each file's size and SHA-256), and copying a private file with its mode. May not touch:
what goes in it (each backup's own module decides, and copies its databases through
:func:`copy_database`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.store.damage import damage_of
from appliance.store.db import copy_consistent
from appliance.store.spool import fsync_dir

MANIFEST = "MANIFEST.json"


class BackupRefused(Exception):
    """A backup that cannot be written where asked, or of a home that is not what it should
    be; the message names the problem. Nothing was left behind."""


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
    building = destination / f".{name}.partial"
    try:
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(mode=0o700)
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
