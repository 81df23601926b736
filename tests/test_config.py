"""Configuration: defaults, the example file, env overrides, and every error named by key."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_settings
from tests.support.peers import ROOT, run_pas


def check(path: Path | None, *options: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    args = ["config", "check"] + ([str(path)] if path else []) + list(options)
    return run_pas(args, {**clean, **env}, timeout=60)


def test_defaults_run_on_a_laptop() -> None:
    settings = load_settings(environ={})
    assert (settings.dicom.ae_title, settings.dicom.port) == ("PAS", 11112)
    assert settings.home == Path("./var") and settings.dicom.accept_unknown is False
    assert settings.study.stable_after_s == 60


def test_shipped_files_are_valid() -> None:
    for name in ("appliance.example.toml", "appliance.toml"):
        result = check(ROOT / "config" / name)
        assert result.returncode == 0, result.stdout + result.stderr


def test_environment_overrides_every_key() -> None:
    settings = load_settings(environ={
        "PAS_DICOM__PORT": "11113", "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_STUDY__STABLE_AFTER_S": "5", "PAS_HOME": "/srv/pas",
        "PAS_DICOM__KNOWN_AES": '[{title = "CT1", host = "10.0.0.5"}]',
        "PAS_HUB_HTTP__PORT": "9999",  # the hub's, not ours: ignored here
    })
    assert settings.dicom.port == 11113 and settings.dicom.accept_unknown is True
    assert settings.study.stable_after_s == 5 and settings.home == Path("/srv/pas")
    assert settings.dicom.known_aes[0].host == "10.0.0.5"


@pytest.mark.parametrize("toml, expected", [
    ("[dicom]\nport = 0", "dicom.port: must be 1-65535, got 0"),
    ("[dicom]\nport = 70000", "dicom.port: must be 1-65535, got 70000"),
    ("[dicom]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'", "dicom.ae_title: must be 1-16"),
    ("[dicom]\nprot = 104", "dicom.prot: unknown key, did you mean 'port'?"),
    ("[queue]\nmax_atempts = 3", "queue.max_atempts: unknown key, did you mean 'max_attempts'?"),
    ("[[routing.rules]]\nname = 'x'\nmatch = { modalty = 'CT' }\ndestinations = ['hub']",
     "routing.rules.0.match.modalty: unknown key, did you mean 'modality'?"),
    ("[cache]\nevict_policy = 'lru'", "cache.evict_policy: unknown key"),  # nothing close
    ("[dicom]\nmax_associations = 20\nmax_connections = 10",
     "dicom.max_connections: must be at least dicom.max_associations (20), got 10"),
    ("[study]\nstable_after_s = -1", "study.stable_after_s: must be at least 0, got -1"),
    ("[[routing.rules]]\nname = 'x'\nmatch = { modality = '(' }\ndestinations = ['hub']",
     "routing.rules.0.match.modality: is not a valid regular expression"),
    # Catastrophic backtracking: 'a' * 40 + '!' as StudyDescription froze the whole daemon
    # (re holds the GIL), C-STOREs from every modality unanswered, after "configuration OK".
    ("[[routing.rules]]\nname = 'x'\nmatch = { study_description = '^(a+)+$' }\n"
     "destinations = ['hub']",
     "routing.rules.0.match.study_description: has an unbounded quantifier inside a repeated "
     "group"),
    ("[[routing.rules]]\nname = 'x'\nmatch = { body_part = '(\\w+\\s?)*x' }\n"
     "destinations = ['hub']",
     "routing.rules.0.match.body_part: has an unbounded quantifier inside a repeated group"),
    ("[[routing.rules]]\nname = 'x'\ndestinations = ['nowhere']",
     "routing.rules.0.destinations: unknown destination 'nowhere'"),
    ("[destinations.pacs]\nkind = 'dicom'\nhost = 'pacs'\nport = 104",
     "destinations.pacs.ae_title: is required"),
    ("[destinations.web]\nkind = 'stowrs'\nurl = 'ftp://x'",
     "destinations.web.url: must start with http:// or https://"),
    ("[dicom\nport = 1", "not valid TOML"),
    # pydantic's words named a Python class ("a valid dictionary or instance of KnownAE")
    # or dumped the table ("Input tag 'dicomm' found using 'kind' ..."), not the key.
    ("[dicom]\nknown_aes = ['CT2']", "dicom.known_aes.0: must be a table ({ key = value, "
     "... }), got 'CT2': write { title = \"CT2\" }"),
    # A known AE's host pin is compared with the address an association comes from: a name,
    # a network or a typo was accepted, then refused every association of that AE.
    ("[dicom]\nknown_aes = [{ title = 'CT9', host = 'localhost' }]",
     "dicom.known_aes.0.host: 'localhost' is not an IP address (a name is not resolved: give "
     "the modality's address)"),
    ("[dicom]\nknown_aes = [{ title = 'CT7', host = '10.1.2.0/24' }]",
     "dicom.known_aes.0.host: '10.1.2.0/24' is not an IP address"),
    # A second entry for one title replaced the first without a word.
    ("[dicom]\nknown_aes = [{ title = 'CT7', host = '10.1.2.7' }, { title = 'CT7' }]",
     "dicom.known_aes[1].title: 'CT7' is already known_aes[0]: one entry per AE title"),
    ("[destinations.pacs]\nkind = 'dicomm'\nae_title = 'P'\nhost = 'pacs'\nport = 104",
     "destinations.pacs.kind: must be one of 'dicom', 'hub', 'stowrs', got 'dicomm'"),
    ("[destinations.pacs]\nae_title = 'P'\nhost = 'pacs'\nport = 104",
     "destinations.pacs.kind: is required ('dicom', 'hub', 'stowrs')"),
])
def test_bad_configuration_is_named_and_refused(tmp_path: Path, toml: str,
                                               expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = check(path)
    assert result.returncode == 2
    assert expected in " ".join(result.stderr.split()), result.stderr


def test_every_problem_is_named_with_a_cross_field_one(tmp_path: Path) -> None:
    """A section's own check (the watermark pair, TLS to a destination without its CA) is
    reported with the other problems, each under the key path the operator wrote."""
    path = tmp_path / "three.toml"
    path.write_text("[dicom]\nport = 0\n[cache]\nlow_watermark_percent = 95\n"
                    "[destinations.ws]\nkind = 'dicom'\nae_title = 'WS'\nhost = 'ws'\n"
                    "port = 104\ntls = true\n")
    result = check(path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error")]
    assert sorted(lines) == sorted([
        "config error dicom.port: must be 1-65535, got 0",
        "config error cache.low_watermark_percent: must be below high_watermark_percent "
        "(90.0), got 95.0",
        "config error destinations.ws.tls_ca: required when tls = true",
    ]), result.stderr
    # --json: the same problems, listed (a configuration management's check reads them).
    answer = check(path, "--json")
    assert answer.returncode == 2 and answer.stderr == "", answer.stderr
    assert json.loads(answer.stdout) == {
        "ok": False, "problems": [line.removeprefix("config error ") for line in lines]}


def test_every_routing_problem_is_named_at_once_and_pas_run_refuses_the_same(
        tmp_path: Path) -> None:
    """A rule naming an unknown destination (or a fallback doing so) was reported only once
    every other field was valid: an operator who fixed the bad regular expression, the
    empty destinations and the unknown priority was refused again, for the names."""
    path = tmp_path / "routing.toml"
    path.write_text("[[routing.rules]]\nname = 'r1'\nmatch = { modality = 'CT(' }\n"
                    "destinations = ['hub']\npriority = 'asap'\n"
                    "[[routing.rules]]\nname = 'r2'\ndestinations = []\n"
                    "[[routing.rules]]\nname = 'r3'\ndestinations = ['nowhere']\n"
                    "[routing.fallback]\ndestinations = ['ghost']\n")
    expected = sorted([
        "config error routing.rules.0.match.modality: is not a valid regular expression "
        "(missing ), unterminated subpattern at position 2): 'CT('",
        "config error routing.rules.0.priority: must be one of 'urgent', 'high', 'routine', "
        "got 'asap'",  # pydantic's own words ("Input should be ...") no more
        "config error routing.rules.1.destinations: must have at least 1 item, got []",
        "config error routing.rules.2.destinations: unknown destination 'nowhere' "
        "(defined: hub)",
        "config error routing.fallback.destinations: unknown destination 'ghost'",
    ])
    checked = check(path)
    assert checked.returncode == 2
    assert sorted(line for line in checked.stderr.splitlines()
                  if line.startswith("config error")) == expected, checked.stderr
    run = run_pas(["run", "--config", str(path)],
                  {**{k: v for k, v in os.environ.items() if not k.startswith("PAS_")},
                   "PAS_HOME": str(tmp_path / "home")}, timeout=60)
    assert run.returncode == 2
    assert sorted(line for line in run.stderr.splitlines()
                  if line.startswith("config error")) == expected, run.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was created


def test_bad_environment_value_is_named() -> None:
    result = check(None, PAS_DICOM__PORT="0", PAS_DICOM__MAX_ASSOCIATIONS="many")
    assert result.returncode == 2
    assert "dicom.port: must be 1-65535, got 0" in result.stderr
    assert "dicom.max_associations" in result.stderr
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"PAS_NOSUCH__KEY": "1"})
    assert "nosuch: unknown key" in str(raised.value)


def _said(result: subprocess.CompletedProcess[str]) -> str:
    """What the command printed, without the console's line wrapping."""
    return " ".join((result.stdout + result.stderr).split())


def test_environment_value_is_read_as_its_key_type() -> None:
    """Text keys keep digits as text (an AE title, a password); number keys still get a
    number; a quoted value is unquoted as before."""
    result = check(None, PAS_DICOM__AE_TITLE="1234", PAS_DICOM__PORT="11113",
                   PAS_DESTINATIONS__R__KIND="stowrs", PAS_DESTINATIONS__R__URL="https://x",
                   PAS_DESTINATIONS__R__USERNAME="1000", PAS_DESTINATIONS__R__PASSWORD="2024",
                   PAS_SITE='"quoted"')
    assert result.returncode == 0, _said(result)
    assert "site quoted, AE 1234 port 11113, HL7 port 2575, home " in _said(result)
    assert _said(result).endswith(" 0 routing rules, 1 destination; no database yet (pas run "
                                  "creates it)")
    settings = load_settings(environ={"PAS_DESTINATIONS__R__KIND": "stowrs",
                                      "PAS_DESTINATIONS__R__URL": "https://x",
                                      "PAS_DESTINATIONS__R__PASSWORD": "2024",
                                      "PAS_SERVING__AUTH": "bearer",
                                      "PAS_SERVING__BEARER_TOKENS": '["123"]'})
    assert settings.destinations["r"].password == "2024"  # type: ignore[union-attr]
    assert settings.serving.bearer_tokens == ["123"]


def test_value_and_key_of_it_both_set_is_named() -> None:
    result = check(None, PAS_DICOM__TLS="1", PAS_DICOM__TLS__ENABLED="true")
    assert result.returncode == 2, _said(result)
    assert "Traceback" not in _said(result)
    assert ("config error dicom.tls: set by both PAS_DICOM__TLS and PAS_DICOM__TLS__ENABLED"
            in _said(result))


def test_a_variable_under_an_unknown_section_or_a_list_item_is_named() -> None:
    """``PAS_DICOMM__PORT`` (a section misspelt) said ``dicomm: unknown key`` without the
    variable, unlike a key misspelt in a known section; ``PAS_ROUTING__RULES__0__NAME`` said
    pydantic's ``Input should be a valid list, got {'0': ...}``. Both now name the variable;
    the list item says how a list is set from the environment."""
    result = check(None, PAS_DICOMM__PORT="5")
    assert result.returncode == 2 and "Traceback" not in _said(result)
    assert ("config error dicomm: unknown key, did you mean 'dicom'? (set by PAS_DICOMM__PORT)"
            in _said(result))
    result = check(None, PAS_ROUTING__RULES__0__NAME="x")
    assert result.returncode == 2 and "Traceback" not in _said(result)
    assert ("config error routing.rules.0.name: set by PAS_ROUTING__RULES__0__NAME, but a "
            "list's items cannot be set one by one; set PAS_ROUTING__RULES to the whole list "
            "as a TOML array") in _said(result)
    result = check(None, PAS_ROUTING__RULES='[{name = "ct", destinations = ["hub"]}]')
    assert result.returncode == 0, _said(result)


def test_a_section_and_key_joined_by_one_underscore_is_refused_naming_the_variable() -> None:
    """``PAS_DICOM_PORT=104`` (one underscore) was not read: the daemon listened on 11112 and
    ``pas config check`` said OK. Now refused, saying which variable was meant; a ``PAS_``
    name that is no section and key of it stays someone else's, and the hub's variables are
    the hub's (checked by ``load_settings`` as ``pas hub run`` reads them)."""
    result = check(None, PAS_DICOM_PORT="104", PAS_STUDY_STABLE_AFTER_S="5")
    assert result.returncode == 2 and "Traceback" not in _said(result)
    assert ("config error dicom.port: PAS_DICOM_PORT is not read (a section and its key are "
            "joined by two underscores); did you mean PAS_DICOM__PORT?") in _said(result)
    assert ("config error study.stable_after_s: PAS_STUDY_STABLE_AFTER_S is not read"
            in _said(result))
    assert "configuration OK" not in _said(result)
    result = check(None, PAS_DICOM__PORT="104", PAS_DICOM_PORTS="1", PAS_HUB_HTTP_PORT="9")
    assert result.returncode == 0, _said(result)
    assert "port 104" in _said(result)
    from appliance.hub.config import load_hub_settings
    with pytest.raises(ConfigError) as refused:
        load_hub_settings(environ={"PAS_HUB_HTTP_PORT": "9"})
    assert refused.value.problems == [
        "http.port: PAS_HUB_HTTP_PORT is not read (a section and its key are joined by two "
        "underscores); did you mean PAS_HUB_HTTP__PORT?"]


def test_top_level_keys_are_overridden() -> None:
    result = check(None, PAS_SITE="1234")
    assert result.returncode == 0 and "configuration OK: site 1234," in _said(result)
    result = check(None, PAS_LOG_LEVEL="loud", PAS_CONFIG_UNRELATED="x")
    assert result.returncode == 2
    assert ("config error log_level: must be one of 'debug', 'info', 'warning', 'error', "
            "got 'loud' (set by PAS_LOG_LEVEL)") in _said(result)
    assert "unrelated" not in _said(result)  # a PAS_ name that is no key is not ours


def test_missing_file_is_named(tmp_path: Path) -> None:
    result = check(tmp_path / "absent.toml")
    assert result.returncode == 2 and "file not found" in result.stderr


def _keys(model: type, prefix: str = "") -> list[tuple[str, str]]:
    """(section, key) for every field of the model, sections flattened to their TOML header."""
    from pydantic import BaseModel

    found = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.extend(_keys(annotation, f"{prefix}{key}."))
        else:
            found.append((prefix.rstrip("."), key))
    return found


@pytest.mark.parametrize("example", ["appliance.example.toml", "hub.example.toml"])
def test_example_documents_every_key(example: str) -> None:
    """Each key of the model appears (set or commented) under its section's header; the hub's
    too (README: its settings, "see config/hub.example.toml"), but for its home, which is
    PAS_HUB_HOME (the file's header says so)."""
    from appliance.config import Settings
    from appliance.hub.config import HubSettings

    model, exempt = ((Settings, set()) if example == "appliance.example.toml"
                     else (HubSettings, {"home"}))
    text = (ROOT / "config" / example).read_text()
    sections: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        stripped = line.strip().lstrip("#").strip()
        if stripped.startswith("[") and stripped.endswith("]") and "=" not in stripped:
            current = stripped.strip("[]")
        sections[current] = sections.get(current, "") + stripped + "\n"
    def documented(section: str, key: str) -> bool:
        dotted = f"{section}.{key}" if section else key
        return f"{key} =" in sections.get(section, "") or any(
            header == dotted or header.startswith(dotted + ".") for header in sections)

    missing = [f"{section}.{key}" if section else key for section, key in _keys(model)
               if not documented(section, key) and key not in exempt]
    assert not missing, f"undocumented keys in config/{example}: {missing}"


def test_pas_home_in_the_environment_wins_over_the_files_home(tmp_path: Path) -> None:
    """The shipped configuration names home = "/var/lib/pas" (an admin shell finds it);
    PAS_HOME must still override it, as every environment variable overrides its key."""
    config = tmp_path / "appliance.toml"
    config.write_text('home = "/var/lib/pas"\n')
    settings = load_settings(config, environ={"PAS_HOME": str(tmp_path / "elsewhere")})
    assert settings.home == tmp_path / "elsewhere"
    assert load_settings(config, environ={}).home == Path("/var/lib/pas")


def test_an_issuer_mapped_from_the_environment_matches_the_ris_issuer_in_capitals() -> None:
    """A variable's name arrives in lower case (``PAS_PREFETCH__ISSUER_MAP__CHU-A`` is the
    key ``chu-a``) and the RIS writes ``CHU-A``: the map applied to no order (the region was
    asked without its issuer). Matched regardless of case; an unmapped issuer stays unmapped."""
    prefetch = load_settings(environ={"PAS_PREFETCH__ISSUER_MAP__CHU-A": "REGION-A"}).prefetch
    assert prefetch.issuer_map == {"chu-a": "REGION-A"}
    assert prefetch.region_issuer("CHU-A") == prefetch.region_issuer("chu-a") == "REGION-A"
    assert prefetch.region_issuer("CHU-B") is None


def _run_refuses(path: Path, tmp_path: Path) -> str:
    """``pas run --config PATH`` (no PAS_* from the test's environment): it must refuse to
    start (exit 2); its stderr."""
    run = run_pas(["run", "--config", str(path)],
                  {**{k: v for k, v in os.environ.items() if not k.startswith("PAS_")},
                   "PAS_HOME": str(tmp_path / "home")}, timeout=60)
    assert run.returncode == 2, run.stderr
    return run.stderr


def test_a_boolean_key_in_the_file_takes_true_or_false_only(tmp_path: Path) -> None:
    """``continue = "yes"`` read as true (pydantic's lax booleans: "yes", "on", "0", 1...):
    a typo or a misunderstanding passed ``pas config check``. Now each such key is named,
    in a section, in a list of rules and in a destination, and ``pas run`` refuses it too;
    the same file with real booleans is OK."""
    rules = "".join(f"[[routing.rules]]\nname = 'r{i}'\ndestinations = ['hub']\n"
                    for i in range(2))
    body = ("[dicom]\naccept_unknown = {accept}\n[storage]\nfsync = {fsync}\n"
            "[serving]\nfetch_through = {fetch}\n" + rules
            + "[[routing.rules]]\nname = 'r2'\ndestinations = ['hub']\ncontinue = {cont}\n"
            "[destinations.ws]\nkind = 'dicom'\nae_title = 'WS'\nhost = 'ws'\nport = 104\n"
            "tls = {tls}\ntls_ca = '/etc/ssl/ws.pem'\n")
    path = tmp_path / "flags.toml"
    path.write_text(body.format(accept='"yes"', fsync=1, fetch='"false"', cont='"yes"',
                                tls='"on"'))
    result = check(path)
    assert result.returncode == 2, _said(result)
    assert sorted(line for line in result.stderr.splitlines()
                  if line.startswith("config error")) == sorted([
        "config error dicom.accept_unknown: must be true or false, got 'yes'",
        "config error storage.fsync: must be true or false, got 1",
        "config error serving.fetch_through: must be true or false, got 'false'",
        "config error routing.rules.2.continue: must be true or false, got 'yes'",
        "config error destinations.ws.tls: must be true or false, got 'on'",
    ]), result.stderr
    assert "routing.rules.2.continue: must be true or false" in _run_refuses(path, tmp_path)
    path.write_text(body.format(accept="true", fsync="false", fetch="false", cont="true",
                                tls="true"))
    assert check(path).returncode == 0, _said(check(path))


def _boolean_fields(model: type) -> list[tuple[type, str]]:
    return [(owner, name) for owner, name, _ in _typed_fields(model, (bool,))]


def _typed_fields(model: type, kinds: tuple[type, ...],
                  seen: set[type] | None = None) -> list[tuple[type, str, type]]:
    """(model, field name, type) of every key of one of ``kinds`` reachable from ``model``:
    in sections, in list items (routing rules) and dict values (destinations), through
    unions and ``Annotated`` (``Port``)."""
    from typing import Annotated, Union, get_args, get_origin

    from pydantic import BaseModel

    seen = set() if seen is None else seen
    seen.add(model)
    found = []

    def leaves(annotation: object) -> list[object]:
        origin = get_origin(annotation)
        if origin is Annotated:
            return leaves(get_args(annotation)[0])
        if origin in (Union, list, dict) or type(annotation).__name__ == "UnionType":
            return [leaf for arg in get_args(annotation) for leaf in leaves(arg)]
        return [annotation]

    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        for leaf in leaves(field.annotation):
            if any(leaf is kind for kind in kinds):
                found.append((model, name, leaf))
            elif isinstance(leaf, type) and issubclass(leaf, BaseModel) and leaf not in seen:
                found.extend(_typed_fields(leaf, kinds, seen))
    return found


def test_every_boolean_key_is_strict() -> None:
    """Each boolean key of the configuration (20 today), not only ``continue``, refuses
    text and numbers; a key added later as a plain ``bool`` fails here."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    from appliance.config import Settings

    fields = _boolean_fields(Settings)
    assert len(fields) >= 20 and any(name == "continue_" for _, name in fields), fields
    lax = []
    for model, name in fields:
        field = model.model_fields[name]  # type: ignore[attr-defined]
        # An optional flag (``Flag | None``, known_aes' ``tls``) keeps its validator inside
        # the annotation, not in the field's metadata.
        adapter: TypeAdapter[bool] = TypeAdapter(
            Annotated[bool, *field.metadata] if field.metadata else field.annotation)
        assert adapter.validate_python(True) is True
        for written in ("yes", "true", 1, 0):
            try:
                adapter.validate_python(written)
            except ValidationError as exc:
                assert exc.errors()[0]["msg"] == "must be true or false"
            else:
                lax.append(f"{model.__name__}.{name} = {written!r}")
    assert not lax, lax


@pytest.mark.parametrize(("written", "value"), [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False),
])
def test_a_boolean_key_from_the_environment_still_reads_words(written: str,
                                                              value: bool) -> None:
    """Variables are text by nature: a boolean key takes the words pydantic always read
    (the systemd unit and the tests set ``PAS_DICOM__ACCEPT_UNKNOWN=true``)."""
    settings = load_settings(environ={"PAS_DICOM__ACCEPT_UNKNOWN": written,
                                      "PAS_ROUTING__FALLBACK__DESTINATIONS": '["hub"]'})
    assert settings.dicom.accept_unknown is value


def test_a_boolean_variable_that_is_no_boolean_is_named() -> None:
    result = check(None, PAS_DICOM__ACCEPT_UNKNOWN="true", PAS_SERVING__QUERY_REGION="maybe")
    assert result.returncode == 2, _said(result)
    assert [line for line in result.stderr.splitlines() if line.startswith("config error")] == [
        "config error serving.query_region: must be true or false, got 'maybe' "
        "(set by PAS_SERVING__QUERY_REGION)"]
    assert check(None, PAS_DICOM__ACCEPT_UNKNOWN="true").returncode == 0


def _errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return sorted(line for line in result.stderr.splitlines() if line.startswith("config error"))


def test_a_number_key_in_the_file_takes_a_toml_number(tmp_path: Path) -> None:
    """``port = "11112"``, ``stable_after_s = "60"``, ``max_attempts = 3.0`` and
    ``pin_days = true`` passed ``pas config check`` (pydantic's lax numbers: 11112, 60.0, 3,
    1). Now each is named, in sections, a list of tables and a destination, ``pas run``
    refuses it too; the same file with numbers is OK, a float key taking an integer."""
    body = ("[dicom]\nport = {port}\n[study]\nstable_after_s = {stable}\n"
            "check_interval_s = {check}\n[queue]\nmax_attempts = {attempts}\n"
            "[prefetch]\npin_days = {pin}\n[[prefetch.rules]]\nname = 'mr'\npriors = {priors}\n"
            "[[hub.windows]]\nstart = '07:00'\nend = '19:00'\nmax_mbps = {mbps}\n"
            "[destinations.ws]\nkind = 'dicom'\nae_title = 'WS'\nhost = 'ws'\nport = {ws}\n"
            "timeout_s = {timeout}\n")
    path = tmp_path / "numbers.toml"
    path.write_text(body.format(port='"11112"', stable='"60"', check="true", attempts="3.0",
                                pin="true", priors="2.0", mbps='"8"', ws="'104'",
                                timeout="false"))
    result = check(path)
    assert result.returncode == 2, _said(result)
    assert _errors(result) == sorted([
        "config error dicom.port: must be an integer, got '11112'",
        "config error study.stable_after_s: must be a number, got '60'",
        "config error study.check_interval_s: must be a number, got true",
        "config error queue.max_attempts: must be an integer, got 3.0",
        "config error prefetch.pin_days: must be an integer, got true",
        "config error prefetch.rules.0.priors: must be an integer, got 2.0",
        "config error hub.windows.0.max_mbps: must be a number, got '8'",
        "config error destinations.ws.port: must be an integer, got '104'",
        "config error destinations.ws.timeout_s: must be a number, got false",
    ]), result.stderr
    assert "dicom.port: must be an integer, got '11112'" in " ".join(
        _run_refuses(path, tmp_path).split())
    path.write_text(body.format(port=11112, stable=60, check=0.5, attempts=3, pin=7, priors=2,
                                mbps=8, ws=104, timeout=12.5))
    assert check(path).returncode == 0, _said(check(path))
    settings = load_settings(path, environ={})
    assert settings.study.stable_after_s == 60.0 and type(settings.study.stable_after_s) is float
    assert settings.hub.windows[0].max_mbps == 8.0 and settings.dicom.port == 11112


def _number_models() -> list[tuple[type, str, type]]:
    from appliance.config import Settings
    from appliance.hub.config import HubSettings

    return _typed_fields(Settings, (int, float)) + _typed_fields(HubSettings, (int, float))


def test_every_number_key_is_strict() -> None:
    """Each integer and float key of the appliance's and the hub's configuration (80 today),
    plain, constrained (``Field(ge=1)``) or ``Port``, refuses text and booleans, an integer
    key a float too; a float key still takes an integer. A key added later is covered."""
    from pydantic import BaseModel, ValidationError

    fields = _number_models()
    assert len(fields) >= 80, fields
    assert {(m.__name__, n) for m, n, _ in fields} >= {
        ("DicomSection", "port"), ("StudySection", "stable_after_s"), ("RateWindow", "max_mbps"),
        ("PrefetchRule", "priors"), ("DicomDestination", "port"), ("LimitsSection", "max_buckets")}

    def refusal(model: type[BaseModel], key: str, value: object) -> str | None:
        """The type error ``value`` gets at ``key`` alone (the other keys may be missing)."""
        try:
            model.model_validate({key: value})
        except ValidationError as exc:
            return next((e["type"] for e in exc.errors() if e["loc"] == (key,)
                         and e["type"] in ("int_type", "float_type")), None)
        return None

    lax = []
    for model, name, kind in fields:
        key = model.model_fields[name].alias or name  # type: ignore[attr-defined]
        expected = "int_type" if kind is int else "float_type"
        wrong: list[object] = ["7", "7.5", True, False] + ([7.0] if kind is int else [])
        for value in wrong:
            if refusal(model, key, value) != expected:
                lax.append(f"{model.__name__}.{name} = {value!r}")
        if refusal(model, key, 7) is not None:
            lax.append(f"{model.__name__}.{name} refuses the integer 7")
    assert not lax, lax


@pytest.mark.parametrize(("variable", "written", "value"), [
    ("PAS_DICOM__PORT", "11113", 11113), ("PAS_DICOM__PORT", '"11113"', 11113),
    ("PAS_STUDY__STABLE_AFTER_S", "0.5", 0.5), ("PAS_STUDY__STABLE_AFTER_S", "60", 60.0),
    ("PAS_QUEUE__MAX_ATTEMPTS", "3.0", 3), ("PAS_DESTINATIONS__WS__PORT", "104", 104),
])
def test_a_number_key_from_the_environment_still_reads_numbers(variable: str, written: str,
                                                               value: float) -> None:
    """Variables are text by nature: a number key takes the numbers it always took (the
    systemd unit, the tests and the benchmarks set ``PAS_DICOM__PORT``), the model being
    strict now. (A guard: this passed before, it fails if the variables are not converted.)"""
    destination = {"PAS_DESTINATIONS__WS__KIND": "dicom", "PAS_DESTINATIONS__WS__AE_TITLE": "WS",
                   "PAS_DESTINATIONS__WS__HOST": "ws", "PAS_DESTINATIONS__WS__PORT": "105"}
    settings = load_settings(environ={**destination, variable: written})
    got = {"PAS_DICOM__PORT": settings.dicom.port,
           "PAS_STUDY__STABLE_AFTER_S": settings.study.stable_after_s,
           "PAS_QUEUE__MAX_ATTEMPTS": settings.queue.max_attempts,
           "PAS_DESTINATIONS__WS__PORT": settings.destinations["ws"].port,  # type: ignore[union-attr]
           }[variable]
    assert got == value and type(got) is type(value)


def test_a_number_variable_that_is_no_number_is_named() -> None:
    """``PAS_DICOM__PORT=true`` was port 1 and ``PAS_PREFETCH__PIN_DAYS=yes`` was refused as
    "unable to parse string"; each is named by its key with what the variable said."""
    result = check(None, PAS_DICOM__PORT="true", PAS_PREFETCH__PIN_DAYS="yes",
                   PAS_QUEUE__MAX_ATTEMPTS="3.5", PAS_STUDY__STABLE_AFTER_S="false",
                   PAS_HUB__WINDOWS='[{start = "01:00", end = "02:00", max_mbps = "5"}]')
    assert result.returncode == 2, _said(result)
    assert _errors(result) == sorted([
        "config error dicom.port: must be an integer, got 'true' (set by PAS_DICOM__PORT)",
        "config error prefetch.pin_days: must be an integer, got 'yes' "
        "(set by PAS_PREFETCH__PIN_DAYS)",
        "config error queue.max_attempts: must be an integer, got '3.5' "
        "(set by PAS_QUEUE__MAX_ATTEMPTS)",
        "config error study.stable_after_s: must be a number, got 'false' "
        "(set by PAS_STUDY__STABLE_AFTER_S)",
        "config error hub.windows.0.max_mbps: must be a number, got '5' "
        "(set by PAS_HUB__WINDOWS)",
    ]), result.stderr
    assert check(None, PAS_DICOM__PORT="11113").returncode == 0


def test_the_hubs_number_keys_are_strict_in_its_file_and_variables(tmp_path: Path) -> None:
    """The hub's configuration had its own lax base: ``port = "8443"``, ``workers = true``
    and ``max_buckets = 1e5`` (100000.0) started a hub. ``pas hub sites`` loads it and is
    refused, each key named; its variables still read numbers."""
    from appliance.hub.config import load_hub_settings

    path = tmp_path / "hub.toml"
    path.write_text("[http]\nport = '8443'\n[archive]\nworkers = true\n[limits]\n"
                    "max_buckets = 1e5\n[transfers]\nabandoned_after_days = '30'\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    result = run_pas(["hub", "sites", "--config", str(path)],
                     {**clean, "PAS_HUB_HOME": str(tmp_path / "hub"),
                      "PAS_HUB_ARCHIVE__TIMEOUT_S": "true"}, timeout=60)
    assert result.returncode == 2, _said(result)
    assert _errors(result) == sorted([
        "config error http.port: must be an integer, got '8443'",
        "config error archive.workers: must be an integer, got true",
        # the variable named, as the appliance's are
        "config error archive.timeout_s: must be a number, got 'true' (set by "
        "PAS_HUB_ARCHIVE__TIMEOUT_S)",
        "config error limits.max_buckets: must be an integer, got 100000.0",
        "config error transfers.abandoned_after_days: must be a number, got '30'",
    ]), result.stderr
    hub = load_hub_settings(environ={"PAS_HUB_HOME": str(tmp_path / "hub"),
                                     "PAS_HUB_HTTP__PORT": "9443",
                                     "PAS_HUB_ARCHIVE__TIMEOUT_S": "1.5"})
    assert (hub.http.port, hub.archive.timeout_s) == (9443, 1.5)


def test_no_float_key_takes_inf_or_nan(tmp_path: Path) -> None:
    """``check_interval_s = inf`` passed ``pas config check``; ``pas run`` then said ready and
    its routing thread died on ``OverflowError`` (Event.wait), nothing routed again. Every
    float key refuses inf, -inf and nan (nan was refused only by a bound, "greater than 0"),
    in the file and from a variable."""
    from pydantic import BaseModel, ValidationError

    path = tmp_path / "infinite.toml"
    path.write_text("[study]\ncheck_interval_s = inf\n[queue]\npoll_interval_s = -inf\n"
                    "[dicom]\nnetwork_timeout_s = nan\n[[hub.windows]]\nstart = '07:00'\n"
                    "end = '19:00'\nmax_mbps = inf\n")
    result = check(path, PAS_CACHE__SCRUB_MB_PER_S="inf")
    assert result.returncode == 2, _said(result)
    assert _errors(result) == sorted([
        "config error study.check_interval_s: must be a finite number, got inf",
        "config error queue.poll_interval_s: must be a finite number, got -inf",
        "config error dicom.network_timeout_s: must be a finite number, got nan",
        "config error hub.windows.0.max_mbps: must be a finite number, got inf",
        "config error cache.scrub_mb_per_s: must be a finite number, got inf "
        "(set by PAS_CACHE__SCRUB_MB_PER_S)",
    ]), result.stderr

    def refused(model: type[BaseModel], key: str, value: float) -> bool:
        try:
            model.model_validate({key: value})
        except ValidationError as exc:
            return any(e["loc"] == (key,) and e["type"] == "finite_number"
                       for e in exc.errors())
        return False

    floats = [(model, name) for model, name, kind in _number_models() if kind is float]
    assert len(floats) >= 40, floats
    lax = [f"{model.__name__}.{name} = {value}" for model, name in floats
           for value in (float("inf"), float("-inf"), float("nan"))
           if not refused(model, model.model_fields[name].alias or name,  # type: ignore[attr-defined]
                          value)]
    assert not lax, lax


def test_check_names_a_bad_value_of_the_file_an_environment_variable_replaces(
        tmp_path: Path) -> None:
    """PAS_DICOM__PORT replaced the file's port before the check: a port of 70000 in the file
    was "configuration OK" while the variable was set, and refused by pas run the day it
    was not. The file's own values are checked too; a valid file with overrides is OK."""
    path = tmp_path / "appliance.toml"
    path.write_text('[dicom]\nport = 70000\n')
    result = check(path, PAS_DICOM__PORT="11113")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "configuration OK" not in result.stdout
    assert "dicom.port: must be 1-65535, got 70000" in result.stderr, result.stderr
    assert "PAS_* variable replaces it now" in result.stderr
    path.write_text('[dicom]\nport = 11112\n')
    assert check(path, PAS_DICOM__PORT="11113").returncode == 0
    # Found where pas run finds it ($PAS_HOME/appliance.toml), not only when named.
    path.write_text('[dicom]\nport = 70000\n')
    assert check(None, PAS_HOME=str(tmp_path), PAS_DICOM__PORT="11113").returncode == 2
    # With another problem the variables do not hide, both are said in the same run (the
    # hidden one was said only once the other was fixed), each once.
    path.write_text('[dicom]\nport = 70000\nae_title = "WAY-TOO-LONG-AE-TITLE"\n')
    result = check(path, PAS_DICOM__PORT="11113")
    said = [" ".join(line.split()) for line in result.stderr.split("config error")[1:]]
    assert result.returncode == 2, result.stdout + result.stderr
    assert said == [
        "dicom.ae_title: must be 1-16 printable characters without backslash, got "
        "'WAY-TOO-LONG-AE-TITLE'",
        f"in {path} (a PAS_* variable replaces it now; without it pas run refuses the file): "
        "dicom.port: must be 1-65535, got 70000"], result.stderr
    answer = check(path, "--json", PAS_DICOM__PORT="11113")
    assert answer.returncode == 2, answer.stdout + answer.stderr
    assert json.loads(answer.stdout) == {"ok": False, "problems": said}
    # A valid file: what the text check summarises, named.
    path.write_text('site = "CHU-Z"\n[dicom]\nport = 11112\n[destinations.ws]\nkind = '
                    '"dicom"\nae_title = "WS"\nhost = "127.0.0.1"\nport = 104\n'
                    '[[routing.rules]]\nname = "all"\ndestinations = ["ws"]\n')
    answer = check(path, "--json", PAS_DICOM__PORT="11113", PAS_HOME=str(tmp_path / "home"))
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert json.loads(answer.stdout) == {
        "ok": True, "problems": [], "site": "CHU-Z", "site_from": "configuration",
        "ae_title": "PAS", "port": 11113, "hl7_port": 2575, "home": str(tmp_path / "home"),
        "rules": ["all"],
        "destinations": {"ws": "dicom"}, "enrolled_hub": None,
        "database": "no database yet (pas run creates it)"}
    assert not (tmp_path / "home").exists()  # a check creates nothing


def test_a_home_that_is_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    """PAS_HOME set to a file: pas run said "cannot start: FILE/pki/hub.json: unreadable
    ([Errno 20] Not a directory)"; the configuration is refused naming the key instead."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    result = check(None, PAS_HOME=str(a_file))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"config error home: {a_file} is not a folder" in " ".join(result.stderr.split())
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    run = run_pas(["run"], {**clean, "PAS_HOME": str(a_file)}, timeout=60)
    assert run.returncode == 2 and "home: " in run.stderr and "Traceback" not in run.stderr
    assert a_file.read_text() == "not a folder"
