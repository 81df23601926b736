"""The durable receive path shared by C-STORE and STOW-RS (invariant 1).

Order matters and is the whole point of this module: read the header (refuse what cannot be
filed) -> check room -> write the bytes exactly as received, fsync, rename, fsync the
directory -> commit the index row -> only then report success to the caller, who answers the
sender. Any failure before the commit leaves no new file behind.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import struct
import threading
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, generate_uid

from appliance import __version__
from appliance.ingest.attributes import (
    DatasetMismatch,
    InvalidInstance,
    instance_record,
    record_from_raw,
)
from appliance.ingest.header import PIXEL_DATA, PIXEL_TAGS, WANTED, Truncated, read_header
from appliance.store import index
from appliance.store.db import Database
from appliance.store.spool import SpillFile, Spool, SpoolFull

UNDEFINED_LENGTH = 0xFFFFFFFF

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
    __slots__ = ("record", "stored", "options", "outcome", "error", "done")

    def __init__(self, record: index.InstanceRecord, stored: index.StoredFile,
                 options: dict[str, Any]):
        self.record, self.stored, self.options = record, stored, options
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
    5... ms between tries). A lone sender commits its own row at once, as before."""

    def __init__(self, db: Database):
        self.db = db
        self._queue: list[_Pending] = []
        self._lock = threading.Lock()
        self._committed = threading.Condition(self._lock)
        self._committing = False

    def record(self, record: index.InstanceRecord, stored: index.StoredFile,
               **options: Any) -> index.RecordOutcome:
        pending = _Pending(record, stored, options)
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
                    item = batch[0]
                    item.outcome = index.record_instance(self.db, item.record, item.stored,
                                                         **item.options)
                else:
                    for item in batch:
                        try:
                            with self.db.savepoint("instance"):
                                item.outcome = index.record_instance(
                                    self.db, item.record, item.stored, **item.options)
                        except sqlite3.Error as exc:
                            item.error = exc
        except BaseException as exc:  # the commit itself failed: none of them is indexed
            for item in batch:
                item.error = item.error or exc
        finally:
            for item in batch:
                item.done = True

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
        record = _read_dataset_record(header, dataset, transfer_syntax_uid)
        _check_request(record, sop_class_uid, sop_instance_uid)
        return self._file([header, dataset], record, calling_ae=calling_ae,
                          called_ae=called_ae, source=source, origin="local", digest=digest)

    def open_spill(self, header: bytes) -> SpillFile:
        """Where a large C-STORE's fragments go as they arrive (dicomnet/direct_receive.py)."""
        return self.spool.open_spill(header)

    def _receive_spilled(self, spill: SpillFile, *, transfer_syntax_uid: str,
                         sop_class_uid: str, sop_instance_uid: str, calling_ae: str | None,
                         called_ae: str | None, source: str | None,
                         prepared: tuple[bytes, Any] | None) -> Received:
        try:
            if spill.error is not None:
                raise SpoolFull(f"cannot write to the spool: "
                                f"{spill.error.strerror or spill.error}")
            assert prepared is not None, "a spill is opened behind its prepared file meta"
            header, digest = prepared
            with spill.dataset() as dataset:
                record = _read_dataset_record(header, dataset, transfer_syntax_uid)
            _check_request(record, sop_class_uid, sop_instance_uid)
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
                     origin: str = "local") -> Received:
        """A whole Part 10 file (STOW-RS, a fetched instance, or a C-STORE made into one)."""
        record = _read_record(content)
        if expect_sop_instance_uid and record.sop_instance_uid != expect_sop_instance_uid:
            raise InvalidInstance(
                f"SOPInstanceUID differs from the C-STORE request's: dataset "
                f"{record.sop_instance_uid}, request {expect_sop_instance_uid}"
            )
        return self._file([content], record, calling_ae=calling_ae, called_ae=called_ae,
                          source=source, origin=origin)

    def receive_spilled_file(self, spill: SpillFile, digest: Any, *,
                             calling_ae: str | None = None, source: str | None = None,
                             origin: str = "local") -> Received:
        """A whole Part 10 file too large to hold in memory (a STOW-RS part), already in a
        spool temp file opened with no header, ``digest`` fed with all its bytes as they
        arrived. Parsed in place (values over DEFER_BYTES not read) and filed as it is."""
        try:
            if spill.error is not None:
                raise SpoolFull(f"cannot write to the spool: "
                                f"{spill.error.strerror or spill.error}")
            with spill.dataset() as content:
                record = _read_record(content, in_place=True)
            self.spool.check_room(spill.size, self._used_bytes())
        except BaseException:
            spill.discard()
            raise
        return self._file([], record, calling_ae=calling_ae, called_ae=None, source=source,
                          origin=origin, digest=digest, spill=spill)

    def _file(self, chunks: list[bytes | bytearray], record: index.InstanceRecord, *,
              calling_ae: str | None, called_ae: str | None, source: str | None,
              origin: str, digest: Any = None, spill: SpillFile | None = None) -> Received:
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
        try:
            outcome = self._commits.record(
                record, stored, calling_ae=calling_ae, called_ae=called_ae,
                source_address=source, origin=origin,
            )
        except sqlite3.Error as exc:
            if created:
                self.spool.discard(stored.path)
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                # The file fitted, the index could not grow: the disk is full all the same,
                # and the sender should hear so (0xA700, try again later), not "failed".
                raise SpoolFull(f"disk full: the index cannot grow ({exc})") from exc
            raise StorageFailure(f"index commit failed: {exc}") from exc
        if not created and not self.spool.holds(stored):
            # Bytes already held, and an eviction unlinked that file between this write
            # and this commit (it checks, in its own transaction, that no row names the
            # file: this row was not committed yet). The row is: the file must be too,
            # before success is answered (invariant 1). Same bytes, same name.
            if spill is not None:  # its bytes went with the file: the sender sends again
                raise StorageFailure("its file was evicted while it was filed: send it again")
            log.warning("%s: its file was evicted while it was filed; written again",
                        record.sop_instance_uid)
            self.spool.write(chunks)
        if outcome.conflict:
            log.warning("conflict: %s received again with other bytes than its current "
                        "version (version %d is now current, the others are kept)",
                        record.sop_instance_uid, outcome.version,
                        extra={"STUDY_UID": record.study_uid, "CALLING_AE": calling_ae})
        return Received(record.sop_instance_uid, record.study_uid, outcome.instance_id,
                        stored.sha256, stored.size, outcome.duplicate, outcome.conflict)


def _check_request(record: index.InstanceRecord, sop_class_uid: str,
                   sop_instance_uid: str) -> None:
    """The dataset must be the instance, of the class, its C-STORE request names: the file
    meta is written from the request and would contradict the body."""
    if record.sop_instance_uid != sop_instance_uid:
        raise InvalidInstance(
            f"SOPInstanceUID differs from the C-STORE request's: dataset "
            f"{record.sop_instance_uid}, request {sop_instance_uid}"
        )
    if record.sop_class_uid != sop_class_uid:
        raise DatasetMismatch(
            f"SOPClassUID differs from the C-STORE request's: dataset "
            f"{record.sop_class_uid}, request {sop_class_uid}")


def _read_dataset_record(header: bytes, dataset: bytes | bytearray | memoryview,
                         transfer_syntax_uid: str) -> index.InstanceRecord:
    """As :func:`_read_record`, for a network dataset whose encoding the transfer syntax
    names: parsed as it is, without first copying it behind its header and re-reading the
    meta. A deflated or unknown syntax takes the whole-file path (pydicom inflates there)."""
    syntax = UID(transfer_syntax_uid)
    if syntax.is_deflated:
        _check_inflation(dataset)
    if not syntax.is_transfer_syntax or syntax.is_deflated:
        return _read_record(header + bytes(dataset))  # (a spilled one is read into memory)
    _check_encoding(dataset, syntax)
    try:
        quick = read_header(dataset, syntax.is_implicit_VR, syntax.is_little_endian)
    except Truncated as exc:
        raise InvalidInstance(f"dataset truncated: {exc}") from None
    if quick is not None:  # well formed: only the elements the index reads (header.py)
        try:
            # The record first: it decodes the raw values itself; the pixel check goes
            # through pydicom, which converts the character set element and would send the
            # record down pydicom's slower path (0.2 ms more per image).
            record = record_from_raw(quick.dataset, str(syntax))
            _check_image_has_pixels(record.sop_class_uid, quick.has_pixel_data)
            if quick.pixel_length is not None and not syntax.is_compressed:
                _check_pixel_length(quick.dataset, quick.pixel_length)
            return record
        except InvalidInstance:
            raise
        except Exception as exc:  # as in _record: lazily converted values can raise
            raise InvalidInstance(f"cannot read the dataset's attributes: {exc}") from None
    reader = _BufferReader(dataset)
    try:
        # Read in place, values over DEFER_BYTES skipped: a spilled object (big endian,
        # or something unusual inside) is not copied into memory to be parsed.
        ds = read_dataset(reader, syntax.is_implicit_VR, syntax.is_little_endian,
                          defer_size=DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInstance(f"cannot parse the dataset: {exc}") from None
    finally:
        reader.close()
    _check_complete(ds, dataset)
    _read_deferred_index_values(ds, dataset)
    return _record(ds, syntax)


def _read_deferred_index_values(ds: Dataset, data: bytes | bytearray | memoryview) -> None:
    """A value the index reads that pydicom left unread (over ``DEFER_BYTES``: absurd for a
    description, but implicit VR allows it) is read here from where it lies; pydicom's own
    deferred read needs a file name, and the index would have kept the value empty.
    ``_check_complete`` has checked that every value lies inside ``data``."""
    for tag in WANTED.intersection(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            ds[tag] = raw._replace(value=bytes(data[raw.value_tell:
                                                    raw.value_tell + raw.length]))


# Values longer than this are not read by pydicom's parse of a received dataset: pixel data
# and large private blobs; the index reads none of them, their lengths are checked.
DEFER_BYTES = 1 << 20


class _BufferReader:
    """A read-only file over a buffer, for pydicom's reader. ``BytesIO`` would copy the
    buffer first: a spilled dataset is a mapped file of any size (invariant 8)."""

    def __init__(self, data: bytes | bytearray | memoryview):
        self._view = memoryview(data)
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._at + size
        chunk = bytes(self._view[self._at:end])
        self._at += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._at, len(self._view))[whence]
        self._at = max(0, base + offset)
        return self._at

    def tell(self) -> int:
        return self._at

    def close(self) -> None:
        self._view.release()


def _check_encoding(dataset: bytes | bytearray, syntax: UID) -> None:
    """Refuse a dataset not encoded with the VR rule its transfer syntax names. pydicom would
    notice, log a warning and read it anyway, and the file would be kept behind a file meta
    naming the negotiated syntax, which no other reader could then parse. The test is
    pydicom's own: an explicit-VR element has two upper-case letters after its tag."""
    if len(dataset) < 6:
        return  # too short to tell: the structural checks refuse it
    explicit_found = 0x40 < dataset[4] < 0x5B and 0x40 < dataset[5] < 0x5B
    if explicit_found == syntax.is_implicit_VR:
        found = "explicit" if explicit_found else "implicit"
        raise InvalidInstance(
            f"the dataset is encoded with {found} VR, not as its transfer syntax "
            f"({syntax.name}) says")


MAX_INFLATED_BYTES = 256 << 20


def _check_inflation(deflated: bytes | bytearray | memoryview) -> None:
    """pydicom inflates a deflated dataset whole, in memory: refuse one that would inflate
    past ``MAX_INFLATED_BYTES`` (a deflate bomb: 1 MB that inflates to 1 GiB took the
    daemon's memory up by 2.1 GB). Counted here as it inflates, a megabyte at a time, and
    thrown away; deflate is used for small objects (structured reports), not images."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    data = memoryview(deflated)
    total = 0
    try:
        for at in range(0, len(data), 1 << 16):
            pending: bytes | memoryview = data[at:at + (1 << 16)]
            while pending:
                total += len(inflater.decompress(pending, 1 << 20))
                if total > MAX_INFLATED_BYTES:
                    raise InvalidInstance(f"the deflated dataset inflates past "
                                          f"{MAX_INFLATED_BYTES >> 20} MB: refused")
                pending = inflater.unconsumed_tail
    except zlib.error:
        return  # not valid deflate data: pydicom's reader says what is wrong


def _check_complete(ds: Dataset, data: bytes | bytearray | memoryview) -> None:
    """pydicom's reader stops without complaint at a short final value or a partial element
    header; ``read_header`` catches that on the usual path, this on pydicom's."""
    last_end: int | None = None  # where the last element (in file order) ends, if known
    for element in ds.values():  # raw elements: nothing is converted here
        tell = getattr(element, "value_tell", None)
        length = getattr(element, "length", UNDEFINED_LENGTH)
        if tell is None or length == UNDEFINED_LENGTH:
            last_end = None  # a sequence pydicom read (its delimiters checked): end unknown
            continue
        value = getattr(element, "value", None)
        if tell + length > len(data) or (isinstance(value, bytes | bytearray)
                                         and len(value) < length):
            raise InvalidInstance(
                f"dataset truncated: element {element.tag} declares {length} bytes, "
                f"{max(0, len(data) - tell)} remain")
        last_end = tell + length
    if last_end is not None and any(data[last_end:]):
        raise InvalidInstance("dataset truncated: it ends inside an element header")


def _read_record(content: bytes | memoryview, *,
                 in_place: bool = False) -> index.InstanceRecord:
    """Parse the object's structure (every element's tag and length, sequences included): a
    truncated or unparseable one is refused here, before any byte reaches the spool. Values
    are not converted: an odd value in some element is the sender's business, and the bytes
    are kept exactly as sent. ``in_place``: ``content`` is a mapped file of any size (a
    spilled STOW-RS part), read where it lies, values over DEFER_BYTES left unread."""
    start = _dataset_offset(content)
    meta_syntax = _meta_syntax(content)
    if start is not None and meta_syntax.is_transfer_syntax and meta_syntax.is_deflated:
        _check_inflation(memoryview(content)[start:])  # before pydicom inflates it whole
    reader: Any = _BufferReader(content) if in_place else BytesIO(content)
    try:
        ds = dcmread(reader, force=True, defer_size=DEFER_BYTES if in_place else None)
        transfer_syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInstance(f"cannot parse the dataset: {exc}") from None
    finally:
        if in_place:
            reader.close()
    if transfer_syntax.is_transfer_syntax and not transfer_syntax.is_deflated:
        if start is not None:  # the network path's checks, on the file's dataset
            _check_encoding(content[start:start + 6], transfer_syntax)  # type: ignore[arg-type]
            try:
                read_header(memoryview(content)[start:], transfer_syntax.is_implicit_VR,
                            transfer_syntax.is_little_endian)
            except Truncated as exc:
                raise InvalidInstance(f"dataset truncated: {exc}") from None
        _check_complete(ds, content)  # offsets are the file's (inflated ones would not be)
    if in_place:
        _read_deferred_index_values(ds, content)
    return _record(ds, transfer_syntax)


def _reader(content: bytes | memoryview) -> Any:
    """A file over ``content``: BytesIO shares a bytes object, but would copy a mapped one."""
    return BytesIO(content) if isinstance(content, bytes) else _BufferReader(content)


def _meta_syntax(content: bytes | memoryview) -> UID:
    """The transfer syntax a Part 10 file's meta names ("" when it names none)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    handle = _reader(content)
    try:
        read_preamble(handle, True)
        return UID(str(_read_file_meta_info(handle).get("TransferSyntaxUID", "")))
    except Exception:  # noqa: BLE001 - no usable meta
        return UID("")
    finally:
        handle.close()


def _dataset_offset(content: bytes | memoryview) -> int | None:
    """Where the dataset starts in a Part 10 file: after the preamble and the file meta, as
    pydicom's reader finds it (element by element: a wrong group length, a known writer bug
    pydicom tolerates, must not shift it); None if that cannot be told."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    handle = _reader(content)
    try:
        read_preamble(handle, True)
        _read_file_meta_info(handle)
        return int(handle.tell())
    except Exception:  # noqa: BLE001 - no usable meta: the checks are skipped, pydicom read it
        return None
    finally:
        handle.close()


def _record(ds: Dataset, transfer_syntax: UID) -> index.InstanceRecord:
    try:
        # The element itself: ds.get() would give its value.
        # The raw element, not converted: a deferred one (not read) has no value, only its
        # length, which is what arrived (_check_complete verified it is all there).
        element = (ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds
                   else None)
        raw_length = getattr(element, "length", None)  # a RawDataElement's; None once converted
        undefined = (raw_length == UNDEFINED_LENGTH if raw_length is not None
                     else element is not None and element.is_undefined_length)
        if (element is not None and not undefined
                and transfer_syntax.is_transfer_syntax and not transfer_syntax.is_compressed):
            _check_pixel_length(ds, len(element.value) if element.value is not None
                                else raw_length or 0)
        record = instance_record(ds, str(transfer_syntax))
        _check_image_has_pixels(record.sop_class_uid,
                                any(tag in ds for tag in PIXEL_TAGS))
        return record
    except InvalidInstance:
        raise
    except Exception as exc:  # lazily converted values can still raise (found by fuzzing)
        raise InvalidInstance(f"cannot read the dataset's attributes: {exc}") from None


def _check_image_has_pixels(sop_class_uid: str, has_pixel_data: bool) -> None:
    """An image storage object without any pixel data element is logged, not refused: it is
    well formed (DCMTK's storescp takes it, and pydicom's test data holds such files), but
    it may be one cut short exactly at an element boundary, just before its pixels, which
    nothing else can tell from a complete object."""
    if not has_pixel_data and "Image Storage" in UID(sop_class_uid).name:
        log.warning("%s object without Pixel Data (7FE0,0010): stored as received; if the "
                    "sender did not mean it, the object was cut short",
                    UID(sop_class_uid).name)


def _check_pixel_length(ds: Dataset, actual: int) -> None:
    """pydicom reads a short final element without complaint; a truncated object usually
    ends in its pixel data, so compare what arrived (native pixel data of ``actual`` bytes)
    to what the header promises."""
    try:
        expected = get_expected_length(ds, unit="bytes")
    except (AttributeError, TypeError, ValueError, KeyError):
        return  # geometry incomplete: nothing reliable to compare against
    if not isinstance(expected, int):
        return  # a malformed geometry element (wrong VR): tolerated, stored as sent
    if actual < expected:
        raise InvalidInstance(
            f"PixelData is truncated: {actual} bytes, the header describes {expected}"
        )
