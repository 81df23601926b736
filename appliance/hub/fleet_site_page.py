"""A site's page of the fleet dashboard (``GET /fleet/sites/{site}``): its facts, its last
heartbeat's errors whole, 24 h charts as inline SVG; or, for a site not heard yet, what the
hub knows of it (enrolled; refused for a certificate it does not know).

Owns: the HTML of those pages. May not touch: SQL, the routes (served by
:func:`appliance.hub.fleet.fleet_routes`, which imports this module when it builds them).

Taken out of ``fleet.py`` (600 lines with the refused sites) so that it holds the
heartbeats, the dashboard's rows and its table, and this module the site's own page.
"""

from __future__ import annotations

from typing import Any

from appliance.hub.fleet import STYLE, _age, _esc, refused_text
from appliance.hub.fleet_refused import Refusal
from appliance.words import ago, counted, local_time


def _errors_list(errors: list[str]) -> str:
    """The site's last heartbeat's errors, each whole (the fleet table shows their start)."""
    if not errors:
        return "<p id=errors>no error</p>"
    return ("<h2>errors (last heartbeat)</h2><ul id=errors>"
            + "".join(f"<li>{_esc(error)}</li>" for error in errors) + "</ul>")


def _page_head(site: str) -> str:
    """A site page's head, its title and the way back to the fleet (refreshed every 30 s)."""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta http-equiv="refresh" content="30">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>PAS {_esc(site)}</title><style>{STYLE}</style></head><body>"
            f'<p><a href="/fleet">fleet</a></p><h1>{_esc(site)}</h1>')


def render_enrolled(site: str, enrolled_at: float, at: float,
                    refusal: Refusal | None = None) -> str:
    """The page of a site enrolled that sent no heartbeat yet (it was a 404 "unknown site"
    while ``pas hub sites`` listed its certificate)."""
    when = local_time(enrolled_at)
    return "".join([
        _page_head(site), _refused(refusal, at),
        f"<p id=facts>enrolled {when} ({_age(max(at - enrolled_at, 0.0))} ago); no heartbeat "
        "yet: its appliance sends one every 30 s once running and reaching the hub</p>",
        "</body></html>"])


def render_refused(site: str, refusal: Refusal, at: float) -> str:
    """The page of a site this hub's database does not know whose requests it refuses for
    a certificate its CA signed (enrolled after the backup restored): the dashboard's row
    links here, and it was a 404 "unknown site"."""
    return "".join([
        _page_head(site), _refused(refusal, at),
        f"<p id=facts>no request of this site taken by this hub; the last one refused: "
        f"{_esc(refusal.request)} from {_esc(refusal.client)}</p>",
        "</body></html>"])


def _refused(refusal: Refusal | None, at: float) -> str:
    """The refusal, above a site page's facts (:func:`appliance.hub.fleet.refused_text`)."""
    if refusal is None:
        return ""
    return f'<p id=refused><span class="state refused">{_esc(refused_text(refusal, at, True))}' \
           "</span></p>"


def _backup_fact(status: dict[str, Any], at: float) -> str:
    if "last_backup_at" not in status:  # an appliance too old to report it
        return ""
    last = status["last_backup_at"]
    if last is None:
        return " · last backup never"
    # On the hub's clock, as the dashboard's (fleet.backup_age): the heartbeat's own offset.
    offset = status["last_seen_at"] - status.get("sent_at", status["last_seen_at"])
    return " · last backup " + ago(max(at - (last + offset), 0.0))


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
                at: float, beats: int | None = None, refusal: Refusal | None = None) -> str:
    """``points``: the 24 h history, one per slot (store.history_by_slot) or one per
    heartbeat; ``beats``: how many heartbeats they are (default: one each); ``refusal``:
    its requests are refused now (its facts are then its last heartbeat's, dated)."""
    since = at - 86400
    backlog = [(p["received_at"], float(p["backlog_studies"])) for p in points]
    throughput = []
    for before, after in zip(points, points[1:], strict=False):
        elapsed = after["received_at"] - before["received_at"]
        delta = after["received_bytes"] - before["received_bytes"]
        if elapsed > 0 and delta >= 0:
            throughput.append((after["received_at"], round(delta / elapsed / 1e6, 3)))
    seen = local_time(status["last_seen_at"])
    return "".join([
        _page_head(site), _refused(refusal, at),
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
