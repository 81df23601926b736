"""``pas doctor`` recomputes the audit trail's hash chain (appliance/ops/doctor_audit.py).

Before, only ``pas audit verify`` did: a trail changed behind its triggers showed nothing in
the health check an operator runs, until an auditor ran the verification. Here the rows are
written the real way (the store's ``record`` in a home), the attacker works with sqlite3 on
the file, and ``pas doctor --json`` runs as a process. A trail larger than doctor's bound is
not recomputed, and the row says what to run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from appliance.config import load_settings
from appliance.ops.doctor_audit import check_audit_chain
from appliance.store.db import Database
from tests.support.peers import run_pas
from tests.test_audit_chain import _attacker, _env, _home, _write_rows


def _doctor(home: Path) -> tuple[int, dict[str, Any]]:
    result = run_pas(["doctor", "--json"], {**_env(home), "COLUMNS": "400"}, timeout=120)
    checks = json.loads(result.stdout)
    [row] = [c for c in checks if c["name"] == "audit chain"]
    return result.returncode, row


def test_doctor_says_the_chain_holds_then_names_the_row_changed(tmp_path: Path) -> None:
    home, db = _home(tmp_path)
    _write_rows(db)
    last_at = float(db.query_one("SELECT max(at) AS at FROM audit")["at"])
    db.close()
    _, row = _doctor(home)
    assert row["verdict"] == "ok", row
    assert row["detail"].startswith("5 rows chained, the last (ID 5) at "), row
    assert time.strftime("%Y-%m-%d %H:%M", time.localtime(last_at)) in row["detail"], row

    # The refusal of EVIL's association made to look like a success.
    _attacker(home / "pas.sqlite", "UPDATE audit SET outcome = 'success' WHERE id = 4")
    code, row = _doctor(home)
    assert code == 1, row
    assert row["verdict"] == "fail", row
    assert row["detail"] == ("broken at row 4: altered, removed or inserted after it was "
                             "written: its chain does not match its fields and the row before "
                             "it"), row
    assert "compare with its copies" in row["fix"] and "pas audit verify" in row["fix"], row


def test_a_trail_past_doctors_bound_is_not_recomputed_and_says_what_to_run(
        tmp_path: Path) -> None:
    home, db = _home(tmp_path)
    _write_rows(db)
    db.close()
    _attacker(home / "pas.sqlite", "UPDATE audit SET detail = 'nothing' WHERE id = 2")
    settings = load_settings(None, environ={"PAS_HOME": str(home)})
    over = check_audit_chain(settings, max_rows=4)
    assert over is not None
    assert (over.verdict, over.detail, over.fix) == (
        "ok", "5 rows: not recomputed here (more than 4; about 1 s)",
        "pas audit verify checks the whole trail")
    within = check_audit_chain(settings, max_rows=5)  # the same trail, checked: broken
    assert within is not None and within.verdict == "fail", within
    assert within.detail.startswith("broken at row 2: "), within


def test_no_database_yet_no_chain_row(tmp_path: Path) -> None:
    settings = load_settings(None, environ={"PAS_HOME": str(tmp_path / "empty")})
    assert check_audit_chain(settings) is None
    db = Database(tmp_path / "fresh" / "pas.sqlite")  # a fresh index: no rows yet
    db.close()
    settings = load_settings(None, environ={"PAS_HOME": str(tmp_path / "fresh")})
    fresh = check_audit_chain(settings)
    assert fresh is not None and (fresh.verdict, fresh.detail) == ("ok", "no rows yet"), fresh
