"""A commit the hub refuses because a rebuilt instance differs from the manifest (422), end to
end: storescu -> ``pas run`` -> mutual TLS -> ``pas hub run`` (embedded archive).

The hub keeps the first copy of each bucket index of a transfer (a PUT repeated is a no-op),
so a transfer whose held buckets carry wrong bytes can never commit. The job must then leave
that transfer behind: the next attempt, once the cause is gone, sends a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.hub import HubProcess
from tests.support.peers import CT_DIR, storescu, wait_for
from tests.support.peers import read_rows as rows
from tests.support.tcpproxy import TcpProxy
from tests.test_uplink_hub import ONE_IMAGE_STABLE, enrolled_pas, jobs

# One CT image of 529 214 bytes in buckets of 0.5 MiB: two pieces, so no whole-file check
# before it leaves (pack._check_whole_file): only the hub sees the damage.
IMAGE = sorted(CT_DIR.glob("*.dcm"))[0]


def _settled(pas: Any) -> Any:
    """The hub job once an attempt ended it (an operator's retry resets ``attempts``)."""
    return wait_for(lambda: next((j for j in jobs(pas) if j["state"] in ("done", "failed")
                                  and j["attempts"] >= 1), None), 120, interval=0.2,
                    what=f"the hub job to end (log {pas.log_path})")


@dataclass
class Damaged:
    """An image whose spool file was damaged before its upload, and what the hub made of it."""

    pas: Any
    hub: HubProcess
    uid: str
    recorded: str  # the SHA-256 recorded at reception (the original bytes)
    spooled: Path
    job: sqlite3.Row  # failed by the 422
    progress: dict[str, Any]  # the job's progress before its first request: transfer and key


@contextlib.contextmanager
def damaged_upload(pas_factory: Any, tmp_path: Path) -> Iterator[Damaged]:
    """One image received while the link is down; its spool file damaged (one byte, inside
    the first bucket's piece); the link restored; the job's attempt once the hub refused the
    commit (it rebuilt the image with another SHA-256)."""
    with contextlib.ExitStack() as stack:
        hub = HubProcess(tmp_path / "hub").init()
        stack.callback(hub.kill)  # its orderly stop is the hub tests' subject (15 s here)
        hub.start()
        proxy = TcpProxy("127.0.0.1", hub.port).start()
        stack.callback(proxy.stop)
        proxy.cut()  # the link down until the file is damaged
        pas = enrolled_pas(pas_factory, hub, tmp_path / "site", {
            "PAS_HUB__BUCKET_MB": "0.5", "PAS_HUB__RETRIES": "0", **ONE_IMAGE_STABLE},
            via=proxy)
        storescu([IMAGE], pas.port)
        waiting = wait_for(lambda: next((j for j in jobs(pas) if j["last_error"]), None), 60,
                           what=f"the job to wait for the link (log {pas.log_path})")
        stored = rows(pas.home / "pas.sqlite", "SELECT sop_instance_uid, path, sha256, size "
                      "FROM instances")
        assert len(stored) == 1 and stored[0]["size"] > 512 * 1024
        uid, recorded = stored[0]["sop_instance_uid"], stored[0]["sha256"]
        spooled = pas.home / "spool" / stored[0]["path"]
        original = spooled.read_bytes()
        assert hashlib.sha256(original).hexdigest() == recorded
        damaged = bytearray(original)
        damaged[300_000] ^= 0xFF
        spooled.write_bytes(bytes(damaged))
        proxy.restore()
        yield Damaged(pas, hub, uid, recorded, spooled, _settled(pas),
                      json.loads(waiting["progress"]))


def _delivered_by_a_new_transfer(case: Damaged) -> None:
    """The job done with a transfer other than the first, the image confirmed, the hub's
    archive holding the original bytes; the first transfer left uncommitted."""
    done = _settled(case.pas)
    assert done["id"] == case.job["id"] and done["state"] == "done", done["last_error"]
    assert case.pas.status()["confirmed_instances"] == 1
    transfers = {t["id"]: t for t in rows(case.hub.home / "hub.sqlite",
                                          "SELECT * FROM transfers")}
    first_id = case.progress["transfer_id"]
    new_id = json.loads(done["progress"])["transfer_id"]
    assert set(transfers) == {first_id, new_id} and new_id != first_id, list(transfers)
    assert transfers[first_id]["receipt"] is None and transfers[new_id]["receipt"] is not None
    archived = rows(case.hub.home / "archive" / "pas.sqlite",
                    "SELECT sop_instance_uid, sha256 FROM instances")
    assert [(r["sop_instance_uid"], r["sha256"]) for r in archived] == [
        (case.uid, case.recorded)]


def test_a_transfer_the_hub_cannot_rebuild_is_left_and_the_retry_sends_a_new_one(
        pas_factory: Any, tmp_path: Path) -> None:
    """The hub rebuilds the damaged image, the SHA-256 differs, the commit is 422: the job
    fails for good naming the file here as damaged. The file is put right (the modality
    sends the image again: the spool rewrites it) and the operator retries: a new transfer
    goes, the receipt comes, the image is confirmed and the hub's archive holds the original
    bytes. Before, the job kept its transfer id, the hub answered 'held' for both buckets
    (the damaged ones) and 422 again on every retry: the image could never be confirmed,
    so never evicted."""
    with damaged_upload(pas_factory, tmp_path) as case:
        assert case.job["state"] == "failed", case.job["last_error"]
        assert "damaged" in case.job["last_error"] and case.uid in case.job["last_error"], \
            case.job["last_error"]
        assert case.pas.status()["confirmed_instances"] == 0
        storescu([IMAGE], case.pas.port)  # the modality sends it again: the file is rewritten
        wait_for(lambda: hashlib.sha256(case.spooled.read_bytes()).hexdigest() == case.recorded,
                 30, what="the spool file rewritten by the re-send")
        case.pas.cli("queue", "retry", str(case.job["id"]))
        _delivered_by_a_new_transfer(case)


def test_a_transfer_spoiled_on_the_way_is_left_and_sent_again_without_an_operator(
        pas_factory: Any, tmp_path: Path) -> None:
    """The hub holds buckets with wrong bytes while the file here is intact (spoiled on the
    way: in memory while packing, a read that erred once). Made here by putting the file
    right and giving the job back the first transfer it held, then a retry. The 422 now
    finds the file intact: the attempt is retried by itself with a new transfer, delivered,
    confirmed. Before, the 422 failed the job for good ('SHA-256 differ'), and every retry
    met it again."""
    with damaged_upload(pas_factory, tmp_path) as case:
        storescu([IMAGE], case.pas.port)
        wait_for(lambda: hashlib.sha256(case.spooled.read_bytes()).hexdigest() == case.recorded,
                 30, what="the spool file rewritten by the re-send")
        with contextlib.closing(sqlite3.connect(case.pas.home / "pas.sqlite")) as db, db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?",
                       (json.dumps(case.progress), case.job["id"]))
        case.pas.cli("queue", "retry", str(case.job["id"]))
        _delivered_by_a_new_transfer(case)
        log = case.pas.log()
        assert "while the files here are intact" in log, log[-3000:]
