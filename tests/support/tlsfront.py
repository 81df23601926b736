"""An HTTPS front on 127.0.0.1 for a plain-HTTP peer: the TLS a reverse proxy (nginx before
a regional PACS) adds, with the certificate the test chooses (tests/faults/pki.py).

Owns: one listening socket and an asyncio loop in a thread; each connection's TLS ends here
and its bytes go on, in clear, to the upstream (Orthanc in its namespace). asyncio, not a
thread per direction: an ``ssl.SSLSocket`` read in one thread while written in another is
not safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

from tests.support.peers import free_port


class TlsFront:
    def __init__(self, upstream_host: str, upstream_port: int, cert: Path, key: Path):
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.connections = 0  # TLS handshakes completed (a refused certificate ends before)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tlsfront")
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> TlsFront:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._connection, "127.0.0.1", self.port, ssl=self.context), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
