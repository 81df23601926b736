"""WADO-RS media work, with no HTTP in it: which transfer syntax each instance is sent in
(PS3.18 8.7.3.5; the re-encoding itself is ``appliance.store.transcode``'s, since it writes
a spool temp file), bulk data, and rendered images through the grayscale pipeline. Split
from the handlers (``wado_rs.py``) to keep each file readable; /frames is
``wado_frames.py``'s. May not touch: SQL, spool writes, the network.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.pixels import apply_modality_lut, apply_voi_lut, iter_pixels, pixel_array
from pydicom.uid import UID

from appliance.serving.dicom_json import dataset_json
from appliance.store.transcode import decoded_as_rgb, swap_bytes, swap_words, word_size

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
PIXEL_DATA = 0x7FE00010
# Pixel Data, Float Pixel Data, Double Float Pixel Data: an image has one of them.
PIXEL_TAGS = (PIXEL_DATA, 0x7FE00008, 0x7FE00009)
# Top-level values of these VRs longer than this go by BulkDataURI in metadata (PS3.18 F.2.7).
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_THRESHOLD = 1024
# A big endian value is swapped this many bytes at a time (a whole number of any word).
SWAP_CHUNK = 1 << 20
UNDEFINED_LENGTH = 0xFFFFFFFF
# A frame number given with more digits than any frame count has (it can only be refused).
_HUGE_FRAME = 2**63


class HttpProblem(Exception):
    """A request PAS refuses: the HTTP status and a detail naming the problem."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def accepted_syntaxes(accept: str) -> list[str]:
    """The transfer syntaxes a WADO-RS client accepts, most preferred first ('*': as stored).

    Accept is a list of media ranges with q-values (RFC 9110 12.5.1); each
    ``multipart/related; type="application/dicom"`` range names one syntax, and one without
    a transfer-syntax parameter (or ``*/*``, ``multipart/*``) means Explicit VR Little Endian,
    the default of PS3.18 8.7.3.5. Ranges of other media types are disregarded, as RFC 9110
    allows; with none left the default is served. When every range for DICOM has q=0 the
    client refuses all of them: an empty list (406; it was served the default)."""
    ranges: list[tuple[float, int, str]] = []
    refused = False
    for n, (media, params, weight) in enumerate(_media_ranges(accept)):
        if media in ("*/*", "multipart/*"):
            syntax = EXPLICIT_LE
        elif media == "multipart/related" and params.get(
                "type", "application/dicom").lower() == "application/dicom":
            syntax = params.get("transfer-syntax") or EXPLICIT_LE
        else:
            continue
        if weight <= 0:
            refused = True
            continue
        ranges.append((-weight, n, syntax))
    if not ranges and refused:
        return []
    return [syntax for _, _, syntax in sorted(ranges)] or [EXPLICIT_LE]


# What a DICOM JSON answer (QIDO-RS, /metadata) satisfies in Accept: its own type, the
# application/json PS3.18 also names, and the wildcards.
DICOM_JSON_RANGES = ("application/dicom+json", "application/json", "application/*", "*/*")


def _media_ranges(accept: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(media type lowercased, parameters, q-value) of each media range of Accept."""
    for item in re.findall(r'(?:[^,"]|"[^"]*")+', accept):
        if not item.strip():
            continue
        media, *raw = [p.strip() for p in re.findall(r'(?:[^;"]|"[^"]*")+', item)]
        params = {k.strip().lower(): v.strip().strip('"')
                  for k, _, v in (p.partition("=") for p in raw)}
        try:
            weight = float(params.get("q", "1"))
        except ValueError:
            raise HttpProblem(400, f"Accept: bad q-value in {item.strip()!r}") from None
        yield media.lower(), params, weight


def require_dicom_json(accept: str) -> None:
    """HttpProblem 406 unless Accept (absent: anything) takes DICOM JSON, the one format PAS
    answers QIDO-RS and /metadata in. A viewer asking XML (multipart/related;
    type="application/dicom+xml") got JSON under a 200, which it could not read."""
    if not accept.strip():
        return
    if any(media in DICOM_JSON_RANGES and weight > 0
           for media, _, weight in _media_ranges(accept)):
        return
    raise HttpProblem(406, f"Accept {accept[:120]!r}: PAS answers in DICOM JSON only; ask "
                           "for application/dicom+json (or application/json)")


# Transfer syntaxes of the native little-endian pixels /bulkdata sends; "*" leaves the choice
# to the server.
NATIVE_FRAME_SYNTAXES = ("*", EXPLICIT_LE, IMPLICIT_LE)


def require_native_octets(accept: str) -> None:
    """HttpProblem 406 unless Accept takes what /bulkdata sends: native little-endian bytes
    as ``multipart/related; type="application/octet-stream"`` (Pixel Data decoded when
    stored compressed; /frames can send the stored bitstream: ``wado_frames.py``). A client
    asking only for a compressed syntax (transfer-syntax=1.2.840.10008.1.2.4.50) or image/jpeg
    was sent native pixels under a 200, which its JPEG decoder then got. Ranges of unrelated
    types (text/html) are disregarded, as for retrieve; none left: served."""
    relevant = satisfied = False
    for media, params, weight in _media_ranges(accept):
        if weight <= 0:
            continue
        kind = params.get("type", "application/octet-stream").lower()
        syntax = params.get("transfer-syntax", EXPLICIT_LE)
        if media in ("*/*", "multipart/*"):
            return
        if media == "multipart/related" or media == "application/octet-stream":
            relevant = True
            inner = kind if media == "multipart/related" else media
            if inner in ("application/octet-stream", "*/*") and syntax in NATIVE_FRAME_SYNTAXES:
                satisfied = True
        elif media.startswith(("image/", "video/")):
            relevant = True
    if relevant and not satisfied:
        raise HttpProblem(406, f"Accept {accept[:160]!r}: PAS sends bulk data as "
                               'multipart/related; type="application/octet-stream" in '
                               f"{EXPLICIT_LE} (native pixels); ask for that or "
                               "transfer-syntax=*")


RENDERED_MEDIA = ("image/jpeg", "image/png")
# A thumbnail's box when its request names no viewport (PS3.18 leaves the size to the server):
# a study list's tile. The aspect ratio is kept; an image smaller than it is not enlarged.
THUMBNAIL_VIEWPORT = (128, 128)


def rendered_media(accept: str) -> str:
    """The media type of a /rendered answer: of JPEG and PNG, the one Accept ranks first by
    q-value then order (JPEG for a wildcard or no Accept). The first of the two named in the
    header used to win whatever the q-values ("image/png, image/jpeg;q=0.1" was a JPEG), and
    a client taking neither (image/gif only) got a JPEG under a 200: 406 now. Ranges of
    non-image types are disregarded, as for retrieve."""
    ranked: list[tuple[float, int, str]] = []
    images = False
    for n, (media, _, weight) in enumerate(_media_ranges(accept)):
        images = images or media.startswith("image/")
        if weight <= 0:
            continue
        if media in RENDERED_MEDIA:
            ranked.append((-weight, n, media))
        elif media in ("*/*", "image/*"):
            ranked.append((-weight, n, "image/jpeg"))
    if ranked:
        return sorted(ranked)[0][2]
    if images:
        raise HttpProblem(406, f"Accept {accept[:120]!r}: rendered images are image/jpeg or "
                               "image/png")
    return "image/jpeg"


def part_syntax(accepted: list[str], stored: str | None) -> str:
    """The syntax one instance is sent in: the first accepted one PAS can produce for it.

    The stored syntax (asked by name or by '*') is sent unchanged; Explicit or Implicit VR
    Little Endian are produced from any other (decompressed, byte-swapped from big endian:
    ``appliance.store.transcode``); anything else is not offered (406)."""
    for syntax in accepted:
        if syntax in ("*", stored) and stored:
            return stored
        if syntax in (EXPLICIT_LE, IMPLICIT_LE):
            return syntax
    if not accepted:
        raise HttpProblem(406, "Accept refuses every DICOM answer (q=0)")
    # Each once: an instance stored in explicit VR little endian named it twice.
    offered = list(dict.fromkeys(s for s in ("*", stored, EXPLICIT_LE, IMPLICIT_LE) if s))
    raise HttpProblem(406, f"transfer syntax {', '.join(accepted)} is not offered for an "
                           f"instance stored as {stored}; ask for {', '.join(offered[:-1])} "
                           f"or {offered[-1]}")


def frame_list(text: str) -> list[int]:
    """A /frames/{list}: comma-separated frame numbers from 1, ASCII digits only (int() also
    took "1_0" as frame 10 and Arabic-Indic digits). HttpProblem 400 naming the list."""
    shown = text if len(text) <= 80 else text[:80] + "..."
    if not re.fullmatch(r"\s*-?[0-9]+\s*(,\s*-?[0-9]+\s*)*", text):
        raise HttpProblem(400, f"frame list {shown!r}: comma-separated numbers from 1")
    # A number of thousands of digits is past any frame count: int() refuses those (CPython's
    # limit on conversions), so such a number is judged on its text.
    numbers = [int(n) if len(n.strip().lstrip("-")) < 19 else _HUGE_FRAME
               for n in text.split(",")]
    if min(numbers) < 1:
        raise HttpProblem(400, f"frame list {shown!r}: frame numbers start at 1")
    return numbers


def rendered_frame(text: str) -> int:
    """The frame of ``/frames/{n}/rendered``: one number from 1, read as :func:`frame_list`
    reads a list (ASCII digits; one too long for any frame count is past the end, a 404
    where the instance is read). HttpProblem 400 naming it otherwise: 0 was a 404, "-1"
    and "1,2" a bare 404 from the router, and 4301 digits or more a 500."""
    numbers = frame_list(text)
    if len(numbers) != 1:
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise HttpProblem(400, f"frame {shown!r}: one frame number from 1")
    return numbers[0]


def viewport_size(text: str | None) -> tuple[int, int] | None:
    """The ``viewport`` of /rendered (PS3.18 8.3.5.1.3) as (width, height) in pixels: "w,h",
    or "w" for a square; None when absent. Each a positive integer, else HttpProblem 400
    naming it (viewport=0,0 was a 500, a division by zero inside the thumbnailing)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]{1,5})\s*(?:,\s*([0-9]{1,5})\s*)?", text)
    if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
        raise HttpProblem(400, f"viewport {text[:40]!r}: width,height in pixels, each a "
                               "positive integer (at most 99999)")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def _deferred_range(ds: Any, tag: int) -> tuple[int, int] | None:
    """(file offset, length) of a top-level value ``dcmread(defer_size=...)`` left unread
    and of defined length; None when it was read (small) or is encapsulated."""
    raw = ds.get_item(tag, keep_deferred=True)
    if getattr(raw, "value", b"") is not None or raw.length == UNDEFINED_LENGTH:
        return None
    return int(raw.value_tell), int(raw.length)


class Window:
    """The ``window`` of /rendered (PS3.18 8.3.5.1.4): center, width and VOI LUT function
    (linear, linear-exact, sigmoid), applied as PS3.3 C.11.2.1.2 says to the values the
    Modality LUT gives, straight to 0..255. It was ignored: a viewer asking a lung window got
    the instance's own window under a 200."""

    FUNCTIONS = ("linear", "linear-exact", "sigmoid")

    def __init__(self, center: float, width: float, function: str):
        self.center, self.width, self.function = center, width, function

    @classmethod
    def parse(cls, text: str | None) -> Window | None:
        if text is None:
            return None
        center, _, rest = text.partition(",")
        width, _, function = rest.partition(",")
        function = function.strip().lower() or "linear"
        try:
            c, w = float(center), float(width)
        except ValueError:
            c = w = float("nan")
        valid = (bool(np.isfinite(c) and np.isfinite(w)) and function in cls.FUNCTIONS
                 and (w >= 1 if function == "linear" else w > 0))
        if not valid:
            raise HttpProblem(400, f"window {text[:60]!r}: center,width[,function] with a "
                                   "positive width (at least 1 for linear) and a function of "
                                   f"{', '.join(cls.FUNCTIONS)}")
        return cls(c, w, function)

    def apply(self, values: Any) -> Any:
        """8-bit grey levels of ``values`` (after the Modality LUT)."""
        c, w = self.center, self.width
        if self.function == "sigmoid":
            return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        if self.function == "linear-exact":
            return ((values - c) / w + 0.5).clip(0.0, 1.0) * 255.0
        if w == 1:  # PS3.3 C.11.2.1.2.1 at its least width: a threshold
            return np.where(values > c - 0.5, 255.0, 0.0)
        return (((values - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0).clip(0.0, 255.0)


def render(path: Path, frame: int, media: str, viewport: tuple[int, int] | None,
           window: Window | None = None) -> bytes:
    """A frame as 8-bit JPEG/PNG through the grayscale pipeline (PS3.18 8.3.5.1.1, PS3.3
    C.11): Modality LUT (Rescale Slope/Intercept) first, then the ``window`` asked, else the
    instance's VOI LUT or window, else min-max. The order matters: a CT's window is in
    Hounsfield units, not stored values, so windowing stored values (HU + 1024) turns the
    whole body white.

    A deflated file is read inflated (pydicom's reader of a path finds no Pixel Data in the
    deflated stream: it was a 500); ingest refuses one inflating past 256 MB."""
    ds = dcmread(path, defer_size=BULK_THRESHOLD)  # the pixels: only the frame rendered
    if "PixelData" not in ds:
        raise HttpProblem(404, "the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= count:
        raise HttpProblem(404, f"frame {frame} asked, the instance has {count}")
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    # A picture for display, not a DICOM copy: colour goes RGB (YBR converted), as a
    # browser shows it; the copies keep the samples stored (decoded_as_rgb).
    if int(ds.get("BitsAllocated", 0) or 0) == 1 and not syntax.is_compressed:
        from appliance.serving.wado_frames import one_bit_frame  # it imports this module

        array = one_bit_frame(path, frame, int(ds.Rows), int(ds.Columns))
    else:
        array = pixel_array(dcmread(path) if syntax.is_deflated else str(path),
                            index=frame - 1, as_rgb=True)
    if ds.get("SamplesPerPixel", 1) == 1:
        array = apply_modality_lut(array, ds).astype(np.float64)
        if window is not None:
            array = np.rint(window.apply(array)).clip(0, 255).astype(np.uint8)
        else:
            array = apply_voi_lut(array, ds, index=0)
            low, high = float(np.min(array)), float(np.max(array))
            array = ((array - low) / ((high - low) or 1.0) * 255.0).clip(0, 255).astype(
                np.uint8)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            array = 255 - array
        image = Image.fromarray(array, mode="L")
    else:
        image = Image.fromarray(array.astype(np.uint8), mode="RGB")
    if viewport:
        image.thumbnail(viewport)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if media == "image/png" else "JPEG", quality=90)
    return buffer.getvalue()


def metadata_item(path: Path, base: str, transfer_syntax: str | None = None) -> dict[str, Any]:
    """One instance as DICOM JSON for /metadata (PS3.18 10.4.1.2, F.2.7): every attribute;
    top-level bulk data (Pixel Data included) as a BulkDataURI under ``base``/bulkdata that
    resolves to that attribute's bytes. Values above BULK_THRESHOLD are not even read
    (defer_size); bulk data inside sequences (icons) is small and goes inline. The model
    itself (tag order, no group lengths, empty values as null) is ``dicom_json.py``'s;
    ``transfer_syntax``: the stored one, given as (0002,0010) in its place."""
    ds = dcmread(path, defer_size=BULK_THRESHOLD)
    bulk: dict[int, str] = {}
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)  # get_item alone reads a deferred value
        vr = _bulk_vr(ds, int(tag), raw.VR)
        length = getattr(raw, "length", None)
        if length is None:  # already a DataElement: its value is in memory
            value = raw.value
            length = len(value) if isinstance(value, bytes | bytearray) else 0
        if vr in BULK_VRS and (length > BULK_THRESHOLD or length == UNDEFINED_LENGTH):
            bulk[int(tag)] = vr
            del ds[tag]
    extra = {f"{tag:08X}": {"vr": vr, "BulkDataURI": f"{base}/bulkdata/{tag:08X}"}
             for tag, vr in bulk.items()}
    if transfer_syntax:
        extra["00020010"] = {"vr": "UI", "Value": [transfer_syntax]}
    if not UID(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE)).is_little_endian:
        # InlineBinary is little endian: application/dicom+json's transfer-syntax parameter
        # names the syntax of its binary values and defaults to Explicit VR Little Endian
        # (PS3.18 F.2.7, the media type's registration), and this answer names none. A big
        # endian object's OW/OF/OD/OL/OV values went as stored (a float read back as
        # 1e-23 for 0.66): their words are swapped as transcode.py swaps them.
        bits = int(ds.get("BitsAllocated", 16) or 16)
        for tag in list(ds.keys()):
            swap_words(ds[tag], bits)
    return dataset_json(ds, extra)


def _bulk_vr(ds: Any, tag: int, vr: str | None) -> str:
    """The VR of a top-level element, resolved where implicit VR leaves it ambiguous."""
    if not vr:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"
    if " or " in vr:  # "OB or OW": Pixel Data and friends
        return "OW" if int(ds.get("BitsAllocated", 8) or 8) > 8 else "OB"
    return vr


class DecodedPixels:
    """Compressed Pixel Data served as /frames gives it (little-endian native pixels), every
    frame in order, decoded one at a time as the answer is sent: decoded whole, a 300 MB RLE
    multi-frame held its array and two copies of it. ``size``: the bytes it makes.
    ``as_rgb``: colour converted to RGB (only for the lossy JPEG processes,
    ``transcode.decoded_as_rgb``: otherwise the samples stored, a YBR_FULL image's included).
    ``one_bit``: 1-bit pixels, packed again eight a byte as they are stored, the frames with
    no padding between them (PS3.5 8.1.1)."""

    def __init__(self, path: Path, size: int, as_rgb: bool = False, one_bit: bool = False):
        self.path = path
        self.size = size
        self.as_rgb = as_rgb
        self.one_bit = one_bit

    def chunks(self) -> Iterator[bytes]:
        if self.one_bit:
            yield from self._packed()
            return
        for array in iter_pixels(str(self.path), as_rgb=self.as_rgb):
            yield np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()

    def _packed(self) -> Iterator[bytes]:
        """The frames' bits one after the other: the bits of a frame left over past its last
        whole byte start the next one's first byte."""
        left = np.zeros(0, dtype=np.uint8)
        for array in iter_pixels(str(self.path)):
            bits = np.concatenate([left, array.ravel().astype(np.uint8)])
            whole = len(bits) - len(bits) % 8
            left = bits[whole:]
            yield np.packbits(bits[:whole], bitorder="little").tobytes()
        if len(left):
            yield np.packbits(left, bitorder="little").tobytes()


class SwappedValue(DecodedPixels):
    """A big endian value of ``length`` bytes at ``offset``, its ``word``-byte words reversed
    a chunk at a time as it is sent (bounded memory, as the value streamed from the file)."""

    def __init__(self, path: Path, offset: int, length: int, word: int):
        super().__init__(path, length)
        self.offset, self.word = offset, word

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            left = self.size
            while left:
                data = handle.read(min(SWAP_CHUNK, left))
                if not data or len(data) % self.word:
                    raise OSError(f"{self.path.name}: the file ends {left} bytes short of a "
                                  "value")
                left -= len(data)
                yield swap_bytes(data, self.word)


def decoded_size(ds: Any) -> int:
    """The bytes :class:`DecodedPixels` makes of ``ds``'s pixels: every sample at full
    resolution (a decoder upsamples YBR_FULL_422), 1-bit ones packed across frames."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
    bits = int(ds.BitsAllocated)
    return -(-samples // 8) if bits == 1 else samples * (bits // 8)


def read_bulkdata(path: Path, tag: int) -> bytes | tuple[int, int] | DecodedPixels:
    """The bytes of one top-level bulk data attribute (Pixel Data: every frame, decoded to
    little-endian native pixels when stored compressed, as /frames gives them). A large value
    stored as it is served is not read: (file offset, length) instead, for the caller to
    stream from the file (a 300 MB Pixel Data took the daemon up by 1.2 GB); compressed Pixel
    Data is a :class:`DecodedPixels`, decoded a frame at a time as it is sent. A big endian
    object's word values (OW, OF, OD...: Float Pixel Data as much as Pixel Data) are made
    little endian as transcode.py makes them, a large one as it is sent
    (:class:`SwappedValue`): they went out as stored, or, Pixel Data, decoded by pydicom (a
    YBR_FULL image converted to RGB, 1-bit frames unpacked). A deflated file is read
    inflated: the offsets of its values are in the inflated stream, not the file, and its
    Pixel Data was streamed from the wrong place (the answer cut, or other bytes)."""
    ds = dcmread(path, defer_size=BULK_THRESHOLD)
    if tag not in ds:
        raise HttpProblem(404, f"the instance has no attribute {tag:08X}")
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_deflated:
        ds = dcmread(path)  # inflated whole, as ingest allows it (at most 256 MB)
    if tag == PIXEL_DATA and syntax.is_compressed:
        return DecodedPixels(path, decoded_size(ds), decoded_as_rgb(syntax),
                             int(ds.BitsAllocated) == 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if not syntax.is_deflated:
        raw = ds.get_item(tag, keep_deferred=True)
        where = _deferred_range(ds, tag)
        vr = _bulk_vr(ds, tag, raw.VR)
        if where is not None and vr in BULK_VRS:
            word = 1 if syntax.is_little_endian else word_size(vr, tag, bits, where[1])
            return where if word == 1 else SwappedValue(path, *where, word)
    elem = ds[tag]
    if not isinstance(elem.value, bytes | bytearray):
        raise HttpProblem(404, f"attribute {tag:08X} is not bulk data")
    if not syntax.is_little_endian:
        swap_words(elem, bits)
    return bytes(elem.value)
