"""The HL7 v2 MLLP listener: frames in, acknowledgements out.

Owns: the TCP server (asyncio, in a thread of its own so that the daemon's other threads are
untouched), MLLP framing through the ``hl7`` package's stream reader and writer, and one
acknowledgement per received block. What a message means and what is stored is decided by the
``handler`` (:meth:`appliance.prefetch.service.PrefetchService.handle_hl7`), which runs in a
worker thread because it commits to SQLite before the ACK leaves. May not touch: the database.

Bytes between frames (the CR LF some engines send after the end block, a keep-alive byte)
are skipped and logged: only the start block begins a message. They are a connection idle
between messages (``hl7.idle_timeout_s``, closable for a new connection), not a message under
way: the frame timer starts at the start block. At most :data:`MAX_BETWEEN_FRAMES` of them
between two frames, read as they come (what is buffered at once, never a byte per turn of
the event loop); past it the connection is refused and closed. A message with no start block
(an end block met first), an end block followed by anything but CR, or one too large gets a
NAK naming the problem and the connection is closed (the stream cannot be resynchronised). A
start block inside a frame (the sender began again) drops the unfinished message before it.
Every other connection is served on as before (invariant 7). Such a NAK echoes the MSH-10
control id (in MSA-2) and the MSH fields an ACK mirrors when the message's first segment, an
MSH, was received whole up to MSH-10 (:func:`~appliance.prefetch.acks.leading_msh`; the
rest of the message is not parsed), so that the RIS can tell which message was refused.

With ``hl7.tls.enabled`` the port speaks MLLP over TLS (appliance/ops/security.py's BCP 195
context). The handshake is made here, on the accepted connection (``start_tls``), not by the
server: asyncio drops a server-side handshake failure without a word (an ``ssl.SSLError`` is
an ``OSError``, logged only in debug mode), and a refused certificate must be logged, audited
and counted as the DICOM listener's is. A sender speaking plain MLLP to the TLS port is
named in the log; a port probe or a health check that closes at once is not news.

Bounded (invariant 8): at most ``hl7.max_connections`` connections are served; a new one
beyond takes the place of the one idle longest (between messages for
:data:`EVICT_AFTER_IDLE_S` at least: its sender reconnects when it next sends), else it is
closed at once. It was closed at once whatever the others did: 32 connections left open
and silent (leaked by an engine, a health check that never closes) kept the RIS out for
``hl7.idle_timeout_s``, an hour by default. A message not finished ``hl7.frame_timeout_s``
after its start block gets a NAK and its connection is closed; a connection silent
``hl7.idle_timeout_s`` between messages is closed; an answer the client does not take
within ``hl7.frame_timeout_s`` (a client that sends but never reads its ACKs, once the
socket buffers are full) has its connection dropped: waiting on it for ever held a
connection slot for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

from hl7.mllp import start_hl7_server
from hl7.mllp.streams import HL7StreamReader, HL7StreamWriter

from appliance.config import Hl7Section
from appliance.ops.security import certificate_refusal, name_refusal, server_context
from appliance.prefetch.acks import HEAD_BYTES, build_ack, leading_msh
from appliance.prefetch.charsets import message_encoding

log = logging.getLogger("pas.hl7")

# A connection silent between messages this long may be closed for a new one when
# ``hl7.max_connections`` are open (one under way with a message never is).
EVICT_AFTER_IDLE_S = 1.0

# OpenSSL's reasons when the first bytes are no TLS record: a sender speaking plain MLLP
# (its start block, 0x0B, read as a record type) or HTTP to the TLS port.
_CLEARTEXT = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
              "RECORD_LAYER_FAILURE"}
# ... and when the client offers only TLS versions under the BCP 195 floor (1.2).
_OLD_TLS = {"UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "NO_PROTOCOLS_AVAILABLE",
            "TLSV1_ALERT_PROTOCOL_VERSION"}

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c"
FRAME_END = END_BLOCK + b"\r"

# Bytes outside a frame tolerated between two frames (a CR LF per message, keep-alive bytes):
# one more and the connection is refused and closed. It was hl7.max_message_kb (1 MiB) read a
# byte at a time without yielding: 8 connections sending 1 MiB of junk each held a valid
# order on another connection for seconds (invariants 7, 8; review 2026-12).
MAX_BETWEEN_FRAMES = 4096


class NotFramed(Exception):
    """An end block before any start block: an unframed message, not stray bytes; or an
    end block not followed by CR. ``head``: the first bytes of the message, for its MSH."""

    def __init__(self, reason: str, head: bytes = b""):
        super().__init__(reason)
        self.head = head


class NotReading(Exception):
    """The client did not take an answer within ``hl7.frame_timeout_s``."""


class Idle(Exception):
    """Nothing received for ``hl7.idle_timeout_s`` between messages."""


class Stalled(Exception):
    """A message begun but not finished within ``hl7.frame_timeout_s`` (the text: what was
    missing). ``head``: the message, when its end block came; else it is in the buffer."""

    def __init__(self, reason: str, head: bytes = b""):
        super().__init__(reason)
        self.head = head


class Hl7Listener:
    """Serve MLLP on ``settings.host:settings.port`` until :meth:`stop`."""

    def __init__(self, settings: Hl7Section, handler: Callable[[str, str], str],
                 refused: Callable[[str, str, str], None] = lambda *_: None,
                 refused_connection: Callable[[str, str, str], None] = lambda *_: None):
        """``refused(source, reason, msh)``: told of each message refused here, before it
        was read (``msh``: its MSH when received whole up to MSH-10, else ''), for the audit
        trail; run in a worker thread."""
        self.settings = settings
        self.handler = handler
        self.refused = refused
        # ``refused_connection(address, kind, reason)``: a connection closed before any
        # message, from a host not in hl7.allowed_sources (``unknown-source``) or whose TLS
        # certificate was refused (``tls-certificate``): the audit trail's security row and
        # the count; run in a worker thread.
        self.refused_connection = refused_connection
        self._tls: ssl.SSLContext | None = None
        self._allowed = [ipaddress.ip_network(source, strict=False)
                         for source in settings.allowed_sources]
        self.port = settings.port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Served now -> since when silent between messages (None: a message under way);
        # read and written only in the loop's thread.
        self._open: dict[HL7StreamWriter, float | None] = {}
        # Those of them still in their TLS handshake, with their task: one taken for a new
        # connection is cancelled, not aborted (asyncio's start_tls then returns no transport
        # and StreamWriter.start_tls fails on it with an AttributeError).
        self._handshaking: dict[HL7StreamWriter, asyncio.Task[Any]] = {}

    def start(self) -> None:
        tls = self.settings.tls
        if tls.enabled and tls.cert and tls.key:
            try:
                self._tls = server_context(tls.cert, tls.key, tls.ca, tls.require_client_cert,
                                           section="hl7.tls")
            except (OSError, ValueError) as exc:  # never served in clear instead
                raise OSError(f"HL7 listener not started: its TLS settings (hl7.tls) cannot "
                              f"be used: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="pas-hl7", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise OSError(f"HL7 listener cannot listen on {self.settings.host}:"
                          f"{self.settings.port}: {self._error} (check hl7.host / hl7.port)")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(start_hl7_server(
                self._connected, self.settings.host, self.settings.port,
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
        log.info("HL7 MLLP listener on %s:%d%s", self.settings.host, self.port,
                 " (TLS)" if self._tls is not None else "")
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

    def _connected(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> Any:
        """Called in the protocol's ``connection_made``, before the transport's first read:
        with TLS the transport is paused here, so that the client's first bytes (its
        ClientHello) stay in the socket for :meth:`_handshake` rather than landing in the
        MLLP reader's buffer, where the TLS layer would never see them."""
        if self._tls is not None:
            writer.transport.pause_reading()
        return self._serve(reader, writer)

    async def _handshake(self, writer: HL7StreamWriter, address: str, source: str) -> bool:
        """The TLS handshake on an accepted connection (bounded by hl7.frame_timeout_s);
        False, the reason logged and a refused certificate reported, when it fails."""
        assert self._tls is not None
        task = asyncio.current_task()
        assert task is not None
        self._handshaking[writer] = task
        try:
            await writer.start_tls(self._tls,
                                   ssl_handshake_timeout=self.settings.frame_timeout_s)
            refusal = name_refusal(writer.get_extra_info("peercert"),
                                   self.settings.tls.allowed_names, "hl7.tls")
            if refusal is None:
                return True
            await self._refuse_certificate(address, source, refusal)
        except ssl.SSLError as exc:
            refusal = certificate_refusal(exc, section="hl7.tls")
            if refusal is not None:
                await self._refuse_certificate(address, source, refusal)
            elif exc.reason in _CLEARTEXT:
                log.warning("HL7 from %s: closed, not TLS (hl7.tls.enabled: the sender must "
                            "speak MLLP over TLS to this port): %s", source, exc.reason)
            elif exc.reason in _OLD_TLS:
                log.warning("HL7 from %s: closed, its TLS version is too old (TLS 1.2 at "
                            "least): %s", source, exc.reason)
            else:
                log.info("HL7 from %s: TLS handshake failed: %s", source, exc)
        except ConnectionAbortedError as exc:  # no handshake within the timeout
            log.info("HL7 from %s: closed, no TLS handshake within hl7.frame_timeout_s "
                     "(%g s): %s", source, self.settings.frame_timeout_s, exc)
        except (ConnectionError, TimeoutError) as exc:  # reset, closed: a port probe
            log.debug("HL7 from %s: no TLS handshake: %s", source, exc)
        finally:
            self._handshaking.pop(writer, None)
        return False

    async def _refuse_certificate(self, address: str, source: str, refusal: str) -> None:
        """A client certificate refused: the warning, then the audit row and the count."""
        log.warning("HL7 from %s: %s (connection closed)", source, refusal)
        with contextlib.suppress(Exception):  # the refusal stands whatever the trail
            await asyncio.get_running_loop().run_in_executor(
                None, self.refused_connection, address, "tls-certificate", f"HL7 {refusal}")

    async def _serve(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = f"{peer[0]}:{peer[1]}" if peer else "?"
        loop = asyncio.get_running_loop()
        if self._allowed and not self._from_allowed(peer):
            # Anyone who could reach the port sent orders (a named patient's priors pulled
            # from the region) and merges (security review, 2026-12-06).
            log.warning("HL7 from %s: closed at once, not one of hl7.allowed_sources", source)
            writer.close()
            with contextlib.suppress(Exception):  # the refusal stands whatever the trail
                await loop.run_in_executor(
                    None, self.refused_connection, peer[0] if peer else "?", "unknown-source",
                    "HL7 connection closed: not one of hl7.allowed_sources")
            return
        if len(self._open) >= self.settings.max_connections and not self._make_room(source):
            log.warning("HL7 from %s: closed at once, already %d HL7 connections "
                        "(hl7.max_connections = %d), none of them idle", source,
                        len(self._open), self.settings.max_connections)
            writer.close()
            return
        self._open[writer] = loop.time()  # a handshake that stalls may be evicted
        shaken = self._tls is None
        try:
            if not shaken and not await self._handshake(writer, peer[0] if peer else "?",
                                                        source):
                return
            shaken = True
            while True:
                self._open[writer] = loop.time()  # silent between messages from now
                try:
                    block = await self._read_frame(reader, source, writer)
                except asyncio.IncompleteReadError:
                    return  # the client closed the connection in the middle of a message
                except Idle:
                    log.info("HL7 from %s: idle for %g s (hl7.idle_timeout_s): closed",
                             source, self.settings.idle_timeout_s)
                    return
                except Stalled as exc:
                    await self._refuse(writer, f"{exc} within hl7.frame_timeout_s "
                                       f"({self.settings.frame_timeout_s:g} s)", source,
                                       exc.head or _buffered(reader))
                    return
                except NotFramed as exc:
                    await self._refuse(writer, f"not MLLP-framed: {exc}", source, exc.head)
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await self._refuse(writer, "message larger than hl7.max_message_kb "
                                       f"({self.settings.max_message_kb} KB)", source,
                                       _buffered(reader))
                    return
                if block is None:
                    return  # the client closed the connection between messages
                encoding, unknown = message_encoding(block, self.settings.encoding)
                if unknown:
                    log.warning("HL7 from %s: MSH-18 character set %r unknown, read as %s "
                                "(hl7.encoding)", source, unknown, encoding)
                text = block.decode(encoding, "replace")
                answer = await loop.run_in_executor(None, self.handler, text, source)
                await self._send(writer, answer.encode(encoding, "replace"), source)
        except (ConnectionError, NotReading):
            return
        except Exception:  # said now, not when the task is collected; the others go on
            log.exception("HL7 from %s: connection failed", source)
        finally:
            self._open.pop(writer, None)
            if shaken:
                writer.close()
            else:  # no graceful close waiting on a peer that never read its handshake
                writer.transport.abort()

    def _from_allowed(self, peer: Any) -> bool:
        """Whether the peer's address is in one of ``hl7.allowed_sources``."""
        try:
            address = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            return False
        return any(address in network for network in self._allowed)

    def _make_room(self, source: str) -> bool:
        """Close the connection silent between messages the longest (at least
        :data:`EVICT_AFTER_IDLE_S`) for ``source``'s; False when none is."""
        now = asyncio.get_running_loop().time()
        idle = [(since, writer) for writer, since in self._open.items()
                if since is not None and now - since >= EVICT_AFTER_IDLE_S]
        if not idle:
            return False
        since, oldest = min(idle, key=lambda pair: pair[0])
        del self._open[oldest]  # its task ends at the end of stream the abort gives it
        peer = oldest.get_extra_info("peername")
        handshake = self._handshaking.pop(oldest, None)
        log.info("HL7 from %s: closed after %.0f s %s, for a new connection from %s "
                 "(hl7.max_connections = %d reached)",
                 f"{peer[0]}:{peer[1]}" if peer else "?", now - since,
                 "without finishing its TLS handshake" if handshake is not None
                 else "silent between messages", source, self.settings.max_connections)
        if handshake is not None:
            handshake.cancel()  # asyncio's start_tls closes the transport it was given
        else:
            oldest.transport.abort()
        return True

    async def _read_frame(self, reader: asyncio.StreamReader, source: str,
                          writer: HL7StreamWriter) -> bytes | None:
        """The next message between a start block and ``FS CR``; None at a clean end of stream.

        Bytes before the start block are skipped (:meth:`_to_start_block`) within
        ``idle_timeout_s`` of the last message (:class:`Idle`): the connection is idle
        between messages meanwhile. From the start block, the whole frame must arrive within
        ``frame_timeout_s`` (:class:`Stalled`), and the connection has a message under way.
        The frame timer started at the first byte, stray ones included: the CR LF an engine
        sent after a frame began a "message" that, 60 s later, got an unasked AR (empty
        MSA-2) which the engine took for the answer to its next order, lost."""
        try:
            async with asyncio.timeout(self.settings.idle_timeout_s or None):
                if not await self._to_start_block(reader, source):
                    return None
        except TimeoutError:
            raise Idle from None
        if writer in self._open:
            self._open[writer] = None  # a message under way: never closed for another
        ended: list[bytes] = []  # the message, once its end block came: only CR is awaited
        try:
            async with asyncio.timeout(self.settings.frame_timeout_s):
                return await self._rest_of_frame(reader, source, ended)
        except TimeoutError:
            if ended:
                raise Stalled("an end block FS came, but no CR after it (MLLP ends a "
                              "message with FS CR)", ended[0]) from None
            raise Stalled("message not finished") from None

    async def _to_start_block(self, reader: asyncio.StreamReader, source: str) -> bool:
        """Read up to and including the next start block; False at the end of stream.

        The bytes before it are skipped and logged, at most :data:`MAX_BETWEEN_FRAMES`
        (else :class:`NotFramed`), taken as they come: a wait for the next byte, then at
        once every byte already buffered up to a start or end block (hl7's ``readblock``
        took them as the start of the next block and refused a valid message). An end block
        met before any start block is an unframed message: :class:`NotFramed`."""
        stray = bytearray()
        while True:
            byte = await reader.read(1)  # waits, yielding, when nothing is buffered
            if byte == START_BLOCK:
                break
            if not byte:
                if stray:
                    log.info("HL7 from %s: %d bytes after the last frame ignored: %r",
                             source, len(stray), bytes(stray[:32]))
                return False
            if byte == END_BLOCK:
                raise NotFramed("Block does not begin with Start Block character <VT> "
                                f"(an end block after {len(stray)} bytes)", bytes(stray))
            stray += byte
            run = _outside_frame(reader, MAX_BETWEEN_FRAMES + 1 - len(stray))
            if run:
                stray += await reader.readexactly(run)  # buffered: no wait
            if len(stray) > MAX_BETWEEN_FRAMES:
                raise NotFramed(f"no start block in the {len(stray)} bytes after the last "
                                f"frame (at most {MAX_BETWEEN_FRAMES} between frames)",
                                bytes(stray))
        if stray:
            log.warning("HL7 from %s: %d bytes before a start block skipped: %r", source,
                        len(stray), bytes(stray[:32]))
        return True

    async def _rest_of_frame(self, reader: asyncio.StreamReader, source: str,
                             ended: list[bytes]) -> bytes:
        block = (await reader.readuntil(END_BLOCK))[:-len(END_BLOCK)]
        ended.append(block)
        after = await reader.readexactly(1)
        if after != FRAME_END[1:]:
            # Read on to the next FS CR, a sender ending its messages with FS alone had two
            # messages taken for one (or its one left waiting frame_timeout_s for nothing).
            raise NotFramed(f"the end block FS is followed by 0x{after.hex()}, not CR", block)
        if START_BLOCK in block:
            # The sender gave up a message and began again: what preceded the last start
            # block is an unfinished message (HL7 text never holds VT). Read as one, the two
            # made an order of the first message's patient with the second one's order number.
            abandoned, _, block = block.rpartition(START_BLOCK)
            log.warning("HL7 from %s: %d bytes of an unfinished message dropped, a new start "
                        "block began: %r", source, len(abandoned), abandoned[:64])
        return block

    async def _refuse(self, writer: HL7StreamWriter, reason: str, source: str,
                      head: bytes) -> None:
        """A NAK for a message not read whole; ``head``: its first bytes received, whose MSH
        (when all there up to MSH-10) the NAK echoes."""
        log.warning("HL7 from %s refused: %s", source, reason)
        message, codec = leading_msh(head.rpartition(START_BLOCK)[2], self.settings.encoding)
        try:  # audited as a message refused once read is (it was only logged), naming the
            # MSH the NAK echoes (none when MSH-10 may be cut short)
            await asyncio.get_running_loop().run_in_executor(
                None, self.refused, source, reason, str(message) if message else "")
        except Exception:  # the trail's failure is logged there; the NAK still goes
            log.exception("HL7 from %s: the refusal could not be audited", source)
        await self._send(writer, build_ack(message, "AR", reason, "100")
                         .encode(codec, "replace"), source)

    async def _send(self, writer: HL7StreamWriter, answer: bytes, source: str) -> None:
        """Write one block; :class:`NotReading` (the connection dropped, logged naming the
        peer) if the client has not taken it within ``hl7.frame_timeout_s``.

        ``drain`` waits only once the socket buffers are full, which a client that never
        reads its ACKs brings about; unbounded, it held a connection slot for ever. The
        transport is aborted, not closed: a close waits to flush what the client never
        reads, and the socket stayed open."""
        writer.writeblock(answer)
        try:
            async with asyncio.timeout(self.settings.frame_timeout_s):
                await writer.drain()
        except TimeoutError:
            log.warning("HL7 from %s: an answer not taken within hl7.frame_timeout_s "
                        "(%g s), %d bytes unsent (the client does not read its ACKs): "
                        "connection dropped", source, self.settings.frame_timeout_s,
                        writer.transport.get_write_buffer_size())
            writer.transport.abort()
            raise NotReading from None

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)


def _outside_frame(reader: asyncio.StreamReader, most: int) -> int:
    """How many of the bytes already buffered (``most`` at most) come before the next start
    or end block: bytes outside a frame that may be consumed without waiting. Read from the
    private buffer, as :func:`_buffered` does: a ``read`` would consume a start block too."""
    buffered = reader._buffer  # noqa: SLF001
    end = min(len(buffered), most)
    cut = [at for at in (buffered.find(START_BLOCK, 0, end), buffered.find(END_BLOCK, 0, end))
           if at != -1]
    return min(cut, default=end)


def _buffered(reader: asyncio.StreamReader) -> bytes:
    """The first bytes received and not yet consumed: the start of a message that stalled
    or is too large (``readuntil`` leaves what it searched in the buffer). Read from the
    private buffer because ``read`` would wait when it is empty."""
    return bytes(reader._buffer[:HEAD_BYTES])  # noqa: SLF001
