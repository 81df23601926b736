"""What hospital IT must not miss on the appliance's status page (appliance/ops/web.py), seen
in headless Chromium against a real daemon: a damaged index (a red banner with the fix, in
``pas status``'s words) and the last backup's age (warning style past two days, or none
ever on an index older than that), both also in ``/api/status``.

Before: the page showed neither. The daemon's integrity check could find the index damaged
(``pas_index_damaged 1``, ``pas status``, ``pas doctor``) while the page hospital IT opens
first looked normal; a backup timer failing for days showed only in ``pas doctor``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.test_damaged_index import _tear_the_root_page_of
from tests.support.peers import CT_DIR, PasProcess, storescu, wait_for

FIX = "systemctl stop pas; sudo -u pas pas cache rebuild-index; systemctl start pas"
BACKUP_DETAIL = ("pas backup: the index (0 instances, 0 studies), the enrolment and the "
                 "configuration")


@pytest.fixture
def pas(tmp_path: Path) -> Iterator[PasProcess]:
    """A daemon, not enrolled, checking its index every second."""
    daemon = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                           "PAS_PREFETCH__ENABLED": "false",
                                           "PAS_CACHE__INDEX_CHECK_INTERVAL_S": "1"})
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def _audit_row_at(db_path: Path, at: float, event: str, target: str, detail: str) -> None:
    """A row as PAS writes it, dated ``at`` (the trail refuses only UPDATE and DELETE)."""
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO audit (at, event, actor, target, outcome, detail) "
                     "VALUES (?, ?, 'operator:test', ?, 'success', ?)",
                     (at, event, target, detail))
    conn.close()


def _backup_card(browser: Any, base: str) -> tuple[str, str]:
    """(the state's text and class, the card's whole text) as the browser shows them."""
    from selenium.webdriver.common.by import By

    browser.get(f"{base}/")
    state = browser.find_element(By.CSS_SELECTOR, "#backup .state")
    return f"{state.text} {state.get_attribute('class')}", browser.find_element(
        By.ID, "backup").text


def test_the_page_shows_the_last_backups_age_and_warns_past_two_days(
        pas: PasProcess, browser: Any, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{pas.http_port}"
    db_path = pas.home / "pas.sqlite"
    # A new appliance: no backup yet, not a warning.
    state, card = _backup_card(browser, base)
    assert state == "none yet state unknown", card
    # An index in use for three days, never backed up.
    _audit_row_at(db_path, time.time() - 3 * 86400, "config", "appliance.toml", "first start")
    state, card = _backup_card(browser, base)
    assert state == "never state warn", card
    assert "systemctl status pas-backup.timer" in card
    backup = httpx.get(f"{base}/api/status", timeout=10).json()["backup"]
    assert backup["last_at"] is None and backup["stale"] is True
    assert "│ last backup         │ NEVER" in pas.cli("status").stdout
    # A backup now: its age and folder, not a warning.
    destination = tmp_path / "backups"
    destination.mkdir()
    folder = json.loads(pas.cli("backup", str(destination), "--json").stdout)["folder"]
    state, card = _backup_card(browser, base)
    assert state == "0 min ago state fresh", card
    assert folder in card
    # The timer failing since: the newest backup three days old (its row the newest).
    _audit_row_at(db_path, time.time() - 3 * 86400, "export", folder, BACKUP_DETAIL)
    state, card = _backup_card(browser, base)
    assert state == "3 days ago state warn", card
    backup = httpx.get(f"{base}/api/status", timeout=10).json()["backup"]
    assert backup["folder"] == folder and backup["stale"] is True
    assert "│ last backup         │ STALE, " in pas.cli("status").stdout
    assert 3 * 86400 <= backup["age_s"] < 3 * 86400 + 60


def test_the_page_shows_a_damaged_index_first_with_its_fix(pas: PasProcess,
                                                          browser: Any) -> None:
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{pas.http_port}"
    files = sorted(CT_DIR.glob("*.dcm"))[:3]
    storescu(files, pas.port)
    wait_for(lambda: pas.status()["instances"] == len(files), 20, what="the instances stored")
    browser.get(f"{base}/")
    assert not browser.find_elements(By.ID, "index-damaged")
    db = pas.home / "pas.sqlite"

    _tear_the_root_page_of(db, "instances")

    wait_for(lambda: (pas.home / "index-check.json").exists()
             and json.loads((pas.home / "index-check.json").read_text())["finding"], 10,
             what="the daemon's check to find the damage")
    browser.get(f"{base}/")
    banner = browser.find_element(By.ID, "index-damaged")
    words = " ".join(banner.text.split())
    assert words.startswith(f"Index database damaged\nthe index database {db} is damaged ("
                            .replace("\n", " ")), words
    assert FIX in words and "docs/operations.md, A damaged index database" in words
    # First on the page, above the cards, and in the alarm's style.
    first = browser.execute_script(
        "return document.querySelector('h1').nextElementSibling.id")
    assert first == "index-damaged"
    assert "alarm" in banner.get_attribute("class")
    # The JSON the page links to carries it too.
    answer = httpx.get(f"{base}/api/status", timeout=10)
    assert answer.status_code == 200 and answer.json()["index_check"]["finding"], answer.text
    # The recent studies (the torn instances) cannot be read: said in their table, the
    # cards still there (this was a 500: the page hospital IT opens first, gone).
    rows = browser.find_element(By.ID, "studies").text
    assert "cannot be read from the index: database disk image is malformed" in rows
    assert browser.find_element(By.ID, "cache").text.startswith("Cache\n")

    # The page of figures every status reads torn too: what can still be said.
    _tear_the_root_page_of(db, "instance_totals")
    browser.get(f"{base}/")
    again = " ".join(browser.find_element(By.ID, "index-damaged").text.split())
    assert again.startswith(f"Index database damaged the index database {db} is damaged (")
    assert FIX in again
    assert "database disk image is malformed" in browser.find_element(
        By.ID, "store-unreadable").text
    assert browser.find_element(By.CSS_SELECTOR, "#link .state").text == "not enrolled"
    answer = httpx.get(f"{base}/api/status", timeout=10)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"].startswith("index database unreadable: ")
    assert answer.json()["index_check"]["finding"], answer.text
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
