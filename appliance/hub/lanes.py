"""Download lanes, the hub's side: one download's answer sent over several connections at once.

Owns: the registry of striped downloads (which lanes joined which download), cutting a
download's answer into chunks that the lanes take in turn, and tuning each lane's socket
(pacing at its share of the site's line, a low not-sent mark so that a lane takes a chunk only
when it can send it). The wire format and the reasons are in :mod:`appliance.transfer.lanes`.
May not touch: what the answer holds (``appliance.hub.download_stages`` packs it), SQL.

The site sends the download request (``POST /api/v1/downloads`` with ``"lanes": {"id",
"count", "rate_bps"}``: lane 0) and, at the same moment, ``count - 1`` joins (``POST
/api/v1/downloads/lanes`` with ``{"id", "lane"}``) on other kept-alive connections. A join may
arrive before its download is registered: it waits up to ``limits.lane_join_wait_s``
(``JOIN_WAIT_S`` by default), then 404.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from appliance.transfer.lanes import CHUNK_BYTES, LANE_MAGIC, MAX_LANES, RECORD

log = logging.getLogger("pas.hub.download")

SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux
UNPACED = 0xFFFFFFFF  # SO_MAX_PACING_RATE's "no limit"
NOT_SENT_LOWAT = 32 * 1024
TLS_BUFFER_BYTES = 32 * 1024
JOIN_WAIT_S = 5.0
FORGET_AFTER_S = 60.0  # an ended download's id is remembered this long (late joins)
MAX_RATE_BPS = 10_000_000_000
LANE_ID = re.compile(r"[0-9a-f]{32}\Z")  # \Z: "$" took a final newline too


def parse_lanes(value: Any) -> tuple[str, int, int] | str:
    """``(id, count, rate_bps)`` of a request's ``lanes``, or what is wrong with it."""
    if not isinstance(value, dict):
        return "lanes: must be an object {\"id\", \"count\", \"rate_bps\"}"
    lane_id, count, rate = value.get("id"), value.get("count"), value.get("rate_bps")
    if not isinstance(lane_id, str) or not LANE_ID.match(lane_id):
        return "lanes.id: must be 32 lowercase hexadecimal digits"
    if not isinstance(count, int) or not 1 <= count <= MAX_LANES:
        return f"lanes.count: must be an integer from 1 to {MAX_LANES}"
    if not isinstance(rate, int) or not 0 < rate <= MAX_RATE_BPS:
        return f"lanes.rate_bps: must be an integer from 1 to {MAX_RATE_BPS}"
    return lane_id, count, rate


def tune(transport: Any, rate_bps: int | None) -> None:
    """Pace the connection at ``rate_bps`` (None: no limit) with low not-sent marks, in the
    kernel and in asyncio's TLS buffer (512 KiB by default: four lanes had taken 2.3 MB of
    chunks ahead of the wire, and ended one after the other). The same connection may carry
    a later request, which sets its own. Best effort: a socket that refuses (not Linux, not
    TCP) is sent on as it is."""
    if transport is None:
        return
    try:
        if rate_bps is None:
            transport.set_write_buffer_limits()  # asyncio's defaults
        else:
            transport.set_write_buffer_limits(high=TLS_BUFFER_BYTES)
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        pacing = UNPACED if rate_bps is None else max(1, min(rate_bps // 8, UNPACED - 1))
        # As an unsigned 32-bit value: "no limit" does not fit a C int.
        sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("=I", pacing))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT,
                        0 if rate_bps is None else NOT_SENT_LOWAT)
    except (OSError, AttributeError, NotImplementedError, TypeError) as exc:
        log.debug("download connection not tuned: %s", exc)


class SiteShares:
    """Every lane sending to a site at once shares that site's line: each is paced at the
    site's rate divided by their number, re-tuned as lanes start and end (two striped
    downloads for the same site at once must not each take the whole line). Used on the
    server's event loop only."""

    def __init__(self) -> None:
        self.lanes: dict[str, dict[int, Any]] = {}  # site -> lane key -> transport
        self.rates: dict[str, int] = {}

    def join(self, site: str, key: int, transport: Any, rate_bps: int) -> None:
        self.lanes.setdefault(site, {})[key] = transport
        self.rates[site] = rate_bps  # the site's latest word on its line
        self._apply(site)

    def leave(self, site: str, key: int) -> None:
        lanes = self.lanes.get(site, {})
        lanes.pop(key, None)
        if lanes:
            self._apply(site)
        else:
            self.lanes.pop(site, None)

    def share(self, site: str) -> int:
        return self.rates.get(site, 0) // max(1, len(self.lanes.get(site, ())))

    def _apply(self, site: str) -> None:
        for transport in self.lanes[site].values():
            tune(transport, self.share(site))


class StripedAnswer:
    """A download's answer (``Download.next_bytes``) cut in chunks taken by ``count`` lanes."""

    def __init__(self, download: Any, count: int, rate_bps: int, shares: SiteShares):
        self.download = download
        self.count = count
        self.rate_bps = rate_bps
        self.shares = shares
        self.lock = threading.Lock()
        self.pending = memoryview(b"")  # the frame being cut (sliced, never copied whole)
        self.offset = 0
        self.over = False
        self.lanes_started = 1  # lane 0 is the download request itself

    def take(self, size: int = CHUNK_BYTES) -> Any:
        """``(offset, chunk)``, None at the end, ... after a quiet second."""
        with self.lock:
            if not self.pending and not self.over:
                data = self.download.next_bytes()
                if data is ...:
                    return ...
                if data is None:
                    self.over = True
                else:
                    self.pending = memoryview(data)
            if not self.pending:
                return None
            chunk, self.pending = bytes(self.pending[:size]), self.pending[size:]
            offset, self.offset = self.offset, self.offset + len(chunk)
            return offset, chunk

    async def lane(self, number: int, transport: Any) -> AsyncIterator[bytes]:
        """One lane's answer on ``transport`` (its connection): paced at its share of the
        site's line (``SiteShares``), then the chunks it takes. A lane cut short (the site
        went away) ends the whole download."""
        site, key = self.download.site, id(transport) if transport is not None else id(self)
        self.shares.join(site, key, transport, self.rate_bps)
        complete = False
        try:
            yield LANE_MAGIC
            while True:
                got = await run_in_threadpool(self.take)
                if got is ...:
                    continue
                if got is None:
                    complete = True
                    return
                offset, chunk = got
                yield RECORD.pack(offset, len(chunk)) + chunk
        finally:
            self.shares.leave(site, key)
            if not complete:
                log.info("download lane %d for %s cut: the download stops", number,
                         self.download.site, extra={"SITE": self.download.site})
            self.download.end()  # once complete, every chunk was taken: only the log is left


class LaneRegistry:
    """Striped downloads by (site, id), so that joins find theirs. Thread-safe."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.answers: dict[tuple[str, str], tuple[StripedAnswer | None, float]] = {}
        self.shares = SiteShares()

    def register(self, site: str, lane_id: str, answer: StripedAnswer | None) -> bool:
        """Record the download (None: it was refused, joins get 404). False if the id is
        taken (a replay): the request is refused."""
        with self.cond:
            now = time.monotonic()
            for key, (_, at) in list(self.answers.items()):
                if now - at > FORGET_AFTER_S:
                    del self.answers[key]
            key = (site, lane_id)
            if key in self.answers and answer is not None:
                return False
            self.answers[key] = (answer, now)
            self.cond.notify_all()
            return True

    def join(self, site: str, lane_id: str, wait_s: float = JOIN_WAIT_S) -> StripedAnswer | None:
        """The site's download of that id, waited for up to ``wait_s``; None if it never
        came or was refused. Blocking: call it in a thread."""
        deadline = time.monotonic() + wait_s
        with self.cond:
            while (site, lane_id) not in self.answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            answer = self.answers[(site, lane_id)][0]
            if answer is None or answer.lanes_started >= answer.count:
                return None  # refused, or every lane of it is taken (a replayed join)
            answer.lanes_started += 1
            return answer
