"""STOW-RS parts as they arrive: each held in memory up to a threshold, then written to a
spool temp file (hashed on the way) so that a part of any size costs bounded memory
(invariant 8). What the answer names about a part comes from the receiver's record: a
second read of pydicom's would inflate a deflated part whole in memory. Split from
``dicomweb.py``, which keeps the route. May not touch: SQL; the temp file is the spool's
(:class:`~appliance.store.spool.SpillFile`), filed by the receiver. Also the request's
note in the audit trail's open list (:class:`OpenNote`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import MultipartParseError

from appliance.store import audit
from appliance.store.spool import SpillFile

if TYPE_CHECKING:
    from appliance.ingest.receive import Receiver
    from appliance.store.db import Database

log = logging.getLogger("pas.dicomweb")


class SpilledPart:
    """A STOW-RS part written to a spool temp file as it arrived, and its SHA-256."""

    def __init__(self, spill: SpillFile, digest: Any):
        self.spill = spill
        self.digest = digest


class NotPart10:
    """A STOW-RS part refused as it arrived: not a PS3.10 file (no "DICM" after the
    128-byte preamble). Its bytes were dropped as they came: nothing to discard."""

    def __init__(self, size: int):
        self.size = size

    @property
    def reason(self) -> str:
        return (f"not a DICOM file: a STOW-RS part is a PS3.10 file, and this one "
                f"({self.size} bytes) has no 'DICM' after a 128-byte preamble")


PREAMBLE_END = 132  # the 128-byte preamble and "DICM"
# How much of a body may come before its first boundary line (RFC 2046's preamble).
BODY_PREAMBLE_MAX = 64 << 10


class BodyStart:
    """A multipart body up to its first boundary line, which the parser is given from there.

    RFC 2046 5.1.1 (the syntax of multipart/related, RFC 2387): what precedes the first
    boundary line is a preamble, which a receiver ignores. python-multipart takes none (it
    skips blank lines only): a body with one was refused with "Expected boundary character
    45, got 84 at index 2", as was a body without the boundary its Content-Type names, a
    message that named neither. The boundary line is looked for at the start of the body or
    after a CRLF, in the first :data:`BODY_PREAMBLE_MAX` bytes; not there, or not at all:
    :class:`MultipartParseError` naming the boundary looked for."""

    def __init__(self, boundary: str):
        self.boundary = boundary
        self.line = b"--" + boundary.encode("latin-1", "replace")
        self.held = b""
        self.found = False

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` the parser gets: nothing before the boundary line."""
        if self.found:
            return chunk
        self.held += chunk
        at = 0 if self.held.startswith(self.line) else self.held.find(b"\r\n" + self.line)
        if at > 0:
            at += 2  # the CRLF ends the preamble
        if at >= 0:
            self.found, rest, self.held = True, self.held[at:], b""
            return rest
        if len(self.held) > BODY_PREAMBLE_MAX + len(self.line):
            raise MultipartParseError(self._missing(f" in its first {BODY_PREAMBLE_MAX} bytes"))
        return b""

    def finish(self) -> None:
        if not self.found:
            raise MultipartParseError(self._missing(" in the body"))

    def _missing(self, where: str) -> str:
        return (f"no boundary line '--{self.boundary[:70]}' (the boundary of its Content-Type)"
                f"{where}")


class Part:
    """One STOW-RS part as it arrives: in memory up to ``spill_above`` bytes, then in a spool
    temp file (hashed on the way), so that a part of any size costs memory bounded by that
    threshold (invariant 8), as a C-STORE does (``dicom.spill_above_mb``).

    A part whose first 132 bytes are not a preamble and "DICM" is refused there and its
    bytes dropped as they come: parsed, 200 MB of zeros cost a minute of pydicom reading
    empty elements (0.3 s per MB) and as much spool before the refusal."""

    def __init__(self, receiver: Receiver | None, spill_above: int):
        self.receiver = receiver
        self.spill_above = spill_above
        self.data = bytearray()
        self.spill: SpillFile | None = None
        self.digest: Any = None
        self.refused: NotPart10 | None = None

    def add(self, data: bytes) -> None:
        if self.refused is not None:
            self.refused.size += len(data)
            return
        if self.spill is None and len(self.data) < PREAMBLE_END <= len(self.data) + len(data):
            head = bytes(self.data[:PREAMBLE_END]) + data[:PREAMBLE_END - len(self.data)]
            if head[128:PREAMBLE_END] != b"DICM":
                self.refused = NotPart10(len(self.data) + len(data))
                self.data = bytearray()
                return
        if self.spill is not None:
            self.spill.write(data)
            self.digest.update(data)
            return
        self.data.extend(data)
        if len(self.data) > self.spill_above and self.receiver is not None:
            self.spill = self.receiver.open_spill(b"")
            self.digest = hashlib.sha256(self.data)
            self.spill.write(self.data)
            self.data = bytearray()

    def done(self) -> bytes | SpilledPart | NotPart10:
        if self.refused is not None:
            return self.refused
        if self.spill is not None:
            return SpilledPart(self.spill, self.digest)
        if len(self.data) < PREAMBLE_END:  # too short to be checked as it arrived
            return NotPart10(len(self.data))
        return bytes(self.data)

    def discard(self) -> None:
        if self.spill is not None:
            self.spill.discard()


def discard_parts(parts: list[bytes | SpilledPart | NotPart10], current: list[Part]) -> None:
    """Spill files of parts that will not be stored (a malformed or cut body) go."""
    for part in parts:
        if isinstance(part, SpilledPart):
            part.spill.discard()
    for unfinished in current:
        unfinished.discard()


class OpenNote:
    """A STOW-RS request noted open in the audit trail before its first part is filed, as a
    C-STORE association is (``audit.association_opened``): a daemon killed in the middle of
    the body (kill -9, a power loss) then still leaves the request's ``store`` row, written
    at the next start with the instances the index holds of it
    (``audit.close_cut_associations``). It left none: the filed instances were in no audit
    row, ever. ``id`` is the note (0: it could not be written; the end row still comes),
    None before the first part; the end row closes it (``audit.association_closed``)."""

    def __init__(self, db: Database, actor: str, source: str | None):
        self.db = db
        self.actor = actor
        self.source = source
        self.id: int | None = None

    def ensure(self) -> None:
        """Note the request open, once, before a part is filed (a request of no DICOM part
        costs no transaction)."""
        if self.id is not None:
            return
        try:
            self.id = audit.association_opened(self.db, self.actor, self.source)
        except Exception:  # the trail must not refuse the part; its end row still comes
            log.exception("noting the STOW-RS request open for the audit trail failed")
            self.id = 0
