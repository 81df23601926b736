"""The hub's fleet store: the latest heartbeat of every site and a bounded history.

Owns: the SQL of ``fleet_sites`` and ``fleet_heartbeats`` (created by migration 2 of
``appliance.store.hub_schema.HUB_MIGRATIONS``). A heartbeat is idempotent per
``(site, sent_at)``: sending one again changes nothing. May not touch: other hub tables,
files, the network.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.store.db import Database, now

HISTORY_DAYS = 8.0
# How long a heartbeat can take from the appliance to the hub (its client gives up after
# 15 s): one sent earlier than the site's latest, by the site's own clock, is late news only
# if the site's clock moved less than this against the hub's between the two.
MAX_IN_FLIGHT_S = 120.0

_SITE_COLUMNS = ("site", "first_seen_at", "last_seen_at", "last_sent_at", "version",
                 "backlog_studies", "backlog_oldest_s", "urgent_oldest_s", "disk_used_percent",
                 "cert_days_left", "failed_jobs", "errors")


def record_heartbeat(db: Database, site: str, beat: dict[str, Any]) -> bool:
    """Store one validated heartbeat. False when this ``(site, sent_at)`` was already
    recorded (nothing changes). The site's latest state moves forward in ``sent_at``, so a
    late one (sent before the latest, delivered after) cannot overwrite newer news; unless
    the site's clock was set back meanwhile: its offset to the hub's clock (``sent_at`` minus
    arrival) fell by more than :data:`MAX_IN_FLIGHT_S`, more than any delivery takes. Before,
    a site whose clock an hour ahead was put right had its row frozen for that hour (its
    heartbeats only in the history): the dashboard showed it down while it sent every 30 s."""
    at = now()
    sent_at = float(beat["sent_at"])
    backlog = beat["backlog"]
    with db.transaction() as conn:
        cursor = conn.execute(
            """INSERT OR IGNORE INTO fleet_heartbeats (site, sent_at, received_at,
                   backlog_studies, backlog_oldest_s, disk_used_percent, received_bytes,
                   received_instances, failed_jobs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (site, sent_at, at, backlog["studies"], backlog["oldest_age_s"],
             beat["disk"]["used_percent"], beat["received"]["bytes"],
             beat["received"]["instances"], beat["jobs"]["failed"]),
        )
        if cursor.rowcount == 0:
            return False
        values = (site, at, at, sent_at, beat["version"], backlog["studies"],
                  backlog["oldest_age_s"], backlog["urgent_oldest_age_s"],
                  beat["disk"]["used_percent"], beat.get("cert_days_left"),
                  beat["jobs"]["failed"], json.dumps(beat.get("errors", [])),
                  # No NaN or Infinity: SQLite's json_extract refuses such a row, and every
                  # read of the fleet with it (hub/fleet.parse_heartbeat refuses them first).
                  json.dumps(beat, allow_nan=False))
        conn.execute(
            """INSERT INTO fleet_sites (site, first_seen_at, last_seen_at, last_sent_at, version,
                   backlog_studies, backlog_oldest_s, urgent_oldest_s, disk_used_percent,
                   cert_days_left, failed_jobs, errors, status)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (site) DO UPDATE SET
                   last_seen_at = excluded.last_seen_at, last_sent_at = excluded.last_sent_at,
                   version = excluded.version, backlog_studies = excluded.backlog_studies,
                   backlog_oldest_s = excluded.backlog_oldest_s,
                   urgent_oldest_s = excluded.urgent_oldest_s,
                   disk_used_percent = excluded.disk_used_percent,
                   cert_days_left = excluded.cert_days_left,
                   failed_jobs = excluded.failed_jobs, errors = excluded.errors,
                   status = excluded.status
               WHERE excluded.last_sent_at > fleet_sites.last_sent_at
                  OR (fleet_sites.last_sent_at - fleet_sites.last_seen_at)
                     - (excluded.last_sent_at - excluded.last_seen_at) > ?""",
            (*values, MAX_IN_FLIGHT_S),
        )
        conn.execute("DELETE FROM fleet_heartbeats WHERE received_at < ?",
                     (at - HISTORY_DAYS * 86400,))
    return True


def list_sites(db: Database) -> list[dict[str, Any]]:
    """Every site's latest state. ``routine_oldest_s`` and ``last_backup_at`` come from the
    stored heartbeat (None from appliances older than those fields); ``backup_reported``
    tells a site that never backed up (``last_backup_at`` null in its heartbeat) from one too
    old to say."""
    rows = db.query(
        f"""SELECT {', '.join(_SITE_COLUMNS)},
                   json_extract(status, '$.backlog.routine_oldest_age_s') AS routine_oldest_s,
                   json_extract(status, '$.last_backup_at') AS last_backup_at,
                   json_type(status, '$.last_backup_at') IS NOT NULL AS backup_reported
            FROM fleet_sites ORDER BY site""")
    result = []
    for row in rows:
        site = dict(row)
        site["errors"] = json.loads(site["errors"] or "[]")
        site["backup_reported"] = bool(site["backup_reported"])
        result.append(site)
    return result


def site_status(db: Database, site: str) -> dict[str, Any] | None:
    row = db.query_one("SELECT status, last_seen_at FROM fleet_sites WHERE site = ?", (site,))
    if row is None:
        return None
    return {**json.loads(row["status"]), "last_seen_at": row["last_seen_at"]}


def history(db: Database, site: str, since: float) -> list[dict[str, Any]]:
    rows = db.query(
        """SELECT sent_at, received_at, backlog_studies, backlog_oldest_s, disk_used_percent,
                  received_bytes, received_instances, failed_jobs
           FROM fleet_heartbeats WHERE site = ? AND received_at >= ? ORDER BY received_at""",
        (site, since),
    )
    return [dict(r) for r in rows]


def history_by_slot(db: Database, site: str, since: float,
                    slot_s: float) -> tuple[list[dict[str, Any]], int]:
    """The site's heartbeats received since ``since`` as one point per ``slot_s`` seconds
    (the slot's last arrival, its largest backlog and its latest cumulative received
    figures), and how many heartbeats they are. What the site page draws: a site on
    ``ops.heartbeat_interval_s = 1`` (or posting faster) gave 86,400 points a day per chart,
    a 1.9 MB page at every refresh; now at most ``86400 / slot_s`` whatever the rate."""
    rows = db.query(
        """SELECT max(received_at) AS received_at, max(backlog_studies) AS backlog_studies,
                  max(received_bytes) AS received_bytes,
                  max(received_instances) AS received_instances, count(*) AS beats
           FROM fleet_heartbeats WHERE site = ? AND received_at >= ?
           GROUP BY CAST((received_at - ?) / ? AS INTEGER) ORDER BY 1""",
        (site, since, since, slot_s),
    )
    points = [dict(r) for r in rows]
    return points, sum(int(p.pop("beats")) for p in points)


def heartbeat_count(db: Database, site: str | None = None) -> int:
    if site is None:
        row = db.query_one("SELECT count(*) AS n FROM fleet_heartbeats")
    else:
        row = db.query_one("SELECT count(*) AS n FROM fleet_heartbeats WHERE site = ?", (site,))
    return int(row["n"]) if row else 0
