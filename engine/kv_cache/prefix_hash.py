"""Stable chained block hashes: the identity of a cached KV block across processes.

    block_hash(parent, tokens, salt) =
        first 8 bytes (little-endian uint64) of BLAKE2b-64 over
        parent.to_bytes(8, "little") || int32-LE token ids || salt

The first block of a sequence uses parent = ROOT_HASH (0). `salt` separates caches that
must never share blocks (e.g. sessions of different API keys); it is empty by default.
Only full blocks are hashed. The router indexes these same values, so this function is
part of the wire contract: changing it is a protocol version change.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from typing import Sequence

ROOT_HASH = 0


def block_hash(parent: int, token_ids: Sequence[int], salt: bytes = b"") -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    ids = array("i", token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    h.update(ids.tobytes())
    if salt:
        h.update(salt)
    return int.from_bytes(h.digest(), "little")


def chain_hashes(token_ids: Sequence[int], block_size: int, salt: bytes = b"",
                 prefix: Sequence[int] = ()) -> list[int]:
    """Hashes of the full blocks of `token_ids`, extending `prefix` (hashes already computed)."""
    hashes = list(prefix)
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = block_hash(parent, token_ids[i * block_size:(i + 1) * block_size],
                            salt if i == 0 else b"")
        hashes.append(parent)
    return hashes
