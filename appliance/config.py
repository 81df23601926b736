"""Configuration: one TOML file, a typed and validated model, environment overrides.

Owns: the whole model (:class:`Settings`, the sections it holds and the checks across them),
loading it from TOML and `PAS_*` variables, and turning validation failures into one readable
line per problem (``dicom.port: must be 1-65535, got 0``). The sections themselves (their keys,
defaults and checks within one section) are in :mod:`appliance.config_sections` and the value
types they share in :mod:`appliance.config_types`, both re-exported here; the variables read
against the model in :mod:`appliance.config_env`. May not touch: the database, the network,
the spool. Everything else receives an already validated :class:`Settings` object, and imports
configuration names from this module.

Precedence, lowest first: embedded defaults, the TOML file, ``PAS_<SECTION>__<KEY>``
environment variables. The systemd unit, the tests and the benchmarks rely on the last.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, PrivateAttr, ValidationError

from appliance.config_env import key_of, read_overrides
from appliance.config_sections import (
    AuditSection,
    BackupSection,
    CacheSection,
    Clock,
    Destination,
    DicomDestination,
    DicomSection,
    DicomTlsSection,
    Fallback,
    Hl7Section,
    HttpSection,
    HubDestination,
    HubSection,
    KnownAE,
    Match,
    MoveDestination,
    OpsSection,
    PrefetchMwl,
    PrefetchRule,
    PrefetchSection,
    PrefetchWindow,
    QueueSection,
    RateWindow,
    RoutingSection,
    Rule,
    ServingSection,
    StorageSection,
    StowRsDestination,
    StudySection,
)
from appliance.config_types import (
    MATCH_TIMEOUT_MS,
    PRIORITY_RANK,
    AETitle,
    Port,
    Priority,
    Regex,
    _Section,
)

# Deliberate re-exports: the rest of the code (and the tests) import every configuration name
# from here, wherever it is defined.
__all__ = [
    "AETitle", "AuditSection", "BackupSection", "CacheSection", "Clock", "ConfigError",
    "Destination",
    "DicomDestination", "DicomSection", "DicomTlsSection", "ENV_PREFIX", "Fallback",
    "Hl7Section", "HttpSection", "HubDestination", "HubSection", "KnownAE", "MATCH_TIMEOUT_MS",
    "Match",
    "MoveDestination", "OpsSection", "PRIORITY_RANK", "Port", "PrefetchMwl", "PrefetchRule",
    "PrefetchSection", "PrefetchWindow", "Priority", "QueueSection", "RateWindow", "Regex",
    "RoutingSection", "Rule", "ServingSection", "Settings", "StorageSection",
    "StowRsDestination", "StudySection", "build", "deep_merge", "default_config_path",
    "env_overrides", "format_validation_error", "load_settings", "read_toml",
    "site_origin", "with_enrolled_site",
]

ENV_PREFIX = "PAS_"


class ConfigError(Exception):
    """Raised with every problem found, one per line, each starting with its key path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Settings(_Section):
    """The appliance's whole configuration."""

    home: Path = Path("./var")
    site: str = "PAS"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    dicom: DicomSection = DicomSection()
    storage: StorageSection = StorageSection()
    cache: CacheSection = CacheSection()
    audit: AuditSection = AuditSection()
    backup: BackupSection = BackupSection()
    study: StudySection = StudySection()
    queue: QueueSection = QueueSection()
    http: HttpSection = HttpSection()
    ops: OpsSection = OpsSection()
    routing: RoutingSection = RoutingSection()
    hub: HubSection = HubSection()
    hl7: Hl7Section = Hl7Section()
    prefetch: PrefetchSection = PrefetchSection()
    serving: ServingSection = ServingSection()
    destinations: dict[str, Destination] = {}
    # True when ``site`` is the enrolment's name, put there by load_settings because the
    # configuration names none (configured_site, site_origin tell the cases apart).
    _site_from_enrolment: bool = PrivateAttr(default=False)

    def model_post_init(self, _context: Any) -> None:
        # Runs only once every field validated (so it hides no other problem) and reports
        # every unknown name at once; Settings is never nested, so nothing else is stopped.
        known = set(self.destinations) | {"hub"}
        problems = []
        for index, rule in enumerate(self.routing.rules):
            for name in rule.destinations:
                if name not in known:
                    problems.append(
                        f"routing.rules.{index}.destinations: unknown destination {name!r} "
                        f"(defined: {', '.join(sorted(known))})"
                    )
        for name in self.routing.fallback.destinations:
            if name not in known:
                problems.append(f"routing.fallback.destinations: unknown destination {name!r}")
        for index, prule in enumerate(self.prefetch.rules):
            for name in prule.push_to:
                if name not in self.destinations:
                    problems.append(f"prefetch.rules.{index}.push_to: unknown destination {name!r}")
        for name, destination in self.destinations.items():
            if getattr(destination, "through_proxy", False) and not self.hub.proxy:
                problems.append(f"destinations.{name}.through_proxy: hub.proxy is not set "
                                "(the hospital's proxy these requests would go through)")
        if self.prefetch.dicomweb_through_proxy and not self.hub.proxy:
            problems.append("prefetch.dicomweb_through_proxy: hub.proxy is not set (the "
                            "hospital's proxy these requests would go through)")
        if self.dicom.tls.ca is None:  # a workstation's certificate is checked against it
            for index, moved in enumerate(self.serving.move_destinations):
                if moved.uses_tls(self.dicom.tls.enabled):
                    problems.append(
                        f"serving.move_destinations[{index}].tls: {moved.title} is reached "
                        "over TLS: dicom.tls.ca (the CA its certificate chains to) is required")
        # A home that is a file (PAS_HOME set to one by mistake): pas run said "cannot start:
        # .../pki/hub.json: unreadable ([Errno 20] Not a directory)".
        if self.home.exists() and not self.home.is_dir():
            problems.append(f"home: {self.home} is not a folder (PAS_HOME or the file's home "
                            "names where PAS keeps its index and spool)")
        if problems:
            raise ConfigError(problems)

    # Paths derived from home, so that nothing else builds them by hand.
    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def db_path(self) -> Path:
        return self.home / "pas.sqlite"


def configured_site(settings: Settings) -> str | None:
    """The site the configuration names (the file's ``site`` or ``PAS_SITE``), None when it
    names none: then ``settings.site`` is the enrolment's name (:func:`with_enrolled_site`),
    or the default when not enrolled (transfer/enrolment.check_site compares the two)."""
    return settings.site if site_origin(settings) == "configuration" else None


def site_origin(settings: Settings) -> Literal["configuration", "enrolment", "default"]:
    """Where ``settings.site`` comes from: the configuration (the file's ``site`` or
    ``PAS_SITE``), the enrolment (the configuration names none: the name the hub knows this
    appliance by), or neither (the default "PAS": not enrolled, no name given)."""
    if settings._site_from_enrolment:
        return "enrolment"
    return "configuration" if "site" in settings.model_fields_set else "default"


def with_enrolled_site(settings: Settings) -> Settings:
    """``settings`` with the enrolment's site as ``site`` when the configuration names none.

    The one place the appliance's effective site is decided (:func:`load_settings`, so the
    daemon and every command agree). A configuration without ``site`` enrolled as CHU-A was
    CHU-A to the hub (its certificate) and "PAS" to its own audit trail, ``pas_info``,
    ``pas status``, the status page and its backups. A configuration that names its site
    keeps it (``pas run`` refuses one naming another than the enrolment's); an appliance
    not enrolled, or whose enrolment cannot be read (``pas doctor`` says why), keeps the
    default."""
    if "site" in settings.model_fields_set or settings._site_from_enrolment:
        return settings
    home = Path(settings.home)
    # os.path.exists: False on any OSError. Not enrolled: no import of the enrolment's
    # module (httpx, cryptography) for every command of an appliance without a hub.
    if not any(os.path.exists(home / folder / "hub.json") for folder in ("pki", "pki.new")):
        return settings
    from appliance.transfer.enrolment import enrolled_site

    name = enrolled_site(home)
    if name is None:
        return settings
    resolved = settings.model_copy(update={"site": name})
    resolved._site_from_enrolment = True
    return resolved


def _is_hub_variable(name: str) -> bool:
    """``PAS_HUB_<SECTION>__<KEY>`` configures the hub; ``PAS_HUB__<KEY>`` is the appliance's
    own ``[hub]`` section."""
    return name.startswith("PAS_HUB_") and not name.startswith("PAS_HUB__")


def env_overrides(environ: dict[str, str], prefix: str = ENV_PREFIX,
                  model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Collect ``PREFIX<SECTION>__<KEY>[__<SUBKEY>]`` (and, given ``model``, ``PREFIX<KEY>``
    for its top-level scalar keys) into a nested dict, each value read as the type of the key
    it sets (appliance/config_env.py). ConfigError when two variables set the same key."""
    ignore = _is_hub_variable if prefix == ENV_PREFIX else (lambda _name: False)
    tree, problems = read_overrides(environ, prefix, model, ignore)
    if problems:
        raise ConfigError(problems)
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_BOUNDS = {"greater_than": "greater than", "greater_than_equal": "at least",
           "less_than": "less than", "less_than_equal": "at most"}
_NUMBER_TYPES = {"int_type": "must be an integer", "float_type": "must be a number",
                 "finite_number": "must be a finite number"}


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem: ``key.path: what is wrong, got VALUE``."""
    tags = {"dicom", "hub", "stowrs"} if model is Settings else set()
    lines = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        # Discriminated unions add the tag to the path; it is noise to a reader.
        if len(loc) >= 3 and loc[0] == "destinations" and loc[2] in tags:
            del loc[2]
        kind = error["type"]
        message = error["msg"].removeprefix("Value error, ")
        # A section's own check names its key (appliance.config_types._cross_field).
        if kind == "cross_field":
            message = str(error["ctx"]["message"]).replace("{section}", ".".join(loc))
            loc.append(str(error["ctx"]["key"]))
        elif kind == "extra_forbidden":
            message = "unknown key" + _did_you_mean(model, loc)
        elif kind == "missing":
            message = "is required"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            # A destination's kind, said as the key the operator wrote; pydantic's words
            # ("Input tag 'dicomm' found using 'kind' does not match any of the expected
            # tags ..., got {the whole table}") named neither the key nor what to write.
            loc.append("kind")
            expected = error.get("ctx", {}).get("expected_tags") or "'dicom', 'hub', 'stowrs'"
            message = (f"must be one of {expected}, got {error['ctx']['tag']!r}"
                       if kind == "union_tag_invalid" else f"is required ({expected})")
        elif kind in ("model_type", "dict_type"):
            # A section or a list entry that is a table, written as a value: "Input should be
            # a valid dictionary or instance of KnownAE" named a Python class. A bare title
            # where a table is needed (known_aes = ["CT2"], as the first-boot seed takes
            # them) is answered with the table to write.
            value = error.get("input")
            message = f"must be a table ({{ key = value, ... }}), got {value!r}"
            if isinstance(value, str) and loc[-2:-1] in (["known_aes"], ["move_destinations"]):
                message += f": write {{ title = {json.dumps(value)} }}"
        elif kind in _BOUNDS:  # "Input should be greater than 0": said as the others
            limit = next(iter(error.get("ctx", {}).values()), "?")
            if isinstance(limit, float) and limit.is_integer():
                limit = int(limit)  # "at least 0", not "at least 0.0"
            message = f"must be {_BOUNDS[kind]} {limit}, got {error.get('input')!r}"
        elif kind == "too_short":  # "List should have at least 1 item after validation"
            least = error.get("ctx", {}).get("min_length", 1)
            message = f"must have at least {least} {'item' if least == 1 else 'items'}, " \
                      f"got {error.get('input')!r}"
        elif kind == "literal_error":
            # pydantic's "Input should be 'urgent', 'high' or 'routine'": said as every
            # other problem is ("must be ..., got ...").
            expected = error.get("ctx", {}).get("expected", "")
            message = f"must be one of {expected.replace(' or ', ', ')}, got " \
                      f"{error.get('input')!r}"
        elif kind != "value_error":
            # Numbers are strict (appliance.config_types._strict_numbers): say which
            # TOML type the key takes, and show a boolean as the file writes it.
            message = _NUMBER_TYPES.get(kind, message)
            value = error.get("input")
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            message = f"{message}, got {shown}"
        path = ".".join(loc) or "(top level)"
        lines.append(f"{path}: {message}")
    return lines


def _did_you_mean(model: type[BaseModel], loc: list[str]) -> str:
    """", did you mean 'port'?" for an unknown key close to a key of its table (a typo:
    ``prot``, ``max_atempts``, ``modalty``), else nothing."""
    import difflib

    current: Any = model
    for part in loc[:-1]:
        current = _member_model(current, part)
        if current is None:
            return ""
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return ""
    names = [field.alias or name for name, field in current.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.75)
    return f", did you mean {close[0]!r}?" if close else ""


def _member_model(annotation: Any, part: str) -> Any:
    """The type one step down ``annotation`` at ``part``: a model's field, a list's item (a
    number), a dict's value; None where that cannot be said (a union of kinds)."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _member_model(typing.get_args(annotation)[0], part)
    if origin in (list, dict):
        return typing.get_args(annotation)[-1]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(part) or next(
            (f for f in annotation.model_fields.values() if f.alias == part), None)
        return field.annotation if field is not None else None
    return None


def build(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(exc, model)
        if model is Settings:
            problems += [p for p in _unknown_destinations_in(data) if p not in problems]
        raise ConfigError(problems) from None


def _unknown_destinations_in(data: dict[str, Any]) -> list[str]:
    """``Settings.model_post_init``'s check of destination names, on the raw data: that
    check runs only once every field is valid, so a configuration with a bad regular
    expression *and* a rule naming an unknown destination was refused for the first alone;
    fixed, it was refused again for the second. ``pas config check`` promises every problem
    at once. Whatever is not shaped as expected here is left to the field errors."""
    def names(value: Any) -> list[str]:
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    def section(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    destinations = section(data.get("destinations"))
    known = set(destinations) | {"hub"}
    routing, prefetch = section(data.get("routing")), section(data.get("prefetch"))
    problems = []
    rules = routing.get("rules")
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        for name in names(section(rule).get("destinations")):
            if name not in known:
                problems.append(f"routing.rules.{index}.destinations: unknown destination "
                                f"{name!r} (defined: {', '.join(sorted(known))})")
    for name in names(section(routing.get("fallback")).get("destinations")):
        if name not in known:
            problems.append(f"routing.fallback.destinations: unknown destination {name!r}")
    prules = prefetch.get("rules")
    for index, prule in enumerate(prules if isinstance(prules, list) else []):
        for name in names(section(prule).get("push_to")):
            if name not in destinations:
                problems.append(f"prefetch.rules.{index}.push_to: unknown destination {name!r}")
    return problems


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except IsADirectoryError:  # pas config check /tmp: was a traceback
        raise ConfigError([f"{path}: is a directory, not a TOML file"]) from None
    except PermissionError:
        raise  # pas's entry point says it in one line, with whom to run as
    except OSError as exc:  # a path through a file, a loop of links, an I/O error
        raise ConfigError([f"{path}: cannot be read ({exc.strerror or exc})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    except UnicodeDecodeError as exc:  # found by fuzzing: TOML must be UTF-8
        raise ConfigError([f"{path}: not valid UTF-8 at byte {exc.start} (TOML files are "
                           f"UTF-8)"]) from None


# The appliance image's configuration, the one its systemd unit runs ``pas run --config`` on.
SYSTEM_CONFIG = Path("/etc/pas/appliance.toml")


def default_config_path(environ: dict[str, str] | None = None,
                        system_config: Path = SYSTEM_CONFIG) -> Path | None:
    """``$PAS_CONFIG``, else ``$PAS_HOME/appliance.toml`` when it exists, else (no PAS_HOME
    set) ``/etc/pas/appliance.toml`` when it exists, else none.

    The last is for an administrator's shell on the appliance: ``pas status`` (also under
    ``sudo -u pas``, which drops the environment) reads the configuration the unit runs on,
    whose ``home`` is ``/var/lib/pas``, instead of an empty ``./var``."""
    environ = dict(os.environ) if environ is None else environ
    if environ.get("PAS_CONFIG"):
        return Path(environ["PAS_CONFIG"])
    candidate = Path(environ.get("PAS_HOME", "./var")) / "appliance.toml"
    if candidate.exists():
        return candidate
    if not environ.get("PAS_HOME") and system_config.is_file():
        return system_config
    return None


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file (if any), then environment overrides; validated. With no
    ``site`` named, the enrolment's (:func:`with_enrolled_site`)."""
    environ = dict(os.environ) if environ is None else environ
    data: dict[str, Any] = {}
    path = path or default_config_path(environ)
    if path is not None:
        data = deep_merge(data, read_toml(path))
    if environ.get("PAS_HOME"):  # the environment wins over the file, as for every key
        data["home"] = environ["PAS_HOME"]
    data = deep_merge(data, env_overrides(environ, model=Settings))
    try:
        settings: Settings = build(Settings, data)
    except ConfigError as exc:
        raise ConfigError(name_the_variables(exc.problems, environ)) from None
    return with_enrolled_site(settings)


def name_the_variables(problems: list[str], environ: dict[str, str],
                       prefix: str = ENV_PREFIX) -> list[str]:
    """Each problem of a key a variable sets, with that variable's name: ``PAS_DICOM__PORT=abc``
    read ``dicom.port: must be an integer, got 'abc'``, and the operator searched the TOML
    file (there may be none) for a value the unit's environment gave."""
    setting = {}
    for name in environ:
        if name.startswith(prefix) and not (prefix == ENV_PREFIX and _is_hub_variable(name)):
            setting[".".join(key_of(name, prefix))] = name
    named = []
    for problem in problems:
        path = problem.split(":", 1)[0]
        # The variable setting that key or a table above it, or those setting keys below a
        # key the problem is about: ``PAS_DICOMM__PORT`` (``dicomm: unknown key``) and
        # ``PAS_ROUTING__RULES__0__NAME`` (``routing.rules: must be a list``) were not named.
        variables = sorted(v for key, v in setting.items()
                           if path == key or path.startswith(key + ".")
                           or key.startswith(path + "."))
        named.append(f"{problem} (set by {', '.join(variables)})" if variables else problem)
    return named


def problems_the_environment_hides(path: Path) -> list[str]:
    """What is wrong with the file's own values, read without the environment's overrides:
    ``pas config check`` with ``PAS_DICOM__PORT`` set said "OK" for a file whose port was
    70000, because the variable replaced it before the check; the day the variable goes (a
    drop-in removed, another shell), ``pas run`` refuses that file. Empty when the file
    alone is valid (every key has a default, so a file never needs the environment)."""
    try:
        build(Settings, read_toml(path))
    except ConfigError as exc:
        return exc.problems
    return []
