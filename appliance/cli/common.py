"""What every ``pas`` command shares: the consoles, how a configuration error ends it, how a
command that only reads opens its database (read-only: it creates and migrates nothing, and a
missing or outdated database is one line), how one that writes opens it (a short wait for
the write lock, then "database busy"), and the argument types that name rows and states
(so that help lists the valid values and a bad one is refused by the parser, before any
database is opened)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from appliance.config import ConfigError

if TYPE_CHECKING:
    from appliance.ops.backup_folder import Pruned
    from appliance.store.db import Database

T = TypeVar("T")

# What a terminal would obey rather than show (ESC sequences, backspace, carriage return...).
# AE titles, actors, query keys, HL7 reasons and errors come from the network: shown as \xNN,
# never executed. A line feed only breaks the line, kept where a cell may wrap.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LF = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def visible(value: object, *, one_line: bool = False) -> str:
    """A value's text with its control characters written as ``\\xNN`` (line feeds too
    with ``one_line``)."""
    text = "" if value is None else str(value)
    control = _CONTROL if one_line else _CONTROL_BUT_LF
    return control.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def shown(value: object, *, one_line: bool = False) -> Text:
    """A value from the data (an AE title, a patient's name, a study description, an error,
    a check's detail) as a table cell: shown literally. Rich reads markup in a ``str`` cell:
    a peer's AE title ``[/CT]`` made ``pas status`` end in a MarkupError traceback for as
    long as its report was pending, and ``[contrast]`` in a description vanished."""
    return Text(visible(value, one_line=one_line))


def literal(value: object) -> str:
    """A value from the data put into a markup string (``f"[red]refused:[/red] {literal(x)}"``):
    escaped, so that its brackets are printed, never read as markup; control characters
    made visible as in :func:`shown`."""
    return escape(visible(value))

def _flags_take_no_value() -> None:
    """A flag reads ``--json`` in help, not ``--json <bool>``: typer 0.29's help gives every
    option a type column, a flag's (and its own ``--help``) too, as if it took a value
    (``pas status --json true`` is refused). Older typer left the flag's type out, and this
    changes nothing there."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "pas_flags_take_no_value", False):
        return

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        if self.is_flag and not self.count:
            return None
        return shown(self, ctx)

    display_type_rich.pas_flags_take_no_value = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()

# Every appliance command's --config and --json, worded once (pas doctor and pas send said
# "TOML file", pas prefetch "as for pas run", and half the --json had no help).
ConfigOption = typer.Option(None, "--config", "-c", help=(
    "TOML file; default: $PAS_CONFIG, else $PAS_HOME/appliance.toml if it exists, else "
    "(PAS_HOME unset) /etc/pas/appliance.toml if it exists, else built-in defaults"))
JsonOption = typer.Option(False, "--json", help="Machine-readable output")

# Written to a file or a pipe (``pas studies > list.txt``, ``| grep``), Rich sizes tables to
# 80 columns and cut every UID to "1.2.840.113…": a table keeps its values whole there (up to
# this width), as on a terminal wide enough. Also when $COLUMNS is exported (CI runners and
# some service managers export COLUMNS=80): a script reading the table wants whole UIDs.
# On a terminal Rich follows the terminal's width (or $COLUMNS) as before.
PIPE_WIDTH = 1000
console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
# Errors stay one line each (no wrapping at the terminal width): greppable in scripts and logs.
err = Console(stderr=True, soft_wrap=True)


# SQLite's INTEGER is 64-bit: a larger ID names no row (it raised OverflowError at binding).
ROW_ID_MAX = 2**63 - 1


class JobState(StrEnum):
    """The states of a delivery job (``jobs.state``)."""

    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"


class PrefetchState(StrEnum):
    """The states of a prefetch request (``prefetch_requests.state``)."""

    pending = "pending"
    running = "running"
    fetched = "fetched"
    failed = "failed"
    cancelled = "cancelled"


def settings_or_exit(load: Callable[[], T]) -> T:
    """Load settings; on a configuration error print every problem and exit with status 2."""
    try:
        return load()
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"[red]config error[/red] {literal(problem)}", highlight=False)
        raise typer.Exit(2) from None


def refuse_hidden_problems(checked: Path | None, hidden: list[str], variables: str,
                           daemon: str, said: list[str] = ()) -> None:  # type: ignore[assignment]
    """``pas config check`` and ``pas hub config check``: a file value an environment
    variable replaces now (``variables``: ``PAS_*`` or ``PAS_HUB_*``) is still a problem of
    the file, refused by ``daemon`` once the variable is gone; each said, then exit 2.
    ``said``: the problems of the settings as the environment makes them, printed already
    (exit 2 after these too): the file's own problems among them are not said twice.
    Before, any such problem made the check stop there, and the hidden ones were learnt
    only at the next run, once the others were fixed."""
    hidden = hidden_problems(checked, hidden, variables, daemon, said)
    for problem in hidden:
        err.print(f"[red]config error[/red] {literal(problem)}", highlight=False)
    if hidden or said:
        raise typer.Exit(2)


def hidden_problems(checked: Path | None, hidden: list[str], variables: str, daemon: str,
                    said: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    """The file's problems an environment variable hides now (see
    :func:`refuse_hidden_problems`), each in the words that say so, those in ``said`` left
    out; also what ``--json`` lists."""
    return [f"in {checked} (a {variables} variable replaces it now; without it {daemon} "
            f"refuses the file): {problem}" for problem in hidden if problem not in said]


# Where an administrator's shell finds the appliance's data: the hint when there is no database.
HOME_HINT = ("not the home pas run uses? set PAS_HOME, or --config / PAS_CONFIG (on the "
             "appliance: /etc/pas/appliance.toml, home /var/lib/pas)")


# An interactive command waits this long for another process's write lock, then says the
# database is busy (pas's entry point, appliance.cli.main:main), instead of 30 s of silence
# then "database is locked". The daemon keeps BUSY_TIMEOUT_MS (store/db.py): its writes must
# ride over another's long transaction, and nobody waits at a prompt for them.
INTERACTIVE_BUSY_TIMEOUT_MS = 5_000
BUSY_MESSAGE = "database busy: another pas process holds a write lock; try again"


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock we waited for."""
    import sqlite3

    name = getattr(exc, "sqlite_errorname", "") or ""
    return isinstance(exc, sqlite3.OperationalError) and (
        name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in str(exc))


def write_database(path: Path, migrations: list[str] | None = None,
                   busy_timeout_ms: int = INTERACTIVE_BUSY_TIMEOUT_MS, *,
                   create: bool = False, hint: str = HOME_HINT) -> Database:
    """The database for an interactive command that writes, waiting at most
    ``busy_timeout_ms`` for the write lock. Created only by a command that sets a home up
    (``create``: ``pas hub init``): a retry or a pin on a mistyped home used to create an
    empty database there and then say the job or the study did not exist.

    Never migrated: a schema older (or newer) than this software's is refused in the words
    of :func:`read_database`, exit 1. Only the daemon migrates, at its start (``pas run``,
    ``pas hub run``): a newer ``pas hub token`` typed between the switch of versions and the
    restart migrated the live database under the older hub still serving on it (which then
    ran on a schema it does not know, and refused it once restarted, with no copy taken
    before). A database of schema 0 (a new file) is made whole, as a new home's."""
    from appliance.store.db import Database, schema_refusal
    from appliance.store.ops import schema_version_of
    from appliance.store.schema import MIGRATIONS

    if not create and not path.exists():
        err.print(f"[red]no database at {literal(path)}[/red] ({literal(hint)})",
                  highlight=False)
        raise typer.Exit(1)
    known = MIGRATIONS if migrations is None else migrations
    # Read only, nothing created beside it; what SQLite refuses (busy, not a database) is
    # said by pas's entry point (appliance.cli.main:main), as the open's own errors were.
    version = schema_version_of(path, untouched=True) if path.exists() else 0
    refusal = schema_refusal(path, version, known) if version else None
    if refusal is not None:
        err.print(f"[red]{literal(refusal)}[/red]", highlight=False)
        raise typer.Exit(1)
    return Database(path, known, busy_timeout_ms=busy_timeout_ms)


def read_database(path: Path, migrations: list[str] | None = None,
                  hint: str = HOME_HINT) -> Database:
    """The database for a command that only reads: opened read-only, nothing created or
    migrated. No database, or a schema other than this software's: one line, exit 1."""
    from appliance.store.db import Database, DatabaseUnavailable

    try:
        if migrations is None:
            return Database(path, readonly=True, busy_timeout_ms=INTERACTIVE_BUSY_TIMEOUT_MS)
        return Database(path, migrations, readonly=True,
                        busy_timeout_ms=INTERACTIVE_BUSY_TIMEOUT_MS)
    except DatabaseUnavailable as exc:
        where = f" ({hint})" if not path.exists() else ""
        err.print(f"[red]{literal(exc)}[/red]{literal(where)}", highlight=False)
        raise typer.Exit(1) from None


def operator_actor(environ: Mapping[str, str] | None = None,
                   cgroup: Path = Path("/proc/self/cgroup"),
                   loginuid: Path = Path("/proc/self/loginuid")) -> str:
    """Who a command acts as, in the audit trail: the systemd unit that ran it,
    ``system:pas-backup.timer`` (:func:`systemd_starter`), else the operator,
    ``operator:<login>`` (:func:`login_name`). Under the backup timer the login is the
    service's user: every nightly backup read ``operator:pas``, as if someone had typed it.

    Read from what the kernel keeps for the process, never from variables its user sets:
    ``LOGNAME=dr_house pas cache unpin ...`` wrote ``operator:dr_house``, and
    ``INVOCATION_ID=1 TRIGGER_UNIT=pas-backup.timer pas cache purge ...`` put an
    operator's forced purge on the nightly timer."""
    unit = systemd_starter(os.environ if environ is None else environ, cgroup)
    if unit is not None:
        return f"system:{unit}"
    return f"operator:{login_name(loginuid)}"


# /proc/self/loginuid of a process no login started (a container, a service): unset.
_NO_LOGIN_UID = 4294967295


def login_name(loginuid: Path = Path("/proc/self/loginuid")) -> str:
    """The login of the person at the keyboard: the audit login uid the kernel keeps from
    the login on (pam_loginuid: ``sudo`` and ``su`` keep it, the user cannot change it),
    else the effective user; ``alice as pas`` under ``sudo -u pas`` (which set
    ``LOGNAME`` to ``pas``: every operator's action read ``operator:pas``)."""
    import pwd

    def name(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:  # no passwd entry in some containers
            return str(uid)

    effective = os.geteuid()
    try:
        login = int(loginuid.read_text().strip())
    except (OSError, ValueError):
        login = _NO_LOGIN_UID
    if login in (_NO_LOGIN_UID, effective):
        return name(effective)
    return f"{name(login)} as {name(effective)}"


# A unit name as systemd writes it (systemd.unit(5)): nothing else goes into the audit trail.
_UNIT_NAME = re.compile(r"[\w:.@\\-]{1,256}\.(?:service|timer|path|socket)")


def systemd_starter(environ: Mapping[str, str], cgroup: Path) -> str | None:
    """The unit that started this command, when systemd started it as a system service; None
    otherwise (an operator's shell). The process's cgroup says it (the kernel's, under
    ``system.slice``: the service's own name, ``systemctl start pas-backup`` by hand); only
    then is ``TRIGGER_UNIT`` (the timer or path unit that activated the service,
    systemd.exec(5)) taken, for the timer's name. Variables alone (``INVOCATION_ID``,
    ``TRIGGER_UNIT``) were taken, and anyone could set them; never a ``PAS_*`` one either
    (those are configuration overrides: config_env.py)."""
    try:
        lines = cgroup.read_text().splitlines()
    except OSError:
        return None
    service = None
    for line in lines:  # "0::/system.slice/pas-backup.service" (v2), "1:name=systemd:/..." (v1)
        path = line.split(":", 2)[-1]
        parts = path.strip("/").split("/")
        if len(parts) >= 2 and parts[0] == "system.slice" and _UNIT_NAME.fullmatch(parts[1]):
            service = parts[1]
            break
    if service is None:
        return None
    trigger = environ.get("TRIGGER_UNIT", "")
    return trigger if _UNIT_NAME.fullmatch(trigger) else service


# pas backup's and pas hub backup's --keep: the daily timer's way to stop filling the disk.
KeepOption = typer.Option(None, "--keep", metavar="N", help=(
    "After the backup is written whole, remove the older backups of the same kind (and "
    "site, or hub) in DESTINATION beyond the N newest; N >= 1"))


def refuse_bad_keep(keep: int | None) -> None:
    """Before anything is written: ``--keep 0`` would remove the backup just written."""
    if keep is not None and keep < 1:
        err.print(f"[red]refused:[/red] --keep {keep}: keep at least 1 backup (the one just "
                  "written is always kept); nothing written", highlight=False)
        raise typer.Exit(2)


def report_pruned(pruned: Pruned | None) -> None:
    """What --keep removed, and, when a removal failed, exit 1: the backup is written, but a
    timer whose older backups are not removed fills the disk, and must be seen failing."""
    if pruned is None:
        return
    if pruned.removed:
        console.print(f"--keep {pruned.keep}: removed {literal(', '.join(pruned.removed))}",
                      highlight=False)
    if pruned.stale_partials_removed:
        console.print("removed the temporary folders of backups that stopped before their "
                      f"end: {literal(', '.join(pruned.stale_partials_removed))}",
                      highlight=False)
    exit_on_prune_problems(pruned)


def exit_on_prune_problems(pruned: Pruned | None) -> None:
    if pruned is not None and pruned.problems:
        for problem in pruned.problems:
            err.print(f"[red]--keep {pruned.keep}:[/red] {literal(problem)} (the new backup is "
                      "written)", highlight=False)
        raise typer.Exit(1)


ERROR_CELL_CHARS = 300


def error_cell(text: str | None) -> Text:
    """A job's or request's last error as a table cell: whole up to :data:`ERROR_CELL_CHARS`
    (the table wraps it), cut with an ellipsis past that (``--json`` has it all). Cut at 50
    or 60 characters, the part that says what to do was lost: "waiting for credentials:
    destinations.pacs.tls_key can be read by others (chmod 600 ...)" ended at "by oth".
    Shown literally (:func:`shown`): an error quotes what a peer said."""
    text = text or ""
    return shown(text if len(text) <= ERROR_CELL_CHARS else text[:ERROR_CELL_CHARS - 1] + "…")
