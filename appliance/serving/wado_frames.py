"""WADO-RS ``/frames/{list}``: which representation the frames of an instance are sent in,
and reading them one at a time (no HTTP in it; the handler is ``wado_rs.py``'s).

A frame goes either as native little-endian pixels (``application/octet-stream``, decoded
first when stored compressed) or, for an instance stored in a compressed syntax, as its
compressed bitstream exactly as stored: the frame's fragments joined, as pydicom's
``encaps.get_frame`` finds them from the Extended or Basic Offset Table or the fragment walk
(PS3.5 A.4), read from the file frame by frame. Before, every frame of an instance stored
compressed was decoded: a viewer that asked for the stored bitstream got a 406, and one that
left the choice to PAS (``transfer-syntax=*``, as OHIF's cornerstone DICOM image loader asks
for every frame) got pixels several times the size on the LAN and PAS's CPU spent decoding
them, for a viewer that decodes JPEG-LS or JPEG 2000 itself.

What was followed:

- PS3.18 (2024d) 8.7.3.3.2, Table 8.7.3-5: the media type of compressed frames per
  transfer syntax, each type's default (D) and optional ones (:data:`FRAME_MEDIA`);
  compressed bulk data is "only the compressed octet stream without the fragment
  delimiters", each frame of a multi-frame encoded separately.
- PS3.18 8.7.3.5.2: ``transfer-syntax=*`` "indicates that the user agent will accept any
  Transfer Syntax", which lets the origin server answer "without needing to transcode".
- PS3.18 8.7.8.2: the syntax of a part is its range's ``transfer-syntax`` parameter, else
  the default of its media type; it may differ per part and is named in the part.
- The Orthanc DICOMweb plugin (``Plugin/WadoRsRetrieveFrames.cpp``) answers
  ``application/octet-stream; transfer-syntax=*`` with the stored syntax and names the part
  ``<media>; transfer-syntax=<uid>``; the cornerstone loader picks its decoder from that
  parameter (``getTransferSyntaxForContentType``). The ``image/x-jls`` and
  ``image/x-dicom-rle`` those older clients send are read as ``image/jls`` and
  ``image/dicom-rle``.

Choice (RFC 9110 12.5.1): the highest q-value wins; where the client leaves the choice
(equal q-values, or ``*``) the stored bitstream wins, since it costs no decoding. A client
that names native pixels only gets them exactly as before. A client that names only a
compressed syntax the instance is not stored in gets 406 naming the stored syntax and the
native alternative: PAS does not transcode frames (no lossy one ever; a lossless one is not
offered). Ranges with q=0 take nothing; an Accept whose every range for frames has q=0
refuses them all (406; it was served native pixels, as ``accepted_syntaxes`` already answers
retrieve).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from appliance.serving.wado_media import (
    BULK_THRESHOLD,
    EXPLICIT_LE,
    IMPLICIT_LE,
    PIXEL_DATA,
    PIXEL_TAGS,
    HttpProblem,
    _bulk_vr,
    _deferred_range,
    _media_ranges,
)
from appliance.store.transcode import decoded_as_rgb, swap_bytes, word_size

OCTETS = "application/octet-stream"
# PS3.18 Table 8.7.3-5: media type -> its transfer syntaxes, the default (D) first.
FRAME_MEDIA: dict[str, tuple[str, ...]] = {
    "image/jpeg": ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50",
                   "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57"),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                   "1.2.840.10008.1.2.4.203"),
}
MEDIA_OF_SYNTAX = {uid: media for media, uids in FRAME_MEDIA.items() for uid in uids}
# Names older clients (the Orthanc plugin before PS3.18 2019, cornerstone) still send.
MEDIA_ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle"}
NATIVE_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE)


@dataclass(frozen=True)
class FrameRange:
    """One media range of Accept as /frames reads it: ``media`` is ``application/octet-stream``
    (also for ``*/*``, ``multipart/*`` and a bare ``application/octet-stream``, as before) or
    the image type a ``multipart/related`` range names; ``syntax`` its transfer-syntax
    parameter (None: absent)."""

    media: str
    syntax: str | None
    weight: float

    def takes_native(self) -> bool:
        return self.media == OCTETS and self.syntax in (None, "*", *NATIVE_SYNTAXES)

    def takes_stored(self, stored: str) -> bool:
        """Whether this range admits the stored bitstream of syntax ``stored``: octet-stream
        with ``*`` or that very syntax (as dcm4chee reads it), or the stored syntax's media
        type with no syntax (the client decodes that format; the part names the syntax),
        ``*`` or that syntax."""
        media = MEDIA_OF_SYNTAX.get(stored)
        if media is None:
            return False
        if self.media == OCTETS:
            return self.syntax in ("*", stored)
        return self.media == media and self.syntax in (None, "*", stored)

    def could_take_some_frame(self) -> bool:
        """Whether this range admits the frames of an instance stored in some syntax."""
        if self.takes_native():
            return True
        if self.media == OCTETS:
            return self.syntax in MEDIA_OF_SYNTAX
        return self.media in FRAME_MEDIA and self.syntax in (None, "*", *FRAME_MEDIA[self.media])


@dataclass(frozen=True)
class FrameAnswer:
    """How the frames go: native pixels (``syntax`` None) or the bitstream stored in
    ``syntax``, whose media type is ``media``."""

    media: str = OCTETS
    syntax: str | None = None

    @property
    def part_type(self) -> str:
        """Each part's Content-Type: native parts exactly as before; a bitstream's names its
        syntax, which the viewer picks its decoder from."""
        return self.media if self.syntax is None else f"{self.media}; transfer-syntax={self.syntax}"

    def content_type(self, boundary: str) -> str:
        return f'multipart/related; type="{self.media}"; boundary={boundary}'


NATIVE = FrameAnswer()


class FrameAccept:
    """The Accept header of a /frames request, read once before the instance is looked up:
    what no instance could satisfy (only ``image/png``, an unknown syntax) is a 406 then, as
    before, with no lookup (nor a fetch from the region) for nothing."""

    def __init__(self, accept: str):
        self.accept = accept
        self.ranges: list[FrameRange] = []
        relevant = False
        for media, params, weight in _media_ranges(accept):
            kind = params.get("type", OCTETS).lower()
            syntax = params.get("transfer-syntax")
            if media in ("*/*", "multipart/*", OCTETS):
                relevant = True
                frame_media = OCTETS
            elif media == "multipart/related":
                relevant = True
                frame_media = OCTETS if kind in (OCTETS, "*/*") else MEDIA_ALIASES.get(kind, kind)
            elif media.startswith(("image/", "video/")):
                relevant = True  # a single-part image: PAS answers frames in multipart only
                continue
            else:
                continue  # text/html and such: disregarded (RFC 9110), as for retrieve
            if weight > 0:
                self.ranges.append(FrameRange(frame_media, syntax, weight))
        # No range about frames at all (no Accept, a browser's text/html): native, as before.
        self.open = not relevant
        if relevant and not any(r.could_take_some_frame() for r in self.ranges):
            raise HttpProblem(406, f"Accept {accept[:160]!r}: PAS sends frames as native "
                                   'pixels (multipart/related; type="application/octet-stream"'
                                   f", {EXPLICIT_LE}) or, for an instance stored compressed, "
                                   "as its stored bitstream (its image media type, e.g. "
                                   'type="image/jls", or transfer-syntax=*); ask for one of '
                                   "those or transfer-syntax=*")

    def choose(self, stored: str) -> FrameAnswer:
        """The answer for an instance stored in ``stored``: the highest q-value, the stored
        bitstream on a tie; 406 when neither is admitted."""
        if self.open:
            return NATIVE
        native = max((r.weight for r in self.ranges if r.takes_native()), default=0.0)
        bitstream = max((r.weight for r in self.ranges if r.takes_stored(stored)), default=0.0)
        if bitstream > 0 and bitstream >= native:
            return FrameAnswer(MEDIA_OF_SYNTAX[stored], stored)
        if native > 0:
            return NATIVE
        raise HttpProblem(406, self._refusal(stored))

    def _refusal(self, stored: str) -> str:
        media = MEDIA_OF_SYNTAX.get(stored)
        name = UID(stored).name if UID(stored).is_valid else "unknown syntax"
        native = (f'native pixels as multipart/related; type="application/octet-stream" '
                  f"({EXPLICIT_LE})")
        if media is None:
            offered = f"its frames go as {native} only"
        else:
            offered = (f'its frames go as stored (multipart/related; type="{media}"; '
                       f"transfer-syntax={stored}, or transfer-syntax=*) or as {native}; PAS "
                       "does not transcode frames to another compressed syntax")
        return (f"Accept {self.accept[:160]!r}: the instance is stored as {stored} ({name}); "
                f"{offered}; ask for one of those or transfer-syntax=*")


def open_frames(path: Path, numbers: list[int],
                accept: FrameAccept) -> tuple[FrameAnswer, Iterator[bytes]]:
    """How the frames asked go and their bytes, one frame at a time as they are taken. The
    instance, the frame numbers and the Accept are checked at the call, before the first
    frame (an HttpProblem then can still be the answer's status); the choice is made on the
    syntax the file is in. Native frames are read where they lie, compressed ones sent as
    stored are read fragment by fragment from the file, decoded ones decoded one by one:
    a frame of a 300 MB multi-frame never takes the whole Pixel Data into memory.

    The pixels are whichever of Pixel Data, Float Pixel Data and Double Float Pixel Data the
    instance has (a parametric map has only a float one: it was a 404 "no pixel data")."""
    ds = dcmread(path, defer_size=BULK_THRESHOLD)
    tag = next((t for t in PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise HttpProblem(404, "the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if max(numbers) > count:
        raise HttpProblem(404, f"frame {max(numbers)} asked, the instance has {count}")
    stored = ds.file_meta.TransferSyntaxUID
    answer = accept.choose(str(stored))
    if answer.syntax is not None:
        return answer, _stored_frames(path, ds, count, numbers)
    if stored.is_compressed:
        return answer, _decoded_frames(path, numbers, decoded_as_rgb(stored),
                                       int(ds.BitsAllocated) == 1)
    size = frame_bits(ds, count)
    raw = ds.get_item(tag, keep_deferred=True)
    value = getattr(raw, "value", None)  # None: deferred (not read)
    length = int(raw.length) if value is None else len(value)
    # Big endian: each word's bytes reversed as they are read, as transcode.py copies the
    # value; the part says little endian. (pydicom decoded them before, and its per-frame
    # decode of 1-bit pixels fails on frames that are not whole bytes.)
    word = 1 if stored.is_little_endian else word_size(
        _bulk_vr(ds, tag, raw.VR), tag, int(ds.BitsAllocated), length)
    where = None if stored.is_deflated else _deferred_range(ds, tag)
    if where is None:  # small enough to have been read, or deflated
        # A deflated file's offsets are in its inflated stream, not in the file: its frames
        # were read at the wrong place (a 500, or other bytes under a 200). Inflated whole,
        # as every reading of it is (ingest refuses one inflating past 256 MB).
        pixels = (dcmread(path) if stored.is_deflated else ds)[tag].value
        if word > 1:
            pixels = swap_bytes(pixels, word)
        return answer, iter([_frame_of(pixels, (n - 1) * size, size) for n in numbers])
    return answer, _native_frames(path, *where, size, numbers, word)


def one_bit_frame(path: Path, frame: int, rows: int, columns: int) -> np.ndarray:
    """Frame ``frame`` of native 1-bit pixels as a ``rows`` x ``columns`` array of 0 and 1,
    read where it lies as /frames reads it (:func:`_frame_of`, big endian words swapped).
    For /rendered: pydicom's decode of one frame (``index=``) fails on frames that are not
    whole bytes ("cannot reshape array of size 1514 into shape (37,41)": a 500)."""
    _, frames = open_frames(path, [frame], FrameAccept(OCTETS))
    packed = np.frombuffer(next(frames), dtype=np.uint8)
    return np.unpackbits(packed, bitorder="little")[:rows * columns].reshape(rows, columns)


def frame_bits(ds: Any, count: int) -> int:
    """The length of one native frame in bits. Frames follow each other with no padding
    (PS3.5 8.1.1): at Bits Allocated 1 frame n starts at bit (n-1)*Rows*Columns, mid-byte
    whenever that is not a multiple of 8 (a 5x5 SEG frame is 25 bits: cut at 3 bytes, each
    frame after the first was shifted, the first lost a pixel). Otherwise pydicom's
    ``get_expected_length`` over the frames, which knows that native YBR_FULL_422 takes two
    bytes a pixel, not three (PS3.3 C.7.6.3.1.2: frame 1 came with half of frame 2)."""
    bits = int(ds.BitsAllocated)
    if bits == 1:
        return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    if "PhotometricInterpretation" not in ds:  # get_expected_length reads it
        return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits
    return int(get_expected_length(ds, "bytes")) // count * 8


def _frame_of(data: bytes, first: int, size: int) -> bytes:
    """The ``size`` bits of ``data`` from bit ``first``, repacked from bit 0 (the first
    pixel in the least significant bit, PS3.5 8.1.1) into whole bytes, the last one's unused
    bits zero; a plain byte slice when the frame lies on whole bytes. Bits past the end of
    ``data`` are not there to give: the frame comes short, as a byte slice does."""
    if first % 8 == 0 and size % 8 == 0:
        return bytes(data[first // 8:(first + size) // 8])
    chunk = np.frombuffer(bytes(data[first // 8:-(-(first + size) // 8)]), dtype=np.uint8)
    bits = np.unpackbits(chunk, bitorder="little")[first % 8:first % 8 + size]
    return np.packbits(bits, bitorder="little").tobytes()


def _stored_frames(path: Path, ds: Any, count: int, numbers: list[int]) -> Iterator[bytes]:
    """Each frame's compressed bitstream as stored: its fragments joined, found by
    ``pydicom.encaps.get_frame`` (Extended Offset Table, else Basic, else the fragment walk
    with the Number of Frames) on the file from the start of the encapsulated value, so that
    only that frame's fragments are read."""
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths))
    value = getattr(raw, "value", None)  # None: deferred (not read), as it mostly is
    start = 0 if value is not None else int(raw.value_tell)
    source: BinaryIO
    with BytesIO(value) if value is not None else open(path, "rb") as source:
        for n in numbers:
            source.seek(start)
            yield get_frame(source, n - 1, number_of_frames=count, extended_offsets=extended)


def _native_frames(path: Path, offset: int, length: int, size: int, numbers: list[int],
                   word: int = 1) -> Iterator[bytes]:
    """Frames of native pixels (``length`` bytes at ``offset``, each frame ``size`` bits)
    read where they lie: the bytes that hold the frame's bits (whole ``word``-byte words,
    reversed, when stored big endian), repacked when the frame does not start and end on
    whole bytes (:func:`_frame_of`). A file shorter than its Pixel Data says is an error,
    not a short frame sent as whole."""
    with open(path, "rb") as handle:
        for n in numbers:
            first = (n - 1) * size
            start = min(first // 8, length)
            start -= start % word
            stop = min(-(-(first + size) // 8), length)
            stop = min(-(-stop // word) * word, length)
            handle.seek(offset + start)
            frame = handle.read(stop - start)
            if len(frame) < stop - start:
                raise OSError(f"{path.name}: frame {n} is {stop - start - len(frame)} bytes "
                              "short (the file is shorter than its Pixel Data)")
            if word > 1:
                frame = swap_bytes(frame, word)
            yield _frame_of(frame, first - start * 8, size)


def _decoded_frames(path: Path, numbers: list[int], as_rgb: bool,
                    one_bit: bool) -> Iterator[bytes]:
    """Frames decoded by pydicom (stored compressed), as the samples stored:
    ``as_rgb`` only for the lossy JPEG processes (``transcode.decoded_as_rgb``; pydicom's
    default converted a lossless YBR_FULL image to RGB, which its samples cannot be got
    back from). 1-bit pixels, one a byte in the array, are packed again as they are stored
    (eight a byte, the first in the least significant bit)."""
    for n in numbers:
        array = pixel_array(str(path), index=n - 1, as_rgb=as_rgb)
        if one_bit:
            yield np.packbits(array.ravel().astype(np.uint8), bitorder="little").tobytes()
        else:
            yield np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
