"""``pas config check``: a configuration validated as ``pas run`` would take it.

Owns: parsing and printing (every problem with its key path, exit 2; ``--json`` for a
configuration management's check); the work is in :mod:`appliance.config`. May not touch:
the database or the network. Split from appliance/cli/main.py when that passed 600 lines.
"""

from __future__ import annotations

import json
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
                   "pas run --help)"), as_json: bool = JsonOption) -> None:
    """Validate a configuration; print every problem with its key path (exit 2 if any)."""
    settings: Settings | None = None
    try:
        settings, said = load_settings(path), []
    except ConfigError as exc:
        said = exc.problems
    checked = path or default_config_path()
    hidden = problems_the_environment_hides(checked) if checked is not None else []
    if as_json:  # for a configuration management's check (Ansible's validate, a CI job)
        _config_check_json(settings, said + hidden_problems(checked, hidden, "PAS_*",
                                                            "pas run", said))
        return
    for problem in said:
        err.print(f"[red]config error[/red] {literal(problem)}", highlight=False)
    refuse_hidden_problems(checked, hidden, "PAS_*", "pas run", said)
    assert settings is not None
    site_problem = _enrolled_site_problem(settings)
    if site_problem:
        err.print(f"[red]config error[/red] {literal(site_problem)}", highlight=False)
        raise typer.Exit(2)
    from appliance.config import site_origin

    enrolled = " (its enrolment's)" if site_origin(settings) == "enrolment" else ""
    # "routing rules": "0 rules" was read as the prefetch's; the HL7 port is the RIS's.
    hl7 = f", HL7 port {settings.hl7.port}" if settings.hl7.enabled else ", HL7 off"
    console.print(f"[green]configuration OK[/green]: site {literal(settings.site)}{enrolled}, "
                  f"AE {literal(settings.dicom.ae_title)} port "
                  f"{settings.dicom.port}{hl7}, home {literal(settings.home)}, "
                  f"{counted(len(settings.routing.rules), 'routing rule')}, "
                  f"{counted(len(settings.destinations), 'destination')}"
                  f"{_and_the_hub(settings)}")


def _config_check_json(settings: Settings | None, problems: list[str]) -> None:
    """``pas config check --json``: ``{"ok": false, "problems": [...]}`` (exit 2), each
    problem as the text check words it; or what the text check summarises, named."""
    if settings is not None and not problems:
        site_problem = _enrolled_site_problem(settings)
        problems = [site_problem] if site_problem else []
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
    print(json.dumps({
        "ok": True, "problems": [], "site": settings.site, "site_from": site_origin(settings),
        "ae_title": settings.dicom.ae_title, "port": settings.dicom.port,
        "hl7_port": settings.hl7.port if settings.hl7.enabled else None,
        "home": str(settings.home),
        "rules": [rule.name for rule in settings.routing.rules],
        "destinations": {name: destination.kind
                         for name, destination in settings.destinations.items()},
        "enrolled_hub": hub}, indent=2))


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
