"""The index database's integrity while the daemon runs: SQLite's ``quick_check`` on a schedule.

Owns: the periodic check (:class:`IndexChecker`, its own thread in the daemon, every
``cache.index_check_interval_s``; sooner when a loop meets SQLITE_CORRUPT), what the last
check found (:data:`latest` in the daemon's process, for ``/metrics`` and the heartbeat; the
file ``$PAS_HOME/index-check.json`` for the commands run beside it, ``pas status`` and ``pas
doctor``) and the one message that says what to do. May not touch: the index (the check reads
it through its own read-only connection) or the spool, and it never stops the daemon.

Why: a damaged index is refused at start-up (:mod:`appliance.store.damage`), but damage that
happened while the daemon ran (a page torn by a failing disk) was seen only as the errors of
whatever met it: C-STOREs touching the page failing, a routing traceback every 2 s, a
heartbeat not sent at all when its reads met it, ``pas status`` a database error. The
daemon's own connections may keep reading the page from their cache, so ``/metrics`` can say
nothing at all. Nobody was told "the index is damaged, here is what to do", and the appliance
could run half-broken for days. Only a fresh connection reading every page finds it.

Why it repairs nothing and keeps the daemon running: the spool's files are the data and they
are sound; the damage may touch a table no C-STORE needs (the audit trail) while modalities
keep storing; rebuilding the index re-routes every study and forgets the region's
confirmations and the jobs under way. When to take the appliance out of service (at night, or
now) is the operator's decision: PAS says it loud (ERROR log, ``pas_index_damaged``, the
heartbeat's errors, ``pas status``, ``pas doctor``) and names the fix.

Cost (docs/reliability.md, measured on this VM): ``quick_check`` reads every page once; its
read transaction does not block the writers (WAL), it only keeps the WAL from being
checkpointed past its snapshot for as long as it runs, so the WAL grows by what is written
meanwhile. A stop interrupts it (SQLite's progress handler).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.store.damage import damage_of

log = logging.getLogger("pas.ops.index_check")

STATE_FILE = "index-check.json"
# A loop meeting SQLITE_CORRUPT asks for a check now; at most once per this many seconds
# (the routing loop meets the same damage every 2 s).
SUSPECT_RECHECK_S = 60.0
FIX = ("systemctl stop pas; sudo -u pas pas cache rebuild-index; systemctl start pas "
       "(start-up recovery indexes the spool again), or restore the last backup "
       "(docs/operations.md, A damaged index database)")


# What a heartbeat says when its own reads of the index failed (ops/heartbeat.py); the hub
# counts it with the damage message in pas_fleet_site_index_damaged (hub/fleet.py).
UNREADABLE = "index database unreadable"
_DAMAGE_SAID = re.compile(r"the index database .* is damaged \(")


def says_index_trouble(error: str) -> bool:
    """A heartbeat error saying the site's index is damaged or could not be read."""
    return error.startswith(UNREADABLE) or _DAMAGE_SAID.match(error) is not None


@dataclass(frozen=True)
class IndexCheck:
    """One check: when it ended, how long it took, and what it found (``finding``: SQLite's
    first complaint, None when sound; ``error``: the check could not run, which is not
    damage)."""

    path: str
    checked_at: float
    duration_s: float
    finding: str | None = None
    error: str | None = None

    @property
    def damaged(self) -> bool:
        return self.finding is not None

    def message(self) -> str:
        """What the log, the heartbeat and ``pas status`` say of a damaged index."""
        return f"the index database {self.path} is damaged ({self.finding}): {FIX}"


_lock = threading.Lock()
_latest: IndexCheck | None = None
_suspected = threading.Event()


def latest() -> IndexCheck | None:
    """The last check this process made (the daemon: at start-up, then periodically)."""
    with _lock:
        return _latest


def check(path: Path, abandon: threading.Event | None = None, *,
          raise_errors: bool = False, thorough: bool = False) -> IndexCheck:
    """Run ``quick_check`` on ``path`` through its own read-only connection, timed. A check
    that cannot run (locked, unreadable, interrupted: not damage) is said in ``error``, or
    raised with ``raise_errors`` (start-up refuses what it cannot check). ``thorough``:
    ``integrity_check`` (:func:`appliance.store.damage.damage_of`)."""
    started = time.monotonic()
    finding = error = None
    try:
        finding = damage_of(path, abandon.is_set if abandon is not None else None,
                            thorough=thorough)
    except sqlite3.Error as exc:
        if raise_errors:
            raise
        error = f"{type(exc).__name__}: {exc}"
    return IndexCheck(str(path), round(time.time(), 3),
                      round(time.monotonic() - started, 3), finding, error)


def record(home: Path, result: IndexCheck) -> None:
    """Keep ``result`` as this process's latest and in ``$PAS_HOME/index-check.json``
    (written whole, then renamed: a reader never sees half a file). A file that cannot be
    written is logged; the metric and the heartbeat still say it."""
    global _latest
    with _lock:
        _latest = result
    target = home / STATE_FILE
    temporary = target.with_name(f".{STATE_FILE}.tmp")
    try:
        temporary.write_text(json.dumps(asdict(result)))
        os.replace(temporary, target)
    except OSError as exc:
        log.warning("cannot write %s: %s", target, exc)


def load(home: Path) -> IndexCheck | None:
    """The last check the daemon recorded in ``home``; None when none did (or the file is
    unreadable: the commands reading it run their own check or say nothing)."""
    try:
        return IndexCheck(**json.loads((home / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def found_damaged(home: Path) -> bool:
    """The daemon's last check found the index in ``home`` damaged: whoever checks it next
    (start-up, ``pas doctor``, ``pas cache rebuild-index``) runs ``integrity_check``, since
    that damage may be what ``quick_check`` does not see (an index missing a row). Else
    start-up said sound again and recorded it, doctor passed and rebuild-index refused the
    fix this module names. A file left from before a restore costs one longer check."""
    found = load(home)
    return found is not None and found.damaged


def as_status(home: Path) -> dict[str, Any] | None:
    """The last recorded check as ``pas status --json`` and the status page show it."""
    found = load(home)
    return None if found is None else asdict(found)


def forget(home: Path) -> None:
    """The index was set aside (``pas cache rebuild-index``): what was found in it no
    longer describes the index in place."""
    (home / STATE_FILE).unlink(missing_ok=True)


def is_corrupt(exc: BaseException) -> bool:
    """SQLite said the file is damaged. Python gives the extended code: an index out of
    step with its table is SQLITE_CORRUPT_INDEX (779), whose low byte is SQLITE_CORRUPT."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_CORRUPT,
                                                     sqlite3.SQLITE_NOTADB)


def suspect(exc: BaseException) -> None:
    """Called by a loop whose pass failed: a corruption error makes the checker run soon
    instead of at its next scheduled time."""
    if is_corrupt(exc):
        _suspected.set()


def report(result: IndexCheck) -> None:
    """Log the outcome: damage at ERROR (every check that finds it), the rest at INFO."""
    if result.damaged:
        log.error("%s", result.message())
    elif result.error is not None:
        log.warning("index check of %s did not run to the end: %s", result.path, result.error)
    else:
        log.info("index check of %s: sound (SQLite found nothing, %.1f s)", result.path,
                 result.duration_s)


class IndexChecker:
    """The daemon's thread: a check every ``interval_s`` after the one at start-up, and one
    at most every :data:`SUSPECT_RECHECK_S` when a loop met a corruption error (until one
    finds the damage). ``quick_check`` while the index is sound and unsuspected;
    ``integrity_check`` once a loop met corruption or a check found damage."""

    def __init__(self, path: Path, home: Path, interval_s: float):
        self.path = path
        self.home = home
        self.interval_s = interval_s

    def check_now(self, stopping: threading.Event, thorough: bool = False) -> IndexCheck:
        result = check(self.path, stopping, thorough=thorough)
        if result.error is not None:
            # Nothing was learnt (interrupted by a stop, the file locked): the last check's
            # finding and time stand, so that pas_index_check_timestamp_seconds says how old
            # the last real answer is.
            if not stopping.is_set():
                report(result)
            return result
        record(self.home, result)
        report(result)
        return result

    def run(self, stopping: threading.Event) -> None:
        due = time.monotonic() + self.interval_s
        earliest_suspect = 0.0
        while not stopping.is_set():
            # Polled every second rather than blocked on two events: a stop is seen within
            # a second, a suspicion within one.
            if stopping.wait(min(1.0, max(0.0, due - time.monotonic()))):
                return
            now = time.monotonic()
            known = latest()
            # Damage already found: the loops keep meeting it, and a check would only find
            # it again (the schedule still runs, and keeps saying it).
            suspected = (_suspected.is_set() and now >= earliest_suspect
                         and not (known is not None and known.damaged))
            if now < due and not suspected:
                continue
            _suspected.clear()
            took = 0.0
            # Suspected: SQLite already said "malformed" to a loop, which quick_check may
            # not see (an index missing a row of its table): integrity_check. Damage found:
            # integrity_check too, or the schedule's quick_check would record the index
            # sound again (and clear pas_index_damaged) over what integrity_check found.
            thorough = suspected or (known is not None and known.damaged)
            try:
                took = self.check_now(stopping, thorough=thorough).duration_s
            except Exception:  # the check must never take the daemon down
                log.exception("index check failed")
            now = time.monotonic()
            due = now + self.interval_s
            if suspected:
                # The longer check found nothing: it takes a tenth of a core at most.
                earliest_suspect = now + max(SUSPECT_RECHECK_S, 10 * took)
