"""Reading the operator docs as tests/test_docs.py checks them: the code written in them
(inline code spans and fenced blocks, each with its file and line), and what that code
names checked against the code itself: ``pas`` command lines against the typer CLI's
command tree (no subprocess: the tree is what ``pas --help`` prints from), configuration
keys and ``PAS_*`` variables against the pydantic models, metric names against the
families the source makes, files, tests and ``appliance.x.y`` against the repository."""

from __future__ import annotations

import ast
import enum
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tests.support.peers import ROOT

# What hospital IT and regional ops read (README.md's "Documentation" list). Left out:
# docs/benchmarks.md, which records past runs as they were run, and DEVELOPERS.md.
DOCS = [ROOT / "README.md", ROOT / "image" / "README.md",
        *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md")]

_FENCE = re.compile(r"^\s*```(\w*)\s*$")
_INLINE = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Code:
    """One piece of code in a doc: an inline span (its text with line breaks made spaces)
    or one line of a fenced block (``lang`` then names the block's language)."""

    path: Path
    line: int
    text: str
    block: str | None = None  # the fenced block's language ("" when unnamed); None: inline

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Block:
    """A fenced block: its language, first line number and text."""

    path: Path
    line: int
    lang: str
    text: str


def blocks(path: Path) -> list[Block]:
    found, lang, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = _FENCE.match(line)
        if fence and lang is None:
            lang, start, lines = fence[1], number + 1, []
        elif fence:
            found.append(Block(path, start, lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return found


def code(path: Path) -> list[Code]:
    """Every inline span outside fenced blocks (a span may run over a line break, as
    Markdown allows), and every line of every fenced block (a line ending in a backslash
    joined with the next, as the shell reads it)."""
    found: list[Code] = []
    prose: list[str] = []
    fenced = False
    for line in path.read_text().splitlines():
        fenced ^= bool(_FENCE.match(line))
        prose.append("" if fenced or _FENCE.match(line) else line)
    text = "\n".join(prose)
    for span in _INLINE.finditer(text):
        line = text.count("\n", 0, span.start()) + 1
        # In a table, "|" inside a span is written "\|".
        found.append(Code(path, line, " ".join(span[1].replace("\\|", "|").split())))
    for block in blocks(path):
        pending, first = "", block.line
        for offset, line in enumerate(block.text.splitlines()):
            if not pending:
                first = block.line + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append(Code(path, first, pending + line, block.lang))
            pending = ""
    return found


def every_code() -> list[Code]:
    return [piece for path in DOCS for piece in code(path)]


# --- pas command lines -----------------------------------------------------------------------

# Words that may come before ``pas`` on a documented command line: who runs it and with what
# environment (``sudo -u pas``, ``runuser -u pas --``, ``env PAS_HUB_HOME=...``).
_BEFORE = {"sudo", "runuser", "env", "--", "-u"}
_VARIABLE = re.compile(r"[A-Z][A-Z0-9_]*=\S*")
# What ends a command line: a pipe, a redirection, a comment, another command.
_END = {"|", ">", ">>", "2>&1", "&&", ";", "#"}
# A placeholder the reader replaces: ID, FILE.dcm, NAME_OR_IP, FILES|DIR, <kind>, S.
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_.|-]*(\.dcm)?|<[^>]+>|\.\.\.|…")


def command_words(text: str) -> list[str] | None:
    """The words after ``pas`` when ``text`` is a pas command line (``sudo -u pas pas
    status``, ``.venv/bin/pas studies # ...``), else None (``cannot start: another pas
    run ...`` is a message that names the command, not a command line)."""
    words = text.split()
    for index, word in enumerate(words):
        if word == "pas" and index > 0 and words[index - 1] == "-u":
            continue  # sudo -u pas: the user
        if word == "pas" or word.endswith("/pas"):
            rest = words[index + 1:]
            cut = next((i for i, w in enumerate(rest) if w in _END or w.startswith("#")),
                       len(rest))
            kept = (w.strip("[](),;") for w in rest[:cut])
            return [w for w in kept if w and w not in ("...", "…")]  # "...": and so on
        if word not in _BEFORE and not _VARIABLE.fullmatch(word) and not (
                index > 0 and words[index - 1] == "-u"):
            return None
    return None


def _option(command: Any, name: str) -> Any:
    for param in command.params:
        if param.param_type_name == "option" and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def _takes_value(option: Any) -> bool:
    return not option.is_flag and not option.count


def _choices(option: Any) -> list[str]:
    """The words an option takes when its type is an enumeration (``--state``, ``--event``),
    read from the parameter's annotation (typer 0.29 keeps no click Choice)."""
    annotation = option.type_descriptor.annotation
    for inner in (annotation, *typing.get_args(annotation)):
        if isinstance(inner, type) and issubclass(inner, enum.Enum):
            return [str(member.value) for member in inner]
    return []


def _arguments(command: Any) -> float:
    """How many positional words the command takes (inf: any number)."""
    total: float = 0
    for param in command.params:
        if param.param_type_name == "argument":
            total += float("inf") if param.nargs == -1 else param.nargs
    return total


def check_command(root: Any, words: list[str], shown: str = "pas") -> list[str]:
    """What is wrong with ``pas WORDS`` against the CLI's command tree ``root``; empty when
    every command, option and choice named exists. ``status/evict/pin`` stands for each of
    those subcommands."""
    command, index = root, 0
    while hasattr(command, "commands") and index < len(words) \
            and not words[index].startswith("-"):
        word = words[index]
        names = word.split("/")
        missing = [name for name in names if name not in command.commands]
        if missing:
            return [f"{shown}: no command {missing[0]!r} (there are: "
                    f"{', '.join(sorted(command.commands))})"]
        if len(names) > 1:
            return [problem for name in names for problem in check_command(
                command.commands[name], words[index + 1:], f"{shown} {name}")]
        command, shown, index = command.commands[word], f"{shown} {word}", index + 1
    problems, positional = [], []
    rest = words[index:]
    while rest:
        word = rest.pop(0)
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        name, _, value = word.partition("=")
        option = _option(command, name)
        if option is None and name != "--help":
            known = sorted(o for p in command.params if p.param_type_name == "option"
                           for o in (*p.opts, *p.secondary_opts))
            problems.append(f"{shown}: no option {name} (there are: {', '.join(known)})")
            continue
        if option is None or not _takes_value(option):
            continue
        if not value and rest and not rest[0].startswith("-"):
            value = rest.pop(0)
        choices = _choices(option)
        if value and choices and not _PLACEHOLDER.fullmatch(value) and value not in choices:
            problems.append(f"{shown} {name}: {value!r} is not one of {', '.join(choices)}")
    if hasattr(command, "commands") and positional:
        problems.append(f"{shown}: no command {positional[0]!r} (there are: "
                        f"{', '.join(sorted(command.commands))})")
    elif len(positional) > _arguments(command):
        problems.append(f"{shown} takes {int(_arguments(command))} argument(s), the doc "
                        f"gives {' '.join(positional)}")
    return problems


# --- configuration keys ----------------------------------------------------------------------

# A key as the docs write it: ``dicom.tls.ca``, ``routing.rules.2.continue``,
# ``known_aes[0].tls``, ``queue.backoff_*``, ``cache.*``.
KEY = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_*-]+|\[\d+\])+")


def _members(annotation: Any) -> list[Any]:
    """The types an annotation allows, ``Annotated`` unwrapped and unions split."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _fields(member: Any) -> dict[str, Any]:
    """A model's keys as a file writes them (``continue``, not ``continue_``)."""
    if isinstance(member, type) and issubclass(member, BaseModel):
        return {field.alias or name: field.annotation
                for name, field in member.model_fields.items()}
    return {}


def resolves(model: type[BaseModel], dotted: str) -> bool:
    """Whether ``dotted`` names a key (or a section, or an entry of a list or a table) of
    ``model``: ``destinations.pacs.tls_ca`` (any name under a table of destinations),
    ``routing.rules.0.match.modality``, ``queue.backoff_*`` (some key begins so)."""
    parts = [p for p in re.split(r"[.\[\]]+", dotted) if p]
    current: list[Any] = [model]
    for part in parts:
        following: list[Any] = []
        for member in (m for annotation in current for m in _members(annotation)):
            origin = typing.get_origin(member)
            if origin is list:
                item = typing.get_args(member)[0]
                if part.isdigit():
                    following.append(item)
                    continue
                member = item  # a key of the list's items: routing.rules.name
            elif origin is dict:
                following.append(typing.get_args(member)[1])
                continue
            for member_ in _members(member):
                fields = _fields(member_)
                if part == "*" or (part.endswith("*") and any(
                        name.startswith(part[:-1]) for name in fields)):
                    return bool(fields)
                if part in fields:
                    following.append(fields[part])
        if not following:
            return False
        current = following
    return True


# What a dotted name is when it is no key: a file (``hub.json``) or code (``cache.reconcile``,
# a function of appliance/store/cache.py; ``prefetch.messages``, a module).
_FILE_SUFFIXES = {"json", "sqlite", "crt", "key", "pub", "toml", "py", "yml", "yaml", "md",
                  "conf", "img", "c", "nft", "service", "raw", "txt"}
APPLIANCE = ROOT / "appliance"


def names_code_or_file(dotted: str) -> bool:
    """``module.name`` where appliance/.../module.py defines ``name`` (or module/name.py
    exists), or ``name.suffix`` of a file."""
    module, _, name = dotted.rpartition(".")
    if name in _FILE_SUFFIXES:
        return True
    defined = re.compile(rf"^(?:def|class) {re.escape(name)}\b|^{re.escape(name)}\s*[:=]",
                         re.MULTILINE)
    return any(defined.search(path.read_text()) for path in APPLIANCE.rglob(f"{module}.py")) \
        or any(APPLIANCE.rglob(f"{module}/{name}.py"))


# --- environment variables -------------------------------------------------------------------

VARIABLE = re.compile(r"\bPAS_[A-Z0-9_-]*[A-Z0-9]\b")
HUB_PREFIX = "PAS_HUB_"


def variable_key(name: str) -> tuple[str, str] | None:
    """The configuration key a ``PAS_...`` variable sets, as ("appliance" or "hub", dotted
    key), following appliance/config_env.py: ``PAS_DICOM__PORT`` is the appliance's
    ``dicom.port``, ``PAS_HUB__LINK_MBPS`` its ``hub.link_mbps``, ``PAS_HUB_HTTP__PORT`` the
    hub's ``http.port``, ``PAS_SITE`` the top-level ``site``. None for a variable with no
    section that names no top-level key (``PAS_HOME``, ``PAS_FAULT_SEED``): read elsewhere."""
    if name.startswith(HUB_PREFIX) and not name.startswith(HUB_PREFIX + "_"):
        owner, rest = "hub", name[len(HUB_PREFIX):]
    else:
        owner, rest = "appliance", name[len("PAS_"):]
    if "__" not in rest:
        return (owner, rest.lower()) if rest.lower() in _TOP_LEVEL[owner] else None
    return owner, ".".join(part.lower() for part in rest.split("__"))


def _top_level_scalars() -> dict[str, set[str]]:
    from appliance.config import Settings
    from appliance.config_env import RESERVED_TOP_LEVEL
    from appliance.hub.config import HubSettings

    return {owner: {name for name, annotation in _fields(model).items()
                    if not _fields(annotation) and name not in RESERVED_TOP_LEVEL}
            for owner, model in (("appliance", Settings), ("hub", HubSettings))}


_TOP_LEVEL = _top_level_scalars()


# --- metrics ---------------------------------------------------------------------------------

# The constructors of a metric family, and what each exports beside (or instead of) its name.
_SAMPLES = {
    "Gauge": ("",), "GaugeMetricFamily": ("",),
    "Counter": ("_total",), "CounterMetricFamily": ("_total",),
    "Histogram": ("", "_bucket", "_sum", "_count"),
    "HistogramMetricFamily": ("", "_bucket", "_sum", "_count"),
    "_histogram": ("", "_bucket", "_sum", "_count"),  # appliance/ops/metrics.py's helper
}


@dataclass(frozen=True)
class Family:
    """A metric family the code exports: where it is made, its labels, its sample names."""

    name: str
    labels: tuple[str, ...]
    samples: tuple[str, ...]
    source: Path


def _strings(node: ast.AST | None) -> tuple[str, ...]:
    if isinstance(node, ast.List | ast.Tuple):
        return tuple(e.value for e in node.elts if isinstance(e, ast.Constant))
    return ()


def exported_families() -> dict[str, Family]:
    """Every ``pas_...`` family made in appliance/ (the appliance's /metrics,
    appliance/ops/metrics.py; the hub's, appliance/hub/fleet.py), read from the source:
    the families a scrape shows only once something happened (a retrieve, an enrolment,
    a prefetch) are there too, with no daemon to start."""
    families = {}
    for path in APPLIANCE.rglob("*.py"):
        text = path.read_text()
        if '"pas_' not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            kind = getattr(node.func, "id", getattr(node.func, "attr", ""))
            first = node.args[0]
            if kind not in _SAMPLES or not isinstance(first, ast.Constant) \
                    or not str(first.value).startswith("pas_"):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            labels = _strings(keywords.get("labels", keywords.get("labelnames")))
            if not labels and kind in ("Counter", "Gauge", "Histogram") and len(node.args) > 2:
                labels = _strings(node.args[2])
            name = str(first.value)
            families[name] = Family(name, labels, tuple(name + s for s in _SAMPLES[kind]),
                                    path)
    return families


# A metric as the docs write it: ``pas_jobs``, ``pas_wan_bytes_total{direction="down"}``, and
# in a list after a full name, ``..._backlog_studies`` (that name's prefix, ``pas_fleet_site``).
METRIC = re.compile(r"(pas_[a-z0-9_]+|\.\.\._[a-z0-9_]+)(?:\{([^}]*)\})?")


def metric_mentions(path: Path) -> list[tuple[Code, str, tuple[str, ...]]]:
    """Each metric a doc names in code: the span, the full name, the label names given."""
    found, previous = [], ""
    for piece in code(path):
        match = METRIC.fullmatch(piece.text)
        if not match:
            continue
        name = match[1]
        if name.startswith("..."):
            name = previous.rpartition("_")[0] + name[3:]
        else:
            previous = name
        labels = tuple(part.split("=")[0].strip() for part in (match[2] or "").split(",")
                       if part.strip())
        found.append((piece, name, labels))
    return found


# --- references to the code and the tests ----------------------------------------------------

# ``appliance/ops/metrics.py``, ``tests/test_x.py::test_y``, ``image/systemd/`` (a file by its
# suffix, a folder by its slash: ``image/jpeg`` is a media type); ``test_kill9_ingest.py``
# alone, somewhere under tests/; ``appliance.store.audit.EVENTS``.
_PATH = re.compile(r"\b((?:appliance|tests|image|config|scripts|bench)/[\w/*.-]*(?:\.\w+|/))"
                   r"(?:::(\w+))?")
_TEST_FILE = re.compile(r"(?<![/\w])(test_\w+\.py)(?:::(\w+))?")
_DOTTED = re.compile(r"(?<![\w.-])appliance(?:\.[a-zA-Z_]\w*)+")  # not pas-appliance.box
# What a build leaves (image/out/, bench/out/): named in the docs, ignored by git.
_BUILT = tuple(line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.strip().endswith("/") and "/" in line.strip()[:-1])


def _defines(path: Path, name: str) -> bool:
    return bool(re.search(rf"^\s*(?:async )?(?:def|class) {re.escape(name)}\b|"
                          rf"^{re.escape(name)}\s*[:=]", path.read_text(), re.MULTILINE))


def _module_reference_problem(dotted: str) -> str | None:
    """``appliance.store.audit.EVENTS``: the longest prefix that is a module, then a name it
    defines at its top or in a class (``appliance.hub.app.default_route_providers``)."""
    parts = dotted.split(".")
    if parts[-1] in _FILE_SUFFIXES:  # appliance.example.toml: a file
        return None
    for end in range(len(parts), 0, -1):
        module = ROOT.joinpath(*parts[:end])
        source = module.with_suffix(".py") if module.with_suffix(".py").exists() \
            else module / "__init__.py"
        if source.exists():
            rest = parts[end:]
            if rest and not _defines(source, rest[0]):
                return f"{'.'.join(parts[:end])} defines no {rest[0]}"
            return None
    return f"no module {dotted}"


def reference_problems(piece: Code) -> list[str]:
    """What a span names in the code or the tests that is not there."""
    problems = []
    paths = list(_PATH.finditer(piece.text))
    for match in paths:
        if match[1].startswith(_BUILT):
            continue
        found = sorted(ROOT.glob(match[1].rstrip("/")))
        if not found:
            problems.append(f"no {match[1]}")
        elif match[2] and not any(f.is_file() and _defines(f, match[2]) for f in found):
            problems.append(f"{match[1]} has no {match[2]}")
    if not paths:
        for match in _TEST_FILE.finditer(piece.text):
            found = sorted((ROOT / "tests").rglob(match[1]))
            if not found:
                problems.append(f"no {match[1]} under tests/")
            elif match[2] and not any(_defines(f, match[2]) for f in found):
                problems.append(f"{match[1]} has no {match[2]}")
    for match in _DOTTED.finditer(piece.text):
        problem = _module_reference_problem(match[0])
        if problem:
            problems.append(problem)
    return problems
