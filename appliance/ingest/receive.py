"""The durable receive path shared by C-STORE and STOW-RS (invariant 1).

Order matters and is the whole point of this module: read the header (refuse what cannot be
filed: :mod:`appliance.ingest.reading`) -> check room -> write the bytes exactly as received,
fsync, rename, fsync the directory -> commit the index row -> only then report success to the
caller, who answers the sender. Any failure before the commit leaves no new file behind.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sqlite3
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.uid import generate_uid

from appliance import __version__
from appliance.ingest.attributes import InvalidInstance, OtherStudy
from appliance.ingest.reading import check_request, read_dataset_record, read_record
from appliance.ops import index_check
from appliance.store import index
from appliance.store.db import Database
from appliance.store.inflate import inflated
from appliance.store.spool import SpillFile, Spool, SpoolFull

log = logging.getLogger("pas.ingest")

# Deterministic, under pydicom's UID root: identifies the software that wrote the file meta.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["PAS appliance implementation"])
IMPLEMENTATION_VERSION_NAME = f"PAS_{__version__}"[:16]


class StorageFailure(Exception):
    """The bytes could not be made durable (database or file system error)."""


@dataclass(frozen=True)
class Received:
    sop_instance_uid: str
    study_uid: str
    instance_id: int
    sha256: str
    size: int
    duplicate: bool
    conflict: bool
    sop_class_uid: str = ""
    series_uid: str = ""


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One (0002,xxxx) element, explicit VR little endian (PS3.10 7.1)."""
    if vr == b"OB":  # 4-byte length form
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidInstance(f"{text!r} is not a valid UID or title (not ASCII)") from None
    return raw + pad if len(raw) % 2 else raw


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                  source_ae: str | None = None) -> bytes:
    """Preamble and file meta for a dataset received over the network (which has none).

    Encoded here rather than through pydicom's FileMetaDataset: it is written for every
    received instance and pydicom's general writer cost ~0.2 ms of it (tests compare the two
    byte for byte). The receive path passes no ``source_ae``: the meta then depends on the
    dataset alone, so the same instance sent again from another AE title is the same file (a
    duplicate, not a conflict uploaded twice). The calling AE is kept in the index instead."""
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    if source_ae:
        elements.append(_meta_element(0x0016, b"AE", _padded(source_ae[:16], b" ")))
    body = b"".join(elements)
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


class _Pending:
    __slots__ = ("record", "stored", "options", "ensure_file", "outcome", "error", "done")

    def __init__(self, record: index.InstanceRecord, stored: index.StoredFile,
                 options: dict[str, Any], ensure_file: Callable[[], None] | None = None):
        self.record, self.stored, self.options = record, stored, options
        self.ensure_file = ensure_file
        self.outcome: index.RecordOutcome | None = None
        self.error: BaseException | None = None
        self.done = False


class GroupCommit:
    """Index rows of instances received at the same time, committed in one transaction.

    Each instance is still all or nothing (a savepoint of its own inside the transaction),
    and its caller returns only once the transaction holding it is committed (invariant 1).
    What changes is the number of commits: with several modalities sending at once, the
    thread that finds no commit under way commits every row queued meanwhile, with one WAL
    fsync, instead of each waiting its turn in SQLite's busy handler (which sleeps 1, 2,
    5... ms between tries). A lone sender commits its own row at once, as before.

    ``ensure_file`` (of :meth:`record`): called inside the instance's part of the
    transaction, right after its row, the write lock held: it makes sure the row's file is
    in place before the COMMIT, or raises (that instance's row is rolled back, it alone
    fails). See :meth:`Receiver._file`."""

    def __init__(self, db: Database):
        self.db = db
        self._queue: list[_Pending] = []
        self._lock = threading.Lock()
        self._committed = threading.Condition(self._lock)
        self._committing = False

    def record(self, record: index.InstanceRecord, stored: index.StoredFile, *,
               ensure_file: Callable[[], None] | None = None,
               **options: Any) -> index.RecordOutcome:
        pending = _Pending(record, stored, options, ensure_file)
        with self._lock:
            self._queue.append(pending)
            while not pending.done and self._committing:
                self._committed.wait()
            if pending.done:
                return self._result(pending)
            batch, self._queue = self._queue, []
            self._committing = True
        try:
            self._commit(batch)
        finally:
            with self._lock:
                self._committing = False
                self._committed.notify_all()
        return self._result(pending)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            with self.db.transaction():
                if len(batch) == 1:  # alone: the transaction is its all-or-nothing
                    self._file_one(batch[0])
                else:
                    for item in batch:
                        try:
                            with self.db.savepoint("instance"):
                                self._file_one(item)
                        except Exception as exc:  # noqa: BLE001 - that instance's failure
                            # Any error of one instance (a value SQLite cannot bind raises
                            # OverflowError, not sqlite3.Error) is its own: its savepoint
                            # rolled it back, the others' C-STOREs still succeed. Unless
                            # SQLite rolled the whole transaction back (disk full, I/O): the
                            # rows after it would then commit one by one outside it.
                            item.error = exc
                            if not self.db.connection().in_transaction:
                                raise
        except BaseException as exc:  # the commit itself failed: none of them is indexed
            for item in batch:
                item.error = item.error or exc
        finally:
            for item in batch:
                item.done = True

    def _file_one(self, item: _Pending) -> None:
        outcome = index.record_instance(self.db, item.record, item.stored, **item.options)
        if item.ensure_file is not None:
            item.ensure_file()
        item.outcome = outcome

    @staticmethod
    def _result(pending: _Pending) -> index.RecordOutcome:
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.outcome


class Receiver:
    """Files received objects durably. Thread-safe: one per daemon, shared by associations."""

    def __init__(self, db: Database, spool: Spool):
        self.db = db
        self.spool = spool
        self._commits = GroupCommit(db)
        # A deflated dataset is inflated past a few MB into a spool temp file (its room
        # counted against the quota like a transcoded copy's), not in memory (invariant 8).
        self._inflate = functools.partial(inflated, spool=spool)

    def _used_bytes(self) -> int:
        """The spool's size, for the quota check: one row the index's triggers keep (it was
        a sum over every instance, read every few seconds); nothing without a quota."""
        return index.spool_bytes(self.db) if self.spool.quota_bytes else 0

    def receive_dataset(self, dataset: bytes | bytearray | SpillFile, *,
                        transfer_syntax_uid: str, sop_class_uid: str, sop_instance_uid: str,
                        calling_ae: str | None = None, called_ae: str | None = None,
                        source: str | None = None,
                        prepared: tuple[bytes, Any] | None = None) -> Received:
        """A dataset as it travelled in P-DATA: kept byte for byte behind a file meta.
        ``prepared``: what :meth:`prepare` returned for this C-STORE, its hash fed with the
        dataset's fragments as they arrived. A :class:`SpillFile` (a large dataset, already
        on disk behind ``prepared``'s file meta) is read in place and filed as it is."""
        if isinstance(dataset, SpillFile):
            return self._receive_spilled(dataset, transfer_syntax_uid=transfer_syntax_uid,
                                         sop_class_uid=sop_class_uid,
                                         sop_instance_uid=sop_instance_uid,
                                         calling_ae=calling_ae, called_ae=called_ae,
                                         source=source, prepared=prepared)
        if prepared is not None:
            header, digest = prepared
        else:
            header = part10_header(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
            digest = None
        record = read_dataset_record(header, dataset, transfer_syntax_uid,
                                     inflate=self._inflate)
        check_request(record, sop_class_uid, sop_instance_uid)
        return self._file([header, dataset], record, calling_ae=calling_ae,
                          called_ae=called_ae, source=source, origin="local", digest=digest)

    def _inflate_spilled(self, spill: SpillFile) -> Any:
        """The inflater for a dataset mapped from ``spill``: it reads the deflated bytes from
        the file, a megabyte at a time, rather than through the mapping, every page of which
        it would touch (the whole deflated object counted in the daemon's RSS)."""
        def inflate(deflated: memoryview, *, limit: int) -> Any:
            start = spill.size - len(deflated)  # the mapping is the file's tail
            return inflated(spill.chunks(start=start), limit=limit, spool=self.spool)
        return inflate

    def open_spill(self, header: bytes) -> SpillFile:
        """Where a large C-STORE's fragments go as they arrive (dicomnet/direct_receive.py)."""
        return self.spool.open_spill(header)

    def check_spill_room(self, spill: SpillFile) -> bool:
        """A spill still growing: whether it still fits under the quota and above the
        free-space floor, as the check of the whole dataset will count it once it is read
        (:meth:`_receive_spilled`). If not, the spill gives up (its file goes, the rest of
        its dataset is dropped as it arrives) and False. The room was checked only once
        the last fragment had arrived: a C-STORE that kept coming wrote on past the floor
        (400 MB, 250 MB under it, measured) while every other modality got 0xA700."""
        if spill.error is not None:
            return False
        try:
            self.spool.check_room(spill.size, self._used_bytes())
        except SpoolFull as exc:
            spill.give_up(exc)
            return False
        return True

    def _receive_spilled(self, spill: SpillFile, *, transfer_syntax_uid: str,
                         sop_class_uid: str, sop_instance_uid: str, calling_ae: str | None,
                         called_ae: str | None, source: str | None,
                         prepared: tuple[bytes, Any] | None) -> Received:
        try:
            if isinstance(spill.error, SpoolFull):
                raise spill.error
            if spill.error is not None:
                raise SpoolFull(f"cannot write to the spool: "
                                f"{spill.error.strerror or spill.error}")
            assert prepared is not None, "a spill is opened behind its prepared file meta"
            header, digest = prepared
            with spill.dataset() as dataset:
                record = read_dataset_record(header, dataset, transfer_syntax_uid,
                                             inflate=self._inflate_spilled(spill))
            check_request(record, sop_class_uid, sop_instance_uid)
            self.spool.check_room(spill.size, self._used_bytes())
        except BaseException:
            spill.discard()
            raise
        return self._file([], record, calling_ae=calling_ae, called_ae=called_ae,
                          source=source, origin="local", digest=digest, spill=spill)

    @staticmethod
    def prepare(sop_class_uid: str, sop_instance_uid: str,
                transfer_syntax_uid: str) -> tuple[bytes, Any]:
        """For a C-STORE whose dataset is still arriving: the file meta it will be kept
        behind, and a SHA-256 already fed with it, to feed each fragment as it arrives
        (hashing then overlaps the network instead of following it: ~0.35 ms per CT image)."""
        header = part10_header(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        return header, hashlib.sha256(header)

    def receive_file(self, content: bytes, *, calling_ae: str | None = None,
                     called_ae: str | None = None, source: str | None = None,
                     expect_sop_instance_uid: str | None = None,
                     expect_study_uid: str | None = None,
                     origin: str = "local", received_at: float | None = None,
                     pin_until: float | None = None) -> Received:
        """A whole Part 10 file (STOW-RS, a fetched instance, or a C-STORE made into one).
        ``pin_until``: a prefetched prior's study pinned with its row
        (:func:`appliance.store.index.record_instance`).
        ``expect_study_uid``: an object of another study is refused (:class:`OtherStudy`)
        before anything is written. ``received_at``: a spool file adopted back at start-up,
        its time on disk (:func:`appliance.store.index.record_instance`)."""
        record = read_record(content, inflate=self._inflate)
        _check_study(record, expect_study_uid)
        if expect_sop_instance_uid and record.sop_instance_uid != expect_sop_instance_uid:
            raise InvalidInstance(
                f"SOPInstanceUID differs from the C-STORE request's: dataset "
                f"{record.sop_instance_uid}, request {expect_sop_instance_uid}"
            )
        return self._file([content], record, calling_ae=calling_ae, called_ae=called_ae,
                          source=source, origin=origin, received_at=received_at,
                          pin_until=pin_until)

    def receive_spilled_file(self, spill: SpillFile, digest: Any, *,
                             calling_ae: str | None = None, source: str | None = None,
                             expect_study_uid: str | None = None,
                             origin: str = "local",
                             pin_until: float | None = None) -> Received:
        """A whole Part 10 file too large to hold in memory (a STOW-RS part), already in a
        spool temp file opened with no header, ``digest`` fed with all its bytes as they
        arrived. Parsed in place (values over DEFER_BYTES not read) and filed as it is."""
        try:
            if isinstance(spill.error, SpoolFull):
                raise spill.error
            if spill.error is not None:
                raise SpoolFull(f"cannot write to the spool: "
                                f"{spill.error.strerror or spill.error}")
            with spill.dataset() as content:
                record = read_record(content, in_place=True,
                                     inflate=self._inflate_spilled(spill))
            _check_study(record, expect_study_uid)
            self.spool.check_room(spill.size, self._used_bytes())
        except BaseException:
            spill.discard()
            raise
        return self._file([], record, calling_ae=calling_ae, called_ae=None, source=source,
                          origin=origin, digest=digest, spill=spill, pin_until=pin_until)

    def _file(self, chunks: list[bytes | bytearray], record: index.InstanceRecord, *,
              calling_ae: str | None, called_ae: str | None, source: str | None,
              origin: str, digest: Any = None, spill: SpillFile | None = None,
              received_at: float | None = None, pin_until: float | None = None) -> Received:
        """Spool the bytes durably, then commit the index row (the order of invariant 1).
        ``spill``: the bytes are already in this temp file (room checked by the caller)."""
        if spill is None:
            self.spool.check_room(sum(len(chunk) for chunk in chunks), self._used_bytes())
        try:
            if spill is not None:
                stored, created = self.spool.adopt(spill, digest)
            else:
                stored, created = self.spool.write(chunks, digest)
        except OSError as exc:
            raise SpoolFull(f"cannot write to the spool: {exc.strerror or exc}") from exc
        rewritten: list[bool] = []

        def ensure_file() -> None:
            """Inside the commit's transaction, the write lock held (GroupCommit): whether
            the file is still in place. An eviction of the study may have unlinked it
            between this write and this commit: it looked (under the write lock too) for a
            row naming the file, and this one was not committed yet. Whether this write
            created the file or found it held: a file lost or set aside by the scrub is
            created again by a re-send, and an eviction that looked after that write takes
            it. Checked after the commit, as it was, the row was live with no file behind
            it until written again (a kill -9 there: a row for ever without its file), and
            a spilled C-STORE answered failure left its row committed (found in review,
            2026-12-07). Here no eviction can interleave before the COMMIT, and after it
            the eviction finds the row and keeps the file."""
            if self.spool.holds(stored):
                return
            if spill is not None:  # its bytes went with the file: the sender sends again
                raise StorageFailure("its file was evicted while it was filed: send it again")
            log.warning("%s: its file was evicted while it was filed; written again",
                        record.sop_instance_uid)
            try:  # durable (file and directory fsynced) before the COMMIT: same bytes, name
                self.spool.write(chunks)
            except OSError as exc:
                raise SpoolFull(f"cannot write to the spool: {exc.strerror or exc}") from exc
            rewritten.append(True)

        try:
            outcome = self._commits.record(
                record, stored, ensure_file=ensure_file, calling_ae=calling_ae,
                called_ae=called_ae, source_address=source, origin=origin,
                received_at=received_at, pin_until=pin_until,
                # The region's copy never moves back an instance corrected here.
                keep_local_moves=origin == "regional",
            )
        except sqlite3.Error as exc:
            if created or rewritten:
                index.discard_unindexed_file(self.db, self.spool, stored.path)
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                # The file fitted, the index could not grow: the disk is full all the same,
                # and the sender should hear so (0xA700, try again later), not "failed".
                raise SpoolFull(f"disk full: the index cannot grow ({exc})") from exc
            index_check.suspect(exc)  # SQLITE_CORRUPT: the index is checked now, not in a day
            raise StorageFailure(f"index commit failed: {exc}") from exc
        if outcome.conflict:
            log.warning("conflict: %s received again with other bytes than its current "
                        "version (version %d is now current, the others are kept)",
                        record.sop_instance_uid, outcome.version,
                        extra={"STUDY_UID": record.study_uid, "CALLING_AE": calling_ae})
        if outcome.refiled_from is not None:
            log.warning("study %s is now filed under patient %r (it was under %s): instance %s "
                        "names another patient than the study's earlier instances (a "
                        "correction, or a mix-up at the modality)", record.study_uid,
                        record.patient_id, outcome.refiled_from, record.sop_instance_uid,
                        extra={"STUDY_UID": record.study_uid, "CALLING_AE": calling_ae})
        return Received(record.sop_instance_uid, record.study_uid, outcome.instance_id,
                        stored.sha256, stored.size, outcome.duplicate, outcome.conflict,
                        record.sop_class_uid, record.series_uid)


def _check_study(record: index.InstanceRecord, expected: str | None) -> None:
    if expected is not None and record.study_uid != expected:
        raise OtherStudy(record)
