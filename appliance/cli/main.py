"""``pas``: run the daemon, check configuration, read status, inspect rules and the queue."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from appliance import __version__
from appliance.cli import cache as cache_cli
from appliance.cli.common import (
    BUSY_MESSAGE,
    ROW_ID_MAX,
    ConfigOption,
    JobState,
    JsonOption,
    console,
    err,
    error_cell,
    is_busy,
    literal,
    read_database,
    settings_or_exit,
    shown,
    write_database,
)
from appliance.config import (
    PRIORITY_RANK,
    Settings,
    load_settings,
)
from appliance.ops.status import human_size
from appliance.words import appliance_title, counted

app = typer.Typer(help="PAS, the hospital's access point to the regional imaging platform.",
                  no_args_is_help=True, add_completion=False)
rules_app = typer.Typer(help="Routing rules.", no_args_is_help=True)
queue_app = typer.Typer(help="The job queue.", no_args_is_help=True)


@app.callback()
def _private_files() -> None:
    """What PAS writes (the index: every patient's name; the spool: the images; the audit
    trail's files) is for its user and group only, as ``UMask=0027`` in pas.service makes
    it. Run otherwise (by hand, another service manager, a package install) the shell's
    umask 022 left the index and every stored image world-readable (0644)."""
    import os

    os.umask(0o027)


app.add_typer(__import__("appliance.cli.config_check", fromlist=["config_app"]).config_app,
              name="config")
app.add_typer(rules_app, name="rules")
app.add_typer(queue_app, name="queue")
app.add_typer(__import__("appliance.cli.prefetch", fromlist=["app"]).app, name="prefetch")
app.add_typer(__import__("appliance.cli.hub", fromlist=["hub_app"]).hub_app, name="hub")
app.command("enroll")(__import__("appliance.cli.enroll", fromlist=["enroll"]).enroll)
cache_cli.register(app)  # pas verify, pas cache ... (appliance/cli/cache.py)
__import__("appliance.cli.ops", fromlist=["register"]).register(app)  # pas send, doctor
__import__("appliance.cli.audit", fromlist=["register"]).register(app)  # pas audit




PRIORITY_NAME = {rank: name for name, rank in PRIORITY_RANK.items()}


def _settings(path: Path | None) -> Settings:
    return settings_or_exit(lambda: load_settings(path))


def _db(settings: Settings):  # type: ignore[no-untyped-def]
    """The database for a command that writes (created and migrated if need be; a short
    wait for the write lock: :func:`appliance.cli.common.write_database`)."""
    return write_database(settings.db_path)


def _reader(settings: Settings):  # type: ignore[no-untyped-def]
    """The database for a command that only reads: read-only, never created or migrated."""
    return read_database(settings.db_path)


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"




@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


@app.command()
def run(config: Path | None = ConfigOption) -> None:
    """Run the appliance daemon in the foreground."""
    from appliance import logs
    from appliance.daemon import Daemon

    settings = _settings(config)
    logs.setup(settings.log_level)
    if not settings.home.exists():  # refused, it would leave an empty home behind
        from appliance.daemon import PORT_104_DROP_IN
        from appliance.ops.listeners import first_port_refused

        dicom, http = settings.dicom, settings.http
        refused = first_port_refused(
            [("dicom.port", "dicom.host", dicom.host, dicom.port)]
            + ([("http.port", "http.host", http.host, http.port)] if http.enabled else []),
            PORT_104_DROP_IN)
        if refused:
            err.print(f"[red]cannot start:[/red] {literal(refused)}", highlight=False)
            raise typer.Exit(1)
    from appliance.transfer.region import region_ca_problem

    ca_problem = region_ca_problem(settings.prefetch)
    if ca_problem:  # the region clients are built at the start: refused now, named
        err.print(f"[red]cannot start:[/red] {literal(ca_problem)}", highlight=False)
        raise typer.Exit(1)
    from appliance.store.damage import DatabaseDamaged
    from appliance.store.db import SchemaTooNew
    from appliance.store.schema_drift import SchemaDiffers
    from appliance.transfer.enrolment import EnrolmentError

    try:
        daemon = Daemon(settings)
    except (OSError, EnrolmentError, DatabaseDamaged, SchemaTooNew, SchemaDiffers) as exc:
        # A damaged enrolment must not silently drop the default route to the hub, nor a
        # damaged index be written to.
        err.print(f"[red]cannot start:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    from appliance.daemon import PortUnavailable

    try:
        daemon.run_forever()
    except PortUnavailable as exc:
        err.print(f"[red]cannot start:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    _exit_now(0)


def _exit_now(code: int) -> None:
    """End the process once the daemon has stopped, without waiting for threads still
    blocked on the network. Python's exit joins every executor thread without a time limit,
    and a PUT or a fetch from a hub whose address no longer answers holds one for minutes
    (timeouts, then retries): a ``systemctl stop`` during a WAN outage took 108 s, and
    systemd kills at TimeoutStopSec (60 s). Whatever those threads did is committed and
    whatever they were doing resumes at the next start (invariant 3), as after a kill -9;
    the daemon's own parts had their chance in ``Daemon.stop``."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@app.command()
def status(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """What the appliance holds and what it still has to deliver."""
    from appliance.ops.status import collect

    settings = _settings(config)
    _say_index_damage(settings)
    snapshot = collect(settings, _reader(settings))
    if as_json:
        print(json.dumps(snapshot, indent=2))
        return
    table = Table(title=appliance_title(snapshot["site"], snapshot["ae_title"]),
                  show_header=False)
    for key in ("patients", "studies", "instances", "confirmed_instances", "conflicts"):
        table.add_row(key.replace("_", " "), str(snapshot[key]))
    table.add_row("stored", human_size(snapshot["bytes"]))
    disk = snapshot["disk"]
    table.add_row("disk", f"{disk['used_percent']}% used, {human_size(disk['free_bytes'])} free")
    cache = snapshot["cache"]  # the daemon's disk alert, from its audit row (store/cache.py)
    if cache["disk_alert"]:
        table.add_row("disk alert", f"[red]{literal(cache['disk_alert'])}[/red] "
                                    f"(since {_when(cache['disk_alert_since'])})")
    if cache["integrity_issues"]:
        table.add_row("integrity issues", ", ".join(
            f"{kind} {n}" for kind, n in sorted(cache["integrity_issues"].items()))
            + " (pas cache status)")
    checked = snapshot["index_check"]
    if checked is not None:  # the daemon's last integrity check of the index
        table.add_row("index check", f"{'DAMAGED' if checked['finding'] else 'sound'}, "
                                     f"{_when(checked['checked_at'])}")
    backup = snapshot["backup"]  # as pas doctor and the status page judge it
    table.add_row("last backup", ("none yet" if not backup["stale"] else "NEVER")
                  if backup["last_at"] is None else
                  shown(f"{'STALE, ' if backup['stale'] else ''}{_when(backup['last_at'])}, "
                        f"{backup['folder']}"
                        + (f", restored from it {_when(backup['restored_at'])}"
                           if backup.get("restored_at") else "")))
    console.print(table)
    jobs = Table(title="Jobs")
    for column in ("kind", "pending", "running", "done", "failed"):
        jobs.add_column(column)
    for kind, states in sorted(snapshot["jobs_by_kind"].items()):
        jobs.add_row(shown(kind), *(str(states.get(s, 0)) for s in ("pending", "running", "done",
                                                             "failed")))
    console.print(jobs)
    if snapshot["backlog"]:
        backlog = Table(title="Backlog")
        for column in ("destination", "studies", "bytes", "oldest"):
            backlog.add_column(column)
        for row in snapshot["backlog"]:
            backlog.add_row(shown(row["destination"]), str(row["studies"]),
                            human_size(row["bytes"]), f"{row['oldest_age_s']:.0f} s")
        console.print(backlog)
    waiting = snapshot["awaiting_enrolment"]
    if not snapshot["backlog"] and not waiting["instances"]:
        # Said, not left out: an operator checking the backlog sees that it was looked at.
        # Not with studies waiting for the enrolment (said just below): they wait too.
        console.print("Backlog: none (nothing waiting for a destination)")
    if waiting["instances"]:
        console.print(f"[yellow]not enrolled:[/yellow] "
                      f"{counted(waiting['instances'], 'instance')} of "
                      f"{counted(waiting['studies'], 'study', 'studies')} wait for the "
                      "enrolment to go to the region (pas enroll, then restart PAS)",
                      highlight=False, soft_wrap=True)
    _print_commitment(snapshot["commitment"])
    _print_prefetch(snapshot.get("prefetch"))
    for refused in snapshot.get("credentials_refused") or []:
        console.print(f"[red]{literal(refused['destination'])}:[/red] "
                      f"{counted(refused['waiting'], refused['what'])} waiting for "
                      f"credentials: "
                      f"{literal(refused['error'])}", highlight=False, soft_wrap=True)
    for unconfigured in snapshot.get("unconfigured_destinations") or []:
        if unconfigured.get("queued"):
            console.print(f"[red]{literal(unconfigured['destination'])}:[/red] "
                          f"{counted(unconfigured['queued'], 'job')} waiting for the "
                          "configuration (the destination is not configured: put its name "
                          "back under \\[destinations] and restart PAS)", highlight=False,
                          soft_wrap=True)
    if snapshot.get("links"):
        links = Table(title="Links")
        for column in ("destination", "state", "last contact", "last error"):
            links.add_column(column)
        for name, link in sorted(snapshot["links"].items()):
            error = f"{_when(link['last_error_at'])} {link['last_error']}" if link[
                "last_error"] else "-"
            state = link["state"]
            if link.get("unreachable_since"):  # a local destination's outage, as dated
                state += f" (unreachable since {_when(link['unreachable_since'])})"
            # error_cell: whole up to 300 characters, the table wraps it; cut at 100 it
            # ended "...the certificate of si" and never said what to do.
            links.add_row(shown(name), shown(state), _when(link["last_ok_at"]), error_cell(error))
        console.print(links)


def _say_index_damage(settings: Settings) -> None:
    """First, and on stderr (also with --json): the daemon found the index damaged
    (ops/index_check.py). Said before the store is read, which that damage may stop."""
    from appliance.ops import index_check

    checked = index_check.load(settings.home)
    if checked is not None and checked.damaged:
        err.print(f"[red]index damaged:[/red] {literal(checked.message())} (found "
                  f"{_when(checked.checked_at)})", highlight=False, soft_wrap=True)


def _print_prefetch(summary: dict[str, Any] | None) -> None:
    """The prefetch, only when something is wrong with it: requests waiting for the link,
    failed in the last 24 h, or late (the exam time passed, the priors not on site)."""
    if not summary:
        return
    if summary["waiting_for_link"]:
        console.print(f"[yellow]prefetch:[/yellow] "
                      f"{counted(summary['waiting_for_link'], 'prefetch request')} waiting for "
                      f"the link since {_when(summary['waiting_since'])} (tried again every "
                      f"prefetch.retry_after_s): {literal(summary['link_error'])}",
                      highlight=False, soft_wrap=True)
    if summary["failed_24h"]:
        console.print(f"[red]prefetch:[/red] {counted(summary['failed_24h'], 'prefetch request')}"
                      f" failed in the last 24 h (pas prefetch list --state failed), the last: "
                      f"{literal(summary['last_failure'])}", highlight=False, soft_wrap=True)
    if summary["late"]:
        console.print(f"[red]prefetch:[/red] {counted(summary['late'], 'prefetch request')} "
                      "late: the exam time passed, the priors not on site yet "
                      f"({summary['pending']} pending, {summary['running']} running)",
                      highlight=False, soft_wrap=True)


def _print_commitment(reports: dict[str, Any]) -> None:
    """Storage Commitment reports the modalities wait for, as the backlog is shown: only
    when some wait or were given up in the last 24 h."""
    if reports["by_ae"]:
        table = Table(title="Storage Commitment reports pending")
        for column in ("modality AE", "reports", "oldest", "attempts", "last error"):
            table.add_column(column)
        for row in reports["by_ae"]:
            table.add_row(shown(row["calling_ae"]), str(row["pending"]),
                          f"{row['oldest_age_s']:.0f} s", str(row["attempts"]),
                          error_cell(row["last_error"] or "-"))
        console.print(table)
    if reports["given_up_24h"]:
        console.print(f"[red]Storage Commitment:[/red] "
                      f"{counted(reports['given_up_24h'], 'report')} given up in the last 24 h "
                      f"({reports['given_up_7d']} in the last 7 days): those modalities keep "
                      "their copies (pas audit --event commitment --failures shows which)",
                      highlight=False, soft_wrap=True)


@app.command()
def studies(config: Path | None = ConfigOption,
            patient: str | None = typer.Option(
                None, "--patient", help="Only this patient's studies (PatientID, exact: no "
                                        "wildcards)"),
            as_json: bool = JsonOption) -> None:
    """List the studies the cache holds, the most recently received first."""
    from appliance.store.index import list_studies

    settings = _settings(config)
    rows = list_studies(_reader(settings), patient)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=counted(len(rows), "study", "studies"))
    from appliance.store.cache import pin_words

    for column in ("patient", "name", "date", "modalities", "description", "series",
                   "instances", "size", "confirmed", "pinned", "study UID"):
        table.add_column(column)
    for r in rows:
        pinned = pin_words(r["pinned_until"]) if r["pinned_until"] is not None else ""
        table.add_row(shown(r["patient_id"]), shown(r["patient_name"]), shown(r["study_date"]),
                      shown(r["modalities"]), shown(r["description"]), str(r["series"]),
                      str(r["instances"]), human_size(r["bytes"]),
                      f"{r['confirmed']}/{r['instances']}", pinned, shown(r["study_uid"]))
    console.print(table)


@rules_app.command("test")
def rules_test(file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                           help="A DICOM file, as a modality would send it"),
               calling_ae: str = typer.Option("", "--calling-ae", help="As if sent by this AE"),
               config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Show which routing rules match a DICOM file, and why."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from appliance.routing.rules import explain

    settings = _settings(config)
    try:
        ds = dcmread(file, stop_before_pixels=True)
    except InvalidDicomError:  # pydicom's own words end "Use force=True to force reading."
        err.print(f"[red]{literal(file)}: not a DICOM file[/red] (no 128-byte preamble followed by "
                  "'DICM', as DICOM Part 10 files begin)", highlight=False)
        raise typer.Exit(2) from None
    except Exception as exc:
        err.print(f"[red]{literal(file)}: not a readable DICOM file:[/red] {literal(exc)}",
                  highlight=False)
        raise typer.Exit(2) from None
    if len(ds) == 0:  # only the preamble and "DICM", or only a file meta: nothing to route
        err.print(f"[red]{literal(file)}: no dataset after the DICOM file header (nothing to route)"
                  "[/red]", highlight=False)
        raise typer.Exit(2)
    # Read as the daemon's ingest reads it (the index's record, which routing matches): a
    # value of several (BodyPartExamined HEAD\NECK) was shown and matched here as Python's
    # list, "['HEAD', 'NECK']", and the verdict was not the daemon's.
    import logging

    from appliance.ingest.attributes import InvalidInstance, instance_record

    ingest_log = logging.getLogger("pas.ingest")
    quiet, ingest_log.disabled = ingest_log.disabled, True  # its "stored as received" lines
    try:
        meta = getattr(ds, "file_meta", None)
        record = instance_record(ds, str(meta.get("TransferSyntaxUID", "")) if meta else "")
    except InvalidInstance as exc:  # the daemon refuses to store it: nothing to route
        err.print(f"[red]{literal(file)}: PAS would refuse this file:[/red] {literal(exc)} "
                  "(nothing to route)",
                  highlight=False)
        raise typer.Exit(2) from None
    finally:
        ingest_log.disabled = quiet
    attributes = {
        "calling_ae": calling_ae, "called_ae": settings.dicom.ae_title,
        "modality": record.modality or "", "sop_class": record.sop_class_uid,
        "study_description": record.study_description or "",
        "body_part": record.body_part or "",
    }
    # Enrolled, the hub is the default route of what no rule and no fallback sends anywhere
    # (Daemon.default_destinations): say so, as the daemon will do it.
    from appliance.transfer.enrolment import EnrolmentError, load_enrolment

    try:
        enrolled = load_enrolment(settings.home) is not None
    except EnrolmentError as exc:  # pas run refuses to start on it; say why here too
        err.print(f"[red]enrolment under {literal(settings.home)} unreadable:[/red] "
                  f"{literal(exc)}",
                  highlight=False)
        raise typer.Exit(1) from None
    results, routes = explain(settings.routing, attributes, ["hub"] if enrolled else [])
    if as_json:  # what a hospital's own checks of its rules read (a file per modality)
        print(json.dumps({
            "file": str(file), "attributes": attributes,
            "rules": [{"name": r.name, "matched": r.matched, "reasons": r.reasons}
                      for r in results],
            "routes": [{"destination": r.destination, "priority": PRIORITY_NAME[r.priority],
                        "rule": r.rule} for r in routes],
        }, indent=2))
        return
    for result in results:
        mark = "[green]MATCH[/green]" if result.matched else "[dim]no[/dim]   "
        console.print(f"{mark} rule {literal(repr(result.name))}")
        for reason in result.reasons:
            console.print(f"        {literal(reason)}", highlight=False)
    if routes:
        for route in routes:
            console.print(f"-> {literal(route.destination)} ({PRIORITY_NAME[route.priority]}, "
                          f"from {literal(route.rule)})")
    else:
        console.print("-> no destination: kept locally only, until this appliance is "
                      "enrolled (then to the hub, the default route)")


@queue_app.command("list")
def queue_list(config: Path | None = ConfigOption,
               state: JobState | None = typer.Option(None, help="Only the jobs in this state"),
               limit: int = typer.Option(200, "--limit", min=1, max=ROW_ID_MAX,
                                         help="At most this many, the newest"),
               as_json: bool = JsonOption) -> None:
    """Jobs, newest first."""
    from appliance.store.jobs import count_jobs, list_jobs

    settings = _settings(config)
    reader = _reader(settings)
    rows = list_jobs(reader, state.value if state else None, limit)
    if as_json:  # the table's word beside the number scripts already read
        print(json.dumps([{**r, "priority_name": PRIORITY_NAME.get(r["priority"])}
                          for r in rows], indent=2))
        return
    # The title said "200 jobs" after a weekend's outage had queued 3,000: say it is a part.
    total = count_jobs(reader, state.value if state else None) if len(rows) == limit else 0
    title = (f"the {len(rows)} newest of {counted(total, 'job')} (--limit for more)"
             if total > len(rows) else counted(len(rows), "job"))
    table = Table(title=title)
    for column in ("id", "kind", "destination", "state", "priority", "attempts", "sent",
                   "next attempt", "last error", "study UID"):
        table.add_column(column)
    for r in rows:
        nxt = _when(r["next_attempt_at"]) if r["state"] == "pending" else "-"
        if r["waits_for_job"]:  # held back by another job of its study (jobs.claim_next)
            nxt = f"after job {r['waits_for_job']}"
        # The rule's word (urgent, high, routine), not the rank the queue orders by.
        priority = PRIORITY_NAME.get(r["priority"], str(r["priority"]))
        table.add_row(str(r["id"]), shown(r["kind"]), shown(r["destination"]), r["state"],
                      priority, str(r["attempts"]), f"{r['sent']}/{r['instances']}", nxt,
                      error_cell(r["last_error"]), shown(r["study_uid"]))
    console.print(table)


@queue_app.command("retry")
def queue_retry(job_id: int = typer.Argument(..., min=1, max=ROW_ID_MAX, help="As in pas "
                                             "queue list"),
                config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Make a failed or pending job due now, with its attempts reset."""
    from appliance.cli.common import operator_actor
    from appliance.store.jobs import ALREADY_DUE, list_jobs, retry, why_not_retried

    settings = _settings(config)
    db = _db(settings)
    done = retry(db, job_id, actor=operator_actor())
    if not done:
        err.print(f"[red]{literal(why_not_retried(db, job_id))}[/red]", highlight=False)
        raise typer.Exit(1)
    (job,) = list_jobs(db, job_id=job_id)
    if as_json:  # the row pas queue list --json gives, as it is now
        print(json.dumps({**job, "priority_name": PRIORITY_NAME.get(job["priority"])},
                         indent=2))
        return
    # "Now" was said of a job another job to the same destination holds back (store.jobs).
    when = (f"once job {job['waits_for_job']} is over (it goes to {job['destination']} "
            "first)" if job["waits_for_job"] else "now")
    if done == ALREADY_DUE:  # no audit row: said, not "will be retried" as if retried
        console.print(f"job {job_id} was already pending and due {literal(when)}, with no "
                      "attempt counted: nothing changed", highlight=False)
        return
    console.print(f"job {job_id} will be retried {literal(when)}", highlight=False)


# ``pas --help`` by what an operator comes for, in this order: the commands were listed as the
# modules registered them, the hub's (another host's) among the appliance's own.
HELP_PANELS = {
    "Running": ("run", "status", "studies", "doctor", "version"),
    "Setting up": ("config", "rules", "enroll"),
    "Work under way": ("queue", "prefetch", "send"),
    "Cache and integrity": ("cache", "verify"),
    "Records and recovery": ("audit", "backup", "backup-key", "restore"),
    "The regional hub (on the hub's host)": ("hub",),
}


def _panelled() -> None:
    order = [name for names in HELP_PANELS.values() for name in names]
    panel = {name: title for title, names in HELP_PANELS.items() for name in names}

    def name_of(info: Any) -> str:
        return info.name or info.callback.__name__.replace("_", "-")

    for infos in (app.registered_commands, app.registered_groups):
        for info in infos:
            info.rich_help_panel = panel.get(name_of(info))
        infos.sort(key=lambda info: order.index(name_of(info)) if name_of(info) in order
                   else len(order))


_panelled()


def main() -> None:
    """The ``pas`` entry point: what the file system or the database refuses is said in one
    line, not a traceback (an IT account running ``pas status`` on the appliance's
    /var/lib/pas, which belongs to the ``pas`` user, met a 40-line PermissionError). A write
    lock held past an interactive command's short wait is "database busy"."""
    import sqlite3
    import sys

    try:
        app()
    except PermissionError as exc:
        # A hub command's files are the hub's user's (pas hub backup run by an operator
        # was told to become the appliance's user and to set PAS_HOME).
        who = ("the hub's user (sudo -u pas-hub env PAS_HUB_HOME=/var/lib/pas-hub pas hub "
               "...) or point PAS_HUB_HOME elsewhere" if sys.argv[1:2] == ["hub"]
               else "the appliance's user (sudo -u pas pas ...) or point PAS_HOME elsewhere")
        err.print(f"[red]permission denied:[/red] {literal(exc.filename or exc)}: run as {who}",
                  highlight=False)
        sys.exit(1)
    except sqlite3.DatabaseError as exc:
        if is_busy(exc):  # an interactive command's short wait for the write lock ran out
            err.print(f"[red]{BUSY_MESSAGE}[/red]", highlight=False)
        elif getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT,
                                                         sqlite3.SQLITE_NOTADB):
            # The hub's database is not rebuilt from anything: its way back is a backup.
            hint = ("the hub's database is damaged; keep it as it is and restore the hub home "
                    "from its last backup (pas hub restore FOLDER; docs/operations.md, Backing "
                    "up the hub)"
                    if sys.argv[1:2] == ["hub"] else
                    "the index is damaged; pas doctor says what to do (pas cache rebuild-index)")
            err.print(f"[red]database error:[/red] {literal(exc)}: {hint}", highlight=False)
        else:
            err.print(f"[red]database error:[/red] {literal(exc)}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
