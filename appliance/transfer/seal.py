"""Sealing of buckets: AES-256-GCM per bucket under a per-transfer key wrapped for the hub.

Owns: the sealed-bucket format and the key-wrap format of docs/protocol.md (invariant 5).
May not touch: the network, the database, the packing format (``pack.py``).

Formats (all raw bytes):
- sealed bucket: ``nonce (12) || AES-256-GCM(ciphertext || tag (16))`` with associated data
  ``b"pas-bucket-v1|" + transfer_id + b"|" + str(index)``: the tag binds a bucket to its
  transfer and its position, so a bucket replayed into another transfer or index fails.
- wrapped key: ``b"PW1" || ephemeral X25519 public key (32) || nonce (12) || AES-256-GCM of
  the 32-byte transfer key (48)``. The key-encryption key is HKDF-SHA256 over the X25519
  shared secret, salted with both public keys and with info naming the transfer id, so a
  wrapped key lifted into another transfer's manifest does not unwrap.

Every failure to authenticate or parse raises a ``ValueError`` subclass naming the problem;
nothing here can hang (no loops over attacker-chosen sizes) and nothing logs secrets.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
X25519_BYTES = 32
WRAP_MAGIC = b"PW1"
WRAPPED_KEY_BYTES = len(WRAP_MAGIC) + X25519_BYTES + NONCE_BYTES + KEY_BYTES + TAG_BYTES
BUCKET_AAD_PREFIX = b"pas-bucket-v1|"
WRAP_INFO_PREFIX = b"pas-transfer-key-v1|"


class SealError(ValueError):
    """A sealing argument is invalid (wrong key length, bad transfer id, bad index)."""


class BucketRejected(SealError):
    """A sealed bucket failed authentication: tampered, truncated, wrong key, or replayed into
    another transfer or index. The hub answers 400 and stores nothing."""


class KeyUnwrapError(SealError):
    """A wrapped transfer key cannot be opened: malformed, for another hub key, or for another
    transfer."""


def _raw_public(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_key(key: bytes, what: str = "transfer key") -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise SealError(f"{what} must be {KEY_BYTES} bytes")


def _transfer_id_bytes(transfer_id: str) -> bytes:
    if not isinstance(transfer_id, str) or not transfer_id or "|" in transfer_id:
        raise SealError("transfer id must be a non-empty string without '|'")
    return transfer_id.encode("utf-8")


def bucket_aad(transfer_id: str, index: int) -> bytes:
    """The associated data binding a bucket to (transfer, index), as docs/protocol.md states."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise SealError(f"bucket index must be a non-negative integer, got {index!r}")
    return BUCKET_AAD_PREFIX + _transfer_id_bytes(transfer_id) + b"|" + str(index).encode()


def generate_hub_keypair() -> tuple[bytes, bytes]:
    """A new X25519 key pair for the hub: (private raw 32 bytes, public raw 32 bytes)."""
    private = X25519PrivateKey.generate()
    private_raw = private.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return private_raw, _raw_public(private.public_key())


def new_transfer_key() -> bytes:
    """32 random bytes from the OS: one AES-256-GCM key per transfer."""
    return os.urandom(KEY_BYTES)


def _kek(shared: bytes, ephemeral_public: bytes, hub_public: bytes, transfer_id: str) -> bytes:
    """The key-encryption key: HKDF-SHA256 salted with both public keys (binds the exchange)
    and with info naming the transfer (binds the wrapped key to its transfer)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=ephemeral_public + hub_public,
        info=WRAP_INFO_PREFIX + _transfer_id_bytes(transfer_id),
    ).derive(shared)


def wrap_key(key: bytes, hub_public: bytes, transfer_id: str) -> bytes:
    """Wrap ``key`` for the holder of the hub's X25519 private key (ephemeral-static ECDH)."""
    _check_key(key)
    if not isinstance(hub_public, bytes | bytearray) or len(hub_public) != X25519_BYTES:
        raise SealError(f"hub public key must be {X25519_BYTES} raw bytes")
    hub_key = X25519PublicKey.from_public_bytes(bytes(hub_public))
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw_public(ephemeral.public_key())
    shared = ephemeral.exchange(hub_key)
    kek = _kek(shared, ephemeral_public, bytes(hub_public), transfer_id)
    nonce = os.urandom(NONCE_BYTES)
    aad = WRAP_MAGIC + _transfer_id_bytes(transfer_id)
    return WRAP_MAGIC + ephemeral_public + nonce + AESGCM(kek).encrypt(nonce, bytes(key), aad)


def unwrap_key(wrapped: bytes, hub_private: bytes, transfer_id: str) -> bytes:
    """The transfer key from its wrapped form; ``KeyUnwrapError`` when it cannot be opened."""
    if not isinstance(wrapped, bytes | bytearray) or len(wrapped) != WRAPPED_KEY_BYTES:
        raise KeyUnwrapError(f"wrapped key must be {WRAPPED_KEY_BYTES} bytes")
    if bytes(wrapped[: len(WRAP_MAGIC)]) != WRAP_MAGIC:
        raise KeyUnwrapError("wrapped key has an unknown format marker")
    if not isinstance(hub_private, bytes | bytearray) or len(hub_private) != X25519_BYTES:
        raise SealError(f"hub private key must be {X25519_BYTES} raw bytes")
    wrapped = bytes(wrapped)
    start = len(WRAP_MAGIC)
    ephemeral_public = wrapped[start : start + X25519_BYTES]
    nonce = wrapped[start + X25519_BYTES : start + X25519_BYTES + NONCE_BYTES]
    body = wrapped[start + X25519_BYTES + NONCE_BYTES :]
    private = X25519PrivateKey.from_private_bytes(bytes(hub_private))
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError as exc:  # e.g. a low-order point gives an all-zero secret
        raise KeyUnwrapError(f"wrapped key has an invalid ephemeral key: {exc}") from None
    kek = _kek(shared, ephemeral_public, _raw_public(private.public_key()), transfer_id)
    try:
        return AESGCM(kek).decrypt(nonce, body, WRAP_MAGIC + _transfer_id_bytes(transfer_id))
    except InvalidTag:
        raise KeyUnwrapError(
            "wrapped key does not open: made for another hub key or another transfer, "
            "or altered"
        ) from None


def seal_bucket(key: bytes, transfer_id: str, index: int, plaintext: bytes) -> bytes:
    """``nonce || ciphertext+tag``: a fresh random nonce per bucket (never reused under a key:
    2^-96 collision odds per pair, and a transfer has few buckets)."""
    _check_key(key)
    aad = bucket_aad(transfer_id, index)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, plaintext, aad)


def open_bucket(key: bytes, transfer_id: str, index: int, sealed: bytes) -> bytes:
    """The plaintext of a sealed bucket, or ``BucketRejected`` if anything does not check."""
    aad = _check_sealed(key, transfer_id, index, sealed)
    sealed = bytes(sealed)
    try:
        return AESGCM(bytes(key)).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise _rejected(transfer_id, index) from None


# What the tag check reads at a time (check_bucket): its memory, whatever the bucket's size.
CHECK_CHUNK_BYTES = 1 << 20


def check_bucket(key: bytes, transfer_id: str, index: int,
                 sealed: bytes | bytearray | memoryview) -> None:
    """``BucketRejected`` unless the sealed bucket authenticates; nothing kept. The hub's PUT
    checks each bucket as it arrives and stores it sealed: :func:`open_bucket` there held the
    bucket three more times at its peak (bytes() of the body, the ciphertext sliced off its
    nonce, the plaintext), 192 MB for a 48 MB bucket. Here the ciphertext streams through
    the decryptor a megabyte at a time and its output is dropped; the tag is checked at the
    end, as AESGCM.decrypt checks it."""
    aad = _check_sealed(key, transfer_id, index, sealed)
    view = memoryview(sealed)
    decryptor = Cipher(algorithms.AES(bytes(key)),
                       modes.GCM(bytes(view[:NONCE_BYTES]), bytes(view[-TAG_BYTES:]))).decryptor()
    decryptor.authenticate_additional_data(aad)
    end = len(view) - TAG_BYTES
    for start in range(NONCE_BYTES, end, CHECK_CHUNK_BYTES):
        decryptor.update(view[start:min(start + CHECK_CHUNK_BYTES, end)])
    try:
        decryptor.finalize()
    except InvalidTag:
        raise _rejected(transfer_id, index) from None


def _check_sealed(key: bytes, transfer_id: str, index: int, sealed: object) -> bytes:
    """The bucket's additional data, once the key and the sealed bytes' shape are checked."""
    _check_key(key)
    aad = bucket_aad(transfer_id, index)
    if not isinstance(sealed, bytes | bytearray | memoryview):
        raise BucketRejected("sealed bucket must be bytes")
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise BucketRejected(
            f"sealed bucket is truncated: {len(sealed)} bytes, at least "
            f"{NONCE_BYTES + TAG_BYTES} expected"
        )
    return aad


def _rejected(transfer_id: str, index: int) -> BucketRejected:
    return BucketRejected(
        f"bucket {index} of transfer {transfer_id} fails authentication: tampered, "
        "truncated, sealed under another key, or replayed from another transfer or index")
