"""``pas send`` into a real daemon, and ``pas doctor`` against real DICOM destinations (DCMTK
storescp up, a dead port down). Doctor against a real hub and a running, enrolled daemon is
in test_ops_fleet.py (it shares that module's hub)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cli.common import login_name
from tests.support.peers import (
    CT_DIR,
    MR_DIR,
    PAS_BIN,
    PasProcess,
    StoreSCP,
    free_port,
    read_rows,
    run_pas,
    storescu,
)

FILES = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:10]


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "to-send"
    (folder / "series").mkdir(parents=True)
    for path in FILES:
        shutil.copy(path, folder / "series" / path.name)
    (folder / "notes.txt").write_text("not DICOM")
    return folder


def test_send_refusals_then_a_folder_into_pas(pas: PasProcess, tmp_path: Path) -> None:
    missing = pas.cli("send", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    nothing = pas.cli("send", str(tmp_path / "empty"), check=False)
    assert nothing.returncode == 2 and "no DICOM file found" in nothing.stderr
    closed = pas.cli("send", str(FILES[0]), "--port", str(free_port()), check=False)
    assert closed.returncode == 1 and "cannot associate" in closed.stderr
    assert pas.status()["instances"] == 0  # nothing arrived from the refused sends

    folder = _folder(tmp_path)
    result = pas.cli("send", str(folder), "--calling-ae", "ITTEST")
    assert f"sent {len(FILES)} of {len(FILES)} files" in result.stdout
    assert "skipped, not a DICOM file" in result.stderr and "notes.txt" in result.stderr
    studies = json.loads(pas.cli("studies", "--json").stdout)
    assert sum(s["instances"] for s in studies) == len(FILES)
    # Sending again changes nothing (the daemon sees duplicates).
    pas.cli("send", str(folder))
    assert pas.status()["instances"] == len(FILES)
    # A file whose header is cut (only the preamble, DICM and a broken meta) is named and
    # skipped; the others still go (it crashed the whole send, nothing sent, before).
    damaged = folder / "cut.dcm"
    damaged.write_bytes(FILES[0].read_bytes()[:150])
    again = pas.cli("send", str(folder))
    assert "skipped, unreadable DICOM header" in again.stderr and "cut.dcm" in again.stderr
    assert f"sent {len(FILES)} of {len(FILES)} files" in again.stdout
    assert "Traceback" not in again.stderr


def _dataset_bytes(raw: bytes) -> bytes:
    """A Part 10 file's dataset: its bytes after the preamble, DICM and the file meta."""
    import io

    from pydicom.filereader import _read_file_meta_info

    handle = io.BytesIO(raw)
    handle.seek(132)
    _read_file_meta_info(handle)
    return raw[handle.tell():]


def test_send_sends_each_file_as_it_is_stored(pas: PasProcess) -> None:
    """``pas send`` decoded each file and encoded it again: a CT whose sequences have
    defined lengths arrived with undefined ones, other bytes than the file's (a modality's
    copy already held then counted a conflict, a second version). The dataset's own bytes
    go now: PAS stores exactly the file's dataset, and the same files again are
    duplicates."""
    ct = sorted(CT_DIR.glob("*.dcm"))[:4]
    result = pas.cli("send", *map(str, ct), "--calling-ae", "ITTEST")
    assert "sent 4 of 4 files" in result.stdout, result.stdout + result.stderr
    stored = {r["sop_instance_uid"]: pas.home / "spool" / r["path"] for r in read_rows(
        pas.home / "pas.sqlite", "SELECT sop_instance_uid, path FROM instances")}
    assert len(stored) == 4
    from pydicom import dcmread

    for path in ct:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(stored[uid].read_bytes()) == _dataset_bytes(path.read_bytes())
    pas.cli("send", *map(str, ct))
    status = pas.status()
    assert (status["instances"], status["conflicts"]) == (4, 0)


BAD_SEND_OPTIONS = [
    (["--calling-ae", ""], "--calling-ae: must be 1-16 printable characters"),
    (["--calling-ae", "WAY_TOO_LONG_AE_TITLE_X"], "--calling-ae: must be 1-16 printable"),
    (["--called-ae", ""], "--called-ae: must be 1-16 printable characters"),
    (["--called-ae", "A\\B"], "--called-ae: must be 1-16 printable characters"),
    (["--port", "0"], "--port: must be 1-65535, got 0"),
    (["--port", "99999"], "--port: must be 1-65535, got 99999"),
    (["--port", "-5"], "--port: must be 1-65535, got -5"),
    # Refused by its syntax alone: no DNS query leaves this host.
    (["--host", "bad host!"], "--host: cannot resolve 'bad host!'"),
]


def test_send_refuses_a_bad_option_naming_it(pas: PasProcess) -> None:
    """Each was a traceback (pynetdicom's AE title check, the socket's port range, the
    resolver), or, for ``--port 0`` and ``--called-ae ""``, silently the configuration's
    values. Now one line naming the option, exit 2, nothing sent. (One daemon for all.)"""
    for option, said in BAD_SEND_OPTIONS:
        refused = pas.cli("send", str(FILES[0]), *option, check=False)
        assert refused.returncode == 2, (option, refused.stdout + refused.stderr)
        assert said in " ".join(refused.stderr.split()), (option, refused.stderr)
        assert "Traceback" not in refused.stderr and "sent" not in refused.stdout, option
    assert pas.status()["instances"] == 0


def _doctor(env: dict[str, str], *args: str) -> tuple[int, dict[str, dict[str, str]]]:
    result = run_pas(["doctor", "--json", *args], env, timeout=120)
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    return result.returncode, checks


def test_doctor_checks_destinations(storescp: StoreSCP, tmp_path: Path) -> None:
    env = {**os.environ, "PAS_HOME": str(tmp_path / "home"),
           "PAS_DICOM__HOST": "127.0.0.1", "PAS_DICOM__PORT": str(free_port()),
           "PAS_HTTP__PORT": str(free_port()),
           "PAS_DESTINATIONS__ARCHIVE__KIND": "dicom",
           "PAS_DESTINATIONS__ARCHIVE__AE_TITLE": storescp.ae_title,
           "PAS_DESTINATIONS__ARCHIVE__HOST": "127.0.0.1",
           "PAS_DESTINATIONS__ARCHIVE__PORT": str(storescp.port),
           "PAS_DESTINATIONS__DEAD__KIND": "dicom",
           "PAS_DESTINATIONS__DEAD__AE_TITLE": "NOBODY",
           "PAS_DESTINATIONS__DEAD__HOST": "127.0.0.1",
           "PAS_DESTINATIONS__DEAD__PORT": str(free_port()),
           # A viewer's C-MOVE destinations: one up, one off (a warning, not a failure).
           "PAS_SERVING__MOVE_DESTINATIONS": (
               f'[{{title = "{storescp.ae_title}", host = "127.0.0.1", port = {storescp.port}}},'
               f' {{title = "WSOFF", host = "127.0.0.1", port = {free_port()}}}]')}
    code, checks = _doctor(env)
    assert code == 1  # the dead destination must be fixed
    assert checks["destination archive"]["verdict"] == "ok", checks["destination archive"]
    assert checks["destination dead"]["verdict"] == "fail"
    assert "NOBODY@127.0.0.1" in checks["destination dead"]["fix"]
    up = checks[f"move destination {storescp.ae_title}"]
    assert up["verdict"] == "ok" and up["detail"].endswith(": success"), up
    off = checks["move destination WSOFF"]
    assert off["verdict"] == "warn", off
    assert "association refused or no answer" in off["detail"], off
    assert "serving.move_destinations" in off["fix"], off
    assert checks["DICOM port"]["verdict"] == "warn"  # free: the daemon is not running
    assert "systemctl start pas" in checks["DICOM port"]["fix"]
    assert checks["database"]["verdict"] == "warn"
    assert not (tmp_path / "home" / "pas.sqlite").exists()  # doctor created nothing


def test_doctor_names_bad_configuration(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text("[dicom]\nport = 0\nae_title = 'WAY-TOO-LONG-AE-TITLE'\n")
    env = {**os.environ, "PAS_HOME": str(tmp_path / "home")}
    code, checks = _doctor(env, "--config", str(config))
    assert code == 1
    details = json.dumps(checks)
    assert "dicom.port: must be 1-65535, got 0" in details
    assert not (tmp_path / "home").exists()  # doctor changes nothing

    # A file not there: the fix names the file, not "this key" (there is none).
    code, checks = _doctor(env, "--config", str(tmp_path / "missing.toml"))
    assert code == 1 and checks["configuration"]["detail"].endswith("missing.toml: file not found")
    assert checks["configuration"]["fix"].startswith("give the configuration file pas run reads")

    # A bad value a PAS_* variable replaces now: "configuration ok" before, while pas config
    # check refuses the file and pas run will once the variable goes.
    config.write_text("[dicom]\nport = 0\n")
    _, checks = _doctor({**env, "PAS_DICOM__PORT": str(free_port())}, "--config", str(config))
    assert checks["configuration"]["verdict"] == "warn", checks["configuration"]
    assert checks["configuration"]["detail"] == (
        f"in {config} (a PAS_* variable replaces it now; without it pas run refuses the file): "
        "dicom.port: must be 1-65535, got 0")
    assert not (tmp_path / "home").exists()


def test_doctor_finds_a_port_taken_by_another_program(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        env = {**os.environ, "PAS_HOME": str(tmp_path / "home"),
               "PAS_DICOM__HOST": "127.0.0.1", "PAS_DICOM__PORT": str(port),
               "PAS_HTTP__PORT": str(free_port())}
        code, checks = _doctor(env)
    assert code == 1
    assert checks["DICOM port"]["verdict"] == "fail"
    assert "another program listens" in checks["DICOM port"]["detail"]
    assert checks["enrolment"]["verdict"] == "warn"
    assert "pas enroll" in checks["enrolment"]["fix"]


def test_a_second_daemon_on_the_same_home_is_refused_before_touching_it(
        tmp_path: Path) -> None:
    """Review (2026-12-03): a second ``pas run`` on a live daemon's home ran start-up
    recovery (releasing the live daemon's job leases as a dead worker's) before failing on
    the busy port, or started fully on another port: the same study was sent twice at once.
    Now it stops at the home's lock, saying which process holds it."""
    first = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                          "PAS_HTTP__ENABLED": "false"}).start()
    try:
        assert first.proc is not None
        env = {**os.environ, "PAS_HOME": str(first.home), "PAS_DICOM__PORT": str(free_port()),
               "PAS_HTTP__ENABLED": "false", "PAS_HL7__ENABLED": "false"}
        second = run_pas(["run"], env, timeout=60)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"another pas run (pid {first.proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.proc.poll() is None and first.status()["instances"] == 0
    finally:
        first.stop()


def _address_this_host_lacks() -> str:
    """An address of the benchmarking range 198.18.0.0/15 that no interface here has:
    binding it fails (EADDRNOTAVAIL) and nothing is sent anywhere."""
    held = subprocess.run(["ip", "-o", "address"], capture_output=True, text=True,
                          check=True).stdout
    return next(a for a in (f"198.19.255.{n}" for n in range(253, 0, -4))
                if f" {a}/" not in held)


def _free_privileged_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def test_pas_run_names_why_a_port_cannot_be_bound(tmp_path: Path) -> None:
    """``pas run`` said "(another program listens there?)" whatever the bind said: also for
    an address this host does not have (a dicom.host typo, an address moved to another
    box) and for port 104 without CAP_NET_BIND_SERVICE. Each cause is now named, with the
    key to change, in one line."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    base = {**environ, "PAS_HOME": str(tmp_path / "pas"), "PAS_DICOM__HOST": "127.0.0.1",
            "PAS_DICOM__PORT": str(free_port()), "PAS_HTTP__ENABLED": "false",
            "PAS_HL7__ENABLED": "false"}

    def run(env: dict[str, str], prefix: tuple[str, ...] = ()) -> str:
        existed = (tmp_path / "pas").exists()
        result = subprocess.run([*prefix, str(PAS_BIN), "run"], env={**base, **env},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        # Refused before a new home is made: it left an empty one (a PAS_HOME typo's).
        assert (tmp_path / "pas").exists() == existed
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("cannot start")]
        return line

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = run({"PAS_DICOM__PORT": str(port)})
        # A home there already: the daemon's own bind says the same, after its start-up.
        (tmp_path / "pas").mkdir()
        assert run({"PAS_DICOM__PORT": str(port)}) == said
        shutil.rmtree(tmp_path / "pas")
    assert said == (f"cannot start: dicom.port {port} on 127.0.0.1: Address already in use "
                    f"(another program listens there: ss -ltnp 'sport = :{port}')")

    nowhere = _address_this_host_lacks()
    said = run({"PAS_DICOM__HOST": nowhere})
    assert said.startswith(f"cannot start: dicom.port {base['PAS_DICOM__PORT']} on {nowhere}: "
                           "Cannot assign requested address"), said
    assert f"this host has no address {nowhere}: set dicom.host to one it has" in said
    assert "another program" not in said
    http_port = free_port()
    said = run({"PAS_HTTP__ENABLED": "true", "PAS_HTTP__HOST": nowhere,
                "PAS_HTTP__PORT": str(http_port)})
    assert said.startswith(f"cannot start: http.port {http_port} on {nowhere}: "), said
    assert "set http.host to one it has" in said and "another program" not in said

    # A port below 1024 by a process without CAP_NET_BIND_SERVICE, as the shipped unit runs
    # (CapabilityBoundingSet= empty): root here, so the test drops that capability first.
    privileged = _free_privileged_port()
    drop = (("setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service")
            if os.geteuid() == 0 else ())
    said = run({"PAS_DICOM__PORT": str(privileged)}, drop)
    assert said == (f"cannot start: dicom.port {privileged} on 127.0.0.1: Permission denied "
                    "(a port below 1024 is privileged: the service needs CAP_NET_BIND_SERVICE "
                    "(install image/systemd/pas.service.d/port-104.conf), or set dicom.port "
                    "to 1024 or above)")


def test_cache_pin_refuses_a_duration_that_is_not_positive(pas: PasProcess) -> None:
    """--days -5 and nan printed "pinned" and pinned nothing; --days 0 pinned for ever."""
    storescu([FILES[0]], pas.port)
    (study,) = json.loads(pas.cli("studies", "--json").stdout)
    for days in ("-5", "nan", "0", "inf"):  # inf: "pinned for inf days" in the audit row
        result = pas.cli("cache", "pin", study["study_uid"], "--days", days, check=False)
        assert result.returncode == 2, (days, result.stdout, result.stderr)
        assert "--days must be a positive number of days" in result.stderr
    assert "pinned" in pas.cli("cache", "pin", study["study_uid"], "--days", "2").stdout
    # A patient ID given for the study: said to be no UID, as pas audit --study says.
    wrong = pas.cli("cache", "pin", "FA191122", check=False)
    assert wrong.returncode == 1 and " ".join(wrong.stderr.split()) == (
        "study FA191122 is not in the cache: 'FA191122' is not a UID (digits and dots, at "
        "most 64 characters, as pas studies lists it)"), wrong.stderr
    unknown = pas.cli("cache", "unpin", "1.2.3", check=False)
    assert " ".join(unknown.stderr.split()) == "study 1.2.3 is not in the cache"


def _pas(home: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``pas ARGS`` as an administrator types it, with PAS_HOME set to ``home``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    return run_pas(list(args), {**environ, "PAS_HOME": str(home), **(env or {})},
                   timeout=timeout)


def test_a_config_path_that_is_a_directory_is_one_config_error(tmp_path: Path) -> None:
    """``pas config check /tmp`` (or --config DIR) printed an IsADirectoryError traceback."""
    home = tmp_path / "home"
    for args in (("config", "check", str(tmp_path)), ("status", "--config", str(tmp_path)),
                 ("queue", "list", "--config", str(tmp_path))):
        result = _pas(home, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines == [f"config error {tmp_path}: is a directory, not a TOML file"], args
    assert not home.exists()


def test_rules_test_refuses_a_file_without_a_dataset(tmp_path: Path) -> None:
    """A file that is only the preamble and "DICM", or only a file meta, was "routed" (every
    rule evaluated on empty attributes, exit 0), as if it were an image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite

    bare = tmp_path / "bare.dcm"
    bare.write_bytes(b"\0" * 128 + b"DICM")
    meta_only = tmp_path / "meta-only.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    dataset = Dataset()
    dataset.file_meta = meta
    dcmwrite(meta_only, dataset, enforce_file_format=True)
    for path in (bare, meta_only):
        result = _pas(tmp_path / "home", "rules", "test", str(path))
        assert result.returncode == 2, (path, result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            f"{path}: no dataset after the DICOM file header (nothing to route)"]
    # A real image is still explained.
    real = _pas(tmp_path / "home", "rules", "test", str(FILES[0]))
    assert real.returncode == 0 and "->" in real.stdout


def _plain(text: str) -> str:
    """A usage error as one line of words (typer draws it in a box wrapped at 80 columns)."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def test_queue_and_prefetch_refuse_unknown_states_and_ids_beyond_sqlite(
        tmp_path: Path) -> None:
    """``pas queue retry 99999999999999999999999`` was an OverflowError traceback (SQLite
    integers are 64-bit); ``pas queue list --state bogus`` listed 0 jobs, exit 0."""
    home = tmp_path / "home"
    huge = "99999999999999999999999"
    for args in (("queue", "retry", huge), ("prefetch", "show", huge)):
        result = _pas(home, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and "OverflowError" not in result.stderr
        assert "less than or equal to 9223372036854775807" in _plain(result.stderr)
    bogus = _pas(home, "queue", "list", "--state", "bogus")
    assert bogus.returncode == 2, (bogus.stdout, bogus.stderr)
    assert "'bogus' is not one of 'pending', 'running', 'done', 'failed'" in _plain(
        bogus.stderr)
    bogus = _pas(home, "prefetch", "list", "--state", "done")
    assert bogus.returncode == 2, (bogus.stdout, bogus.stderr)
    assert "'pending', 'running', 'fetched', 'failed', 'cancelled'" in _plain(bogus.stderr)
    usage = _pas(home, "queue", "list", "--help", env={"COLUMNS": "200"}).stdout
    assert "pending|running|done|failed" in usage
    assert not home.exists()  # refused by the parser, before anything was opened


def _commands(having: Callable[[Any], bool]) -> list[list[str]]:
    """Every ``pas`` command with an option ``having`` says yes to, as typed after ``pas``."""
    import typer.main

    from appliance.cli.main import app

    def walk(command: Any, path: list[str]) -> Iterator[list[str]]:
        if any(having(p) for p in command.params):
            yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def _helps(home: Path, commands: list[list[str]]) -> dict[str, str]:
    """``pas COMMAND --help`` of each, wide enough not to wrap, by command."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda args: _pas(home, *args, "--help",
                                                  env={"COLUMNS": "300"}), commands))
    for args, result in zip(commands, results, strict=True):
        assert result.returncode == 0, (args, result.stderr)
    return {" ".join(args): result.stdout for args, result in zip(commands, results,
                                                                   strict=True)}


def _flag_commands() -> list[list[str]]:  # [] and cache: --help, every command has that one
    return [[], ["cache"], *_commands(lambda option: getattr(option, "is_flag", False))]


def _config_commands() -> list[list[str]]:  # the hub has its own --config
    return [args for args in _commands(lambda option: "--config" in getattr(option, "opts", ()))
            if args[0] != "hub"]


def _json_commands() -> list[list[str]]:
    return _commands(lambda option: "--json" in getattr(option, "opts", ()))


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The --help of each command the two help tests read, run once for both (they ran 49,
    24 twice: a fifth of this file's time), in a home that must not come into being."""
    home = tmp_path_factory.mktemp("helps") / "home"
    wanted = [*_flag_commands(), [], ["prefetch"], ["hub"], ["queue", "retry"],
              *_config_commands(),
              *_json_commands()]
    once = [list(args) for args in dict.fromkeys(tuple(args) for args in wanted)]
    return home, _helps(home, once)


def test_help_shows_flags_as_flags_and_counts_agree_with_their_noun(
        pas: PasProcess, helps: tuple[Path, dict[str, str]]) -> None:
    """``pas status --help`` showed ``--json <bool>`` (and ``--help <bool>``) as if a flag
    took a value; ``pas studies`` on a cache of one study was titled "1 studies"."""
    commands = _flag_commands()
    assert ["cache", "purge"] in commands and ["status"] in commands and ["verify"] in commands
    home, texts = helps
    flags = {" ".join(args): texts[" ".join(args)] for args in commands}
    for command, text in flags.items():
        assert "<bool>" not in text, (command, text)
        assert re.search(r"│ +--help +Show this message and exit\.", text), command
    assert re.search(r"│ +--json +Machine-readable output", flags["status"])
    assert re.search(r"│ +--force +Also when not confirmed", flags["cache purge"])
    assert not home.exists()

    storescu([FILES[0]], pas.port)
    # CI exports COLUMNS=80: into a pipe the table is whole all the same.
    listing = run_pas([*pas.cli_prefix, "studies"], {**pas.env, "COLUMNS": "80"},
                      timeout=120, check=True).stdout
    assert listing.splitlines()[0].strip() == "1 study", listing  # the table's title
    (study,) = json.loads(pas.cli("studies", "--json").stdout)
    # Into a pipe, whole: Rich's 80 columns there cut the UID to "1.2.840…".
    assert study["study_uid"] in listing and "…" not in listing, listing
    purged = pas.cli("cache", "purge", study["study_uid"], "--force").stdout
    assert f"purged study {study['study_uid']}: 1 instance (1 unconfirmed), " in _plain(purged)
    assert re.search(r"unconfirmed\), \d+\.\d [kMG]B$", _plain(purged).strip())  # not bytes
    assert pas.cli("studies").stdout.splitlines()[0].strip() == "0 studies"
    # --json: what the delete audit row records, named; the bytes exact.
    storescu([FILES[0]], pas.port)
    (study,) = json.loads(pas.cli("studies", "--json").stdout)
    assert json.loads(pas.cli("cache", "purge", study["study_uid"], "--force", "--json").stdout
                      ) == {"study_uid": study["study_uid"], "patient_id": study["patient_id"],
                            "instances": 1, "unconfirmed": 1, "bytes": study["bytes"],
                            "pinned_until": None, "failed_jobs_dropped": []}


def test_help_words_each_option_once_and_lists_each_command_on_one_line(
        helps: tuple[Path, dict[str, str]]) -> None:
    """As an administrator reads ``--help``: pas doctor's and pas send's --config said only
    "TOML file" (which one, by default?), pas prefetch's "as for pas run"; five --json of
    seven had no help; the command lists broke pas doctor's and pas prefetch list's summary
    in the middle of a sentence; pas queue retry said it retried failed jobs only."""
    appliance = _config_commands()
    assert ["doctor"] in appliance and ["send"] in appliance and ["prefetch", "list"] in appliance
    jsons = _json_commands()
    home, texts = helps
    config_help = ("TOML file; default: $PAS_CONFIG, else $PAS_HOME/appliance.toml if it "
                   "exists, else (PAS_HOME unset) /etc/pas/appliance.toml if it exists, else "
                   "built-in defaults")
    for args in appliance:
        assert re.search(r"│ +--config +-c +<path> +" + re.escape(config_help),
                         texts[" ".join(args)]), args
    for args in jsons:
        assert re.search(r"│ +--json +Machine-readable output", texts[" ".join(args)]), args
    import typer.main

    from appliance.cli.main import app

    root = typer.main.get_command(app)
    for group, command in (("", root), ("prefetch", root.commands["prefetch"]),  # type: ignore[attr-defined]
                           ("hub", root.commands["hub"])):  # type: ignore[attr-defined]
        # The top level's commands are in panels (test_help_groups_every_command...).
        panel = texts[group].split("╰", 1)[1] if group == "" else \
            texts[group].split("Commands")[1]
        rows = [line for line in panel.splitlines() if line.startswith("│")]
        assert len(rows) == len(command.commands), (group, rows)  # one line each
    assert "Make a failed or pending job due now" in texts["queue retry"]
    assert not home.exists()


def test_verify_audits_the_operator_who_ran_it_and_doctor_names_what_it_found(
        pas: PasProcess) -> None:
    """``pas verify`` wrote its audit row as actor ``operator`` (no login: who ran it was
    lost), and ``pas verify --repair``'s recovery row said ``system``, as if the daemon had
    done it; its log line printed a Python dict. Both name the operator now, as pas backup
    and pas cache do. ``pas doctor`` said all was well (exit 0) with files flagged missing
    or damaged; it fails now, naming them."""

    storescu(FILES[:2], pas.port)
    (path,) = [r["path"] for r in read_rows(pas.home / "pas.sqlite",
                                             "SELECT path FROM instances LIMIT 1")]
    clean = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json", check=False).stdout)}
    assert clean["stored files"]["verdict"] == "ok" and clean["jobs"]["verdict"] == "ok"
    (pas.home / "spool" / path).unlink()
    (other,) = [r["path"] for r in read_rows(pas.home / "pas.sqlite",
                                              "SELECT path FROM instances WHERE path != ?",
                                              (path,))]
    damaged = bytearray((pas.home / "spool" / other).read_bytes())
    damaged[-1] ^= 0xFF
    (pas.home / "spool" / other).write_bytes(bytes(damaged))
    found = pas.cli("verify", check=False)
    assert found.returncode == 1 and "missing=1" in found.stdout, found.stdout
    # Each problem said once, in the report (its log line on stderr said it again).
    assert "integrity: " not in found.stderr, found.stderr
    assert sum(path in line for line in found.stdout.splitlines()) == 1, found.stdout
    # Each problem says which instance it is and what gets it back (a spool path alone
    # told IT nothing).
    problems = json.loads(pas.cli("verify", "--json", check=False).stdout)["problems"]
    (lost,) = [p for p in problems if p.startswith("missing ")]
    (uid, study) = [(r["sop_instance_uid"], r["study_uid"]) for r in read_rows(
        pas.home / "pas.sqlite", "SELECT i.sop_instance_uid, s.study_uid FROM instances i "
        "JOIN studies s ON s.id = i.study_fk WHERE i.path = ?", (path,))][0]
    assert lost.endswith(f": instance {uid} of study {study}, not confirmed by the region "
                         "(this was its only copy): send the study again from its modality"), lost
    doctor = pas.cli("doctor", "--json", check=False)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert doctor.returncode == 1 and checks["stored files"]["verdict"] == "fail", checks
    assert checks["stored files"]["detail"] == ("flagged: hash mismatch 1, missing 1 "
                                                 "(pas cache status lists them)")
    assert "pas verify --repair" in checks["stored files"]["fix"]
    repaired = pas.cli("verify", "--repair", check=False)
    assert "start-up recovery: missing=1" in repaired.stderr, repaired.stderr
    assert "{'" not in repaired.stderr
    me = f"operator:{login_name()}"
    rows = json.loads(pas.cli("audit", "--json", "--limit", "20").stdout)
    verifies = [r["actor"] for r in rows if r["event"] == "verify"]
    recoveries = [r for r in rows if r["event"] == "recovery" and "missing=1" in r["detail"]]
    assert verifies == [me, me, me], rows
    assert [r["actor"] for r in recoveries] == [me], rows


def test_pin_unpin_and_purge_say_what_pin_there_was(pas: PasProcess) -> None:
    """A timed pin over a permanent one shortened it with only "pinned"; "unpinned" was said
    of a study never pinned; a forced purge of a pinned study said nothing of the pin, nor
    did its audit row."""
    storescu([FILES[0]], pas.port)
    (study,) = json.loads(pas.cli("studies", "--json").stdout)
    uid = study["study_uid"]

    def said(*args: str) -> str:
        return " ".join(pas.cli("cache", *args).stdout.split())

    assert said("unpin", uid) == f"study {uid} was not pinned: nothing changed"
    assert json.loads(pas.cli("studies", "--json").stdout)[0]["pinned_until"] is None
    assert said("pin", uid) == f"study {uid} pinned until unpinned"
    # pas studies shows the pin (no command did).
    assert json.loads(pas.cli("studies", "--json").stdout)[0]["pinned_until"] >= 1e18
    assert "│ until unpinned │" in pas.cli("studies").stdout
    shortened = said("pin", uid, "--days", "2")
    assert re.fullmatch(rf"study {re.escape(uid)} pinned until \d{{4}}-\d\d-\d\d \d\d:\d\d UTC "
                        r"\(shortened: was pinned until unpinned\)", shortened), shortened
    assert said("pin", uid).endswith("pinned until unpinned (was pinned until " +
                                     shortened.split(" until ")[1].split(" (")[0] + ")")
    # evict runs a pass: given a study, it says to purge it (typer's "unexpected extra
    # argument" said not what to do), and changes nothing.
    refused = pas.cli("cache", "evict", uid, check=False)
    assert refused.returncode == 2 and f"pas cache purge {uid}" in refused.stderr, refused

    def answer(*args: str) -> dict[str, Any]:  # --json: the same pin change, named
        return json.loads(pas.cli("cache", *args, uid, "--json").stdout)

    timed = answer("pin", "--days", "1")
    assert timed["study_uid"] == uid and timed["was_pinned_until"] >= 1e18, timed
    assert not timed["until_unpinned"] and timed["changed"], timed
    assert 0 < timed["pinned_until"] - time.time() <= 86_400, timed
    assert json.loads(pas.cli("studies", "--json").stdout)[0]["pinned_until"] == \
        timed["pinned_until"]
    for_ever = answer("pin")
    assert (for_ever["until_unpinned"], for_ever["was_pinned_until"], for_ever["changed"]) == \
        (True, timed["pinned_until"], True), for_ever
    assert answer("pin")["changed"] is False  # pinned until unpinned already
    assert answer("unpin") == {"study_uid": uid, "pinned_until": None, "until_unpinned": False,
                               "was_pinned_until": for_ever["pinned_until"], "changed": True}
    assert answer("unpin") == {"study_uid": uid, "pinned_until": None, "until_unpinned": False,
                               "was_pinned_until": None, "changed": False}
    assert json.loads(pas.cli("studies", "--json").stdout)[0]["pinned_until"] is None
    said("pin", uid)
    purged = said("purge", "--force", uid)
    assert purged.endswith("; it was pinned until unpinned"), purged
    (row,) = json.loads(pas.cli("audit", "--event", "delete", "--json").stdout)
    assert "while pinned until unpinned" in row["detail"], row


def test_help_groups_every_command_by_what_an_operator_comes_for(
        helps: tuple[Path, dict[str, str]]) -> None:
    """``pas --help`` listed its commands in the order the modules registered them, the
    regional hub's among the appliance's. Every one is now in a panel, in this order."""
    from appliance.cli.main import HELP_PANELS

    text = helps[1][""]
    places = [text.index(f"─ {title} ─") for title in HELP_PANELS]
    assert places == sorted(places), places
    assert "─ Commands ─" not in text  # none left out of a panel
    run, hub = text.index("│ run "), text.index("│ hub ")
    assert places[0] < run < places[1] and hub > places[-1]


def test_status_shows_a_link_s_last_error_whole(tmp_path: Path) -> None:
    """A link's last error was cut at 100 characters in ``pas status``'s Links table: a
    hub's refusal ended "...the certificate of si" and never said what to do."""
    from appliance.store import uplink as uplink_store
    from appliance.store.db import Database

    home = tmp_path / "home"
    db = Database(home / "pas.sqlite")
    error = ("hub: 403 {\"error\":\"certificate_revoked\",\"detail\":\"the certificate of site "
             "'CHU-B' (serial 5f1e) is revoked\"}: ask regional ops for a token, then pas "
             "enroll --replace and restart PAS")
    assert len(error) > 100
    uplink_store.record_contact(db, "hub", False, error)
    db.close()
    shown = _pas(home, "status", env={"COLUMNS": "120"})
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout[shown.stdout.index("Links"):]
    assert "pas enroll --replace and restart PAS" in " ".join(
        table.replace("│", " ").split()), table


def test_send_names_a_file_the_peer_takes_no_context_for_and_sends_the_others(
        pas: PasProcess, tmp_path: Path) -> None:
    """A private SOP class PAS does not take (its presentation context refused): ``pas send``
    stopped with a traceback there ("No presentation context for ..."), the files after it
    not sent, no summary. It is now one failure naming the file and its class."""
    from pydicom import dcmread

    private = tmp_path / "private.dcm"
    dataset = dcmread(FILES[0])
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = "1.3.46.670589.11.0.0.12.99"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.99.7"
    dataset.save_as(private, enforce_file_format=True)
    before = pas.status()["instances"]
    result = pas.cli("send", str(FILES[1]), str(private), str(FILES[2]),
                     "--calling-ae", "ITTEST", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "sent 2 of 3 files" in result.stdout, result.stdout
    said = " ".join(result.stderr.split())
    assert (f"failed: {private}: not sent: the peer accepted no presentation context for its "
            "SOP class 1.3.46.670589.11.0.0.12.99") in said, said
    assert pas.status()["instances"] == before + 2
