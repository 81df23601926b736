"""The prefetch's old rows go after ``prefetch.keep_days`` (appliance/store/prefetch_retention.py).

Nothing deleted ``prefetch_requests``, ``prefetch_studies`` or ``prefetch_messages``: a hospital
sending ~1,000 orders a day grew them for as long as the appliance ran. Now a finished
request (fetched, failed, cancelled) untouched for ``keep_days`` goes with its priors' rows,
and so do the messages received before then that name no request still kept. A request
pending or running stays whatever its age, and so do the messages of a request kept; within
the window a resent message is still a duplicate. Real SQLite, real store functions, and the
HL7 path itself (``orders.handle``); only the ages are written back in SQL, as the rows
would read after that many days.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_settings
from appliance.prefetch import orders
from appliance.store import prefetch as store
from appliance.store.db import Database, now
from appliance.store.prefetch_messages import messages_of
from appliance.store.prefetch_retention import (
    REQUESTS_PER_TRANSACTION,
    Pruned,
    newest_row_at,
    prune_prefetch,
)
from tests.support.peers import PasProcess, wait_for

DAY = 86400.0
KEEP_DAYS = 90.0
LATER = 1e9  # seconds ahead: an order due then stays pending through the test


def orm(control: str, order: str, code: str = "NW", patient: str = "P1") -> str:
    return ("MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261206||ORM^O01|" + control + "|P|2.5\r"
            f"PID|1||{patient}^^^HOSP\rORC|{code}|{order}\r"
            f"OBR|1|{order}||CT^CT||||||||||||||A{order}||||||CT")


def send(db: Database, message: str, due_in: float = 0.0) -> str:
    """The message through the HL7 path: its ACK (due now, or ``due_in`` seconds ahead)."""
    ack, _ = orders.handle(db, message, "test", lambda _: now() + due_in)
    return ack


def duplicate(db: Database, message: str) -> bool:
    return "duplicate message: already processed" in send(db, message)


def request_of(db: Database, order: str) -> dict:
    (row,) = [r for r in store.list_requests(db) if r["dedup_key"].endswith(f"|{order}")]
    return row


def fetched(db: Database, control: str, order: str, priors: int) -> int:
    """An order whose priors were fetched: its request's id."""
    send(db, orm(control, order))
    (claimed,) = store.claim_due(db)
    store.record_found(db, claimed["id"], "default", [
        {"study_uid": f"2.25.{claimed['id']}.{n}"} for n in range(priors)])
    store.finish(db, claimed["id"], claimed)
    return int(claimed["id"])


def failed(db: Database, control: str, order: str, priors: int) -> int:
    send(db, orm(control, order))
    (claimed,) = store.claim_due(db)
    store.record_found(db, claimed["id"], "default", [
        {"study_uid": f"2.25.{claimed['id']}.{n}"} for n in range(priors)])
    assert store.fail_attempt(db, claimed["id"], "region said no", 1, 0.0, claimed) == "failed"
    return int(claimed["id"])


def age(db: Database, days: float, request_id: int | None = None,
        controls: tuple[str, ...] = ()) -> None:
    """Make a request (its times) and messages (by control id) read ``days`` old."""
    at = now() - days * DAY
    with db.transaction() as conn:
        if request_id is not None:
            conn.execute(
                "UPDATE prefetch_requests SET created_at = ?, updated_at = ?, "
                "started_at = CASE WHEN started_at IS NULL THEN NULL ELSE ? END, "
                "finished_at = CASE WHEN finished_at IS NULL THEN NULL ELSE ? END "
                "WHERE id = ?", (at, at, at, at, request_id))
        for control in controls:
            assert conn.execute("UPDATE prefetch_messages SET received_at = ? WHERE "
                                "message_key LIKE ?", (at, f"%|{control}")).rowcount == 1
    assert request_id is None or store.get_request(db, request_id) is not None


def counts(db: Database) -> tuple[int, int, int]:
    return tuple(int(db.query_one(f"SELECT count(*) FROM {table}")[0])  # type: ignore[return-value, index]
                 for table in ("prefetch_requests", "prefetch_studies", "prefetch_messages"))


def prune(db: Database, before: float | None = None) -> Pruned:
    return prune_prefetch(db, now() - KEEP_DAYS * DAY if before is None else before)


def test_old_finished_requests_go_with_their_priors_and_messages_and_nothing_else(
        tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    # Gone: finished and untouched for 200 days, and a message that named no request.
    old_fetched = fetched(db, "F1", "O1", priors=3)
    send(db, orm("F2", "O1"))  # the same order again (a second message of it)
    age(db, 200, old_fetched, ("F1", "F2"))
    old_failed = failed(db, "X1", "O2", priors=1)
    age(db, 200, old_failed, ("X1",))
    send(db, orm("C1", "O3"), due_in=LATER)
    send(db, orm("C2", "O3", code="CA"))
    old_cancelled = request_of(db, "O3")["id"]
    age(db, 200, old_cancelled, ("C1", "C2"))
    send(db, orm("U1", "O99", code="CA"))  # a cancel of an order never received
    age(db, 200, controls=("U1",))
    # Kept: pending and running however old, with their messages; finished lately.
    send(db, orm("P1", "O4"), due_in=LATER)
    old_pending = request_of(db, "O4")["id"]
    age(db, 400, old_pending, ("P1",))
    send(db, orm("R1", "O5"))
    (running,) = store.claim_due(db)
    age(db, 400, running["id"], ("R1",))
    recent = fetched(db, "N1", "O6", priors=2)
    age(db, KEEP_DAYS - 1, recent, ("N1",))
    send(db, orm("U2", "O98", code="CA"))
    age(db, KEEP_DAYS - 1, controls=("U2",))
    assert counts(db) == (6, 6, 10)

    pruned = prune(db)

    assert pruned == Pruned(requests=3, studies=4, messages=6), pruned
    assert sorted(r["id"] for r in store.list_requests(db)) == sorted(
        [old_pending, running["id"], recent])
    assert [r["state"] for r in store.list_requests(db)] == ["fetched", "running", "pending"]
    assert len(store.studies_of_request(db, recent)) == 2
    assert counts(db) == (3, 2, 4)
    assert prune(db) == Pruned() and not prune(db)  # again: nothing more to go
    # Within the window the HL7 path still knows each message kept: a resend is a duplicate
    # and changes nothing (the old pending order's too, its request being kept).
    for message in (orm("N1", "O6"), orm("U2", "O98", code="CA"), orm("P1", "O4"),
                    orm("R1", "O5")):
        assert duplicate(db, message), message
    assert request_of(db, "O4")["times_requested"] == 1
    # An order resent after its rows went is a new request (prefetched again).
    send(db, orm("F1", "O1"))
    assert request_of(db, "O1")["state"] == "pending"
    assert request_of(db, "O1")["id"] != old_fetched


def test_a_cancel_of_an_order_revived_since_stays_and_its_resend_cancels_nothing(
        tmp_path: Path) -> None:
    """NW, CA 200 days ago, NW again lately (the request pending again): the old CA names
    no request by ``request_fk`` (a cancel has none) but the order its detail names is kept.
    Forgotten, the RIS resending that CA would cancel the live order."""
    db = Database(tmp_path / "pas.sqlite")
    send(db, orm("A1", "O7"), due_in=LATER)
    send(db, orm("A2", "O7", code="CA"))
    request_id = request_of(db, "O7")["id"]
    age(db, 200, request_id, ("A1", "A2"))
    send(db, orm("A3", "O7"), due_in=LATER)  # ordered again: revived
    assert request_of(db, "O7")["state"] == "pending"

    assert prune(db) == Pruned()

    assert duplicate(db, orm("A2", "O7", code="CA"))
    assert request_of(db, "O7")["state"] == "pending"
    assert [m["message_key"].rsplit("|", 1)[1]
            for m in messages_of(db, request_id, request_of(db, "O7")["dedup_key"])] == \
        ["A1", "A2", "A3"]


def test_a_request_changed_lately_or_cancelled_while_its_attempt_runs_stays(
        tmp_path: Path) -> None:
    """Fetched 200 days ago but sent again last week (``updated_at``): kept, with its old
    messages. Cancelled while its attempt ran (``finished_at`` NULL until that attempt
    ends): kept however old, until the next start ends that attempt."""
    db = Database(tmp_path / "pas.sqlite")
    resent = fetched(db, "S1", "O8", priors=1)
    age(db, 200, resent, ("S1",))
    send(db, orm("S2", "O8"))  # the same order again, now
    send(db, orm("W1", "O9"))
    (claimed,) = store.claim_due(db)
    send(db, orm("W2", "O9", code="CA"))
    assert store.get_request(db, claimed["id"])["finished_at"] is None  # type: ignore[index]
    age(db, 200, claimed["id"], ("W1", "W2"))

    assert prune(db) == Pruned()
    assert counts(db) == (2, 1, 4)
    assert duplicate(db, orm("S1", "O8"))

    store.recover(db)  # the restart: the cancelled attempt is over, finished when cancelled
    assert prune(db) == Pruned(requests=1, studies=0, messages=2)
    assert [r["id"] for r in store.list_requests(db)] == [resent]


def test_a_message_kept_after_its_request_went_names_no_request_and_stays_a_duplicate(
        tmp_path: Path) -> None:
    """A message received after its request's last change (only a wall clock stepped back
    does that) outlives the request. The request's id is reused by the next request (the
    highest id went): the message must not name that one, in ``pas prefetch show`` or as
    the order a reused control id is compared with."""
    db = Database(tmp_path / "pas.sqlite")
    gone = fetched(db, "K1", "O10", priors=2)
    age(db, 200, gone)  # the request 200 days old, its message received now

    assert prune(db) == Pruned(requests=1, studies=2, messages=0)
    assert [tuple(r) for r in db.query("SELECT request_fk FROM prefetch_messages")] == [(None,)]
    send(db, orm("K2", "O11"), due_in=LATER)
    reused = request_of(db, "O11")
    assert reused["id"] == gone  # SQLite gave the deleted id again
    assert [m["message_key"].rsplit("|", 1)[1]
            for m in messages_of(db, reused["id"], reused["dedup_key"])] == ["K2"]
    assert duplicate(db, orm("K1", "O10"))
    assert request_of(db, "O11")["times_requested"] == 1
    assert [r["id"] for r in store.list_requests(db)] == [gone]


def many_old_finished(db: Database, total: int, priors: bool) -> None:
    """``total`` orders received, fetched (one prior each, or none), all 200 days old."""
    for n in range(total):
        send(db, orm(f"M{n}", f"OM{n}"))
    for n, claimed in enumerate(store.claim_due(db, limit=total)):
        if priors:
            store.record_found(db, claimed["id"], "default", [{"study_uid": f"2.25.{n}"}])
        store.finish(db, claimed["id"], claimed)
    with db.transaction() as conn:  # one statement: quicker
        at = now() - 200 * DAY
        conn.execute("UPDATE prefetch_requests SET created_at = ?, updated_at = ?, "
                     "finished_at = ?", (at, at, at))
        conn.execute("UPDATE prefetch_messages SET received_at = ?", (at,))


def test_many_old_requests_go_in_several_transactions(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    total = REQUESTS_PER_TRANSACTION + 20
    many_old_finished(db, total, priors=True)
    assert prune(db) == Pruned(requests=total, studies=total, messages=total)
    assert counts(db) == (0, 0, 0)


def test_keep_days_under_a_week_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"PAS_HOME": str(tmp_path), "PAS_PREFETCH__KEEP_DAYS": "0"})
    assert "prefetch.keep_days: must be at least 7, got 0" in str(refused.value)
    path = tmp_path / "pas.toml"
    path.write_text("[prefetch]\nkeep_days = 3.5\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={"PAS_HOME": str(tmp_path)})
    assert "prefetch.keep_days: must be at least 7, got 3.5" in str(refused.value)
    assert load_settings(environ={"PAS_HOME": str(tmp_path)}).prefetch.keep_days == 90.0


def test_pas_run_forgets_old_finished_requests_at_its_first_pass(
        pas_factory: Callable[..., PasProcess], tmp_path: Path) -> None:
    """The daemon's prefetch loop prunes at its first pass (then hourly), logs how many rows
    went, and serves on. ``keep_days = 30`` from the environment: the setting is read."""
    home = tmp_path / "home"
    home.mkdir()
    db = Database(home / "pas.sqlite")
    old = fetched(db, "D1", "O20", priors=3)
    age(db, 45, old, ("D1",))
    kept = fetched(db, "D2", "O21", priors=1)
    age(db, 20, kept, ("D2",))
    send(db, orm("D3", "O22"), due_in=LATER)
    age(db, 400, request_of(db, "O22")["id"], ("D3",))
    # An order of today: the retention's "now" is the newest row's time at most (a clock
    # far ahead deletes nothing more), so the site must have one for the 45 days to count.
    send(db, orm("D4", "O23"), due_in=LATER)
    db.close()

    pas = pas_factory({"PAS_PREFETCH__KEEP_DAYS": "30"}, home=home)
    said = wait_for(lambda: re.search(
        r"forgot (\d+) finished prefetch requests? \((\d+) priors?\) and (\d+) HL7 "
        r"messages? over 30 days old \(prefetch.keep_days\)", pas.log()),
        30, what="the old prefetch rows forgotten")
    assert said.groups() == ("1", "3", "1")
    conn = sqlite3.connect(home / "pas.sqlite")
    try:
        left = conn.execute("SELECT id, state FROM prefetch_requests ORDER BY id").fetchall()
        keys = conn.execute("SELECT message_key FROM prefetch_messages").fetchall()
    finally:
        conn.close()
    assert [state for _, state in left] == ["fetched", "pending", "pending"]
    assert left[0][0] == kept
    assert sorted(key.rsplit("|", 1)[1] for (key,) in keys) == ["D2", "D3", "D4"]
    assert pas.proc.poll() is None  # and the daemon serves on


def test_the_retentions_now_is_never_later_than_the_newest_row(tmp_path: Path) -> None:
    """A wall clock far ahead (a dead RTC at boot, a mistyped date) made every finished
    request and message look old, and the prune deleted the idempotence history at once
    (review, 2026-12-06): its "now" is the newest message's or request's time at most."""
    db = Database(tmp_path / "pas.sqlite")
    assert newest_row_at(db) is None
    old = fetched(db, "N1", "ON1", priors=1)
    age(db, 45, old, ("N1",))
    newest = newest_row_at(db)
    assert newest is not None and abs(newest - (now() - 45 * DAY)) < 5
    # The clock says a year later, nothing newer came: nothing is 30 days older than the
    # newest row, so nothing goes.
    clock_ahead = now() + 365 * DAY
    assert prune(db, before=min(clock_ahead, newest) - 30 * DAY) == Pruned()
    assert counts(db) == (1, 1, 1)
    send(db, orm("N2", "ON2"), due_in=LATER)  # an order of today: 45 days now count
    assert abs(newest_row_at(db) - now()) < 5
    assert prune(db, before=min(clock_ahead, newest_row_at(db)) - 30 * DAY) == Pruned(
        requests=1, studies=1, messages=1)


def test_a_capped_prune_says_rows_are_left(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    many_old_finished(db, REQUESTS_PER_TRANSACTION + 5, priors=False)
    first = prune_prefetch(db, now() - 90 * DAY, max_batches=1)
    assert first == Pruned(requests=REQUESTS_PER_TRANSACTION, messages=REQUESTS_PER_TRANSACTION,
                           more=True)
    rest = prune_prefetch(db, now() - 90 * DAY, max_batches=20)
    assert rest == Pruned(requests=5, messages=5)
    assert counts(db) == (0, 0, 0)
