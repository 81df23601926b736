"""The fleet on the hub: heartbeats in, dashboard, site pages and fleet metrics out.

Owns: ``POST /api/v1/heartbeat`` (mutual TLS: the site is the certificate's, never the
body's), ``GET /fleet`` (one row per site, sortable and filterable by query string),
``GET /fleet/sites/{site}`` (24 h charts as inline SVG, drawn by
:mod:`appliance.hub.fleet_site_page`) and ``GET /metrics`` (fleet families ``pas_fleet_*``
for Prometheus, and the hub's own, read by :mod:`appliance.hub.fleet_metrics`; the alert
rules in ``image/monitoring/alerts.yml`` use them).
May not touch: SQL (``appliance.store.fleet``), transfers, the PKI.

The sites whose requests the hub refuses for a certificate its CA signed but it does not
know (enrolled after the backup it was restored from;
:mod:`appliance.hub.fleet_refused`): a ``refused`` row each, a problem as a site down.

What one site may cost: its heartbeats pass :class:`appliance.hub.fleet_gate.HeartbeatGate`
first (429 with ``Retry-After`` past one a second after a burst, before the body is read),
and the store keeps one history row per site per ``HISTORY_EVERY_S``; the site page reads at
most ``store.SLOT_ROWS`` rows per chart minute, whatever the table holds.

Each site's last backup (the heartbeat's optional ``last_backup_at``): the dashboard's "last
backup" column, warned past two days (as ``pas doctor`` warns on site), and the gauge
``pas_fleet_site_backup_age_seconds`` for the alert rule; a site that never backed up counts
from its first heartbeat, one too old to report it has neither.

The hub's own last backup (``pas hub backup``, recorded in ``hub.sqlite`` by migration 7): one
line above the table, warned past the same two days or when there was never one, and the
gauges ``pas_hub_backup_age_seconds`` (never backed up: since the hub began being watched,
a new or upgraded hub) and ``pas_hub_last_backup_timestamp_seconds`` for ``PasHubBackupOld``.

The hub's bucket budget (``limits.bucket_bodies_bytes``, :mod:`appliance.hub.bucket_bodies`):
``pas_hub_bucket_puts_refused_busy_total`` per site (``PasHubBusy``) and the gauges of the
bucket bodies held now.
"""

from __future__ import annotations

import html
import json
import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.hub.fleet_gate import HISTORY_EVERY_S, HeartbeatGate
from appliance.hub.fleet_refused import Refusal
from appliance.ops.backup import STALE_AFTER_S as BACKUP_STALE_AFTER_S
from appliance.store import fleet as store
from appliance.store.hub import enrolled_sites, hub_backup_record, revoked_sites
from appliance.web.headers import page_headers
from appliance.words import ago, counted, local_time

if TYPE_CHECKING:
    from appliance.hub.app import Hub

# The site page's charts: one point a minute at most (1,440 a day), whatever the heartbeats'
# rate (store.history_by_slot).
CHART_SLOT_S = 60.0
SILENT_AFTER_S = 300.0  # a site is "down" when no heartbeat arrived for 5 minutes
MAX_HEARTBEAT_BYTES = 64 * 1024
MAX_FUTURE_S = 86400.0
AGES = ("oldest_age_s", "urgent_oldest_age_s", "routine_oldest_age_s")  # the backlog's
# Beyond any real count, byte total or age, and exact as a float; SQLite's INTEGER stops at
# 2**63, and a larger number was an OverflowError (500) at the insert.
MAX_NUMBER = float(2**53)
# What a site's strings may be: the version is a label of pas_fleet_site_info and a dashboard
# cell; an appliance sends at most 6 errors (ops/heartbeat.MAX_ERRORS + 1) of a few hundred
# characters. Past these the heartbeat is refused, not cut, so the site hears what is wrong.
MAX_VERSION_CHARS = 64
MAX_ERRORS = 20
MAX_ERROR_CHARS = 2000
SORT_KEYS = ("site", "state", "last_seen_at", "backlog_studies", "backlog_oldest_s",
             "disk_used_percent", "version", "cert_days_left", "failed_jobs", "backup_age_s")


class HeartbeatError(ValueError):
    """A heartbeat body that does not have the documented shape; the message names the field."""


def _number(value: Any, path: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HeartbeatError(f"{path}: must be a number, got {value!r}")
    if not math.isfinite(value):  # a dict built in Python, not read by parse_heartbeat
        raise HeartbeatError(f"{path}: must be a finite number, got {value!r}")
    if value < minimum:
        raise HeartbeatError(f"{path}: must be >= {minimum}, got {value!r}")
    if value > MAX_NUMBER:
        raise HeartbeatError(f"{path}: must be at most {MAX_NUMBER:.0f}, got {value!r}")
    return float(value)


def _not_a_number(word: str) -> float:
    raise HeartbeatError(f"{word} is not a number (JSON has no NaN or Infinity)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise HeartbeatError(f"{text} is not a finite number")
    return value


def parse_heartbeat(body: bytes) -> dict[str, Any]:
    """The heartbeat read from its body and checked (:func:`validate_heartbeat`).

    Why not plain ``json.loads``: it reads ``NaN``, ``Infinity`` and ``1e999`` (as infinity)
    anywhere in the document, keys the hub does not check included, and the whole heartbeat
    is stored as JSON (``fleet_sites.status``, written back by ``json.dumps`` with those
    words): SQLite's ``json_extract`` then refuses the row ("malformed JSON") and every read
    of the fleet (``/fleet``, ``/metrics``) failed, for every site, until the next good
    heartbeat of that one. Raises :class:`HeartbeatError` (a ``ValueError``), or
    ``ValueError``/``RecursionError`` for a body that is not JSON."""
    return validate_heartbeat(json.loads(body, parse_constant=_not_a_number,
                                         parse_float=_finite))


def _text(value: Any, path: str, limit: int) -> str:
    """A printable string of at most ``limit`` characters (no newline or control character:
    a label in the hub's ``/metrics``, text on its pages)."""
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        shown = repr(value) if len(repr(value)) <= 80 else f"{repr(value)[:80]}... " \
            f"({len(value) if isinstance(value, str) else '?'} characters)"
        raise HeartbeatError(f"{path}: at most {limit} printable characters, got {shown}")
    return value


def validate_heartbeat(beat: Any) -> dict[str, Any]:
    """Check the shape :func:`appliance.ops.heartbeat.build_heartbeat` produces, and that
    nothing in it is out of bounds (a number too large for the store, a string too long for
    a label or a page)."""
    if not isinstance(beat, dict):
        raise HeartbeatError("body must be a JSON object")
    sent_at = _number(beat.get("sent_at"), "sent_at", 1.0)
    if sent_at > time.time() + MAX_FUTURE_S:
        # A site's latest state only moves forward in sent_at: one heartbeat from the far
        # future would freeze its dashboard row.
        raise HeartbeatError(f"sent_at: {sent_at} is more than a day ahead of the hub's "
                             "clock (fix the appliance's clock: pas doctor)")
    if not isinstance(beat.get("version"), str) or not beat["version"]:
        raise HeartbeatError(f"version: must be a non-empty string, got {beat.get('version')!r}")
    _text(beat["version"], "version", MAX_VERSION_CHARS)
    for section, keys in (("backlog", ("studies", "bytes")),
                          ("jobs", ("failed",)), ("disk", ("used_percent",)),
                          ("received", ("instances", "bytes"))):
        part = beat.get(section)
        if not isinstance(part, dict):
            raise HeartbeatError(f"{section}: must be an object")
        for key in keys:
            _number(part.get(key), f"{section}.{key}")
    for key in AGES:
        if key == "routine_oldest_age_s" and beat["backlog"].get(key) is None:
            continue  # optional: older appliances
        # An age below 0 is the appliance's clock stepped back (a job's creation time in its
        # future): 0, the heartbeat kept. The whole heartbeat was refused (422) and the site
        # shown down until the clock caught up. Below a day's step, as sent_at, it is absurd.
        beat["backlog"][key] = max(_number(beat["backlog"].get(key), f"backlog.{key}",
                                           -MAX_FUTURE_S), 0.0)
    if beat["disk"]["used_percent"] > 100:
        raise HeartbeatError("disk.used_percent: must be <= 100, got "
                             f"{beat['disk']['used_percent']}")
    if beat.get("cert_days_left") is not None:
        _number(beat["cert_days_left"], "cert_days_left", -1e6)
    if beat.get("last_backup_at") is not None:  # optional: absent from older appliances
        _number(beat["last_backup_at"], "last_backup_at", 1.0)
    errors = beat.get("errors", [])
    if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
        raise HeartbeatError("errors: must be a list of strings")
    if len(errors) > MAX_ERRORS:
        raise HeartbeatError(f"errors: at most {MAX_ERRORS}, got {len(errors)}")
    for number, error in enumerate(errors):
        if len(error) > MAX_ERROR_CHARS:
            raise HeartbeatError(f"errors[{number}]: at most {MAX_ERROR_CHARS} characters, "
                                 f"got {len(error)}")
    return beat


def site_rows(hub_db: Any, at: float | None = None,
              refused: dict[str, Refusal] | None = None) -> list[dict[str, Any]]:
    """Every site's latest state; ``state`` is ``up``, ``down`` (silent past
    :data:`SILENT_AFTER_S`; a site enrolled that never sent a heartbeat counts from its
    enrolment), ``enrolled`` (no heartbeat yet, enrolled less than that ago),
    ``revoked`` (``pas hub revoke``: its silence is expected, no problem, and
    :class:`~appliance.hub.fleet_metrics.FleetCollector` exports no series for it, so
    that PasSiteSilent and the other rules do not fire for a closed site for ever) or
    ``refused``: its requests are refused for a certificate this hub's CA signed but this
    hub does not know (``refused``: :meth:`RefusedCertificates.problems
    <appliance.hub.fleet_refused.RefusedCertificates.problems>`), a site enrolled after the
    backup the hub was restored from. It was on no page (or "revoked", when revoked in the
    backup and enrolled again since) and in no series. Now a problem, as a site down: a
    site the database does not know counts as last seen at its first refusal, so
    PasSiteSilent fires five minutes after it.

    The figures of a site not heard now (revoked, refused: those of its last heartbeat,
    from before; enrolled, never heard: none) are None, shown "-": a revoked site's row
    kept its backlog and certificate days of before the revocation as if current, and a
    site never heard read "backlog 0, oldest 0 s"."""
    at = time.time() if at is None else at
    refused = refused or {}
    rows = store.list_sites(hub_db)
    revoked = revoked_sites(hub_db)
    heard = {row["site"] for row in rows}
    # Enrolled, never heard: it was on no page and in no series, so an appliance that never
    # came up (or cannot reach the hub) was never shown down and PasSiteSilent never fired.
    for site, enrolled_at in sorted(enrolled_sites(hub_db).items()):
        if site not in heard:
            rows.append(_never_heard(site, enrolled_at))
    known = {row["site"] for row in rows}
    for site in sorted(set(refused) - known):  # unknown to the database as a site too
        rows.append(_never_heard(site, refused[site].first_at))
    for row in rows:
        row["silent_s"] = max(at - row["last_seen_at"], 0.0)
        refusal = refused.get(row["site"])
        row["state"] = ("refused" if refusal is not None
                        else "revoked" if row["site"] in revoked
                        else "enrolled" if row.get("never_heard")
                        and row["silent_s"] <= SILENT_AFTER_S
                        else "up" if row["silent_s"] <= SILENT_AFTER_S else "down")
        if refusal is not None:
            row["refusal"] = refusal
            row["errors"] = [refused_text(refusal, at)]
        elif row.get("never_heard") and row["state"] == "down":
            row["errors"] = [f"no heartbeat since its enrolment, {_age(row['silent_s'])} ago: "
                             "its appliance is not running or cannot reach the hub"]
        row["backup_age_s"] = backup_age(row, at)
        row["backup_stale"] = (row["backup_age_s"] is not None
                               and row["backup_age_s"] > BACKUP_STALE_AFTER_S)
        if row["state"] in ("revoked", "refused"):
            _not_current(row)
    return rows


# What a site's last heartbeat said of it, None when not current or not known ("-").
_FIGURES = ("backlog_studies", "backlog_oldest_s", "urgent_oldest_s", "routine_oldest_s",
            "disk_used_percent", "cert_days_left", "failed_jobs", "backup_age_s")


def _not_current(row: dict[str, Any]) -> None:
    """A revoked or refused site's figures are its last heartbeat's, from before: not shown
    as if current (nor exported), its errors neither (a refused one's: the refusal)."""
    for key in _FIGURES:
        row[key] = None
    row["backup_stale"] = False
    if row["state"] == "revoked":
        row["errors"] = []
    row.setdefault("not_current", f"{row['state']}: its last heartbeat's figures, from "
                   "before, are not shown")


def _never_heard(site: str, since: float) -> dict[str, Any]:
    """The fleet row of a site enrolled (a valid certificate) that sent no heartbeat yet:
    "last seen" is its enrolment, so it goes down, and PasSiteSilent fires, five minutes
    after it if nothing comes. Its figures are unknown, not 0. (A refused site the
    database does not know: ``since`` is its first refusal.)"""
    return {"site": site, "first_seen_at": None, "last_seen_at": since,
            "last_sent_at": None, "version": None, "backlog_studies": None,
            "backlog_oldest_s": None, "urgent_oldest_s": None, "disk_used_percent": None,
            "cert_days_left": None, "failed_jobs": None, "errors": [], "routine_oldest_s": None,
            "last_backup_at": None, "backup_reported": False, "never_heard": True,
            "not_current": "no heartbeat yet"}


def refused_text(refusal: Refusal, at: float, fingerprint: bool = False) -> str:
    """What a refused site's row (and with ``fingerprint``, its page) says of it: which
    certificate, why, what to do, since when."""
    first = local_time(refusal.first_at)
    sha = f" (SHA-256 {refusal.fingerprint})" if fingerprint else ""
    return (f"refused: certificate {refusal.serial}{sha} "
            "unknown to this hub (enrolled after the restored backup?): issue a token and "
            f"enrol it again (pas hub token {refusal.site}, then pas enroll --replace at the "
            f"site); {counted(refusal.count, 'request')} refused since {first}, the last "
            f"{_age(max(at - refusal.last_at, 0.0))} ago")


def backup_age(row: dict[str, Any], at: float) -> float | None:
    """Seconds the site has gone without a backup: since its last one, or, never backed up,
    since the hub first heard it (a new site is not warned before its second night). None
    for an appliance too old to report its backups."""
    if not row["backup_reported"]:
        return None
    if row["last_backup_at"] is None:
        return max(at - row["first_seen_at"], 0.0)
    # The appliance's clock, read on the hub's with the offset of the same heartbeat (the
    # hub's receive time minus the appliance's sent time): an appliance hours ahead hid a
    # stale backup that long, one behind was warned that much early.
    offset = (row["last_seen_at"] - row["last_sent_at"]) \
        if row.get("last_sent_at") is not None else 0.0
    return max(at - (row["last_backup_at"] + offset), 0.0)


def has_problem(row: dict[str, Any]) -> bool:
    """What the alert rules would flag: down or refused, old backlog, disk, certificate,
    failed jobs, a backup older than two days."""
    if row["state"] == "revoked":
        return False
    cert = row["cert_days_left"]
    return (row["state"] in ("down", "refused") or (row["failed_jobs"] or 0) > 0
            or (row["urgent_oldest_s"] or 0) > 480
            or (row.get("routine_oldest_s") or 0) > 14400
            or (row["disk_used_percent"] or 0) > 85 or (cert is not None and cert < 30)
            or row.get("backup_stale", False) or bool(row["errors"]))


# --- HTML ------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#222}
h1{font-size:1.3em} table{border-collapse:collapse;width:100%;background:#fff;font-size:.9em}
th,td{padding:6px;border-bottom:1px solid #eee;text-align:left} th a{color:#225}
.up{background:#d4f5dc}.down,.refused{background:#fbd5d5}.enrolled{background:#e0ecff}.warn{background:#fff1c2}
.revoked{background:#e4e4e4;color:#555}
.state{padding:2px 8px;border-radius:10px} form{margin:8px 0} .wrap{overflow-x:auto}
svg{background:#fff;border:1px solid #ddd;max-width:100%}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def hub_backup_state(record: dict[str, Any], at: float) -> dict[str, Any]:
    """The hub's own last backup as the dashboard and ``/metrics`` say it: ``age_s`` from the
    last backup, or from ``since`` (when the hub began being watched) if never; ``stale``
    past the appliances' two days (:data:`BACKUP_STALE_AFTER_S`)."""
    counted_from = record["written_at"] if record["written_at"] is not None else record["since"]
    if counted_from is None:  # no record at all: unknown, said as a warning
        return {**record, "age_s": None, "stale": True}
    age = max(at - counted_from, 0.0)
    return {**record, "age_s": age, "stale": age > BACKUP_STALE_AFTER_S}


def _hub_backup_line(backup: dict[str, Any] | None) -> str:
    if backup is None:
        return ""
    # As the appliance's status page: "none yet" on a hub younger than two days (its timer
    # has not had its chance), "never" in the warning style once it has missed two runs.
    warn = " class=warn" if backup["stale"] else ""
    if backup["age_s"] is None:
        text = "unknown (no record in hub.sqlite: the next pas hub backup writes it)"
    elif backup["written_at"] is None:
        text = "never" if backup["stale"] else "none yet"
    else:
        text = f"{ago(backup['age_s'])}, {_esc(backup['folder'])}"
    return f"<p id=hub-backup><span{warn}>hub backup: {text}</span></p>"


def render_dashboard(rows: list[dict[str, Any]], sort: str, descending: bool, query: str,
                     state: str, hub_backup: dict[str, Any] | None = None) -> str:
    """The fleet table; ``hub_backup`` (:func:`hub_backup_state`) adds the line about the
    hub's own last backup above it."""
    if query:
        rows = [r for r in rows if query.lower() in r["site"].lower()]
    if state in ("up", "down", "revoked", "enrolled", "refused"):
        rows = [r for r in rows if r["state"] == state]
    elif state == "problems":
        rows = [r for r in rows if has_problem(r)]
    rows.sort(key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0),
              reverse=descending)
    up = sum(1 for r in rows if r["state"] == "up")
    out = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
           '<meta http-equiv="refresh" content="30">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>PAS fleet</title><style>{STYLE}</style></head><body>",
           f"<h1>PAS fleet <small id=summary>{up} up / {len(rows)} shown</small></h1>",
           _hub_backup_line(hub_backup),
           f'<form method=get><input name=q placeholder="site" value="{_esc(query)}"> '
           '<select name=state>'
           + "".join(f'<option value="{v}"{" selected" if v == state else ""}>{v or "all"}'
                     "</option>" for v in ("", "up", "down", "problems", "revoked",
                                           "enrolled", "refused"))
           + f'</select><input type=hidden name=sort value="{_esc(sort)}">'
           "<button type=submit>Filter</button></form>",
           "<div class=wrap><table id=fleet><tr>"]
    headings = [("site", "site"), ("state", "state"), ("last_seen_at", "last seen"),
                ("backlog_studies", "backlog"), ("backlog_oldest_s", "oldest"),
                ("disk_used_percent", "disk %"), ("version", "version"),
                ("cert_days_left", "cert days"), ("failed_jobs", "failed jobs"),
                ("backup_age_s", "last backup")]
    for key, label in headings:
        flip = "asc" if sort == key and descending else "desc"
        link = urlencode({"sort": key, "dir": flip, "q": query, "state": state})
        out.append(f'<th><a href="/fleet?{link}">{label}</a></th>')
    out.append("<th>errors</th></tr>")
    for r in rows:
        disk_class = " class=warn" if (r["disk_used_percent"] or 0) > 85 else ""
        cert = r["cert_days_left"]
        cert_class = " class=warn" if cert is not None and cert < 30 else ""
        oldest = r["backlog_oldest_s"]
        # A refused site the hub never took a request from: no "last seen" to say.
        seen = ("-" if r["state"] == "refused" and r.get("never_heard")
                else f'{_age(r["silent_s"])} ago')
        out.append(
            f'<tr data-site="{_esc(r["site"])}"><td><a href="/fleet/sites/{quote(r["site"])}">'
            f'{_esc(r["site"])}</a></td><td><span class="state {r["state"]}">{r["state"]}'
            f'</span></td><td>{seen}</td>'
            f'<td class=backlog>{_dash(r["backlog_studies"])}</td>'
            f'<td>{"-" if oldest is None else _age(oldest)}</td>'
            f'<td{disk_class}>{_dash(r["disk_used_percent"])}'
            f'</td><td>{_esc(r["version"] or "-")}</td>'
            f'<td{cert_class}>{"-" if cert is None else f"{cert:.0f}"}</td>'
            f'<td>{_dash(r["failed_jobs"])}</td>{_backup_cell(r)}{_errors_cell(r["errors"])}'
            "</tr>")
    if not rows:
        out.append("<tr><td colspan=11>no site</td></tr>")
    out.append("</table></div></body></html>")
    return "".join(out)


# The errors cell of the fleet table: the start of them; the whole in its title (hover) and
# on the site's page. It was cut at 300 characters mid-sentence, and shown nowhere whole.
ERRORS_SHOWN = 300


def _errors_cell(errors: list[str]) -> str:
    joined = "; ".join(errors)
    if len(joined) <= ERRORS_SHOWN:
        return f"<td>{_esc(joined)}</td>"
    return (f'<td title="{_esc(joined)}">{_esc(joined[:ERRORS_SHOWN])}… '
            f"({counted(len(errors), 'error')}: the site's page has them all)</td>")


def _dash(value: Any) -> str:
    """A figure of the table, "-" when not known or not current (None)."""
    return "-" if value is None else str(value)


def _backup_cell(row: dict[str, Any]) -> str:
    """The site's last backup: its age, "never", or "-" from an appliance too old to say
    (or a site not heard now: revoked, refused, never heard)."""
    if row["backup_age_s"] is None:
        why = row.get("not_current") or "not reported by this PAS version"
        return f'<td class=backup title="{_esc(why)}">-</td>'
    text = "never" if row["last_backup_at"] is None else ago(row["backup_age_s"])
    return f'<td class="backup{" warn" if row["backup_stale"] else ""}">{text}</td>'


# --- routes ----------------------------------------------------------------------------------


def fleet_routes(hub: Hub) -> list[BaseRoute]:
    """Route provider for :func:`appliance.hub.app.default_route_providers`."""
    from appliance.hub.app import BodyTooLarge, problem, read_body_limited

    gate = HeartbeatGate()
    registry = CollectorRegistry(auto_describe=False)
    from appliance.hub.fleet_metrics import FleetCollector  # it reads this module's site_rows

    registry.register(FleetCollector(hub, gate))
    from appliance.hub.fleet_site_page import render_enrolled, render_refused, render_site
    # What the status page has (appliance/web/headers.py): a site's heartbeat strings are
    # escaped, and a value that slipped through would still run no script here.
    headers = page_headers(STYLE)

    async def heartbeat(request: Request) -> Response:
        site = request.state.site
        # Before the body is read: a site posting in a loop costs a refusal, not a parse
        # and a commit (hub/fleet_gate.py).
        retry_after = gate.admit(site)
        if retry_after is not None:
            response = problem(429, "too_many_heartbeats",
                               f"site {site!r} posts heartbeats faster than the hub takes "
                               f"(one every {1 / gate.rate_per_s:g} s, {gate.burst:g} at "
                               f"once): retry in {retry_after} s")
            response.headers["Retry-After"] = str(retry_after)
            return response
        try:
            body = await read_body_limited(request, MAX_HEARTBEAT_BYTES, "heartbeat")
        except BodyTooLarge as exc:
            return exc.response
        try:
            beat = parse_heartbeat(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, HeartbeatError, too deep
            return problem(422, "bad_heartbeat", str(exc))
        if beat.get("site") not in (None, site):
            return problem(403, "wrong_site", f"certificate is for site {site!r}, "
                           f"heartbeat says {beat['site']!r}")
        created = await run_in_threadpool(store.record_heartbeat, hub.db, site, beat,
                                          HISTORY_EVERY_S)
        return JSONResponse({"site": site, "recorded": created}, status_code=201 if created
                            else 200)

    async def dashboard(request: Request) -> Response:
        sort = request.query_params.get("sort", "site")
        if sort not in SORT_KEYS:
            sort = "site"
        descending = request.query_params.get("dir", "asc") == "desc"
        rows = await run_in_threadpool(site_rows, hub.db, None,
                                       hub.refused_certificates.problems())
        backup = hub_backup_state(await run_in_threadpool(hub_backup_record, hub.db),
                                  time.time())
        return HTMLResponse(render_dashboard(rows, sort, descending,
                                             request.query_params.get("q", ""),
                                             request.query_params.get("state", ""), backup),
                            headers=headers)

    async def site_page(request: Request) -> Response:
        site = request.path_params["site"]
        status = await run_in_threadpool(store.site_status, hub.db, site)
        refusal = hub.refused_certificates.problems().get(site)
        if status is None:
            enrolled = (await run_in_threadpool(enrolled_sites, hub.db)).get(site)
            if enrolled is not None:
                return HTMLResponse(render_enrolled(site, enrolled, time.time(), refusal),
                                    headers=headers)
            if refusal is not None:  # enrolled after the backup this hub was restored from
                return HTMLResponse(render_refused(site, refusal, time.time()),
                                    headers=headers)
            return HTMLResponse(f"<p>unknown site {_esc(site)}</p>", status_code=404,
                                headers=headers)
        at = time.time()
        points, beats = await run_in_threadpool(store.history_by_slot, hub.db, site,
                                                at - 86400, CHART_SLOT_S)
        return HTMLResponse(render_site(site, status, points, at, beats, refusal),
                            headers=headers)

    async def scrape(_request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/api/v1/heartbeat", heartbeat, methods=["POST"]),
        Route("/", lambda _request: RedirectResponse("/fleet"), methods=["GET"]),
        Route("/fleet", dashboard, methods=["GET"]),
        Route("/fleet/sites/{site}", site_page, methods=["GET"]),
        Route("/metrics", scrape, methods=["GET"]),
    ]
