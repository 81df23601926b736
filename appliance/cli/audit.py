"""``pas audit``: the audit trail as a privacy officer or IT reads it, without opening SQLite.

Owns: the command's options, turning them into an :class:`~appliance.store.audit.AuditFilter`
(periods typed as a person types them: a date, a date and time, ``24h``), and the output.
Thin: the SQL is :func:`appliance.store.audit.search`. Read-only: the database is opened
``mode=ro`` (:func:`appliance.cli.common.read_database`), beside a running daemon (WAL).
Bad input is refused by the parser or before the database is opened, exit 2.

``pas audit verify``: the trail's hash chain checked row by row
(:func:`appliance.store.audit.verify_chain`), exit 1 at the first row that breaks it.
A listing option given before it (``pas audit --since 24h verify``) is refused, exit 2:
it was silently ignored; ``--json`` and ``--config`` given there are passed on to it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from appliance.cli.common import (
    ROW_ID_MAX,
    ConfigOption,
    JsonOption,
    console,
    err,
    literal,
    shown,
)
from appliance.store.audit import EVENTS, PATIENT_SEPARATOR, AuditFilter
from appliance.words import counted, local_time

# The event kinds as a parser type: an unknown --event is refused with the list, and
# --help shows it.
AuditEvent = StrEnum("AuditEvent", {name: name for name in EVENTS})  # type: ignore[misc]

_AGO = re.compile(r"(\d{1,9})([mhdw])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
WHEN_FORMS = ("a date (2024-05-01), a date and time (2024-05-01T14:30, local time unless "
              "it ends with Z or a UTC offset) or a time ago (30m, 24h, 7d, 2w)")


def parse_when(option: str, text: str, *, end_of_day: bool = False,
               clock: float | None = None) -> float:
    """Epoch seconds for what an auditor types. A date alone is local midnight, or with
    ``end_of_day`` the next one: ``--until 2024-05-01`` includes that whole day, as people
    mean it. ``clock``: now, for relative forms (the caller's one instant for both ends)."""
    value = text.strip()
    ago = _AGO.fullmatch(value)
    if ago:
        return (time.time() if clock is None else clock) - int(ago[1]) * _UNIT_S[ago[2]]
    try:
        day: dt.date | None = dt.date.fromisoformat(value)  # a day, whichever ISO form
    except ValueError:
        day = None
    if day is not None:
        midnight = dt.datetime.combine(day, dt.time())
        return (midnight + dt.timedelta(days=1 if end_of_day else 0)).timestamp()
    try:
        return dt.datetime.fromisoformat(value).timestamp()  # naive: local time
    except (ValueError, OverflowError, OSError):
        raise typer.BadParameter(f"{text!r} is not {WHEN_FORMS}",
                                 param_hint=f"'{option}'") from None


def _shown(value: Any) -> Text:
    """A cell as plain text: no rich markup read in it, control characters made visible
    (line feeds too: actors, query keys and HL7 reasons come from the network)."""
    return shown(value, one_line=True)


def _target(value: str | None) -> Text:
    """A store row's studies one per line (stored comma-joined: one long word that the
    table could only fold in the middle of a UID); any other target as it is."""
    parts = (value or "").split(",")
    if len(parts) > 1 and all(_UID.fullmatch(p) for p in parts):
        return Text("\n").join(_shown(p) for p in parts)
    return _shown(value)


def _patients(value: str | None) -> Text:
    """The patients recorded with a row (stored backslash-separated), on one line: one per
    line beside the studies one per line read as pairs, which they are not (the row keeps
    which patients and which studies, not which study is whose)."""
    return Text(", ").join(_shown(p) for p in (value or "").split(PATIENT_SEPARATOR))


def _local(at: float) -> str:
    """This host's time, its zone named (the table said ``11:32:51`` beside ``--json``'s
    UTC: a DPO comparing the two could not tell which)."""
    return local_time(at)


def parse_limit(text: str) -> int:
    """``--limit``'s parser: typer's own int and range checks say "Input should be greater
    than or equal to 1" without the value typed."""
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= ROW_ID_MAX:
        raise typer.BadParameter(f"{text!r} is not a number of rows (1 to {ROW_ID_MAX})")
    return limit


def _filter(since: str | None, until: str | None, events: list[AuditEvent] | None,
            patient: str | None, study: str | None, failures: bool) -> AuditFilter:
    """The options checked and turned into a filter, before any database is opened."""
    clock = time.time()
    since_at = None if since is None else parse_when("--since", since, clock=clock)
    until_at = None if until is None else parse_when("--until", until, end_of_day=True,
                                                     clock=clock)
    if since_at is not None and until_at is not None and since_at >= until_at:
        raise typer.BadParameter(f"--since {since!r} is not before --until {until!r}: no row "
                                 "can match", param_hint="'--since' / '--until'")
    if patient is not None and not patient.strip():
        raise typer.BadParameter("an empty patient ID matches nothing", param_hint="'--patient'")
    if study is not None and not (_UID.fullmatch(study.strip()) and len(study.strip()) <= 64):
        raise typer.BadParameter(f"{study!r} is not a UID (digits and dots, at most 64 "
                                 "characters, as pas studies lists it)",
                                 param_hint="'--study'")
    return AuditFilter(since=since_at, until=until_at,
                       events=tuple(sorted({e.value for e in events or []})),
                       patient=patient.strip() if patient is not None else None,
                       study=study.strip() if study is not None else None, failures=failures)


audit_app = typer.Typer()


@audit_app.callback(invoke_without_command=True)
def audit(ctx: typer.Context, config: Path | None = ConfigOption,
          since: str | None = typer.Option(None, "--since", help=(
              f"Rows written at or after this: {WHEN_FORMS}")),
          until: str | None = typer.Option(None, "--until", help=(
              "Rows written before this, same forms (a date alone includes that day)")),
          patient: str | None = typer.Option(None, "--patient", help=(
              "Rows about this patient (PatientID), as recorded with each row (older rows: "
              "naming a study of the patient's the cache still indexes, or a query for this "
              "PatientID)")),
          study: str | None = typer.Option(None, "--study", help=(
              "Rows naming this Study Instance UID")),
          events: list[AuditEvent] | None = typer.Option(None, "--event", metavar="<kind>", help=(
              "Only this kind of event; repeat for several. Kinds: " + ", ".join(EVENTS))),
          failures: bool = typer.Option(False, "--failures", help=(
              "Only rows whose outcome is not success (failures, cancellations)")),
          limit: int = typer.Option("100", "--limit", parser=parse_limit, metavar="<int>", help=(
              "Show at most this many rows, the newest")),
          as_json: bool = JsonOption) -> None:
    """The audit trail: who did what to which study, and how it ended; newest first.

    pas audit verify checks that no row was altered, removed or inserted since."""
    from appliance.cli.common import read_database
    from appliance.cli.main import _settings
    from appliance.store.audit import search

    if ctx.invoked_subcommand is not None:  # pas audit verify
        _pass_on(ctx, config, as_json)
        return
    wanted = _filter(since, until, events, patient, study, failures)
    settings = _settings(config)
    rows, matched = search(read_database(settings.db_path), wanted, limit)
    more = (f"{len(rows)} of {counted(matched, 'matching row')} shown, the newest: "
            f"--limit {matched} to see them all") if matched > len(rows) else None
    if as_json:
        # Every column, and the time in ISO 8601 (UTC) beside the epoch seconds stored.
        # A query's own bytes (a C-FIND identifier) in base64, as the ATNA message has them.
        print(json.dumps([{"id": r["id"], "at": r["at"], "time": dt.datetime.fromtimestamp(
            r["at"], dt.UTC).isoformat(), **{k: base64.b64encode(v).decode() if isinstance(
                v, bytes) else v for k, v in r.items()}} for r in rows], indent=2))
        if more:
            err.print(more, highlight=False)
        return
    table = Table(title=f"{len(rows)} of {counted(matched, 'audit row')}" if more
                  else counted(matched, "audit row"))
    # Folded, never cut with "…": a UID or a time cut short names nothing.
    for column in ("id", "time", "event", "actor", "source", "patient", "target", "outcome",
                   "detail"):
        table.add_column(column, overflow="fold")
    for r in rows:
        outcome = _shown(r["outcome"])
        if r["outcome"] != "success":
            outcome.stylize("red")
        table.add_row(str(r["id"]), _local(r["at"]), _shown(r["event"]), _shown(r["actor"]),
                      _shown(r["source"]), _patients(r["patient"]), _target(r["target"]),
                      outcome, _shown(r["detail"]))
    console.print(table)
    if more:
        console.print(more, highlight=False)


# The group's options that only its listing reads: given before a subcommand (pas audit
# --since 24h verify) they were silently ignored, the verify unfiltered. --json and --config
# are the subcommand's own too: passed on (_pass_on).
_LISTING_OPTIONS = (("since", "--since"), ("until", "--until"), ("patient", "--patient"),
                    ("study", "--study"), ("events", "--event"), ("failures", "--failures"),
                    ("limit", "--limit"))


def _pass_on(ctx: typer.Context, config: Path | None, as_json: bool) -> None:
    """``pas audit [options] verify``: a listing option given is refused, exit 2, naming
    it; ``--config`` and ``--json`` go on to the subcommand (ctx.obj), as if given after
    it."""
    # By the source's name: typer carries a click of its own (typer._click), whose
    # ParameterSource is not click's.
    given = [flag for name, flag in _LISTING_OPTIONS
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"]
    if given:
        err.print(f"{given[0]} is an option of `pas audit`'s listing, not of `pas audit "
                  f"{ctx.invoked_subcommand}`", highlight=False, markup=False)
        raise typer.Exit(2)
    ctx.obj = {"config": config, "json": as_json}


@audit_app.command("verify")
def verify(ctx: typer.Context, config: Path | None = ConfigOption,
           as_json: bool = JsonOption) -> None:
    """Check the audit trail's hash chain: every row as it was written, none removed or
    inserted since (exit 1 names the first row that is not)."""
    from appliance.cli.common import read_database
    from appliance.cli.main import _settings
    from appliance.store.audit import verify_chain

    given = ctx.obj if isinstance(ctx.obj, dict) else {}
    config = config if config is not None else given.get("config")
    as_json = as_json or bool(given.get("json"))
    check = verify_chain(read_database(_settings(config).db_path))
    if as_json:
        print(json.dumps({
            "ok": check.ok, "rows": check.rows, "last_id": check.last_id,
            "last_time": _iso(check.last_at), "head": check.head,
            "before_upgrade": None if check.upgrade_id is None else {
                "last_id": check.upgrade_id, "rows": check.before_upgrade},
            "broken": None if check.ok else {
                "id": check.broken_id, "time": _iso(check.broken_at),
                "problem": check.problem,
                "missing": list(check.missing) if check.missing else None,
                "before_upgrade": check.old_rows_changed}}, indent=2))
    elif check.ok and check.last_id is None:
        console.print("the audit trail has no rows yet", highlight=False)
    elif check.ok:
        are = "is" if check.rows == 1 else "are"
        said = f"the audit trail's {counted(check.rows, 'row')} {are} chained"
        if check.before_upgrade:
            old = (f"{counted(check.before_upgrade, 'row')} written before the upgrade to "
                   f"migration 30 (IDs up to {check.upgrade_id}) "
                   f"{'is' if check.before_upgrade == 1 else 'are'} as at the upgrade")
            said = f"{said}, and its {old}" if check.rows else f"the audit trail's {old}"
        console.print(f"{said}, last row ID {check.last_id} at {_local(check.last_at or 0)}, "
                      f"head {(check.head or '')[:16]}", highlight=False)
    elif check.old_rows_changed:
        err.print(f"[red]the audit trail is broken before row {(check.upgrade_id or 0) + 1}"
                  f"[/red]: {literal(check.problem)}.", highlight=False)
    else:
        before = (f" The {counted(check.rows, 'row')} before it "
                  f"{'is' if check.rows == 1 else 'are'} chained (head "
                  f"{(check.head or '')[:16]} at row {check.last_id})." if check.rows else "")
        if check.before_upgrade:
            before += (f" The {counted(check.before_upgrade, 'row')} written before the "
                       f"upgrade to migration 30 (IDs up to {check.upgrade_id}) "
                       f"{'is' if check.before_upgrade == 1 else 'are'} as at the upgrade.")
        written = ("at a time that is not one" if check.broken_at is None
                   else _local(check.broken_at))
        err.print(f"[red]the audit trail is broken at row {check.broken_id}[/red], written "
                  f"{written}: {literal(check.problem)}.{before}",
                  highlight=False)
    if not check.ok:
        raise typer.Exit(1)


def _iso(at: float | None) -> str | None:
    return None if at is None else dt.datetime.fromtimestamp(at, dt.UTC).isoformat()


def register(app: typer.Typer) -> None:
    """Add ``pas audit`` (and ``pas audit verify``) to the main CLI."""
    app.add_typer(audit_app, name="audit")
