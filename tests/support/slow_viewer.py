"""A viewer that asks PAS for every study (Study Root C-FIND) over a bare UL association and
reads the answers at a steady pace, a few kB at a time, with a fixed receive buffer.

Run as ``python -m tests.support.slow_viewer HOST PORT BYTES_PER_S RECEIVE_BUFFER`` (a test
starts it inside a network namespace, tests/test_dicomnet_timeout.py): prints one JSON line,
the Pending answers read, the final status, when the last answer was read (epoch seconds)
and the PDU type PAS answered the A-RELEASE-RQ with (6 A-RELEASE-RP, 7 A-ABORT, null when
it had closed the connection). The helpers serve the tests in-process too.
"""

from __future__ import annotations

import json
import struct
import sys
import time

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from appliance.dicomnet.direct_receive import p_data_tf
from appliance.dicomnet.direct_store import parse_command
from tests.support import raw_ul

IMPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2"
PENDING = 0xFF00
A_RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0"


def _encoded(dataset: Dataset) -> bytes:
    data = encode(dataset, True, True)
    assert data is not None, dataset
    return data


def c_find_rq(message_id: int = 1,
              identifier: Dataset | None = None) -> tuple[bytes, bytes]:
    """A Study Root C-FIND-RQ: (command set, identifier), implicit VR LE; by default for
    every study."""
    command = Dataset()
    command.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    command.CommandField = 0x0020
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0001
    body = _encoded(command)
    group = Dataset()
    group.CommandGroupLength = len(body)
    if identifier is None:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        identifier.AccessionNumber = ""
    return _encoded(group) + body, _encoded(identifier)


def ask_every_study(port: int, host: str = "127.0.0.1",
                    receive_buffer: int | None = None) -> raw_ul.RawAssociation:
    raw = raw_ul.associate(port, [(1, str(StudyRootQueryRetrieveInformationModelFind),
                                   IMPLICIT_LITTLE_ENDIAN)], calling="VIEWER", host=host,
                           receive_buffer=receive_buffer)
    assert raw.accepted == {1: 0}, raw.accepted
    command, identifier = c_find_rq()
    raw.sock.sendall(p_data_tf(1, 0x03, command) + p_data_tf(1, 0x02, identifier))
    return raw


def read_answers_at(raw: raw_ul.RawAssociation, bytes_per_s: float) -> tuple[int, int]:
    """Read C-FIND-RSPs 4 kB at a time at a steady ``bytes_per_s`` until the final one:
    (Pending responses, final status)."""
    pending, buffered = 0, bytearray()
    raw.sock.settimeout(30)
    while True:
        data = raw.sock.recv(4096)
        if not data:
            raise ConnectionError(f"PAS closed the connection after {pending} answers")
        buffered += data
        time.sleep(len(data) / bytes_per_s)  # the reader's pace, not a wait for a state
        while len(buffered) >= 6:
            kind, _, length = struct.unpack(">BBI", buffered[:6])
            if len(buffered) < 6 + length:
                break
            body = bytes(buffered[6:6 + length])
            del buffered[:6 + length]
            if kind != 0x04:
                raise ConnectionError(f"PDU type 0x{kind:02X} after {pending} answers")
            offset = 0
            while offset < len(body):  # its presentation data values
                item_length, _, control = struct.unpack_from(">IBB", body, offset)
                if control & 0x01:  # a command: a C-FIND-RSP's, in one fragment here
                    elements = parse_command(body[offset + 6:offset + 4 + item_length])
                    status = struct.unpack("<H", elements[0x0900])[0]
                    if status != PENDING:
                        return pending, status
                    pending += 1
                offset += 4 + item_length


def main(host: str, port: str, bytes_per_s: str, receive_buffer: str) -> None:
    raw = ask_every_study(int(port), host, int(receive_buffer))
    pending, status = read_answers_at(raw, float(bytes_per_s))
    read_all = time.time()
    raw.sock.sendall(A_RELEASE_RQ)
    print(json.dumps({"pending": pending, "status": status, "read_all": read_all,
                      "release": raw.read_pdu(10)[0]}))
    raw.sock.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
