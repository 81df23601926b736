"""The scrub (or ``pas verify --repair``) hashing a damaged file while the modality's re-send
writes the good bytes back under its name (invariant 1).

Found in review (2026-12-07): the scrub hashes at its throttled rate (seconds for a large
file at 10 MB/s); meanwhile the re-send renames its good copy into place (a new inode) and
is answered success. The scrub, having found the OLD inode damaged, then moved whatever was
at the path, the good copy, to the quarantine and flagged the row ``hash_mismatch`` and
``missing``: the study served as one with a lost file, and the good bytes the sender was
told were kept no longer under their name. Now the scrub moves only the very file it hashed
(its identity taken through the descriptor it read), and a newer one stays, unflagged.

The interleaving is forced in process: the scrub's throttle (called after each chunk it
hashes) runs the re-send once, after the first chunk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from appliance.ingest.receive import Receiver
from appliance.ops import recovery
from appliance.store import cache as cache_store
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.support.peers import CT_DIR


@pytest.fixture
def content(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A CT image, hashed in several chunks: the re-send lands in the middle of its hash."""
    content = sorted(CT_DIR.glob("*.dcm"))[0].read_bytes()
    monkeypatch.setattr(recovery, "HASH_CHUNK", 64 * 1024)
    assert len(content) > 2 * recovery.HASH_CHUNK
    return content


class _ResendWhileHashing:
    """The scrub's throttle: after its first chunk, the modality sends the instance again."""

    def __init__(self, receiver: Receiver, content: bytes):
        self.receiver, self.content = receiver, content
        self.answers: list[bool] = []  # the re-send's: duplicate?

    def consume(self, count: int) -> None:
        if not self.answers:
            self.answers.append(self.receiver.receive_file(self.content).duplicate)


@pytest.mark.parametrize("how", ["scrub", "verify-repair"])
def test_a_resend_during_the_hash_of_a_damaged_copy_keeps_the_good_file_unflagged(
        tmp_path: Path, content: bytes, how: str) -> None:
    """Before the fix: the good copy the re-send wrote was moved to the quarantine, the path
    left empty, and the row flagged hash_mismatch (and missing, by the scrub)."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(db, spool)
    first = receiver.receive_file(content, calling_ae="MOD")
    (item,) = cache_store.indexed_files(db)
    path = spool.root / item.path
    damaged = bytearray(content)
    damaged[-100:] = b"\xff" * 100  # in place, same size: a failing disk
    path.write_bytes(bytes(damaged))

    throttle = _ResendWhileHashing(receiver, content)
    report = recovery.VerifyReport()
    recovery.check_file(db, spool, item, report, throttle,  # type: ignore[arg-type]
                        repair=how == "verify-repair", set_aside=how == "scrub")

    assert throttle.answers == [True]  # the re-send happened mid-hash, answered success
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first.sha256  # the good file
    assert cache_store.open_issues(db) == []
    assert report.problems == [] and report.hash_mismatch == 0
    quarantined = list((spool.root / cache_store.QUARANTINE_DIR).glob("*"))
    assert all(p.read_bytes() != content for p in quarantined), quarantined

    # The next pass checks the file now in place: sound.
    again = recovery.VerifyReport()
    recovery.check_file(db, spool, item, again, None, set_aside=True)
    assert (again.files, again.ok, again.problems) == (1, 1, [])
    db.close()


def test_the_damaged_copy_itself_is_still_set_aside(tmp_path: Path, content: bytes) -> None:
    """No re-send: the scrub moves the damaged copy (the very file it hashed) to the
    quarantine, flags the row, and leaves no name aside behind."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool")
    Receiver(db, spool).receive_file(content)
    (item,) = cache_store.indexed_files(db)
    damaged = bytearray(content)
    damaged[-100:] = b"\xff" * 100
    (spool.root / item.path).write_bytes(bytes(damaged))

    report = recovery.VerifyReport()
    recovery.check_file(db, spool, item, report, None, set_aside=True)

    assert report.hash_mismatch == 1 and not (spool.root / item.path).exists()
    (moved,) = (spool.root / cache_store.QUARANTINE_DIR).iterdir()
    assert moved.read_bytes() == bytes(damaged)
    assert moved.name == item.path.replace("/", "_")
    assert sorted(i["kind"] for i in cache_store.open_issues(db)) == ["hash_mismatch",
                                                                      "missing"]
    db.close()
