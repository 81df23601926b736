"""``pas hub ...``: the regional hub (``pas enroll``, an appliance joining it, is
appliance/cli/enroll.py).

Owns: parsing and printing only; the work is in ``appliance.hub``. May not touch: SQL, key
material beyond calling those.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.table import Table

from appliance.cli.common import (
    ROW_ID_MAX,
    JsonOption,
    console,
    err,
    literal,
    read_database,
    refuse_hidden_problems,
    settings_or_exit,
    shown,
    write_database,
)
from appliance.ops.status import human_size
from appliance.words import counted

if TYPE_CHECKING:  # the CLI imports the hub's modules only when a command runs
    from appliance.hub.config import HubSettings

hub_app = typer.Typer(help="The regional hub: PKI, enrolment tokens, the transfer service, "
                           "its backup.",
                      no_args_is_help=True)


@hub_app.callback()
def _private_files() -> None:
    """Everything the hub writes (keys, database, buckets, archive) is for its own user only."""
    os.umask(0o077)

HubConfigOption = typer.Option(None, "--config", "-c",
                               help="hub TOML (default: $PAS_HUB_HOME/hub.toml if present)")


def _hub_settings(path: Path | None):  # type: ignore[no-untyped-def]
    from appliance.hub.config import load_hub_settings

    return settings_or_exit(lambda: load_hub_settings(path))


hub_config_app = typer.Typer(help="The hub's configuration.", no_args_is_help=True)
hub_app.add_typer(hub_config_app, name="config")


@hub_config_app.command("check")
def hub_config_check(path: Path | None = typer.Argument(
        None, help="hub TOML to check (default: the one pas hub run would read, "
                   "$PAS_HUB_HOME/hub.toml if present; pas-hub.service: /etc/pas/hub.toml)"),
        as_json: bool = JsonOption) -> None:
    """Check a hub configuration as pas hub run does before it serves, writing nothing;
    print every problem with its key path (exit 2).

    Run the NEW version's check before a hub upgrade: the settings (an http:// archive.url
    beyond loopback without archive.allow_cleartext...), archive.ca_file read as a PEM
    bundle, the home (a hub's PKI, readable and writable by this user), its databases'
    schemas (none newer than this version's) and soundness."""
    from appliance.cli.common import hidden_problems
    from appliance.config import ConfigError
    from appliance.hub.check import check_home_only, check_hub
    from appliance.hub.config import (
        hub_config_path,
        hub_problems_the_environment_hides,
        ineffective_settings,
        load_hub_settings,
    )

    checked = hub_config_path(path)
    hidden = hub_problems_the_environment_hides(checked) if checked is not None else []
    try:
        settings = load_hub_settings(path)
    except ConfigError as exc:  # every problem in one run: the home's too
        problems = exc.problems + check_home_only(path).problems
        if as_json:
            _refused_json(problems + hidden_problems(checked, hidden, "PAS_HUB_*",
                                                     "pas hub run", problems))
        for problem in problems:
            err.print(f"[red]config error[/red] {literal(problem)}", highlight=False)
        refuse_hidden_problems(checked, hidden, "PAS_HUB_*", "pas hub run", problems)
    if as_json and hidden:
        _refused_json(hidden_problems(checked, hidden, "PAS_HUB_*", "pas hub run"))
    refuse_hidden_problems(checked, hidden, "PAS_HUB_*", "pas hub run")
    found = check_hub(settings)
    if as_json and found.problems:
        _refused_json(found.problems)
    for problem in found.problems:
        err.print(f"[red]config error[/red] {literal(problem)}", highlight=False)
    if found.problems:
        raise typer.Exit(2)
    archive = settings.archive
    if as_json:  # for a configuration management's check, as pas config check --json
        print(json.dumps({
            "ok": True, "problems": [], "warnings": ineffective_settings(settings),
            "config_file": str(checked) if checked is not None else None,
            "home": str(settings.home), "http_host": settings.http.host,
            "http_port": settings.http.port, "archive_kind": archive.kind,
            "archive_url": archive.url if archive.kind == "dicomweb" else None,
            "databases": found.schemas}, indent=2))
        return
    _warn_ineffective(settings)
    where = f" {archive.url}" if archive.kind == "dicomweb" else ""
    databases = "; ".join(found.schemas) or "no database yet (pas hub run creates it)"
    console.print(f"[green]hub configuration OK[/green]: home {literal(settings.home)}, "
                  f"https on {settings.http.host}:{settings.http.port}, archive "
                  f"{archive.kind}{where}; {databases}", highlight=False)
    if checked is None:  # "OK" of the built-in defaults read as the hub's own settings
        err.print(f"[yellow]no configuration file checked:[/yellow] {NO_HUB_FILE}",
                  highlight=False)


def _refused_json(problems: list[str]) -> NoReturn:
    """``pas hub config check --json`` of a configuration with problems: listed, exit 2."""
    print(json.dumps({"ok": False, "problems": problems}, indent=2))
    raise typer.Exit(2)


def _warn_ineffective(settings: HubSettings) -> None:
    """One ``warning:`` line per key set to no effect (hub/config.py): said, not refused."""
    from appliance.hub.config import ineffective_settings

    for warning in ineffective_settings(settings):
        err.print(f"[yellow]warning:[/yellow] {literal(warning)}", highlight=False)


# Said when no hub.toml was found (appliance/hub/config.py hub_config_path).
NO_HUB_FILE = ("none was found ($PAS_HUB_HOME/hub.toml, /etc/pas/hub.toml): this hub runs on "
               "its built-in defaults and PAS_HUB_* variables; --config FILE names another")

HUB_HOME_HINT = "not the hub's home? set PAS_HUB_HOME or --config; pas hub init creates it"


def _hub_db(settings, create: bool = False):  # type: ignore[no-untyped-def]
    """The hub database for a command that writes (a short wait for the write lock, then
    "database busy"; ``pas hub run`` opens its own, with the daemon's long wait)."""
    from appliance.store.hub_schema import HUB_MIGRATIONS

    return write_database(settings.db_path, HUB_MIGRATIONS, create=create, hint=HUB_HOME_HINT)


def _hub_reader(settings):  # type: ignore[no-untyped-def]
    """The hub database for a command that only reads: read-only, never created."""
    from appliance.store.hub_schema import HUB_MIGRATIONS

    return read_database(settings.db_path, HUB_MIGRATIONS, hint=HUB_HOME_HINT)


SITE_HELP = "site name: letters, digits, '-' or '_', at most 64"


def _check_site(site: str) -> str:
    """A name the hub can enrol. Not the shipped appliance.toml's placeholder: a token was
    issued for ``CHANGE-ME`` (exit 0), though ``pas enroll`` refuses to enrol a site so
    named; the site's own name was what the appliance needed."""
    from appliance.transfer.enrolment import SHIPPED_SITE, not_a_site

    if site == SHIPPED_SITE:
        err.print(f"[red]refused: {site!r} is the placeholder site name of the shipped "
                  "appliance.toml, not a site (pas enroll refuses it):[/red] issue the token "
                  "for the site's own name, the one its appliance's configuration is to say; "
                  "nothing written", highlight=False)
        raise typer.Exit(2)
    if not_a_site(site) is not None:
        err.print(f"[red]bad site name {site!r}:[/red] {SITE_HELP}")
        raise typer.Exit(2)
    return site


def _never_enrolled(site: str) -> NoReturn:
    """A site name this hub never knew: a typo, said as such (exit 1), not "nothing"."""
    err.print(f"[yellow]no site {site!r} was ever enrolled on this hub (pas hub sites "
              "lists them; names are case-sensitive)[/yellow]", highlight=False)
    raise typer.Exit(1)


@hub_app.command("init")
def hub_init(address: list[str] = typer.Option(
        None, "--address", "-a",
        help="DNS name or IP the appliances use to reach the hub (repeatable; "
             "default 127.0.0.1 and localhost)"),
        config: Path | None = HubConfigOption) -> None:
    """Create the fleet CA, the hub's server certificate and its X25519 transfer key.

    Run again after an interruption, it completes the home (the CA goes in last); a hub
    already initialised is refused, its CA never replaced."""
    from appliance.hub.pki import DEFAULT_ADDRESSES, HubPKI, PKIError
    from appliance.store.hub import issued_anything

    settings = _hub_settings(config)
    pki = HubPKI(settings.home)
    addresses = list(address or DEFAULT_ADDRESSES)
    # What the home's database says was issued (tokens, certificates): a home that has
    # issued something is a hub in use, whatever files it lacks, and is never rebuilt.
    issued = False
    if settings.db_path.exists() and (pki.exists() or pki.ca_key_path.exists()):
        db = _hub_db(settings)
        try:
            issued = issued_anything(db)
        finally:
            db.close()
    complete = pki.exists() and not pki.missing()
    finished: list[str] = []
    try:
        if complete and settings.db_path.exists():
            raise PKIError(f"{pki.ca_cert_path} exists: this hub is already initialised")
        if pki.exists() and not complete:
            if issued:  # a hub in use that lost files: new ones would cut its fleet off
                raise PKIError(f"{pki.ca_cert_path} exists and {', '.join(pki.missing())} "
                               "missing from a hub that has issued tokens or certificates: "
                               "put them back from the last hub backup (pas hub restore); "
                               "nothing written")
            # An older version's init interrupted: the CA kept, the rest made.
            finished = pki.finish(addresses)
        elif not pki.exists() and issued:
            raise PKIError(f"no {pki.ca_cert_path.name} in {settings.home}, but "
                           f"{pki.ca_key_path.name} is there and the database records "
                           f"tokens or certificates issued: put {pki.ca_cert_path.name} back "
                           "from the last hub backup (pas hub restore); nothing written")
        elif not pki.exists():
            pki.init(addresses, before_done=lambda: _hub_db(settings, create=True).close())
    except PKIError as exc:
        err.print(f"[red]{literal(exc)}[/red]", highlight=False)
        raise typer.Exit(1) from None
    _hub_db(settings, create=True).close()
    if complete:
        console.print(f"hub in {literal(settings.home)} was initialised but had no database "
                      f"({literal(settings.db_path)}): created it; CA fingerprint "
                      f"{pki.ca_fingerprint()}", highlight=False)
        return
    if finished:
        console.print(f"hub in {literal(settings.home)} completed (an earlier pas hub init "
                      f"was interrupted): made {', '.join(finished)}; CA fingerprint "
                      f"{pki.ca_fingerprint()}", highlight=False)
        return
    console.print(f"hub initialised in {literal(settings.home)}: server certificate for "
                  f"{', '.join(addresses)}; CA fingerprint {pki.ca_fingerprint()}")


@hub_app.command("token")
def hub_token(site: str = typer.Argument(..., help=SITE_HELP),
              valid_for: str = typer.Option(
                  "7d", "--valid-for",
                  help="how long the token may be spent: a whole number and s, m, h or d "
                       "(72h, 7d; at most 90d)"),
              config: Path | None = HubConfigOption) -> None:
    """Print a one-time enrolment token for SITE.

    stdout: the token alone; stderr: its identifier and when it expires. The journal
    records who issued it."""
    from appliance import logs
    from appliance.cli.common import operator_actor
    from appliance.hub.pki import HubPKI, PKIError, log_token_issued, parse_validity, utc_text
    from appliance.store.hub import add_token

    _check_site(site)
    try:
        validity = parse_validity(valid_for)
    except PKIError as exc:
        err.print(f"[red]bad --valid-for:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(2) from None
    settings = _hub_settings(config)
    pki = HubPKI(settings.home)
    if not pki.exists():
        err.print(f"[red]no hub under {literal(settings.home)}:[/red] run `pas hub init` "
                  "first", highlight=False)
        raise typer.Exit(1)
    logs.setup(settings.log_level)  # the WARNING line saying who: journald under systemd
    token, digest = pki.new_token(site)
    expires_at = time.time() + validity.total_seconds()
    add_token(_hub_db(settings), site, digest, expires_at)
    token_id = pki.token_id(digest)
    log_token_issued(site, token_id, expires_at, operator_actor())
    print(token)
    err.print(f"token {token_id} for site {site}, valid until {utc_text(expires_at)}",
              highlight=False)


@hub_app.command("tokens")
def hub_tokens(config: Path | None = HubConfigOption, as_json: bool = JsonOption) -> None:
    """Enrolment tokens issued (the latest 200), and whether spent.

    Site, identifier (as the hub's log names it), when issued, until when valid, and
    whether spent (--json: times as epoch seconds)."""
    from appliance.hub.pki import HubPKI, PKIError, utc_text
    from appliance.store.hub import list_tokens

    settings = _hub_settings(config)
    rows = list_tokens(_hub_reader(settings))
    pki = HubPKI(settings.home)
    try:  # the identifier's key comes from the CA key: the hub's user only
        for r in rows:  # the digest never shown, nor in --json
            r["token_id"] = pki.token_id(r.pop("secret_sha256"))
    except (PKIError, OSError) as exc:
        err.print(f"[red]cannot name the tokens:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=counted(len(rows), "enrolment token"))
    for column in ("site", "token", "issued", "valid until", "state"):
        table.add_column(column)
    for r in rows:
        table.add_row(shown(r["site"]), shown(r["token_id"]), utc_text(r["created_at"]),
                      utc_text(r["expires_at"]), "voided (pas hub revoke)"
                      if r["state"] == "voided" else r["state"])
    console.print(table)


@hub_app.command("password")
def hub_password(name: str = typer.Argument(..., help="The user name regional ops sign in "
                                                      "with (the browser asks for it)")) -> None:
    """Make the line of a dashboard user: ``NAME = "scrypt$..."`` for [dashboard.users].

    The password is read from the terminal (asked twice, not shown) or, piped, from the first
    line of standard input; at least 12 characters. Only its scrypt hash is printed: put the
    line under [dashboard.users] of hub.toml, set dashboard.auth = "basic", restart the hub."""
    from rich.markup import escape

    from appliance.hub.dashboard_auth import MIN_PASSWORD_LENGTH, hash_password, name_problem

    if (problem := name_problem(name)) is not None:
        err.print(f"[red]refused:[/red] {escape(problem)}", highlight=False)
        raise typer.Exit(2)
    if sys.stdin.isatty():
        password = typer.prompt(f"password for {name}", hide_input=True,
                                confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD_LENGTH:
        err.print(f"[red]refused:[/red] the password has {len(password)} characters; it needs "
                  f"at least {MIN_PASSWORD_LENGTH}", highlight=False)
        raise typer.Exit(2)
    print(f"{json.dumps(name)} = {json.dumps(hash_password(password))}")
    err.print('put this line under \\[dashboard.users] in hub.toml, with dashboard.auth = "basic", '
              "and restart the hub (pas hub config check reads it first)", highlight=False)


@hub_app.command("revoke")
def hub_revoke(site: str = typer.Argument(..., help="Site name, as pas hub sites lists it"),
               config: Path | None = HubConfigOption) -> None:
    """Refuse SITE's certificates from now on and void its unspent enrolment tokens.

    The running hub checks every request; a new token is the way back in. The journal
    records who did it."""
    from appliance import logs
    from appliance.cli.common import operator_actor
    from appliance.hub.pki import log_site_revoked, utc_text
    from appliance.store.hub import last_revoked_at, revoke_site

    settings = _hub_settings(config)
    db = _hub_db(settings)
    logs.setup(settings.log_level)  # the WARNING line saying who: journald under systemd
    count, tokens = revoke_site(db, site)
    if count or tokens:
        log_site_revoked(site, count, tokens, operator_actor())
    voided = f"voided {counted(tokens, 'unspent enrolment token')}" if tokens else ""
    if count == 0:
        if voided:
            console.print(f"no valid certificate of site {site} to revoke, {voided}")
            return
        # Revoked already (run twice: done, exit 0) told apart from a site this hub never
        # enrolled (a typo: exit 1); both said "no valid certificate to revoke", exit 1.
        revoked = last_revoked_at(db, site)
        if revoked is None:
            _never_enrolled(site)
        # In UTC, as pas hub sites shows it (local time here: one revocation, two clocks).
        console.print(f"site {site}: every certificate already revoked (the last on "
                      f"{utc_text(revoked)}); nothing to do", highlight=False)
        return
    console.print(f"revoked {counted(count, 'certificate')} of site {site}"
                  + (f", {voided}" if voided else ""))


@hub_app.command("sites")
def hub_sites(config: Path | None = HubConfigOption, as_json: bool = JsonOption) -> None:
    """Certificates issued, and their state.

    Valid, revoked (when), or superseded by a newer one of the site (--json: times as
    epoch seconds)."""
    from datetime import datetime

    from appliance.hub.pki import utc_text
    from appliance.store.hub import list_certificates

    rows = list_certificates(_hub_reader(_hub_settings(config)))
    if as_json:  # not_after is stored as ISO text: epoch seconds, as every other time
        print(json.dumps([{**r, "not_after": datetime.fromisoformat(r["not_after"]).timestamp()}
                          for r in rows], indent=2))
        return
    table = Table(title=counted(len(rows), "certificate"))
    for column in ("site", "serial", "valid until", "state"):
        table.add_column(column)
    for r in rows:  # the revocation's time: stored, shown before by a second revoke only
        table.add_row(shown(r["site"]), shown(r["serial"]), r["not_after"][:10],
                      f"superseded by {r['superseded_by']}" if r["state"] == "superseded"
                      else f"revoked {utc_text(r['revoked_at'])}" if r["state"] == "revoked"
                      else "valid")
    console.print(table)


@hub_app.command("transfers")
def hub_transfers(config: Path | None = HubConfigOption,
                  site: str | None = typer.Option(None, "--site",
                                                  help="Only this site's transfers"),
                  study: str | None = typer.Option(None, "--study", metavar="UID",
                                                   help="Only this study's transfers"),
                  limit: int = typer.Option(100, "--limit", min=1, max=ROW_ID_MAX,
                                            help="At most this many, the newest"),
                  as_json: bool = JsonOption) -> None:
    """Transfers, newest first: did a study reach the region, and when.

    Buckets held, bytes received, created, committed (UTC), not yet, or expired (--json:
    times as epoch seconds)."""
    from appliance.hub.pki import utc_text
    from appliance.store.hub import count_transfers, list_transfers, site_known

    reader = _hub_reader(_hub_settings(config))
    rows = list_transfers(reader, site, study, limit)
    if site is not None and not rows and not site_known(reader, site):
        _never_enrolled(site)  # "0 transfers" read as a site that had sent nothing yet
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    # The title said "100 transfers" of a hub holding thousands: say it is a part.
    total = count_transfers(reader, site, study) if len(rows) == limit else len(rows)
    title = (f"the {len(rows)} newest of {counted(total, 'transfer')} (--limit for more)"
             if total > len(rows) else counted(len(rows), "transfer"))
    table = Table(title=title)
    for column in ("site", "transfer", "study UID", "instances", "buckets", "received",
                   "created", "committed"):
        table.add_column(column)
    for r in rows:
        table.add_row(shown(r["site"]), shown(r["id"]), shown(r["study_uid"]),
                      str(r["instance_count"]),
                      f"{r['held']}/{r['bucket_count']}", human_size(r["bytes_received"]),
                      utc_text(r["created_at"]), utc_text(r["committed_at"])
                      if r["committed_at"] else "expired" if r["expired_at"] else "not yet")
    console.print(table)


@hub_app.command("run")
def hub_run(config: Path | None = HubConfigOption) -> None:
    """Serve the hub (HTTPS, TLS 1.3, mutual TLS on /api/v1) in the foreground."""
    from appliance import logs
    from appliance.hub.app import Hub, HubServer, bind_port
    from appliance.hub.pki import PKIError
    from appliance.store.db import SchemaTooNew
    from appliance.store.schema_drift import SchemaDiffers

    settings = _hub_settings(config)
    logs.setup(settings.log_level)
    _warn_ineffective(settings)
    from appliance.ops.home_lock import HomeInUse, hold_hub_lock
    from appliance.store.damage import damage_of

    try:  # one hub per home, held for the process's life (pas hub restore waits for it)
        home_lock = hold_hub_lock(settings.home) if settings.home.is_dir() else None
    except HomeInUse as exc:
        err.print(f"[red]cannot start the hub:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    if home_lock is not None:  # no backup restore runs now: what a killed one left, in clear
        from appliance.hub.restore import remove_restoring_leftovers, restore_under_way
        from appliance.ops.backup_folder import remove_clear_leftovers

        if (half_restored := restore_under_way(settings.home)) is not None:
            home_lock.close()
            err.print(f"[red]cannot start the hub:[/red] {literal(half_restored)}",
                      highlight=False)
            raise typer.Exit(1)
        for leftover in remove_restoring_leftovers(settings.home):
            logging.getLogger("pas.hub").warning(
                "start-up: removed %s, a copy a hub restore stopped before its end left",
                leftover)
        for leftover in remove_clear_leftovers(settings.home):
            logging.getLogger("pas.hub").warning(
                "start-up: removed %s, a clear copy of the hub's keys and database a sealed "
                "backup or restore stopped before its end left", leftover)

    finding = damage_of(settings.db_path) if settings.db_path.exists() else None
    if finding is not None:  # never written to: the file is the evidence, and the way back
        err.print(f"[red]cannot start the hub:[/red] the hub database "
                  f"{literal(settings.db_path)} is "
                  f"damaged ({finding}); keep it as it is and restore the hub home from its last "
                  "backup (pas hub restore FOLDER; docs/operations.md, Backing up the hub)",
                  highlight=False)
        raise typer.Exit(1)
    try:
        # The port first: a taken one fails the start before the clean-up and the archiver's
        # resumption run, in one line naming http.port (uvicorn binding it printed its own).
        sock = bind_port(settings.http.host, settings.http.port)
        try:
            hub = Hub(settings)
            server = HubServer(hub, sock=sock)
        except BaseException:
            sock.close()
            raise
    except (PKIError, OSError, SchemaTooNew, SchemaDiffers) as exc:
        err.print(f"[red]cannot start the hub:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    from appliance import __version__
    from appliance.hub.backup import backup_sealing
    from appliance.hub.config import open_dashboard
    from appliance.store.hub import hub_backup_record

    # Once the hub can serve (a start refused says its one line alone).
    if (open_words := open_dashboard(settings)) is not None:
        logging.getLogger("pas.hub").warning(open_words)
    # The appliance's pas doctor "backup sealing" row, said where regional ops look.
    verdict, sealing = backup_sealing(settings, hub_backup_record(hub.db)["folder"])
    logging.getLogger("pas.hub").log(logging.WARNING if verdict == "warn" else logging.INFO,
                                     sealing)
    console.print(f"hub serving on https://{settings.http.host}:{settings.http.port} "
                  f"(archive: {settings.archive.kind}), PAS {__version__}")
    try:
        server.run()  # logs "hub stopped" (the appliance's "PAS stopped")
    finally:
        if home_lock is not None:
            home_lock.close()


# pas hub backup and pas hub restore (their own module: this one had grown past 700 lines).
from appliance.cli import hub_backup as _hub_backup  # noqa: E402,F401 - registers them
