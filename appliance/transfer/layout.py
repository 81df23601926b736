"""Where a stored file's native pixel data lies, for pack.py's JPEG-LS bands.

Owns: reading a DICOM header with pydicom (pixel data deferred, never re-encoded) to find the
Pixel Data value's file offset and its geometry, and a small cache that lets the files of one
series share one parse. May not touch: the files (read only), the network, the database.
Correctness never depends on this module: every band pack.py makes is decoded again and
compared with the original bytes, so a wrong layout can only cost compression.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PixelLayout:
    """Where a file's native pixel data lies and how its samples are laid out."""

    start: int  # file offset of the Pixel Data value
    length: int  # bytes of whole rows in the value (trailing padding excluded)
    row_bytes: int  # one encodable row: columns x samples (interleaved) x bytes per sample
    columns: int
    comps: int  # components per row unit (3 when colour-by-pixel, else 1)
    dtype: str


_GEOMETRY_TAGS = (0x00280002, 0x00280006, 0x00280010, 0x00280011, 0x00280100, 0x00280103)
# Byte spans (file offset, bytes) that, found identical in another file of the same size,
# show it has the same layout: the element headers and values of the geometry attributes
# and the Pixel Data element's header.
_Evidence = tuple[tuple[int, bytes], ...]
_LAYOUT_CACHE: dict[int, list[tuple[PixelLayout, _Evidence]]] = {}
_LAYOUT_CACHE_LOCK = threading.Lock()
_LAYOUT_CACHE_SIZES = 64
_LAYOUTS_PER_SIZE = 4


# Native pixel data: implicit VR LE, explicit VR LE, explicit VR BE.
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _parse_layout(path: Path) -> tuple[PixelLayout, _Evidence] | None:
    """Read only the header (pixel data deferred) and describe the native pixel data, or None
    when there is none that JPEG-LS can carry (encapsulated, deflated, float, 1 or 32 bits,
    unreadable). Correctness never depends on this: a wrong guess only costs compression,
    since every band is verified."""
    import pydicom
    from pydicom.filereader import read_file_meta_info
    from pydicom.tag import Tag

    try:
        # The file meta first: pydicom inflates a deflated dataset whole, in memory (up to
        # 256 MiB each, on the pack stage's threads), to find no layout it can use anyway.
        meta_syntax = read_file_meta_info(path).get("TransferSyntaxUID")
        if meta_syntax is not None and str(meta_syntax) not in _NATIVE_SYNTAXES:
            return None
        ds = pydicom.dcmread(path, defer_size=256, force=True)
        raw = ds.get_item(Tag(0x7FE0, 0x0010), keep_deferred=True)
        if raw is None or getattr(raw, "value_tell", None) is None:
            return None
        if raw.length in (0, 0xFFFFFFFF):
            return None
        raws = [ds.get_item(Tag(tag), keep_deferred=True) for tag in _GEOMETRY_TAGS]
        tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        big_endian = str(tsyntax) == "1.2.840.10008.1.2.2" if tsyntax else not raw.is_little_endian
        if tsyntax is not None and str(tsyntax) not in _NATIVE_SYNTAXES:
            return None  # compressed, or deflated (value offsets are not file offsets)
        bits = int(ds.BitsAllocated)
        columns = int(ds.Columns)
        rows = int(ds.Rows)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        planar = int(ds.get("PlanarConfiguration", 0) or 0)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    except Exception:  # any unreadable header: the file travels in zstd only
        return None
    if bits not in (8, 16) or columns < 1 or rows < 1 or samples not in (1, 3):
        return None
    bps = bits // 8
    dtype = "u1" if bits == 8 else (">" if big_endian else "<") + ("i2" if signed else "u2")
    comps = samples if planar == 0 else 1
    row_bytes = columns * comps * bps
    length = (raw.length // row_bytes) * row_bytes
    if length == 0:
        return None
    start = int(raw.value_tell)
    spans = [(start - (8 if raw.is_implicit_VR else 12), start)]
    for element in raws:
        tell = getattr(element, "value_tell", None)
        if tell is not None and element.length <= 64:
            spans.append((tell - 8, tell + element.length))
    if min(begin for begin, _ in spans) < 0:
        return None
    try:
        with open(path, "rb") as handle:
            evidence = []
            for begin, end in spans:
                handle.seek(begin)
                evidence.append((begin, handle.read(end - begin)))
    except OSError:
        return None
    return PixelLayout(start, length, row_bytes, columns, comps, dtype), tuple(evidence)


def pixel_layout(path: Path, size: int, head: bytes | None = None) -> PixelLayout | None:
    """The layout of ``path``. When the file's first bytes are at hand (``head``), a layout
    seen in another file of the same size is reused if every byte of its evidence is the same
    here: a series' instances share their structure, and pydicom's parse of an 80 kB header
    costs more than packing it. A wrong reuse could only cost compression (bands are
    verified), and the evidence makes it implausible."""
    if head is not None:
        with _LAYOUT_CACHE_LOCK:
            known = list(_LAYOUT_CACHE.get(size, ()))
        for layout, evidence in known:
            if all(head[begin : begin + len(data)] == data for begin, data in evidence):
                return layout
    parsed = _parse_layout(path)
    if parsed is None:
        return None
    with _LAYOUT_CACHE_LOCK:
        if size not in _LAYOUT_CACHE and len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_SIZES:
            _LAYOUT_CACHE.pop(next(iter(_LAYOUT_CACHE)))
        entries = _LAYOUT_CACHE.setdefault(size, [])
        if parsed not in entries:
            entries.insert(0, parsed)
            del entries[_LAYOUTS_PER_SIZE:]
    return parsed[0]
