"""The header backfill's thread outlives a transient database error at its start.

Found in review (2026-12-07): ``HeaderBackfill.run`` read its position (and, on a new index,
wrote it finished) before entering the loop whose errors are waited out and tried again. One
``database is locked`` there (another writer holding the lock past the busy timeout while
the daemon starts) ended the ``pas-backfill`` thread for good: the rows filed before schema
18 stayed without Rows, Columns, BitsAllocated and NumberOfFrames until the next restart.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.ingest.receive import Receiver
from appliance.ops.backfill import HeaderBackfill
from appliance.store import header_backfill
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.support.peers import CT_DIR

IMAGE_COLUMNS = ("image_rows", "image_columns", "bits_allocated", "number_of_frames")


def _rows_from_before_schema_18(db: Database, spool: Spool, count: int) -> None:
    """``count`` real CT instances, their image attributes NULL and the backfill's position
    before them: as rows filed before the upgrade are."""
    receiver = Receiver(db, spool)
    for source in sorted(CT_DIR.glob("*.dcm"))[:count]:
        receiver.receive_file(source.read_bytes())
    with db.transaction() as conn:
        conn.execute(f"UPDATE instances SET {', '.join(f'{c} = NULL' for c in IMAGE_COLUMNS)}")
        conn.execute("UPDATE header_backfill SET after_id = 0, last_id = "
                     "(SELECT max(id) FROM instances), finished_at = NULL")


@pytest.mark.parametrize("failing", ["progress", "finish"])
def test_one_database_error_at_the_start_is_waited_out_and_the_backfill_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """``progress``: the first look at the position, with rows to read. ``finish``: a new
    index (nothing filed before the upgrade), marked finished at once. Each fails once with
    ``database is locked``: the thread waits, tries again and finishes."""
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool")
    if failing == "progress":
        _rows_from_before_schema_18(db, spool, 3)
    real = getattr(header_backfill, failing)
    raised = []

    def locked_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not raised:
            raised.append(True)
            raise sqlite3.OperationalError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(header_backfill, failing, locked_once)
    stop = threading.Event()
    thread = threading.Thread(target=HeaderBackfill(db, spool, pause_s=0).run,
                              args=(stop,), kwargs={"retry_s": 0.01}, name="pas-backfill")
    thread.start()
    thread.join(10)
    stop.set()
    assert raised == [True] and not thread.is_alive()
    assert header_backfill.progress(db).finished
    rows = db.query(f"SELECT {', '.join(IMAGE_COLUMNS)} FROM instances")
    assert all(row["image_rows"] and row["image_columns"] for row in rows)
    db.close()
