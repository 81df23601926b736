"""``pas prefetch``: ask for a patient's priors by hand, and see what the prefetch did.

Thin commands over :mod:`appliance.store.prefetch`: ``patient`` writes a durable request that
the running daemon's scheduler picks up (no daemon RPC needed), ``list`` shows requests with
their state and the lead time achieved, ``show`` one request and its prior studies.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table

from appliance.cli.common import (
    ROW_ID_MAX,
    ConfigOption,
    JsonOption,
    PrefetchState,
    console,
    err,
    error_cell,
    literal,
    read_database,
    shown,
    write_database,
)
from appliance.words import counted

app = typer.Typer(help="Priors on site before the patient arrives.", no_args_is_help=True)


def _db(config: Path | None, write: bool = False):  # type: ignore[no-untyped-def]
    """Read-only unless ``write`` (see :func:`appliance.cli.common.read_database`)."""
    from appliance.cli.main import _settings

    path = _settings(config).db_path
    return write_database(path) if write else read_database(path)


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M") if timestamp else "-"


def _lead(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    return f"{sign}{seconds / 3600:.1f} h" if seconds >= 3600 else f"{sign}{seconds / 60:.0f} min"


@app.command("patient")
def patient(patient_id: str = typer.Argument(..., help="PatientID as the site knows it"),
            issuer: str = typer.Option("", "--issuer", help="Issuer of the PatientID"),
            modality: str | None = typer.Option(
                None, "--modality", help="Modality of the exam the priors are for (the "
                                         "prefetch rules choose the priors by it)"),
            accession: str | None = typer.Option(
                None, "--accession", help="Accession number of that exam (never fetched as "
                                          "a prior)"),
            config: Path | None = ConfigOption) -> None:
    """Queue a request for this patient's priors; the running daemon fetches them soon."""
    from appliance.prefetch.identifiers import identifier_problem
    from appliance.store import prefetch as store
    from appliance.store.db import now

    patient_id = patient_id.strip()
    if not patient_id or len(patient_id) > 64:
        err.print("[red]PATIENT_ID must be 1-64 characters[/red]")
        raise typer.Exit(2)
    # A control character ($'P\x01X' from a script) was queued as the patient ID: no study
    # can carry it, and the request spent its attempts searching for it. The issuer was not
    # checked at all.
    for name, value in (("PATIENT_ID", patient_id), ("--issuer", issuer)):
        problem = identifier_problem(value)
        if problem is not None:
            err.print(f"[red]{name} {problem}[/red]", highlight=False)
            raise typer.Exit(2)
    scheduled = store.schedule(_db(config, write=True), store.NewRequest(
        f"manual:{patient_id}|{issuer}|{now():.6f}", "manual", patient_id, issuer, accession,
        modality.upper() if modality else None))
    console.print(f"prefetch request {scheduled.request_id} for patient {literal(patient_id)} "
                  "queued", highlight=False)


@app.command("list")
def list_requests(state: PrefetchState | None = typer.Option(
                      None, help="Only the requests in this state"),
                  as_json: bool = JsonOption,
                  config: Path | None = ConfigOption) -> None:
    """Prefetch requests, newest first, with their state and the lead time achieved.

    The lead time: how long before the scheduled exam the priors were on site."""
    from appliance.store import prefetch as store

    db = _db(config)
    rows = store.list_requests(db, state.value if state else None)
    if as_json:
        print(json.dumps({"counts": store.counts_by_state(db), "requests": rows}, indent=2))
        return
    table = Table(title=counted(len(rows), "prefetch request"))
    for column in ("id", "trigger", "patient", "modality", "scheduled", "state", "priors",
                   "instances", "lead time", "times", "last error"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["id"]), shown(r["trigger"]), shown(r["patient_id"]),
                      shown(r["modality"]), _when(r["scheduled_at"]), r["state"],
                      f"{r['studies_fetched']}/{r['studies_found']}",
                      str(r["instances_fetched"]), _lead(r["lead_time_s"]),
                      str(r["times_requested"]), error_cell(r["last_error"]))
    console.print(table)


@app.command("show")
def show(request_id: int = typer.Argument(..., min=1, max=ROW_ID_MAX,
                                         help="As pas prefetch list shows it"),
         config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """One request, the HL7 messages that touched it, and the prior studies it chose.

    The messages: those that made, changed or cancelled it, by sender and control id
    (--json: times as epoch seconds)."""
    from appliance.store import prefetch as store
    from appliance.store.prefetch_messages import messages_of

    db = _db(config)
    request = store.get_request(db, request_id)
    if request is None:
        err.print(f"[red]no prefetch request {request_id}[/red]")
        raise typer.Exit(1)
    studies = store.studies_of_request(db, request_id)
    messages = messages_of(db, request_id, request["dedup_key"])
    if as_json:
        print(json.dumps({**request, "studies": studies, "messages": messages}, indent=2))
        return
    # A table, as pas prefetch list prints: it printed the JSON, times in epoch seconds.
    table = Table(title=f"prefetch request {request_id}", show_header=False)
    for label, value in (
            ("state", request["state"]), ("trigger", request["trigger"]),
            ("order, appointment or visit", request["dedup_key"]),
            ("patient", f"{request['patient_id']} (issuer {request['issuer'] or '-'})"),
            ("accession", request["accession_number"] or "-"),
            ("modality, body part",
             f"{request['modality'] or '-'}, {request['body_part'] or '-'}"),
            ("exam", _when(request["scheduled_at"])), ("due", _when(request["due_at"])),
            ("rule", request["rule"] or "-"),
            ("attempts", f"{request['attempts']} (next {_when(request['next_attempt_at'])})"
             if request["state"] == "pending" else str(request["attempts"])),
            ("requested", counted(request["times_requested"], "time")),
            ("priors", f"{request['studies_fetched']} of {request['studies_found']} on site, "
                       f"{counted(request['instances_fetched'], 'instance')}"),
            ("finished", _when(request["finished_at"])),
            ("last error", error_cell(request["last_error"] or "-"))):
        table.add_row(label, shown(value))
    console.print(table, highlight=False)
    said = Table(title=counted(len(messages), "HL7 message"))
    for column in ("received", "type", "sender and control id (MSH-3|MSH-4|MSH-10)",
                   "answered"):
        said.add_column(column)
    for message in messages:
        said.add_row(_when(message["received_at"]), shown(message["message_type"]),
                     shown(message["message_key"]), shown(message["ack_code"]))
    console.print(said, highlight=False)
    priors = Table(title=counted(len(studies), "prior study", "prior studies"))
    for column in ("study UID", "date", "modalities", "instances", "state"):
        priors.add_column(column)
    for study in studies:
        priors.add_row(shown(study["study_uid"]), shown(study["study_date"]),
                       shown(study["modalities"]), str(study["instances_expected"] or ""),
                       study["state"])
    console.print(priors, highlight=False)
