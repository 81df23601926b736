"""A backup's files sealed for a key the hospital keeps off the appliance.

Owns: the backup key (an X25519 key pair: the private half in a PEM file IT keeps in its
vault, the public half, the *recipient*, in ``backup.recipient``), and the sealed-file
format below. May not touch: what a backup holds or where it goes (:mod:`.backup`,
:mod:`.backup_folder`), the restore's checks and swap (:mod:`.restore`).

Why: a backup holds the index (every patient's name, birth date and study) and the
enrolment's private key (whoever has it speaks to the hub as this site). Written in clear to
a share, both were readable by anyone who could read the share, its snapshots and its own
backups. Sealed for a public key, the appliance can write backups it cannot itself read
back: a stolen share, or a stolen appliance, does not open them; the private key is needed
only to restore, on the day a disk is replaced.

Format of ``NAME.sealed`` (all raw bytes)::

    MAGIC (8) || wrapped file key (seal.WRAPPED_KEY_BYTES) || nonce prefix (7)
    || chunk 0 || chunk 1 || ... || last chunk

Each file has its own random AES-256-GCM key, wrapped for the recipient as the WAN's
transfer keys are (:func:`appliance.transfer.seal.wrap_key`: ephemeral X25519, HKDF-SHA256,
AES-256-GCM), its id naming the file (``backup:pas.sqlite``), so a wrapped key moved to
another file does not open. The content goes in chunks of :data:`CHUNK_BYTES` (memory
bounded whatever the index's size, invariant 8), each sealed with the nonce
``prefix || chunk number (4, big endian) || 1 if last else 0`` and the associated data
``MAGIC || file name``: a chunk moved, dropped, repeated, a file cut at a chunk's end or
renamed, each fails to open, and the last chunk (possibly empty) says the file ends there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Collection, Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.transfer.seal import (
    KEY_BYTES,
    TAG_BYTES,
    WRAPPED_KEY_BYTES,
    X25519_BYTES,
    KeyUnwrapError,
    unwrap_key,
    wrap_key,
)

MAGIC = b"PASBAK1\n"
SUFFIX = ".sealed"
FORMAT = "pas-backup-seal-1"  # the manifest's "sealed.format"
CHUNK_BYTES = 1 << 20
PREFIX_BYTES = 7
HEADER_BYTES = len(MAGIC) + WRAPPED_KEY_BYTES + PREFIX_BYTES


class BackupKeyError(ValueError):
    """A backup key or recipient that cannot be used; the message names the problem."""


class SealedFileDamaged(ValueError):
    """A sealed file that does not open: altered, cut short, renamed, or sealed for another
    key; the message names the file."""


# --- the key ---------------------------------------------------------------------------------

def recipient_of(private: X25519PrivateKey) -> str:
    """The public half, as ``backup.recipient`` takes it: 32 raw bytes in base64."""
    raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def parse_recipient(text: str) -> bytes:
    """``backup.recipient``'s 32 raw bytes; :class:`BackupKeyError` naming what is wrong."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BackupKeyError("is not base64 (the line `pas backup-key` printed)") from None
    if len(raw) != X25519_BYTES:
        raise BackupKeyError(f"is {len(raw)} bytes once decoded, a backup key's public half "
                             f"is {X25519_BYTES} (the line `pas backup-key` printed)")
    try:
        # A low-order point is a valid encoding, and no key can be agreed with it: every
        # backup failed on "Error computing shared key" while the configuration loaded.
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise BackupKeyError("is not the public half of a backup key (no key can be agreed "
                             "with it: the line `pas backup-key` printed)") from None
    return raw


def fingerprint(recipient: bytes) -> str:
    """What the manifest and every message name a key by: SHA-256 of its public half, the
    first 16 hex digits. Says which key a backup needs without giving anything away."""
    return hashlib.sha256(recipient).hexdigest()[:16]


# A passphrase is stretched by scrypt before it encrypts the PEM: PKCS#8's own PBKDF2 as
# the cryptography package writes it is 2,048 rounds (0.4 ms a guess); scrypt at these
# costs is ~0.3 s and 128 MiB a guess. Its salt and costs on a line before the PEM block,
# which PEM readers pass over.
SCRYPT_LINE = b"PAS-Scrypt:"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1


def _stretched(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase).hex().encode()


def new_key(path: Path, passphrase: bytes | None = None) -> str:
    """A new backup key written to ``path`` (PKCS#8 PEM, 0600; with ``passphrase``, the PEM
    encrypted under it stretched by scrypt, :data:`SCRYPT_LINE`); returns its recipient.
    Never overwrites: a key replaced is every backup sealed for it lost
    (:class:`BackupKeyError`). A write that fails leaves no file (an empty one blocked the
    name)."""
    private = X25519PrivateKey.generate()
    header = b""
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if passphrase:
        salt = os.urandom(16)
        header = (SCRYPT_LINE + f" n={SCRYPT_N} r={SCRYPT_R} p={SCRYPT_P} salt={salt.hex()}\n"
                  .encode())
        encryption = serialization.BestAvailableEncryption(
            _stretched(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                encryption)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BackupKeyError(f"{path} exists: a key replaced is every backup sealed for it "
                             "lost; choose another file") from None
    except OSError as exc:
        raise BackupKeyError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(header + pem)
            handle.flush()
            os.fsync(handle.fileno())
        folder = os.open(path.parent if str(path.parent) else Path("."), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise BackupKeyError(f"cannot write {path}: {exc.strerror or exc} (nothing left "
                             "there)") from None
    return recipient_of(private)


def _passphrase_for(pem: bytes, passphrase: bytes | None, path: Path) -> bytes | None:
    """The password the PEM was encrypted with: ``passphrase`` stretched as its
    :data:`SCRYPT_LINE` says, or as given (a key file without one: re-encrypted by
    openssl, say)."""
    if not passphrase or not pem.startswith(SCRYPT_LINE):
        return passphrase or None
    line = pem.split(b"\n", 1)[0][len(SCRYPT_LINE):].decode("ascii", "replace")
    try:
        fields = dict(item.split("=", 1) for item in line.split())
        n, r, p = int(fields["n"]), int(fields["r"]), int(fields["p"])
        salt = bytes.fromhex(fields["salt"])
        if not (1 < n <= 1 << 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError(line)
    except (KeyError, ValueError):
        raise BackupKeyError(f"{path}: its {SCRYPT_LINE.decode()} line is damaged") from None
    return _stretched(passphrase, salt, n, r, p)


def load_key(path: Path, passphrase: bytes | None = None) -> X25519PrivateKey:
    """The private key of ``path`` (:func:`new_key`'s file); :class:`BackupKeyError`
    naming why it cannot be used (missing, not a key, a passphrase needed or wrong)."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise BackupKeyError(f"cannot read the backup key {path}: {exc.strerror or exc}"
                             ) from None
    password = _passphrase_for(pem, passphrase, path)
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except TypeError:
        if passphrase:
            raise BackupKeyError(f"{path} is not encrypted: give no passphrase") from None
        raise BackupKeyError(f"{path} is encrypted: give its passphrase "
                             "(--passphrase-file)") from None
    except ValueError:
        if passphrase:
            raise BackupKeyError(f"{path}: the passphrase does not open it (or it is not a "
                                 "PEM private key)") from None
        raise BackupKeyError(f"{path} is not a PEM private key (the file `pas backup-key` "
                             "wrote)") from None
    if not isinstance(key, X25519PrivateKey):
        raise BackupKeyError(f"{path} is a {type(key).__name__.removeprefix('_')}, not a "
                             "backup key (X25519, written by `pas backup-key`)")
    return key


def public_of(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)


# --- sealing and opening ----------------------------------------------------------------------

def _bound(backup_id: str, name: str, listing: str = "") -> bytes:
    """What a file's key and parts are bound to: its backup (the manifest's random
    ``backup_id``), the backup's list of files (``listing``: :func:`listing_of`) and its
    name in it. Bytes of any name (a configuration file named with ``|`` or in another
    encoding than UTF-8: the transfer key wrap refuses ``|`` in its id)."""
    return (backup_id.encode("ascii") + b"/" + listing.encode("ascii") + b"/"
            + name.encode("utf-8", "surrogateescape"))


def listing_of(names: Collection[str]) -> str:
    """The digest of a backup's list of files (clear names, :data:`SUFFIX` taken off), that
    every file is bound to: a file removed from the backup with its manifest's line (the
    manifest is in clear) leaves a list no file opens under, where the restore went on
    without it (the hub's transfer key, its archive index: review s41)."""
    clear = sorted(name.removesuffix(SUFFIX) for name in names)
    joined = "\n".join(clear).encode("utf-8", "surrogateescape")
    return hashlib.sha256(joined).hexdigest()[:32]


def _key_id(bound: bytes) -> str:
    """The wrap's id (``transfer.seal.wrap_key``): never a hub transfer's, which has no
    ``:``; the name hashed, as the wrap's id takes no ``|``."""
    return "backup:" + hashlib.sha256(bound).hexdigest()


def new_backup_id() -> str:
    """A backup's random id (the manifest's ``sealed.backup_id``): its files open only as
    files of this backup, not mixed with another backup's sealed for the same key."""
    return os.urandom(16).hex()


def _nonce(prefix: bytes, number: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", number, 1 if last else 0)


def _chunks(handle: object, size: int) -> Iterator[tuple[bytes, bool]]:
    """``handle``'s content ``size`` bytes at a time, each with whether it is the last (an
    empty file is one empty last chunk). Sealed chunks are cut the same way, ``size`` plus
    the tag: the two sides agree on where each chunk ends."""
    read = handle.read  # type: ignore[attr-defined]
    current = read(size)
    while True:
        following = read(size) if len(current) == size else b""
        last = not following
        yield current, last
        if last:
            return
        current = following


def seal_file(source: Path, target: Path, recipient: bytes, name: str,
              backup_id: str, listing: str = "") -> None:
    """Write ``target``, ``source`` sealed for ``recipient`` under ``name`` (its path in the
    backup, without :data:`SUFFIX`) in backup ``backup_id``. The file is created 0600 and
    fsynced."""
    key = os.urandom(KEY_BYTES)
    aead = AESGCM(key)
    prefix = os.urandom(PREFIX_BYTES)
    bound = _bound(backup_id, name, listing)
    aad = MAGIC + bound
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, open(source, "rb") as clear:
        out.write(MAGIC + wrap_key(key, recipient, _key_id(bound)) + prefix)
        for number, (chunk, last) in enumerate(_chunks(clear, CHUNK_BYTES)):
            out.write(aead.encrypt(_nonce(prefix, number, last), chunk, aad))
        out.flush()
        os.fsync(out.fileno())


def open_file(source: Path, target: Path, private: X25519PrivateKey, name: str,
              backup_id: str, listing: str = "") -> str:
    """Write ``target`` (0600, fsynced), ``source`` opened with ``private``; returns the
    clear content's SHA-256. :class:`SealedFileDamaged` (``target`` removed) when anything
    does not check: the key's wrap, a chunk's tag, the order of the chunks, the end."""
    raw_private = private.private_bytes(serialization.Encoding.Raw,
                                        serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
    digest = hashlib.sha256()
    bound = _bound(backup_id, name, listing)
    aad = MAGIC + bound
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as sealed:
            header = sealed.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
                raise SealedFileDamaged(f"{source} is not a sealed backup file (its first "
                                        "bytes are not a sealed file's)")
            wrapped = header[len(MAGIC):len(MAGIC) + WRAPPED_KEY_BYTES]
            prefix = header[len(MAGIC) + WRAPPED_KEY_BYTES:]
            try:
                key = unwrap_key(wrapped, raw_private, _key_id(bound))
            except KeyUnwrapError:
                raise SealedFileDamaged(
                    f"{source} does not open with this key: sealed for another key, "
                    "altered, another file's renamed, another backup's, or the backup's "
                    "list of files changed (a file removed with its manifest line)"
                ) from None
            aead = AESGCM(key)
            # A file cut at a chunk's end makes that chunk the last read: it was sealed as
            # not the last, so its nonce differs and it does not open.
            for number, (chunk, last) in enumerate(_chunks(sealed, CHUNK_BYTES + TAG_BYTES)):
                try:
                    clear = aead.decrypt(_nonce(prefix, number, last), chunk, aad)
                except InvalidTag:
                    raise SealedFileDamaged(
                        f"{source}: part {number} does not open (altered, or the file is "
                        "cut short or spliced)") from None
                digest.update(clear)
                out.write(clear)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def open_folder(folder: Path, sealed_names: list[str], private: X25519PrivateKey,
                into: Path, backup_id: str) -> dict[str, dict[str, object]]:
    """Open each of ``sealed_names`` (paths in ``folder`` ending in :data:`SUFFIX`) into
    ``into`` under its clear name, folders made 0700; returns the clear files as a
    manifest's ``files`` names them (size and SHA-256 of what was opened).
    :class:`SealedFileDamaged` at the first that does not open (each bound to the whole
    list: one removed, none opens)."""
    opened: dict[str, dict[str, object]] = {}
    listing = listing_of(sealed_names)
    for sealed_name in sorted(sealed_names):
        name = sealed_name.removesuffix(SUFFIX)
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sha256 = open_file(folder / sealed_name, target, private, name, backup_id, listing)
        opened[name] = {"bytes": target.stat().st_size, "sha256": sha256}
    return opened
