"""From the bytes of a received object to its index record, refusing what cannot be filed.

Owns: parsing a received dataset (the quick header walk of :mod:`appliance.ingest.header`,
pydicom when something is unusual) and every check that refuses an object before any byte of
it reaches the spool: truncation, a VR rule other than the transfer syntax's, a deflate bomb,
a SOP Class or Instance other than the request's, short pixel data. May not touch: the spool
(a deflated dataset is inflated by the inflater its caller hands it, which may put it in a
spool temp file), the index, the network: it reads bytes and returns an
:class:`~appliance.store.index.InstanceRecord` or raises
:class:`~appliance.ingest.attributes.InvalidInstance` naming the problem.
Split from receive.py (which keeps the filing order of invariant 1) to keep each under ~600
lines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from io import BytesIO
from types import SimpleNamespace
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRLittleEndian

from appliance.ingest.attributes import (
    DatasetMismatch,
    InvalidInstance,
    instance_record,
    pixel_geometry,
    record_from_raw,
)
from appliance.ingest.header import PIXEL_DATA, PIXEL_TAGS, WANTED, Truncated, read_header
from appliance.store import index
from appliance.store.inflate import InflateError, inflated

UNDEFINED_LENGTH = 0xFFFFFFFF

# Inflates a deflated dataset: (deflated bytes, limit=) -> a context giving the inflated
# bytes as a buffer (appliance.store.inflate.inflated, bound to the receiver's spool).
Inflater = Callable[..., AbstractContextManager[memoryview]]

log = logging.getLogger("pas.ingest")


def check_request(record: index.InstanceRecord, sop_class_uid: str,
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


def read_dataset_record(header: bytes, dataset: bytes | bytearray | memoryview,
                         transfer_syntax_uid: str, *,
                         inflate: Inflater | None = None) -> index.InstanceRecord:
    """As :func:`read_record`, for a network dataset whose encoding the transfer syntax
    names: parsed as it is, without first copying it behind its header and re-reading the
    meta. A deflated one is inflated by ``inflate`` (see :func:`_read_deflated`); an unknown
    syntax takes the whole-file path."""
    syntax = UID(transfer_syntax_uid)
    if syntax.is_deflated and len(dataset):
        return _read_deflated(dataset, syntax, inflate)
    if not syntax.is_transfer_syntax or syntax.is_deflated:
        return read_record(header + bytes(dataset))  # (a spilled one is read into memory)
    return _read_plain(dataset, syntax, syntax)


def _read_plain(dataset: bytes | bytearray | memoryview, syntax: UID,
                recorded_as: UID) -> index.InstanceRecord:
    """The record of a dataset encoded as ``syntax`` names (not deflated), read where it
    lies; indexed under ``recorded_as`` (for an inflated dataset, the deflated syntax it
    arrived in)."""
    _check_encoding(dataset, syntax, recorded_as)
    try:
        quick = read_header(dataset, syntax.is_implicit_VR, syntax.is_little_endian)
    except Truncated as exc:
        raise InvalidInstance(f"dataset truncated: {exc}") from None
    if quick is not None:  # well formed: only the elements the index reads (header.py)
        try:
            # The record first: it decodes the raw values itself; the pixel check goes
            # through pydicom, which converts the character set element and would send the
            # record down pydicom's slower path (0.2 ms more per image). That check reads
            # the geometry the record already decoded (pixel_geometry); pydicom converts
            # the raw elements only when one is unusual.
            record = record_from_raw(quick.dataset, str(recorded_as))
            _check_image_has_pixels(record.sop_class_uid, quick.has_pixel_data)
            if quick.pixel_length is not None and not syntax.is_compressed:
                geometry = pixel_geometry(quick.dataset, record)
                _check_pixel_length(quick.dataset if geometry is None else geometry,
                                    quick.pixel_length)
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
    return _record(ds, recorded_as)


# A deflated dataset that inflates past this is refused (a deflate bomb). Ingest no longer
# holds the inflated dataset in memory (:func:`_read_deflated`), so the bound is not ingest's
# RAM but what the rest of PAS does with a deflated object: each copy in another syntax
# inflates it again onto the spool, and the readers that still use pydicom's whole-file read
# (the pack stage's layout probe, WADO-RS rendered media, the hub's archive) inflate it in
# memory. Deflate is meant for small objects (structured reports); 256 MiB keeps a bomb from
# costing more than that anywhere, and refuses it as invalid (0xC210), not as out of
# resources (0xA700, which a sender retries for ever), as a quota-bound limit would.
MAX_INFLATED_BYTES = 256 << 20


def _in_memory(deflated: bytes | bytearray | memoryview, *,
               limit: int) -> AbstractContextManager[memoryview]:
    """The inflater without a spool (tests, tools): all in memory, up to ``limit``."""
    return inflated(deflated, limit=limit, spool=None)


def _read_deflated(deflated: bytes | bytearray | memoryview, syntax: UID,
                   inflate: Inflater | None) -> index.InstanceRecord:
    """A Deflated Explicit VR Little Endian dataset (PS3.5 A.5), inflated by ``inflate``
    (the receiver's puts what passes a few MB into a spool temp file counted against the
    quota, and maps it), refused past ``MAX_INFLATED_BYTES`` as it inflates, then read in
    place as any explicit little endian dataset, with the same checks (truncation, VR rule,
    pixel length). pydicom inflated it whole in memory, then parsed that copy: ~2x its
    inflated size of RAM. The file kept is the deflated bytes as sent (invariant 4)."""
    try:
        with (inflate or _in_memory)(deflated, limit=MAX_INFLATED_BYTES) as plain:
            return _read_plain(plain, UID(ExplicitVRLittleEndian), syntax)
    except InflateError as exc:
        raise InvalidInstance(str(exc)) from None


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


def _check_encoding(dataset: bytes | bytearray | memoryview, syntax: UID,
                    named: UID | None = None) -> None:
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
            f"({(named or syntax).name}) says")


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


def read_record(content: bytes | memoryview, *, in_place: bool = False,
                inflate: Inflater | None = None) -> index.InstanceRecord:
    """Parse the object's structure (every element's tag and length, sequences included): a
    truncated or unparseable one is refused here, before any byte reaches the spool. Values
    are not converted: an odd value in some element is the sender's business, and the bytes
    are kept exactly as sent. ``in_place``: ``content`` is a mapped file of any size (a
    spilled STOW-RS part), read where it lies, values over DEFER_BYTES left unread.
    ``inflate``: how a deflated dataset is inflated (see :func:`_read_deflated`)."""
    start = _dataset_offset(content)
    meta_syntax = _meta_syntax(content)
    if start is not None and start < len(content) and meta_syntax.is_transfer_syntax \
            and meta_syntax.is_deflated:
        return _read_deflated(memoryview(content)[start:], meta_syntax, inflate)
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
            _check_encoding(content[start:start + 6], transfer_syntax)
            try:
                read_header(memoryview(content)[start:], transfer_syntax.is_implicit_VR,
                            transfer_syntax.is_little_endian)
            except Truncated as exc:
                raise InvalidInstance(f"dataset truncated: {exc}") from None
        _check_complete(ds, content)  # offsets are the file's (inflated ones would not be)
    if in_place:
        _read_deferred_index_values(ds, content)
    return _record(ds, transfer_syntax)


def read_file_record(content: memoryview, *,
                     inflate: Inflater | None = None) -> index.InstanceRecord:
    """The record of a whole stored Part 10 file, read where it lies (mapped): its dataset
    by the quick walk of the network path (:func:`read_dataset_record`) when the file meta
    names a transfer syntax, else as :func:`read_record` reads a file. What the header
    backfill (``appliance/ops/backfill.py``) reads: the record ingest made of the same
    bytes, a quarter of read_record's cost (pydicom parses every element there)."""
    start = _dataset_offset(content)
    syntax = _meta_syntax(content)
    if start is None or not syntax.is_transfer_syntax:
        return read_record(content, in_place=True, inflate=inflate)
    return read_dataset_record(b"", content[start:], str(syntax), inflate=inflate)


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


def _check_pixel_length(ds: Dataset | SimpleNamespace, actual: int) -> None:
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
