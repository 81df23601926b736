"""JPEG-LS lossless encode/decode of raw sample buffers, for pack.py.

Owns: the call into CharLS (through pyjpegls's extension). May not touch: files, the network,
the database. Callers verify exactness themselves; this module only reports CharLS errors as
``JlsError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import _CharLS


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


def encode(samples: bytes, rows: int, columns: int, comps: int, bits: int, ilv: int) -> bytes:
    """Lossless JPEG-LS of little-endian samples (1 byte each up to 8 bits, else 2)."""
    try:
        return bytes(_CharLS._encode(samples, 0, ilv, rows, columns, comps, bits))
    except (RuntimeError, ValueError) as exc:
        raise JlsError(str(exc)) from None


def read_info(blob: bytes) -> JlsInfo:
    """The declared geometry, read before any allocation sized by it."""
    try:
        info = _CharLS.read_header(blob)
    except (RuntimeError, ValueError) as exc:
        raise JlsError(str(exc)) from None
    return JlsInfo(info["width"], info["height"], info["components"],
                   info["bits_per_sample"], info["interleave_mode"])


def decode(blob: bytes) -> tuple[bytes, JlsInfo]:
    """Samples (little endian) and geometry of a JPEG-LS codestream."""
    info = read_info(blob)
    try:
        return bytes(_CharLS._decode(blob)), info
    except (RuntimeError, ValueError) as exc:
        raise JlsError(str(exc)) from None
