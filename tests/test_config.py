"""Configuration: defaults, the example file, env overrides, and every error named by key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_settings
from tests.support.peers import PAS_BIN, ROOT


def check(path: Path | None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    args = [str(PAS_BIN), "config", "check"] + ([str(path)] if path else [])
    return subprocess.run(args, env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)


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
    ("[dicom]\nprot = 104", "dicom.prot: unknown key"),
    ("[study]\nstable_after_s = -1", "study.stable_after_s: Input should be greater than"),
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
        "config error routing.rules.0.priority: Input should be 'urgent', 'high' or "
        "'routine', got 'asap'",
        "config error routing.rules.1.destinations: List should have at least 1 item after "
        "validation, not 0, got []",
        "config error routing.rules.2.destinations: unknown destination 'nowhere' "
        "(defined: hub)",
        "config error routing.fallback.destinations: unknown destination 'ghost'",
    ])
    checked = check(path)
    assert checked.returncode == 2
    assert sorted(line for line in checked.stderr.splitlines()
                  if line.startswith("config error")) == expected, checked.stderr
    run = subprocess.run([str(PAS_BIN), "run", "--config", str(path)], capture_output=True,
                         text=True, timeout=60,
                         env={**{k: v for k, v in os.environ.items()
                                 if not k.startswith("PAS_")},
                              "PAS_HOME": str(tmp_path / "home")})
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
                   PAS_DESTINATIONS__R__KIND="stowrs", PAS_DESTINATIONS__R__URL="http://x",
                   PAS_DESTINATIONS__R__USERNAME="1000", PAS_DESTINATIONS__R__PASSWORD="2024",
                   PAS_SITE='"quoted"')
    assert result.returncode == 0, _said(result)
    assert "site quoted, AE 1234 port 11113" in _said(result)
    assert _said(result).endswith(" rules, 1 destination")
    settings = load_settings(environ={"PAS_DESTINATIONS__R__KIND": "stowrs",
                                      "PAS_DESTINATIONS__R__URL": "http://x",
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


def test_top_level_keys_are_overridden() -> None:
    result = check(None, PAS_SITE="1234")
    assert result.returncode == 0 and "configuration OK: site 1234," in _said(result)
    result = check(None, PAS_LOG_LEVEL="loud", PAS_CONFIG_UNRELATED="x")
    assert result.returncode == 2
    assert "config error log_level: Input should be 'debug'" in _said(result)
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
