"""``pas_storage_commitment_pending`` and ``..._oldest_age_seconds`` have a bounded
``calling_ae`` label: a title not in ``dicom.known_aes`` is ``other`` (appliance/ops/
metrics.py, as ``pas_received_*_total``).

Found in review: the label was the calling AE title as stored. With
``dicom.accept_unknown``, 40 made-up titles each asking for commitment and going away made
40 series of each gauge, kept the 24 h their reports wait. Now the known titles keep their
own series, the others are one: pending summed, the oldest of them.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage, generate_uid

from appliance.config import Settings, build
from appliance.ops.metrics import build_registry, render
from appliance.store import commitment
from appliance.store.db import Database


def _ask(db: Database, ae: str) -> int:
    recorded, _ = commitment.record_request(db, generate_uid(), ae, "127.0.0.1",
                                            [(CTImageStorage, generate_uid())],
                                            lambda relative: True, 86400)
    return recorded.id


def _gauges(settings: Settings, db: Database) -> dict[tuple[str, str], float]:
    text = render(build_registry(settings, db)).decode()
    return {(sample.name, sample.labels["calling_ae"]): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith("pas_storage_commitment_")
            and "calling_ae" in sample.labels}


def test_made_up_calling_ae_titles_are_one_other_series(tmp_path: Path) -> None:
    settings = build(Settings, {"home": str(tmp_path), "dicom": {
        "accept_unknown": True, "known_aes": [{"title": "CT1"}]}})
    db = Database(tmp_path / "pas.sqlite")
    try:
        _ask(db, "CT1")
        oldest = [_ask(db, f"FAKE{k:04d}") for k in range(40)][7]
        with sqlite3.connect(tmp_path / "pas.sqlite") as conn:  # one made-up AE's: 10 min old
            conn.execute("UPDATE commitment_requests SET requested_at = ? WHERE id = ?",
                         (time.time() - 600, oldest))
        gauges = _gauges(settings, db)
    finally:
        db.close()
    assert sorted(gauges) == [
        ("pas_storage_commitment_oldest_age_seconds", "CT1"),
        ("pas_storage_commitment_oldest_age_seconds", "other"),
        ("pas_storage_commitment_pending", "CT1"),
        ("pas_storage_commitment_pending", "other")], sorted(gauges)
    assert gauges[("pas_storage_commitment_pending", "CT1")] == 1
    assert gauges[("pas_storage_commitment_pending", "other")] == 40
    assert gauges[("pas_storage_commitment_oldest_age_seconds", "other")] >= 600
    assert gauges[("pas_storage_commitment_oldest_age_seconds", "CT1")] < 120
