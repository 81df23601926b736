"""A bare DICOM Upper Layer client over a plain socket, for PDUs no well-behaved SCU sends.

pynetdicom's requestor has threads of its own that read the socket and the DIMSE queue: a
message sent by hand beside them can have its answer taken by them. Here nothing else
reads: the test sends exactly the bytes it means, and reads exactly what came back.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from appliance.dicomnet.direct_receive import p_data_tf
from appliance.dicomnet.direct_store import c_store_rq, parse_command

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def associate_rq(contexts: list[tuple[int, str, str]], called: str, calling: str,
                  max_pdu: int) -> bytes:
    body = _item(0x10, APPLICATION_CONTEXT)
    for context_id, abstract, syntax in contexts:
        sub = _item(0x30, abstract.encode()) + _item(0x40, syntax.encode())
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))
    pdu = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
           + b"\0" * 32 + body)
    return struct.pack(">BBI", 0x01, 0, len(pdu)) + pdu


@dataclass
class RawAssociation:
    sock: socket.socket
    accepted: dict[int, int] = field(default_factory=dict)  # context ID -> result
    max_pdu: int = 0  # what the acceptor said it receives (0: unlimited)

    def read_pdu(self, timeout: float = 10.0) -> tuple[int | None, bytes]:
        """(PDU type, body); (None, b"") when the peer closed the connection."""
        self.sock.settimeout(timeout)
        header = self._exactly(6)
        if header is None:
            return None, b""
        kind, _, length = struct.unpack(">BBI", header)
        return kind, self._exactly(length) or b""

    def _exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def c_store(self, context_id: int, sop_class: str, sop_instance: str, dataset: bytes,
                message_id: int = 7) -> dict[int, bytes]:
        """Send one C-STORE-RQ and its dataset on ``context_id`` (fragments within the
        acceptor's maximum PDU); the C-STORE-RSP's command elements."""
        self.sock.sendall(p_data_tf(context_id, 0x03,
                                    c_store_rq(sop_class, sop_instance, message_id)))
        step = min(self.max_pdu - 6 if self.max_pdu else 1 << 20, 64 << 10)
        for at in range(0, len(dataset), step):
            last = at + step >= len(dataset)
            self.sock.sendall(p_data_tf(context_id, 0x02 if last else 0x00,
                                        dataset[at:at + step]))
        kind, body = self.read_pdu()
        assert kind == 0x04, f"expected a P-DATA-TF with the C-STORE-RSP, got {kind}"
        return parse_command(body[6:])

    def release(self) -> None:
        self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0")
        self.read_pdu(5)
        self.sock.close()


def associate(port: int, contexts: list[tuple[int, str, str]], called: str = "PAS",
              calling: str = "RAWSCU", max_pdu: int = 0, host: str = "127.0.0.1",
              receive_buffer: int | None = None) -> RawAssociation:
    """Open an association proposing ``(context ID, abstract syntax, transfer syntax)``.
    ``receive_buffer``: a fixed SO_RCVBUF (set before connecting: no autotuning)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(associate_rq(contexts, called, calling, max_pdu))
    raw = RawAssociation(sock)
    kind, body = raw.read_pdu()
    assert kind == 0x02, f"association not accepted (PDU type {kind})"
    offset = 68
    while offset + 4 <= len(body):
        item, _, length = struct.unpack_from(">BBH", body, offset)
        if item == 0x21:
            raw.accepted[body[offset + 4]] = body[offset + 6]
        elif item == 0x50:
            sub = offset + 4
            while sub + 4 <= offset + 4 + length:
                sub_item, _, sub_length = struct.unpack_from(">BBH", body, sub)
                if sub_item == 0x51:
                    raw.max_pdu = struct.unpack_from(">I", body, sub + 4)[0]
                sub += 4 + sub_length
        offset += 4 + length
    return raw
