"""``pas hub backup`` and ``pas hub restore``: parsing and printing only; the work is in
``appliance.hub.backup`` and ``appliance.hub.restore``. May not touch: SQL, key material
beyond calling those. Registered on :data:`appliance.cli.hub.hub_app` when that module is
imported (split from it to keep each under ~600 lines).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from appliance.cli.common import (
    JsonOption,
    KeepOption,
    console,
    err,
    exit_on_prune_problems,
    literal,
    refuse_bad_keep,
    report_pruned,
)
from appliance.cli.hub import NO_HUB_FILE, HubConfigOption, _hub_settings, hub_app
from appliance.cli.ops import KeyOption, PassphraseOption, _passphrase
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.restore import HubRestored


@hub_app.command("backup")
def hub_backup(destination: Path = typer.Argument(
        ..., help="Folder to write the backup in (another disk, a mounted share)"),
        config: Path | None = HubConfigOption, keep: int | None = KeepOption,
        as_json: bool = JsonOption) -> None:
    """Back up the hub while it runs: database, CA and keys, configuration.

    Each file sealed for backup.recipient when set (in clear otherwise, and said).

    Not the staging of transfers not committed (their sites send them again), nor the
    embedded archive's images (the storage's backup)."""
    from appliance import logs
    from appliance.cli.common import operator_actor
    from appliance.hub.backup import BackupNotRecorded, make_hub_backup, sealed_words
    from appliance.hub.config import hub_config_path
    from appliance.ops.backup_folder import BackupRefused

    refuse_bad_keep(keep)
    settings = _hub_settings(config)
    logs.setup(settings.log_level)  # the export's WARNING line: journald under systemd
    try:  # the file the settings were read from (the unit's /etc/pas/hub.toml too)
        made = make_hub_backup(settings, hub_config_path(config), destination,
                               operator_actor(), keep=keep)
    except BackupRefused as exc:
        err.print(f"[red]refused:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    except BackupNotRecorded as exc:  # the folder is whole; the unit fails all the same
        err.print(f"[red]not recorded:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    manifest = made.manifest
    if as_json:
        pruned = {} if made.pruned is None else {"pruned": made.pruned.as_dict()}
        print(json.dumps({"folder": str(made.folder), **manifest, **pruned}, indent=2))
    else:
        console.print(f"hub backup written to {literal(made.folder)}, "
                      f"{sealed_words(manifest)}: the database "
                      f"({counted(manifest['sites_enrolled'], 'site')} enrolled, "
                      f"{counted(manifest['transfers_committed'], 'transfer')} committed), "
                      "the fleet CA and keys, "
                      f"{'the configuration, ' if manifest['config_file'] else ''}"
                      "MANIFEST.json (each file's SHA-256).", highlight=False)
        if manifest["transfers_staging_not_in_backup"]:
            console.print(f"not in it: the buckets of "
                          f"{counted(manifest['transfers_staging_not_in_backup'], 'transfer')}"
                          " not committed yet (their sites send them again after a restore).",
                          highlight=False)
        if "not_in_backup" in manifest["archive"]:
            console.print("not in it: the embedded archive's images (archive/spool): back "
                          "them up with the storage's tools.", highlight=False)
    if manifest["missing"]:
        err.print(f"[yellow]missing from the hub home, so from the backup:[/yellow] "
                  f"{literal(', '.join(manifest['missing']))}", highlight=False)
    if manifest["config_file"] is None:  # the list above just lacked "the configuration"
        err.print(f"[yellow]no configuration file in the backup:[/yellow] {NO_HUB_FILE}",
                  highlight=False)
    if as_json:
        exit_on_prune_problems(made.pruned)
    else:
        report_pruned(made.pruned)


@hub_app.command("restore")
def hub_restore(folder: Path = typer.Argument(
        ..., help="A pas-hub-backup-<UTC time> folder written by pas hub backup"),
        config: Path | None = HubConfigOption,
        force: bool = typer.Option(
            False, "--force",
            help="restore into a home holding another fleet CA (set aside, not deleted): "
                 "every appliance its hub enrolled must then enrol again"),
        key: Path | None = KeyOption, passphrase_file: Path | None = PassphraseOption) -> None:
    """Put a hub backup back in the hub's home (the hub stopped).

    Checked first: a whole pas hub backup (each file's size and SHA-256), sound databases of
    a version this PAS runs, no hub running on the home, no other fleet CA in it; a sealed
    one opened with --key (in a hidden folder of the home) and checked as a clear one is;
    refused in one line otherwise, nothing changed. What the home held is set aside, never
    deleted."""
    from appliance import logs
    from appliance.cli.common import operator_actor
    from appliance.hub.config import home_named
    from appliance.hub.restore import RestoreStopped, restore_hub_backup
    from appliance.ops.backup_seal import BackupKeyError, load_key
    from appliance.ops.restore import RestoreRefused

    settings = _hub_settings(config)
    logs.setup(settings.log_level)  # the restore's WARNING line: journald under systemd
    try:
        private = None if key is None else load_key(key, _passphrase(passphrase_file))
        done = restore_hub_backup(settings.home, folder, operator_actor(), force=force,
                                  home_named=home_named(settings), key=private)
    except (RestoreRefused, BackupKeyError) as exc:
        err.print(f"[red]refused:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    except RestoreStopped as exc:
        err.print(f"[red]not finished:[/red] {literal(exc)}", highlight=False)
        raise typer.Exit(1) from None
    for line in restored_lines(done):
        console.print(literal(line), highlight=False)


def restored_lines(done: HubRestored) -> list[str]:
    """What ``pas hub restore`` tells the operator: what is back (the manifest's counts),
    what was set aside, where the configuration is, what is left to do."""
    m = done.manifest
    archive = m.get("archive") or {}
    what = (f"the database ({counted(m.get('sites_enrolled', 0), 'site')} enrolled, "
            f"{counted(m.get('certificates_revoked', 0), 'certificate')} revoked, "
            f"{counted(m.get('transfers_committed', 0), 'transfer')} committed, "
            f"{counted(m.get('heartbeats', 0), 'heartbeat')}), the fleet CA "
            f"({str(m.get('ca_fingerprint'))[:16]}...) and keys")
    if "archive/pas.sqlite" in done.placed:
        what += (f", the embedded archive's index "
                 f"({counted(archive.get('instances', 0), 'instance')} of "
                 f"{counted(archive.get('studies', 0), 'study', 'studies')})")
    lines = [f"hub restored in {done.home} from {done.folder} (written {m.get('made_at')}): "
             f"{what}"]
    if m.get("sealed"):
        lines.append(f"a sealed backup: opened with the backup key {m['sealed']['key']} in a "
                     f"hidden folder of {done.home} (removed), checked there, put back from it")
    if done.kept:
        lines.append(f"already as in the backup, kept: {', '.join(done.kept)}")
    if done.set_aside:
        lines.append(f"set aside in {done.home}, not deleted: "
                     + ", ".join(str(p.relative_to(done.home)) for p in done.set_aside))
    if m.get("missing"):
        lines.append(f"not in the backup (missing from the hub's home when it was written): "
                     f"{', '.join(m['missing'])}")
    config = done.config
    if config is not None and config.state == "put back":
        lines.append(f"configuration put back: {config.target}")
    elif config is not None and config.state == "left":
        lines.append(f"configuration: {config.target} exists, left as it is (the backup's "
                     f"is {config.copy}{_opened(done)})")
    elif config is not None:
        lines.append(f"configuration not put back at {config.target} ({config.why}): copy "
                     f"{config.copy}{_opened(done)} there")
    if m.get("transfers_staging_not_in_backup"):
        lines.append(f"{counted(m['transfers_staging_not_in_backup'], 'transfer')} not "
                     "committed at the backup: their sites send every bucket again")
    # What the hub did after the backup is not in it (docs/operations.md): said here too,
    # where the operator is, not only in the docs.
    lines.append(f"not in it, done at the hub after {m.get('made_at')}: sites enrolled (or "
                 "enrolled again) since must enrol again (pas hub token SITE, then pas enroll "
                 "--replace at the site: /fleet shows them refused), tokens issued since are "
                 "gone, revocations since must be done again")
    todo = ["systemctl start pas-hub"]
    spool = done.home / "archive" / "spool"
    if archive.get("kind") == "embedded" and not _holds_files(spool):
        todo.insert(0, f"put {spool} back from the storage's backup (the embedded archive's "
                       "images are not in a hub backup)")
    elif archive.get("kind") == "embedded":  # a restore in place: the images are there
        lines.append(f"the embedded archive's images: {spool} is used as it is (not in a "
                     "hub backup; put it back from the storage's backup only if it was lost)")
    lines.append("next: " + "; then ".join(todo))
    return lines


def _opened(done: HubRestored) -> str:
    """After the configuration's copy, when it was opened from a sealed backup."""
    return ", opened from the sealed backup, 0600" if done.manifest.get("sealed") else ""


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` holds at least one file (a spool the restore did not touch)."""
    return folder.is_dir() and any(path.is_file() for path in folder.rglob("*"))
