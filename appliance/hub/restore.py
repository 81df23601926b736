"""``pas hub restore``: a ``pas hub backup`` folder put back in the hub's home, checked before
anything in the home changes.

Owns: deciding whether a hub backup may be restored in this home, and putting its files in
place (``hub.sqlite``, the fleet CA and keys, the embedded archive's index), with the
configuration file when it is missing; in the database put back, the record of the hub's
last backup names this one (its copy of ``hub.sqlite`` was taken before the backup recorded
itself). May not touch: the staging (``buckets/``, ``work/``: the hub's start removes what no
transfer of the restored database still needs, :mod:`appliance.hub.expiry`),
``downloads/``, the embedded archive's images (``archive/spool``: the storage's backup), a
configuration file that exists (``/etc/pas`` is the operator's).

Why a command: the hub's restore was a copy by hand ("copy the backup's files except
MANIFEST.json into the empty home"), checked by nothing. A truncated or damaged copy, a
backup a newer version wrote, a copy made beside a hub still serving (its database and keys
replaced under it), or into the home of another hub (its fleet CA, the one every appliance
it enrolled pins, overwritten) were each found, if at all, once the hub ran on them. Each is
refused here, in one line naming the problem, before anything in the home is touched; the
other hub's CA only with ``--force``. What the home held is set aside,
``<name>.before-restore-<UTC time>``, never deleted, as ``pas restore`` does on an appliance.

A sealed hub backup (``backup.recipient``: appliance/hub/backup.py) is refused without the
private half of its backup key, or with another key, before anything is opened; with it, its
files are opened into a hidden folder of the home and checked there as a clear backup's are,
then put back from there. The opened ``hub.sqlite`` is changed there (the row naming the
backup restored) before anything in the home is: a full disk then is a refusal, the home as it
was. A file whose place is on another filesystem than the home (``archive/`` its own mount,
as terabytes of ``archive/spool`` are) is copied there, fsynced and its SHA-256 compared with
the checked one, where a file of the home's disk is moved.

A restore under way is said by a marker file in the home, :data:`RESTORE_MARKER` (the backup
it puts back), written and fsynced before the first file is replaced, removed once every file
is in place. Killed or stopped between the two, the home is half restored (the keys of one
hub, the database of another, an archive index missing): while the marker is there ``pas hub
run`` and ``pas hub backup`` refuse, in one line saying to run ``pas hub restore`` again,
which puts every file back again (what is already the backup's is kept or set aside, never
deleted) and removes the marker. With no marker, the hub's start removes the ``.<name>.restoring``
copies a restore left beside their places (:func:`remove_restoring_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.hub.backup import ARCHIVE_INDEX, KIND, pki_files
from appliance.hub.pki import HubPKI
from appliance.ops.backup_folder import MANIFEST, OPENING, sha256_of, utc_stamp
from appliance.ops.backup_seal import (
    SUFFIX,
    SealedFileDamaged,
)
from appliance.ops.restore import (
    RestoreRefused,
    SealedNotOpened,
    _free_name,
    _sealed_for,
    check_file,
    check_key,
    check_kind,
    made_at,
    open_sealed,
    read_manifest,
)
from appliance.store.damage import SIDE_FILES, damage_of, set_aside
from appliance.store.hub import name_restored_backup
from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.store.ops import schema_version_of
from appliance.store.schema import MIGRATIONS
from appliance.store.spool import fsync_dir
from appliance.transfer.enrolment import ca_fingerprint
from appliance.words import counted

log = logging.getLogger("pas.hub.restore")

ASIDE = "before-restore"
DATABASE = "hub.sqlite"
# Their WAL, when the home has one, is part of what they hold: never "the same" as a copy.
DATABASES = (DATABASE, ARCHIVE_INDEX)
NOTHING = "Nothing restored"
# In the home from before the first file is replaced to after the last: a half-restored home.
RESTORE_MARKER = ".hub-restore-under-way"


class RestoreStopped(Exception):
    """The restore began and could not finish (a full disk, an I/O error): the message says
    what is in place and what was set aside."""


@dataclass
class ConfigOutcome:
    """What became of the backup's configuration file: ``put back`` at ``target``, ``left``
    (a file is there: the operator's), or ``not put back`` (``why``)."""

    state: str
    target: Path
    copy: Path
    why: str = ""


@dataclass
class HubRestored:
    manifest: dict[str, Any]
    folder: Path
    home: Path
    placed: list[str]
    set_aside: list[Path] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # already the backup's, byte for byte
    config: ConfigOutcome | None = None
    named_last: bool = False  # the restored hub.sqlite names this backup its last one


def _older_appliance_backup(folder: Path, manifest: dict[str, Any]) -> bool:
    """An appliance's backup written before manifests named their kind (the appliance's
    ``pas restore`` takes it): said as such, not as "kind None"."""
    if "kind" in manifest:
        return False
    try:
        check_kind(folder, manifest)
    except RestoreRefused:
        return False
    return True


def check_hub_backup(folder: Path, key: X25519PrivateKey | None = None) -> dict[str, Any]:
    """The manifest of ``folder``, once it is found to be a whole ``pas hub backup`` this
    software can run: each file it names there with its size and SHA-256, its CA the one it
    names, its databases sound (SQLite's ``quick_check``) and of a schema this version
    knows. Raises :class:`RestoreRefused` naming the first problem.

    A sealed backup (its manifest says ``sealed``: :mod:`appliance.ops.backup_seal`) is
    checked as far as it can be before it is opened: its sealed files' sizes and SHA-256,
    and that ``key`` is the one it was sealed for; its CA and databases are checked once
    opened (:func:`check_contents`, from :func:`restore_hub_backup`)."""
    manifest = read_manifest(folder, "pas hub backup")
    said = ("says kind 'pas backup'" if manifest.get("kind") == "pas backup" else
            "names no kind, as an appliance's written before 2026-12-05"
            if _older_appliance_backup(folder, manifest) else None)
    if said is not None:
        raise RestoreRefused(f"{folder} is an appliance's backup (its {MANIFEST} {said}), not "
                             "a hub's: pas restore puts it back on its appliance; nothing "
                             "restored")
    if manifest.get("kind") != KIND:
        raise RestoreRefused(f"{folder} is not a pas hub backup (its {MANIFEST} says kind "
                             f"{manifest.get('kind')!r}): nothing restored")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise RestoreRefused(f"{folder}/{MANIFEST} lists no files: the manifest is damaged; "
                             "nothing restored")
    made_at(folder, manifest)  # the restored hub's last backup: refused if unreadable
    sealed_for = _sealed_for(folder, manifest)
    suffix = SUFFIX if sealed_for is not None else ""
    for needed in (DATABASE, "ca.crt", "ca.key"):
        if needed + suffix not in files:
            raise RestoreRefused(f"{folder}/{MANIFEST} names no {needed}{suffix}: not a whole "
                                 f"hub backup. {NOTHING}")
    clear = {name.removesuffix(suffix) for name in files if name.endswith(suffix)}
    known = set(_home_files(clear)) | ({_config_name(manifest)} - {None})
    for name, entry in sorted(files.items()):
        if not name.endswith(suffix) or name.removesuffix(suffix) not in known:
            raise RestoreRefused(
                f"{folder}/{MANIFEST} names {name!r}, not a file this version puts back "
                f"(written by PAS {manifest.get('software')}): restore it with that version "
                f"or a later one. {NOTHING}")
        check_file(folder, name, entry)
    config_file = manifest.get("config_file")
    if config_file is not None and (not isinstance(config_file, str) or
                                    not Path(config_file).name):
        raise RestoreRefused(f"{folder}/{MANIFEST}: config_file {config_file!r} is not a "
                             f"file's path: the manifest is damaged. {NOTHING}")
    if sealed_for is not None:
        check_key(folder, sealed_for, key, "pas hub restore", "the hub's backup.recipient")
        return manifest
    if key is not None:  # a sealed one was expected: replaced on the share?
        raise RestoreRefused(f"{folder} is not sealed (written in clear), and a key was "
                             "given: restore it without --key if it is the backup meant; "
                             "nothing restored")
    check_contents(folder, folder, manifest)
    return manifest


def check_contents(folder: Path, source: Path, manifest: dict[str, Any]) -> None:
    """The backup's CA and databases, read in ``source``: ``folder`` itself, or where its
    sealed files were opened (named by their sealed file in ``folder`` then: the opened
    copy is gone by the time the operator reads the refusal). :class:`RestoreRefused`."""
    sealed = manifest.get("sealed") is not None

    def shown(name: str) -> Path:
        return folder / (name + SUFFIX if sealed else name)

    _check_ca(source, shown("ca.crt"), manifest)
    _check_database(folder, source, shown(DATABASE), manifest, DATABASE, "hub database",
                    len(HUB_MIGRATIONS))
    if ARCHIVE_INDEX in manifest["files"]:
        _check_database(folder, source, shown(ARCHIVE_INDEX), manifest, ARCHIVE_INDEX,
                        "embedded archive's index", len(MIGRATIONS))


def check_hub_home(home: Path, manifest: dict[str, Any], force: bool,
                   named: bool = True) -> None:
    """Refuse a home that is not a folder, or that holds another fleet CA than the backup's
    (unless ``force``): its hub enrolled appliances that pin it. And a home that neither
    ``PAS_HUB_HOME`` nor the configuration named (``named`` False: ``./var-hub`` where the
    command runs) unless a hub is already there: ``sudo pas hub restore FOLDER`` without
    ``env PAS_HUB_HOME=/var/lib/pas-hub`` put the fleet CA's key in ``/root/var-hub``, said
    "hub restored in var-hub ... then systemctl start pas-hub", and the hub that started
    had none of it."""
    if home.exists() and not home.is_dir():
        raise RestoreRefused(f"the hub home {home} is not a folder (PAS_HUB_HOME or the "
                             f"configuration's home). {NOTHING}")
    if not named and not any((home / name).exists() for name in ("ca.crt", DATABASE)):
        raise RestoreRefused(
            f"no hub home named: neither PAS_HUB_HOME nor the configuration names one, and "
            f"the default, {home} in this folder ({home.absolute()}), holds no hub. Name "
            "the home to put the backup in, as pas-hub.service does: sudo env "
            "PAS_HUB_HOME=/var/lib/pas-hub pas hub restore FOLDER. " + NOTHING)
    ca = HubPKI(home).ca_cert_path
    if force or not ca.is_file():
        return
    try:
        there = ca_fingerprint(ca.read_bytes())
    except ValueError as exc:
        there = f"unreadable: {exc}"
    wanted = manifest["ca_fingerprint"]
    if there != wanted:
        raise RestoreRefused(
            f"{home} holds another fleet CA than the backup's (fingerprint {there[:16]}..., "
            f"the backup's {wanted[:16]}...): restoring would replace the CA that every "
            "appliance enrolled with this home's hub pins, and each would have to enrol "
            "again. If this home is the one to replace, run it again with --force (its CA is "
            f"set aside, not deleted). {NOTHING}")


def restore_hub_backup(home: Path, folder: Path, actor: str, force: bool = False,
                       at: float | None = None, home_named: bool = True,
                       key: X25519PrivateKey | None = None) -> HubRestored:
    """Check ``folder`` and ``home`` (:func:`check_hub_backup`, :func:`check_hub_home`),
    then, holding the hub's lock (refused while ``pas hub run`` holds it), set aside what
    the home holds of the backup's files and put the backup's in their place: 0600, owned
    as the home is (a restore run as root leaves them the hub's user's). The configuration
    goes back where the manifest says only if no file is there. One WARNING log line says
    who restored which backup, as the backup's says who wrote it.

    A sealed backup is opened, the lock held (never beside a running hub), with ``key``
    into a private folder of the home (:data:`appliance.ops.backup_folder.OPENING`, 0700,
    removed after whatever happens: the home's disk, which holds the same files in clear
    once restored; never the backup's folder, a share), its CA and databases checked there
    as a clear backup's are, then put back from it as a clear one is. A configuration it
    holds that is not put back (a file is there) is left in the home,
    ``<name>.from-backup-<UTC time>`` (0600), for the operator. Refused before or while it
    is opened (a sealed file that does not open names its part), the home is left as it
    was (one this restore made is removed)."""
    from appliance.ops.home_lock import HomeInUse, hold_hub_lock, hub_lock_file

    folder = folder.absolute()
    manifest = check_hub_backup(folder, key)
    check_hub_home(home, manifest, force, home_named)
    home = home.absolute()  # what it says: "hub restored in var-hub" named no place
    made = not home.exists()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        lock = hold_hub_lock(home)
    except HomeInUse as exc:
        raise RestoreRefused(f"{exc}. {NOTHING}") from None
    opening = home / OPENING
    try:
        try:
            opened = open_sealed(folder, manifest, key, home)
        except SealedNotOpened as exc:
            error = exc.error
            if isinstance(error, SealedFileDamaged):
                raise RestoreRefused(f"{error}: restore an older backup. {NOTHING}") from None
            raise RestoreRefused(f"cannot open {folder} into {home} ("
                                 f"{error.strerror or error}): nothing restored") from None
        if opened is None:  # a clear backup
            return _restore(home, folder, folder, manifest, actor, at)
        contents = {**manifest, "files": opened}
        check_contents(folder, opening, contents)
        named = _name_opened(opening / DATABASE, folder, manifest, actor, home)
        return _restore(home, folder, opening, contents, actor, at, named)
    except RestoreRefused:
        if made:  # the home this restore made (and its lock file), gone again
            shutil.rmtree(opening, ignore_errors=True)
            with contextlib.suppress(OSError):
                hub_lock_file(home).unlink()
                home.rmdir()
        raise
    finally:
        shutil.rmtree(opening, ignore_errors=True)
        lock.close()


def _name_opened(opened: Path, folder: Path, manifest: dict[str, Any], actor: str,
                 home: Path) -> bool:
    """The opened ``hub.sqlite`` names the backup restored (:func:`name_restored_backup`),
    fsynced, before anything in the home is replaced: its journal on a full disk is a
    refusal, not a restore stopped half-way. Returns whether it names it."""
    try:
        named = name_restored_backup(opened, made_at(folder, manifest), folder, actor)
        with open(opened, "rb") as handle:
            os.fsync(handle.fileno())
    except (OSError, sqlite3.Error) as exc:
        raise RestoreRefused(f"cannot change the opened {DATABASE} in {home} "
                             f"({getattr(exc, 'strerror', None) or exc}): nothing restored, "
                             "the home is as it was") from None
    return named


def restore_under_way(home: Path) -> str | None:
    """The one line ``pas hub run`` and ``pas hub backup`` refuse with while a restore's
    :data:`RESTORE_MARKER` is in ``home`` (a restore killed or stopped half-way), else
    None."""
    marker = home / RESTORE_MARKER
    if not marker.is_file():
        return None
    try:
        said = json.loads(marker.read_text()).get("folder")
    except (OSError, ValueError, AttributeError):
        said = None
    backup = str(said) if said else "FOLDER"
    return (f"a hub restore into {home} did not finish ({marker.name}, of {backup}): the home "
            f"is half restored; run pas hub restore {backup} again (with its --key if sealed)")


def remove_restoring_leftovers(home: Path) -> list[Path]:
    """The copies a stopped restore left beside their places (``.<name>.restoring``, their
    journals), removed when no :data:`RESTORE_MARKER` says a restore is under way (the
    hub's start, its lock held): each a copy of a database or a key. Returns those
    removed."""
    if (home / RESTORE_MARKER).exists():
        return []
    removed = []
    for folder in (home, home / "archive"):
        for path in sorted(folder.glob(".*.restoring*")) if folder.is_dir() else []:
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _mark_under_way(home: Path, folder: Path, owner: os.stat_result) -> None:
    marker = home / RESTORE_MARKER
    text = json.dumps({"folder": str(folder), "pid": os.getpid(), "started_at": time.time()})
    with open(marker, "w") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    _own(marker, owner)
    fsync_dir(home)


def _restore(home: Path, folder: Path, source: Path, manifest: dict[str, Any], actor: str,
             at: float | None, named: bool | None = None) -> HubRestored:
    """The hub's lock held by the caller, the backup's files (read in ``source``:
    ``folder``, or where a sealed one was opened, ``manifest`` naming them in clear) put in
    the home, :data:`RESTORE_MARKER` there meanwhile. ``named``: the opened ``hub.sqlite``
    already names the backup (None: its copy is changed as it is put in place)."""
    from appliance.ops.home_lock import hub_lock_file

    owner = home.stat()
    _own(hub_lock_file(home), owner)  # the hub's user takes it at its start
    stamp_at = time.time() if at is None else at
    done = HubRestored(manifest, folder, home, [], named_last=bool(named))
    marker = home / RESTORE_MARKER
    under_way_before = marker.exists()  # a stopped run's: the home is half restored

    def name_it(incoming: Path) -> None:
        # The backup copied hub.sqlite before it recorded itself in the live one: the
        # copy names the backup before it (or none), and the restored hub's backup age
        # (/fleet, /metrics, PasHubBackupOld) counted from that. It names this one.
        done.named_last = name_restored_backup(incoming, made_at(folder, manifest),
                                               folder, actor)

    def mark() -> None:
        # Right before the first file is replaced, not before its copy is made: a restore
        # killed while it copied (most of its time) left a marker on a home it had not
        # touched, and the hub refused to start on it (review s41).
        if not marker.exists():
            _mark_under_way(home, folder, owner)

    for name in _home_files(manifest["files"]):
        try:
            _place(source, name, home, owner, stamp_at, done,
                   name_it if name == DATABASE and named is None else None, mark)
        except (OSError, sqlite3.Error) as exc:
            why = getattr(exc, "strerror", None) or exc
            where = getattr(exc, "filename", None)
            if not (done.placed or done.set_aside or under_way_before):
                with contextlib.suppress(OSError):  # nothing replaced: the home as it was
                    marker.unlink(missing_ok=True)
                    fsync_dir(home)
                raise RestoreRefused(f"cannot put {name} back in {home} ({why}"
                                     f"{': ' + str(where) if where else ''}): nothing "
                                     "restored, the home is as it was") from None
            stopped = (f"the restore stopped at {name} ({why}"
                       f"{': ' + str(where) if where else ''}); put back: "
                       f"{', '.join(done.placed) or 'nothing'}; set aside: "
                       f"{', '.join(p.name for p in done.set_aside) or 'nothing'}")
            log.error("hub restore from %s by %s: %s", folder, actor, stopped,
                      extra={"ACTOR": actor, "TARGET": str(home)})
            raise RestoreStopped(f"{stopped}. Fix the cause and run pas hub restore "
                                 "again (what it sets aside stays)") from None
    done.config = _put_config_back(source, manifest, home, owner)
    if source != folder and done.config is not None and done.config.state != "put back":
        done.config.copy = _keep_opened_config(done.config.copy, home, owner, stamp_at)
    marker.unlink(missing_ok=True)  # every file in place: the home is the backup's
    fsync_dir(home)
    log.warning("hub restored from %s by %s on %s: the fleet CA and keys, the database "
                "(%s enrolled, %s committed)%s%s", folder, actor, socket.gethostname(),
                counted(manifest.get("sites_enrolled", 0), "site"),
                counted(manifest.get("transfers_committed", 0), "transfer"),
                ", the embedded archive's index" if ARCHIVE_INDEX in done.placed else "",
                f", opened with the backup key {manifest['sealed']['key']}"
                if manifest.get("sealed") else "",
                extra={"ACTOR": actor, "TARGET": str(home)})
    if not done.named_last:
        log.warning("the restored hub.sqlite (schema %s) predates the hub's record of its "
                    "backups: its backup age counts from the hub's next start",
                    manifest.get("schema"), extra={"TARGET": str(home)})
    return done


def _keep_opened_config(opened: Path, home: Path, owner: os.stat_result, at: float) -> Path:
    """The configuration opened from a sealed backup, not put back (a file is there): kept
    in the home, ``<name>.from-backup-<UTC time>`` (0600, the home's owner), as ``pas
    restore`` keeps an appliance's; the opened folder is removed after the restore. When it
    cannot be kept (a full disk), said as its place in the opened folder, gone by then."""
    kept = _free_name(home / f"{opened.name}.from-backup-{utc_stamp(at)}")
    try:
        opened.chmod(0o600)
        opened.rename(kept)
        _own(kept, owner)
        fsync_dir(home)
    except OSError as exc:
        log.error("the configuration opened from the sealed backup could not be kept as %s "
                  "(%s)", kept, exc.strerror or exc)
        return opened
    return kept


def _home_files(files: Collection[str]) -> list[str]:
    """The backup's files that go in the home, in their order: keys first, the databases
    last (a restore stopped half-way leaves the home's database, and says what it put
    back)."""
    names = [path.name for path in pki_files(HubPKI(Path(".")))]
    return [name for name in (*names, ARCHIVE_INDEX, DATABASE) if name in files]


def _config_name(manifest: dict[str, Any]) -> str | None:
    config = manifest.get("config_file")
    return Path(str(config)).name if config else None


def _check_ca(source: Path, shown: Path, manifest: dict[str, Any]) -> None:
    try:
        found = ca_fingerprint((source / "ca.crt").read_bytes())
    except ValueError as exc:
        raise RestoreRefused(f"{shown} is not a certificate ({exc}): the backup is "
                             f"damaged. {NOTHING}") from None
    if found != manifest.get("ca_fingerprint"):
        raise RestoreRefused(f"{shown} is not the CA its {MANIFEST} names "
                             f"(fingerprint {found[:16]}..., the manifest says "
                             f"{str(manifest.get('ca_fingerprint'))[:16]}...): the backup is "
                             f"damaged. {NOTHING}")


def _check_database(folder: Path, source: Path, shown: Path, manifest: dict[str, Any],
                    name: str, what: str, known: int) -> None:
    path = source / name
    try:
        schema = schema_version_of(path)
        finding = damage_of(path)
    except sqlite3.Error as exc:
        raise RestoreRefused(f"the {what} {shown} cannot be read ({exc}): restore an older "
                             f"backup. {NOTHING}") from None
    if finding is not None:
        raise RestoreRefused(f"the {what} {shown} is damaged ({finding}): restore an older "
                             f"backup. {NOTHING}")
    if schema > known:
        raise RestoreRefused(
            f"{folder} was written by a newer PAS (version {manifest.get('software')}, {what} "
            f"schema {schema}; this one knows {known}): install that version or a later one, "
            f"then restore. {NOTHING}")


def _place(folder: Path, name: str, home: Path, owner: os.stat_result, at: float,
           done: HubRestored, prepare: Callable[[Path], None] | None = None,
           mark: Callable[[], None] = lambda: None) -> None:
    """One backup file in the home: copied beside its place (moved there from the folder a
    sealed backup was opened in; 0600, the home's owner),
    changed by ``prepare`` (the database: it names the backup restored), fsynced, what is
    there set aside, then renamed into place: the copy and its change land together."""
    target = home / name
    if name not in DATABASES and target.is_file() and \
            sha256_of(target) == done.manifest["files"][name]["sha256"]:
        done.kept.append(name)  # the same key (this hub's home): nothing to set aside
        return
    if not target.parent.is_dir():
        target.parent.mkdir(mode=0o700)
        _own(target.parent, owner)
    incoming = target.with_name(f".{target.name}.restoring")
    _remove_journals(incoming)  # a stopped run's, else rolled back into this new copy
    try:
        if folder.name == OPENING:  # opened for this restore, on the home's disk: moved in
            _move_in(folder / name, incoming)
        else:
            shutil.copyfile(folder / name, incoming)
        incoming.chmod(0o600)
        _own(incoming, owner)
        if prepare is not None:
            prepare(incoming)
        with open(incoming, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        incoming.unlink(missing_ok=True)
        _remove_journals(incoming)
        raise
    try:
        mark()  # the restore under way, before what is there is set aside or replaced
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
    done.set_aside += _set_aside(target, at)
    incoming.rename(target)
    fsync_dir(target.parent)
    done.placed.append(name)


def _move_in(opened: Path, incoming: Path) -> None:
    """A file opened in the home moved beside its place; its place on another filesystem
    (``archive/`` its own mount: EXDEV), copied there instead, fsynced, and the copy's
    SHA-256 compared with the opened (checked) file's."""
    try:
        os.rename(opened, incoming)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    wanted = sha256_of(opened)
    shutil.copyfile(opened, incoming)
    with open(incoming, "rb") as handle:
        os.fsync(handle.fileno())
    if sha256_of(incoming) != wanted:
        raise OSError(errno.EIO, "the copy differs from the opened file", str(incoming))
    opened.unlink()


def _remove_journals(incoming: Path) -> None:
    """SQLite's files beside a copy being put in place (its rollback journal, a WAL): left by
    a restore stopped while it changed the copy, SQLite would apply them to the next one."""
    for suffix in ("-journal", *SIDE_FILES):
        incoming.with_name(incoming.name + suffix).unlink(missing_ok=True)


def _set_aside(target: Path, at: float) -> list[Path]:
    """What the home holds at ``target`` renamed ``<name>.before-restore-<UTC time>``,
    with a database's WAL and shared-memory files: a WAL left beside the restored database
    would be replayed into it at its first open."""
    if target.exists():
        return [set_aside(target, at, ASIDE)]
    moved = []
    for suffix in SIDE_FILES:  # a WAL whose database is gone: never the restored one's
        side = target.with_name(target.name + suffix)
        if side.exists():
            aside = side.with_name(f"{side.name}.{ASIDE}-{utc_stamp(at)}")
            side.rename(aside)
            moved.append(aside)
    return moved


def _own(path: Path, owner: os.stat_result) -> None:
    """``path`` owned as the home is, when this process may give it away (root): a restore
    run with sudo left root's files the hub's user could not read."""
    if os.geteuid() == 0 and (path.stat().st_uid, path.stat().st_gid) != \
            (owner.st_uid, owner.st_gid):
        os.chown(path, owner.st_uid, owner.st_gid)


def _config_target(manifest: dict[str, Any], home: Path) -> Path:
    """Where the configuration goes back: the manifest's ``config_file``; one that was in
    the backed-up hub's home goes in this home (the same file, wherever the home now is)."""
    config = Path(str(manifest["config_file"]))
    old_home = manifest.get("home")
    if old_home and config.is_relative_to(Path(str(old_home))):
        return home / config.relative_to(Path(str(old_home)))
    return config


def _put_config_back(folder: Path, manifest: dict[str, Any], home: Path,
                     owner: os.stat_result) -> ConfigOutcome | None:
    name = _config_name(manifest)
    if name is None or not (folder / name).is_file():
        return None
    target = _config_target(manifest, home)
    copy = folder / name
    if target.exists():
        return ConfigOutcome("left", target, copy)
    if not target.parent.is_dir():
        return ConfigOutcome("not put back", target, copy, f"no folder {target.parent}")
    incoming = target.with_name(f".{target.name}.restoring")
    try:
        shutil.copy2(copy, incoming)  # its mode kept, as the backup kept it
        _own(incoming, owner)
        with open(incoming, "rb") as handle:
            os.fsync(handle.fileno())
        incoming.rename(target)
        fsync_dir(target.parent)
    except OSError as exc:  # the home is restored: said, not undone
        incoming.unlink(missing_ok=True)
        return ConfigOutcome("not put back", target, copy, exc.strerror or str(exc))
    return ConfigOutcome("put back", target, copy)
