"""Sealing: a bucket opens only with its key, its transfer and its index; the transfer key
unwraps only with the hub's key and for its transfer (invariant 5, docs/protocol.md)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.transfer.pack import PackItem, pack_bucket, plan_buckets, unpack_bucket
from appliance.transfer.seal import (
    NONCE_BYTES,
    TAG_BYTES,
    WRAPPED_KEY_BYTES,
    BucketRejected,
    KeyUnwrapError,
    SealError,
    check_bucket,
    generate_hub_keypair,
    new_transfer_key,
    open_bucket,
    seal_bucket,
    unwrap_key,
    wrap_key,
)
from tests.support.peers import MR_DIR

TRANSFER = "4f9d1c52-1b7e-4a55-9a63-0c2f1f7d3b10"
OTHER = "0b6f4a33-9d0e-4c1b-8f2a-7e5d6c4b3a21"
KEY = bytes(range(32))


def test_real_bucket_seals_opens_and_unpacks_to_the_original_bytes() -> None:
    paths = sorted(MR_DIR.glob("*.dcm"))[:30]
    items = [PackItem(p.name, p, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
             for p in paths]
    plaintext, _ = pack_bucket(plan_buckets(items)[0])
    sealed = seal_bucket(KEY, TRANSFER, 0, plaintext)
    assert len(sealed) == len(plaintext) + NONCE_BYTES + TAG_BYTES
    assert plaintext[:4096] not in sealed
    opened = open_bucket(KEY, TRANSFER, 0, sealed)
    assert opened == plaintext
    rebuilt = {p.sop_instance_uid: p.data for p in unpack_bucket(opened)}
    assert all(hashlib.sha256(rebuilt[i.sop_instance_uid]).hexdigest() == i.sha256
               for i in items)


def test_each_seal_uses_a_fresh_nonce() -> None:
    first = seal_bucket(KEY, TRANSFER, 1, b"same bytes")
    second = seal_bucket(KEY, TRANSFER, 1, b"same bytes")
    assert first[:NONCE_BYTES] != second[:NONCE_BYTES] and first != second


# open_bucket (the archiver: the plaintext) and check_bucket (the hub's PUT: the tag alone,
# streamed a megabyte at a time) refuse the same buckets.
OPENERS = [open_bucket, check_bucket]


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize(("size", "where"), [
    (100, 0), (100, NONCE_BYTES), (100, NONCE_BYTES + 5), (100, -1), (0, -1),
    (5 << 19, NONCE_BYTES + (3 << 19)),  # in the second megabyte of check_bucket's reads
])
def test_one_flipped_byte_anywhere_is_rejected(opener: Callable[..., object], size: int,
                                               where: int) -> None:
    sealed = bytearray(seal_bucket(KEY, TRANSFER, 2, b"x" * size))
    sealed[where] ^= 0x01
    with pytest.raises(BucketRejected, match="fails authentication"):
        opener(KEY, TRANSFER, 2, bytes(sealed))


@pytest.mark.parametrize("opener", OPENERS)
def test_truncated_replayed_and_wrong_key_buckets_are_rejected(
        opener: Callable[..., object]) -> None:
    sealed = seal_bucket(KEY, TRANSFER, 3, b"payload" * 50)
    with pytest.raises(BucketRejected, match="fails authentication"):
        opener(KEY, TRANSFER, 3, sealed[:-1])
    with pytest.raises(BucketRejected, match="truncated"):
        opener(KEY, TRANSFER, 3, sealed[: NONCE_BYTES + TAG_BYTES - 1])
    with pytest.raises(BucketRejected, match="bucket 4 of transfer"):
        opener(KEY, TRANSFER, 4, sealed)  # replayed at another index
    with pytest.raises(BucketRejected, match=OTHER):
        opener(KEY, OTHER, 3, sealed)  # replayed into another transfer
    with pytest.raises(BucketRejected):
        opener(new_transfer_key(), TRANSFER, 3, sealed)
    assert open_bucket(KEY, TRANSFER, 3, sealed) == b"payload" * 50
    assert check_bucket(KEY, TRANSFER, 3, bytearray(sealed)) is None  # type: ignore[func-returns-value]
    big = seal_bucket(KEY, TRANSFER, 5, os.urandom(5 << 19))  # several reads, the tag at the end
    assert check_bucket(KEY, TRANSFER, 5, big) is None  # type: ignore[func-returns-value]


def test_bad_arguments_are_clear_value_errors() -> None:
    with pytest.raises(SealError, match="32 bytes"):
        seal_bucket(b"short", TRANSFER, 0, b"")
    with pytest.raises(SealError, match="non-negative"):
        seal_bucket(KEY, TRANSFER, -1, b"")
    with pytest.raises(SealError, match="transfer id"):
        seal_bucket(KEY, "", 0, b"")
    with pytest.raises(SealError, match="transfer id"):
        open_bucket(KEY, "a|1", 0, b"\0" * 40)  # '|' would make the AAD ambiguous


def test_transfer_key_unwraps_only_for_its_hub_and_transfer() -> None:
    hub_private, hub_public = generate_hub_keypair()
    other_private, _ = generate_hub_keypair()
    key = new_transfer_key()
    assert len(key) == 32 and key != new_transfer_key()
    wrapped = wrap_key(key, hub_public, TRANSFER)
    assert len(wrapped) == WRAPPED_KEY_BYTES and key not in wrapped
    assert wrap_key(key, hub_public, TRANSFER) != wrapped  # ephemeral key each time
    assert unwrap_key(wrapped, hub_private, TRANSFER) == key
    with pytest.raises(KeyUnwrapError, match="another hub key or another transfer"):
        unwrap_key(wrapped, other_private, TRANSFER)
    with pytest.raises(KeyUnwrapError, match="another hub key or another transfer"):
        unwrap_key(wrapped, hub_private, OTHER)
    tampered = bytearray(wrapped)
    tampered[-3] ^= 0x40
    with pytest.raises(KeyUnwrapError):
        unwrap_key(bytes(tampered), hub_private, TRANSFER)
    with pytest.raises(KeyUnwrapError, match="must be"):
        unwrap_key(wrapped[:-1], hub_private, TRANSFER)
    with pytest.raises(KeyUnwrapError, match="format marker"):
        unwrap_key(b"XX" + wrapped[2:], hub_private, TRANSFER)
    with pytest.raises(SealError, match="hub public key"):
        wrap_key(key, hub_public[:31], TRANSFER)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), index=st.integers(min_value=0, max_value=10**6))
def test_random_bytes_are_rejected_never_crash(data: bytes, index: int) -> None:
    with pytest.raises(BucketRejected):
        open_bucket(KEY, TRANSFER, index, data)
    hub_private, _ = generate_hub_keypair()
    with pytest.raises(KeyUnwrapError):
        unwrap_key(data, hub_private, TRANSFER)
