"""Prefix hashes: a documented, stable, chained function of full blocks (a wire contract)."""
from __future__ import annotations

import hashlib
import struct

import pytest

from engine.kv_cache.prefix_hash import ROOT_HASH, block_hash, chain_hashes
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4


def reference_hash(parent: int, token_ids: list[int], salt: bytes = b"") -> int:
    """The module docstring's formula, written out independently of the implementation."""
    data = struct.pack("<Q", parent) + struct.pack(f"<{len(token_ids)}i", *token_ids) + salt
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def test_root_hash_is_zero():
    assert ROOT_HASH == 0


@pytest.mark.parametrize("parent, token_ids, salt", [
    (0, [1, 2, 3, 4], b""),
    (0x9222804E3E39BA2, [5, 6, 7, 8], b""),
    (0, [1, 2, 3, 4], b"tenant-a"),
    (2**64 - 1, [0, 2**31 - 1, 151643, 7], b""),
])
def test_block_hash_follows_the_documented_formula(parent, token_ids, salt):
    assert block_hash(parent, token_ids, salt) == reference_hash(parent, token_ids, salt)


def test_block_hash_values_are_pinned():
    # Protocol constants: the router indexes these exact numbers.
    first = block_hash(ROOT_HASH, [1, 2, 3, 4])
    assert first == 0x9222804E3E39BA2
    assert block_hash(first, [5, 6, 7, 8]) == 0x6A0DC80E40B48E82
    assert block_hash(ROOT_HASH, [1, 2, 3, 4], b"tenant-a") == 0x71619A834A76696F


def test_same_block_under_different_parents_hashes_differently():
    tokens = [9, 9, 9, 9]
    assert block_hash(ROOT_HASH, tokens) != block_hash(12345, tokens)


def test_chain_hashes_chain_each_block_from_its_parent():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    h0 = reference_hash(ROOT_HASH, tokens[0:4])
    h1 = reference_hash(h0, tokens[4:8])
    h2 = reference_hash(h1, tokens[8:12])
    assert chain_hashes(tokens, BS) == [h0, h1, h2]


def test_identical_block_at_different_positions_hashes_differently():
    hashes = chain_hashes([7, 7, 7, 7] * 3, BS)
    assert len(set(hashes)) == 3


def test_different_first_block_changes_every_later_hash():
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)
    b = chain_hashes([1, 2, 3, 99, 5, 6, 7, 8], BS)
    assert a[0] != b[0] and a[1] != b[1]


def test_salt_changes_the_first_block_and_therefore_every_block():
    tokens = list(range(100, 112))
    plain = chain_hashes(tokens, BS)
    salted = chain_hashes(tokens, BS, salt=b"tenant-a")
    assert all(p != s for p, s in zip(plain, salted))
    assert salted != chain_hashes(tokens, BS, salt=b"tenant-b")


def test_salt_is_mixed_into_the_first_block_only():
    tokens = list(range(100, 112))
    salted = chain_hashes(tokens, BS, salt=b"tenant-a")
    assert salted[0] == reference_hash(ROOT_HASH, tokens[0:4], b"tenant-a")
    assert salted[1] == reference_hash(salted[0], tokens[4:8])
    assert salted[2] == reference_hash(salted[1], tokens[8:12])


@pytest.mark.parametrize("salt", [b"", b"tenant-a"])
@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3])
def test_extending_a_prefix_of_hashes_equals_full_recomputation(salt, num_prefix):
    tokens = list(range(50, 63))  # 3 full blocks + 1 token
    full = chain_hashes(tokens, BS, salt)
    assert chain_hashes(tokens, BS, salt, prefix=full[:num_prefix]) == full


def test_only_full_blocks_are_hashed():
    assert chain_hashes([1, 2, 3], BS) == []
    assert len(chain_hashes(list(range(10)), BS)) == 2
    assert len(chain_hashes(list(range(12)), BS)) == 3


def test_partial_tail_does_not_change_full_block_hashes():
    base = list(range(8))
    assert chain_hashes(base + [42, 43], BS) == chain_hashes(base, BS)


def test_request_block_hashes_extend_as_output_tokens_arrive():
    req = Request("r", list(range(200, 206)), SamplingParams(), cache_salt=b"s")
    assert req.block_hashes(BS) == chain_hashes(req.all_token_ids, BS, b"s")
    for token in (1, 2, 3):
        req.append_output(token)
    assert len(req.block_hashes(BS)) == 2
    assert req.block_hashes(BS) == chain_hashes(req.all_token_ids, BS, b"s")
