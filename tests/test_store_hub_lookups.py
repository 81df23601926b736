"""A holdings question finds the asking site's transfers of its study through an index, however
many transfers the site sent (appliance/store/hub.py ``archived_for_site`` and
``receipted_instances``, hub schema migration 8).

An appliance whose index was rebuilt or restored asks the hub, study by study, which instances
the region holds (appliance/hub/holdings.py). With the embedded archive the hub also leaves
out what the site's own transfers of that study put in the archive, committed or not (the
committed ones through their receipts: their ``archived_instances`` rows go with the commit
since hub schema 13; the rows of committed transfers inserted below stand for an older hub's,
which the lookup reads all the same). Hub
migration 6's index of a site's studies is partial (``WHERE receipt IS NOT NULL``): SQLite
takes it only for a query that implies that, which this one cannot (it wants the transfers
not committed too). It read every transfer the site ever sent, once per study asked: 100,019
SQLite instructions a question at 20,000 transfers, and a rebuilt cache asks once for each
of its studies. Counted here is SQLite's own work (its virtual machine's instructions,
through a progress handler), not time: it does not depend on the machine's load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.store import hub as store
from appliance.store.db import Database
from appliance.store.hub_schema import HUB_MIGRATIONS
from tests.support.sqlite_steps import counted

TRANSFERS = 20_000
# Through the index: 24 to 40 instructions; through every transfer of the site, 100,000.
MOST_INSTRUCTIONS = 10_000
ASKED = "2.25.77"  # the study asked about
SHA = "a" * 64


def _transfer(n: int | str, site: str, study_uid: str, committed: bool) -> tuple[Any, ...]:
    receipt = json.dumps({"instances": [{"sop_instance_uid": f"{study_uid}.{n}",
                                         "sha256": SHA}]}) if committed else None
    return (f"T-{site}-{n}", site, study_uid, float(len(str(n))), receipt)


def test_a_holdings_question_reads_that_study_s_transfers_only(tmp_path: Path) -> None:
    """The site sent 20,000 studies; the one asked has a committed transfer and a later one
    that never committed (expired), both with instances in the archive; another site sent
    the same study. Only this site's two are the site's own; only the committed one was
    receipted."""
    db = Database(tmp_path / "hub.sqlite", HUB_MIGRATIONS)
    try:
        rows = [_transfer(n, "CHU-NORD", f"2.25.1{n:06d}", True) for n in range(TRANSFERS)]
        rows += [_transfer("first", "CHU-NORD", ASKED, True),
                 _transfer("delta", "CHU-NORD", ASKED, False),
                 _transfer("other", "CH-SUD", ASKED, True)]
        with db.transaction() as conn:
            conn.executemany(
                "INSERT INTO transfers (id, site, study_uid, bucket_count, instance_count, "
                "manifest, manifest_sha256, created_at, committed_at, receipt) "
                "VALUES (?, ?, ?, 1, 1, '{}', 'x', ?, NULL, ?)", rows)
            conn.execute("UPDATE transfers SET expired_at = 1 WHERE id = 'T-CHU-NORD-delta'")
            conn.executemany(
                "INSERT INTO archived_instances (transfer_id, sop_instance_uid, sha256, "
                "archived_at) VALUES (?, ?, ?, 0)",
                [(transfer_id, f"{study}.{transfer_id.rsplit('-', 1)[1]}", SHA)
                 for transfer_id, _, study, _, _ in rows])

        spent, own = counted(db, lambda: store.archived_for_site(db, "CHU-NORD", ASKED))
        assert spent < MOST_INSTRUCTIONS, spent
        assert own == {(f"{ASKED}.first", SHA), (f"{ASKED}.delta", SHA)}

        spent, receipted = counted(db, lambda: store.receipted_instances(
            db, "CHU-NORD", ASKED))
        assert spent < MOST_INSTRUCTIONS, spent
        assert receipted == {(f"{ASKED}.first", SHA): ("T-CHU-NORD-first", True)}
    finally:
        db.close()
