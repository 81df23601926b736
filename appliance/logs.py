"""Logging set-up: journald with structured fields under systemd, plain stderr otherwise.

Modules log with ``extra={"STUDY_UID": ..., "CALLING_AE": ..., "JOB_ID": ...}``; journald
keeps those as searchable fields (``journalctl STUDY_UID=...``); stderr shows the message.
"""

from __future__ import annotations

import logging
import os
import sys


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
    root.addHandler(handler)
    # pynetdicom is chatty at INFO (every association); keep its warnings and errors.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    transport = logging.getLogger("pynetdicom.transport")
    if not any(isinstance(f, _ConnectFailureFilter) for f in transport.filters):
        transport.addFilter(_ConnectFailureFilter())
    # httpx logs every request at INFO (a heartbeat every 30 s, every bucket PUT): too much.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


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
