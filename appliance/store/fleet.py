"""The hub's fleet store: the latest heartbeat of every site and a bounded history.

Owns: the SQL of ``fleet_sites`` and ``fleet_heartbeats`` (created by migration 2 of
``appliance.store.hub_schema.HUB_MIGRATIONS``, bounded by migration 10). A heartbeat is
idempotent per ``(site, sent_at)``: sending one again changes nothing. May not touch: other
hub tables, files, the network.

Why the history is bounded per site, not per heartbeat: every heartbeat with a new
``sent_at`` was a row, so a site posting thousands a second (a bug, a loop, a stolen
certificate) grew the table and the hub's disk without bound for :data:`HISTORY_DAYS`, and
its site page read every row. A history row now stands for the heartbeats that arrived in a
window of ``every_s`` seconds (hub clock) from its first: the first makes the row, the
others fold into it (``beats`` + 1, each figure the window's largest: the largest backlog,
the latest cumulative counts) and move the site's latest state as before. At most
``86400 / every_s`` rows per site a day, whatever the rate.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.store.db import Database, now

HISTORY_DAYS = 8.0
# The history's window per site (the hub passes its own, hub/fleet_gate.HISTORY_EVERY_S:
# half the appliance's default ops.heartbeat_interval_s, so a site on the default keeps a row
# per heartbeat).
HISTORY_EVERY_S = 15.0
# How many rows of one chart slot the site page reads at most (history_by_slot): a 60 s slot
# holds 4 windows of 15 s; twice that leaves room for a hub clock stepped back. Rows past it
# (a table an older hub filled, one row per heartbeat) are left out of the page, not read.
SLOT_ROWS = 8
# How long a heartbeat can take from the appliance to the hub (its client gives up after
# 15 s): one sent earlier than the site's latest, by the site's own clock, is late news only
# if the site's clock moved less than this against the hub's between the two.
MAX_IN_FLIGHT_S = 120.0

_SITE_COLUMNS = ("site", "first_seen_at", "last_seen_at", "last_sent_at", "version",
                 "backlog_studies", "backlog_oldest_s", "urgent_oldest_s", "disk_used_percent",
                 "cert_days_left", "failed_jobs", "errors")


def record_heartbeat(db: Database, site: str, beat: dict[str, Any],
                     every_s: float = HISTORY_EVERY_S) -> bool:
    """Store one validated heartbeat. False when this ``(site, sent_at)`` was already
    recorded (nothing changes): a history row's first heartbeat, or the site's latest. (A
    copy of an older heartbeat folded into a window counts once more in that window's
    ``beats``: recognising it would take a row per heartbeat, what the window avoids.)

    The history gets a row only when the site has none received in the last ``every_s``
    seconds; else the heartbeat folds into that row (module docstring). The site's latest
    state moves forward in ``sent_at``, so a late one (sent before the latest, delivered
    after) cannot overwrite newer news; unless the site's clock was set back meanwhile: its
    offset to the hub's clock (``sent_at`` minus arrival) fell by more than
    :data:`MAX_IN_FLIGHT_S`, more than any delivery takes. Before, a site whose clock an hour
    ahead was put right had its row frozen for that hour (its heartbeats only in the
    history): the dashboard showed it down while it sent every 30 s."""
    at = now()
    sent_at = float(beat["sent_at"])
    backlog = beat["backlog"]
    figures = (backlog["studies"], backlog["oldest_age_s"], beat["disk"]["used_percent"],
               beat["received"]["bytes"], beat["received"]["instances"], beat["jobs"]["failed"])
    with db.transaction() as conn:
        if conn.execute(
                """SELECT 1 FROM fleet_sites WHERE site = ? AND last_sent_at = ?
                   UNION ALL SELECT 1 FROM fleet_heartbeats WHERE site = ? AND sent_at = ?""",
                (site, sent_at, site, sent_at)).fetchone() is not None:
            return False
        # The window: the site's newest row received in the last every_s seconds. Rows
        # dated after ``at`` (the hub's clock stepped back) do not hold the window open.
        window = conn.execute(
            """SELECT sent_at FROM fleet_heartbeats
               WHERE site = ? AND received_at > ? AND received_at <= ?
               ORDER BY received_at DESC LIMIT 1""", (site, at - every_s, at)).fetchone()
        if window is None:
            conn.execute(
                """INSERT INTO fleet_heartbeats (site, sent_at, received_at, backlog_studies,
                       backlog_oldest_s, disk_used_percent, received_bytes,
                       received_instances, failed_jobs, beats)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)""", (site, sent_at, at, *figures))
        else:
            conn.execute(
                """UPDATE fleet_heartbeats SET beats = beats + 1,
                       backlog_studies = max(backlog_studies, ?),
                       backlog_oldest_s = max(backlog_oldest_s, ?),
                       disk_used_percent = max(coalesce(disk_used_percent, 0), ?),
                       received_bytes = max(received_bytes, ?),
                       received_instances = max(received_instances, ?),
                       failed_jobs = max(failed_jobs, ?)
                   WHERE site = ? AND sent_at = ?""", (*figures, site, window["sent_at"]))
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


def history_by_slot(db: Database, site: str, since: float, slot_s: float,
                    slot_rows: int = SLOT_ROWS) -> tuple[list[dict[str, Any]], int]:
    """The site's history received since ``since`` as one point per ``slot_s`` seconds (the
    slot's last arrival, its largest backlog and its latest cumulative received figures),
    and how many heartbeats they hold. What the site page draws: a site on
    ``ops.heartbeat_interval_s = 1`` (or posting faster) gave 86,400 points a day per chart,
    a 1.9 MB page at every refresh; now at most ``86400 / slot_s`` whatever the rate.

    Reads at most ``slot_rows`` rows per slot, the slot's newest, one index seek each
    (``fleet_heartbeats_site_received``), whatever the table holds: the page read every row
    of the day before (200,000 rows of one site: 91 ms a page). The history this hub writes
    has at most ``slot_s / every_s`` rows a slot (record_heartbeat), so nothing is left out
    of it; a table an older hub filled (a row per heartbeat) shows each slot's newest."""
    until = now() + slot_s  # a heartbeat recorded while the page is drawn is in its last slot
    rows = db.query(
        """WITH RECURSIVE slot(lo) AS (
               SELECT :since UNION ALL SELECT lo + :slot FROM slot WHERE lo + :slot < :until),
           bounded(lo, low) AS (
               SELECT lo, coalesce((SELECT received_at FROM fleet_heartbeats
                                    WHERE site = :site AND received_at >= lo
                                      AND received_at < lo + :slot
                                    ORDER BY received_at DESC LIMIT 1 OFFSET :rows - 1), lo)
               FROM slot)
           SELECT max(h.received_at) AS received_at, max(h.backlog_studies) AS backlog_studies,
                  max(h.received_bytes) AS received_bytes,
                  max(h.received_instances) AS received_instances, sum(h.beats) AS beats
           FROM bounded JOIN fleet_heartbeats h
                ON h.site = :site AND h.received_at >= bounded.low
                   AND h.received_at < bounded.lo + :slot
           GROUP BY bounded.lo ORDER BY bounded.lo""",
        {"since": since, "slot": slot_s, "until": until, "site": site, "rows": slot_rows},
    )
    points = [dict(r) for r in rows]
    return points, sum(int(p.pop("beats")) for p in points)


def heartbeat_count(db: Database, site: str | None = None) -> int:
    """How many heartbeats the history holds (each row's ``beats``), of one site or all."""
    if site is None:
        row = db.query_one("SELECT coalesce(sum(beats), 0) AS n FROM fleet_heartbeats")
    else:
        row = db.query_one("SELECT coalesce(sum(beats), 0) AS n FROM fleet_heartbeats "
                           "WHERE site = ?", (site,))
    return int(row["n"]) if row else 0


def history_rows(db: Database, site: str) -> int:
    """How many history rows the site has: what its heartbeats cost the hub's disk."""
    row = db.query_one("SELECT count(*) AS n FROM fleet_heartbeats WHERE site = ?", (site,))
    return int(row["n"]) if row else 0
