"""The audit trail: an append-only record of who did what to which data, and how it ended.

Owns: writing and reading the ``audit`` table (triggers in the schema forbid UPDATE and
DELETE). Health-data hosting rules require this traceability; events are shaped after the
DICOM PS3.15 audit messages (store, query, retrieve, export, delete, configuration, enrolment).
Reading is :func:`search` (``pas audit``): the filters a privacy officer asks with (a period,
a patient, a study, an event kind, the failures), so nobody opens the database by hand.

Why each row records its patients (``patient``, migration 9) when it is written: a row names
studies (or instances, or a query's keys), and the index ties a study to its patient only
while the study is in the cache. Once evicted or purged, the store, retrieve and delete rows
of that study could no longer be found by patient, which is the question an auditor asks.

Why a state change writes its row with :func:`record_in`, in its own transaction: the row and
the change commit together or not at all, so no crash leaves a change the trail does not
show (a deletion above all) nor a row for a change that never happened. The store function
making the change writes the row (eviction, pins, integrity flags, repairs, clock re-basing,
a prior fetched); :func:`record` is for events that change nothing else.

Also owns the outbox marks (``audit_outbox``, migration 10): how far each copy of the trail
(journald, a syslog collector: ``appliance.ops.audit_trail``) has read the table. The copies
read the rows, never a queue in memory, so rows from any process and any crash reach them.

Also owns the hash chain (``chain``, migration 30): each row carries the SHA-256 of the
previous row's chain and of its own fields (:func:`chain_link`), written with the row, so
that a row altered, removed or inserted afterwards (by someone who dropped the append-only
triggers, or edited the file) breaks the chain from that row on: :func:`verify_chain`
(``pas audit verify``). The copies of the trail carry each row's chain off the machine
(``appliance.ops.audit_trail``): a whole table rewritten with a consistent chain is told by
comparing its chain with theirs. The rows written before migration 30 are not rewritten
(for 2 million rows that took 42 s and a 1.17 GB WAL, and failed on a nearly full disk):
they keep no chain, the upgrade recorded the chain they would have had
(``audit_chain_start``: :func:`chain_anchor`), the first row after follows on from it, and
:func:`verify_chain` checks them against it, as a whole.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.store.db import Database, after_commit, now
from appliance.words import counted

# Called after each committed record, once its transaction committed: the daemon's outbox
# readers (journald, syslog: appliance/ops/audit_trail.py) use it to wake up at once instead
# of at their next poll; what they send they read from the table. A sink must be quick and
# must not raise; it runs in the caller's thread, after the write lock is released.
_sinks: list[Callable[[dict[str, Any]], None]] = []


def add_sink(sink: Callable[[dict[str, Any]], None]) -> None:
    _sinks.append(sink)


def remove_sink(sink: Callable[[dict[str, Any]], None]) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


# How a target is cut into words (see _TARGET_WORDS below), which of them are UIDs, and the
# PatientID a query asked for (``LEVEL Key=value Key=value``).
_WORD_SEPARATORS = re.compile(r"[,/ =\\]")
_UID_WORD = re.compile(r"[0-9]+(\.[0-9]+)+")
_PATIENT_KEY = re.compile(r"(?:^| )PatientID=(\S+)")
PATIENT_SEPARATOR = "\\"  # DICOM's value separator: never inside a PatientID (LO)


# How long a store row's list of studies may grow (a C-STORE association's, a STOW-RS
# request's): about 60 studies. Past it the list is cut between whole UIDs (study_list).
STUDY_LIST_MAX = 4000


def study_list(studies: set[str], limit: int = STUDY_LIST_MAX) -> tuple[str | None, int]:
    """The studies comma-joined in UID order, as many whole UIDs as ``limit`` characters
    hold (a UID cut in the middle would name another study, or none: ``pas audit --study``
    and the ATNA Study objects read each word as a UID), and how many did not fit; None when
    there is no study."""
    joined = ""
    ordered = sorted(studies)
    for n, uid in enumerate(ordered):
        longer = f"{joined},{uid}" if joined else uid
        if len(longer) > limit:
            return joined or None, len(ordered) - n
        joined = longer
    return joined or None, 0


def _patients_named(conn: sqlite3.Connection, target: str | None) -> set[str]:
    """The PatientIDs a target is about: the patients of the studies or instances it names,
    as the index holds them now, and a PatientID a query or retrieve asked for exactly (a
    wildcard names nobody in particular)."""
    if not target:
        return set()
    found = {asked for asked in _PATIENT_KEY.findall(target)
             if not any(c in asked for c in "*?\\")}
    uids = sorted({w for w in _WORD_SEPARATORS.split(target) if _UID_WORD.fullmatch(w)})
    if uids:
        marks = ",".join("?" * len(uids))
        found.update(r[0] for r in conn.execute(
            "SELECT p.patient_id FROM studies s JOIN patients p ON p.id = s.patient_fk "
            f"WHERE s.study_uid IN ({marks}) UNION "
            "SELECT p.patient_id FROM instances i JOIN studies s ON s.id = i.study_fk "
            f"JOIN patients p ON p.id = s.patient_fk WHERE i.sop_instance_uid IN ({marks})",
            (*uids, *uids)))
    return found


def record(db: Database, event: str, *, actor: str | None, outcome: str = "success",
           target: str | None = None, source: str | None = None,
           detail: str | None = None, patient: str | None = None,
           sop_class: str | None = None, query: bytes | None = None,
           query_syntax: str | None = None) -> None:
    """Append one row in a transaction of its own: for an event that changes no other state
    (a query, a refusal, a report). A row about a state change goes in that change's
    transaction: :func:`record_in`. Called inside a transaction it joins it, as any nested
    :meth:`Database.transaction` does."""
    with db.transaction() as conn:
        record_in(conn, event, actor=actor, outcome=outcome, target=target, source=source,
                  detail=detail, patient=patient, sop_class=sop_class, query=query,
                  query_syntax=query_syntax)


def record_in(conn: sqlite3.Connection, event: str, *, actor: str | None,
              outcome: str = "success", target: str | None = None, source: str | None = None,
              detail: str | None = None, patient: str | None = None,
              sop_class: str | None = None, query: bytes | None = None,
              query_syntax: str | None = None) -> int:
    """Append one row as part of the transaction ``conn`` is in (opened by
    :meth:`Database.transaction`), so it commits with the state change it records or not at
    all (invariant 3). It used to be written in a transaction of its own after the change
    committed: a crash (kill -9, power loss) between the two left a change the trail never
    showed, e.g. a study evicted with no ``delete`` row.

    Its patients are looked up from ``target`` in the same transaction (before a deletion in
    it, or named with ``patient``: one the index can no longer tell, a study just evicted).
    The sinks get the row once the transaction has committed, never a row rolled back; a
    call outside such a transaction is refused (:func:`appliance.store.db.after_commit`).

    ``sop_class``: the information model a query asked under (the ATNA Query message's
    "SOP Queried" object, PS3.15 A.5.3.2); None for other events. ``query``: the query as
    the requester sent it (a C-FIND identifier's bytes, in ``query_syntax``, its transfer
    syntax; a QIDO-RS request's path and query string), the message's ParticipantObjectQuery.

    Returns the row's id: a row of another table written in the same transaction may name
    it (:func:`appliance.store.backups.record_restore`)."""
    entry: dict[str, Any] = {}
    after_commit(conn, lambda: _publish(entry))  # first: refused, it must write nothing
    patients = _patients_named(conn, target) | ({patient} if patient else set())
    # The row as SQLite will give it back (REAL, TEXT, BLOB), so that its chain is computed
    # from the values :func:`verify_chain` reads: an int time or detail would read back as
    # 1000.0 or '5' and fail the check.
    row: dict[str, Any] = {
        "at": float(now()), "event": _text(event), "actor": _text(actor),
        "source": _text(source), "target": _text(target), "outcome": _text(outcome),
        "detail": _text(detail), "patient": PATIENT_SEPARATOR.join(sorted(patients)) or None,
        "sop_class": _text(sop_class),
        "query": bytes(query) if isinstance(query, bytearray | memoryview) else query,
        "query_syntax": _text(query_syntax)}
    # The previous row's chain, and this row's id (the one SQLite would give it: the largest
    # plus one), in the write transaction Database.transaction opened with BEGIN IMMEDIATE:
    # no other writer comes in between.
    last_id, previous = chain_head(conn)
    row["id"] = last_id + 1 if last_id is not None else 1
    row["chain"] = chain_link(previous, row)
    conn.execute(
        "INSERT INTO audit (id, at, event, actor, source, target, outcome, detail, patient, "
        "sop_class, query, query_syntax, chain) VALUES (:id, :at, :event, :actor, :source, "
        ":target, :outcome, :detail, :patient, :sop_class, :query, :query_syntax, :chain)",
        row)
    entry.update(row)
    return int(row["id"])


def _text(value: Any) -> str | None:
    """A TEXT column's value as SQLite stores it (a number in a TEXT column becomes text)."""
    return value if value is None or isinstance(value, str) else str(value)


def _publish(entry: dict[str, Any]) -> None:
    if not entry:  # its INSERT failed, and the caller carried on and committed the rest
        return
    for sink in list(_sinks):
        with contextlib.suppress(Exception):  # the trail itself is committed already
            sink(entry)


# -- the outbox: the copies of the trail read the table past their mark ---------------------
#
# A copy (journald, a syslog collector: appliance/ops/audit_trail.py) reads the rows after
# its mark in id order, hands them on, then advances the mark: at least once, never a row
# skipped, whichever process wrote it (the daemon or the ``pas`` CLI) and whatever crashed in
# between. Ids grow in commit order: SQLite has one writer at a time and the table is
# append-only, so a row committed later never gets a smaller id than one already read.


def outbox_start(db: Database, sink: str) -> int:
    """The mark of ``sink``: the last row id it was handed. A sink never seen before (the
    first start after the upgrade that brought the outbox, or a new collector) starts at
    the table's last row: the history before it is not sent (it is in the table, read with
    ``pas audit``), which would flood a collector with years of rows at an upgrade."""
    with db.transaction() as conn:
        row = conn.execute("SELECT last_id FROM audit_outbox WHERE sink = ?",
                           (sink,)).fetchone()
        if row is not None:
            return int(row[0])
        last = int(conn.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0])
        conn.execute("INSERT INTO audit_outbox (sink, last_id, updated_at) VALUES (?, ?, ?)",
                     (sink, last, now()))
        return last


def outbox_advance(db: Database, sink: str, last_id: int) -> None:
    """Record that ``sink`` was handed every row up to ``last_id`` (never moves back)."""
    with db.transaction() as conn:
        conn.execute("UPDATE audit_outbox SET last_id = max(last_id, ?), updated_at = ? "
                     "WHERE sink = ?", (last_id, now(), sink))


def rows_after(db: Database, after_id: int, limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` rows after ``after_id``, oldest first: a sink reads in batches, so
    a backlog of a week without a collector is never held in memory at once."""
    return [dict(r) for r in db.query("SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                                      (after_id, limit))]


def count_after(db: Database, after_id: int) -> int:
    """How many rows a sink at ``after_id`` has not been handed yet."""
    row = db.query_one("SELECT count(*) FROM audit WHERE id > ?", (after_id,))
    return int(row[0]) if row else 0


# --- C-STORE associations: their store row, and one a stop of the daemon cut ----------------

def association_opened(db: Database, calling_ae: str, source_address: str | None) -> int:
    """A DICOM association's first C-STORE: note it open (migration 11), so that a crash
    before its end still leaves its ``store`` row, written at the next start. One small
    transaction per association, not per instance."""
    with db.transaction() as conn:
        cursor = conn.execute(
            "INSERT INTO open_associations (calling_ae, source_address, opened_at) "
            "VALUES (?, ?, ?)", (calling_ae, source_address, now()))
        return int(cursor.lastrowid or 0)


def association_closed(db: Database, opened: int | None, **row: Any) -> None:
    """The association ended: its ``store`` row (``row``: as :func:`record`; none when
    ``row`` is empty, an association that stored nothing) and the end of its open note, in
    one transaction."""
    with db.transaction() as conn:
        if row:
            record_in(conn, "store", **row)
        if opened:
            conn.execute("DELETE FROM open_associations WHERE id = ?", (opened,))


CUT_OUTCOME = "failure: cut by a stop of the daemon (a crash, a power loss)"


def close_cut_associations(db: Database) -> int:
    """At start-up, before the DICOM port opens: every association still noted open was cut
    by the daemon's end. Each gets its ``store`` row now, with what the index holds of it:
    the instances received from its calling AE and address since it opened, up to the next
    association of the same AE and address (two at once from one modality share them out by
    time, so none is counted twice). How many rows."""
    opened = db.query("SELECT * FROM open_associations ORDER BY calling_ae, source_address, "
                      "opened_at, id")
    for number, association in enumerate(opened):
        following = opened[number + 1] if number + 1 < len(opened) else None
        same_sender = following is not None and (
            following["calling_ae"], following["source_address"]) == (
            association["calling_ae"], association["source_address"])
        until = following["opened_at"] if same_sender else None
        with db.transaction() as conn:
            held = conn.execute(
                """SELECT count(*) AS instances, group_concat(DISTINCT s.study_uid) AS studies
                   FROM instances i JOIN studies s ON s.id = i.study_fk
                   WHERE i.calling_ae = ? AND i.source_address IS ? AND i.received_at >= ?
                         AND (? IS NULL OR i.received_at < ?)""",
                (association["calling_ae"], association["source_address"],
                 association["opened_at"], until, until)).fetchone()
            target, left_out = study_list(set(filter(None, (held["studies"] or "").split(","))))
            count = int(held["instances"])
            more = (f", {counted(left_out, 'more study', 'more studies')} not listed"
                    if left_out else "")
            record_in(conn, "store", actor=association["calling_ae"],
                      source=association["source_address"], outcome=CUT_OUTCOME,
                      target=target,
                      detail=f"{counted(count, 'instance')} stored before the cut (as the "
                             f"index holds them; opened "
                             f"{_clock(association['opened_at'])}){more}")
            conn.execute("DELETE FROM open_associations WHERE id = ?", (association["id"],))
    return len(opened)


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def first_row_at(db: Database) -> float | None:
    """When the trail's first row was written (None: no row yet): how long this index has
    existed, the age a backup's absence is judged by. Read through the ``audit_at`` index."""
    row = db.query_one("SELECT min(at) AS at FROM audit")
    return None if row is None or row["at"] is None else float(row["at"])


def recent(db: Database, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
    where, params = "", []
    if event:
        where, params = "WHERE event = ?", [event]
    rows = db.query(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", (*params, limit))
    return [dict(r) for r in rows]


# The events PAS writes, and what one row of each records. ``pas audit --event`` accepts
# these names only: a mistyped one listed nothing, which reads as "it never happened".
EVENTS: dict[str, str] = {
    "store": "instances received: one row per C-STORE association or STOW-RS request",
    "query": "a C-FIND or QIDO-RS search: the keys asked and the count answered",
    "retrieve": "a C-MOVE, C-GET or WADO-RS request, or a prior fetched from the region",
    "delete": "a study evicted from the cache, or purged by an operator",
    "refile": "a study moved to another patient by a newer instance naming that patient",
    "pin": "a study pinned in the cache by an operator",
    "unpin": "a study unpinned by an operator",
    "retry": ("a delivery job retried by an operator (pas queue retry, the status page's "
              "Retry button): the study, the job and its destination"),
    "hl7": ("an HL7 message acted on (an order, appointment or visit scheduled, changed or "
            "cancelled: its type, MSH-10 and sender, the patient), or refused"),
    "integrity": "a stored file found missing, damaged or orphaned",
    "repair": "an instance restored from the region",
    "verify": "a pas verify run and its findings",
    "recovery": "what start-up recovery found and fixed",
    "config": "the configuration changed since the last start",
    "start": "the daemon started (its version, AE title and port)",
    "stop": "the daemon stopped",
    "security": ("access refused (an unknown calling AE, too many associations from one "
                 "source, no valid bearer token), or file permissions tightened at start-up"),
    "clock": "the wall clock stepped, stored deadlines re-based",
    "commitment": ("a modality's Storage Commitment request (how many instances committed, "
                   "which not), or its report given up undelivered"),
    "alert": "the disk alert raised or cleared",
    "export": "a backup written by pas backup (the index holds patient names): where, how many",
    "merge": ("a patient merged into another by the RIS (HL7 ADT^A40, A34, A36, A18), or a "
              "patient identifier changed (A47): the prefetch requests not yet done that "
              "moved"),
}


@dataclass(frozen=True)
class AuditFilter:
    """What :func:`search` keeps; every field left empty keeps every row.

    ``since`` is inclusive and ``until`` exclusive (epoch seconds), so consecutive periods
    never count a row twice. ``failures``: every outcome but ``success`` (a cancelled
    retrieve is not a success either)."""

    since: float | None = None
    until: float | None = None
    events: tuple[str, ...] = ()
    patient: str | None = None
    study: str | None = None
    failures: bool = False


# The target as a list of words between commas: a store row lists its studies with commas,
# a DICOMweb row its URL path with slashes, a query or retrieve its keys as ``Key=value``
# separated by spaces (a UID list with backslashes). A study is named when one of these
# words is its UID, exactly: 1.2.3 must not find 1.2.34.
_TARGET_WORDS = ("(',' || replace(replace(replace(replace(coalesce(a.target, ''), '/', ','), "
                 "' ', ','), '=', ','), '\\', ',') || ',')")


def _where(wanted: AuditFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if wanted.since is not None:
        clauses.append("a.at >= ?")
        params.append(wanted.since)
    if wanted.until is not None:
        clauses.append("a.at < ?")
        params.append(wanted.until)
    if len(wanted.events) == 1:
        # "=", not "IN (?)": SQLite matches a partial index's WHERE only against "=" with
        # the bound value, so --event alert / export read migration 19's indexes (a few
        # rows), not the whole trail (0.34 s for 2 million rows, twice: the rows, the count).
        clauses.append("a.event = ?")
        params.append(wanted.events[0])
    elif wanted.events:
        clauses.append(f"a.event IN ({','.join('?' * len(wanted.events))})")
        params.extend(wanted.events)
    if wanted.failures:
        clauses.append("a.outcome != 'success'")
    if wanted.study is not None:
        clauses.append(f"instr({_TARGET_WORDS}, ',' || ? || ',') > 0")
        params.append(wanted.study)
    if wanted.patient is not None:
        # The patients recorded with the row; for rows written before they were (migration
        # 8), one of the patient's studies the index still holds, or a query or retrieve that
        # asked for this PatientID exactly (instr, not LIKE: IDs are case-sensitive and hold
        # '_' and '%'). "patient_id != ''" (implied by a non-empty ID) lets SQLite use
        # patients_key, which is partial (migration 17): without it the EXISTS read every
        # patient row for each audit row the first two tests did not keep.
        keyed = " AND p.patient_id != ''" if wanted.patient else ""
        clauses.append(
            "(instr('\\' || coalesce(a.patient, '') || '\\', '\\' || ? || '\\') > 0"
            " OR instr(' ' || coalesce(a.target, '') || ' ', ' PatientID=' || ? || ' ') > 0"
            " OR EXISTS (SELECT 1 FROM patients p JOIN studies s ON s.patient_fk = p.id"
            f" WHERE p.patient_id = ?{keyed}"
            f" AND instr({_TARGET_WORDS}, ',' || s.study_uid || ',') > 0))")
        params.extend([wanted.patient] * 3)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def search(db: Database, wanted: AuditFilter, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The rows ``wanted`` keeps, newest first (by id: the order they were written, whatever
    the wall clock did), at most ``limit``; and how many matched in all, so that a reader
    is told when the list was cut."""
    where, params = _where(wanted)
    rows = db.query(f"SELECT a.* FROM audit a {where} ORDER BY a.id DESC LIMIT ?",
                    (*params, limit))
    matched = db.query_one(f"SELECT count(*) FROM audit a {where}", tuple(params))
    return [dict(r) for r in rows], int(matched[0]) if matched else 0


# --- the hash chain (migration 30) -----------------------------------------------------------
#
# Each row's ``chain`` is SHA-256 (hex) of the previous row's chain (CHAIN_GENESIS before the
# first row), a line feed, and the row's fields as canonical JSON: the CHAINED columns as an
# object with sorted keys, no spaces, ASCII only, bytes as {"base64": ...}. Anyone can
# recompute it from ``pas audit --json`` or from a copy of the trail (docs/operations.md).
# The row's id is one of its fields, so a row moved to another place breaks the chain too.
# The rows written before migration 30 have none (NULL): the first row written after follows
# on from the chain they would have had, which the upgrade recorded (audit_chain_start.head).

CHAIN_GENESIS = "0" * 64
CHAINED = ("id", "at", "event", "actor", "source", "target", "outcome", "detail", "patient",
           "sop_class", "query", "query_syntax")
# Rows read at once by the migration's data step and by verify_chain (bounded memory).
CHAIN_BATCH = 2000
_CHAIN_SELECT = f"SELECT {', '.join(CHAINED)}, chain FROM audit WHERE id > ? ORDER BY id LIMIT ?"


_SORTED = tuple(sorted(CHAINED))
_PLAIN = (str, int, float, type(None))
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode


def chain_link(previous: str | None, row: Mapping[str, Any] | sqlite3.Row) -> str:
    """The chain of ``row`` (the CHAINED columns by name: a dict, an sqlite3.Row) following
    a row whose chain is ``previous`` (None: the first row). The keys are put in sorted
    order here (a dict keeps its order: what ``sort_keys`` gives, without sorting each
    time); about 5 us a row."""
    fields: dict[str, Any] = {}
    for name in _SORTED:
        value = row[name]
        if value.__class__ not in _PLAIN and isinstance(value, bytes | bytearray | memoryview):
            value = {"base64": base64.b64encode(bytes(value)).decode("ascii")}
        fields[name] = value
    return hashlib.sha256(f"{previous or CHAIN_GENESIS}\n{_encode(fields)}".encode("ascii")
                          ).hexdigest()


def _chained_rows(read: Callable[[int], Sequence[sqlite3.Row]]) -> Iterator[sqlite3.Row]:
    """Every row in id order, CHAIN_BATCH at a time (``read(after_id)``); from the lowest
    id SQLite allows: a row slipped in below 1 is read too."""
    after = -(2**63)
    while True:
        rows = read(after)
        yield from rows
        if len(rows) < CHAIN_BATCH:
            return
        after = int(rows[-1]["id"])


def chain_head(conn: sqlite3.Connection) -> tuple[int | None, str | None]:
    """The trail's last row id and the chain the next row follows on from: that row's
    chain; for a row of before migration 30 (no chain), the chain recorded for those rows
    at the upgrade (audit_chain_start); (None, None) for an empty trail (the next row is
    the first: CHAIN_GENESIS)."""
    last = conn.execute("SELECT id, chain FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    if last is None:
        return None, None
    if last[1] is not None:
        return int(last[0]), str(last[1])
    anchor = conn.execute("SELECT head FROM audit_chain_start WHERE id = 1").fetchone()
    return int(last[0]), str(anchor[0]) if anchor is not None else None


def chain_anchor(conn: sqlite3.Connection) -> int:
    """Migration 30's data step, in its transaction: the chain the rows written before
    would have (in id order, CHAIN_BATCH rows read at a time), recorded with the last of
    their ids in audit_chain_start, nothing recorded for an empty trail. The rows are only
    read, never rewritten (no UPDATE: the upgrade writes a few pages whatever the trail's
    size, where rewriting them grew the WAL by the table's size). How many rows."""
    previous: str | None = None
    count, last_id = 0, None
    for row in _chained_rows(lambda after: _as_rows(conn.execute(
            _CHAIN_SELECT, (after, CHAIN_BATCH)).fetchall())):
        previous, last_id = chain_link(previous, row), int(row["id"])
        count += 1
    if last_id is not None:
        conn.execute("INSERT INTO audit_chain_start (id, before_id, head) VALUES (1, ?, ?)",
                     (last_id, previous))
    return count


def _as_rows(rows: list[Any]) -> list[Any]:
    """Rows readable by column name whatever the connection's row factory (the migration's
    connection is a Database's, whose rows are sqlite3.Row; a plain one's are tuples)."""
    if rows and not isinstance(rows[0], sqlite3.Row):
        return [dict(zip((*CHAINED, "chain"), r, strict=True)) for r in rows]
    return rows


@dataclass(frozen=True)
class ChainCheck:
    """What :func:`verify_chain` found. ``rows``: the rows found chained, in id order, up to
    ``last_id`` (written at ``last_at``), whose chain is ``head``. ``before_upgrade``: the
    rows written before migration 30 (ids up to ``upgrade_id``), found as they were at the
    upgrade, as a whole (0 when the trail was empty then, or the check stopped in them).
    When a row breaks the chain: ``broken_id`` (its time ``broken_at``) and ``problem`` in
    words; ``missing``: the ids absent before it (first, last), when the break is a gap in
    the ids. ``old_rows_changed``: the break is in the rows of before the upgrade as a
    whole (``broken_id`` is then ``upgrade_id``): which of them changed cannot be told."""

    rows: int
    last_id: int | None
    last_at: float | None
    head: str | None
    broken_id: int | None = None
    broken_at: float | None = None
    problem: str | None = None
    missing: tuple[int, int] | None = None
    before_upgrade: int = 0
    upgrade_id: int | None = None
    old_rows_changed: bool = False

    @property
    def ok(self) -> bool:
        return self.broken_id is None


def verify_chain(db: Database) -> ChainCheck:
    """Read the whole trail in id order, CHAIN_BATCH rows at a time (bounded memory, each
    batch its own short read: a daemon writing meanwhile only adds rows after), recompute
    each row's chain, and stop at the first row that does not match: its fields or its
    chain changed, a row before it was removed (a gap in the ids) or rewritten, or it was
    inserted. The rows of before migration 30 (no chain, ids up to audit_chain_start's
    ``before_id``) are recomputed together and must give the ``head`` the upgrade recorded:
    unchanged since the upgrade (which of them changed, if one did, cannot be told); a row
    among them with a chain, or a row after them without one, is a finding. What it cannot
    see: rows removed from the end, or the whole table rewritten with a chain made anew;
    the copies of the trail (journald, syslog) carry each row's chain, and a head that
    differs from theirs tells."""
    anchor = db.query_one("SELECT before_id, head FROM audit_chain_start WHERE id = 1")
    upgrade_id = int(anchor["before_id"]) if anchor is not None else None
    previous: str | None = None
    expected, count = 1, 0
    last: sqlite3.Row | None = None
    old: str | None = None  # the chain of the rows of before the upgrade, so far
    old_count, old_last_at = 0, None
    pending = anchor is not None  # rows of before the upgrade not yet checked as a whole

    def broken(row: sqlite3.Row, problem: str,
               missing: tuple[int, int] | None = None) -> ChainCheck:
        at = row["at"]  # a time an attacker wrote may not be one
        return ChainCheck(count, last["id"] if last else None, last["at"] if last else None,
                          previous, int(row["id"]),
                          float(at) if isinstance(at, int | float) else None, problem, missing,
                          0 if pending else old_count, upgrade_id)

    def old_rows_differ() -> ChainCheck | None:
        if anchor is None or old == anchor["head"]:
            return None
        return ChainCheck(
            0, None, None, None, upgrade_id, old_last_at,
            f"the {counted(old_count, 'row')} now there with IDs up to {upgrade_id} "
            "(written before the upgrade to migration 30, which recorded their chain as a "
            "whole) are not those of the upgrade: one or more was altered, removed or "
            "inserted since, which one cannot be told", None, 0, upgrade_id, True)

    altered = "altered, removed or inserted after it was written"
    for row in _chained_rows(lambda after: db.query(_CHAIN_SELECT, (after, CHAIN_BATCH))):
        if pending and upgrade_id is not None and row["id"] <= upgrade_id:
            if row["chain"] is not None:
                return broken(row, f"{altered}: it has a chain, but its ID is among those "
                              f"of the rows written before the upgrade to migration 30 (up "
                              f"to {upgrade_id}), which have none")
            try:
                old = chain_link(old, row)
            except ValueError:  # a time of infinity: never one PAS writes
                return broken(row, f"{altered}: its fields are not as PAS writes them")
            at = row["at"]
            old_count, old_last_at = old_count + 1, (
                float(at) if isinstance(at, int | float) else None)
            continue
        if pending:
            finding = old_rows_differ()
            if finding is not None:
                return finding
            pending, previous, expected = False, old, (upgrade_id or 0) + 1
        if row["id"] < expected:  # only below 1: the ids are read in order
            return broken(row, f"{altered}: PAS numbers its rows from 1")
        if row["id"] > expected:
            missing = (expected, int(row["id"]) - 1)
            gap = (f"row {missing[0]} is missing before it: removed after it was written"
                   if missing[0] == missing[1] else f"rows {missing[0]} to {missing[1]} are "
                   "missing before it: removed after they were written")
            return broken(row, gap, missing)
        try:
            link = chain_link(previous, row)
        except ValueError:  # a time of infinity: never one PAS writes
            return broken(row, f"{altered}: its fields are not as PAS writes them")
        if row["chain"] != link:
            why = ("it has no chain (PAS writes one with every row written after the upgrade "
                   "to migration 30)" if row["chain"] is None
                   else "its chain does not match its fields and the row before it")
            return broken(row, f"{altered}: {why}")
        previous, last = link, row
        expected, count = expected + 1, count + 1
    if pending:
        finding = old_rows_differ()
        if finding is not None:
            return finding
    if last is None and old_count:  # only rows of before the upgrade, as they were
        return ChainCheck(0, upgrade_id, old_last_at, old, before_upgrade=old_count,
                          upgrade_id=upgrade_id)
    return ChainCheck(count, last["id"] if last else None, last["at"] if last else None,
                      previous, before_upgrade=old_count, upgrade_id=upgrade_id)
