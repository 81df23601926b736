"""The instances that wait for this appliance's enrolment to go to the region.

Owns: the ``awaiting_hub`` rows (schema 22). May not touch: jobs (routing makes them, in
``appliance.store.jobs``), files, the network.

Why: an appliance may receive studies before it is enrolled (the first boot's enrolment
failed, the hub not reachable yet; "enrol later" in docs/install.md). A study that went
stable then, and that no rule and no fallback sent anywhere, was marked routed with no job:
the default route, to the hub, did not exist yet. Enrolled and restarted, the appliance
never sent it. The region never had it, and the cache kept it for ever (never confirmed,
so never evicted). Routing now files such instances here, in the transaction that marks
them routed (:func:`appliance.store.jobs.route_study`). The first start that finds the
appliance enrolled hands them back to routing (:func:`release`: their ``routed_at``
cleared, their rows gone, one transaction), and the router sends them to the hub as it
does any new study, under the rules of the day.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from appliance.store.db import Database


def hold(conn: sqlite3.Connection, instance_ids: Iterable[int], at: float) -> None:
    """File ``instance_ids`` as waiting for the hub, inside the caller's transaction."""
    rows = [(i, at) for i in instance_ids]
    if rows:  # none: the table is not touched (the upgrade tests route on older schemas)
        conn.executemany("INSERT OR IGNORE INTO awaiting_hub (instance_fk, since) "
                         "VALUES (?, ?)", rows)


def waiting(db: Database) -> tuple[int, int]:
    """How many instances, of how many studies, wait for the enrolment (kept, not evicted:
    the region has not confirmed them). Current versions only, as ``pas status`` counts
    instances: a version a correction replaced is never sent (it counted, "625 instances
    wait" under "instances 613")."""
    row = db.query_one(
        """SELECT count(*) AS instances, count(DISTINCT i.study_fk) AS studies
           FROM awaiting_hub a JOIN instances i ON i.id = a.instance_fk
           WHERE i.is_current = 1""")
    return (int(row["instances"]), int(row["studies"])) if row else (0, 0)


def release(db: Database) -> tuple[int, int]:
    """Hand every waiting instance back to routing, now that a hub exists: unrouted again
    (the router's next pass sends them), their rows removed; rows of instances deleted
    meanwhile (``pas cache purge``) go too. Returns (instances, studies) handed back."""
    with db.transaction() as conn:
        row = conn.execute(
            """SELECT count(*), count(DISTINCT i.study_fk)
               FROM awaiting_hub a JOIN instances i ON i.id = a.instance_fk
               WHERE i.confirmed_at IS NULL""").fetchone()
        # One the region confirmed meanwhile (its holdings, after a restored index) stays.
        conn.execute("""UPDATE instances SET routed_at = NULL
                        WHERE id IN (SELECT instance_fk FROM awaiting_hub)
                          AND confirmed_at IS NULL""")
        conn.execute("DELETE FROM awaiting_hub")
    return int(row[0]), int(row[1])
