"""``pas restore``: a ``pas backup`` folder put back in the home, checked before anything
changes.

Owns: deciding whether a backup folder may be restored on this appliance, and putting its
index and enrolment in place. May not touch: the spool (start-up recovery reconciles it with
the restored index: files received since are adopted, indexed ones gone are flagged), the
configuration file (``/etc/pas`` is the operator's; the backup's copy is named for them).

Why a command: the restore was a copy by hand, checked by nothing. Another site's backup
(the backups of a region's sites side by side on one share) started without a word, and the
appliance then spoke to the hub with the other site's certificate, as that site; a backup
written by a newer version stopped the start with a traceback; a truncated or damaged file
was found only once the home's own index had been overwritten. Each is refused here, in one
line naming the problem, before anything in the home is touched. What the home held is set
aside, never deleted: ``pas.sqlite.before-restore-<UTC time>``, ``pki.before-restore-<UTC
time>``.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.config import Settings, site_origin
from appliance.ops import index_check
from appliance.ops.backup import KIND, MADE_AT_FORMAT
from appliance.ops.backup_folder import MANIFEST, OPENING, sha256_of
from appliance.ops.backup_seal import (
    FORMAT,
    SUFFIX,
    SealedFileDamaged,
    fingerprint,
    open_folder,
    public_of,
)
from appliance.store import backups
from appliance.store.damage import SIDE_FILES, damage_of
from appliance.store.db import Database
from appliance.store.ops import schema_version_of
from appliance.store.schema import MIGRATIONS
from appliance.store.spool import fsync_dir

ASIDE = "before-restore"


class RestoreRefused(Exception):
    """A backup folder that may not be restored here; the message names the problem.
    Nothing in the home was changed."""


@dataclass
class Restored:
    manifest: dict[str, Any]
    index_set_aside: Path | None
    pki_set_aside: Path | None
    config_in_backup: Path | None


def check_backup(settings: Settings, folder: Path,
                 key: X25519PrivateKey | None = None) -> dict[str, Any]:
    """The backup's manifest, once the folder is found to be a whole ``pas backup`` of this
    site that this software can run (one written before manifests said their kind too:
    :func:`check_kind`): each file its manifest names, with its size and SHA-256; an index
    SQLite finds sound, of a schema this version knows. Raises :class:`RestoreRefused`
    naming the first problem.

    A sealed backup (:mod:`appliance.ops.backup_seal`) is checked as far as it can be before
    it is opened: its files' sizes and SHA-256 (of the sealed bytes), and that ``key`` is
    the one it was sealed for; its index is checked once opened (:func:`restore_backup`)."""
    manifest = read_manifest(folder)
    check_kind(folder, manifest)
    if not _of_this_site(settings, folder, manifest):
        origin = site_origin(settings)
        raise RestoreRefused(
            f"{folder} is the backup of site {_backup_site(folder, manifest)!r}, and this "
            f"appliance is site {settings.site!r} ({ORIGIN_WORDS[origin]}): restored, it "
            f"would speak to the hub as that site. Restore a pas-backup-{settings.site}-... "
            "folder (or put this site's configuration back first). Nothing restored")
    made_at(folder, manifest)
    files = manifest.get("files")
    sealed_for = _sealed_for(folder, manifest)
    index_name = "pas.sqlite" + (SUFFIX if sealed_for else "")
    if not isinstance(files, dict) or index_name not in files:
        raise RestoreRefused(f"{folder}/{MANIFEST} names no {index_name}: not a whole backup;"
                             " nothing restored")
    for name, entry in sorted(files.items()):
        check_file(folder, name, entry)
    config_file = manifest.get("config_file")
    if config_file is not None and (not isinstance(config_file, str) or
                                    not Path(config_file).name):
        # Read after the index was put back: a restore that had succeeded ended in a
        # traceback, and a sealed backup's opened configuration was removed with it.
        raise RestoreRefused(f"{folder}/{MANIFEST}: config_file {config_file!r} is not a "
                             "file's path: the manifest is damaged; nothing restored")
    if sealed_for is not None:
        check_key(folder, sealed_for, key)
        return manifest
    if key is not None:
        # Someone expecting a sealed backup is given one in clear (replaced on the share?):
        # said before anything changes, not restored without a word.
        raise RestoreRefused(f"{folder} is not sealed (written in clear), and a key was "
                             "given: restore it without --key if it is the backup meant; "
                             "nothing restored")
    check_index(folder, folder / "pas.sqlite", manifest)
    return manifest


def _sealed_for(folder: Path, manifest: dict[str, Any]) -> str | None:
    """The fingerprint of the key a sealed backup was sealed for; None: in clear."""
    sealed = manifest.get("sealed")
    if sealed is None:
        return None
    if not isinstance(sealed, dict) or sealed.get("format") != FORMAT or \
            not isinstance(sealed.get("key"), str) or \
            not re.fullmatch(r"[0-9a-f]{32}", str(sealed.get("backup_id"))):
        raise RestoreRefused(f"{folder}/{MANIFEST}: its \"sealed\" entry is not one this PAS "
                             f"reads (format {FORMAT}): written by a newer PAS, or damaged; "
                             "nothing restored")
    return str(sealed["key"])


def check_key(folder: Path, sealed_for: str, key: X25519PrivateKey | None,
              command: str = "pas restore", recipient: str = "backup.recipient") -> None:
    """``key`` is the backup key ``folder`` was sealed for (its fingerprint): refused,
    naming the one wanted (and the one given), before anything is opened. ``command`` and
    ``recipient``: the hub's words (``pas hub restore``, the hub's ``backup.recipient``)."""
    if key is None:
        raise RestoreRefused(f"{folder} is sealed for the backup key {sealed_for}: give its "
                             f"private key ({command} --key FILE); nothing restored")
    given = fingerprint(public_of(key))
    if given != sealed_for:
        raise RestoreRefused(f"{folder} is sealed for the backup key {sealed_for}, and the key "
                             f"given is {given}: give the private key of {sealed_for} (the "
                             f"one {recipient} named when it was written); nothing "
                             "restored")


def check_index(folder: Path, index: Path, manifest: dict[str, Any]) -> None:
    """The backup's index (``index``: in ``folder``, or opened from it) is one SQLite finds
    sound, of a schema this version knows; :class:`RestoreRefused` otherwise."""
    known = len(MIGRATIONS)
    try:
        schema = schema_version_of(index)
        finding = damage_of(index)
    except sqlite3.Error as exc:
        raise RestoreRefused(f"{index} cannot be read ({exc}): nothing restored") from None
    if schema > known:
        raise RestoreRefused(
            f"{folder} was written by a newer PAS (version {manifest.get('software')}, index "
            f"schema {schema}; this one knows {known}): install that version or a later one, "
            "then restore. Nothing restored")
    if finding is not None:
        raise RestoreRefused(f"{index} is damaged ({finding}): restore an older backup. "
                             "Nothing restored")


# What the manifest of every pas backup has held, before it said its kind (2026-12-05, with
# --keep) and since (appliance.ops.backup._manifest); "files" names its pas.sqlite. A hub's
# has no site, and names hub.sqlite.
OLDER_MANIFEST_KEYS = ("site", "made_at", "software", "schema", "instances", "studies", "files")
HUB_KIND = "pas hub backup"  # appliance.hub.backup.KIND: pas hub restore puts it back


def check_kind(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse (:class:`RestoreRefused`) a folder whose manifest is not a ``pas backup``'s:
    its ``kind`` says so, or, written before manifests said their kind, it has what a
    ``pas backup`` manifest had (:data:`OLDER_MANIFEST_KEYS`, a ``pas.sqlite`` among its
    files). Until 2026-12-06 every backup written before 2026-12-05 was refused as "kind
    None"."""
    kind = manifest.get("kind")
    if kind == KIND:
        return
    if kind == HUB_KIND:
        raise RestoreRefused(f"{folder} is a hub's backup (its {MANIFEST} says kind "
                             f"{HUB_KIND!r}), not an appliance's: pas hub restore puts it back "
                             "on the hub; nothing restored")
    if kind is not None:
        raise RestoreRefused(f"{folder} is not a pas backup (its {MANIFEST} says kind "
                             f"{kind!r}): nothing restored")
    files = manifest.get("files")
    lacking = [key for key in OLDER_MANIFEST_KEYS if key not in manifest]
    if not lacking and not (isinstance(files, dict) and "pas.sqlite" in files):
        lacking = ["pas.sqlite in files"]
    if lacking:
        raise RestoreRefused(f"{folder} is not a pas backup: its {MANIFEST} names no kind, "
                             "nor has it what an older pas backup's has (no "
                             f"{', '.join(lacking)}): nothing restored")


# How a refusal says where this appliance's site comes from (appliance.config.site_origin).
ORIGIN_WORDS = {"configuration": "site in its configuration",
                "enrolment": "its enrolment's; its configuration names no site",
                "default": "the default: its configuration names no site and it is not "
                           "enrolled"}


def _backup_site(folder: Path, manifest: dict[str, Any]) -> str | None:
    """The site a backup is of: its manifest's. A backup written before manifests said
    where the name came from ("site_from") whose site is the default "PAS" was of a
    configuration that named none: its enrolment's certificate (if it holds one) says
    which site it is, as the appliance now takes that name."""
    site = manifest.get("site")
    if "site_from" not in manifest and site == "PAS":
        from appliance.transfer.enrolment import certificate_cn

        return certificate_cn(folder / "pki" / "client.crt") or site
    return site if isinstance(site, str) else None


def _of_this_site(settings: Settings, folder: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``folder`` may be restored on this appliance as far as its site goes. Its
    site must be this appliance's (the configuration's, else the enrolment's), or, on an
    appliance with no name yet (the configuration names none, not enrolled: a new disk),
    one no configuration named: the backup's enrolment then names the appliance, as a
    backup of such a configuration was always restored there. A backup whose
    configuration named its site needs that configuration back first, as before."""
    if site_origin(settings) == "default":
        named_by = manifest.get("site_from")
        if named_by in ("enrolment", "default") or (
                named_by is None and manifest.get("site") == "PAS"):
            return True
    return _backup_site(folder, manifest) == settings.site


class SealedNotOpened(Exception):
    """A sealed backup's files that did not open into the home (:func:`open_sealed`):
    ``error`` says why, a :class:`SealedFileDamaged` (a sealed file that does not open,
    naming its part) or the :class:`OSError` of the home's disk. Each restore words its
    own refusal of it."""

    def __init__(self, error: SealedFileDamaged | OSError) -> None:
        super().__init__(str(error))
        self.error = error


def open_sealed(folder: Path, manifest: dict[str, Any], key: X25519PrivateKey | None,
                home: Path) -> dict[str, dict[str, object]] | None:
    """Open the backup ``folder`` (its checked ``manifest``), if sealed, with ``key`` into
    ``home``'s private folder :data:`OPENING`, the same for ``pas restore`` and ``pas hub
    restore``, the home's lock held. First removes what a restore killed before left there
    (in clear), whatever the backup; the caller removes it again after use. Returns the
    opened files as a manifest's ``files`` names them; None for a clear backup (nothing
    opened: put back from ``folder``). Raises :class:`SealedNotOpened`, the opening
    removed, when one does not open."""
    opening = home / OPENING
    shutil.rmtree(opening, ignore_errors=True)
    if manifest.get("sealed") is None:
        return None
    assert key is not None, "the restore's checks refuse a sealed backup without its key"
    try:
        opening.mkdir(mode=0o700)
        return open_folder(folder, sorted(manifest["files"]), key, opening,
                           str(manifest["sealed"]["backup_id"]))
    except (SealedFileDamaged, OSError) as exc:
        shutil.rmtree(opening, ignore_errors=True)
        raise SealedNotOpened(exc) from None


def restore_backup(settings: Settings, folder: Path, actor: str,
                   at: float | None = None, key: X25519PrivateKey | None = None) -> Restored:
    """Check ``folder`` and put it back (:func:`_put_back`). A sealed backup is first opened
    with ``key`` into a private folder in the home (:data:`OPENING`, removed after), its
    index checked there, and moved in from it; the configuration it holds is left in the
    home, ``<name>.from-backup-<UTC time>`` (0600), for the operator."""
    from appliance.ops.home_lock import hold_home_lock

    manifest = check_backup(settings, folder, key)
    home = settings.home
    # Held before anything is opened: a sealed backup opened beside a running daemon wrote
    # a clear copy of the whole index to the disk it receives on, then was refused.
    lock = hold_home_lock(home)
    try:
        opening = home / OPENING
        try:
            files = open_sealed(folder, manifest, key, home)
        except SealedNotOpened as exc:
            if isinstance(exc.error, SealedFileDamaged):
                raise RestoreRefused(f"{exc.error}: restore an older backup. Nothing "
                                     "restored") from None
            raise RestoreRefused(f"cannot open {folder} into {home} "
                                 f"({_reason(exc.error, home)}): {_LEFT_AS_IT_WAS}") from None
        if files is None:  # a clear backup
            return _put_back(settings, folder, folder, manifest, actor, at)
        try:
            check_index(folder, opening / "pas.sqlite", manifest)
            done = _put_back(settings, folder, opening, {**manifest, "files": files}, actor,
                             at)
            if done.config_in_backup is not None:
                kept = _free_name(home / f"{done.config_in_backup.name}.from-backup-"
                                         f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at))}")
                done.config_in_backup.rename(kept)
                done.config_in_backup = kept
            return done
        finally:
            _remove(opening)
    finally:
        lock.close()


def _put_back(settings: Settings, folder: Path, source: Path, manifest: dict[str, Any],
              actor: str, at: float | None) -> Restored:
    """The home's lock held by the caller, put the backup's index and enrolment (read from
    ``source``: ``folder``, or where a sealed one was opened) in place of the home's, which
    are set aside (modes kept: the key stays 0600). The restored index's audit trail says
    who restored which backup; the next start reconciles it with the spool.

    All or nothing: the backup's index and enrolment are first copied beside the home's
    under temporary names, fsynced, checked and given the restore's row
    (:func:`_copy_in`); only then are the home's renamed aside and the copies renamed in
    (renames need no room). A failure before (the disk full, a copy unreadable) or during
    the renames (undone) raises :class:`RestoreRefused` with the home as it was. Until
    2026-12-07 the home's index was set aside first: a full disk left the home with no index
    at all, and a traceback."""
    home = settings.home
    index = settings.db_path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if at is None else at))
    has_pki = (source / "pki").is_dir()
    # A WAL (and its -shm) left without its index is set aside too: the daemon killed,
    # then pas.sqlite moved by hand. Left in the home, SQLite replayed it into the
    # restored index at its first open (pages of another database over the backup's):
    # the restore said it was done, and the index was malformed, or silently the old one.
    present = [side for side in ("", *SIDE_FILES)
               if index.with_name(index.name + side).exists()]
    aside = _free_name(index.with_name(f"{index.name}.{ASIDE}-{stamp}"), SIDE_FILES)
    index_aside = aside.with_name(aside.name + present[0]) if present else None
    pki_aside = _free_name(home / f"pki.{ASIDE}-{stamp}") \
        if (home / "pki").exists() else None
    incoming, incoming_pki = home / INCOMING, home / INCOMING_PKI
    detail = (f"pas restore: the index{' and the enrolment' if has_pki else ''} of "
              f"{folder} (written {manifest.get('made_at')})"
              + (f"; the home's index set aside as {index_aside.name}"
                 if index_aside else ""))
    try:
        _copy_in(source, manifest, incoming, incoming_pki if has_pki else None,
                 lambda db: backups.record_restore(
                     db, made_at=made_at(folder, manifest), folder=folder.resolve(),
                     actor=actor, detail=detail))
    except (OSError, sqlite3.Error) as exc:
        _remove(incoming, incoming_pki)
        raise RestoreRefused(f"cannot copy {folder} into {home} ({_reason(exc, home)}): "
                             f"{_LEFT_AS_IT_WAS}") from None
    except RestoreRefused:
        _remove(incoming, incoming_pki)
        raise
    # The swap: renames only (they need no room), each undone if a later one fails.
    done: list[Callable[[], None]] = []
    try:
        _swap_in(index, present, aside, incoming, done)
        if pki_aside is not None:
            _rename(home / "pki", pki_aside, done)
        if has_pki:
            _rename(incoming_pki, home / "pki", done)
        fsync_dir(home)
        # What SQLite reads now, the file and any WAL beside it: the backup's index as
        # it was checked, with the restore's row.
        finding = damage_of(index, untouched=True)
        if finding is not None:
            raise RestoreRefused(f"the restored index is damaged once in place "
                                 f"({finding})")
    except (OSError, sqlite3.Error, RestoreRefused) as exc:
        not_back = _undo(home, done)
        _remove(incoming, incoming_pki)
        if not_back:
            raise RestoreRefused(
                f"cannot put the backup in place in {home} ({_reason(exc, home)}), and "
                f"{'; '.join(not_back)}: put them back by hand before starting PAS"
            ) from None
        raise RestoreRefused(f"cannot put the backup in place in {home} "
                             f"({_reason(exc, home)}): {_LEFT_AS_IT_WAS}") from None
    # What the daemon's check found (index-check.json) was of the index set aside:
    # pas status and pas doctor said "index damaged" of the restored one.
    index_check.forget(home)
    config_name = manifest.get("config_file")
    config = source / Path(config_name).name if config_name else None
    return Restored(manifest, index_aside, pki_aside,
                    config if config is not None and config.is_file() else None)


# The backup's index and enrolment while they are copied in, beside the home's (the same
# file system: renamed in place at the end). A restore killed meanwhile leaves them: the next
# one removes them first; PAS never reads them.
INCOMING = ".pas.sqlite.restoring"
INCOMING_PKI = ".pki.restoring"
_LEFT_AS_IT_WAS = "nothing restored, the home as it was"


def _copy_in(folder: Path, manifest: dict[str, Any], incoming: Path,
             incoming_pki: Path | None, record: Callable[[Database], None]) -> None:
    """Copy the backup's index to ``incoming`` and its enrolment to ``incoming_pki``, each
    file fsynced (the enrolment's too: a power cut after the restore could leave the key
    empty), each checked against the manifest's SHA-256; migrate the index copy to this
    version's schema and ``record`` the restore in it; check it (``integrity_check``).
    Raises OSError or sqlite3.Error as they come (a full disk), :class:`RestoreRefused` for
    a copy that is not the backup's."""
    home = incoming.parent
    _remove(incoming, home / INCOMING_PKI)  # a restore killed before left them
    files = manifest.get("files") or {}
    if folder.name == OPENING:  # opened for this restore, on the home's disk: no second copy
        os.rename(folder / "pas.sqlite", incoming)
    else:
        shutil.copy2(folder / "pas.sqlite", incoming)
    _fsync(incoming)
    copies = [(incoming, "pas.sqlite")]
    if incoming_pki is not None:
        # File by file (shutil.copytree carries on past a failure, then raises them all as
        # one list), each with its mode (the key 0600) and fsynced, then each folder.
        incoming_pki.mkdir(mode=0o700)
        folders = [incoming_pki]
        for source in sorted((folder / "pki").rglob("*")):
            relative = source.relative_to(folder / "pki")
            target = incoming_pki / relative
            if source.is_dir():
                target.mkdir(mode=0o700)
                folders.append(target)
                continue
            shutil.copy2(source, target)
            _fsync(target)
            copies.append((target, f"pki/{relative}"))
        for made in reversed(folders):
            fsync_dir(made)
    for copy, name in copies:
        entry = files.get(name)
        if isinstance(entry, dict) and sha256_of(copy) != entry.get("sha256"):
            raise RestoreRefused(f"the copy of {folder / name} in {home} differs from the "
                                 f"backup's (the SHA-256 its manifest gives): "
                                 f"{_LEFT_AS_IT_WAS}")
    restored = Database(incoming)  # migrated here when the backup is older
    try:
        # The backup's own export row is not in its index (written after the copy): the
        # restore says which backup this index now is, for pas status and pas doctor.
        record(restored)
    finally:
        restored.close()
    left = [side for side in SIDE_FILES if incoming.with_name(incoming.name + side).exists()]
    if left:  # another connection kept them: what they hold would not be renamed in
        raise RestoreRefused(f"{incoming}{left[0]} stayed after the restore's row was written "
                             f"(SQLite did not checkpoint it): {_LEFT_AS_IT_WAS}")
    _fsync(incoming)
    finding = damage_of(incoming, thorough=True, untouched=True)
    if finding is not None:
        raise RestoreRefused(f"the copy of the backup's index in {home} is damaged "
                             f"({finding}): {_LEFT_AS_IT_WAS}")
    fsync_dir(home)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _remove(*paths: Path) -> None:
    """The temporary copies (and an index copy's ``-wal``/``-shm``), when there."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            continue
        for side in ("", *SIDE_FILES):
            path.with_name(path.name + side).unlink(missing_ok=True)


def _swap_in(index: Path, present: list[str], aside: Path, incoming: Path,
             done: list[Callable[[], None]]) -> None:
    """Put ``incoming`` in place of the home's index, which goes to ``aside`` with its
    ``-wal`` and ``-shm`` (``present``: which of ``""``, ``-wal``, ``-shm`` are there). The
    index is linked to its aside name first and then replaced in one rename: a restore
    killed at any instant leaves a ``pas.sqlite`` in the home, the old or the new (a start
    on none creates an empty index and indexes the spool again, the region's confirmations
    and the jobs lost). ``done`` gets how to undo each step."""
    linked = False
    if "" in present:
        try:
            os.link(index, aside)
            linked = True
            done.append(lambda: aside.unlink(missing_ok=True))
        except OSError:  # a file system without hard links: renamed, as set_aside does
            _rename(index, aside, done)
    for side in (side for side in present if side):
        _rename(index.with_name(index.name + side), aside.with_name(aside.name + side), done)
    incoming.rename(index)
    # Undone: the home's index back under its name in one rename (the copy goes with it),
    # or the copy back to its temporary name when the home had none (or it was renamed).
    done.append((lambda: os.replace(aside, index)) if linked
                else (lambda: index.rename(incoming)))


def _rename(source: Path, target: Path, done: list[Callable[[], None]]) -> None:
    source.rename(target)
    done.append(lambda: target.rename(source))


def _undo(home: Path, done: list[Callable[[], None]]) -> list[str]:
    """Undo what the swap did, last first; what could not be, in words."""
    not_back = []
    for step in reversed(done):
        try:
            step()
        except OSError as exc:
            not_back.append(f"{exc.filename or 'a file'} could not be put back ({exc})")
    with contextlib.suppress(OSError):
        fsync_dir(home)
    return not_back


def _reason(exc: BaseException, home: Path) -> str:
    """An error in a few words (``[Errno 28] No space left on device: 'a' -> 'b'`` says
    ``No space left on device``), and for a full disk what to do. SQLite says a full disk
    as "database or disk is full", or "disk I/O error" when its ``-shm`` file cannot grow:
    the room left on the home's disk tells."""
    room = "free some room there, then run pas restore again"
    if isinstance(exc, OSError) and exc.strerror:
        if exc.errno == errno.ENOSPC:
            return f"{exc.strerror}: {room}"
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, sqlite3.Error):
        try:
            free = shutil.disk_usage(home).free
        except OSError:
            return str(exc)
        if "full" in str(exc) or free < FULL_BELOW:
            return f"{exc}; {free // 1024} KiB free on the home's disk: {room}"
    return str(exc)


# Less room than this left on the home's disk, an error SQLite gives as "disk I/O error" is
# taken for the disk being full (what a restore's own writes need: the index's copy aside).
FULL_BELOW = 1024 * 1024


def _free_name(path: Path, sides: tuple[str, ...] = ()) -> Path:
    """``path``, or ``path-<n>`` when it (or it with one of ``sides``) is taken: a name set
    aside in the same second (two restores) is never replaced."""
    candidate, taken = path, 1
    while any(candidate.with_name(candidate.name + side).exists() for side in ("", *sides)):
        taken += 1
        candidate = path.with_name(f"{path.name}-{taken}")
    return candidate


def made_at(folder: Path, manifest: dict[str, Any]) -> float:
    """When the backup was written, from its manifest (``made_at``, UTC, as ``pas backup``
    writes it): the time ``pas status`` and ``pas doctor`` give the last backup once it is
    restored. Raises :class:`RestoreRefused` when it is not such a time."""
    written = manifest.get("made_at")
    try:
        return float(calendar.timegm(time.strptime(str(written), MADE_AT_FORMAT)))
    except ValueError:
        raise RestoreRefused(f"{folder}/{MANIFEST}: made_at {written!r} is not a UTC time "
                             "(YYYY-MM-DDTHH:MM:SSZ): the manifest is damaged; nothing "
                             "restored") from None


def read_manifest(folder: Path, what: str = "pas backup") -> dict[str, Any]:
    """A backup folder's ``MANIFEST.json`` (``what``: the kind of backup, for the refusal),
    or :class:`RestoreRefused` naming why it cannot be read. ``pas hub restore`` reads its
    backups' through it too."""
    if not folder.is_dir():
        raise RestoreRefused(f"{folder} is not a folder"
                             + ("" if folder.exists() else " (it does not exist)"))
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise RestoreRefused(f"{folder} holds no {MANIFEST}: not a {what} (or one cut "
                             "short); nothing restored") from None
    except (OSError, ValueError) as exc:
        raise RestoreRefused(f"{folder}/{MANIFEST} cannot be read ({exc}): the backup is "
                             "damaged; nothing restored") from None
    if not isinstance(manifest, dict):
        raise RestoreRefused(f"{folder}/{MANIFEST} is not a backup manifest: nothing restored")
    return manifest


def check_file(folder: Path, name: str, entry: Any) -> None:
    """One file the manifest names: inside the folder, there, of its size and SHA-256."""
    path = folder / name
    if not isinstance(entry, dict) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise RestoreRefused(f"{folder}/{MANIFEST}: entry {name!r} is not a backup file's: "
                             "nothing restored")
    if not path.is_file():
        raise RestoreRefused(f"{path} is missing (the manifest names it): the backup is not "
                             "whole; nothing restored")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise RestoreRefused(f"{path} is {size} bytes, the manifest says {entry.get('bytes')}"
                             " (truncated or damaged): restore an older backup. Nothing "
                             "restored")
    if sha256_of(path) != entry.get("sha256"):
        raise RestoreRefused(f"{path} does not have the SHA-256 the manifest gives (damaged)"
                             ": restore an older backup. Nothing restored")
