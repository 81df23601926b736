"""A stored instance re-encoded in Explicit or Implicit VR Little Endian, written to a spool
temp file with bounded memory (invariant 8), for a peer that does not accept the stored
transfer syntax: a WADO-RS client, a C-GET/C-MOVE viewer, a DICOM destination.

Owns: the conversion (decompression of encapsulated Pixel Data, byte swap of Explicit VR Big
Endian, implicit <-> explicit VR) and the temp file it writes. May not touch: the database,
the filed instances (read only), the network; the callers send the file and remove it
(:func:`transcoded` / :func:`open_transcoded` do that for them).

Why: the three callers decoded the whole object with pydicom (``dcmread`` + ``decompress`` or
a byte swap, then an encoding in memory): a 300 MB object took the daemon up by 1.2 GB. Here
the elements read are the small ones (``defer_size``); a large value is a buffer that
pydicom's writer copies in chunks (byte-swapped on the way when stored big endian), and the
Pixel Data is decoded one frame at a time as it is written. A Deflated Explicit VR Little
Endian object is first inflated a megabyte at a time into a spool temp file of its own
(:mod:`appliance.store.inflate`; its room reserved as it grows, removed with the copy, or
when the copy fails), then read from there like any explicit
little endian one: pydicom inflated it whole, in memory. The result is, byte for byte,
what pydicom's whole-object decode gives (``decompress(as_rgb=False,
generate_instance_uid=False)``, or the word swap the dicom destination did, then
``save_as(enforce_file_format=True)``): the same writer writes it, from a dataset prepared
as ``decompress`` prepares it (Photometric Interpretation, Planar Configuration, Number of
Frames, Pixel Data OB/OW of defined length). The SOP Instance UID is kept: it is the same
instance in another syntax. A lossless copy holds the very samples stored: a colour image
keeps its YBR_FULL (``as_rgb=False``; ``decompress()``'s default converted it to RGB, not
losslessly); only the lossy JPEG processes' colour goes RGB, as before
(:func:`decoded_as_rgb`). Samples a decoder upsampled from YBR_FULL_422 are YBR_FULL.

Large values of other VRs are copied from the file too where pydicom's writer writes the
bytes read unchanged (:func:`_as_read`): a UN value that stays UN (a private element pydicom
does not know, a standard one of 64 kB or more) or becomes OB..OW (a private one it knows),
and any value when the copy keeps the stored Implicit VR (no VR is written, the raw bytes
are). Limits, read whole as the writer converts them: a large text value (UT, LT...) in an
Explicit VR copy (its writer encodes a str and takes no buffer) or when the VR encoding
changes (decoded, encoded again: the bytes may change), a sequence of defined length, a
value of odd or undefined length; in a big endian object every value but the OB..OW ones, a
UN among them (copied as stored, unswapped, as the old whole-object swap left it: its
structure is unknown). Every frame must decode to the same size and properties as the
first, and to as many frames as Number of Frames announces: otherwise
:class:`TranscodeError`.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomIO
from pydicom.filereader import (
    _read_command_set_elements,
    _read_file_meta_info,
    read_dataset,
    read_deferred_data_element,
    read_file_meta_info,
    read_preamble,
)
from pydicom.filewriter import dcmwrite
from pydicom.hooks import hooks
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)
from pydicom.valuerep import BUFFERABLE_VRS, VR

from appliance.store import inflate as inflating
from appliance.store.spool import Spool, SpoolFull

PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
# Top-level values longer than this are not read: copied from the file as they are written.
DEFER_BYTES = 64 << 10
TARGETS = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
# Values made of words whose bytes a big endian encoding reverses: VR -> word size.
WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
WRITE_BUFFER = 1 << 20
# The lossy JPEG processes whose colour pixels are decoded to RGB (see decoded_as_rgb).
LOSSY_RGB = frozenset({str(JPEGBaseline8Bit), str(JPEGExtended12Bit)})


class TranscodeError(Exception):
    """The stored instance cannot be produced in the syntax asked (the message says why)."""


@contextlib.contextmanager
def transcoded(spool: Spool, source: Path, syntax: str) -> Iterator[Path]:
    """The instance at ``source`` in ``syntax`` as a spool temp file, removed on leaving
    (sent or not: an error or a cancel leaves nothing behind)."""
    path = write_transcoded(spool, source, syntax)
    try:
        yield path
    finally:
        spool.remove_temp(path)


def open_transcoded(spool: Spool, source: Path, syntax: str) -> BinaryIO:
    """The instance at ``source`` in ``syntax``, open for reading from a temp file already
    removed from the spool (its bytes go when the caller closes it, or drops it; its room
    counts against the spool's quota until then)."""
    path = write_transcoded(spool, source, syntax)
    try:
        raw = io.FileIO(path, "rb")
    except BaseException:
        spool.remove_temp(path)
        raise
    spool.remove_temp(path, keep_room=True)
    return _OpenCopy(raw, lambda: spool.release_room(path))


class _OpenCopy(io.BufferedReader):
    """A removed temp copy open for reading: closing it (or dropping it: the garbage
    collector closes it) frees its bytes on the disk, and gives its room back to the
    spool's quota at the same moment."""

    def __init__(self, raw: io.FileIO, release: Callable[[], None]):
        super().__init__(raw)
        self._release: Callable[[], None] | None = release

    def close(self) -> None:
        try:
            super().close()
        finally:
            release, self._release = getattr(self, "_release", None), None
            if release is not None:
                release()


def write_transcoded(spool: Spool, source: Path, syntax: str) -> Path:
    """Write the instance at ``source`` in ``syntax`` (Explicit or Implicit VR Little Endian)
    to a new spool temp file; its path, for the caller to remove (``spool.remove_temp``).
    Raises TranscodeError, SpoolFull (the copy would cut into the free-space floor or take
    the spool past its quota) or OSError; a half-written temp file is removed first, as is
    the inflated dataset of a deflated object in every case."""
    if syntax not in TARGETS:
        raise TranscodeError(f"transfer syntax {syntax} is not produced here; "
                             f"only {' or '.join(TARGETS)}")
    try:
        with contextlib.ExitStack() as held:  # the files values are copied from
            ds, fd, room = _read(spool, source, held)
            _prepare(ds, fd, UID(syntax))
            # The copy's size, at most: the decoded pixels and everything else the file holds.
            room += _decompress(ds) if _decoded(ds) else 0
            ds.file_meta.TransferSyntaxUID = syntax
            path, out_fd = spool.open_temp(room)
            try:
                with os.fdopen(out_fd, "wb", buffering=WRITE_BUFFER) as out:
                    dcmwrite(_Output(out), ds, enforce_file_format=True)
            except BaseException:
                spool.remove_temp(path)
                raise
            return path
    except (TranscodeError, SpoolFull):
        raise
    except BaseException as exc:
        # pydicom's refusals are of many kinds; a Rust decoder (pylibjpeg-rle) panics on
        # some damaged frames, a BaseException that would end the thread serving the viewer.
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise TranscodeError(f"{source.name}: cannot be re-encoded in {UID(syntax).name}: "
                             f"{exc}") from exc


def _read(spool: Spool, source: Path,
          held: contextlib.ExitStack) -> tuple[FileDataset, int, int]:
    """The stored dataset, its large values left in the file (``defer_size``); a descriptor
    on that file (the inflated copy for a deflated object), closed with ``held``; the bytes
    the copy takes at most, not counting decoded pixels."""
    deflated = UID(read_file_meta_info(source).get("TransferSyntaxUID", "")).is_deflated
    if deflated and (read := _inflated(spool, source, held)) is not None:
        return read
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    held.callback(os.close, fd)
    return dcmread(source, defer_size=DEFER_BYTES), fd, os.fstat(fd).st_size


def _inflated(spool: Spool, source: Path,
              held: contextlib.ExitStack) -> tuple[FileDataset, int, int] | None:
    """A deflated object read as ``dcmread`` reads it (``read_partial``: the preamble, the
    file meta, then the dataset inflated), but inflated a chunk at a time into a spool temp
    file, which ``held`` removes, and read from there with its large values left in it:
    offsets in the stored file are not offsets in the dataset. None when no dataset follows
    the file meta (nothing to inflate: ``dcmread`` reads it as it is)."""
    with open(source, "rb") as stored:
        preamble = read_preamble(stored, False)
        file_meta = _read_file_meta_info(stored)
        command_set = _read_command_set_elements(stored)
        start = stored.tell()
        if not stored.read(1):
            return None
        stored.seek(start)
        # (InflateError, a stream cut short or not deflate, is named by write_transcoded.)
        path = inflating.inflate_to_temp(
            spool, iter(lambda: stored.read(inflating.INFLATE_CHUNK), b""))
        held.callback(spool.remove_temp, path)
    read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    held.callback(os.close, read_fd)
    with open(path, "rb") as handle:
        dataset = read_dataset(handle, False, True, defer_size=DEFER_BYTES)
    if command_set:
        dataset.update(command_set)
    ds = FileDataset(str(path), dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds, read_fd, start + os.fstat(read_fd).st_size


def _decoded(ds: Dataset) -> bool:
    return UID(ds.file_meta.TransferSyntaxUID).is_compressed and PIXEL_DATA in ds


def _prepare(ds: FileDataset, fd: int, syntax: UID) -> None:
    """Large values made buffers over ``fd``, read whole where they must be (see the module's
    docstring); everything converted to little endian when stored big endian."""
    stored = UID(ds.file_meta.TransferSyntaxUID)
    decode = _decoded(ds)
    swap = not stored.is_little_endian
    bits = int(ds.get("BitsAllocated", 16) or 16)
    size = os.fstat(fd).st_size
    # Whether pydicom's writer converts every element (another VR encoding or character
    # set) rather than writing the raw ones as read.
    converted = (ds.original_encoding != (syntax.is_implicit_VR, syntax.is_little_endian)
                 or ds.original_character_set != ds._character_set)
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if decode and tag == PIXEL_DATA:
            if _deferred(raw):  # the fragments, read from the file as they are decoded
                _replace(ds, DataElement(tag, VR.OB, _FileRange(fd, raw.value_tell,
                                                                size - raw.value_tell)))
            continue
        if _deferred(raw):
            # (An odd length, malformed, is read whole: pydicom's writer would pad a
            # buffered OB after writing its odd length.)
            even = raw.length != UNDEFINED_LENGTH and raw.length % 2 == 0
            vr = _vr(raw) if even else None
            if vr in BUFFERABLE_VRS:
                word = word_size(vr, tag, bits, raw.length) if swap else 1
                _replace(ds, DataElement(tag, vr, _FileRange(fd, raw.value_tell,
                                                             raw.length, word)))
                continue
            vr = _as_read(ds, raw, converted) if even and not swap else None
            if vr is not None:
                value = _FileRange(fd, raw.value_tell, raw.length)
                _replace(ds, _unknown(tag, value) if vr == VR.UN else DataElement(tag, vr,
                                                                                  value))
                continue
            # Read whole, still raw, as a full read leaves it (converting it could change
            # it: a UN given its dictionary VR); the writer converts it if it must.
            _replace(ds, read_deferred_data_element(open, ds.filename, None, raw))
        if swap:
            swap_words(ds[tag], bits)  # read, converted while the encoding is big endian
    if swap:
        # What the dicom destination's swap did (every element converted, word values
        # swapped): the dataset is little endian now.
        ds.set_original_encoding(False, True, ds.original_character_set)


def _as_read(ds: Dataset, raw: RawDataElement, converted: bool) -> str | None:
    """The VR to give a buffer over this little endian value when pydicom's writer writes it
    as the bytes read (None: it does not, read it whole). Unconverted, a raw element is
    written as read: in implicit VR whatever its VR (none is written: a UN), in explicit VR
    a UN (the VR read is written, and the writer of a text VR takes no buffer). Converted, a
    value stays bytes when pydicom gives it the VR UN (a private element it does not know, a
    standard one of 64 kB or more, written UN) or one of OB..OW (a private one it knows),
    asked of its own hook."""
    if not converted:
        return VR.UN if raw.is_implicit_VR or raw.VR == VR.UN else None
    data: dict[str, Any] = {}
    # The hook reads only the value's length (a standard UN shorter than 0xFFFF bytes takes
    # its dictionary VR); it may convert the private creator, as the writer does next.
    hooks.raw_element_vr(raw._replace(value=_Unread(raw.length)), data, ds=ds,
                         **hooks.raw_element_kwargs)
    vr = str(data["VR"])
    return vr if vr == VR.UN or vr in WORD_SIZE or vr == VR.OB else None


def _unknown(tag: int, value: _FileRange) -> DataElement:
    """A UN element whose value is copied from the file as it is written. pydicom's setter
    takes a buffer for the OB..OW VRs only; its UN writer hands the value to the output's
    write as it is, which :class:`_Output` copies in chunks."""
    elem = DataElement(tag, VR.OB, value)
    elem.VR = VR.UN
    return elem


class _Unread:
    """The value of a deferred element, of which only the length is known."""

    def __init__(self, length: int):
        self._length = length

    def __len__(self) -> int:
        return self._length


def _replace(ds: Dataset, elem: DataElement | RawDataElement) -> None:
    """Put an element in place of the deferred one, touching nothing else: ``ds[tag] = ``
    on a private element converts its private creator (a UN creator became LO, which a full
    read left as it was)."""
    ds._dict[elem.tag] = elem


def _deferred(raw: Any) -> bool:
    return isinstance(raw, RawDataElement) and raw.value is None and raw.length != 0


def _vr(raw: RawDataElement) -> str | None:
    """The VR of a deferred element (the dictionary's when the encoding is implicit)."""
    if raw.VR:
        return str(raw.VR)
    try:
        return str(dictionary_VR(raw.tag))
    except KeyError:
        return None  # private, unknown: see _as_read


def word_size(vr: str, tag: int, bits: int, length: int) -> int:
    """Bytes swapped together when a big endian value is made little endian (1: none); also
    what WADO-RS swaps a big endian object's frames, bulk data and InlineBinary by."""
    size = WORD_SIZE.get(vr, 1)
    if tag == PIXEL_DATA and size == 2 and bits in (32, 64):
        size = bits // 8  # pixel cells wider than a word
    return 1 if length % size else size  # malformed length: left as it is rather than guessed


def swap_words(elem: DataElement, bits: int) -> None:
    """An element read from a big endian dataset, made little endian: the word values
    pydicom keeps as bytes are swapped (in sequences too)."""
    elements = [elem]
    if elem.VR == VR.SQ:
        elements += [e for item in elem.value for e in item.iterall()]
    for element in elements:
        value = element.value
        if str(element.VR) in WORD_SIZE and isinstance(value, bytes | bytearray):
            size = word_size(str(element.VR), int(element.tag), bits, len(value))
            if size > 1:
                element.value = swap_bytes(value, size)


def swap_bytes(data: bytes | bytearray, word: int) -> bytes:
    """``data`` (a whole number of ``word``-byte words) with each word's bytes reversed: a
    big endian value made little endian."""
    return np.frombuffer(data, dtype=f">u{word}").astype(f"<u{word}").tobytes()


def decoded_as_rgb(syntax: str) -> bool:
    """Whether the decoded pixels of a colour image stored in ``syntax`` are converted to RGB
    (pydicom's ``as_rgb``): only for the lossy JPEG processes (baseline, extended), whose
    YCbCr samples are a lossy coding's output anyway and which every decoder, pydicom's
    ``decompress()`` included, hands out as RGB. Everywhere else the samples decoded are
    the ones stored: a lossless RLE (or JPEG-LS, JPEG lossless) YBR_FULL image converted to
    RGB lost up to 3 levels in 10 % of its samples (up to 114 outside the RGB gamut), a
    lossy colour conversion nobody asked for (invariant 4; review s40/bitexact finding 1).
    JPEG 2000's RCT/ICT is undone by the codec itself: its pixels are RGB either way."""
    return str(syntax) in LOSSY_RGB


def decoded_photometric(properties: dict[str, Any]) -> str:
    """The Photometric Interpretation of pixels as pydicom's decoders give them: theirs,
    except YBR_FULL_422, which they report for samples they have already upsampled to full
    resolution (three bytes a pixel): YBR_FULL is what those samples are (PS3.3
    C.7.6.3.1.2)."""
    photometric = str(properties["photometric_interpretation"])
    return "YBR_FULL" if photometric == "YBR_FULL_422" else photometric


def _decompress(ds: Dataset) -> int:
    """Prepare ``ds`` as pydicom's ``decompress(as_rgb=..., generate_instance_uid=False)``
    leaves it (``as_rgb`` from :func:`decoded_as_rgb`), its Pixel Data a stream of frames
    decoded as they are read; the decoded length."""
    stored = UID(ds.file_meta.TransferSyntaxUID)
    decoder = get_decoder(stored)
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise TranscodeError(f"no decoder for {stored.name} ({missing})")
    count = int(as_pixel_options(ds)["number_of_frames"])
    frames = decoder.iter_array(ds, as_rgb=decoded_as_rgb(stored))
    first, properties = next(frames)
    stream = _Frames(first.tobytes(), properties, frames, count)
    elem = ds["PixelData"]
    elem.value = stream
    elem.is_undefined_length = False
    elem.VR = VR.OB if ds.BitsAllocated <= 8 else VR.OW
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = decoded_photometric(properties)
    if int(properties["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = properties["planar_configuration"]
    if "NumberOfFrames" in ds or count > 1:
        ds.NumberOfFrames = count
    return stream.length


class _Output(DicomIO):
    """The copy's file as pydicom's writer sees it, that also takes a value stream (a UN
    value, see :func:`_unknown`) and copies it in chunks."""

    def __init__(self, file: BinaryIO):
        super().__init__(file)
        self._write_bytes = file.write
        self.write = self._write  # type: ignore[method-assign]  # DicomIO binds file.write

    def _write(self, data: Any) -> int:
        if not isinstance(data, _ValueStream):
            return self._write_bytes(data)
        written = 0
        while chunk := data.read(WRITE_BUFFER):
            written += self._write_bytes(chunk)
        return written


class _ValueStream(io.BufferedIOBase):
    """A value of known ``length`` that pydicom's writer reads in chunks: the position
    plumbing both kinds below share (``read`` is theirs)."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.length}
        self._position = max(0, base[whence] + offset)
        return self._position

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)


class _FileRange(_ValueStream):
    """``length`` bytes of a file from ``offset``, read with pread (no shared file position),
    each ``word`` bytes reversed (a big endian value made little endian) when ``word`` > 1."""

    def __init__(self, fd: int, offset: int, length: int, word: int = 1):
        super().__init__(length)
        self._fd, self._offset, self._word = fd, offset, word

    def read(self, size: int | None = -1) -> bytes:
        end = self.length if size is None or size < 0 else min(self.length,
                                                               self._position + size)
        if end <= self._position:
            return b""
        start = self._position - self._position % self._word
        stop = -(-end // self._word) * self._word  # whole words
        data = os.pread(self._fd, stop - start, self._offset + start)
        if len(data) != stop - start:
            raise OSError(f"the stored file ends {stop - start - len(data)} bytes short of "
                          "a value")
        if self._word > 1:
            data = swap_bytes(data, self._word)
        chunk = data[self._position - start:end - start]
        self._position = end
        return chunk


class _Frames(_ValueStream):
    """Decoded frames as one value, each decoded when the writer reaches it: one frame in
    memory at a time. Read from start to end (the writer's single pass); seeking only moves
    the position that ``tell`` reports and the end is known ahead (the writer asks for the
    length before it writes the value)."""

    def __init__(self, first: bytes, properties: dict[str, Any],
                 rest: Iterator[tuple[Any, dict[str, Any]]], count: int):
        decoded = len(first) * count
        if decoded >= 2**32 - 1:  # Part 5, 8.1.1: a 32-bit value length
            raise TranscodeError(f"{decoded} bytes of decoded pixels do not fit one value")
        super().__init__(decoded + decoded % 2)  # padded to an even length, as decompress
        self._frame_length, self._properties = len(first), properties
        self._rest: Iterator[tuple[Any, dict[str, Any]]] | None = rest
        self._count = count
        self._current, self._used, self._served, self._frames = first, 0, 0, 1

    def read(self, size: int | None = -1) -> bytes:
        if self._position >= self.length:
            if self._position == self._served and self._rest is not None:
                self._check_exhausted()
            return b""
        if self._position != self._served:
            raise io.UnsupportedOperation("decoded frames are read once, in order")
        if self._used == len(self._current):
            self._next_frame()
        want = len(self._current) - self._used if size is None or size < 0 else size
        chunk = self._current[self._used:self._used + want]
        self._used += len(chunk)
        self._served += len(chunk)
        self._position = self._served
        return chunk

    def _check_exhausted(self) -> None:
        """More frames than announced would have changed Number of Frames, written before."""
        rest, self._rest = self._rest, None
        if rest is not None and next(rest, None) is not None:
            raise TranscodeError(f"more frames decoded than Number of Frames ({self._count})")

    def _next_frame(self) -> None:
        if self._frames == self._count:  # every frame served: the padding byte
            self._check_exhausted()
            self._current, self._used = b"\x00", 0
            return
        assert self._rest is not None
        try:
            array, properties = next(self._rest)
        except StopIteration:
            raise TranscodeError(f"{self._frames} frames decoded, Number of Frames is "
                                 f"{self._count}") from None
        frame = array.tobytes()
        if len(frame) != self._frame_length or properties != self._properties:
            raise TranscodeError(f"frame {self._frames + 1} decodes to {len(frame)} bytes "
                                 f"({properties}), the first to {self._frame_length} "
                                 f"({self._properties})")
        self._current, self._used = frame, 0
        self._frames += 1
