"""Abandoned uploads: the staging of a transfer a site started and never finished goes.

A site creates a transfer, PUTs some of its buckets and may never come back (the study was
deleted at the site, the appliance was replaced, its job failed for good). Its sealed bucket
files under ``$PAS_HUB_HOME/buckets/<id>`` stayed for ever, and a restarted hub re-applied
them into ``work/<id>`` each time (the archiver resumes every transfer that holds buckets).

Owns: when a transfer counts as abandoned (no receipt, and no manifest POST nor bucket PUT
for ``transfers.abandoned_after_days``), the sweep (at start, before the port opens and
before the archiver resumes anything; then every ``transfers.expiry_check_interval_s`` in a
thread) and its log. May not touch: SQL and bucket files (:mod:`appliance.store.hub`), the
work files (:meth:`appliance.hub.archiver.Archiver.forget`).

What an expiry does, under the transfer's lock (no bucket PUT or commit of it in between):
one transaction forgets its bucket rows and marks it ``expired_at`` (re-checking that it has
no receipt and is still idle), then its bucket files and work files are removed. A crash in
between leaves files of an expired transfer, which the next start removes. The row and its
manifest stay: a site that comes back re-posts the manifest (same: 200), is told that no
bucket is held, and sends them all again; its first bucket clears ``expired_at``. Instances
archived ahead of the commit stay in the archive (bit-exact, and taken again without a
duplicate), as do their ``archived_instances`` rows.

Staging no live transfer row stands for (:meth:`StagingExpiry.remove_orphans`, at start):
the hub cleaned only the folders of transfers it has a row for, so after ``pas hub restore``
the ``buckets/<id>`` of every transfer begun after the backup (no row in the restored
``hub.sqlite``) stayed on disk for ever, as did a folder a crash or a stray file left behind
after a receipt or an expiry. At start every ``buckets/<id>`` whose transfer is unknown,
expired or committed goes, whole, in one log line with the count and the bytes freed
(``work/`` is emptied at every start already). Only at start: the port is not open, so no
transfer is being created or sent (a folder is made by a transfer's first bucket, after its
row), and a restore, the way such folders appear, needs the hub stopped (``hub.lock``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.hub.transfers import TRANSFER_ID
from appliance.store import hub as store
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.expiry")

DAY_S = 86400.0


@dataclass
class ExpirySweep:
    transfers: int = 0
    buckets: int = 0
    bytes: int = 0


@dataclass
class OrphanSweep:
    """Staging folders removed at start, by what their transfer is in ``hub.sqlite``."""

    unknown: int = 0
    expired: int = 0
    committed: int = 0
    bytes: int = 0

    @property
    def folders(self) -> int:
        return self.unknown + self.expired + self.committed


class StagingExpiry:
    def __init__(self, hub: Hub):
        self.hub = hub
        self.settings = hub.settings.transfers
        self.total = ExpirySweep()  # since this hub started
        self._stopping = threading.Event()

    @property
    def enabled(self) -> bool:
        return self.settings.abandoned_after_days > 0

    def sweep(self) -> ExpirySweep:
        """Expire every transfer abandoned now; log each and the total."""
        done = ExpirySweep()
        if not self.enabled:
            return done
        idle_since = time.time() - self.settings.abandoned_after_days * DAY_S
        for row in store.abandoned_transfers(self.hub.db, idle_since):
            with self.hub.lock(row["id"]):
                if not store.expire_transfer(self.hub.db, row["id"], idle_since):
                    continue  # a bucket, a commit or a resumed site got there first
                store.remove_bucket_files(self.hub.settings.buckets_dir, row["id"])
                archiver = getattr(self.hub, "archiver", None)
                if archiver is not None:  # at start work/ was wiped whole already
                    archiver.forget(row["id"])
            done.transfers += 1
            done.buckets += int(row["held"])
            done.bytes += int(row["bytes_stored"])
            log.warning("transfer %s of site %s abandoned (no receipt, idle %.1f days): its "
                        "staging removed (%s, %d bytes)", row["id"], row["site"],
                        (time.time() - row["idle_from"]) / DAY_S, counted(row["held"], "bucket"),
                        row["bytes_stored"],
                        extra={"SITE": row["site"], "STUDY_UID": row["study_uid"]})
        if done.transfers:
            self.total.transfers += done.transfers
            self.total.buckets += done.buckets
            self.total.bytes += done.bytes
            log.warning("abandoned transfers expired: %d (%s, %d bytes; %d since start)",
                        done.transfers, counted(done.buckets, "bucket"), done.bytes,
                        self.total.transfers)
        return done

    def remove_orphans(self) -> OrphanSweep:
        """At start, before the port opens: remove every ``buckets/<id>`` with no live
        transfer row (unknown to ``hub.sqlite``, expired, or committed), whatever
        ``abandoned_after_days`` says; one WARNING line when any went. A live transfer's
        folder is left whole (its site resumes it). A folder not named as a transfer id is
        not the hub's: left."""
        done = OrphanSweep()
        for folder in store.staging_folders(self.hub.settings.buckets_dir):
            if not TRANSFER_ID.fullmatch(folder.name):
                continue
            row = store.get_transfer(self.hub.db, folder.name)
            kind = ("unknown" if row is None else "committed" if row["receipt"] is not None
                    else "expired" if row["expired_at"] is not None else None)
            if kind is None:
                continue
            try:
                done.bytes += store.remove_staging_folder(folder)
            except OSError as exc:  # the next start tries again; serving goes on
                log.error("the staging folder %s (transfer %s) could not be removed: %s",
                          folder, kind, exc.strerror or exc)
                continue
            setattr(done, kind, getattr(done, kind) + 1)
        if done.folders:
            log.warning("staging removed at start: %s with no live transfer row (%d unknown "
                        "to hub.sqlite, as a transfer begun after the backup it was restored "
                        "from; %d expired; %d committed), %d bytes freed",
                        counted(done.folders, "folder"), done.unknown, done.expired,
                        done.committed, done.bytes)
        return done

    def start(self) -> None:
        if self.enabled:
            threading.Thread(target=self._run, name="pas-hub-expiry", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.wait(self.settings.expiry_check_interval_s):
            try:
                self.sweep()
            except Exception:  # the next pass tries again; serving goes on
                log.exception("expiry of abandoned transfers failed")
