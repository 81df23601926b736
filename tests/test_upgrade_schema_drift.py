"""An index another build wrote: migrated, its derived objects brought to this version's
definitions, or refused with the difference named (appliance/store/schema_drift.py).

The case met: an index made at schema 17 by a build whose migration 17 still defined
``patients_key`` as ``... WHERE patient_id != '' OR issuer != ''``. Upgraded, ``user_version``
said 24 and every C-STORE failed 0xC000 ("ON CONFLICT clause does not match any PRIMARY KEY or
UNIQUE constraint"), while ``pas doctor`` said "database ok". The migration runner trusted
``user_version`` alone.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from appliance.store.db import Database
from appliance.store.schema import MIGRATIONS
from tests.support.peers import CT_DIR, DCMTK_ENV, PasProcess, read_rows, run_pas

OLD_PATIENTS_KEY = ("CREATE UNIQUE INDEX patients_key ON patients (patient_id, issuer) "
                    "WHERE patient_id != '' OR issuer != ''")


def _index_of_another_build(path: Path, schema: int) -> None:
    Database(path, migrations=MIGRATIONS[:schema]).close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP INDEX patients_key;\n" + OLD_PATIENTS_KEY + ";\n"
                       "CREATE INDEX studies_left_by_a_dev_build ON studies (origin);")
    conn.close()


@pytest.mark.parametrize("schema", [17, len(MIGRATIONS)], ids=["migrated", "migrated-before"])
def test_an_index_whose_patients_key_another_build_defined_receives_after_the_upgrade(
        tmp_path: Path, schema: int) -> None:
    """At schema 17, the start migrates it and puts the index right in the migration's
    transaction; at today's schema (migrated by a build that did not check), the start
    finds the difference and puts it right all the same."""
    home = tmp_path / "pas"
    home.mkdir()
    _index_of_another_build(home / "pas.sqlite", schema)
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_HTTP__ENABLED": "false"})
    # pas doctor said "database ok, schema 17" and "ok" for the bad index.
    database = _doctor_database(pas)
    if schema == 17:
        assert database["verdict"] == "warn", database
        assert f"schema 17 is older than this software's ({len(MIGRATIONS)})" in \
            database["detail"], database
    else:
        assert database["verdict"] == "fail", database
        assert database["detail"].endswith(
            "its schema differs from this version's (another build of PAS wrote it): index "
            "patients_key redefined; index studies_left_by_a_dev_build not this version's"), \
            database
        assert database["fix"].startswith("systemctl restart pas"), database
    pas.start()
    try:
        files = sorted(CT_DIR.glob("*.dcm"))[:2]
        sent = subprocess.run(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1",
                               str(pas.port), *map(str, files)], env=DCMTK_ENV,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr[-2000:]
        rows = read_rows(home / "pas.sqlite", "SELECT sop_instance_uid, path, sha256 "
                         "FROM instances")
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(
            str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
        for row in rows:  # what was filed is what the index says
            kept = (home / "spool" / row["path"]).read_bytes()
            assert hashlib.sha256(kept).hexdigest() == row["sha256"]
        log = pas.log()
        migrated = f"index database migrated from schema 17 to {len(MIGRATIONS)}"
        assert (migrated in log) == (schema == 17), log
        assert ("index database: brought to this version's definitions (another build wrote "
                "them): index patients_key redefined; index studies_left_by_a_dev_build not "
                "this version's") in log, log
        started = read_rows(home / "pas.sqlite",
                            "SELECT detail FROM audit WHERE event = 'start'")
        assert len(started) == 1, started
        assert f"(index schema {len(MIGRATIONS)})" in started[0]["detail"], started
        assert "index patients_key redefined" in started[0]["detail"], started
        index_sql = read_rows(home / "pas.sqlite", "SELECT name, sql FROM sqlite_master "
                              "WHERE name IN ('patients_key', 'studies_left_by_a_dev_build')")
        assert [r["name"] for r in index_sql] == ["patients_key"]
        assert index_sql[0]["sql"].endswith("WHERE patient_id != ''"), index_sql
    finally:
        pas.stop()
    assert _doctor_database(pas)["verdict"] == "ok"
    # The next start finds nothing to migrate and says nothing of it.
    pas.start()
    try:
        assert pas.log().count("pas.daemon: index database") == 1 + (schema == 17)
    finally:
        pas.stop()


def _doctor_database(pas: PasProcess) -> dict[str, str]:
    said = run_pas(["doctor", "--json"], pas.env, cwd=pas.home, timeout=120)
    return next(c for c in json.loads(said.stdout) if c["name"] == "database")


def test_a_table_another_build_shaped_stops_the_start_and_changes_nothing(
        tmp_path: Path) -> None:
    home = tmp_path / "pas"
    home.mkdir()
    schema = len(MIGRATIONS) - 1
    Database(home / "pas.sqlite", migrations=MIGRATIONS[:schema]).close()
    conn = sqlite3.connect(home / "pas.sqlite")
    conn.execute("ALTER TABLE studies ADD COLUMN colour TEXT")
    conn.close()
    before = (home / "pas.sqlite").read_bytes()
    env = {**PasProcess(home).env, "PAS_HTTP__ENABLED": "false"}
    ran = run_pas(["run"], env, cwd=home, timeout=60)
    assert ran.returncode == 1, (ran.stdout, ran.stderr)
    said = " ".join(ran.stderr.split())
    assert "cannot start:" in said and "its schema differs from this version's (table " \
        "studies has columns (" in said and ",colour" in said.split("this version's (")[1], said
    assert "nothing was changed" in said and "pas cache rebuild-index" in said, said
    conn = sqlite3.connect(home / "pas.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema
    conn.close()
    assert (home / "pas.sqlite").read_bytes() == before
