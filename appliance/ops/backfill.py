"""The header backfill: Rows, Columns, BitsAllocated and NumberOfFrames of the instances
filed before schema 18, and the PatientName, PatientBirthDate and PatientSex of each study
filed before schema 28 (each study's own: they were its patient's, the last instance's),
read from their files in the background after the upgrade.

Owns: reading each such file's header (the ingest's own reader,
:func:`~appliance.ingest.reading.read_file_record`: the values are those ingest gives the same
bytes) and the pace. May not touch: SQL (``appliance/store/header_backfill.py``), the files
(read only, never changed).

Why in the background: ingest fills these attributes for every instance it files; the rows
from before the upgrade have none, and reading two million headers at the upgrade would keep
the daemon from serving for the better part of an hour. Meanwhile QIDO-RS leaves the
attributes out of those instances' answers and C-FIND answers them empty, as for an instance
without them. Why not lazily, when a query meets such a row: a query only reads (it runs on
read transactions, often on many rows at once), and a study list must not wait on disk reads.

Bounded memory (invariant 8): a batch of ``batch`` row ids and paths at a time, each file
mapped (only the header's pages are read), a deflated one inflated through a spool temp file.
A file that is missing or cannot be read leaves its row without the attributes (start-up
recovery and the scrub report missing and damaged files; this does not). Each batch's
values and position are one transaction, so a restart goes on where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.ingest.reading import read_file_record
from appliance.store import header_backfill
from appliance.store.db import Database
from appliance.store.index import InstanceRecord
from appliance.store.inflate import inflated
from appliance.store.spool import Spool
from appliance.words import counted

log = logging.getLogger("pas.backfill")

BATCH = 200        # rows read, then written in one transaction
# Between batches, twice as long as the batch took (and at least PAUSE_S): ingest and queries
# come first, the backfill takes at most a third of one core (~0.5 ms a file here, the real
# CT and MR sets, +0.3 MB of memory: two million instances in under an hour).
PAUSE_S = 0.05
IDLE_PER_BUSY = 2.0
READ_CHUNK = 1 << 20


class HeaderBackfill:
    """Reads the headers of the rows from before the upgrade, a batch at a time."""

    def __init__(self, db: Database, spool: Spool, *, batch: int = BATCH,
                 pause_s: float = PAUSE_S):
        self.db = db
        self.spool = spool
        self.batch = batch
        self.pause_s = pause_s
        self.read = 0
        self.unreadable = 0

    def step(self) -> int:
        """Read and write one batch; how many rows it held (0: the backfill is finished)."""
        batch = header_backfill.pending(self.db, self.batch)
        if not batch:
            if not header_backfill.progress(self.db).finished:
                header_backfill.finish(self.db)
                log.info("header backfill finished: %s read, %s could not be read (left "
                         "without Rows, Columns, BitsAllocated, NumberOfFrames; their "
                         "study keeps the patient attributes it had)",
                         counted(self.read, "instance"), counted(self.unreadable, "file"))
            return 0
        read = [(item, self._record(item.path)) for item in batch]
        self.read += sum(record is not None for _, record in read)
        self.unreadable += sum(record is None for _, record in read)
        header_backfill.save(self.db, read, batch[-1].instance_id)
        return len(batch)

    def _begin(self) -> bool:
        """Whether there are rows to read (and say so); a new index is finished at once."""
        state = header_backfill.progress(self.db)
        if state.finished:
            return False
        if state.after_id >= state.last_id:  # no row filed before the upgrade: a new index
            header_backfill.finish(self.db)
            return False
        log.info("header backfill: reading the files of the instances filed before the "
                 "upgrade (row ids %d to %d) for their Rows, Columns, BitsAllocated, "
                 "NumberOfFrames (schema 18) and their study's PatientName, PatientBirthDate, "
                 "PatientSex (schema 28)", state.after_id + 1, state.last_id)
        return True

    def run(self, stop: threading.Event, retry_s: float = 60.0) -> None:
        """Until every row is read (or ``stop``). The first look at the position is tried
        again like every step: it was outside the retry, and one "database is locked" there
        (a long write transaction at the daemon's start) ended the thread for good, the
        backfill never resumed until a restart (found in review, 2026-12-07)."""
        begun = False
        while not stop.is_set():
            started = time.monotonic()
            try:
                if not begun:
                    if not self._begin():
                        return
                    begun = True
                if self.step() == 0:
                    return
            except Exception:  # a database error: tried again later, never the daemon's end
                log.exception("header backfill step failed")
                stop.wait(retry_s)
                continue
            stop.wait(max(self.pause_s, (time.monotonic() - started) * IDLE_PER_BUSY))

    def _record(self, relative: str) -> InstanceRecord | None:
        """The index record of one stored file; None when it is missing or unreadable (any
        error: one odd file must not stop the walk at its row for ever)."""
        try:
            return self._read(self.spool.path(relative))
        except Exception as exc:  # noqa: BLE001 - OSError, InvalidInstance, pydicom's many
            log.debug("header backfill: %s not read: %s", relative, exc)
            return None

    def _read(self, path: Path) -> InstanceRecord | None:
        size = path.stat().st_size
        if size == 0:  # (mmap refuses an empty file)
            return None
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            return read_file_record(view, inflate=self._inflater(path, size))
        finally:
            # A slice still held (by a traceback's frames) keeps the mapping: the garbage
            # collector closes it once that goes.
            with contextlib.suppress(BufferError):
                view.release()
                mapped.close()

    def _inflater(self, path: Path, size: int) -> Any:
        """A deflated dataset inflated from the file a megabyte at a time into a spool temp
        file past a few MB (not through the mapping, whose pages would count as memory)."""
        def from_file(deflated: memoryview, *, limit: int) -> Any:
            return inflated(_chunks(path, size - len(deflated)), limit=limit, spool=self.spool)
        return from_file


def _chunks(path: Path, start: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        while chunk := handle.read(READ_CHUNK):
            yield chunk
