"""JPEG-LS lossless encode/decode of raw sample buffers, for pack.py.

Owns: the calls into CharLS. May not touch: files, the network, the database. Callers verify
exactness themselves; this module only reports CharLS errors as ``JlsError``.

Why ctypes: pyjpegls's Cython wrapper holds the GIL while CharLS runs, so two threads encode
no faster than one. The same extension exports CharLS's C entry points (``JpegLsEncode``,
``JpegLsDecode``, ``JpegLsReadHeader``); calling them through ctypes releases the GIL, and
bands of a bucket then encode on both cores. The struct layout is checked once at import
against pyjpegls's own answers (same codestream, same header fields); if anything differs,
the module quietly uses pyjpegls's wrapper instead (``USING_CTYPES`` says which).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import _CharLS

ERROR_MESSAGE_BYTES = 256


class JlsError(ValueError):
    """CharLS refused to encode or decode a buffer."""


@dataclass(frozen=True)
class JlsInfo:
    """The geometry a JPEG-LS codestream declares."""

    width: int
    height: int
    components: int
    bits: int
    interleave: int


class _Preset(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("maximum", "t1", "t2", "t3", "reset")]


class _Jfif(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_int32) for name in ("version", "units", "xd", "yd", "xt", "yt")],
        ("thumbnail", ctypes.c_void_p),
    ]


class _Params(ctypes.Structure):
    """CharLS 2.x ``JlsParameters`` (legacy API), with spare room after it so that a layout
    surprise can never write past our memory."""

    _fields_ = [
        ("width", ctypes.c_int32),
        ("height", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("stride", ctypes.c_int32),
        ("components", ctypes.c_int32),
        ("near", ctypes.c_int32),
        ("interleave", ctypes.c_int32),
        ("colour_transform", ctypes.c_int32),
        ("output_bgr", ctypes.c_char),
        ("custom", _Preset),
        ("jfif", _Jfif),
        ("_spare", ctypes.c_char * 64),
    ]


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(_CharLS.__file__)
        size = ctypes.c_size_t
        lib.JpegLsReadHeader.argtypes = [
            ctypes.c_void_p, size, ctypes.POINTER(_Params), ctypes.c_char_p]
        lib.JpegLsEncode.argtypes = [
            ctypes.c_void_p, size, ctypes.POINTER(size), ctypes.c_void_p, size,
            ctypes.POINTER(_Params), ctypes.c_char_p]
        lib.JpegLsDecode.argtypes = [
            ctypes.c_void_p, size, ctypes.c_void_p, size, ctypes.POINTER(_Params),
            ctypes.c_char_p]
        for function in (lib.JpegLsReadHeader, lib.JpegLsEncode, lib.JpegLsDecode):
            function.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


_LIB = _load()


def _ctypes_encode(samples: bytes, rows: int, columns: int, comps: int, bits: int,
                   ilv: int) -> bytes:
    assert _LIB is not None
    params = _Params(width=columns, height=rows, bits=bits, components=comps, interleave=ilv)
    destination = ctypes.create_string_buffer(len(samples) * 2 + 4096)
    written = ctypes.c_size_t(0)
    message = ctypes.create_string_buffer(ERROR_MESSAGE_BYTES)
    error = _LIB.JpegLsEncode(destination, len(destination), ctypes.byref(written), samples,
                              len(samples), ctypes.byref(params), message)
    if error:
        raise JlsError(f"CharLS encode error {error}: {message.value.decode(errors='replace')}")
    return destination.raw[: written.value]


def _ctypes_header(blob: bytes) -> _Params:
    assert _LIB is not None
    params = _Params()
    message = ctypes.create_string_buffer(ERROR_MESSAGE_BYTES)
    error = _LIB.JpegLsReadHeader(blob, len(blob), ctypes.byref(params), message)
    if error:
        raise JlsError(f"CharLS header error {error}: {message.value.decode(errors='replace')}")
    return params


def _ctypes_decode(blob: bytes, params: _Params) -> bytes:
    assert _LIB is not None
    size = params.width * params.height * params.components * (1 if params.bits <= 8 else 2)
    destination = ctypes.create_string_buffer(size)
    message = ctypes.create_string_buffer(ERROR_MESSAGE_BYTES)
    error = _LIB.JpegLsDecode(destination, size, blob, len(blob), ctypes.byref(params), message)
    if error:
        raise JlsError(f"CharLS decode error {error}: {message.value.decode(errors='replace')}")
    return destination.raw


def _self_test() -> bool:
    """Does the ctypes path agree with pyjpegls on a small 12-bit image and an RGB one?"""
    if _LIB is None:
        return False
    try:
        for rows, columns, comps, bits, ilv, width in ((7, 13, 1, 12, 0, 2), (5, 6, 3, 8, 2, 1)):
            count = rows * columns * comps
            values = [(i * 37 + 11) % (1 << bits) for i in range(count)]
            samples = b"".join(v.to_bytes(width, "little") for v in values)
            ours = _ctypes_encode(samples, rows, columns, comps, bits, ilv)
            theirs = bytes(_CharLS._encode(samples, 0, ilv, rows, columns, comps, bits))
            params = _ctypes_header(theirs)
            reference = _CharLS.read_header(theirs)
            if ours != theirs or (params.width, params.height, params.components, params.bits,
                                  params.interleave) != (
                    reference["width"], reference["height"], reference["components"],
                    reference["bits_per_sample"], reference["interleave_mode"]):
                return False
            if _ctypes_decode(theirs, params) != samples:
                return False
        return True
    except Exception:
        return False


USING_CTYPES = _self_test()


def encode(samples: bytes, rows: int, columns: int, comps: int, bits: int, ilv: int) -> bytes:
    """Lossless JPEG-LS of little-endian samples (1 byte each up to 8 bits, else 2)."""
    if USING_CTYPES:
        return _ctypes_encode(samples, rows, columns, comps, bits, ilv)
    try:
        return bytes(_CharLS._encode(samples, 0, ilv, rows, columns, comps, bits))
    except (RuntimeError, ValueError) as exc:
        raise JlsError(str(exc)) from None


def read_info(blob: bytes) -> JlsInfo:
    """The declared geometry, read before any allocation sized by it."""
    if USING_CTYPES:
        params = _ctypes_header(blob)
        return JlsInfo(params.width, params.height, params.components, params.bits,
                       params.interleave)
    try:
        info = _CharLS.read_header(blob)
    except (RuntimeError, ValueError) as exc:
        raise JlsError(str(exc)) from None
    return JlsInfo(info["width"], info["height"], info["components"],
                   info["bits_per_sample"], info["interleave_mode"])


def decode(blob: bytes) -> tuple[bytes, JlsInfo]:
    """Samples (little endian) and geometry of a JPEG-LS codestream.

    A codestream must end with the EOI marker: CharLS spends seconds on some scans that run
    off the end of their buffer (found by fuzzing: 12 s for a 128x24 image of random bytes
    without EOI, 10 ms with it), and every codestream CharLS writes ends with EOI."""
    if not blob.endswith(b"\xff\xd9"):
        raise JlsError("JPEG-LS codestream does not end with the EOI marker (truncated)")
    info = read_info(blob)
    if USING_CTYPES:
        return _ctypes_decode(blob, _ctypes_header(blob)), info
    try:
        return bytes(_CharLS._decode(blob)), info
    except (RuntimeError, ValueError) as exc:
        raise JlsError(str(exc)) from None
