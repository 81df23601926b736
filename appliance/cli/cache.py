"""``pas verify`` and ``pas cache ...``: integrity checks, pins, eviction, forced purge and
setting a damaged index aside (``rebuild-index``).

Thin: parses, calls :mod:`appliance.ops.recovery` / :mod:`appliance.ops.cache_policy`,
prints. Every action lands in the audit trail (done by the core, not here; a rebuilt
index's first row says where the damaged one went).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from appliance.cli.common import (
    ConfigOption,
    JsonOption,
    console,
    err,
    literal,
    operator_actor,
    shown,
)
from appliance.words import counted

if TYPE_CHECKING:  # imported when used: every pas command imports this module
    from appliance.store.cache import PinChange

cache_app = typer.Typer(help="The local cache: pins, eviction, purge, integrity.",
                        no_args_is_help=True)

StudyArgument = typer.Argument(..., help="Study Instance UID, as pas studies lists it")


def _not_a_uid(text: str) -> str:
    """Said after "not in the cache" when the argument is no UID at all (a patient ID, a
    typo): ``pas audit --study`` said so, the cache commands did not."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", text) and len(text) <= 64:
        return ""
    return (f": {text!r} is not a UID (digits and dots, at most 64 characters, as pas "
            "studies lists it)")


def _open(config: Path | None, write: bool = True,  # type: ignore[no-untyped-def]
          long_pass: bool = False):
    """Settings, database and spool; the database read-only unless ``write``. A quick edit
    (pin, unpin, purge) waits a few seconds for the write lock, then says the database is
    busy; a long pass (verify, evict) waits as long as the daemon, rather than fail at its
    end, after minutes of work, on a lock the daemon holds a little longer."""
    from appliance.cli.common import read_database, write_database
    from appliance.cli.main import _settings
    from appliance.store.db import BUSY_TIMEOUT_MS
    from appliance.store.spool import Spool

    settings = _settings(config)
    if not write:
        db = read_database(settings.db_path)
    elif long_pass:
        db = write_database(settings.db_path, busy_timeout_ms=BUSY_TIMEOUT_MS)
    else:
        db = write_database(settings.db_path)
    spool = Spool(settings.spool_dir, fsync=settings.storage.fsync,
                  min_free_bytes=settings.storage.min_free_mb * 1024 * 1024,
                  quota_bytes=settings.storage.quota_mb * 1024 * 1024, create=write)
    return settings, db, spool


def verify(config: Path | None = ConfigOption,
           repair: bool = typer.Option(False, "--repair", help="Adopt whole orphan files, move "
                                       "damaged ones to spool/quarantine, and restore missing "
                                       "or damaged confirmed instances from the region"),
           as_json: bool = JsonOption) -> None:
    """Re-hash every stored file against the index and report; exit 1 on any problem."""
    from appliance.ingest.receive import Receiver
    from appliance.ops.home_lock import lock_file
    from appliance.ops.listeners import lock_holder
    from appliance.ops.recovery import verify as run_verify

    settings, db, spool = _open(config, long_pass=True)
    region = None
    if repair:  # through the hub when enrolled, or a plain DICOMweb region when configured
        from appliance.transfer.http import hub_proxy
        from appliance.transfer.region import RegionClient, region_ca_problem

        ca_problem = region_ca_problem(settings.prefetch)
        if ca_problem:  # said in one line, as pas run does, not a traceback
            db.close()
            err.print(f"[red]cannot repair from the region:[/red] {literal(ca_problem)}",
                      highlight=False)
            raise typer.Exit(1)
        region = RegionClient.from_home(settings.home, settings.prefetch.dicomweb_url,
                                        prefetch=settings.prefetch,
                                        proxy=hub_proxy(settings.hub))
    # Each problem is in the report printed below: its log line too ("integrity: missing
    # ...") said every one twice, on stderr and stdout (114 lines for 57 missing files).
    # The flag's audit row still records it.
    recovery_log = logging.getLogger("pas.recovery")
    said_below = _DropIntegrityLines()
    recovery_log.addFilter(said_below)
    try:
        report = run_verify(db, spool, repair=repair, receiver=Receiver(db, spool),
                            region=region,
                            beside_daemon=lock_holder(lock_file(settings.home)) is not None,
                            actor=operator_actor())
    finally:
        recovery_log.removeFilter(said_below)
    summary = {k: v for k, v in report.__dict__.items() if k != "problems"}
    if as_json:
        print(json.dumps({**summary, "problems": report.problems}, indent=2))
    else:
        console.print(" ".join(f"{k}={v}" for k, v in summary.items()))
        for problem in report.problems:
            console.print(f"[red]{literal(problem)}[/red]", highlight=False)
    if report.problems and not (repair and report.hash_mismatch == 0 and report.missing == 0):
        raise typer.Exit(1)


class _DropIntegrityLines(logging.Filter):
    """Drops the ``integrity: KIND PATH: DETAIL`` lines a verify's report prints anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("integrity: ")


@cache_app.command("status")
def cache_status(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Disk use against the watermarks, the alert, open integrity issues."""
    from appliance.cli.main import _when
    from appliance.ops.cache_policy import CachePolicy
    from appliance.ops.status import human_size
    from appliance.store.cache import health, open_issues

    settings, db, spool = _open(config, write=False)
    snapshot = CachePolicy(settings, db, spool).snapshot()
    # The alert is the daemon's, read from its audit row as pas status reads it: the
    # CachePolicy made here, in the command's own process, never raised one (it said
    # "'alert': None" while the daemon was above the high watermark, nothing evictable).
    cache_health = health(db)
    snapshot["alert"] = cache_health["disk_alert"]
    snapshot["alert_since"] = cache_health["disk_alert_since"]
    issues = open_issues(db)
    if as_json:
        print(json.dumps({**snapshot, "issues": issues}, indent=2))
        return
    # A table, as pas status prints: it printed the Python dict ({'used_bytes': ...}).
    table = Table(title="Cache", show_header=False)
    of_what = ("storage.quota_mb" if settings.storage.quota_mb
               else "the spool's file system")
    table.add_row("used", f"{snapshot['used_percent']} % "
                          f"({human_size(snapshot['used_bytes'])} of "
                          f"{human_size(snapshot['capacity_bytes'])}, {of_what})")
    table.add_row("watermarks", f"high {snapshot['high_watermark_percent']} %, "
                                f"low {snapshot['low_watermark_percent']} %")
    table.add_row("disk alert", "none" if snapshot["alert"] is None else
                  f"[red]{literal(snapshot['alert'])}[/red] "
                  f"(since {_when(snapshot['alert_since'])})")
    table.add_row("integrity issues", str(snapshot["integrity_issues"]))
    console.print(table, highlight=False)
    if issues:
        table = Table(title=counted(len(issues), "open integrity issue"))
        for column in ("kind", "path", "detail"):
            table.add_column(column)
        for issue in issues:
            table.add_row(shown(issue["kind"]), shown(issue["path"]), shown(issue["detail"]))
        console.print(table)


@cache_app.command("evict")
def cache_evict(config: Path | None = ConfigOption,
                study_uid: str | None = typer.Argument(None, hidden=True)) -> None:
    """Run one eviction pass now (the daemon does it every cache.evict_interval_s): the
    least recently used confirmed studies, down to the low watermark. One study by its UID:
    pas cache purge STUDY_UID."""
    from appliance.ops.cache_policy import CachePolicy
    from appliance.ops.status import human_size

    if study_uid is not None:  # typer's "Got unexpected extra argument" said not what to do
        err.print(f"[red]pas cache evict takes no study:[/red] it runs an eviction pass; to "
                  f"delete study {literal(study_uid)} now: pas cache purge {literal(study_uid)}",
                  highlight=False)
        raise typer.Exit(2)
    settings, db, spool = _open(config, long_pass=True)
    result = CachePolicy(settings, db, spool).evict_if_needed()
    console.print(f"evicted {counted(len(result.evicted), 'study', 'studies')}, "
                  f"{human_size(result.freed_bytes)} freed; used {human_size(result.used_after)}"
                  f" of {human_size(result.capacity)}", highlight=False)
    for why in result.skipped.values():  # a study being read: a viewer's retrieve under way
        console.print(f"not evicted: {literal(why)}", highlight=False)


@cache_app.command("pin")
def cache_pin(study_uid: str = StudyArgument, config: Path | None = ConfigOption,
              days: float | None = typer.Option(None, "--days", help="Pin for N days "
                                                "(default: until unpinned)"),
              as_json: bool = JsonOption) -> None:
    """Keep a study in the cache whatever the disk pressure (until unpinned or N days)."""
    from appliance.ops.cache_policy import pin

    # nan too: it said "pinned" and pinned nothing; inf: "pinned for inf days" in the trail.
    if days is not None and not 0 < days < float("inf"):
        err.print(f"[red]--days must be a positive number of days, got {days}[/red] "
                  "(omit it to pin until unpinned)")
        raise typer.Exit(2)

    _settings, db, _spool = _open(config)
    change = pin(db, study_uid, days, operator_actor())
    if change is None:
        err.print(f"[red]study {literal(study_uid)} is not in the cache[/red]"
                  f"{literal(_not_a_uid(study_uid))}",
                  highlight=False)
        raise typer.Exit(1)
    from appliance.store.cache import pin_words

    assert change.after is not None
    if as_json:
        print(json.dumps(_pin_json(study_uid, change), indent=2))
        return
    said = f"study {literal(study_uid)} pinned {pin_words(change.after)}"
    if change.was_pinned:
        assert change.before is not None
        shorter = "[yellow]shortened[/yellow]: " if change.before > change.after else ""
        said += f" ({shorter}was pinned {pin_words(change.before)})"
    console.print(said, highlight=False)


def _pin_json(study_uid: str, change: PinChange) -> dict[str, object]:
    """``pin`` / ``unpin --json``: the pin now and the one before (``pinned_until`` as in
    ``pas studies --json``: seconds since the epoch, 1e18 until unpinned; null: none)."""
    from appliance.store.cache import PINNED_FOR_EVER

    before = change.before if change.was_pinned else None  # a pin run out is none
    return {"study_uid": study_uid, "pinned_until": change.after,
            "until_unpinned": change.after is not None and change.after >= PINNED_FOR_EVER,
            "was_pinned_until": before, "changed": before != change.after}


@cache_app.command("unpin")
def cache_unpin(study_uid: str = StudyArgument, config: Path | None = ConfigOption,
                as_json: bool = JsonOption) -> None:
    """Let the disk policy evict this study again (once confirmed)."""
    from appliance.ops.cache_policy import unpin

    _settings, db, _spool = _open(config)
    change = unpin(db, study_uid, operator_actor())
    if change is None:
        err.print(f"[red]study {literal(study_uid)} is not in the cache[/red]"
                  f"{literal(_not_a_uid(study_uid))}",
                  highlight=False)
        raise typer.Exit(1)
    from appliance.store.cache import pin_words

    if as_json:
        print(json.dumps(_pin_json(study_uid, change), indent=2))
        return
    if not change.was_pinned:  # said, not "unpinned" as if something changed
        console.print(f"study {literal(study_uid)} was not pinned: nothing changed",
                      highlight=False)
        return
    assert change.before is not None
    console.print(f"study {literal(study_uid)} unpinned (was pinned {pin_words(change.before)})",
                  highlight=False)


@cache_app.command("purge")
def cache_purge(study_uid: str = StudyArgument, config: Path | None = ConfigOption,
                force: bool = typer.Option(False, "--force", help="Also when not confirmed at "
                                           "the region, pinned, queued or being read by a "
                                           "viewer (audited)"),
                as_json: bool = JsonOption) -> None:
    """Delete a study from the cache now. Without --force only a confirmed, unpinned one."""
    from appliance.ops.cache_policy import purge
    from appliance.ops.status import human_size
    from appliance.store.eviction import BeingRead, NotEvictable, UnknownStudy

    _settings, db, spool = _open(config)
    try:
        evicted = purge(db, spool, study_uid, operator_actor(), force)
    except UnknownStudy as exc:  # --force cannot help: no hint to use it (given or not)
        err.print(f"[red]refused:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    except BeingRead as exc:  # a viewer's retrieve under way in the daemon
        err.print(f"[red]refused:[/red] {literal(exc)}. Purge once the retrieve is over, or use "
                  "--force to purge now: the viewer then fails to get what it has not "
                  "received yet", highlight=False)
        raise typer.Exit(1) from None
    except NotEvictable as exc:
        err.print(f"[red]refused:[/red] {literal(exc)} (use --force to purge anyway)",
                  highlight=False)
        raise typer.Exit(1) from None
    if as_json:  # what the delete audit row records, named
        print(json.dumps({"study_uid": study_uid, "patient_id": evicted.patient_id,
                          "instances": evicted.instances, "unconfirmed": evicted.unconfirmed,
                          "bytes": evicted.bytes, "pinned_until": evicted.pinned_until,
                          "failed_jobs_dropped": list(evicted.failed_jobs)}, indent=2))
        return
    pinned = ""
    if evicted.pinned_until is not None:  # a forced purge overrode it: said, as the trail does
        from appliance.store.cache import pin_words

        pinned = f"; it was pinned {pin_words(evicted.pinned_until)}"
    console.print(f"purged study {literal(study_uid)}: {counted(evicted.instances, 'instance')} "
                  f"({evicted.unconfirmed} unconfirmed), {human_size(evicted.bytes)}{pinned}",
                  highlight=False)


@cache_app.command("rebuild-index")
def cache_rebuild_index(config: Path | None = ConfigOption,
                        force: bool = typer.Option(False, "--force", help="Also when SQLite "
                                                   "finds the index sound (its jobs, "
                                                   "confirmations and audit rows are then "
                                                   "left behind in the file set aside)")
                        ) -> None:
    """Set a damaged index database aside (kept, renamed) so that the next start indexes
    every file of the spool again. The daemon must be stopped."""
    from appliance.cli.main import _settings
    from appliance.ops.home_lock import HomeInUse
    from appliance.ops.recovery import IndexSound, set_index_aside

    settings = _settings(config)
    path = settings.db_path
    if not path.exists():
        err.print(f"[red]refused:[/red] no index database at {literal(path)}: nothing to set "
                  "aside", highlight=False)
        raise typer.Exit(1)
    try:
        done = set_index_aside(settings, operator_actor(), force)
    except (HomeInUse, IndexSound) as exc:
        err.print(f"[red]refused:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"{literal(path)} ({literal(done.finding)}) set aside as "
                  f"{literal(done.moved_to)}.\n"
                  f"Start PAS (systemctl start pas): start-up recovery indexes the "
                  f"{counted(done.spool_files, 'file')} of the spool again; their studies are "
                  "routed again and none is evicted before the region confirms it again.",
                  highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``pas verify`` and ``pas cache`` to the main CLI."""
    app.command("verify")(verify)
    app.add_typer(cache_app, name="cache")
