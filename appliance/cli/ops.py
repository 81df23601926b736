"""``pas send`` (a built-in DICOM sender for hospital IT's tests), ``pas doctor``, ``pas
backup`` and ``pas restore``.

Owns: the commands' arguments and output. Thin: the checks live in
:mod:`appliance.ops.doctor`, the backup's content in :mod:`appliance.ops.backup`, its checks
before a restore in :mod:`appliance.ops.restore`; sending is
plain pynetdicom C-STORE, the same a modality does.
May not touch: the store (``send`` talks to the daemon over DICOM like any modality).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from appliance.cli.common import (
    ConfigOption,
    JsonOption,
    KeepOption,
    console,
    err,
    exit_on_prune_problems,
    literal,
    operator_actor,
    refuse_bad_keep,
    report_pruned,
    shown,
)
from appliance.words import counted

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


def _why_not_associated(assoc: Any, heard: dict[str, Any], calling_ae: str,
                        called_ae: str) -> str:
    """What the SCP answered, in words that say what to change. One sentence for every case
    ("refused, or nothing listening: check the port, the AE title and dicom.known_aes") left
    the user guessing which: PAS's A-ASSOCIATE-RJ names the calling AE it does not know,
    and ``pas send`` calls as PASSEND unless told (docs/install.md)."""
    if not heard.get("open"):
        return ("no connection (nothing listens there, or a firewall drops it): check --host "
                "and --port")
    answer = heard.get("answer")
    if assoc.is_rejected and answer is not None:
        reason = answer.reason_str
        if answer.result_source == 1 and answer.diagnostic == 3:
            return (f"rejected: calling AE title '{calling_ae}' not recognised; PAS accepts "
                    f"the AE titles in dicom.known_aes: add it there (and restart PAS), or "
                    f"send as one of them with --calling-ae")
        if answer.result_source == 1 and answer.diagnostic == 7:
            return (f"rejected: called AE title '{called_ae}' not recognised; give the "
                    f"SCP's own AE title (PAS: dicom.ae_title) with --called-ae")
        return f"rejected ({answer.result_str}: {reason})"
    return ("connected, but the association was aborted or not answered (none of the "
            "files' SOP classes accepted, or a port that speaks DICOM TLS: pas send does not)")


def _dicom_files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Files under ``paths`` (recursively), and the ones that are not DICOM."""
    from pydicom.misc import is_dicom

    candidates: list[Path] = []
    for path in paths:
        if path.is_dir():
            candidates.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            candidates.append(path)
    good, bad = [], []
    for path in candidates:
        (good if is_dicom(path) else bad).append(path)
    return good, bad


def send(paths: list[Path] = typer.Argument(..., help="DICOM files or folders (recursive)"),
         host: str = typer.Option("127.0.0.1", "--host", help="Where the SCP listens"),
         port: int | None = typer.Option(None, "--port",
                                         help="Default: dicom.port of the configuration"),
         called_ae: str | None = typer.Option(None, "--called-ae",
                                              help="Default: dicom.ae_title"),
         calling_ae: str = typer.Option("PASSEND", "--calling-ae",
                                        help="Our AE title (PAS accepts it if it is in "
                                             "dicom.known_aes, or with dicom.accept_unknown)"),
         config: Path | None = ConfigOption) -> None:
    """Send DICOM files to PAS (or any SCP) with C-STORE, with a progress bar.

    Each file's dataset goes as its bytes are stored (what the modality sent), not decoded
    and encoded again: re-encoded, a file with defined-length sequences arrived with other
    bytes, and PAS rightly counted a conflict (a new version) for a file it already held."""
    from pydicom import dcmread
    from pynetdicom import AE, evt

    from appliance import dicomnet
    from appliance.cli.main import _settings

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        err.print(f"[red]no such file or folder:[/red] {literal(', '.join(missing))}",
                  highlight=False)
        raise typer.Exit(2)
    _refuse_bad_send_options(host, port, called_ae, calling_ae)
    calling_ae = calling_ae.strip()
    event_driven = True
    if port is None or called_ae is None:
        settings = _settings(config)
        port = settings.dicom.port if port is None else port
        called_ae = settings.dicom.ae_title if called_ae is None else called_ae
        event_driven = settings.dicom.event_driven
    called_ae = called_ae.strip()
    dicomnet.install(event_driven)
    files, not_dicom = _dicom_files(paths)
    for path in not_dicom:
        err.print(f"[yellow]skipped, not a DICOM file:[/yellow] {literal(path)}",
                  highlight=False)
    if not files:
        err.print("[red]nothing to send: no DICOM file found[/red]")
        raise typer.Exit(2)
    headers = {}
    contexts: set[tuple[str, str]] = set()
    for path in list(files):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            pair = (str(ds.file_meta.MediaStorageSOPClassUID),
                    str(ds.file_meta.TransferSyntaxUID))
        except Exception as exc:  # noqa: BLE001 - a damaged file is named, the rest goes
            err.print(f"[yellow]skipped, unreadable DICOM header:[/yellow] {literal(path)} "
                      f"({literal(exc)})",
                      highlight=False)
            files.remove(path)
            continue
        headers[path] = (*pair, str(ds.file_meta.get("MediaStorageSOPInstanceUID")
                                    or ds.get("SOPInstanceUID", "")))
        contexts.add(pair)
    if not files:
        err.print("[red]nothing to send: no readable DICOM file[/red]")
        raise typer.Exit(2)
    if len(contexts) > MAX_CONTEXTS:
        err.print(f"[red]{len(contexts)} SOP class/transfer syntax pairs: more than "
                  f"{MAX_CONTEXTS} per association; send the folders separately[/red]")
        raise typer.Exit(2)
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    heard: dict[str, Any] = {}
    handlers = [(evt.EVT_CONN_OPEN, lambda event: heard.setdefault("open", True)),
                (evt.EVT_ACSE_RECV, lambda event: heard.setdefault("answer", event.primitive))]
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=handlers)
    if not assoc.is_established:
        err.print(f"[red]cannot associate with {literal(called_ae)}@{literal(host)}:{port}"
                  f"[/red]: {literal(_why_not_associated(assoc, heard, calling_ae, called_ae))}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    failures: list[str] = []
    sent_bytes = 0
    columns = (TextColumn("[bold]sending"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[mb]:.1f} MB"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("send", total=len(files), mb=0.0)
            for message_id, path in enumerate(files, start=1):
                try:
                    code = _store_file(assoc, path, headers[path],
                                       (message_id - 1) % 0xFFFF + 1)
                except _NotAccepted as exc:  # the others still go
                    failures.append(f"{path}: {exc}")
                    progress.update(task, advance=1)
                    continue
                if code == 0:
                    sent_bytes += path.stat().st_size
                else:
                    failures.append(f"{path}: status "
                                    f"{'no answer' if code is None else hex(code)}")
                progress.update(task, advance=1, mb=sent_bytes / 1e6)
                if not assoc.is_established:
                    failures.extend(f"{p}: association lost" for p in
                                    files[files.index(path) + 1:])
                    break
    finally:
        if assoc.is_established:
            assoc.release()
    sent = len(files) - len(failures)
    console.print(f"sent {sent} of {counted(len(files), 'file')} ({sent_bytes / 1e6:.1f} MB) to "
                  f"{literal(called_ae)}@{literal(host)}:{port}", highlight=False)
    for failure in failures:
        err.print(f"[red]failed:[/red] {literal(failure)}", highlight=False)
    if failures:
        raise typer.Exit(1)


def _refuse_bad_send_options(host: str, port: int | None, called_ae: str | None,
                             calling_ae: str) -> None:
    """Each bad option of ``pas send`` in one line naming it, exit 2, before anything is
    read or sent (they were tracebacks from pynetdicom or the resolver, or, for
    ``--port 0`` and ``--called-ae ""``, silently the configuration's values)."""
    import socket

    from appliance.config_types import _ae_title, _port

    problems = []
    for option, value in (("--calling-ae", calling_ae), ("--called-ae", called_ae)):
        if value is not None:
            try:
                _ae_title(value)
            except ValueError as exc:
                problems.append(f"{option}: {exc}")
    if port is not None:
        try:
            _port(port)
        except ValueError as exc:
            problems.append(f"--port: {exc}")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        problems.append(f"--host: cannot resolve {host!r} "
                        f"({getattr(exc, 'strerror', None) or exc})")
    for problem in problems:
        err.print(f"[red]{literal(problem)}[/red]", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(2)


class _NotAccepted(Exception):
    """The peer accepted no presentation context that can carry a file: said for that file,
    the others sent (it was a traceback, the rest of the files not sent)."""


def _store_file(assoc: Any, path: Path, header: tuple[str, str, str],
                message_id: int) -> int | None:
    """C-STORE ``path`` on ``assoc``: its dataset's stored bytes straight to the socket
    (``DirectStoreSender``, as PAS sends its own files to a viewer or a node); through
    pynetdicom, decoded, only when the reactors are not installed or no accepted context
    carries the file's own transfer syntax. The response's status, None without one."""
    from pydicom import dcmread
    from pydicom.uid import UID

    from appliance.dicomnet.direct_store import DirectStoreError, DirectStoreSender

    sop_class, _syntax, sop_instance = header
    if DirectStoreSender.available(assoc) and sop_instance:
        try:
            result = DirectStoreSender(assoc).send_file(path, sop_class, sop_instance,
                                                        message_id)
        except DirectStoreError:
            return None  # the association is aborted: the caller counts the rest lost
        if result is not None:
            return result[0]
    dataset = dcmread(path)
    try:
        status = assoc.send_c_store(dataset, msg_id=message_id)
    except ValueError as exc:  # pynetdicom: "No presentation context for ..."
        name = UID(sop_class).name if sop_class else "?"
        what = sop_class if name == sop_class else f"{name} ({sop_class})"
        raise _NotAccepted(f"not sent: the peer accepted no presentation context for its SOP "
                           f"class {what} in its transfer syntax or an uncompressed one "
                           f"({exc})") from None
    return getattr(status, "Status", None) if status else None


def doctor(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Check the appliance and say what to fix; exit 1 when something must be fixed.

    Configuration, database, ports, disk, enrolment, certificate, hub, clock, time zone and
    destinations."""
    from appliance import dicomnet
    from appliance.config import load_settings
    from appliance.ops.doctor import run_checks

    with contextlib.suppress(Exception):  # a broken configuration is the doctor's to report
        dicomnet.install(load_settings(config).dicom.event_driven)
    checks = run_checks(config)
    if as_json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        table = Table(title="pas doctor")
        for column in ("check", "", "finding", "what to do"):
            table.add_column(column)
        marks = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]",
                 "fail": "[red]FAIL[/red]"}
        for check in checks:
            table.add_row(shown(check.name), marks[check.verdict], shown(check.detail),
                          shown(check.fix))
        console.print(table)
    if any(c.verdict == "fail" for c in checks):
        raise typer.Exit(1)


def backup(destination: Path = typer.Argument(..., help="Folder to write the backup in "
                                               "(another disk, a mounted share)"),
           config: Path | None = ConfigOption, keep: int | None = KeepOption,
           as_json: bool = JsonOption) -> None:
    """Back up the index, the enrolment and the configuration.

    While PAS runs; not the images (the region holds the confirmed ones)."""
    from appliance import logs
    from appliance.cli.main import _settings
    from appliance.config import default_config_path
    from appliance.ops.backup import make_backup
    from appliance.ops.backup_folder import BackupRefused

    refuse_bad_keep(keep)
    settings = _settings(config)
    logs.setup(settings.log_level)  # what --keep removed: journald under the timer
    if not settings.db_path.exists():
        err.print(f"[red]refused:[/red] no index database at {literal(settings.db_path)}: "
                  "nothing to back up (check PAS_HOME)", highlight=False)
        raise typer.Exit(1)
    try:
        made = make_backup(settings, config or default_config_path(), destination,
                           operator_actor(), keep=keep)
    except BackupRefused as exc:
        err.print(f"[red]refused:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        pruned = {} if made.pruned is None else {"pruned": made.pruned.as_dict()}
        print(json.dumps({"folder": str(made.folder), **made.manifest, **pruned}, indent=2))
        exit_on_prune_problems(made.pruned)
        return
    at_risk = made.manifest["instances_not_confirmed_by_the_region"]
    sealed = made.manifest.get("sealed")
    console.print(f"backup written to {literal(made.folder)}"
                  + (f", sealed for the backup key {sealed['key']}" if sealed else
                     " in clear (backup.recipient is not set: docs/operations.md)")
                  + ": the index "
                  f"({counted(made.manifest['instances'], 'instance')}, "
                  f"{counted(made.manifest['studies'], 'study', 'studies')}), "
                  f"{'the enrolment, ' if (made.folder / 'pki').is_dir() else ''}"
                  f"{'the configuration, ' if made.manifest['config_file'] else ''}"
                  f"{MANIFEST_NOTE}", highlight=False)
    if at_risk:
        console.print(f"not in it: the images. {counted(at_risk, 'instance')} not yet "
                      "confirmed by the region have their only copy in the spool.",
                      highlight=False)
    report_pruned(made.pruned)


MANIFEST_NOTE = "MANIFEST.json (each file's SHA-256)."


KeyOption = typer.Option(None, "--key", help="The backup key's private half (the file pas "
                         "backup-key wrote): needed for a sealed backup")
PassphraseOption = typer.Option(None, "--passphrase-file", help="A file whose first line is "
                                "the backup key's passphrase (when it has one)")


def _passphrase(path: Path | None) -> bytes | None:
    """The first line of ``path`` (a file, so the passphrase is in no command line)."""
    if path is None:
        return None
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        err.print(f"[red]refused:[/red] cannot read {literal(path)}: "
                  f"{literal(exc.strerror or exc)}", highlight=False)
        raise typer.Exit(1) from None
    if not lines or not lines[0]:
        err.print(f"[red]refused:[/red] {literal(path)}: its first line is empty (the "
                  "passphrase)", highlight=False)
        raise typer.Exit(1)
    return lines[0]


def backup_key(path: Path = typer.Argument(..., help="Where to write the new key's private "
                                           "half (IT's vault; not the appliance)"),
               passphrase_file: Path | None = PassphraseOption) -> None:
    """Make a backup key: its private half to PATH, backup.recipient's line printed.

    Backups are then sealed for it: only this file (and its passphrase) opens them."""
    from appliance.ops.backup_seal import BackupKeyError, fingerprint, new_key, parse_recipient

    try:
        recipient = new_key(path, _passphrase(passphrase_file))
    except BackupKeyError as exc:
        err.print(f"[red]refused:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"backup key {fingerprint(parse_recipient(recipient))} written to "
                  f"{literal(path)} (0600). Keep it off the appliance: without it no sealed "
                  "backup can be restored. In the appliance's configuration:", highlight=False)
    print(f'[backup]\nrecipient = "{recipient}"')


def restore(folder: Path = typer.Argument(..., help="A pas-backup-<site>-<UTC time> folder "
                                           "written by pas backup"),
            config: Path | None = ConfigOption, key: Path | None = KeyOption,
            passphrase_file: Path | None = PassphraseOption) -> None:
    """Put a backup's index and enrolment back in the home (PAS stopped).

    Checked first: this site's, whole (each file's SHA-256), sound, of a version this PAS
    runs; refused in one line otherwise, nothing changed. What the home held is set aside."""
    from appliance.cli.main import _settings
    from appliance.ops.backup_seal import BackupKeyError, load_key
    from appliance.ops.home_lock import HomeInUse
    from appliance.ops.restore import RestoreRefused, restore_backup

    settings = _settings(config)
    try:
        private = None if key is None else load_key(key, _passphrase(passphrase_file))
        done = restore_backup(settings, folder, operator_actor(), key=private)
    except (RestoreRefused, HomeInUse, BackupKeyError) as exc:
        err.print(f"[red]refused:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    # "and the enrolment" only when the backup held one (an appliance not yet enrolled).
    enrolment = (" and the enrolment" if (folder / "pki").is_dir() else
                 "; it held no enrolment (not enrolled when it was written)")
    console.print(f"restored {literal(folder)} in {literal(settings.home)}: the index "
                  f"({counted(done.manifest.get('instances', 0), 'instance')}){enrolment}",
                  highlight=False)
    for what, aside in (("index", done.index_set_aside), ("enrolment", done.pki_set_aside)):
        if aside is not None:
            console.print(f"the home's {what} before it set aside as {literal(aside)}",
                          highlight=False)
    if done.config_in_backup is not None:
        console.print(f"the backup's configuration is {literal(done.config_in_backup)}"
                      + (" (opened from the sealed backup, 0600)" if done.manifest.get("sealed")
                         else "") + ": put it "
                      f"back where this PAS reads it ({literal(where_config_is_read(config))}) "
                      "if it is "
                      "lost", highlight=False)
    console.print("next: systemctl start pas (start-up recovery reconciles the spool; a "
                  "confirmed study whose files are gone comes from the region when asked, "
                  "pas verify --repair fetches them all)", highlight=False)


def where_config_is_read(config: Path | None) -> str:
    """Where this PAS reads its configuration file, as ``pas run`` finds it with the same
    ``--config`` and environment (:func:`appliance.config.default_config_path`), and, none
    found, where it would: ``$PAS_HOME/appliance.toml``, else the appliance's
    ``/etc/pas/appliance.toml``. ``pas restore`` named the path the backup's file had on
    the appliance that wrote it (its manifest's), which may be no place this PAS reads."""
    import os

    from appliance.config import SYSTEM_CONFIG, default_config_path

    if config is not None:
        return f"{config.absolute()}, its --config"
    if os.environ.get("PAS_CONFIG"):
        return f"{Path(os.environ['PAS_CONFIG']).absolute()}, its PAS_CONFIG"
    found = default_config_path()
    if found is not None:
        return str(found.absolute())
    none = ": none there now, it runs on its defaults and PAS_* variables"
    if os.environ.get("PAS_HOME"):
        return f"{(Path(os.environ['PAS_HOME']) / 'appliance.toml').absolute()}{none}"
    return f"{SYSTEM_CONFIG}{none}"


def register(app: typer.Typer) -> None:
    app.command("send")(send)
    app.command("doctor")(doctor)
    app.command("backup")(backup)
    app.command("backup-key")(backup_key)
    app.command("restore")(restore)
