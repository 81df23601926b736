"""``pas doctor``'s backup rows: the newest backup's age and place, and whether backups are
sealed (``backup.recipient``).

Owns: the verdicts and what to do. May not touch: the backups themselves (appliance/ops/
backup.py writes them, backup_folder.py removes old ones) or the index (read only).
Split from doctor.py to keep each under ~600 lines.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.ops.doctor import Check, _index
from appliance.words import ago

BACKUP_FIX = ("systemctl status pas-backup.timer pas-backup.service; journalctl -u pas-backup "
              "(docs/operations.md, Backup and restore)")


def check_backup_sealing(settings: Settings) -> list[Check]:
    """Whether backups are sealed (``backup.recipient``): one in clear holds every patient's
    name and the enrolment's private key, readable by whoever reads its folder, a share's
    snapshots included. Set, the newest backup is looked at too (one written in clear before
    the recipient was set, or sealed for another key, is still on the share), and the room
    a sealed backup needs in the home (a copy of the index, sealed from there)."""
    if not settings.backup.recipient:
        return [Check("backup sealing", "warn",
                      "backups are written in clear: the index (every patient's name) and "
                      "the enrolment's private key, for anyone who can read the backup folder",
                      "pas backup-key FILE (FILE in IT's vault, off the appliance), then the "
                      "printed recipient in [backup] of the configuration "
                      "(docs/operations.md)")]
    from appliance.ops.backup_seal import fingerprint, parse_recipient

    key = fingerprint(parse_recipient(settings.backup.recipient))
    problems: list[str] = []
    fixes: list[str] = []
    newest = _newest_backup_manifest(settings)
    if newest is not None:
        folder, manifest = newest
        sealed = manifest.get("sealed")
        if not isinstance(sealed, dict):
            problems.append(f"the last backup, {folder}, is in clear (written before "
                            "backup.recipient was set)")
            fixes.append("the next backup is sealed; then remove the backups in clear")
        elif sealed.get("key") != key:
            problems.append(f"the last backup, {folder}, is sealed for the backup key "
                            f"{sealed.get('key')}, not {key} (backup.recipient changed)")
            fixes.append(f"keep the private key of {sealed.get('key')} until its backups "
                         "are gone")
    try:
        index_bytes = settings.db_path.stat().st_size
        free = shutil.disk_usage(settings.home).free
    except OSError:
        index_bytes = free = 0
    if index_bytes and free < index_bytes:
        problems.append(f"{free // 2**20} MiB free in {settings.home}, the index is "
                        f"{index_bytes // 2**20} MiB: a sealed backup copies it there first "
                        "and is refused")
        fixes.append("free room on the home's disk")
    if problems:
        return [Check("backup sealing", "warn", "; ".join(problems), "; ".join(fixes))]
    return [Check("backup sealing", "ok", f"backups are sealed for the backup key {key}")]


def _newest_backup_manifest(settings: Settings) -> tuple[Path, dict[str, Any]] | None:
    """The newest backup's folder and manifest, when there is one this user can read."""
    from appliance.ops.backup import backup_state
    from appliance.ops.backup_folder import MANIFEST

    with _index(settings) as db:
        if db is None:
            return None
        try:
            folder = backup_state(db)["folder"]
        except Exception:  # noqa: BLE001 - the backup check says what is wrong
            return None
    if folder is None:
        return None
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):  # gone, or 0700 and another user's: check_backup says
        return None
    return (Path(folder), manifest) if isinstance(manifest, dict) else None


def check_backup(settings: Settings, now: float | None = None) -> list[Check]:
    """The newest backup's age, found from its export audit row (so wherever it was written)
    and looked for on disk: a failed timer shows only in ``systemctl --failed``, which nobody
    reads until the index is damaged and the backup is needed. No backup on an index younger
    than two days is a new appliance whose first night has not come: said, not warned.
    Nothing when the database is missing or unreadable (the database check says so)."""
    from appliance.ops.backup import backup_state
    from appliance.ops.backup_folder import MANIFEST

    now = time.time() if now is None else now
    with _index(settings) as db:
        if db is None:
            return []
        try:
            state = backup_state(db, now)
        except Exception as exc:
            return [Check("backup", "warn", f"cannot read the audit trail: {exc}",
                          BACKUP_FIX)]
    if state["last_at"] is None:
        if not state["stale"]:
            return [Check("backup", "ok", "none yet: on the appliance, pas-backup.timer "
                          "writes the first one tonight (systemctl list-timers "
                          "pas-backup.timer); elsewhere: pas backup FOLDER")]
        return [Check("backup", "warn", "no pas backup was ever written of this index",
                      "systemctl enable --now pas-backup.timer, or pas backup FOLDER; "
                      + BACKUP_FIX)]
    at, folder = state["last_at"], Path(state["folder"])
    age = ago(now - at)
    # An index pas restore put back: the backup it came from, said as such.
    restored = "" if state.get("restored_at") is None else \
        f" (restored from it {ago(now - state['restored_at'])})"
    try:
        os.stat(folder / MANIFEST)
        there = "yes"
    except PermissionError:
        there = "unknown"  # 0700, owner pas: run doctor as pas to look inside
    except OSError:
        there = "no"
    if there == "no":
        return [Check("backup", "warn", f"the last backup, {folder} ({age}), is no longer there",
                      "is its disk or share mounted? " + BACKUP_FIX)]
    if state["stale"]:
        return [Check("backup", "warn", f"the last backup is {age}: {folder}{restored}",
                      BACKUP_FIX)]
    return [Check("backup", "ok", f"{age}: {folder}{restored}"
                  + (" (not readable by this user: run as pas to check it is there)"
                     if there == "unknown" else ""))]


# How many failed jobs the check reads to name their destinations (the count is exact).
