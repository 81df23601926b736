"""The appliance's operations routes: the local status page at ``/``, ``/metrics``, and the
retry button.

What hospital IT must not miss comes first: a damaged index (:mod:`appliance.ops.index_check`:
a red banner with the fix, in ``pas status``'s words, shown even when the damage stops the
page's reads of the store) and the last backup's age (:func:`appliance.ops.backup.backup_state`,
what ``pas doctor`` judges: warning style past two days, or none ever on an older index).

Owns: the HTML hospital IT reads on a phone or a desk, and the Prometheus endpoint. Both are
server-rendered from the store at request time (the page refreshes itself every 10 s). May
not touch: state, except the retry button, which calls :func:`appliance.store.jobs.retry`.
With ``serving.auth`` set, every route needs the credentials (appliance/web/auth.py) and the
retry POST must also carry the page's form token; whatever the auth, a browser's retry POST
must come from the page's own origin.
"""

from __future__ import annotations

import functools
import html
import secrets
import sqlite3
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.ops import index_check, metrics
from appliance.ops.status import collect, human_size
from appliance.store import jobs as job_store
from appliance.store import ops as ops_store
from appliance.web.auth import FormToken, same_origin
from appliance.web.body import BodyTooLarge, read_body_limited
from appliance.web.headers import page_headers
from appliance.words import ago, appliance_title, counted

if TYPE_CHECKING:
    from appliance.daemon import Daemon

REFRESH_S = 10
# The Retry form is one field (the page's token, 43 characters) plus whatever a browser
# adds: a body over this is refused with 413 unread (invariant 8).
MAX_RETRY_FORM_BYTES = 4096

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#222}
h1{font-size:1.3em;margin:0 0 8px} h2{font-size:1.05em;margin:18px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px #0002;
 min-width:130px;flex:1}
.card b{display:block;font-size:1.4em}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9em}
th,td{padding:6px;border-bottom:1px solid #eee;text-align:left}
.wrap{overflow-x:auto}
.state{padding:2px 8px;border-radius:10px;font-size:.85em;white-space:nowrap}
.up,.confirmed,.delivered{background:#d4f5dc} .down,.failed{background:#fbd5d5}
.sending{background:#dbe8ff} .received,.stable,.unknown{background:#eee}
.warn{background:#fff1c2} .fresh{background:#d4f5dc}
.alarm{background:#fbd5d5;border:2px solid #b00;border-radius:8px;padding:10px 14px;
 margin:0 0 10px;word-break:break-word} .alarm b{display:block;font-size:1.2em;color:#900}
button{padding:6px 12px;border-radius:6px;border:1px solid #888;background:#fff}
small{color:#666} .card .state{white-space:normal;display:inline-block} td.t{white-space:nowrap}
@media (max-width:600px){.wide{display:none} th,td{padding:4px} td{word-break:break-word}
 table{font-size:.8em}}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))




def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%d/%m %H:%M:%S") if timestamp else "-"


def _short_when(timestamp: float | None) -> str:
    """Time only for today's studies (a phone's width is precious), else day and month."""
    if not timestamp:
        return "-"
    moment = datetime.fromtimestamp(timestamp)
    same_day = moment.date() == datetime.now().date()
    return moment.strftime("%H:%M" if same_day else "%d/%m %H:%M")


def enrolled_site(daemon: Daemon) -> str | None:
    """The site name the hub knows this appliance by (its certificate's), when enrolled."""
    from appliance.transfer.enrolment import EnrolmentError, load_enrolment

    try:
        enrolment = load_enrolment(daemon.settings.home)
    except EnrolmentError:
        return None
    return enrolment.site if enrolment else None


def link_state(daemon: Daemon) -> tuple[str, str]:
    """(css class, text) for the hub link."""
    if not (daemon.settings.home / "pki" / "hub.json").exists():
        return "unknown", "not enrolled"
    link = metrics.HUB_LINK
    if link.up is None:
        return "unknown", "enrolled, not contacted yet"
    if link.up:
        return "up", f"up (last contact {_age(time.time() - (link.last_success or 0))} ago)"
    return "down", f"down: {link.last_error or 'no answer'}"


def _links_section(links: dict[str, dict[str, Any]]) -> list[str]:
    """Each destination's delivery link as the uplink last saw it (store/uplink.py)."""
    if not links:
        return []
    out = ["<h2>Destinations</h2><div class=wrap><table id=links><tr><th>destination</th>"
           "<th>link</th><th>last good contact</th><th>last error</th></tr>"]
    for name, link in sorted(links.items()):
        state = "up" if link.get("state") == "up" else "down"
        since = (f" since {_when(link['unreachable_since'])}"
                 if link.get("unreachable_since") else "")  # a local destination's outage
        out.append(f'<tr data-destination="{_esc(name)}"><td>{_esc(name)}</td>'
                   f'<td><span class="state {state}">{state}</span>{since}</td>'
                   f"<td>{_when(link.get('last_ok_at'))}</td>"
                   f"<td>{_esc((link.get('last_error') or '')[:200])}</td></tr>")
    out.append("</table></div>")
    return out


def _commitment_section(reports: dict[str, Any]) -> list[str]:
    """Per modality AE, the Storage Commitment reports it still waits for and why: the
    modality deletes nothing until it hears, so its disk is what fills."""
    if not reports["by_ae"]:
        return []
    out = ["<h2>Storage Commitment reports pending</h2><div class=wrap>"
           "<table id=commitment-reports><tr><th>modality AE</th><th>reports</th>"
           "<th>oldest</th><th>attempts</th><th>last error</th></tr>"]
    for row in reports["by_ae"]:
        out.append(f"<tr data-ae=\"{_esc(row['calling_ae'])}\"><td>{_esc(row['calling_ae'])}"
                   f"</td><td>{row['pending']}</td><td>{_age(row['oldest_age_s'])}</td>"
                   f"<td>{row['attempts']}</td>"
                   f"<td>{_esc((row['last_error'] or '')[:200])}</td></tr>")
    out.append("</table></div>")
    return out


def index_damage(daemon: Daemon) -> index_check.IndexCheck | None:
    """The daemon's last integrity check when it found the index damaged (this process's,
    else the one recorded in the home), else None."""
    checked = index_check.latest() or index_check.load(daemon.settings.home)
    return checked if checked is not None and checked.damaged else None


def _damage_banner(checked: index_check.IndexCheck) -> str:
    """First on the page, in the words of ``pas status`` (the damage, then the fix)."""
    return (f'<div class=alarm id=index-damaged role=alert><b>Index database damaged</b>'
            f"{_esc(checked.message())} <small>(found {_when(checked.checked_at)})</small>"
            "</div>")


def _backup_card(state: dict[str, Any]) -> str:
    """The last backup's age, judged as ``pas doctor`` judges it."""
    if state["last_at"] is not None:
        css = "warn" if state["stale"] else "fresh"
        text, detail = ago(state["age_s"]), _esc(state["folder"])
        if state.get("restored_at") is not None:  # this index is that backup, put back
            detail += f" (restored from it {_when(state['restored_at'])})"
    elif state["stale"]:
        css, text = "warn", "never"
        detail = "systemctl status pas-backup.timer"
    else:
        # pas-backup.timer exists on the appliance image only (a demo or a laptop has none).
        css, text, detail = ("unknown", "none yet",
                             "pas-backup.timer writes one nightly; by hand: pas backup FOLDER")
    return (f'<div class="card" id="backup">Last backup<b><span class="state {css}">{text}'
            f"</span></b>{detail}</div>")


def _disk_card(disk: dict[str, Any], alert: str | None) -> str:
    """Free space, and the daemon's disk alert in warning style: above the high watermark
    with nothing evictable, or near the limit where C-STOREs are refused (0xA700). The page
    showed only the file system's figures, which look fine under a full spool quota."""
    figures = (f"{human_size(disk['free_bytes'])} free · "
               f"spool {human_size(disk['spool_bytes'])}")
    if alert is None:
        return f'<div class="card" id="disk">Disk<b>{disk["used_percent"]} %</b>{figures}</div>'
    return (f'<div class="card" id="disk">Disk<b><span class="state warn">'
            f'{disk["used_percent"]} %</span></b>{figures}'
            f'<br><span id="disk-alert">{_esc(alert)}</span></div>')


def _cache_card(snapshot: dict[str, Any], has_region: bool = True) -> str:
    """The cache's figures, and its files flagged missing in warning style (a lost disk
    under a restored index, files removed by hand): their studies are served partly when
    the region cannot give them back, and the page said nothing of it. ``has_region``:
    enrolled, or a DICOMweb region configured; without one, "pas verify --repair fetches
    them from the region" promised what cannot happen: their modality must send them."""
    card = (f'<div class="card" id="cache">Cache<b>'
            f'{counted(snapshot["studies"], "study", "studies")}</b>'
            f"{counted(snapshot['instances'], 'instance')} · "
            f"{snapshot['confirmed_instances']} confirmed")
    issues = snapshot["cache"]["integrity_issues"]
    missing = issues.get("missing", 0)
    back = ("pas verify --repair fetches the confirmed ones from the region" if has_region
            else "no region to fetch them from: send their studies again from the modality")
    if missing:
        card += (f'<br><span class="state warn" id="files-missing">'
                 f"{counted(missing, 'file')} missing</span> (pas cache status; {back})")
    damaged = issues.get("size_mismatch", 0) + issues.get("hash_mismatch", 0)
    if damaged:  # the scrub's or pas verify's finding: bytes no longer those received
        card += (f'<br><span class="state warn" id="files-damaged">'
                 f"{counted(damaged, 'file')} damaged</span> (pas cache status; {back})")
    return card + "</div>"


def _unreadable_row(columns: int, error: str) -> str:
    return (f"<tr class=unreadable><td colspan={columns}>cannot be read from the index: "
            f"{_esc(error)}</td></tr>")


def _unreadable_page(daemon: Daemon, damaged: index_check.IndexCheck | None,
                     exc: sqlite3.DatabaseError) -> str:
    """What the page can still say when the store cannot be read: the damage and its fix
    (the index check's file, not the store), the hub link, and the error met."""
    link_class, link_text = link_state(daemon)
    site = enrolled_site(daemon) or daemon.settings.site
    return "".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(appliance_title(site))}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_esc(appliance_title(site))}</h1>",
        _damage_banner(damaged) if damaged is not None else "",
        f'<div class=alarm id=store-unreadable><b>The index cannot be read</b>{_esc(exc)}: '
        "the figures of this page are unavailable; pas doctor says what to do</div>",
        f'<div class="cards"><div class="card" id="link">Hub link<b><span class="state '
        f'{link_class}">{_esc(link_text)}</span></b></div></div>',
        f"<p><small>refreshed {_when(time.time())} · every {REFRESH_S} s</small></p>",
        "</body></html>"])


def render_page(daemon: Daemon, form_token: FormToken | None = None) -> str:
    """The page; ``form_token`` (when auth is on) goes into each form as a hidden field."""
    damaged = index_damage(daemon)
    try:
        snapshot = collect(daemon.settings, daemon.db)
    except sqlite3.DatabaseError as exc:  # a damaged page met: say what can still be said
        index_check.suspect(exc)  # SQLITE_CORRUPT: the index is checked soon
        return _unreadable_page(daemon, damaged, exc)
    # Each table on its own: a damaged page under one (the instances: the recent studies)
    # leaves the cards and the others readable. Before, any of them failing was a 500.
    unreadable: dict[str, str] = {}

    def read(what: str, reader: Any) -> Any:
        try:
            return reader()
        except sqlite3.DatabaseError as exc:
            index_check.suspect(exc)
            unreadable[what] = str(exc)
            return None

    studies = read("studies", lambda: ops_store.recent_studies(daemon.db, 20)) or []
    failed = read("failed", lambda: job_store.list_jobs(daemon.db, "failed", 50)) or []
    prefetch = read("prefetch", lambda: ops_store.prefetch_queue(daemon.db))
    link_class, link_text = link_state(daemon)
    site = enrolled_site(daemon) or snapshot["site"]
    backlog_studies = snapshot["backlog_studies"]  # each once, whatever its destinations
    oldest = max((row["oldest_age_s"] for row in snapshot["backlog"]), default=None)
    disk = snapshot["disk"]
    reports = snapshot["commitment"]
    hidden = (f'<input type=hidden name="{form_token.field}" value="{_esc(form_token.value)}">'
              if form_token else "")
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(appliance_title(site))}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_esc(appliance_title(site))} <small>AE {_esc(snapshot['ae_title'])} · "
        f"v{_esc(snapshot['version'])}</small></h1>",
        _damage_banner(damaged) if damaged is not None else "",
        '<div class="cards">',
        f'<div class="card" id="link">Hub link<b><span class="state {link_class}">'
        f"{_esc(link_text)}</span></b></div>",
        f'<div class="card" id="backlog">Backlog<b>'
        f'{counted(backlog_studies, "study", "studies")}</b>oldest {_age(oldest)}</div>',
        f'<div class="card" id="commitment">Commitment reports<b>'
        f'{reports["pending"]} pending</b>oldest {_age(reports["oldest_age_s"])} · '
        f'given up {reports["given_up_24h"]} (24 h)</div>',
        _disk_card(disk, snapshot["cache"]["disk_alert"]),
        _cache_card(snapshot, enrolled_site(daemon) is not None
                    or bool(daemon.settings.prefetch.dicomweb_url)),
        _backup_card(snapshot["backup"]),
        "</div>",
        *_links_section(snapshot.get("links") or {}),
        *_commitment_section(reports),
        "<h2>Recent studies</h2><div class=wrap><table id=studies><tr><th>time</th>"
        "<th>patient</th><th>study</th><th class=wide>mod.</th><th>images</th>"
        "<th>state</th></tr>",
    ]
    for study in studies:
        out.append(
            f"<tr data-study-uid=\"{_esc(study['study_uid'])}\"><td class=t>"
            f"{_short_when(study['last_received_at'])}</td><td>{_esc(study['patient_id'])}</td>"
            f"<td>{_esc(study['description'] or study['study_uid'])}</td>"
            f"<td class=wide>{_esc(study['modalities'])}</td>"
            f"<td>{study['confirmed']}/{study['instances']}</td>"
            f"<td><span class=\"state {study['state']}\">{study['state']}</span></td></tr>")
    if "studies" in unreadable:
        out.append(_unreadable_row(6, unreadable["studies"]))
    elif not studies:
        out.append("<tr><td colspan=6>no study yet</td></tr>")
    out.append("</table></div><h2>Failed jobs</h2><div class=wrap><table id=failed-jobs>"
               "<tr><th>job</th><th>destination</th><th>study</th><th>attempts</th>"
               "<th>error</th><th></th></tr>")
    for job in failed:
        out.append(
            f"<tr data-job-id=\"{job['id']}\"><td>{job['id']}</td>"
            f"<td>{_esc(job['destination'])}</td><td>{_esc(job['study_uid'])}</td>"
            f"<td>{job['attempts']}</td><td>{_esc((job['last_error'] or '')[:200])}</td>"
            f"<td><form method=post action=\"/jobs/{job['id']}/retry\">{hidden}"
            f"<button type=submit>Retry</button></form></td></tr>")
    if "failed" in unreadable:
        out.append(_unreadable_row(6, unreadable["failed"]))
    elif not failed:
        out.append("<tr><td colspan=6>none</td></tr>")
    out.append("</table></div>")
    if "prefetch" in unreadable:
        out.append("<h2>Prefetch queue</h2><div class=wrap><table id=prefetch>"
                   f"{_unreadable_row(4, unreadable['prefetch'])}</table></div>")
    if prefetch is not None:
        out.append("<h2>Prefetch queue</h2>")
        out.append(_prefetch_trouble(snapshot.get("prefetch")))
        out.append("<div class=wrap><table id=prefetch><tr>"
                   "<th>request</th><th>patient</th><th>due</th><th>state</th></tr>")
        for request in prefetch:
            out.append(
                f"<tr><td>{_esc(request.get('id'))}</td><td>{_esc(request.get('patient_id'))}"
                f"</td><td>{_when(request.get('due_at') or request.get('scheduled_for'))}</td>"
                f"<td>{_esc(_prefetch_state(request))}</td></tr>")
        if not prefetch:
            out.append("<tr><td colspan=4>empty</td></tr>")
        out.append("</table></div>")
    out.append(f"<p><small>refreshed {_when(time.time())} · every {REFRESH_S} s · "
               '<a href="/metrics">metrics</a> · <a href="/api/status">JSON</a></small></p>'
               "</body></html>")
    return "".join(out)


def _prefetch_trouble(summary: dict[str, Any] | None) -> str:
    """What ``pas status`` says of the prefetch when something is wrong, above its table:
    the page listed "37 P10001 ... pending" rows while the region was unreachable and an
    exam's priors late, and said neither."""
    if not summary:
        return ""
    said = []
    if summary.get("waiting_for_link"):
        said.append(f"{counted(summary['waiting_for_link'], 'request')} waiting for the "
                    f"link to the region since {_when(summary.get('waiting_since'))}"
                    + (f": {_esc(summary['link_error'])}" if summary.get("link_error")
                       else ""))
    if summary.get("late"):
        said.append(f"{counted(summary['late'], 'request')} late: the exam time passed, the "
                    "priors not on site")
    if summary.get("failed_24h"):
        said.append(f"{counted(summary['failed_24h'], 'request')} failed in the last 24 h"
                    + (f": {_esc(summary['last_failure'])}" if summary.get("last_failure")
                       else ""))
    return "".join(f'<p id=prefetch-trouble><span class="state down">{text}</span></p>'
                   for text in said)


def _prefetch_state(request: dict[str, Any]) -> str:
    """A request's state as ``pas prefetch list`` would say why it waits."""
    state = str(request.get("state"))
    if state in ("pending", "running") and str(request.get("last_error") or "").startswith(
            "waiting for the link"):  # running: tried again, still waiting
        state += ": waiting for the link"
    scheduled = request.get("scheduled_at")
    if request.get("state") in ("pending", "running") and scheduled and scheduled < time.time():
        state += " (late)"
    return state


def routes(daemon: Daemon) -> list[BaseRoute]:
    """Route provider for :func:`appliance.web.app.build_app`."""
    registry = metrics.build_registry(daemon.settings, daemon.db)
    # With auth on, the browser may add credentials to a request another site makes (a
    # client certificate, a header added by a proxy): the retry POST needs the page's token.
    # auth = "none" (the demo, a trusted VLAN) keeps the plain form; the Origin check stays.
    form_token = FormToken() if daemon.settings.serving.auth != "none" else None

    headers = page_headers(STYLE)  # no script, no frame of another site (web/headers.py)

    async def page(_request: Request) -> HTMLResponse:
        return HTMLResponse(await run_in_threadpool(render_page, daemon, form_token),
                            headers=headers)

    async def scrape(_request: Request) -> Response:
        body = await run_in_threadpool(metrics.render, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def retry(request: Request) -> Response:
        # Another site's page must not make a browser post it, credentials or not: with
        # auth = "none" the browser of anyone on the appliance's network would.
        allowed = same_origin(request)
        if allowed and form_token is not None:
            try:  # the form is one token field: a body of any size was read whole
                raw_form = await read_body_limited(request, MAX_RETRY_FORM_BYTES, "retry form")
            except BodyTooLarge as exc:
                return PlainTextResponse(f"refused: {exc}", status_code=413)
            form = parse_qs(raw_form.decode("utf-8", "replace"))
            allowed = form_token.matches((form.get(form_token.field) or [None])[0])
        if not allowed:
            return PlainTextResponse("refused: use the Retry button of the status page "
                                     "(or `pas queue retry ID`)", status_code=403)
        raw = request.path_params["job_id"]
        if not (raw.isascii() and raw.isdigit()):  # "\u00b2".isdigit(), and int() raises
            return PlainTextResponse(f"job id must be a number, got {raw!r}", status_code=400)
        # In the audit trail (a resend of patient data): who, as the DICOMweb rows name
        # a bearer token (its place in serving.bearer_tokens), and from where.
        actor = _requester(request, daemon.settings.serving.bearer_tokens
                           if daemon.settings.serving.auth == "bearer" else [])
        source = request.client.host if request.client else None
        if not await run_in_threadpool(functools.partial(
                job_store.retry, daemon.db, int(raw), actor=actor, source=source)):
            reason = await run_in_threadpool(job_store.why_not_retried, daemon.db, int(raw))
            return PlainTextResponse(reason, status_code=404)
        return RedirectResponse("/", status_code=303)

    return [
        Route("/", page),
        Route("/metrics", scrape),
        Route("/jobs/{job_id}/retry", retry, methods=["POST"]),
    ]


def _requester(request: Request, tokens: list[str]) -> str:
    """Who made a request, for the audit trail: the bearer token it carries, named by its
    place in ``serving.bearer_tokens`` (``bearer:token-2``, as the DICOMweb rows name it:
    never the token or a hash of it), else ``anonymous`` (``serving.auth`` none or
    client_cert; the row's source says from where)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not tokens:
        return "anonymous"
    matches = [secrets.compare_digest(token.strip().encode(), known.encode())
               for known in tokens]  # every token compared: the time says nothing of which
    return f"bearer:token-{matches.index(True) + 1}" if any(matches) else "anonymous"
