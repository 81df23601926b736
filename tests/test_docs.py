"""The docs say what the product does. Hospital IT and regional ops run PAS from README.md,
docs/*.md and image/README.md: every ``pas ...`` command line written there (in code
blocks and in backticks), every configuration key and ``PAS_...`` variable, every TOML
snippet, metric name and audit event kind must exist in the code, or an operator types
something the appliance refuses, or watches a series that never comes. Each is checked
against the code itself (the typer CLI's command tree, the pydantic models, the metric
families the source makes), in-process: the whole file runs in about a second.

The example configurations are checked elsewhere: test_config.py (every model key is in
them, the appliance's files load); here, what they hold beyond that (their commented keys,
the hub's file loading at all)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import typer.main
from pydantic import BaseModel

from appliance.cli.main import app
from appliance.config import ConfigError, Settings, build
from appliance.hub.config import HubSettings, load_hub_settings
from appliance.store.audit import EVENTS
from tests.support.docs import (
    DOCS,
    KEY,
    VARIABLE,
    Code,
    blocks,
    check_command,
    code,
    command_words,
    every_code,
    exported_families,
    metric_mentions,
    names_code_or_file,
    reference_problems,
    resolves,
    variable_key,
)
from tests.support.peers import ROOT

CLI = typer.main.get_command(app)
MODELS = {"appliance": Settings, "hub": HubSettings}
OPERATIONS = ROOT / "docs" / "operations.md"


def _report(problems: list[str]) -> str:
    return f"{len(problems)} wrong in the docs:\n" + "\n".join(problems)


# --- pas command lines -----------------------------------------------------------------------

def test_every_documented_command_line_is_a_real_command() -> None:
    """``pas queue retry ID``, ``sudo -u pas pas status``, ``pas cache status/evict/pin``:
    each command, subcommand, option and enumerated value (``--event commitment``) exists.
    Placeholders (``ID``, ``FILE.dcm``, ``--token TOKEN``) stand for the reader's values."""
    lines = [(piece, command_words(piece.text)) for piece in every_code()]
    lines = [(piece, words) for piece, words in lines if words is not None]
    assert len(lines) > 100, "the docs' command lines were not found"
    problems = [f"{piece.where}: `{piece.text}`: {problem}" for piece, words in lines
                for problem in check_command(CLI, words)]
    assert not problems, _report(problems)


@pytest.mark.parametrize("line, wrong", [
    ("pas hub tokenz SITE", "pas hub: no command 'tokenz'"),
    ("pas queue retry --force ID", "pas queue retry: no option --force"),
    ("pas audit --event commitments", "pas audit --event: 'commitments' is not one of"),
    ("pas cache status/evict/sweep", "pas cache: no command 'sweep'"),
    ("sudo -u pas pas status --jsn", "pas status: no option --jsn"),
    ("pas status FILE", "pas status takes 0 argument(s), the doc gives FILE"),
    ("pas queue", None),  # a group, as prose names it
    ("pas send --calling-ae CT2 DIR", None),
    ("cannot start: another pas run (pid N) is using ...", None),  # a message, not a command
])
def test_the_command_check_finds_what_is_wrong(line: str, wrong: str | None) -> None:
    """The checker itself: a wrong command, option or value is named; a message that quotes
    ``pas run`` is not taken for a command line."""
    words = command_words(line)
    problems = check_command(CLI, words) if words is not None else []
    if wrong is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(wrong), problems


def _leaves(command: object, shown: str = "pas") -> list[str]:
    """Every command that runs something (``pas cache pin``, not the group ``pas cache``)."""
    commands = getattr(command, "commands", None)
    if not commands:
        return [shown]
    return [leaf for name, sub in sorted(commands.items())
            for leaf in _leaves(sub, f"{shown} {name}")]


def _named(words: list[str], command: object, shown: str = "pas") -> list[str]:
    """The commands a documented line names: ``pas cache status/evict`` names two."""
    commands = getattr(command, "commands", None)
    if not commands or not words or words[0].startswith("-"):
        return [shown]
    return [leaf for name in words[0].split("/") if name in commands
            for leaf in _named(words[1:], commands[name], f"{shown} {name}")]


def test_the_readmes_table_names_every_command() -> None:
    """README.md's "Using it" is the list IT starts from: a command missing there is one
    they do not know they have."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| `pas ")]
    named = {command for row in rows for span in re.findall(r"`([^`]+)`", row.split(" | ")[0])
             if (words := command_words(span.replace("\\|", "|"))) is not None
             for command in _named(words, CLI)}
    missing = [leaf for leaf in _leaves(CLI) if leaf not in named]
    assert not missing, f"README.md's command table lacks {missing}"


# --- configuration keys and variables --------------------------------------------------------

def _owners(dotted: str) -> list[type[BaseModel]]:
    """The models whose section (or top-level key) the name begins with: ``dicom.port``
    the appliance's, ``limits.max_buckets`` the hub's, ``http.port`` either."""
    first = re.split(r"[.\[]", dotted)[0]
    return [model for model in MODELS.values() if first in model.model_fields]


def test_every_configuration_key_named_in_the_docs_exists() -> None:
    """``dicom.storage_commitment_give_up_h``, ``routing.rules.2.continue``, ``[audit]
    syslog_host``: a key of the appliance's model (appliance/config_sections.py) or of the
    hub's (appliance/hub/config.py) when its first part is one of their sections. A dotted
    name of code (``cache.reconcile``) or of a file (``hub.json``) is left alone, as long as
    that code or file exists."""
    problems, checked = [], 0
    for piece in every_code():
        if piece.block is not None:
            continue
        section = re.fullmatch(r"\[([a-z_.]+)\] ([a-z_]+)", piece.text)
        dotted = f"{section[1]}.{section[2]}" if section else piece.text
        owners = _owners(dotted) if KEY.fullmatch(dotted) else []
        if not owners:
            continue
        checked += 1
        if not any(resolves(model, dotted) for model in owners) \
                and not names_code_or_file(dotted):
            problems.append(f"{piece.where}: `{piece.text}` names no configuration key (nor "
                            "a function, module or file of appliance/)")
    assert checked > 100, "the docs' configuration keys were not found"
    assert not problems, _report(problems)


def _read_outside_the_docs(name: str) -> bool:
    """A variable that is no configuration key (``PAS_HOME``, ``PAS_FAULT_ROUNDS``) is read
    somewhere: the code, the tests, the benchmarks, the image, the scripts."""
    for folder in ("appliance", "tests", "bench", "image", "scripts"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".py", ".sh") \
                    and path.name != "test_docs.py" and name in path.read_text(errors="replace"):
                return True
    return False


def test_every_environment_variable_named_in_the_docs_is_read() -> None:
    """``PAS_DICOM__PORT`` sets ``dicom.port`` (appliance/config_env.py's rules),
    ``PAS_HUB_HTTP__PORT`` the hub's ``http.port``, ``PAS_SITE`` the top-level ``site``;
    one that names a key must name a real one. Any other (``PAS_HOME``, ``PAS_CONFIG``,
    ``PAS_FAULT_SEED``) must be read by the code or the tests."""
    names = {}
    for path in [*DOCS, ROOT / "config" / "appliance.example.toml",
                 ROOT / "config" / "hub.example.toml"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in VARIABLE.findall(line):
                names.setdefault(name, f"{path.relative_to(ROOT)}:{number}")
    assert {"PAS_DICOM__PORT", "PAS_HUB_HTTP__PORT", "PAS_HOME"} <= set(names)
    problems = []
    for name, where in sorted(names.items()):
        key = variable_key(name)
        if key is None and not _read_outside_the_docs(name):
            problems.append(f"{where}: {name} is no configuration key and nothing reads it")
        elif key is not None and not resolves(MODELS[key[0]], key[1]):
            problems.append(f"{where}: {name} would set {key[0]} key {key[1]}, which does "
                            "not exist")
    assert not problems, _report(problems)


# Fenced TOML that is not a configuration file: the first-boot seed (image/README.md, the
# keys pas-firstboot reads), recognised by its own tables.
SEED_TABLES = {"network", "firewall", "ssh"}


def test_every_toml_snippet_in_the_docs_is_a_valid_configuration() -> None:
    """What IT copies into /etc/pas/appliance.toml from the docs loads as it is."""
    problems, checked = [], 0
    for path in DOCS:
        for block in blocks(path):
            if block.lang != "toml":
                continue
            data = tomllib.loads(block.text)
            if SEED_TABLES & set(data):
                continue
            checked += 1
            try:
                build(Settings, data)
            except ConfigError as exc:
                problems += [f"{path.relative_to(ROOT)}:{block.line}: {p}" for p in exc.problems]
    assert checked >= 4, "the docs' TOML snippets were not found"
    assert not problems, _report(problems)


_COMMENTED_KEY = re.compile(r"^#\s*([a-z_]+)\s*=")
_HEADER = re.compile(r"^#?\s*\[\[?([a-z0-9_.]+)\]\]?\s*$")  # [hl7.tls] too


@pytest.mark.parametrize("example", ["appliance.example.toml", "hub.example.toml"])
def test_the_example_configurations_commented_keys_exist(example: str) -> None:
    """A key the example shows commented out (``# cert = "/etc/pas/dicom.crt"``) is what IT
    uncomments: it must be a key of its section. The keys set are loaded by test_config.py
    (the appliance's) and by the next test (the hub's)."""
    model = Settings if example.startswith("appliance") else HubSettings
    section, problems, checked = "", [], 0
    for number, line in enumerate((ROOT / "config" / example).read_text().splitlines(), 1):
        header = _HEADER.match(line.strip())
        if header:
            section = header[1]
            continue
        commented = _COMMENTED_KEY.match(line.strip())
        if not commented:
            continue
        checked += 1
        dotted = f"{section}.{commented[1]}" if section else commented[1]
        if not resolves(model, dotted):
            problems.append(f"config/{example}:{number}: {dotted} is no key")
    assert checked >= 1
    assert not problems, _report(problems)


def test_the_hub_example_configuration_loads(tmp_path: Path) -> None:
    """config/hub.example.toml, as regional ops copy it to $PAS_HUB_HOME/hub.toml."""
    settings = load_hub_settings(ROOT / "config" / "hub.example.toml",
                                 environ={"PAS_HUB_HOME": str(tmp_path)})
    assert settings.http.port == 8443 and settings.archive.kind == "embedded"


# --- metrics and audit events ----------------------------------------------------------------

def test_every_metric_named_in_the_docs_is_exported() -> None:
    """A name as Prometheus stores it (a counter with ``_total``), with labels the family
    has: ``pas_wan_bytes_total{direction="down"}``, ``..._backlog_oldest_age_seconds{
    priority=...}`` after ``pas_fleet_site_up``."""
    families = exported_families()
    samples = {sample: family for family in families.values() for sample in family.samples}
    problems, checked = [], 0
    for path in DOCS:
        for piece, name, labels in metric_mentions(path):
            checked += 1
            family = samples.get(name)
            if family is None:
                counter = families.get(name)
                hint = f" (a counter: {counter.samples[0]})" if counter else ""
                problems.append(f"{piece.where}: `{piece.text}`: no metric {name}{hint}")
            elif set(labels) - set(family.labels):
                problems.append(f"{piece.where}: `{piece.text}`: {name} has no label "
                                f"{sorted(set(labels) - set(family.labels))[0]} (its labels: "
                                f"{', '.join(family.labels) or 'none'})")
    assert checked > 50, "the docs' metric names were not found"
    assert not problems, _report(problems)


def test_every_alert_named_in_the_docs_is_a_shipped_rule() -> None:
    """``PasApplianceCredentialsRefused``: what a doc tells ops to expect is in
    image/monitoring/alerts.yml (whose names the monitoring tests check against /metrics)."""
    rules = set(re.findall(r"^\s*- alert: (\w+)$",
                           (ROOT / "image" / "monitoring" / "alerts.yml").read_text(),
                           re.MULTILINE))
    named = {(f"{path.relative_to(ROOT)}:{number}", name) for path in DOCS
             for number, line in enumerate(path.read_text().splitlines(), 1)
             for name in re.findall(r"\bPas[A-Z][A-Za-z]+\b", line)}
    assert len(rules) > 10 and len(named) >= 3
    problems = [f"{where}: no alert {name}" for where, name in sorted(named) if name not in rules]
    assert not problems, _report(problems)


def _metric_table() -> list[tuple[int, list[str], list[str]]]:
    """operations.md's metrics table: per row, its line, the names of its first cell and
    the labels of its second (``kind, state / destination``: one group per name)."""
    rows = []
    for number, line in enumerate(OPERATIONS.read_text().splitlines(), 1):
        if not line.startswith("| `pas_"):
            continue
        cells = line.split("|")[1:-1]
        names = re.findall(r"`(pas_[a-z0-9_]+)`", cells[0])
        labels = re.sub(r"\([^)]*\)", "", cells[1])
        rows.append((number, names, [group.strip() for group in labels.split("/")]))
    return rows


def test_the_metrics_table_names_every_family_with_its_labels() -> None:
    """docs/operations.md's table and fleet list name every family the appliance and the
    hub export (a new one undocumented is a failure too), each row with the labels its
    families have."""
    families = exported_families()
    samples = {sample: family for family in families.values() for sample in family.samples}
    named = {name for piece, name, labels in metric_mentions(OPERATIONS)}
    undocumented = sorted(name for name, family in families.items()
                          if not set(family.samples) & named)
    problems = [f"docs/operations.md: {name} ({families[name].source.relative_to(ROOT)}) "
                "is not documented" for name in undocumented]
    rows = _metric_table()
    assert len(rows) > 15
    for number, names, groups in rows:
        groups = groups * len(names) if len(groups) == 1 else groups  # the same for each
        if len(groups) != len(names):
            problems.append(f"docs/operations.md:{number}: {len(groups)} groups of labels "
                            f"for {len(names)} metrics")
            continue
        for name, group in zip(names, groups, strict=True):
            documented = {label.strip() for label in group.split(",") if label.strip()}
            family = samples.get(name)
            if family is not None and documented != set(family.labels):
                problems.append(f"docs/operations.md:{number}: {name}: labels "
                                f"{', '.join(sorted(documented)) or 'none'}, exported "
                                f"{', '.join(sorted(family.labels)) or 'none'}")
    assert not problems, _report(problems)


def test_the_families_read_from_the_source_are_what_a_scrape_shows(tmp_path: Path) -> None:
    """The two tests above read the families from the source (some show only once
    something happened); a scrape of a fresh appliance shows none beyond them."""
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.ops.metrics import build_registry, render
    from appliance.store.db import Database

    settings = build(Settings, {"home": str(tmp_path)})
    db = Database(tmp_path / "pas.sqlite")
    try:
        text = render(build_registry(settings, db)).decode()
    finally:
        db.close()
    scraped = {sample.name for family in text_string_to_metric_families(text)
               for sample in family.samples if not sample.name.endswith("_created")}
    read = {sample for family in exported_families().values() for sample in family.samples}
    assert len(scraped) > 15 and scraped <= read, sorted(scraped - read)


def test_the_audit_options_table_is_pas_audits() -> None:
    """docs/operations.md's table of ``pas audit`` options names each option the command
    has, and under ``--event`` every kind PAS writes (appliance.store.audit.EVENTS): the
    kind an auditor does not see listed is one they do not think of asking for."""
    text = OPERATIONS.read_text()
    table = text[text.index("| option | keeps |"):]
    table = table[:table.index("\n\n")]
    documented = set(re.findall(r"^\| `(--[a-z-]+)", table, re.MULTILINE))
    documented |= set(re.findall(r"^\| `--[a-z-]+`, `(--[a-z-]+)`", table, re.MULTILINE))
    options = {opt for param in CLI.commands["audit"].params
               if param.param_type_name == "option" for opt in param.opts
               if opt.startswith("--")} - {"--config"}
    assert documented == options, (sorted(options - documented), sorted(documented - options))
    row = next(line for line in table.splitlines() if line.startswith("| `--event"))
    kinds = re.findall(r"`([a-z0-9]+)`", row.split(" | ")[1])
    assert sorted(kinds) == sorted(EVENTS), (
        f"docs/operations.md: --event lists {sorted(set(kinds) ^ set(EVENTS))} wrongly "
        "(missing or not a kind)")


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _dotted_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + (field.alias or name))
    return keys


def test_the_hub_settings_list_names_every_hub_key() -> None:
    """docs/protocol.md's "Hub settings" is where regional ops look a key up (the hub's
    home aside: ``$PAS_HUB_HOME``, named there)."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("## Hub settings"):]
    section = section[:section.index("\n## ")]
    missing = [key for key in _dotted_keys(HubSettings)
               if key != "home" and f"`{key}`" not in section]
    assert not missing, f"docs/protocol.md, Hub settings: {missing} not listed"


def test_every_file_test_and_function_the_docs_cite_exists() -> None:
    """``tests/test_wan_black_hole.py``, ``test_audit.py::test_...``,
    ``appliance/ops/metrics.py``, ``appliance.store.audit.EVENTS``: the proof or the code a
    doc sends its reader to is there (a renamed test left its old name in the docs)."""
    pieces = [piece for piece in every_code() if piece.block is None]
    pieces += [Code(path, number, line.replace("`", " ")) for path in DOCS
               for number, line in enumerate(path.read_text().splitlines(), 1)]
    problems = sorted({f"{piece.where}: {problem}" for piece in pieces
                       for problem in reference_problems(piece)})
    assert not problems, _report(problems)


def test_doc_code_is_found_where_it_is() -> None:
    """The reader of the docs finds spans over line breaks and fenced lines joined by a
    backslash at the line they start on (the failures above name it)."""
    install = ROOT / "docs" / "install.md"
    enroll = next(piece for piece in code(install)
                  if piece.text.startswith("pas-firstboot --enrol ") and piece.block == "")
    lines = install.read_text().splitlines()
    assert lines[enroll.line - 1].startswith("pas-firstboot --enrol \\")
    assert "--enrol https:" in " ".join(enroll.text.split()) and enroll.block == ""
