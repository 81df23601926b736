"""``pas config check``: a configuration validated as ``pas run`` would take it.

Owns: parsing and printing (every problem with its key path, exit 2; ``--json`` for a
configuration management's check); the work is in :mod:`appliance.config`. Also what the
home's database says of this version (:func:`database_check`): read only, never created nor
migrated, as ``pas hub config check`` reads the hub's; and the jobs it holds that name a
destination this configuration does not have (:func:`unconfigured_destinations`, a warning).
May not touch: the network, or the database in any other way. Split from
appliance/cli/main.py when that passed 600 lines.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import typer

from appliance.cli.common import (
    JsonOption,
    console,
    err,
    hidden_problems,
    literal,
    refuse_hidden_problems,
)
from appliance.config import (
    ConfigError,
    Settings,
    default_config_path,
    load_settings,
    problems_the_environment_hides,
)
from appliance.words import counted

config_app = typer.Typer(help="Configuration.", no_args_is_help=True)


@config_app.command("check")
def config_check(path: Path | None = typer.Argument(
        None, help="TOML file to check (default: the one pas run would read; see "
                   "pas run --help)"), as_json: bool = JsonOption,
        database: Path | None = typer.Option(
            None, "--database", help="the index database to check instead of the home's "
            "(pas-upgrade rollback: the copy it puts back), read only")) -> None:
    """Validate a configuration; print every problem with its key path (exit 2 if any).

    Also the home's database, read only: a schema newer than this version knows, or
    another build's, is a problem (pas run refuses it); an older one is not (pas run
    migrates it at its start)."""
    settings: Settings | None = None
    try:
        settings, said = load_settings(path), []
    except ConfigError as exc:
        said = exc.problems
    checked = path or default_config_path()
    hidden = problems_the_environment_hides(checked) if checked is not None else []
    if as_json:  # for a configuration management's check (Ansible's validate, a CI job)
        _config_check_json(settings, said + hidden_problems(checked, hidden, "PAS_*",
                                                            "pas run", said), database)
        return
    for problem in said:
        err.print(f"[red]config error[/red] {literal(problem)}", highlight=False)
    refuse_hidden_problems(checked, hidden, "PAS_*", "pas run", said)
    assert settings is not None
    site_problem = _enrolled_site_problem(settings)
    database_problem, database_said = database_check(settings, database)
    for problem in (site_problem, database_problem):
        if problem:
            err.print(f"[red]config error[/red] {literal(problem)}", highlight=False)
    if site_problem or database_problem:
        raise typer.Exit(2)
    for warning in (unconfigured_destinations(settings, database) + around_the_proxy(settings)
                    + files_to_check(settings)):
        err.print(f"[yellow]warning[/yellow] {literal(warning)}", highlight=False)
    from appliance.config import site_origin

    enrolled = " (its enrolment's)" if site_origin(settings) == "enrolment" else ""
    # "routing rules": "0 rules" was read as the prefetch's; the HL7 port is the RIS's.
    hl7 = f", HL7 port {settings.hl7.port}" if settings.hl7.enabled else ", HL7 off"
    console.print(f"[green]configuration OK[/green]: site {literal(settings.site)}{enrolled}, "
                  f"AE {literal(settings.dicom.ae_title)} port "
                  f"{settings.dicom.port}{hl7}, home {literal(settings.home)}, "
                  f"{counted(len(settings.routing.rules), 'routing rule')}, "
                  f"{counted(len(settings.destinations), 'destination')}"
                  f"{_and_the_hub(settings)}; {literal(database_said)}")


def _config_check_json(settings: Settings | None, problems: list[str],
                       database_path: Path | None = None) -> None:
    """``pas config check --json``: ``{"ok": false, "problems": [...]}`` (exit 2), each
    problem as the text check words it; or what the text check summarises, named."""
    database: str | None = None
    if settings is not None and not problems:
        site_problem = _enrolled_site_problem(settings)
        database_problem, database = database_check(settings, database_path)
        problems = [problem for problem in (site_problem, database_problem) if problem]
    if problems or settings is None:
        print(json.dumps({"ok": False, "problems": problems}, indent=2))
        raise typer.Exit(2)
    from appliance.config import site_origin
    from appliance.transfer.enrolment import EnrolmentError, load_enrolment

    try:
        enrolment = load_enrolment(settings.home)
        hub: str | None = enrolment.url if enrolment is not None else None
    except (EnrolmentError, OSError):  # pas doctor's to report, as the text check says
        hub = None
    # "warnings" only when there are: the answer of a home with no such jobs is what it
    # was (a configuration management's check may compare it whole).
    warnings = (unconfigured_destinations(settings, database_path)
                + around_the_proxy(settings) + files_to_check(settings))
    print(json.dumps({
        "ok": True, "problems": [], "site": settings.site, "site_from": site_origin(settings),
        "ae_title": settings.dicom.ae_title, "port": settings.dicom.port,
        "hl7_port": settings.hl7.port if settings.hl7.enabled else None,
        "home": str(settings.home),
        "rules": [rule.name for rule in settings.routing.rules],
        "destinations": {name: destination.kind
                         for name, destination in settings.destinations.items()},
        "enrolled_hub": hub, "database": database,
        **({"warnings": warnings} if warnings else {})}, indent=2))


def database_check(settings: Settings, path: Path | None = None) -> tuple[str | None, str]:
    """What ``pas run`` would say of the home's database before it serves, found while the
    running version still serves on it: (the problem that stops ``pas run``, or None; the
    summary's words). ``pas-upgrade install`` runs the new version's check before it
    switches: a version that does not know the database's schema (an older build, installed
    on a database a newer one migrated) passed it, was switched in, and its ``pas run``
    refused the database; PAS stayed down, restarted by systemd every 5 s.

    Read only (``mode=ro``; nothing created beside a database no process has open): an older
    schema is no problem (``pas run`` migrates it at its start, once the check has passed),
    a newer one is, and so is a table of this version's schema that differs (another build
    wrote it: ``pas run`` refuses it). Not the full ``quick_check`` (``pas doctor``'s, and
    the daemon's at its start): minutes on a large index, and no version's to find. A
    database this user cannot read is said and not counted as a problem (the check run by
    an administrator as themselves; pas-upgrade runs it as ``pas``). ``path``: another
    database than the home's (``--database``: ``pas-upgrade rollback`` checks the older
    version against the copy it puts back, not the database the newer one migrated)."""
    from appliance.store.ops import read_only_uri
    from appliance.store.schema import MIGRATIONS
    from appliance.store.schema_drift import find

    path, known = path or settings.db_path, len(MIGRATIONS)
    try:
        if not path.exists():
            return None, "no database yet (pas run creates it)"
    except OSError as exc:  # the home is not this user's to look into
        return None, f"database not checked ({exc.strerror}: run as pas, sudo -u pas)"
    if not os.access(path, os.R_OK):
        return None, (f"database {path} not checked (this user, uid {os.geteuid()}, cannot "
                      "read it: run as pas, sudo -u pas)")
    try:
        conn = sqlite3.connect(read_only_uri(path, untouched=True), uri=True, timeout=5)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # a SQLite file?
            schema = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = find(conn, MIGRATIONS).tables if schema == known else []
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:  # busy, cannot open: not the database's fault
        return None, f"database {path} not checked ({exc})"
    except sqlite3.DatabaseError as exc:  # not a database, damaged
        return (f"home: the index database {path} cannot be read ({exc}): pas run refuses "
                "it; pas doctor says what to do"), f"database {path} unreadable"
    if schema > known:
        return (f"home: the index database {path} has schema {schema}, newer than this "
                f"version knows ({known}): a newer PAS wrote it, and this version's pas run "
                "refuses it; run that version or a later one, or restore a backup this "
                "version made (pas restore)"), f"database schema {schema}"
    if tables:
        return (f"home: the index database {path}'s schema differs from this version's "
                f"({'; '.join(tables)}): another build of PAS wrote it, and this version's "
                "pas run refuses it (restore a backup of this version, or set the index "
                "aside: pas cache rebuild-index)"), f"database schema {schema}"
    state = ("current" if schema == known else
             "older: pas run migrates it at its start" if schema else "new")
    return None, f"database schema {schema} of {known} ({state})"


def around_the_proxy(settings: Settings) -> list[str]:
    """With ``hub.proxy`` set, a warning per DICOMweb peer beyond this machine that is
    reached directly, not through the proxy (only the hub's connections use it): where the
    firewall lets out to the proxy alone (the appliance image's, with a seed's proxy), such
    a peer is unreachable (review s42 F5). Not a problem: it may be on the hospital's own
    network. A STOW-RS destination ``through_proxy`` goes through it."""
    if not settings.hub.proxy:
        return []
    from urllib.parse import urlsplit

    from appliance.config_types import loopback_host
    from appliance.transfer.http import shown_url

    peers = [(f"destinations.{name}", destination.url)  # type: ignore[union-attr]
             for name, destination in settings.destinations.items()
             if destination.kind == "stowrs"
             and not destination.through_proxy]  # type: ignore[union-attr]
    if settings.prefetch.dicomweb_url and not settings.prefetch.dicomweb_through_proxy:
        peers.append(("prefetch.dicomweb_url", settings.prefetch.dicomweb_url))
    return [f"{key} ({shown_url(url)}) is reached directly, not through hub.proxy (the "
            "hub's connections, STOW-RS destinations with through_proxy = true and "
            "prefetch.dicomweb_through_proxy use it): check that the firewall lets it out"
            for key, url in peers
            if not loopback_host(urlsplit(url).hostname or "")]


def files_to_check(settings: Settings) -> list[str]:
    """A warning per file of the configuration this check cannot use as ``pas run`` would
    (``prefetch.dicomweb_ca_file``: ``pas run`` refuses to start on it), and per DICOMweb
    peer on this machine's loopback that the configuration sends through the proxy (the
    proxy would connect to its own loopback, not this machine's). Warnings, not problems:
    the check may run where the file is not, or as a user who may not read it."""
    from urllib.parse import urlsplit

    from appliance.config_types import loopback_host
    from appliance.transfer.http import shown_url
    from appliance.transfer.region import region_ca_problem

    said = [f"{problem}: pas run refuses to start on it"
            for problem in [region_ca_problem(settings.prefetch)] if problem]
    proxied = [(f"destinations.{name}.url", destination.url)  # type: ignore[union-attr]
               for name, destination in settings.destinations.items()
               if getattr(destination, "through_proxy", False)]
    if settings.prefetch.dicomweb_through_proxy and settings.prefetch.dicomweb_url:
        proxied.append(("prefetch.dicomweb_url", settings.prefetch.dicomweb_url))
    for key, url in proxied:
        if loopback_host(urlsplit(url).hostname or ""):
            said.append(f"{key} ({shown_url(url)}) is this machine's loopback, and goes "
                        "through hub.proxy: the proxy connects to its own loopback")
    return said


def unconfigured_destinations(settings: Settings, path: Path | None = None) -> list[str]:
    """A warning per destination that jobs in the home's database name and this
    configuration does not have (renamed or removed while they were queued): they wait,
    uncounted, for a configuration that names it again. Not a problem (exit 0): the
    configuration may mean it (the jobs are then the operator's to put right), and
    pas-upgrade runs this check. Read only, as :func:`database_check`; nothing said when the
    database cannot be read (that check says why)."""
    from appliance.store.jobs import naming_unconfigured
    from appliance.store.ops import read_only_uri

    path = path or settings.db_path
    try:
        if not path.exists() or not os.access(path, os.R_OK):
            return []
        conn = sqlite3.connect(read_only_uri(path, untouched=True), uri=True, timeout=5)
        try:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                            "AND name = 'jobs'").fetchone() is None:
                return []
            rows = naming_unconfigured(conn, sorted(settings.destinations))
        finally:
            conn.close()
    except (OSError, sqlite3.Error):
        return []
    said = []
    for row in rows:
        queued, failed = row["queued"], row["failed"]
        jobs = counted(queued, "queued job") if queued else counted(failed, "failed job")
        line = (f"{jobs} name{'s' if (queued or failed) == 1 else ''} destination "
                f"{row['destination']!r}, which this configuration does not have (renamed or "
                "removed?): ")
        if queued:
            line += ("they wait, uncounted, until a configuration naming it again is in "
                     "force (then restart PAS)")
            if failed:
                line += f"; {counted(failed, 'failed job')} too (pas queue retry, then)"
        else:
            line += ("pas queue retry sends them once a configuration naming it again is in "
                     "force")
        said.append(line)
    return said


def _and_the_hub(settings: Settings) -> str:
    """The region, when enrolled and not named among the destinations: ``pas run`` adds it
    as destination ``hub`` (where a study goes when no rule names one). "0 destinations"
    alone read as if studies went nowhere."""
    from appliance.transfer.enrolment import EnrolmentError, load_enrolment

    if "hub" in settings.destinations:
        return ""
    try:
        enrolment = load_enrolment(settings.home)
    except (EnrolmentError, OSError) as exc:  # pas doctor says what is wrong with it
        return f" (and the regional hub's enrolment is unreadable: {exc})"
    if enrolment is None:
        return ""
    return f" besides the regional hub {enrolment.url} (destination hub, enrolled)"


def _enrolled_site_problem(settings: Settings) -> str | None:
    """With an enrolment in the configuration's home, the site it names must be the
    enrolment's: pas run refuses otherwise, and pas-upgrade runs this check before it
    switches versions (image/rootfs/usr/local/sbin/pas-upgrade). An enrolment that cannot
    be read is pas doctor's to report: this command checks the configuration."""
    from appliance.config import configured_site
    from appliance.transfer.enrolment import EnrolmentError, SiteMismatch, check_site

    try:
        check_site(settings.home, configured_site(settings))
    except SiteMismatch as exc:
        return str(exc)
    except EnrolmentError:
        pass
    return None
