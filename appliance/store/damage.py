"""A damaged index database: found before anything uses it, set aside whole, never deleted.

Owns: the integrity check of ``pas.sqlite`` (SQLite's ``PRAGMA quick_check``) and setting a
damaged file aside so that the next start re-indexes the spool. May not touch: the spool (its
files are the data; start-up recovery adopts them back through the receive path,
:mod:`appliance.ops.recovery`), the rows (nothing here reads or salvages them).

Why: a page of the index torn by a failing disk or a controller that lied about a flush
("database disk image is malformed") let ``pas run`` say "PAS ready" and then fail every
routing pass with a traceback every 2 s, C-STOREs with it, while ``pas doctor`` said the
database was fine (it read only the schema version). The spool still holds every instance
byte for byte under its SHA-256; what the index alone knew (jobs, the region's
confirmations, prefetch orders, the audit trail) stays in the file set aside, for support.
Re-indexing loses no instance and deletes nothing: instances are not confirmed in the new
index, so none is evicted before the region confirms it again (their studies are routed
again; destinations and the hub take a second copy of the same instance as the same).

Cost: ``quick_check`` reads every page once: a 261 MB database took 3.2 s from a cold page
cache on this VM's disk, 0.3 s warm (an index of a million instances is about 0.5 GB); start
up already walks the instance table for recovery.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

SIDE_FILES = ("-wal", "-shm")  # the WAL holds committed transactions: moved with the file


class DatabaseDamaged(Exception):
    """The index database failed SQLite's integrity check; the message says what to do."""


def damage_of(path: Path, abandon: Callable[[], bool] | None = None, *,
              thorough: bool = False, untouched: bool = False) -> str | None:
    """What SQLite's ``quick_check`` finds wrong with the database at ``path`` (its first
    finding, or the corruption error that stopped it), or None when it is sound. Read-only.
    A file SQLite cannot open or lock (permissions, busy) raises ``sqlite3.OperationalError``:
    that is not damage, and the caller says it as it is. ``abandon`` (the daemon stopping) is
    asked every few thousand SQLite steps; True ends the check with an OperationalError
    ("interrupted"), so that a check of a large index never holds up a stop. ``thorough``
    runs ``integrity_check`` instead, which also compares every index with its table (an
    index missing a row, "database disk image is malformed" at the DELETE or UPDATE that
    meets it, is invisible to ``quick_check``); it costs more (a lookup per row and
    index), so it is kept for when the damage is already suspected. ``untouched``: no
    ``-wal`` or ``-shm`` file created beside it (:func:`appliance.store.ops.read_only_uri`)."""
    from appliance.store.ops import read_only_uri

    conn = sqlite3.connect(read_only_uri(path, untouched=untouched), uri=True, timeout=30)
    if abandon is not None:
        conn.set_progress_handler(abandon, 10_000)
    try:
        pragma = "integrity_check" if thorough else "quick_check"
        rows = conn.execute(f"PRAGMA {pragma}(1)").fetchall()
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as exc:  # "database disk image is malformed", "not a db"
        return str(exc)
    finally:
        conn.close()
    finding = str(rows[0][0]) if rows else f"no answer from {pragma}"
    return None if finding == "ok" else finding


def refusal(path: Path, finding: str) -> str:
    """The one message the daemon and ``pas doctor`` give for a damaged index."""
    return (f"the index database {path} is damaged ({finding}); the spool's files are not: "
            "stop PAS, run pas cache rebuild-index (it sets the damaged file aside), then "
            "start PAS: start-up recovery indexes every file of the spool again")


def set_aside(path: Path, at: float | None = None, label: str = "damaged") -> Path:
    """Rename the database and its WAL and shared-memory files to
    ``<name>.<label>-<UTC time>[-<n>][-wal|-shm]`` (``-<n>``: a name that second already
    has, never replaced); the new name of the database. The caller holds
    the home's lock (no daemon has it open). ``label``: why (``pas restore`` sets a sound
    index aside as ``before-restore``)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if at is None else at))
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    taken = 1
    while any(target.with_name(target.name + suffix).exists() for suffix in ("", *SIDE_FILES)):
        # Set aside already in this second (rebuild-index run again): a rename would
        # replace that file, the one copy of what the damaged index alone knew.
        taken += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}-{taken}")
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    path.rename(target)
    return target
