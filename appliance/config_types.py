"""Configuration, the value types every section's keys share, and the sections' base.

Owns: what a single value may be (``Port``, ``AETitle``, ``Flag``, ``Regex``,
``StorageSopClassUid``, ``Priority``, ``HostName``), the checks behind each, and
``_Section``: unknown keys refused, defaults checked, numbers strict. Split from
:mod:`appliance.config_sections` (the models themselves) to keep each file readable. May not
touch: files, the environment, the database, the network.

Import these from :mod:`appliance.config`, the one door to the configuration.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import regex
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    GetCoreSchemaHandler,
)
from pydantic_core import CoreSchema, PydanticCustomError


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be 1-65535, got {value}")
    return value


def _ae_title(value: str) -> str:
    # PS3.5: AE titles are at most 16 characters of the default repertoire, no backslash or
    # control characters; leading/trailing spaces are not significant.
    stripped = value.strip()
    if not stripped or len(stripped) > 16 or not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]+", stripped):
        raise ValueError(f"must be 1-16 printable characters without backslash, got {value!r}")
    return stripped


def _flag(value: Any) -> Any:
    """A boolean key takes true or false only: pydantic's lax reading took ``continue =
    "yes"``, ``"0"`` or ``1``, a typo or a misunderstanding that ``pas config check`` passed.
    Environment overrides are made booleans before (appliance.config_env.parse_flag)."""
    if not isinstance(value, bool):
        raise PydanticCustomError("flag", "must be true or false")
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]


# How long a routing or prefetch pattern may take on one value (appliance/routing/patterns.py);
# here because the refusal below names it.
MATCH_TIMEOUT_MS = 50


def _regex(value: str) -> str:
    try:
        re.compile(value)
        # What matches at run time (appliance/routing/patterns.py): refused here, not there.
        regex.compile(value, regex.IGNORECASE | regex.VERSION0)
    except (re.error, regex.error) as exc:
        raise ValueError(f"is not a valid regular expression ({exc}): {value!r}") from None
    nested = _nested_quantifier(value)
    if nested:
        raise ValueError(
            f"has an unbounded quantifier inside a repeated group ({nested}), which can take "
            "exponential time on a value that almost matches (a StudyDescription sent by a "
            "modality): the rule would give up on that value after "
            f"{MATCH_TIMEOUT_MS} ms and count as not matching: write it without the nesting, "
            "or make the "
            "outer repeat possessive ('(a+)++') or the repeated group atomic ('(?>a+)+'): "
            f"{value!r}")
    return value


def _nested_quantifier(pattern: str) -> str | None:
    """The catastrophic-backtracking form: a repeat that may match more than once around a
    part with an unbounded repeat, as in ``(a+)+`` or ``(\\w+\\s?)*``. Python's ``re``
    backtracks through every way of splitting the text between them, holding the GIL all
    the while. Possessive repeats and atomic groups do not backtrack. A heuristic: it catches
    this form, not every slow pattern (overlapping alternatives such as ``(a|aa)+`` pass); at
    run time every match has a time limit (appliance/routing/patterns.py), so what passes here
    costs at most that per value. Returns the offending part, or None."""
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser  # type: ignore[attr-defined]

    def walk(items: Any, repeated: bool) -> str | None:
        for op, av in items:
            if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
                low, high, body = av
                if repeated and high == sre.MAXREPEAT:
                    return "a '+', '*' or '{n,}' repeated again"
                found = walk(body, repeated or high > 1)
            elif op == sre.POSSESSIVE_REPEAT:
                found = walk(av[2], False)
            elif op == sre.SUBPATTERN:
                found = walk(av[3], repeated)
            elif op == sre.BRANCH:
                found = next((f for b in av[1] if (f := walk(b, repeated))), None)
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                found = walk(av[1], repeated)
            elif op == sre.ATOMIC_GROUP:  # matched once, never re-split by an outer repeat
                found = walk(av, False)
            elif op == sre.GROUPREF_EXISTS:
                found = walk(av[1], repeated) or (walk(av[2], repeated) if av[2] else None)
            else:
                found = None
            if found:
                return found
        return None

    return walk(_parser.parse(pattern, re.IGNORECASE), False)


# Siemens CSA Non-Image Storage: the private objects (spectroscopy data, syngo protocols,
# MR "CSA" series) a Siemens MR or CT sends along with its images. Shipped in the default of
# ``dicom.extra_storage_sop_classes`` (docs/ingest.md, "Private SOP classes").
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
# The root of every UID the DICOM standard defines (PS3.5 9.2), and of no other.
DICOM_UID_ROOT = "1.2.840.10008."
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _storage_sop_class_uid(value: str) -> str:
    """A SOP Class UID PAS may accept and serve as a storage class: a syntactically valid
    UID (PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters)
    that is not a standard UID of something else (a transfer syntax, a Q/R model,
    Verification): taken as storage, that would make PAS file C-STOREs on it."""
    uid = value.strip()
    if len(uid) > 64 or not _UID.fullmatch(uid):
        raise ValueError(f"is not a UID (digits separated by dots, no leading zeros, at most "
                         f"64 characters), got {value!r}")
    if not uid.startswith(DICOM_UID_ROOT):
        # Every UID of the standard is under DICOM's root: a private one is what this key is
        # for, and needs no look-up (nor pydicom's import, a fifth of a second of every
        # ``pas`` command, since the shipped default names one).
        return uid
    from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]

    known = UID_dictionary.get(uid)
    if known is None:  # a private (or unknown) UID: the case this key is for
        return uid
    name, kind = known[0], known[1]
    storage = kind == "SOP Class" and "Storage" in name and not name.startswith(
        ("Storage ", "Media Storage"))  # Storage Commitment/Management, DICOMDIR
    if storage:
        # pynetdicom serves some standard storage-like classes under another service
        # (Hanging Protocol, Color Palette, Defined Procedure Protocol): not PAS's to take.
        from pynetdicom.service_class import ServiceClass, StorageServiceClass
        from pynetdicom.sop_class import uid_to_service_class  # type: ignore[attr-defined]

        storage = uid_to_service_class(uid) in (ServiceClass, StorageServiceClass)
    if not storage:
        raise ValueError(f"is the standard UID of {name} ({kind}), not of a storage SOP "
                         f"class PAS may take C-STOREs for, got {value!r}")
    return uid


# One DNS label as a browser sends it in Host (ASCII: an IDN arrives in its xn-- form).
# Underscores: Windows-era names have them and browsers send them.
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _host_name(value: str) -> str:
    """A name browsers reach the appliance's HTTP port by (``http.allowed_hosts``), as the
    Host header carries it: lower case, IDN in its ``xn--`` form, no final dot. Exact names
    only, never ``*`` nor a domain suffix: a name answered that someone else's DNS may
    resolve is what lets a page on the internet read PAS through a radiologist's browser
    (DNS rebinding, appliance/web/hosts.py), and ``.co.uk``-style suffixes cannot be told
    from a hospital's own domain without the public suffix list."""
    text = value.strip()
    if "*" in text or text.startswith("."):
        raise ValueError(f"{value!r}: name each host exactly (no wildcard, no domain "
                         "suffix): answering names others control lets a web page on the "
                         "internet read patient data through a browser on the hospital's "
                         "network (DNS rebinding)")
    try:
        return str(ipaddress.ip_address(text.strip("[]")))  # always answered; kept as given
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        name = ""
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{value!r} is not a host name: letters, digits, '-' and dots, no "
                         "scheme, port or path (e.g. pas.hospital.example)")
    return name


def _web_root(value: str) -> str:
    """A DICOMweb root PAS sends to or reads from: ``http(s)://host[:port][/path]``, without
    its trailing slash (the callers add ``/studies``). Whether it may be ``http://`` is the
    section's check (:func:`sent_in_clear`): it depends on the section's opt-in. A value that
    may hold userinfo is not parsed here: every section taking a WebRoot refuses it in its
    own words, naming its credential keys and never the value (:func:`credentials_in_url`);
    the other refusals here show the value."""
    if credentials_in_url(value):
        # Refused by every section that takes a WebRoot, in its own words and without the
        # value (a password holding "/", "?" or "#" was cut there and the rest printed:
        # "is not a URL (Port could not be cast ... 'S3cr'), got 'https://u:S3cr/etPw@...'").
        return value.rstrip("/")
    shown = value
    if not re.match(r"^https?://", value):
        raise ValueError(f"must start with http:// or https://, got {shown!r}")
    try:
        parts = urlsplit(value)
        host, _port_number = parts.hostname, parts.port
    except ValueError as exc:  # "http://[::1", "http://h:99999"
        raise ValueError(f"is not a URL ({str(exc).replace(value, shown)}), got "
                         f"{shown!r}") from None
    if not host:
        raise ValueError(f"names no host, got {shown!r}")
    return value.rstrip("/")


def sent_in_clear(url: str) -> bool:
    """True when ``url`` is ``http://`` to a host other than this machine's loopback
    (127.0.0.0/8, ::1, ``localhost``): what is sent there crosses a network in clear.

    Invariant 5 (docs: DESIGN "Nothing leaves the site in clear"): a region's DICOMweb or a
    STOW-RS archive is usually reached over the WAN, and an ``http://`` URL put patient data
    (and a bearer token or password) on it unencrypted, accepted without a word. A name is
    not resolved (a check of the file must not depend on DNS): only the literal loopback
    addresses and ``localhost`` count as this machine."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    return not loopback_host(parts.hostname or "")


def credentials_in_url(url: str) -> bool:
    """Whether ``url`` may carry userinfo (``user:password@host``). httpx sends it as HTTP
    Basic, so it worked; but a URL is written wherever it is shown (a job's error, the log,
    ``pas status``, the heartbeat to the hub and its fleet pages): the sections refuse it
    and name their credential keys instead."""
    # Any "@" after the scheme: a password may hold "/", "?" or "#" (a generated or base64
    # one often does), where urlsplit ends the authority, leaving the "@" in the "path".
    # A DICOMweb root has no "@" of its own (one in a path is written %40).
    return "@" in url.split("://", 1)[-1]


def loopback_host(host: str) -> bool:
    """Whether ``host`` is this machine's loopback: ``localhost`` or a literal loopback
    address (127.0.0.0/8, ::1). A name is not resolved (a check must not depend on DNS).

    Exactly these, as written: ``localhost.`` and ``127.0.0.1.`` (a trailing dot, a fully
    qualified name) are not the hosts file's entry nor an address literal to the resolver,
    which asks DNS for them, and DNS may answer any address: the trailing dot was stripped
    here, and a STOW-RS to ``http://localhost.:8080`` went in clear to whatever DNS said.
    ``localhost`` in any case is the hosts file's (glibc compares without case)."""
    host = host.removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost
        return False


def _ip_network(value: str) -> str:
    """An address or a network (``hl7.allowed_sources``), refused by name here rather than
    letting every connection in (or none) at the first message."""
    import ipaddress

    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network (CIDR, e.g. "
                         "10.1.2.0/24)") from None
    return value


def _ip_address(value: str) -> str:
    """An IP address literal (``dicom.known_aes[].host``), in its canonical form: the pin is
    compared with the address an association comes from, which is never a name. A name
    (``localhost``, a modality's DNS name), a network or a typo passed the check and then
    refused every association of that AE ("known, but from localhost, not 127.0.0.1")."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        hint = " (a name is not resolved: give the modality's address)" \
            if value and not any(c in value for c in "/ ") else ""
        raise ValueError(f"{value!r} is not an IP address{hint}") from None


WebRoot = Annotated[str, AfterValidator(_web_root)]
IpAddress = Annotated[str, AfterValidator(_ip_address)]
IpNetwork = Annotated[str, AfterValidator(_ip_network)]
Port = Annotated[int, AfterValidator(_port)]
HostName = Annotated[str, AfterValidator(_host_name)]
AETitle = Annotated[str, AfterValidator(_ae_title)]
Regex = Annotated[str, AfterValidator(_regex)]
StorageSopClassUid = Annotated[str, AfterValidator(_storage_sop_class_uid)]
Priority = Literal["urgent", "high", "routine"]

PRIORITY_RANK: dict[str, int] = {"urgent": 0, "high": 1, "routine": 2}


def _cross_field(key: str, message: str) -> PydanticCustomError:
    """A check across the fields of one section, raised from its ``model_validator``.

    Pydantic collects it with every other problem of the file and gives it the section's
    location (``destinations.ws``); :func:`appliance.config.format_validation_error` appends
    ``key``. (A ``ConfigError`` raised during validation stopped it: every other problem was
    hidden.) ``{section}`` in ``message`` becomes the section's path there
    (``destinations.archive``): a model does not know the name it is given in the file, and
    the operator is told the very key to set.
    """
    return PydanticCustomError("cross_field", "{key}: {message}",
                               {"key": key, "message": message})


def _strict_numbers(schema: Any) -> None:
    """Every int and float of a section's schema strict (``Port``, ``Field(ge=...)``, in lists
    and tables too): lax, pydantic read ``port = "11112"`` as 11112, ``max_attempts = 3.0`` as
    3, ``stable_after_s = true`` as 1. A float key still takes a TOML integer. Variables are
    made numbers before (appliance.config_env.parse_number). Defaults are data: left alone.
    No float key takes inf or nan: ``check_interval_s = inf`` passed, then crashed the routing
    thread (OverflowError in Event.wait); "never" is 0 where a key has it."""
    if isinstance(schema, list):
        for item in schema:
            _strict_numbers(item)
    elif isinstance(schema, dict):
        if schema.get("type") in ("int", "float"):
            schema["strict"] = True
        if schema.get("type") == "float":
            schema["allow_inf_nan"] = False
        for key, value in schema.items():
            if key != "default":
                _strict_numbers(value)


class _Section(BaseModel):
    """Unknown keys refused, defaults checked, numbers strict (booleans are ``Flag``)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any,
                                     handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        _strict_numbers(schema)  # the keys a later change adds too
        return schema
