"""The audit trail's hash chain (migration 30, appliance/store/audit.py) and ``pas audit
verify``.

The ``audit`` table refuses UPDATE and DELETE by trigger, but whoever can write the SQLite
file can drop the triggers and rewrite or remove rows. Each row now carries the SHA-256 of
the previous row's chain and of its own fields; ``pas audit verify`` recomputes the chain
and names the first row that breaks it. Here the rows are written the real way (the store's
``record`` and an association's row, through a Database in a home), the attacker works with
sqlite3 on the file as anyone with write access would (triggers dropped first), and the
command runs as a process. An older database (schema 29): the upgrade rewrites none of its
rows, it records the chain they would have; the rows after follow on from it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from appliance.ops.audit_trail import journal_sink, rfc5424
from appliance.store import audit, backups
from appliance.store.db import Database
from appliance.store.schema import MIGRATIONS
from appliance.store.schema_drift import find
from appliance.words import local_time
from tests.support.old_schema import user_version
from tests.support.peers import run_pas

C_FIND_IDENTIFIER = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x10\x00\x20\x00\x04\x00P\xc3\xa9\x00"


def _home(tmp_path: Path) -> tuple[Path, Database]:
    home = tmp_path / "home"
    return home, Database(home / "pas.sqlite")


def _write_rows(db: Database) -> None:
    """Rows of the kinds PAS writes: a query with its identifier's bytes, a store row of
    an association, a refusal, a configuration change with non-ASCII text."""
    audit.record(db, "start", actor="system", detail="pas 1.0, AE PAS, port 11112")
    audit.record(db, "query", actor="VIEWER", source="10.0.0.7",
                 target="STUDY PatientID=PAT\\1 StudyDate=20240101-", detail="2 matches",
                 sop_class="1.2.840.10008.5.1.4.1.2.2.1", query=C_FIND_IDENTIFIER,
                 query_syntax="1.2.840.10008.1.2.1")
    opened = audit.association_opened(db, "CT1", "10.0.0.9")
    audit.association_closed(db, opened, actor="CT1", source="10.0.0.9",
                             target="1.2.826.0.1.3680043.8.498.1,1.2.826.0.1.3680043.8.498.2",
                             detail="3 instances stored, 0 refused", patient="PAT1")
    audit.record(db, "security", actor="EVIL", source="10.6.6.6",
                 outcome="failure: unknown calling AE", detail="refused")
    audit.record(db, "config", actor="system", detail='{"changed": ["cache"], "note": "é ✓"}')


def _env(home: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PAS_")},
            "PAS_HOME": str(home)}


def _verify(home: Path, *args: str) -> tuple[int, str]:
    result = run_pas(["audit", "verify", *args], {**_env(home), "COLUMNS": "400"},
                     timeout=60)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def _stored(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY id")]
    finally:
        conn.close()


def _attacker(path: Path, *statements: str) -> None:
    """What anyone who can write the file does: drop the triggers, change the rows."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_append_only_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_append_only_delete")
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def test_rows_written_by_pas_are_chained_and_verify_says_so(tmp_path: Path) -> None:
    home, db = _home(tmp_path)
    _write_rows(db)
    db.close()
    rows = _stored(home / "pas.sqlite")
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
    # The chain as docs/operations.md defines it, recomputed here from the stored rows: an
    # auditor's own script gets the same values.
    previous = "0" * 64
    for row in rows:
        fields = {k: ({"base64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v)
                  for k, v in row.items() if k != "chain"}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        previous = hashlib.sha256(f"{previous}\n{canonical}".encode()).hexdigest()
        assert row["chain"] == previous, row["id"]

    code, said = _verify(home)
    assert code == 0, said
    assert said == (f"the audit trail's 5 rows are chained, last row ID 5 at "
                    f"{local_time(rows[-1]['at'])}, head {rows[-1]['chain'][:16]}"), said
    code, said = _verify(home, "--json")
    assert code == 0
    assert json.loads(said) == {"ok": True, "rows": 5, "last_id": 5,
                                "last_time": json.loads(said)["last_time"],
                                "head": rows[-1]["chain"], "before_upgrade": None,
                                "broken": None}
    # pas audit itself is unchanged: it lists the rows, and --json shows each row's chain.
    listed = run_pas(["audit", "--json", "--limit", "2"], _env(home), timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [(r["id"], r["chain"]) for r in json.loads(listed.stdout)] == \
        [(5, rows[4]["chain"]), (4, rows[3]["chain"])]


def test_the_triggers_still_refuse_changing_a_row_or_its_chain(tmp_path: Path) -> None:
    home, db = _home(tmp_path)
    _write_rows(db)
    db.close()
    conn = sqlite3.connect(home / "pas.sqlite")
    try:
        for statement in ("UPDATE audit SET chain = NULL WHERE id = 2",
                          "UPDATE audit SET chain = chain",
                          "UPDATE audit SET outcome = 'success' WHERE id = 4",
                          "DELETE FROM audit WHERE id = 5"):
            with pytest.raises(sqlite3.DatabaseError, match="audit is append-only"):
                conn.execute(statement)
    finally:
        conn.close()
    assert _verify(home)[0] == 0


def test_a_row_altered_behind_the_triggers_is_named(tmp_path: Path) -> None:
    home, db = _home(tmp_path)
    _write_rows(db)
    db.close()
    path = home / "pas.sqlite"
    at = _stored(path)[3]["at"]
    # The refusal of EVIL's association made to look like a success.
    _attacker(path, "UPDATE audit SET outcome = 'success' WHERE id = 4")
    code, said = _verify(home)
    assert code == 1, said
    assert (f"the audit trail is broken at row 4, written {local_time(at)}: altered, removed "
            "or inserted after it was written") in said, said
    assert "The 3 rows before it are chained" in said, said
    code, said = _verify(home, "--json")
    found = json.loads(said)
    assert code == 1 and found["ok"] is False and found["rows"] == 3, found
    assert found["broken"]["id"] == 4 and found["broken"]["missing"] is None, found

    # An attacker who also writes the altered row's chain anew (the function is public):
    # the next row, chained to the old value, is where it breaks.
    row = _stored(path)[3]
    forged = audit.chain_link(_stored(path)[2]["chain"], row)
    _attacker(path, f"UPDATE audit SET chain = '{forged}' WHERE id = 4")
    code, said = _verify(home)
    assert code == 1 and "the audit trail is broken at row 5" in said, said


def test_a_removed_row_is_named_by_the_gap_it_leaves(tmp_path: Path) -> None:
    home, db = _home(tmp_path)
    _write_rows(db)
    db.close()
    path = home / "pas.sqlite"
    at = _stored(path)[2]["at"]
    _attacker(path, "DELETE FROM audit WHERE id = 2")
    code, said = _verify(home)
    assert code == 1, said
    assert (f"the audit trail is broken at row 3, written {local_time(at)}: row 2 is missing "
            "before it: removed after it was written") in said, said
    found = json.loads(_verify(home, "--json")[1])
    assert found["broken"]["id"] == 3 and found["broken"]["missing"] == [2, 2], found

    # A row slipped in with a chain of its own making is not chained to the rest either.
    _attacker(path, "INSERT INTO audit (id, at, event, actor, outcome) "
                    "VALUES (2, 1.0, 'start', 'system', 'success')")
    code, said = _verify(home)
    assert code == 1 and "broken at row 2" in said and "it has no chain" in said, said
    # ... nor one given an id before the first (ids are read from the lowest).
    _attacker(path, "INSERT INTO audit (id, at, event, actor, outcome) "
                    "VALUES (0, 1.0, 'start', 'system', 'success')")
    code, said = _verify(home)
    assert code == 1 and "broken at row 0" in said and "numbers its rows from 1" in said, said


def _schema_29_trail(path: Path, count: int) -> None:
    """``count`` rows written before migration 30, in the table's shape of schema 29."""
    Database(path, MIGRATIONS[:29]).close()
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO audit (at, event, actor, source, target, outcome, detail, patient, "
        "sop_class, query, query_syntax) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(1.7e9 + n + 0.125, "query" if n % 3 else "store", f"AE{n % 7}", "10.0.0.1",
          f"1.2.3.{n}", "success" if n % 5 else "failure: cut", None if n % 2 else f"n={n}",
          f"P{n}" if n % 4 else None, None, C_FIND_IDENTIFIER if n % 3 == 1 else None, None)
         for n in range(count)])
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert user_version(path) == 29


def _anchor(path: Path) -> tuple[int, str] | None:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT before_id, head FROM audit_chain_start").fetchone()
        return None if row is None else (row[0], row[1])
    finally:
        conn.close()


def test_the_upgrade_records_the_old_rows_chain_and_rewrites_none(tmp_path: Path) -> None:
    """Rows written before migration 30, more than one batch of them: the upgrade rewrote
    each with its chain, in one transaction (2 million rows: 42 s, a WAL of 1.17 GB, and a
    full disk stopped the daemon's start). Now it only reads them: they keep no chain, the
    chain they would have is recorded once, the WAL does not grow with them, and the rows
    written after follow on from it."""
    path = tmp_path / "home" / "pas.sqlite"
    count = 2 * audit.CHAIN_BATCH + 7
    _schema_29_trail(path, count)
    before = _stored(path)

    db = Database(path)  # the daemon's start migrates
    wal = path.with_name("pas.sqlite-wal")
    # Rewriting the rows wrote every page of the table (about 1 MB for these 4,007 rows).
    assert wal.stat().st_size < 100_000, wal.stat().st_size
    assert db.schema_version() == len(MIGRATIONS) and db.migrated_from == 29
    assert not find(db.connection(), MIGRATIONS), "the triggers differ from migration 1's"
    rows = _stored(path)
    assert rows == [{**r, "chain": None} for r in before]
    head = None
    for row in rows:
        head = audit.chain_link(head, row)
    assert _anchor(path) == (count, head)
    check = audit.verify_chain(db)
    assert (check.ok, check.rows, check.before_upgrade, check.upgrade_id, check.last_id,
            check.head) == (True, 0, count, count, count, head)
    code, said = _verify(path.parent)
    assert code == 0 and said.startswith(
        f"the audit trail's {count} rows written before the upgrade to migration 30 (IDs up "
        f"to {count}) are as at the upgrade, last row ID {count} at "), said

    audit.record(db, "start", actor="system", detail="after the upgrade")
    audit.record(db, "stop", actor="system")
    db.close()
    after = _stored(path)[count:]
    assert after[0]["chain"] == audit.chain_link(head, after[0])
    assert after[1]["chain"] == audit.chain_link(after[0]["chain"], after[1])
    code, said = _verify(path.parent)
    assert code == 0 and said.startswith(
        f"the audit trail's 2 rows are chained, and its {count} rows written before the "
        f"upgrade to migration 30 (IDs up to {count}) are as at the upgrade, last row ID "
        f"{count + 2} at "), said
    assert said.endswith(f"head {after[1]['chain'][:16]}"), said
    found = json.loads(_verify(path.parent, "--json")[1])
    assert (found["ok"], found["rows"], found["before_upgrade"], found["head"]) == \
        (True, 2, {"last_id": count, "rows": count}, after[1]["chain"]), found
    conn = sqlite3.connect(path)
    for statement in ("UPDATE audit SET chain = 'x' WHERE id = 1",
                      f"UPDATE audit SET chain = NULL WHERE id = {count + 1}"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(statement)
    for statement in ("UPDATE audit_chain_start SET head = 'x'", "DELETE FROM audit_chain_start"):
        with pytest.raises(sqlite3.DatabaseError, match="written once"):
            conn.execute(statement)
    conn.close()


def test_an_empty_trail_at_the_upgrade_starts_at_the_genesis(tmp_path: Path) -> None:
    path = tmp_path / "home" / "pas.sqlite"
    Database(path, MIGRATIONS[:29]).close()
    db = Database(path)
    assert _anchor(path) is None
    audit.record(db, "start", actor="system")
    check = audit.verify_chain(db)
    db.close()
    [row] = _stored(path)
    assert row["chain"] == audit.chain_link(None, row)
    assert (check.ok, check.rows, check.before_upgrade, check.upgrade_id) == (True, 1, 0, None)


@pytest.mark.parametrize(("change", "count"), [
    ("UPDATE audit SET outcome = 'success' WHERE id = 6", 10),   # altered
    ("DELETE FROM audit WHERE id = 3", 9),                       # removed in the middle
    ("DELETE FROM audit WHERE id = 10", 9),                      # removed at their end
    ("INSERT INTO audit (id, at, event, actor, outcome) "
     "VALUES (0, 1.0, 'start', 'system', 'success')", 11),       # inserted before the first
])
def test_an_old_row_changed_since_the_upgrade_is_found(tmp_path: Path, change: str,
                                                       count: int) -> None:
    """The rows of before the upgrade have no chain of their own: verify recomputes theirs
    and compares it with the one the upgrade recorded. Which row changed cannot be told."""
    path = tmp_path / "home" / "pas.sqlite"
    _schema_29_trail(path, 10)
    db = Database(path)
    audit.record(db, "start", actor="system")
    db.close()
    _attacker(path, change)
    code, said = _verify(path.parent)
    assert code == 1, said
    assert (f"the audit trail is broken before row 11: the {count} rows now there with IDs up "
            "to 10 (written before the upgrade to migration 30, which recorded their chain as "
            "a whole) are not those of the upgrade: one or more was altered, removed or "
            "inserted since, which one cannot be told.") in said, said
    found = json.loads(_verify(path.parent, "--json")[1])
    assert found["ok"] is False and found["broken"]["id"] == 10, found
    assert found["broken"]["before_upgrade"] is True, found


def test_a_chain_on_an_old_row_or_none_on_a_new_one_is_found(tmp_path: Path) -> None:
    path = tmp_path / "home" / "pas.sqlite"
    _schema_29_trail(path, 10)
    db = Database(path)
    audit.record(db, "start", actor="system")
    audit.record(db, "stop", actor="system")
    db.close()
    stored = _stored(path)
    # A row of after the upgrade without its chain (its value put back as an old row's).
    _attacker(path, "UPDATE audit SET chain = NULL WHERE id = 12")
    code, said = _verify(path.parent)
    assert code == 1 and "broken at row 12" in said and "it has no chain" in said, said
    assert "The 1 row before it is chained (head " in said, said
    assert ("at row 11). The 10 rows written before the upgrade to migration 30 (IDs up to "
            "10) are as at the upgrade.") in said, said
    # An old row given a chain (made as PAS would): not a row of before the upgrade.
    _attacker(path, f"UPDATE audit SET chain = '{stored[11]['chain']}' WHERE id = 12",
              f"UPDATE audit SET chain = '{audit.chain_link(None, stored[0])}' WHERE id = 1")
    code, said = _verify(path.parent)
    assert code == 1 and "broken at row 1," in said, said
    assert ("it has a chain, but its ID is among those of the rows written before the "
            "upgrade to migration 30 (up to 10), which have none") in said, said


def test_listing_options_before_verify_are_refused_json_and_config_passed_on(
        tmp_path: Path) -> None:
    """pas audit is a group: its listing options given before verify were silently ignored
    (--since 24h verify verified everything), and --json printed text."""
    home, db = _home(tmp_path)
    _write_rows(db)
    db.close()
    env = {**_env(home), "COLUMNS": "400"}
    for given, named in ((["--since", "24h", "--event", "export"], "--since"),
                         (["--event", "export"], "--event"), (["--limit", "5"], "--limit"),
                         (["--failures"], "--failures"), (["--patient", "P"], "--patient"),
                         (["--until", "2024-01-01", "--json"], "--until"),
                         (["--study", "1.2.3"], "--study")):
        result = run_pas(["audit", *given, "verify"], env, timeout=60)
        assert result.returncode == 2, (given, result.stdout, result.stderr)
        assert result.stderr == (f"{named} is an option of `pas audit`'s listing, not of "
                                 "`pas audit verify`\n"), result.stderr
        assert result.stdout == ""
    result = run_pas(["audit", "--json", "verify"], env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 5
    config = tmp_path / "elsewhere.toml"
    config.write_text(f'home = "{home}"\n')
    unset = {k: v for k, v in env.items() if k != "PAS_HOME"}
    result = run_pas(["audit", "--config", str(config), "--json", "verify"], unset,
                     timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 5


def test_the_recovery_row_of_a_restore_names_the_restored_trails_head(tmp_path: Path) -> None:
    """After a restore the rows written reuse ids a collector already received, with other
    chains: the recovery row says where the new branch leaves the backup's trail."""
    home, db = _home(tmp_path)
    _write_rows(db)
    backups.record_restore(db, made_at=1.7e9, folder=tmp_path / "backup", actor="root",
                           detail="pas restore: the index of /backups/x")
    db.close()
    rows = _stored(home / "pas.sqlite")
    assert rows[5]["event"] == "recovery"
    assert rows[5]["detail"] == ("pas restore: the index of /backups/x; the restored audit "
                                 f"trail's head: row 5, chain {rows[4]['chain']}")
    assert rows[5]["chain"] == audit.chain_link(rows[4]["chain"], rows[5])


def test_the_copies_of_the_trail_carry_each_rows_chain(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The chain leaves the machine with every row: a table rewritten whole, its chain made
    anew, no longer has the head the journal and the collector received."""
    home, db = _home(tmp_path)
    _write_rows(db)
    entries = audit.rows_after(db, 0, 10)
    db.close()
    message = rfc5424(entries[1], "SITE", "pas-host").decode()
    header = re.match(r"<\d+>1 \S+ pas-host pas \d+ query (\[[^]]*\]) \ufeff<AuditMessage",
                      message)
    assert header, message[:300]
    assert header[1] == f'[pasAuditChain@32473 id="2" chain="{entries[1]["chain"]}"]'
    with caplog.at_level(logging.INFO, logger="pas.audit"):
        journal_sink(entries[4])
    [record] = [r for r in caplog.records if getattr(r, "AUDIT_ID", None) == "5"]
    sent = record.__dict__["AUDIT_CHAIN"]  # the journald field, as JournalHandler reads it
    assert sent == entries[4]["chain"]
