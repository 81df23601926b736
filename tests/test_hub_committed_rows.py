"""A committed transfer keeps its receipt, not what only its upload needed (hub schema 13).

``hub.sqlite`` kept every transfer's manifest text, bucket rows and ``archived_instances``
rows for ever: ~400 bytes an instance, most of the database after a few years of a region,
and in every nightly hub backup. The commit now drops them in the transaction that stores
the receipt (``appliance/store/hub.py`` ``set_receipt``), and migration 13 drops those of
the transfers committed before it. Everything a site may still ask of a committed transfer
is answered as before: its held buckets (all of them), the same manifest posted again
(200), a late bucket (409), the commit again (the same receipt) and a holdings question.

Real peers: ``pas hub run`` (mutual TLS, embedded archive), buckets sealed from the MR set.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

from appliance.hub.holdings import HOLDINGS_PATH
from appliance.store.db import Database
from appliance.store.hub_schema import HUB_MIGRATIONS
from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import MR_DIR


def _rows(hub_db: Path, sql: str, *params: object) -> list[tuple]:
    conn = sqlite3.connect(hub_db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_a_commit_drops_the_upload_rows_and_answers_every_question_as_before(
        hub: HubProcess, tmp_path: Path) -> None:
    site = enroll(hub, tmp_path / "site", "CHU-OUEST")
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:40]
    shipment = ship(pack_items(files), site.hub_transfer_key, 512 * 1024, "2.25.4242")
    hub_db, tid = hub.home / "hub.sqlite", shipment.transfer_id
    with client(site) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        assert shipment.put_all(http) == [201] * len(shipment.buckets)
        count = len(shipment.buckets)
        assert count >= 3
        # Before the commit: the upload's rows are there (what the resume needs).
        assert _rows(hub_db, "SELECT count(*) FROM buckets WHERE transfer_id = ?", tid) == \
            [(count,)]
        assert _rows(hub_db, "SELECT length(manifest) > 0 FROM transfers WHERE id = ?",
                     tid) == [(1,)]
        answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 200, answer.text
        receipt = answer.json()
        assert {(i["sop_instance_uid"], i["sha256"]) for i in receipt["instances"]} == \
            set(shipment.originals.items())

        # After it: the receipt and the counters, nothing of the upload.
        assert _rows(hub_db, "SELECT manifest, instance_count, bucket_count, "
                     "bytes_stored > 0, receipt IS NOT NULL FROM transfers WHERE id = ?",
                     tid) == [("", 40, count, 1, 1)]
        assert _rows(hub_db, "SELECT count(*) FROM buckets WHERE transfer_id = ?", tid) == \
            [(0,)]
        assert _rows(hub_db, "SELECT count(*) FROM archived_instances WHERE transfer_id = ?",
                     tid) == [(0,)]

        # A site resuming it is told that every bucket is held, and its manifest's SHA-256.
        canonical = json.dumps(shipment.manifest, sort_keys=True,
                               separators=(",", ":")).encode()
        assert http.get(shipment.url + "/buckets").json() == {
            "held": list(range(count)), "count": count,
            "manifest_sha256": hashlib.sha256(canonical).hexdigest()}
        status = http.get(shipment.url).json()
        assert status["committed"] and status["held"] == count, status
        # The same manifest again is a repeat, another one with its id a conflict.
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 200
        other = {**shipment.manifest, "priority": shipment.manifest.get("priority", 0) + 1}
        assert http.post("/api/v1/transfers", json=other).status_code == 409
        late = http.put(shipment.bucket_url(0), content=shipment.buckets[0])
        assert late.status_code == 409 and late.json()["error"] == "committed", late.text
        assert http.post(shipment.url + "/commit").json() == receipt
        assert http.get(shipment.url + "/receipt").json() == receipt

        # A holdings question (an appliance whose index was rebuilt) reads the receipt: every
        # instance is the site's own, receipted, none presented as the region's from elsewhere.
        pairs = sorted(shipment.originals.items())
        asked = {"study_uid": "2.25.4242", "nonce": "n" * 20,
                 "instances": [{"sop_instance_uid": u, "sha256": s} for u, s in pairs]}
        statement = http.post(HOLDINGS_PATH, json=asked)
        assert statement.status_code == 200, statement.text
        held = statement.json()
        assert sorted((i["sop_instance_uid"], i["sha256"]) for i in held["instances"]) == pairs
        assert {i["transfer_id"] for i in held["instances"]} == {tid}
        assert held["region_instances"] == []

    listed = " ".join(hub.cli("transfers", "--site", "CHU-OUEST").stdout.split())
    assert f"{count}/{count}" in listed, listed
    # Bytes received, then when created and committed (UTC).
    assert re.search(r"\d+/\d+ │ \d+(\.\d)? (kB|MB) │ [0-9-]{10}T[0-9:]{8}Z │ "
                     r"[0-9-]{10}T[0-9:]{8}Z │", listed), listed


def test_migration_13_drops_the_upload_rows_of_transfers_committed_before_it(
        tmp_path: Path) -> None:
    """A hub database of schema 12 with a committed transfer and one still uploading: the
    first only loses its manifest text, bucket rows and archived rows; the second keeps all
    (its site resumes it)."""
    path = tmp_path / "hub.sqlite"
    old = Database(path, HUB_MIGRATIONS[:12])
    receipt = json.dumps({"instances": [{"sop_instance_uid": "1.1", "sha256": "a" * 64}]})
    with old.transaction() as conn:
        for tid, done in (("T-done", receipt), ("T-open", None)):
            conn.execute(
                "INSERT INTO transfers (id, site, study_uid, bucket_count, instance_count, "
                "manifest, manifest_sha256, created_at, committed_at, receipt) "
                "VALUES (?, 'CHU', '2.25.1', 2, 1, '{\"instances\": []}', 'x', 1, ?, ?)",
                (tid, 2.0 if done else None, done))
            conn.executemany(
                "INSERT INTO buckets (transfer_id, idx, size, sha256, path, received_at) "
                "VALUES (?, ?, 10, 'b', ?, 1)", [(tid, i, f"{tid}/{i}") for i in range(2)])
            conn.execute("INSERT INTO archived_instances (transfer_id, sop_instance_uid, "
                         "sha256, archived_at) VALUES (?, '1.1', ?, 1)", (tid, "a" * 64))
    old.close()

    new = Database(path, HUB_MIGRATIONS)
    try:
        assert new.query_one("PRAGMA user_version")[0] == len(HUB_MIGRATIONS) >= 13
    finally:
        new.close()
    assert _rows(path, "SELECT id, manifest, receipt IS NOT NULL FROM transfers "
                 "ORDER BY id") == [("T-done", "", 1), ("T-open", '{"instances": []}', 0)]
    for table in ("buckets", "archived_instances"):
        assert _rows(path, f"SELECT transfer_id, count(*) FROM {table} "
                     "GROUP BY transfer_id") == [("T-open", 2 if table == "buckets" else 1)]
