"""Commit: make sure every instance is archived, bit-exact, then sign the receipt.

Owns: the order "every instance of the manifest confirmed by the archive, then receipt", the
receipt itself and the clean-up after it. The rebuild, the SHA-256 check of every original file
and the hand-over to the archive happen in :mod:`appliance.hub.archiver`, mostly while the
buckets are still arriving; the commit asks it to finish the tail (what was not complete yet,
or was refused before) and waits. May not touch: SQL (``appliance.store.hub``), HTTP
(``transfers.py`` maps :class:`CommitRefused`).

Idempotent: a committed transfer returns its stored receipt; a failed commit changes nothing
that matters and may be retried (instances already archived stay recorded and are not sent to
the archive again; the archive back-ends accept re-sent instances without duplicating them).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.hub import manifest_json
from appliance.hub.archiver import CommitRefused
from appliance.store import hub as store
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

__all__ = ["CommitRefused", "commit_if_complete", "commit_transfer"]

log = logging.getLogger("pas.hub.commit")


def commit_transfer(hub: Hub, transfer_id: str) -> dict[str, Any]:
    """Finish archiving and sign; returns the receipt (the same one on a repeat)."""
    with hub.lock(transfer_id):
        row = store.get_transfer(hub.db, transfer_id)
        assert row is not None
        if row["receipt"] is not None:
            return dict(json.loads(row["receipt"]))
        manifest = manifest_json.loads(row["manifest"])
        held = store.held_buckets(hub.db, transfer_id)
        missing = sorted(set(range(row["bucket_count"])) - set(held))
        if missing:
            raise CommitRefused(409, "buckets_missing",
                                f"{len(missing)} of {counted(row['bucket_count'], 'bucket')} "
                                "missing",
                                missing=missing)
        started = time.monotonic()
        hub.archiver.finish(transfer_id)
        archived = store.archived_instances(hub.db, transfer_id)
        absent = [i["sop_instance_uid"] for i in manifest["instances"]
                  if archived.get(i["sop_instance_uid"]) != i["sha256"]]
        if absent:  # never expected: finish() raises first; but never receipt on a guess
            raise CommitRefused(502, "archive_refused", f"{counted(len(absent), 'instance')} "
                                "not recorded archived", refused=absent)
        receipt: dict[str, Any] = {
            "transfer_id": transfer_id,
            "study_uid": manifest["study_uid"],
            "archived_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "archive": hub.settings.archive.kind,
            "instances": [{"sop_instance_uid": i["sop_instance_uid"], "sha256": i["sha256"]}
                          for i in manifest["instances"]],
        }
        receipt["signature"] = hub.pki.sign(receipt)
        if store.set_receipt(hub.db, transfer_id, receipt):
            hub.transfer_counters.committed(row["site"], len(manifest["instances"]))
        store.remove_bucket_files(hub.settings.buckets_dir, transfer_id)
        hub.archiver.forget(transfer_id)
        # The site and the study named: "did study X of site Y reach the region?" was
        # answered by no line of the hub's journal.
        log.info("site %s: transfer %s committed, study %s: %s archived (%s); the tail took "
                 "%.2f s", row["site"], transfer_id, manifest["study_uid"],
                 counted(len(manifest["instances"]), "instance"), hub.settings.archive.kind,
                 time.monotonic() - started,
                 extra={"SITE": row["site"], "STUDY_UID": manifest["study_uid"]})
        return receipt


def commit_if_complete(hub: Hub, transfer_id: str) -> dict[str, Any] | None:
    """The receipt when every bucket is held (committing now if not yet done), else None.
    Raises :class:`CommitRefused` like :func:`commit_transfer`. For a PUT that asks to commit
    with the bucket that completes the set (one round trip less per study)."""
    row = store.get_transfer(hub.db, transfer_id)
    if row is None or len(store.held_buckets(hub.db, transfer_id)) < row["bucket_count"]:
        return None
    return commit_transfer(hub, transfer_id)
