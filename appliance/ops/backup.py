"""``pas backup``: what a reinstalled appliance needs that the region does not hold.

Owns: the backup's content and its manifest. May not touch: the spool (the DICOM files are
the data; the region holds every confirmed one, and a backup of terabytes of images is the
storage layer's job: RAID, snapshots), the index's rows (SQLite's online backup copies them).

What is copied, while the daemon runs:
- the index (``pas.sqlite``), through SQLite's online backup API: a consistent copy of one
  moment, jobs, confirmations, prefetch orders, Storage Commitment requests and the audit
  trail included, without stopping C-STOREs (a plain file copy of a WAL database being
  written can be torn); the copy checked with ``quick_check``: a damaged index is refused,
  not backed up (the audit row is not written into it either);
- the enrolment (``pki/``: the appliance's key and certificate, the hub's pinned CA and
  URL): without it the appliance must be enrolled again by regional ops; modes kept (0600);
- the configuration file the appliance runs on, when there is one.

``MANIFEST.json`` names each file with its size and SHA-256, the software and schema
versions, and what the backup does not protect: the instances not yet confirmed by the
region, whose only copy is the spool; its ``kind`` ("pas backup") and ``site`` are what
``--keep`` checks before it removes an older backup (the same site's only, never a folder PAS
did not write: :func:`appliance.ops.backup_folder.prune_backups`). Restoring is a copy back
(docs/operations.md); a missing spool file is then flagged by start-up recovery, and
``pas verify --repair`` fetches confirmed ones back from the region.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import Settings, site_origin
from appliance.ops.backup_folder import (
    WrittenBackup,
    copy_database,
    prune_backups,
    refuse_another_schema,
    refuse_inside_home,
    seal_backup,
    utc_stamp,
    write_backup_folder,
)
from appliance.store import audit, backups, index
from appliance.store.db import Database
from appliance.store.schema import MIGRATIONS
from appliance.words import counted

KIND = "pas backup"
# pas-backup.timer runs daily: two days without a backup is two missed runs. The one threshold
# of pas doctor, the status page, the hub's fleet dashboard and its alert rule.
STALE_AFTER_S = 2 * 86400
# The start of the export audit row's detail: how pas doctor finds the last backup, wherever
# it was written (the timer's folder, a drop-in's share, an operator's disk).
AUDIT_DETAIL = "pas backup: "
# The manifest's made_at (UTC): pas restore reads it back as the restored backup's time.
MADE_AT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def make_backup(settings: Settings, config_file: Path | None, destination: Path,
                actor: str, at: float | None = None, keep: int | None = None) -> WrittenBackup:
    """Write ``destination/pas-backup-<site>-<UTC time>/`` (0700: it holds the private key)
    and return it with its manifest. The folder is built under a temporary name and renamed
    at the end: a folder with the final name is whole (:mod:`appliance.ops.backup_folder`;
    ``BackupRefused`` names a destination it cannot write in). An ``export`` audit row (ATNA
    110106) says who wrote it where: it holds every patient's name.

    ``keep``: once the backup is whole, the site's older backups in ``destination`` beyond
    the ``keep`` newest are removed (:func:`appliance.ops.backup_folder.prune_backups`)."""

    def fill_clear(building: Path) -> dict[str, Any]:
        copy_database(settings.db_path, building / "pas.sqlite")
        pki = settings.home / "pki"
        if pki.is_dir():
            shutil.copytree(pki, building / "pki")  # copy2 keeps each file's mode (0600)
            (building / "pki").chmod(0o700)
        if config_file is not None and config_file.is_file():
            shutil.copy2(config_file, building / config_file.name)
        return _manifest(settings, building, config_file)

    def fill(building: Path) -> dict[str, Any]:
        if not settings.backup.recipient:
            return fill_clear(building)
        return seal_backup(settings.home, building, settings.backup.recipient, fill_clear)

    refuse_another_schema(settings.db_path, len(MIGRATIONS), "the index", "pas", "pas backup")
    # Absolute: the audit row names it for pas status and pas doctor, which may run from
    # another directory (a relative "b" read as "no longer there").
    destination = destination.absolute()
    refuse_inside_home(destination, settings.home, "PAS's", " (the spool's disk)")
    prefix = f"pas-backup-{settings.site}-"
    final, manifest = write_backup_folder(destination, prefix + utc_stamp(at), fill)
    live = Database(settings.db_path)
    try:
        audit.record(live, "export", actor=actor, target=str(final),
                     detail=f"{AUDIT_DETAIL}the index ({counted(manifest['instances'], 'instance')}"
                            f", {counted(manifest['studies'], 'study', 'studies')}), the "
                            "enrolment and the configuration")
    finally:
        live.close()
    pruned = None if keep is None else prune_backups(
        final, prefix, {"kind": KIND, "site": settings.site}, keep)
    return WrittenBackup(final, manifest, pruned)


def last_backup(db: Database) -> tuple[float, Path, float | None] | None:
    """When and where the newest whole backup of this index was written, and when this
    index was restored from it (None: a backup written of this index), ``None`` when there
    is none: the newest export audit row (written once the folder has its final name), or
    the backup ``pas restore`` put back, whichever came last
    (:func:`appliance.store.backups.newest_backup`)."""
    newest = backups.newest_backup(db, AUDIT_DETAIL)
    return None if newest is None else (newest["at"], Path(newest["folder"]),
                                        newest["restored_at"])


def backup_state(db: Database, now: float | None = None) -> dict[str, Any]:
    """The newest backup as every screen shows it (``pas doctor``, the status page,
    ``/api/status``, the heartbeat): ``last_at`` and ``folder`` (None: never), ``age_s``,
    ``restored_at`` (this index restored from that backup then; None otherwise),
    ``index_since`` (the index's first audit row: how long it has existed) and ``stale``,
    true past :data:`STALE_AFTER_S`, or with no backup ever on an index older than that (a
    new appliance whose first night has not come is not stale)."""
    now = time.time() if now is None else now
    newest = last_backup(db)
    since = audit.first_row_at(db)
    if newest is None:
        return {"last_at": None, "folder": None, "age_s": None, "restored_at": None,
                "index_since": since,
                "stale": since is not None and now - since > STALE_AFTER_S}
    at, folder, restored_at = newest
    return {"last_at": at, "folder": str(folder), "age_s": round(max(now - at, 0.0), 1),
            "restored_at": restored_at, "index_since": since,
            "stale": now - at > STALE_AFTER_S}


def _manifest(settings: Settings, folder: Path, config_file: Path | None) -> dict[str, Any]:
    copy = Database(folder / "pas.sqlite", readonly=True)
    try:
        totals = index.totals(copy)
        schema = copy.schema_version()
    finally:
        copy.close()
    return {
        "kind": KIND,
        "site": settings.site,
        # The configuration's, the enrolment's or the default: pas restore puts a backup
        # named by its enrolment back on an appliance with no name yet (a new disk).
        "site_from": site_origin(settings),
        "made_at": time.strftime(MADE_AT_FORMAT, time.gmtime()),
        "software": __version__,
        "schema": schema,
        "home": str(settings.home),
        "config_file": str(config_file) if config_file is not None else None,
        "instances": totals["instances"],
        "studies": totals["studies"],
        # Their only copy is the spool: this backup does not hold images.
        "instances_not_confirmed_by_the_region": totals["instances"]
        - totals["confirmed_instances"],
    }
