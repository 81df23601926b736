"""The durable receive path shared by C-STORE and STOW-RS (invariant 1).

Order matters and is the whole point of this module: read the header (refuse what cannot be
filed) -> check room -> write the bytes exactly as received, fsync, rename, fsync the
directory -> commit the index row -> only then report success to the caller, who answers the
sender. Any failure before the commit leaves no new file behind.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import generate_uid

from appliance import __version__
from appliance.ingest.attributes import InvalidInstance, instance_record
from appliance.store import index
from appliance.store.db import Database
from appliance.store.spool import Spool, SpoolFull

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


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                  source_ae: str | None = None) -> bytes:
    """Preamble and file meta for a dataset received over the network (which has none).

    The receive path passes no ``source_ae``: the meta then depends on the dataset alone, so
    the same instance sent again from another AE title is the same file (a duplicate, not a
    conflict uploaded twice). The calling AE is kept in the index instead."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae[:16]
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue()


class Receiver:
    """Files received objects durably. Thread-safe: one per daemon, shared by associations."""

    def __init__(self, db: Database, spool: Spool, usage_refresh_s: float = 2.0):
        self.db = db
        self.spool = spool
        # The spool's size, for the quota check: summing the index on every C-STORE is
        # O(instances), so it is read every few seconds (evictions lower it meanwhile) and
        # this process's own writes are added as they happen.
        self._usage_lock = threading.Lock()
        self._usage_bytes = 0
        self._usage_read_at = -1e9
        self._usage_refresh_s = usage_refresh_s

    def _used_bytes(self) -> int:
        with self._usage_lock:
            if time.monotonic() - self._usage_read_at > self._usage_refresh_s:
                self._usage_bytes = index.spool_bytes(self.db)
                self._usage_read_at = time.monotonic()
            return self._usage_bytes

    def _count_written(self, size: int) -> None:
        with self._usage_lock:
            self._usage_bytes += size

    def receive_dataset(self, dataset: bytes, *, transfer_syntax_uid: str, sop_class_uid: str,
                        sop_instance_uid: str, calling_ae: str | None = None,
                        called_ae: str | None = None, source: str | None = None) -> Received:
        """A dataset as it travelled in P-DATA: kept byte for byte behind a file meta."""
        header = part10_header(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        return self.receive_file(header + dataset, calling_ae=calling_ae, called_ae=called_ae,
                                 source=source, expect_sop_instance_uid=sop_instance_uid)

    def receive_file(self, content: bytes, *, calling_ae: str | None = None,
                     called_ae: str | None = None, source: str | None = None,
                     expect_sop_instance_uid: str | None = None,
                     origin: str = "local") -> Received:
        """A whole Part 10 file (STOW-RS, a fetched instance, or a C-STORE made into one)."""
        record = _read_record(content)
        if expect_sop_instance_uid and record.sop_instance_uid != expect_sop_instance_uid:
            raise InvalidInstance(
                f"SOPInstanceUID in the dataset ({record.sop_instance_uid}) differs from the "
                f"one in the C-STORE request ({expect_sop_instance_uid})"
            )
        self.spool.check_room(len(content), self._used_bytes())
        try:
            stored, created = self.spool.write([content])
        except OSError as exc:
            raise SpoolFull(f"cannot write to the spool: {exc.strerror or exc}") from exc
        try:
            outcome = index.record_instance(
                self.db, record, stored, calling_ae=calling_ae, called_ae=called_ae,
                source_address=source, origin=origin,
            )
        except sqlite3.Error as exc:
            if created:
                self.spool.discard(stored.path)
            raise StorageFailure(f"index commit failed: {exc}") from exc
        if created:
            self._count_written(stored.size)
        if outcome.conflict:
            log.warning("conflict: %s received again with other bytes (version %d kept)",
                        record.sop_instance_uid, outcome.version,
                        extra={"STUDY_UID": record.study_uid, "CALLING_AE": calling_ae})
        return Received(record.sop_instance_uid, record.study_uid, outcome.instance_id,
                        stored.sha256, stored.size, outcome.duplicate, outcome.conflict)


def _read_record(content: bytes) -> index.InstanceRecord:
    """Parse the object's structure (every element's tag and length, sequences included): a
    truncated or unparseable one is refused here, before any byte reaches the spool. Values
    are not converted: an odd value in some element is the sender's business, and the bytes
    are kept exactly as sent."""
    try:
        ds = dcmread(BytesIO(content), force=True)
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInstance(f"cannot parse the dataset: {exc}") from None
    try:
        if ds.get("PixelData") is not None:
            _check_pixel_length(ds)
        return instance_record(ds, transfer_syntax)
    except InvalidInstance:
        raise
    except Exception as exc:  # lazily converted values can still raise (found by fuzzing)
        raise InvalidInstance(f"cannot read the dataset's attributes: {exc}") from None


def _check_pixel_length(ds: Dataset) -> None:
    """pydicom reads a short final element without complaint; a truncated object usually
    ends in its pixel data, so compare what arrived to what the header promises."""
    element = ds["PixelData"]
    syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if element.is_undefined_length or syntax is None or syntax.is_compressed:
        return
    try:
        expected = get_expected_length(ds, unit="bytes")
    except (AttributeError, TypeError, ValueError, KeyError):
        return  # geometry incomplete: nothing reliable to compare against
    if not isinstance(expected, int):
        return  # a malformed geometry element (wrong VR): tolerated, stored as sent
    actual = len(element.value)
    if actual < expected:
        raise InvalidInstance(
            f"PixelData is truncated: {actual} bytes, the header describes {expected}"
        )
