"""The fleet on the hub: heartbeats in, dashboard, site pages and fleet metrics out.

Owns: ``POST /api/v1/heartbeat`` (mutual TLS: the site is the certificate's, never the
body's), ``GET /fleet`` (one row per site, sortable and filterable by query string),
``GET /fleet/sites/{site}`` (24 h charts as inline SVG) and ``GET /metrics`` (fleet families
``pas_fleet_*`` for Prometheus, and the hub's own, read by :mod:`appliance.hub.fleet_metrics`;
the alert rules in ``image/monitoring/alerts.yml`` use them).
May not touch: SQL (``appliance.store.fleet``), transfers, the PKI.

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
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.hub.fleet_gate import HISTORY_EVERY_S, HeartbeatGate
from appliance.ops.backup import STALE_AFTER_S as BACKUP_STALE_AFTER_S
from appliance.store import fleet as store
from appliance.store.hub import enrolled_sites, hub_backup_record, revoked_sites
from appliance.web.headers import page_headers
from appliance.words import ago, counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

# The site page's charts: one point a minute at most (1,440 a day), whatever the heartbeats'
# rate (store.history_by_slot).
CHART_SLOT_S = 60.0
SILENT_AFTER_S = 300.0  # a site is "down" when no heartbeat arrived for 5 minutes
MAX_HEARTBEAT_BYTES = 64 * 1024
MAX_FUTURE_S = 86400.0
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
    for section, keys in (("backlog", ("studies", "bytes", "oldest_age_s",
                                       "urgent_oldest_age_s")),
                          ("jobs", ("failed",)), ("disk", ("used_percent",)),
                          ("received", ("instances", "bytes"))):
        part = beat.get(section)
        if not isinstance(part, dict):
            raise HeartbeatError(f"{section}: must be an object")
        for key in keys:
            _number(part.get(key), f"{section}.{key}")
    if beat["backlog"].get("routine_oldest_age_s") is not None:  # optional: older appliances
        _number(beat["backlog"]["routine_oldest_age_s"], "backlog.routine_oldest_age_s")
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


def site_rows(hub_db: Any, at: float | None = None) -> list[dict[str, Any]]:
    """Every site's latest state; ``state`` is ``up``, ``down`` (silent past
    :data:`SILENT_AFTER_S`; a site enrolled that never sent a heartbeat counts from its
    enrolment), ``enrolled`` (no heartbeat yet, enrolled less than that ago) or
    ``revoked`` (``pas hub revoke``: its silence is expected, no problem, and
    :class:`~appliance.hub.fleet_metrics.FleetCollector` exports no series for it, so
    that PasSiteSilent and the other rules do not fire for a closed site for ever)."""
    at = time.time() if at is None else at
    rows = store.list_sites(hub_db)
    revoked = revoked_sites(hub_db)
    heard = {row["site"] for row in rows}
    # Enrolled, never heard: it was on no page and in no series, so an appliance that never
    # came up (or cannot reach the hub) was never shown down and PasSiteSilent never fired.
    for site, enrolled_at in sorted(enrolled_sites(hub_db).items()):
        if site not in heard:
            rows.append(_never_heard(site, enrolled_at))
    for row in rows:
        row["silent_s"] = max(at - row["last_seen_at"], 0.0)
        row["state"] = ("revoked" if row["site"] in revoked
                        else "enrolled" if row.get("never_heard")
                        and row["silent_s"] <= SILENT_AFTER_S
                        else "up" if row["silent_s"] <= SILENT_AFTER_S else "down")
        if row.get("never_heard") and row["state"] == "down":
            row["errors"] = [f"no heartbeat since its enrolment, {_age(row['silent_s'])} ago: "
                             "its appliance is not running or cannot reach the hub"]
        row["backup_age_s"] = backup_age(row, at)
        row["backup_stale"] = (row["backup_age_s"] is not None
                               and row["backup_age_s"] > BACKUP_STALE_AFTER_S)
    return rows


def _never_heard(site: str, enrolled_at: float) -> dict[str, Any]:
    """The fleet row of a site enrolled (a valid certificate) that sent no heartbeat yet:
    "last seen" is its enrolment, so it goes down, and PasSiteSilent fires, five minutes
    after it if nothing comes."""
    return {"site": site, "first_seen_at": None, "last_seen_at": enrolled_at,
            "last_sent_at": None, "version": None, "backlog_studies": 0,
            "backlog_oldest_s": 0.0, "urgent_oldest_s": 0.0, "disk_used_percent": None,
            "cert_days_left": None, "failed_jobs": 0, "errors": [], "routine_oldest_s": None,
            "last_backup_at": None, "backup_reported": False, "never_heard": True}


def backup_age(row: dict[str, Any], at: float) -> float | None:
    """Seconds the site has gone without a backup: since its last one, or, never backed up,
    since the hub first heard it (a new site is not warned before its second night). None
    for an appliance too old to report its backups."""
    if not row["backup_reported"]:
        return None
    since = row["last_backup_at"] if row["last_backup_at"] is not None else row["first_seen_at"]
    return max(at - since, 0.0)


def has_problem(row: dict[str, Any]) -> bool:
    """What the alert rules would flag: down, old backlog, disk, certificate, failed jobs,
    a backup older than two days."""
    if row["state"] == "revoked":
        return False
    cert = row["cert_days_left"]
    return (row["state"] == "down" or row["failed_jobs"] > 0 or row["urgent_oldest_s"] > 480
            or (row.get("routine_oldest_s") or 0) > 14400
            or (row["disk_used_percent"] or 0) > 85 or (cert is not None and cert < 30)
            or row.get("backup_stale", False) or bool(row["errors"]))


# --- HTML ------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#222}
h1{font-size:1.3em} table{border-collapse:collapse;width:100%;background:#fff;font-size:.9em}
th,td{padding:6px;border-bottom:1px solid #eee;text-align:left} th a{color:#225}
.up{background:#d4f5dc}.down{background:#fbd5d5}.enrolled{background:#e0ecff}.warn{background:#fff1c2}
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
    if state in ("up", "down", "revoked", "enrolled"):
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
                                           "enrolled"))
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
        out.append(
            f'<tr data-site="{_esc(r["site"])}"><td><a href="/fleet/sites/{quote(r["site"])}">'
            f'{_esc(r["site"])}</a></td><td><span class="state {r["state"]}">{r["state"]}'
            f'</span></td><td>{_age(r["silent_s"])} ago</td>'
            f'<td class=backlog>{r["backlog_studies"]}</td><td>{_age(r["backlog_oldest_s"])}</td>'
            f'<td{disk_class}>{"-" if r["disk_used_percent"] is None else r["disk_used_percent"]}'
            f'</td><td>{_esc(r["version"] or "-")}</td>'
            f'<td{cert_class}>{"-" if cert is None else f"{cert:.0f}"}</td>'
            f'<td>{r["failed_jobs"]}</td>{_backup_cell(r)}{_errors_cell(r["errors"])}</tr>')
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


def _backup_cell(row: dict[str, Any]) -> str:
    """The site's last backup: its age, "never", or "-" from an appliance too old to say."""
    if row["backup_age_s"] is None:
        return '<td class=backup title="not reported by this PAS version">-</td>'
    text = "never" if row["last_backup_at"] is None else ago(row["backup_age_s"])
    return f'<td class="backup{" warn" if row["backup_stale"] else ""}">{text}</td>'


def _errors_list(errors: list[str]) -> str:
    """The site's last heartbeat's errors, each whole (the fleet table shows their start)."""
    if not errors:
        return "<p id=errors>no error</p>"
    return ("<h2>errors (last heartbeat)</h2><ul id=errors>"
            + "".join(f"<li>{_esc(error)}</li>" for error in errors) + "</ul>")


def render_enrolled(site: str, enrolled_at: float, at: float) -> str:
    """The page of a site enrolled that sent no heartbeat yet (it was a 404 "unknown site"
    while ``pas hub sites`` listed its certificate)."""
    when = datetime.fromtimestamp(enrolled_at).strftime("%Y-%m-%d %H:%M:%S")
    return "".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="refresh" content="30">',
        f"<title>PAS {_esc(site)}</title><style>{STYLE}</style></head><body>",
        f'<p><a href="/fleet">fleet</a></p><h1>{_esc(site)}</h1>',
        f"<p id=facts>enrolled {when} ({_age(max(at - enrolled_at, 0.0))} ago); no heartbeat "
        "yet: its appliance sends one every 30 s once running and reaching the hub</p>",
        "</body></html>"])


def _backup_fact(status: dict[str, Any], at: float) -> str:
    if "last_backup_at" not in status:  # an appliance too old to report it
        return ""
    last = status["last_backup_at"]
    return " · last backup " + ("never" if last is None else ago(max(at - last, 0.0)))


def svg_chart(points: list[tuple[float, float]], since: float, until: float, title: str,
              width: int = 640, height: int = 160) -> str:
    """A line chart of (time, value) over [since, until], with the max value labelled."""
    top = max((v for _, v in points), default=0.0) or 1.0
    span = max(until - since, 1.0)

    def xy(t: float, v: float) -> str:
        x = 40 + (t - since) / span * (width - 50)
        y = height - 20 - v / top * (height - 40)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(t, v) for t, v in points)
    return (f'<svg role=img aria-label="{_esc(title)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}"><text x="40" y="14" font-size="12">'
            f'{_esc(title)} (max {top:g})</text>'
            f'<line x1="40" y1="{height - 20}" x2="{width - 10}" y2="{height - 20}" '
            'stroke="#999"/>'
            f'<text x="40" y="{height - 4}" font-size="10">-24 h</text>'
            f'<text x="{width - 40}" y="{height - 4}" font-size="10">now</text>'
            f'<polyline fill="none" stroke="#2a6fdb" stroke-width="2" points="{line}"/></svg>')


def render_site(site: str, status: dict[str, Any], points: list[dict[str, Any]],
                at: float, beats: int | None = None) -> str:
    """``points``: the 24 h history, one per slot (store.history_by_slot) or one per
    heartbeat; ``beats``: how many heartbeats they are (default: one each)."""
    since = at - 86400
    backlog = [(p["received_at"], float(p["backlog_studies"])) for p in points]
    throughput = []
    for before, after in zip(points, points[1:], strict=False):
        elapsed = after["received_at"] - before["received_at"]
        delta = after["received_bytes"] - before["received_bytes"]
        if elapsed > 0 and delta >= 0:
            throughput.append((after["received_at"], round(delta / elapsed / 1e6, 3)))
    seen = datetime.fromtimestamp(status["last_seen_at"]).strftime("%Y-%m-%d %H:%M:%S")
    return "".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="refresh" content="30">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>PAS {_esc(site)}</title><style>{STYLE}</style></head><body>",
        f'<p><a href="/fleet">fleet</a></p><h1>{_esc(site)}</h1>',
        f"<p id=facts>version {_esc(status['version'])} · last seen {seen} · backlog "
        f"{counted(status['backlog']['studies'], 'study', 'studies')} · disk "
        f"{status['disk']['used_percent']} % · "
        f"{counted(status['received']['instances'], 'instance')} received · "
        f"{counted(len(points) if beats is None else beats, 'heartbeat')} in 24 h"
        f"{_backup_fact(status, at)} · failed jobs "
        f"{(status.get('jobs') or {}).get('failed', 0)}</p>",
        _errors_list(status.get("errors") or []),
        svg_chart(backlog, since, at, "backlog (studies)"), "<br>",
        svg_chart(throughput, since, at, "received (MB/s)"),
        "</body></html>",
    ])


# --- routes ----------------------------------------------------------------------------------


def fleet_routes(hub: Hub) -> list[BaseRoute]:
    """Route provider for :func:`appliance.hub.app.default_route_providers`."""
    from appliance.hub.app import BodyTooLarge, problem, read_body_limited

    gate = HeartbeatGate()
    registry = CollectorRegistry(auto_describe=False)
    from appliance.hub.fleet_metrics import FleetCollector  # it reads this module's site_rows

    registry.register(FleetCollector(hub, gate))
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
        rows = await run_in_threadpool(site_rows, hub.db)
        backup = hub_backup_state(await run_in_threadpool(hub_backup_record, hub.db),
                                  time.time())
        return HTMLResponse(render_dashboard(rows, sort, descending,
                                             request.query_params.get("q", ""),
                                             request.query_params.get("state", ""), backup),
                            headers=headers)

    async def site_page(request: Request) -> Response:
        site = request.path_params["site"]
        status = await run_in_threadpool(store.site_status, hub.db, site)
        if status is None:
            enrolled = (await run_in_threadpool(enrolled_sites, hub.db)).get(site)
            if enrolled is not None:
                return HTMLResponse(render_enrolled(site, enrolled, time.time()),
                                    headers=headers)
            return HTMLResponse(f"<p>unknown site {_esc(site)}</p>", status_code=404,
                                headers=headers)
        at = time.time()
        points, beats = await run_in_threadpool(store.history_by_slot, hub.db, site,
                                                at - 86400, CHART_SLOT_S)
        return HTMLResponse(render_site(site, status, points, at, beats), headers=headers)

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
