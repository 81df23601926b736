"""Logging set-up: journald with structured fields under systemd, plain stderr otherwise.

Modules log with ``extra={"STUDY_UID": ..., "CALLING_AE": ..., "JOB_ID": ...}``; journald
keeps those as searchable fields (``journalctl STUDY_UID=...``); stderr shows the message.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any


def setup(level: str = "info") -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found]

            handler = JournalHandler(SYSLOG_IDENTIFIER="pas")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_LongRecordFilter())
    root.addHandler(handler)
    # pynetdicom is chatty at INFO (every association); keep its warnings and errors.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    transport = logging.getLogger("pynetdicom.transport")
    if not any(isinstance(f, _ConnectFailureFilter) for f in transport.filters):
        transport.addFilter(_ConnectFailureFilter())
    # pydicom says each of its warnings twice: a line of its "pydicom" logger (kept: it goes
    # where the rest goes, cut and escaped) and a Python warning written bare to stderr,
    # with a file path and no instance (a modality engineer found every odd character set
    # twice in the journal). The second is dropped.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    # httpx logs every request at INFO (a heartbeat every 30 s, every bucket PUT): too much.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


class _LongRecordFilter(logging.Filter):
    """Cuts a log line, and its traceback, to a length a journal can hold; writes its
    control characters ``\\xNN`` (a peer's value cannot begin a line of its own).

    A peer decides what some lines carry: pynetdicom and pydicom put a received value whole
    into their messages and tracebacks. An A-ASSOCIATE-RQ naming a 60 kB "UID" (a PDU item
    may be 65,535 bytes) wrote 180 kB to the journal (three lines and a traceback, each with
    the value) before it was refused, from anyone who could connect: 1,000 such connections,
    186 MB. No line of PAS's own comes near the limits."""

    MESSAGE_CHARS = 2048
    TRACEBACK_CHARS = 4096

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a call whose arguments do not fit its format:
            return True  # logging's own error report says so (a filter's raise reached the caller)
        if len(message) > self.MESSAGE_CHARS:
            message = _cut(message, self.MESSAGE_CHARS)
            record.msg, record.args = message, None
        if _CONTROL.search(message):
            # A peer's value (a UID "1.2\n2026-12-06 ... CRITICAL pas.audit: FORGED") wrote a
            # line of its own, read as PAS's (security review, 2026-12-06): each control
            # character is written \xNN, the line stays one line.
            record.msg = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", message)
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and len(record.exc_text) > self.TRACEBACK_CHARS:
            record.exc_text = _cut(record.exc_text, self.TRACEBACK_CHARS)
            # The formatter prints exc_text; journald's handler would also send exc_info,
            # whose exception carries the value whole.
            record.exc_info = None
        return True


# C0 controls (CR and LF among them) and DEL: never in a line PAS writes itself.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cut(text: str, limit: int) -> str:
    return f"{text[:limit]}... [{len(text) - limit} characters cut]"


class _ConnectFailureFilter(logging.Filter):
    """Drops pynetdicom's two ERROR lines for a connection that could not be opened
    ("Association request failed: unable to connect to remote", "TCP Initialisation
    Error: ..."). PAS says it once itself, naming the peer and what happens next (a
    destination waiting for its link, a C-MOVE destination down in the audit), while
    pynetdicom's lines name neither and come with every try: hundreds over a weekend's
    PACS maintenance."""

    DROPPED = ("Association request failed: unable to connect to remote",
               "TCP Initialisation Error")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.DROPPED)


class ThrottledWarning:
    """A warning said at once, then at most once per ``every_s`` with how many were not said
    in between: a flood of refusals must not flood the journal (the counters have each)."""

    def __init__(self, log: logging.Logger, every_s: float = 60.0):
        self.log = log
        self.every_s = every_s
        self._lock = threading.Lock()
        self._said_at: float | None = None
        self._unsaid = 0

    def warn(self, message: str, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if self._said_at is not None and now - self._said_at < self.every_s:
                self._unsaid += 1
                return
            unsaid, self._unsaid, self._said_at = self._unsaid, 0, now
        if unsaid:
            message += f" ({unsaid} more in the last {self.every_s:.0f} s, not logged)"
        self.log.warning(message, *args, **kwargs)


class LoopFailures:
    """What a background loop that fails at every pass says, without flooding the journal.

    A loop running every few seconds met the same error each time (a damaged index page
    made the routing loop log a 30-line traceback every 2 s: ~43,000 a day, in a journal
    bounded to 500 MB, pushing out what IT would look for). The first failure is logged
    whole, with its traceback; the same error again (same type and message) only as one
    WARNING line at most every ``every_s`` with how many times; another error is logged
    whole; the first pass that works again says how many failed before it.
    """

    def __init__(self, log: logging.Logger, what: str, every_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.what, self.every_s, self.clock = log, what, every_s, clock
        self._signature: tuple[str, str] | None = None
        self._count = 0        # failures in a row
        self._unsaid = 0       # of those, not yet in a log line
        self._said_at = 0.0

    def failed(self, exc: BaseException) -> None:
        """Call from the loop's ``except`` block (the traceback is the current one)."""
        signature = (type(exc).__name__, str(exc))
        self._count += 1
        if signature != self._signature:
            self._signature, self._unsaid, self._said_at = signature, 0, self.clock()
            self.log.exception("%s", self.what)
            return
        self._unsaid += 1
        if self.clock() - self._said_at >= self.every_s:
            self.log.warning("%s again, %d times in %.0f s (%s: %s); the first one's "
                             "traceback is above", self.what, self._unsaid,
                             self.clock() - self._said_at, *signature)
            self._unsaid, self._said_at = 0, self.clock()

    def worked(self) -> None:
        """Call after a pass that did not fail."""
        if self._count:
            self.log.info("%s: works again after %d failed passes", self.what,
                             self._count)
        self._signature, self._count, self._unsaid = None, 0, 0
