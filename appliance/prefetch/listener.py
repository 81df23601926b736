"""The HL7 v2 MLLP listener: frames in, acknowledgements out.

Owns: the TCP server (asyncio, in a thread of its own so that the daemon's other threads are
untouched), MLLP framing through the ``hl7`` package's stream reader and writer, and one
acknowledgement per received block. What a message means and what is stored is decided by the
``handler`` (:meth:`appliance.prefetch.service.PrefetchService.handle_hl7`), which runs in a
worker thread because it commits to SQLite before the ACK leaves. May not touch: the database.

Bytes between frames (the CR LF some engines send after the end block, a keep-alive byte)
are skipped and logged: only the start block begins a message. A message with no start block
(an end block met first) or too large gets a NAK naming the problem and the connection is
closed (the stream cannot be resynchronised); every other connection is served on as before
(invariant 7).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from hl7.mllp import start_hl7_server
from hl7.mllp.streams import HL7StreamReader, HL7StreamWriter

from appliance.config import Hl7Section
from appliance.prefetch.messages import build_ack

log = logging.getLogger("pas.hl7")

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c"
FRAME_END = END_BLOCK + b"\r"


class NotFramed(Exception):
    """An end block before any start block: an unframed message, not stray bytes."""


class Hl7Listener:
    """Serve MLLP on ``settings.host:settings.port`` until :meth:`stop`."""

    def __init__(self, settings: Hl7Section, handler: Callable[[str, str], str]):
        self.settings = settings
        self.handler = handler
        self.port = settings.port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pas-hl7", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise OSError(f"HL7 listener cannot listen on {self.settings.host}:"
                          f"{self.settings.port}: {self._error}")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(start_hl7_server(
                self._serve, self.settings.host, self.settings.port,
                limit=self.settings.max_message_kb * 1024, encoding=self.settings.encoding,
                encoding_errors="replace"))
            sockets = self._server.sockets or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        except BaseException as exc:  # report to start(), which raises in the caller
            self._error = exc
            self._ready.set()
            loop.close()
            return
        log.info("HL7 MLLP listener on %s:%d", self.settings.host, self.port)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

    async def _serve(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = f"{peer[0]}:{peer[1]}" if peer else "?"
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    block = await self._read_frame(reader, source)
                except asyncio.IncompleteReadError:
                    return  # the client closed the connection in the middle of a message
                except NotFramed as exc:
                    await self._refuse(writer, f"not MLLP-framed: {exc}", source)
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await self._refuse(writer, "message larger than hl7.max_message_kb "
                                       f"({self.settings.max_message_kb} KB)", source)
                    return
                if block is None:
                    return  # the client closed the connection between messages
                text = block.decode(self.settings.encoding, "replace")
                answer = await loop.run_in_executor(None, self.handler, text, source)
                writer.writeblock(answer.encode(self.settings.encoding, "replace"))
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    async def _read_frame(self, reader: asyncio.StreamReader, source: str) -> bytes | None:
        """The next message between a start block and ``FS CR``; None at a clean end of stream.

        Bytes before the start block are skipped one at a time (there are none, or a few: a
        frame costs one extra read) and logged; hl7's ``readblock`` took them as the start of
        the next block and refused a valid message. An end block met before any start block
        is an unframed message: :class:`NotFramed`."""
        stray = bytearray()
        while True:
            byte = await reader.read(1)
            if not byte:
                if stray:
                    log.info("HL7 from %s: %d bytes after the last frame ignored: %r",
                             source, len(stray), bytes(stray[:32]))
                return None
            if byte == START_BLOCK:
                break
            if byte == END_BLOCK:
                raise NotFramed("Block does not begin with Start Block character <VT> "
                                f"(an end block after {len(stray)} bytes)")
            stray += byte
            if len(stray) > self.settings.max_message_kb * 1024:
                raise NotFramed(f"no start block in {len(stray)} bytes")
        if stray:
            log.warning("HL7 from %s: %d bytes before a start block skipped: %r", source,
                        len(stray), bytes(stray[:32]))
        return (await reader.readuntil(FRAME_END))[:-len(FRAME_END)]

    async def _refuse(self, writer: HL7StreamWriter, reason: str, source: str) -> None:
        log.warning("HL7 from %s refused: %s", source, reason)
        writer.writeblock(build_ack(None, "AR", reason, "100").encode())
        await writer.drain()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
