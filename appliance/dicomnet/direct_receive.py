"""C-STORE requests taken straight off an accepted association's socket (the modality's path).

Owns: recognising a C-STORE-RQ at the start of a DIMSE message, reassembling its command and
dataset fragments from P-DATA-TF PDUs, calling the listener's store function, and writing the
hand-encoded C-STORE-RSP. May not touch: negotiation, release, abort, or any other DIMSE
message: every PDU that is not part of a C-STORE-RQ this module took goes to pynetdicom as it
arrived, and pynetdicom answers it as always (C-ECHO, C-FIND, C-MOVE, C-GET, C-CANCEL...).

Why: a modality sends a study as a long run of C-STOREs, each answered before the next is
sent. Through pynetdicom each one crosses its 4 kB socket reads, a PDU object per PDU, the
state machine, a queue to the association thread, a pydicom decode and encode of the command
sets, and a queue back to the DUL thread: about 1.5 ms of Python per image here, where DCMTK's
storescp needs 0.6 ms for the whole round trip. Taken here, in the DUL thread that read the
PDU, one image costs its reads, the store function and one ``send``.

The rules it keeps (PS3.7 9.3.1, PS3.8 9.3.5): a message starts with its command fragments and
its dataset follows on the same presentation context; messages are not interleaved (PAS
negotiates no asynchronous operations). A C-STORE is taken only when its whole command set is
in the first PDU (DCMTK and pynetdicom send it so; any other message is pynetdicom's), its
context was accepted for a storage SOP class, and pynetdicom is not in the middle of a message
of its own. The listener prepares the file meta and its SHA-256 when the command arrives, and
each dataset fragment is hashed as it is read, while the sender is still sending.
A broken fragment sequence raises :class:`DirectReceiveError`; the reactor then aborts the
association, as pynetdicom does on a PDU it cannot decode. A message on a context that was not
accepted raises ``UnacceptedContext`` (``unaccepted.py``: an A-P-ABORT, invalid PDU
parameter value, then the report naming it).
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Protocol

from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from appliance.dicomnet.direct_store import _element, _ui, parse_command
from appliance.dicomnet.unaccepted import UnacceptedContext, command_of

log = logging.getLogger("pas.dicomnet")

P_DATA_TF = 0x04
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATASET = 0x0101
_COMMAND = 0x01       # message control header bit 0: command (1) or dataset (0)
_LAST = 0x02          # bit 1: last fragment
# A message left to pynetdicom is held whole in memory until its last fragment (its DIMSE
# layer assembles it in a buffer). The messages it gets carry small datasets (C-FIND
# identifiers, C-MOVE requests...); a large one is a C-STORE the streaming path could not
# take (its command split over PDUs, or on a context that is not a storage one, which is
# refused anyway). Past this, the association is aborted rather than memory given away
# (invariant 8).
MAX_HELD_MESSAGE_BYTES = 64 << 20
# A spill file's room (the spool's quota, the disk's free-space floor) is checked each time
# it grew by this much, not only once its dataset is whole: a C-STORE that kept coming wrote
# on past the floor (other modalities refused 0xA700 meanwhile). At most this much is
# written past it; the C-STORE then gets 0xA700, the rest of its dataset read and dropped.
SPILL_ROOM_CHECK_BYTES = 16 << 20

# What the listener's store function returns: a DIMSE status and, for a failure, the comment
# that names the problem (sent as Error Comment, 0000,0902; PS3.7 C.4.2.1.4).
StoreResult = tuple[int, str | None]


class StoreSink(Protocol):
    """What the ingest listener offers the fast path (appliance/ingest/scp.py)."""

    spill_above: int  # bytes of dataset held in memory before the rest goes to a spill file

    def open_spill(self, header: bytes) -> Any:
        """A spool temp file with ``header`` written: ``write(bytes)``, ``discard()``,
        ``size``, and ``error`` once it gave up."""

    def check_spill_room(self, spill: Any) -> bool:
        """Whether a growing spill still has room; if not, it gave up (its file gone, later
        writes dropped) and its C-STORE is refused once read (0xA700)."""

    def prepare_store(self, sop_class_uid: str, sop_instance_uid: str,
                      transfer_syntax_uid: str) -> tuple[bytes, Any]:
        """Called when a C-STORE starts: the file meta and a hash object fed with it; each
        dataset fragment is fed to the hash as it arrives."""

    def note_cut(self, assoc: Any, sop_instance_uid: str, received: int) -> None:
        """A C-STORE's dataset was cut by the association's end (abort, connection lost):
        nothing of it is stored, and the sender had no answer."""

    def store_request(self, assoc: Any, transfer_syntax_uid: str, sop_class_uid: str,
                      sop_instance_uid: str, dataset: bytes | bytearray, path: str = ...,
                      prepared: tuple[bytes, Any] | None = None,
                      context_sop_class_uid: str | None = None) -> StoreResult:
        """File the complete dataset; the status (and comment) to answer."""


class DirectReceiveError(Exception):
    """The peer broke the P-DATA fragment rules; the association must be aborted."""


def c_store_rsp(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int,
                error_comment: str | None = None) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), implicit VR little endian."""
    body = [
        _element((0x0000, 0x0002), _ui(sop_class_uid)),
        _element((0x0000, 0x0100), struct.pack("<H", C_STORE_RSP)),
        _element((0x0000, 0x0120), struct.pack("<H", message_id)),
        _element((0x0000, 0x0800), struct.pack("<H", NO_DATASET)),
        _element((0x0000, 0x0900), struct.pack("<H", status)),
    ]
    if error_comment:
        # LO: at most 64 characters, even length, space padded; ASCII (default repertoire).
        text = error_comment.encode("ascii", "replace")[:64]
        body.append(_element((0x0000, 0x0902), text + b" " if len(text) % 2 else text))
    body.append(_element((0x0000, 0x1000), _ui(sop_instance_uid)))
    joined = b"".join(body)
    return _element((0x0000, 0x0000), struct.pack("<I", len(joined))) + joined


def p_data_tf(context_id: int, control: int, value: bytes) -> bytes:
    """One P-DATA-TF PDU holding one presentation data value."""
    return struct.pack(">BBIIBB", P_DATA_TF, 0, len(value) + 6, len(value) + 2, context_id,
                       control) + value


def _pdvs(pdu_body: memoryview) -> list[tuple[int, int, memoryview]]:
    """The (context ID, control header, fragment) items of a P-DATA-TF PDU's body."""
    items = []
    offset, end = 0, len(pdu_body)
    while offset < end:
        if offset + 6 > end:
            raise DirectReceiveError("P-DATA-TF ends inside a presentation data value header")
        (length,) = struct.unpack_from(">I", pdu_body, offset)
        if length < 2 or offset + 4 + length > end:
            raise DirectReceiveError(f"presentation data value of length {length} does not fit")
        items.append((pdu_body[offset + 4], pdu_body[offset + 5],
                      pdu_body[offset + 6:offset + 4 + length]))
        offset += 4 + length
    return items


def _uids_in_ascii(command: dict[int, bytes]) -> bool:
    """Whether the command's SOP Class and Instance UIDs are ASCII, as the fast path reads
    them. One that is not goes to pynetdicom, which answers it (0xC210, cannot understand):
    here it raised an 'ascii' codec error in the DUL, and the association was aborted with
    an anonymous "exception in the DUL reactor" (no peer named, no audit row)."""
    return command[0x0002].isascii() and command[0x1000].isascii()


def _check_message_id(command: dict[int, bytes]) -> None:
    """A Message ID (0000,0110) is a US: 2 bytes. Another length cannot be answered (the
    response names the request by it; pynetdicom took the first 2 of 4 bytes, and failed
    with a traceback on 1): the association is aborted, naming the peer and the field."""
    if len(command[0x0110]) != 2:
        raise DirectReceiveError(f"C-STORE-RQ whose Message ID (0000,0110) has "
                                 f"{len(command[0x0110])} bytes (a US has 2)")


class _Request:
    """One C-STORE-RQ being reassembled."""

    __slots__ = ("context_id", "message_id", "sop_class_uid", "sop_instance_uid", "dataset",
                 "transfer_syntax_uid", "prepared", "context_sop_class_uid", "spill",
                 "spill_failed", "received", "room_checked")

    def __init__(self, context_id: int, command: dict[int, bytes], transfer_syntax_uid: str,
                 context_sop_class_uid: str):
        self.context_id = context_id
        self.context_sop_class_uid = context_sop_class_uid
        self.message_id = struct.unpack("<H", command[0x0110])[0]
        self.sop_class_uid = command[0x0002].rstrip(b"\x00 ").decode("ascii")
        self.sop_instance_uid = command[0x1000].rstrip(b"\x00 ").decode("ascii")
        self.transfer_syntax_uid = transfer_syntax_uid
        self.dataset = bytearray()
        self.prepared: tuple[bytes, Any] | None = None
        self.spill: Any = None  # the spool's SpillFile once the dataset outgrew memory
        self.spill_failed = False  # no temp file could be made: this one stays in memory
        self.received = 0  # bytes of its dataset received so far
        self.room_checked = 0  # the spill's size at its last room check


class DirectReceiver:
    """The C-STORE fast path of one accepted association; lives in its DUL thread."""

    def __init__(self, dul: Any, sink: StoreSink):
        self.dul = dul
        self.assoc = dul.assoc
        self.sink = sink
        self._request: _Request | None = None
        # The message pynetdicom is assembling: its PDUs go to it until the message ends.
        self._theirs = False
        self._their_command = bytearray()
        self._their_has_dataset: bool | None = None
        self._their_bytes = 0
        self._storage_contexts: dict[int, Any] | None = None

    def _storage_context(self, context_id: int) -> Any:
        if self._storage_contexts is None:
            self._storage_contexts = {
                cx_id: cx for cx_id, cx in self.assoc._accepted_cx.items()
                if uid_to_service_class(cx.abstract_syntax) is StorageServiceClass
            }
        return self._storage_contexts.get(context_id)

    def take(self, pdu_body: bytearray) -> bool:
        """Consume a P-DATA-TF PDU's body if it belongs to a C-STORE-RQ taken here; False
        leaves it to pynetdicom (which then gets the very same PDU)."""
        pdvs = _pdvs(memoryview(pdu_body))
        if not pdvs:
            raise DirectReceiveError("P-DATA-TF without a presentation data value")
        if self._request is not None:
            self._continue(pdvs)
            return True
        if self._theirs:
            self._follow_theirs(pdvs)
            return False
        return self._start(pdvs)

    def abandon(self) -> None:
        """Another kind of PDU arrived (release, abort), or the association ended: a message
        in progress is dropped, with its spill file if it had one, and told to the listener
        (``note_cut``): the sender was never answered, and without this nothing in the log
        or the association's audit row said that an instance was cut."""
        request, self._request = self._request, None
        if request is not None:
            if request.spill is not None:
                request.spill.discard()
            note_cut = getattr(self.sink, "note_cut", None)
            if note_cut is not None:
                note_cut(self.assoc, request.sop_instance_uid, request.received)
        self._theirs = False

    # -- a new message ----------------------------------------------------------------------

    def _start(self, pdvs: list[tuple[int, int, memoryview]]) -> bool:
        context_id, control, fragment = pdvs[0]
        if context_id not in self.assoc._accepted_cx:
            # A message on a context not accepted is a protocol error (PS3.8 9.3.5), answered
            # with an A-P-ABORT; then the listener names the sender, the message, the context
            # and why it was refused (unaccepted.py). The rest of the message is not awaited.
            fields: dict[int, bytes] = {}
            if control & _COMMAND:
                try:
                    fields = parse_command(bytes(fragment))
                except Exception:
                    fields = {}  # a command cut over PDUs, or not one: named "a message"
            raise UnacceptedContext(self.assoc, context_id, *command_of(fields))
        taken = (
            control == _COMMAND | _LAST
            and self.dul.assoc.dimse.message is None
            and self.dul.event_queue.empty()
            and self._storage_context(context_id) is not None
        )
        command: dict[int, bytes] = {}
        if taken:
            try:
                command = parse_command(bytes(fragment))
            except Exception:
                taken = False  # pynetdicom decodes it and says what is wrong
        if taken:
            field = command.get(0x0100)
            taken = (
                field is not None and struct.unpack("<H", field[:2])[0] == C_STORE_RQ
                and command.get(0x0800, b"\x01\x01")[:2] != b"\x01\x01"
                and all(key in command for key in (0x0002, 0x0110, 0x1000))
                and _uids_in_ascii(command)
                and uid_to_service_class(
                    command[0x0002].rstrip(b"\x00 ").decode("ascii", "replace")
                ) is StorageServiceClass
            )
        if taken:
            _check_message_id(command)
        if not taken:
            self._theirs = True
            self._their_command = bytearray()
            self._their_has_dataset = None
            self._their_bytes = 0
            self._follow_theirs(pdvs)
            return False
        context = self._storage_context(context_id)
        request = _Request(context_id, command, str(context.transfer_syntax[0]),
                           str(context.abstract_syntax))
        try:
            request.prepared = self.sink.prepare_store(
                request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax_uid)
        except Exception as exc:  # e.g. a UID that is not ASCII: the store refuses it
            log.debug("no early hash for message %d: %s", request.message_id, exc)
        self._request = request
        self._continue(pdvs[1:])
        return True

    def _follow_theirs(self, pdvs: list[tuple[int, int, memoryview]]) -> None:
        """Watch pynetdicom's message go by, to know where the next one starts, and stop
        one that would take more than ``MAX_HELD_MESSAGE_BYTES`` of memory there."""
        self._their_bytes += sum(len(fragment) for _, _, fragment in pdvs)
        if self._their_bytes > MAX_HELD_MESSAGE_BYTES:
            raise DirectReceiveError(
                f"a message that PAS cannot stream to disk (its command split over PDUs, or "
                f"a C-STORE on a presentation context that is not a storage one) passed "
                f"{MAX_HELD_MESSAGE_BYTES >> 20} MB; it would be held whole in memory")
        for _, control, fragment in pdvs:
            if control & _COMMAND:
                self._their_command += fragment
                if control & _LAST:
                    try:
                        kind = parse_command(bytes(self._their_command)).get(0x0800)
                    except Exception:
                        kind = None
                    self._their_has_dataset = kind is not None and kind[:2] != b"\x01\x01"
                    if not self._their_has_dataset:
                        self._theirs = False
            elif control & _LAST:
                self._theirs = False

    # -- the dataset of a taken C-STORE -----------------------------------------------------

    def _continue(self, pdvs: list[tuple[int, int, memoryview]]) -> None:
        request = self._request
        assert request is not None
        for index, (context_id, control, fragment) in enumerate(pdvs):
            if context_id != request.context_id:
                raise DirectReceiveError(
                    f"dataset fragment on presentation context {context_id}, expected "
                    f"{request.context_id} (message {request.message_id})")
            if control & _COMMAND:
                raise DirectReceiveError(
                    f"command fragment inside the dataset of message {request.message_id}")
            request.received += len(fragment)
            if request.spill is not None:
                if request.spill.error is None:  # else no room: read to its end, 0xA700
                    self._spill(request, fragment)
            else:
                request.dataset += fragment
                if (len(request.dataset) > self.sink.spill_above and request.prepared
                        and not request.spill_failed):
                    # Bounded memory (invariant 8): a large object (tomosynthesis, a long
                    # multi-frame) goes on to a spool temp file as it arrives.
                    try:
                        request.spill = self.sink.open_spill(request.prepared[0])
                    except OSError as exc:  # no temp file: filing will meet it and say so
                        log.warning("message %d stays in memory, no spill file: %s",
                                    request.message_id, exc)
                        request.spill_failed = True  # not tried again at every fragment
                    else:
                        request.spill.write(request.dataset)
                        request.dataset = bytearray()
            if request.prepared is not None and (request.spill is None
                                                 or request.spill.error is None):
                request.prepared[1].update(fragment)
            if control & _LAST:
                if index != len(pdvs) - 1:
                    raise DirectReceiveError("data after the last fragment of a message")
                self._request = None
                self._answer(request)

    def _spill(self, request: _Request, fragment: memoryview) -> None:
        """A fragment to the spill file; its room checked each SPILL_ROOM_CHECK_BYTES."""
        spill = request.spill
        spill.write(fragment)
        if spill.size - request.room_checked < SPILL_ROOM_CHECK_BYTES:
            return
        request.room_checked = spill.size
        check = getattr(self.sink, "check_spill_room", None)
        if check is not None and not check(spill):
            calling = str(self.assoc.requestor.ae_title).strip()
            log.warning("C-STORE of %s from %s (%s): no room for more of its dataset after "
                        "%d bytes (%s); the rest is read and dropped, then refused (0xA700)",
                        request.sop_instance_uid, calling, self.assoc.requestor.address,
                        request.received, spill.error, extra={"CALLING_AE": calling})

    def _answer(self, request: _Request) -> None:
        try:
            status, comment = self.sink.store_request(
                self.assoc, request.transfer_syntax_uid, request.sop_class_uid,
                request.sop_instance_uid,
                request.spill if request.spill is not None else request.dataset,
                prepared=request.prepared,
                context_sop_class_uid=request.context_sop_class_uid)
        finally:
            if request.spill is not None:
                # Whatever the answer: a filed spill was renamed away (this only closes
                # and forgets it); a refused one (0x0122 before any reading, say) goes.
                request.spill.discard()
        rsp = c_store_rsp(request.sop_class_uid, request.sop_instance_uid, request.message_id,
                          status, comment if status else None)
        self.dul.socket.send(p_data_tf(request.context_id, _COMMAND | _LAST, rsp))
