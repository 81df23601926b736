"""``pas enroll``: an appliance joining its regional hub, with a one-time token.

Owns: parsing and printing, and where the token is read from (an option, a 0600 file,
standard input, the environment, the terminal); the work is in
``appliance.transfer.enrolment``. May not touch: SQL, key material beyond calling that.
Split from appliance/cli/hub.py (the hub's commands, another host's) when that passed 600
lines.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import typer

from appliance.cli.common import ConfigOption, console, err, literal, settings_or_exit

# Where the enrolment token comes from when no option names it: the environment of the
# process is readable by its own user only (/proc/PID/environ is 0400), unlike its arguments.
TOKEN_ENV = "PAS_ENROLL_TOKEN"
# A token is about 150 characters (SITE.SECRET.CAFP); more is not a token.
TOKEN_LIMIT = 4096


def enroll(hub: str = typer.Option(..., "--hub", help="https://host:port of the hub"),
           token: str | None = typer.Option(
               None, "--token",
               help="the token from `pas hub token SITE`; `-`: read it from standard input. "
                    "Written here it is visible to every user of this host while the command "
                    "runs (ps) and stays in the shell's history: prefer `-`, --token-file, "
                    f"{TOKEN_ENV} or, at a terminal, no option (asked for, not shown)"),
           token_file: Path | None = typer.Option(
               None, "--token-file",
               help="a file holding the token, readable by its owner only (0600)"),
           config: Path | None = ConfigOption,
           replace: bool = typer.Option(
               False, "--replace",
               help="enrol again over an existing enrolment (a revoked or expiring "
                    "certificate, a new token); the old one stays until the hub answered")
           ) -> None:
    """Enrol this appliance with its regional hub (key, CSR, pinned CA; files 0600).

    The one-time token comes from --token-file, standard input (--token -), $PAS_ENROLL_TOKEN
    or, at a terminal, a prompt that does not echo it."""
    # --config as for pas run: the enrolment goes under the home of the configuration the
    # daemon will run on (an IT account with /etc/pas/appliance.toml had to set PAS_CONFIG).
    from appliance.config import configured_site, load_settings
    from appliance.transfer.enrolment import EnrolmentError
    from appliance.transfer.enrolment import enroll as do_enroll
    from appliance.transfer.http import hub_proxy

    settings = settings_or_exit(lambda: load_settings(config))
    secret = _enrolment_token(token, token_file)
    try:
        enrolment = do_enroll(settings.home, hub, secret, replace=replace,
                              configured_site=configured_site(settings),
                              proxy=hub_proxy(settings.hub))
    except EnrolmentError as exc:
        err.print(f"[red]enrolment failed:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"enrolled as site {literal(enrolment.site)} with {literal(enrolment.url)}; "
                  f"files in {literal(enrolment.pki_dir)}", highlight=False)
    if replace:
        console.print("restart PAS to use the new certificate: systemctl restart pas")


def _enrolment_token(token: str | None, token_file: Path | None) -> str:
    """The token, from wherever the operator put it. An argument is in /proc/PID/cmdline,
    which every local user reads while ``pas enroll`` runs (and in the shell's history):
    the token is a one-time secret that enrols a site, so it also comes from places only
    this user reads (a 0600 file, standard input, the environment, a prompt), and the
    argument, kept for the scripts that use it, says that it was seen. A problem with the
    token's source ends the command (status 2) before anything is sent or written."""
    from appliance.ops.security import SecretFileError, read_secret_file

    if token is not None and token_file is not None:
        _no_token("give the token once: --token or --token-file, not both")
    if token_file is not None:
        try:
            data = read_secret_file(token_file, "--token-file", TOKEN_LIMIT)
        except SecretFileError as exc:
            _no_token(str(exc))
        text = data.decode("utf-8", "replace").strip()
        if not text:
            _no_token(f"--token-file {token_file}: the file is empty")
        return text
    if token == "-":
        if _stdin_is_terminal():
            return _ask_token()
        line = sys.stdin.readline(TOKEN_LIMIT).strip() if sys.stdin is not None else ""
        if not line:
            _no_token("--token -: no token on standard input")
        return line
    if token is not None:
        err.print("[yellow]warning:[/yellow] the token given with --token is visible to "
                  "other users of this host while pas enroll runs (ps, /proc/PID/cmdline) "
                  "and stays in the shell's history; use --token - (standard input), "
                  f"--token-file FILE (0600), {TOKEN_ENV}, or no option at a terminal",
                  highlight=False)
        return token
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return from_env
    if _stdin_is_terminal():
        return _ask_token()
    _no_token(f"no token: give --token-file FILE (0600), --token - (standard input) or "
              f"{TOKEN_ENV}, or run it at a terminal to be asked for it")


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except ValueError:  # closed
        return False


def _ask_token() -> str:
    """The token typed or pasted at the terminal, not echoed (getpass: /dev/tty)."""
    import getpass

    try:
        text = getpass.getpass("Enrolment token (from `pas hub token SITE`, not shown): ")
    except (EOFError, KeyboardInterrupt):
        err.print("")
        _no_token("no token typed")
    if not text.strip():
        _no_token("no token typed")
    return text.strip()


def _no_token(problem: str) -> NoReturn:
    err.print(f"[red]enrolment not attempted:[/red] {literal(problem)}; nothing was sent or "
              "written", highlight=False)
    raise typer.Exit(2)
