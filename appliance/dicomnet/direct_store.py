"""C-STORE of stored Part 10 files written straight to an established association's socket.

Owns: the wire encoding of one C-STORE-RQ (command set, P-DATA-TF fragmentation) and the
reading of its C-STORE-RSP, on an association pynetdicom negotiated and still owns. May not
touch: negotiation, release, abort (pynetdicom's), the index or the spool (it reads a path).

Why: a C-MOVE to a viewer is a long run of C-STOREs on one sub-association. Through
pynetdicom each one crosses the DIMSE encoder, a queue per PDU, the DUL thread and back
(~2 ms for an 86 kB MR image, where Orthanc needs ~0.9 ms). Here the calling thread sends the
file's bytes after a hand-encoded command set and reads the response itself: about the cost
of the bytes. The DUL is kept off the socket meanwhile by its I/O lock (appliance/dicomnet/
reactor.py); its idle timer is restarted after each fragment sent and after each exchange,
so the network timeout measures the peer's silence, not how long one C-STORE takes (idle.py;
restarted only after each exchange, an image that a destination took longer than the
timeout to read had its sub-association aborted by its own loop mid-transfer, and the next
images of the move failed). Anything unexpected (another PDU, a wrong message ID, a broken
socket) aborts the association through pynetdicom and raises: the caller counts the
sub-operation failed, as for any C-STORE failure. A C-CANCEL-RQ read while awaiting the
response is kept where pynetdicom keeps it, so the retrieve handler still sees it.

The same on a C-GET, on the viewer's own association, for memory as much as for speed:
pynetdicom's ``send_msg`` reads the file into P-DATA primitives as fast as the disk gives
them and puts them all on the DUL's queue, which has no bound. A viewer writing to its disk
more slowly than PAS reads left much of the object queued (a 300 MB instance, getscu +B:
up to 8,000 PDUs of 16 kB, +100 to +170 MB of peak RSS per C-GET; a viewer pausing 2 s:
+301 MB). ``sendall`` here waits for the socket: one fragment in memory, whatever the
object's size. Whatever pynetdicom queued for the DUL before (a Pending C-GET-RSP) is sent
first, so the messages keep their order; and the DUL's loop is told the socket was used
(``_pas_direct_sends``): bytes its ``select()`` saw arrive may have been read here.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO

from pynetdicom.dimse_primitives import C_CANCEL

log = logging.getLogger("pas.dicomnet")

P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_ABORT_RQ = 0x07
COMMAND_LAST = 0x03   # message control header: command, last fragment
DATASET_MORE = 0x00
DATASET_LAST = 0x02
# Peer advertised no limit (0): still send in bounded PDUs.
UNLIMITED_PDU = 1 << 20



def take_socket_after_queue(dul: Any, io_lock: Any, timeout: float) -> bool:
    """Acquire ``io_lock`` (the DUL's, reactor.py) once the DUL has sent every primitive
    queued before, so that what the caller writes to the socket follows them; False, the lock
    not held, when the DUL did not drain within ``timeout`` or has ended. Shared by the
    direct C-STORE sender and the direct C-FIND answers (direct_find.py)."""
    deadline = time.monotonic() + timeout
    queued = dul.to_provider_queue
    while True:
        io_lock.acquire()
        if not queued.qsize():
            return True
        io_lock.release()
        if time.monotonic() > deadline or not dul.is_alive():
            return False
        time.sleep(0.0005)

class DirectStoreError(Exception):
    """The exchange broke the protocol or the connection; the association is aborted."""


def _element(group_element: tuple[int, int], value: bytes) -> bytes:
    """An implicit VR little endian element (command sets are always encoded so)."""
    return struct.pack("<HHI", *group_element, len(value)) + value


def _ui(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _ae(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def c_store_rq(sop_class_uid: str, sop_instance_uid: str, message_id: int,
               originator_ae: str | None = None, originator_id: int | None = None) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1), priority medium, a dataset follows."""
    body = [
        _element((0x0000, 0x0002), _ui(sop_class_uid)),
        _element((0x0000, 0x0100), struct.pack("<H", 0x0001)),
        _element((0x0000, 0x0110), struct.pack("<H", message_id)),
        _element((0x0000, 0x0700), struct.pack("<H", 0x0000)),
        _element((0x0000, 0x0800), struct.pack("<H", 0x0001)),
        _element((0x0000, 0x1000), _ui(sop_instance_uid)),
    ]
    if originator_ae is not None and originator_id is not None:
        body.append(_element((0x0000, 0x1030), _ae(originator_ae.strip()[:16])))
        body.append(_element((0x0000, 0x1031), struct.pack("<H", originator_id)))
    joined = b"".join(body)
    return _element((0x0000, 0x0000), struct.pack("<I", len(joined))) + joined


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set's elements as {element number of group 0000: value bytes}."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(data):
            raise DirectStoreError(f"malformed command set at byte {offset - 8}")
        elements[element] = data[offset:offset + length]
        offset += length
    return elements


def read_meta(handle: BinaryIO, path: Path) -> str:
    """Read a Part 10 file's preamble and meta, leaving ``handle`` at the dataset; return
    the transfer syntax UID the meta names."""
    head = handle.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise DirectStoreError(f"{path} is not a Part 10 file with a meta group length")
    (group_length,) = struct.unpack_from("<I", head, 140)
    meta = handle.read(group_length)
    offset, syntax = 0, ""
    while offset + 8 <= len(meta):  # explicit VR little endian, PS3.10 7.1
        _, element, vr = struct.unpack_from("<HH2s", meta, offset)
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<I", meta, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", meta, offset + 6)
            start = offset + 8
        if element == 0x0010:
            syntax = meta[start:start + length].rstrip(b"\x00 ").decode("ascii")
        offset = start + length
    return syntax


class DirectStoreSender:
    """Sends C-STOREs on one established pynetdicom association (the caller's thread)."""

    def __init__(self, assoc: Any):
        self.assoc = assoc
        self.dul = assoc.dul
        self.io_lock = assoc.dul._pas_io_lock
        # The peer's Maximum Length: the acceptor's on an association PAS requested (C-MOVE),
        # the requestor's on one it accepted (C-GET).
        peer_max = int(assoc.dimse.maximum_pdu_size or 0)
        # A PDV item adds 6 bytes (item length, context ID, control header) to its fragment.
        self.fragment = (peer_max if peer_max else UNLIMITED_PDU) - 6
        self.timeout = assoc.dimse_timeout

    @classmethod
    def available(cls, assoc: Any) -> bool:
        return getattr(getattr(assoc, "dul", None), "_pas_io_lock", None) is not None

    def context_id(self, sop_class_uid: str, transfer_syntax: str) -> int | None:
        for context in self.assoc.accepted_contexts:
            if (context.abstract_syntax == sop_class_uid
                    and context.transfer_syntax[0] == transfer_syntax
                    and context.as_scu):  # C-GET: the viewer took the SCP role for it
                return int(context.context_id)
        return None

    def send_file(self, path: Path, sop_class_uid: str, sop_instance_uid: str,
                  message_id: int, originator_ae: str | None = None,
                  originator_id: int | None = None) -> tuple[int, str | None] | None:
        """(status, error comment) of the C-STORE; None when no accepted context carries
        the file as stored (the caller then takes pynetdicom's path)."""
        if not self.assoc.is_established:  # aborted earlier in this move: fail quietly
            raise DirectStoreError("the association is no longer established")
        with open(path, "rb") as handle:
            syntax = read_meta(handle, path)
            context_id = self.context_id(sop_class_uid, syntax)
            if context_id is None:
                return None
            remaining = os.fstat(handle.fileno()).st_size - handle.tell()
            command = c_store_rq(sop_class_uid, sop_instance_uid, message_id, originator_ae,
                                 originator_id)
            try:
                self._take_socket()
            except DirectStoreError as exc:
                failure: Exception = exc
            else:
                try:
                    self.dul._pas_direct_sends = getattr(self.dul, "_pas_direct_sends", 0) + 1
                    sock = self._socket()
                    self._send(sock, context_id, command, handle, remaining)
                    status, comment = self._read_response(sock, message_id)
                except (OSError, DirectStoreError, struct.error) as exc:
                    failure = exc
                else:
                    self.dul._idle_timer.restart()
                    return status, comment
                finally:
                    self.io_lock.release()
        # Outside the lock: pynetdicom's abort goes through the DUL thread.
        log.error("C-STORE of %s to %s failed, aborting the association: %s",
                  sop_instance_uid, self._peer_title(), failure)
        self.assoc.abort()
        try:
            raise DirectStoreError(str(failure)) from failure
        finally:
            # ``failure``'s traceback holds this frame, whose callers (frame.f_back) reach
            # the retrieve handler's generator: left in this cycle, the generator was only
            # closed, and the retrieve's audit row written, at the next garbage collection
            # (seen 10 s later, or at the daemon's stop).
            del failure

    def _peer_title(self) -> str:
        peer = self.assoc.acceptor if self.assoc.is_requestor else self.assoc.requestor
        return str(peer.ae_title).strip()

    def _take_socket(self) -> None:
        """Acquire the I/O lock once the DUL has sent every primitive queued before (a
        Pending C-GET-RSP goes before the next C-STORE-RQ, as pynetdicom would send it)."""
        if not take_socket_after_queue(self.dul, self.io_lock, self.timeout or 30):
            raise DirectStoreError("the DUL did not send what was queued before")

    def _socket(self) -> socket.socket:
        sock = getattr(self.dul.socket, "socket", None)
        if sock is None or sock.fileno() < 0 or not self.assoc.is_established:
            raise DirectStoreError("the association is no longer established")
        return sock

    def _send(self, sock: socket.socket, context_id: int, command: bytes, handle: BinaryIO,
              remaining: int) -> None:
        """The command in one PDU, then the dataset read from disk one fragment at a time
        (bounded memory, invariant 8). The peer takes each fragment: not silent."""
        idle_timer = self.dul._idle_timer
        sock.sendall(self._pdu(context_id, COMMAND_LAST, command))
        while True:
            chunk = handle.read(min(self.fragment, remaining))
            remaining -= len(chunk)
            last = remaining <= 0 or not chunk
            if not chunk and remaining > 0:
                raise DirectStoreError("the stored file is shorter than it was")
            sock.sendall(self._pdu(context_id, DATASET_LAST if last else DATASET_MORE, chunk))
            idle_timer.restart()
            if last:
                return

    @staticmethod
    def _pdu(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
        item = struct.pack(">IBB", len(fragment) + 2, context_id, control)
        return b"".join((struct.pack(">BBI", P_DATA_TF, 0, len(fragment) + 6), item,
                         fragment))

    def _read_response(self, sock: socket.socket, message_id: int) -> tuple[int, str | None]:
        previous_timeout = sock.gettimeout()
        sock.settimeout(self.timeout)
        try:
            command = bytearray()
            while True:
                kind, body = self._read_pdu(sock)
                if kind == A_ABORT_RQ:
                    raise DirectStoreError("the peer aborted the association")
                if kind != P_DATA_TF:
                    raise DirectStoreError(f"unexpected PDU type 0x{kind:02X} awaiting "
                                           "a C-STORE-RSP")
                offset = 0
                while offset < len(body):
                    length, _context, control = struct.unpack_from(">IBB", body, offset)
                    if not control & 0x01:
                        raise DirectStoreError("a dataset fragment where a C-STORE-RSP "
                                               "was expected")
                    command += body[offset + 6:offset + 4 + length]
                    offset += 4 + length
                    if control & 0x02:
                        if self._cancel(bytes(command)):
                            command = bytearray()
                            continue
                        return self._status(bytes(command), message_id)
        finally:
            sock.settimeout(previous_timeout)

    @staticmethod
    def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
        header = _read_exactly(sock, 6)
        kind, _, length = struct.unpack(">BBI", header)
        return kind, _read_exactly(sock, length)

    def _cancel(self, command: bytes) -> bool:
        """A C-CANCEL-RQ (the viewer stopping its C-GET) read where the C-STORE-RSP was
        awaited: kept where pynetdicom keeps it (``dimse.cancel_req``, which the retrieve
        handler's ``event.is_cancelled`` reads), and the response still awaited."""
        elements = parse_command(command)
        if struct.unpack("<H", elements.get(0x0100, b"\x00\x00"))[0] != 0x0FFF:
            return False
        cancel = C_CANCEL()
        cancel.MessageIDBeingRespondedTo = struct.unpack(
            "<H", elements.get(0x0120, b"\x00\x00"))[0]
        requests = self.assoc.dimse.cancel_req
        if len(requests) < 10:  # pynetdicom's own limit
            requests[cancel.MessageIDBeingRespondedTo] = cancel
        return True

    @staticmethod
    def _status(command: bytes, message_id: int) -> tuple[int, str | None]:
        elements = parse_command(command)
        field = struct.unpack("<H", elements.get(0x0100, b"\x00\x00"))[0]
        if field != 0x8001:
            raise DirectStoreError(f"command field 0x{field:04X} is not a C-STORE-RSP")
        answered = struct.unpack("<H", elements.get(0x0120, b"\x00\x00"))[0]
        if answered != message_id:
            raise DirectStoreError(f"C-STORE-RSP answers message {answered}, not {message_id}")
        if 0x0900 not in elements:
            raise DirectStoreError("C-STORE-RSP without a status")
        status = struct.unpack("<H", elements[0x0900])[0]
        comment = elements.get(0x0902)
        return status, comment.rstrip(b"\x00 ").decode("ascii", "replace") if comment else None


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise DirectStoreError("the peer closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
