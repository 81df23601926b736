"""What an IT admin met upgrading an appliance (their walkthrough, reproduced): the first
start after the upgrade wrote a ``config`` audit row saying all the configuration's sections
(17 then, 18 since [backup]) had changed, none having.

The fingerprints of the configuration are an HMAC under a key of the home since 2026-12-06
(``$PAS_HOME/config-fingerprint.key``, made when there is none); an older version's were a
plain SHA-256 of each section, so each compared different and the row named them all: an
auditor reads a change of configuration that never happened. Previous fingerprints made
another way are now not compared: the row says the fingerprints were re-based, and a real
change after that is named as before. (The restore's traps of the same walkthrough are in
``tests/test_ops_backup_restore.py``.)
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from appliance.config import Settings, load_settings
from appliance.ops.audit_trail import FINGERPRINT_KEY, record_config_change
from appliance.store.db import Database
from tests.support.peers import PasProcess

NEW_KEY = ("configuration fingerprints re-based under a new key (none was in this home: an "
           "upgrade from a version without one, a restore on a new disk, or the key file "
           "removed); no comparison with the previous run")


def _config_rows(home: Path) -> list[dict[str, Any]]:
    """The ``config`` audit rows as stored, oldest first, their detail read."""
    conn = sqlite3.connect(f"file:{home / 'pas.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [json.loads(r["detail"]) for r in conn.execute(
            "SELECT detail FROM audit WHERE event = 'config' ORDER BY id")]
    finally:
        conn.close()


def _plain_sha256(settings: Settings) -> dict[str, str]:
    """The fingerprints a version before 2026-12-06 wrote: a plain SHA-256 of each section."""
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
            for name, value in sorted(json.loads(settings.model_dump_json()).items())}


def _config_row_written_by_another_version(home: Path, detail: dict[str, Any]) -> None:
    """A ``config`` row as another version wrote it, the last (the trail is append-only)."""
    with sqlite3.connect(home / "pas.sqlite") as conn:
        conn.execute("INSERT INTO audit (at, event, actor, outcome, detail) VALUES "
                     "(?, 'config', 'system', 'success', ?)", (time.time(), json.dumps(detail)))
    conn.close()


def test_the_first_start_after_an_upgrade_says_no_section_changed(tmp_path: Path) -> None:
    """A home an older PAS ran (its last ``config`` row a plain SHA-256 of each section, no
    key file), the same configuration: the new version's first start wrote ``changed``
    naming every section (18 since [backup]). It says the fingerprints were re-based, names
    none; the same configuration again writes no row; a real change is named alone."""
    pas = PasProcess(tmp_path / "pas", {"PAS_HTTP__ENABLED": "false"})
    Database(pas.home / "pas.sqlite").close()
    settings = load_settings(environ={**{k: v for k, v in os.environ.items()
                                         if not k.startswith("PAS_")}, **pas.env})
    plain = _plain_sha256(settings)
    assert len(plain) == 18  # [backup] since 2026-12-07
    _config_row_written_by_another_version(pas.home, {"changed": sorted(plain),
                                                      "sections": plain})
    assert not (pas.home / FINGERPRINT_KEY).exists()  # the older version had none

    pas.start()
    pas.stop()
    rows = _config_rows(pas.home)
    assert len(rows) == 2 and "changed" not in rows[-1], rows[-1]
    assert rows[-1]["rebased"] == NEW_KEY
    assert (pas.home / FINGERPRINT_KEY).is_file()
    pas.start()
    pas.stop()
    assert len(_config_rows(pas.home)) == 2  # the same configuration: no row
    pas.env["PAS_STUDY__STABLE_AFTER_S"] = "2"
    pas.start()
    pas.stop()
    rows = _config_rows(pas.home)
    assert len(rows) == 3 and rows[-1]["changed"] == ["study"], rows[-1]


def test_fingerprints_made_another_way_are_not_compared(tmp_path: Path) -> None:
    """With the real functions, each way the previous fingerprints may have been made: the
    key file removed between two starts (a restore on a new disk: the key is not in a
    backup), replaced, or rows of a version before the key with the key there (a
    ``pas-upgrade rollback`` puts back the old index, the key stays): a re-base, no section
    named. Rows written under this key before rows named their key are compared, as rows
    naming it are."""
    home = tmp_path / "pas"
    same = load_settings(environ={"PAS_HOME": str(home)})
    other = load_settings(environ={"PAS_HOME": str(home), "PAS_STUDY__STABLE_AFTER_S": "7"})
    db = Database(home / "pas.sqlite")
    try:
        assert len(record_config_change(db, same)) == 18  # the first start: every section
        assert record_config_change(db, same) == []
        assert len(_config_rows(home)) == 1

        (home / FINGERPRINT_KEY).unlink()
        assert record_config_change(db, same) == []
        rows = _config_rows(home)
        assert len(rows) == 2 and rows[-1]["rebased"] == NEW_KEY and "changed" not in rows[-1]
        assert record_config_change(db, same) == []  # compared with the re-based row
        assert record_config_change(db, other) == ["study"]
        assert record_config_change(db, same) == ["study"]

        (home / FINGERPRINT_KEY).write_bytes(os.urandom(32))  # replaced
        assert record_config_change(db, same) == []
        assert _config_rows(home)[-1]["rebased"] == (
            "configuration fingerprints re-based under another key than the previous run's "
            "(the key file was replaced); no comparison with the previous run")

        _config_row_written_by_another_version(home, {"changed": [],
                                                      "sections": _plain_sha256(same)})
        assert record_config_change(db, same) == []
        assert _config_rows(home)[-1]["rebased"] == (
            "configuration fingerprints re-based under this home's key (the previous run's "
            "fingerprints were made another way: a plain SHA-256 before 2026-12-06, or another "
            "key); no comparison with the previous run")

        # Under this key, without its name (written before rows named it): compared.
        last = _config_rows(home)[-1]
        _config_row_written_by_another_version(home, {"changed": [],
                                                      "sections": last["sections"]})
        assert record_config_change(db, other) == ["study"]
        assert "rebased" not in _config_rows(home)[-1]
        assert len(_config_rows(home)) == 9
    finally:
        db.close()
