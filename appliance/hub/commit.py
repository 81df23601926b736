"""Commit: rebuild every instance's original bytes, check them, archive them, sign a receipt.

Owns: the rebuild in ``$PAS_HUB_HOME/work/<transfer>`` (streamed to files piece by piece, so
memory holds one bucket at a time: invariant 8), the SHA-256 check of every original file
against the manifest, and the order "archive accepted everything, then receipt". May not
touch: SQL (``appliance.store.hub``), HTTP (``transfers.py`` maps :class:`CommitRefused`).

Idempotent: a committed transfer returns its stored receipt; a failed commit changes nothing
and may be retried (the archive back-ends accept re-sent instances without duplicating them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.hub.archive import ArchiveRefused, RebuiltInstance
from appliance.store import hub as store

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.commit")


class CommitRefused(Exception):
    """The commit cannot complete; ``status``/``error``/``detail``/``extra`` form the answer."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any):
        super().__init__(detail)
        self.status, self.error, self.detail, self.extra = status, error, detail, extra


def commit_transfer(hub: Hub, transfer_id: str, key: Callable[[], bytes]) -> dict[str, Any]:
    """Rebuild, verify, archive and sign; returns the receipt (the same one on a repeat)."""
    with hub.lock(transfer_id):
        row = store.get_transfer(hub.db, transfer_id)
        assert row is not None
        if row["receipt"] is not None:
            return dict(json.loads(row["receipt"]))
        manifest = json.loads(row["manifest"])
        held = store.held_buckets(hub.db, transfer_id)
        missing = sorted(set(range(row["bucket_count"])) - set(held))
        if missing:
            raise CommitRefused(409, "buckets_missing",
                                f"{len(missing)} of {row['bucket_count']} buckets missing",
                                missing=missing)
        work = hub.settings.work_dir / transfer_id
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        started = time.monotonic()
        try:
            rebuilt = _rebuild(hub, row, manifest, key(), work)
            rebuilt_at = time.monotonic()
            try:
                hub.archive.store(rebuilt, site=row["site"])
            except ArchiveRefused as exc:
                raise CommitRefused(502, "archive_refused", str(exc),
                                    refused=exc.refused) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        receipt: dict[str, Any] = {
            "transfer_id": transfer_id,
            "study_uid": manifest["study_uid"],
            "archived_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "archive": hub.settings.archive.kind,
            "instances": [{"sop_instance_uid": i["sop_instance_uid"], "sha256": i["sha256"]}
                          for i in manifest["instances"]],
        }
        receipt["signature"] = hub.pki.sign(receipt)
        store.set_receipt(hub.db, transfer_id, receipt)
        store.remove_bucket_files(hub.settings.buckets_dir, transfer_id)
        log.info("transfer %s committed: %d instances archived (%s); rebuild %.2f s, "
                 "archive %.2f s", transfer_id, len(rebuilt), hub.settings.archive.kind,
                 rebuilt_at - started, time.monotonic() - rebuilt_at,
                 extra={"SITE": row["site"], "STUDY_UID": manifest["study_uid"]})
        return receipt


def _rebuild(hub: Hub, row: Any, manifest: dict[str, Any], key: bytes,
             work: Path) -> list[RebuiltInstance]:
    from appliance.transfer import pack, seal

    transfer_id = row["id"]
    expected = {i["sop_instance_uid"]: i for i in manifest["instances"]}
    files = {uid: work / f"{number:06d}.dcm" for number, uid in enumerate(expected)}
    written: dict[str, int] = dict.fromkeys(expected, 0)
    for bucket in store.bucket_rows(hub.db, transfer_id):
        sealed = (hub.settings.buckets_dir / bucket["path"]).read_bytes()
        index = int(bucket["idx"])
        try:
            plaintext = seal.open_bucket(key, transfer_id, index, sealed)
            pieces = list(pack.unpack_bucket(plaintext))
        except ValueError as exc:
            raise CommitRefused(422, "bad_bucket", f"bucket {index} cannot be unpacked: {exc}",
                                bucket=index) from None
        del plaintext
        for piece in pieces:
            if piece.sop_instance_uid not in expected:
                raise CommitRefused(422, "unexpected_instance",
                                    f"bucket {index} carries {piece.sop_instance_uid}, which "
                                    "the manifest does not list", bucket=index)
            path = files[piece.sop_instance_uid]
            with open(path, "r+b" if path.exists() else "wb") as handle:
                handle.seek(piece.offset)
                handle.write(piece.data)
            written[piece.sop_instance_uid] += len(piece.data)
        del pieces
    mismatch = []
    rebuilt = []
    for uid, instance in expected.items():
        path = files[uid]
        actual = _sha256(path) if path.exists() else "absent"
        size = path.stat().st_size if path.exists() else 0
        if actual != instance["sha256"] or size != instance["size"]:
            mismatch.append({"sop_instance_uid": uid, "expected": instance["sha256"],
                             "actual": actual, "expected_size": instance["size"],
                             "actual_size": size})
        else:
            rebuilt.append(RebuiltInstance(uid, path, size, actual))
    if mismatch:
        names = ", ".join(m["sop_instance_uid"] for m in mismatch[:5])
        raise CommitRefused(422, "sha256_mismatch",
                            f"{len(mismatch)} rebuilt instance(s) differ from the manifest: "
                            f"{names}", mismatch=mismatch)
    return rebuilt


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
