"""Environment overrides (``PAS_<SECTION>__<KEY>``, ``PAS_<KEY>``) read against the model.

Owns: turning variables into the nested dict that is merged over the TOML file, each value
typed by the key it sets. A key whose value is text (an AE title, a password, a path, one of a
few words) takes the variable's text as it is: read as TOML, ``PAS_DICOM__AE_TITLE=1234`` was
the integer 1234, which pydantic refuses for a string. A boolean key takes ``true``/``false``
and the other words pydantic reads as booleans (``yes``, ``on``, ``1``...; the model itself is
strict, for the TOML file). A number key takes the number pydantic's lax mode always read
(``11113``, ``0.5``; the model is strict for numbers too), a boolean or other text is left
for the model to refuse naming the key. Every other key reads it as a TOML literal when it
is one (``["A", "B"]``), else as text. May not touch:
files, the network; errors are returned to :mod:`appliance.config`, which raises them.
"""

from __future__ import annotations

import tomllib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

# Top-level keys a variable may not set: ``$PAS_HOME`` (``$PAS_HUB_HOME``) already names the
# home and is read below the file (appliance.config.load_settings).
RESERVED_TOP_LEVEL = frozenset({"home"})


def _members(annotation: Any) -> list[Any]:
    """The types an annotation allows: ``Annotated`` unwrapped, unions split, ``None`` left
    out (an optional key is set to a value, never to None, from the environment)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) if arg is not type(None)
                for m in _members(arg)]
    return [annotation]


def _key_types(model: type[BaseModel], parts: list[str]) -> list[Any]:
    """The annotations of the key at ``parts`` (several when it crosses a union, such as the
    kinds of destination); empty when no such key exists (pydantic then names it)."""
    current: list[Any] = [model]
    for part in parts:
        following: list[Any] = []
        for member in (m for annotation in current for m in _members(annotation)):
            if isinstance(member, type) and issubclass(member, BaseModel):
                following.extend(field.annotation for name, field in member.model_fields.items()
                                 if part in (name, field.alias))
            elif get_origin(member) is dict:
                following.append(get_args(member)[1])
        current = following
    return current


def _is_text(member: Any) -> bool:
    if member is str or member is Path:
        return True
    return get_origin(member) is Literal and all(isinstance(v, str) for v in get_args(member))


def wants_text(model: type[BaseModel], parts: list[str]) -> bool:
    """True when every type the key allows is text (str, Path, a Literal of words)."""
    members = [m for annotation in _key_types(model, parts) for m in _members(annotation)]
    return bool(members) and all(_is_text(m) for m in members)


def wants_flag(model: type[BaseModel], parts: list[str]) -> bool:
    """True when every type the key allows is a boolean."""
    members = [m for annotation in _key_types(model, parts) for m in _members(annotation)]
    return bool(members) and all(m is bool for m in members)


# What a variable may say for a boolean key: pydantic's lax words, which the environment's
# overrides always took (``PAS_DICOM__ACCEPT_UNKNOWN=True``, ``=1``, ``=yes``). The model
# itself is strict (appliance.config_types._Section): in the TOML file only true/false.
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def parse_flag(raw: str) -> bool | str:
    """A boolean key's variable as a boolean; other text as it is, for the model to refuse
    naming the key (``dicom.accept_unknown: must be true or false, got 'maybe'``)."""
    word = raw.strip().lower()
    return True if word in _TRUE else False if word in _FALSE else raw


def number_type(model: type[BaseModel], parts: list[str]) -> type[int] | type[float] | None:
    """``int`` or ``float`` when every type the key allows is a number (``float`` when one of
    them is), else None."""
    members = [m for annotation in _key_types(model, parts) for m in _members(annotation)]
    if not members or not all(m is int or m is float for m in members):
        return None
    return float if float in members else int


# The model's numbers are strict (appliance.config_types._strict_numbers); a variable's
# text is made a number here the way pydantic's lax mode always read it.
_LAX_NUMBER: dict[type, TypeAdapter[Any]] = {int: TypeAdapter(int), float: TypeAdapter(float)}


def parse_number(raw: str, kind: type[int] | type[float]) -> int | float | str:
    """A number key's variable as that number, read as before (``11113``, ``0.5``, ``60``,
    ``3.0`` for an integer key); a boolean (``PAS_DICOM__PORT=true`` was port 1) or other
    text as it is, for the model to refuse naming the key (``dicom.port: must be an integer,
    got 'abc'``)."""
    value = parse_value(raw, text=False)
    if isinstance(value, bool):
        return raw
    try:
        number: int | float = _LAX_NUMBER[kind].validate_python(value)
    except ValidationError:
        return raw
    return number


def parse_value(raw: str, text: bool) -> Any:
    """A text key keeps the raw text (a fully quoted TOML string, ``"abc"``, is unquoted as
    before); any other key takes the TOML literal when ``raw`` is one, else the text."""
    if text and raw[:1] not in ("'", '"'):
        return raw
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    return value if not text or isinstance(value, str) else raw


def _top_level_scalars(model: type[BaseModel]) -> set[str]:
    """Top-level keys that are not sections or tables: ``site``, ``log_level``."""
    names = set()
    for name, field in model.model_fields.items():
        members = _members(field.annotation)
        if any(isinstance(m, type) and issubclass(m, BaseModel) or get_origin(m) in (dict, list)
               for m in members):
            continue
        names.add(field.alias or name)
    return names - RESERVED_TOP_LEVEL


def _section_keys(model: type[BaseModel]) -> dict[str, set[str]]:
    """Each top-level section of ``model`` and its own keys: ``{"dicom": {"port", ...}}``."""
    sections: dict[str, set[str]] = {}
    for name, field in model.model_fields.items():
        for member in _members(field.annotation):
            if isinstance(member, type) and issubclass(member, BaseModel):
                sections[field.alias or name] = {
                    sub.alias or sub_name for sub_name, sub in member.model_fields.items()}
    return sections


def meant_double_underscore(rest: str, model: type[BaseModel]) -> list[str] | None:
    """The key a variable named with one underscore between section and key most likely
    meant (``DICOM_PORT`` -> ``["dicom", "port"]``), or None. Such a variable is not read:
    ``PAS_DICOM_PORT=104`` left the daemon on port 11112 and ``pas config check`` said OK."""
    lowered = rest.lower()
    for section, keys in _section_keys(model).items():
        head = section + "_"
        if lowered.startswith(head) and lowered[len(head):] in keys:
            return [section, lowered[len(head):]]
    return None


def key_of(name: str, prefix: str) -> list[str]:
    """The key path a variable sets: ``PAS_DICOM__PORT`` -> ``["dicom", "port"]``."""
    return [part.lower() for part in name[len(prefix):].split("__")]


def read_overrides(environ: dict[str, str], prefix: str, model: type[BaseModel] | None,
                   ignore: Callable[[str], bool] = lambda _name: False,
                   ) -> tuple[dict[str, Any], list[str]]:
    """(nested overrides, problems). ``PREFIX<SECTION>__<KEY>[__<SUBKEY>]`` sets a key of a
    section; ``PREFIX<KEY>`` a top-level scalar key of ``model`` (other names without ``__``
    belong to something else: ``PAS_HOME``, ``PAS_CONFIG``), except a section and one of its
    keys joined by one underscore (``PAS_DICOM_PORT``): a problem saying what was meant,
    rather than a daemon on another port than the unit says. Two variables where one sets a
    value and the other one of its keys (``PAS_DICOM__TLS`` and ``PAS_DICOM__TLS__ENABLED``)
    are a problem naming both: which one wins would depend on the environment's order."""
    top_level = _top_level_scalars(model) if model is not None else set()
    entries: list[tuple[list[str], str, str]] = []
    problems = []
    for name, raw in environ.items():
        if not name.startswith(prefix) or ignore(name):
            continue
        rest = name[len(prefix):]
        if "__" not in rest and rest.lower() not in top_level:
            meant = meant_double_underscore(rest, model) if model is not None else None
            if meant is not None:
                problems.append(
                    f"{'.'.join(meant)}: {name} is not read (a section and its key are joined "
                    f"by two underscores); did you mean {prefix}{meant[0].upper()}__"
                    f"{meant[1].upper()}?")
            continue
        entries.append((key_of(name, prefix), name, raw))
    entries.sort()
    for parts, name, _raw in entries:
        if any(part.isdigit() for part in parts):  # PAS_ROUTING__RULES__0__NAME
            whole = prefix + "__".join(p.upper() for p in parts[:next(
                i for i, part in enumerate(parts) if part.isdigit())])
            problems.append(f"{'.'.join(parts)}: set by {name}, but a list's items cannot be "
                            f"set one by one; set {whole} to the whole list as a TOML array "
                            "(e.g. [{name = \"ct\", destinations = [\"pacs\"]}]), or write "
                            "it in the configuration file")
    for index, (parts, name, _raw) in enumerate(entries):
        for other_parts, other, _ in entries[index + 1:]:
            if other_parts[:len(parts)] == parts:
                problems.append(f"{'.'.join(parts)}: set by both {name} and {other} (a value "
                                f"and one of its keys, or the same key twice); keep one")
    if problems:
        return {}, problems
    tree: dict[str, Any] = {}
    for parts, _name, raw in entries:
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if model is not None and wants_flag(model, parts):
            node[parts[-1]] = parse_flag(raw)
            continue
        kind = number_type(model, parts) if model is not None else None
        if kind is not None:
            node[parts[-1]] = parse_number(raw, kind)
            continue
        text = model is not None and wants_text(model, parts)
        node[parts[-1]] = parse_value(raw, text)
    return tree, []
