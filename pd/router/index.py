"""Residency index: which node holds which KV blocks and which sessions.

Keyed by the engines' chained block hashes (engine/kv_cache/prefix_hash.py). A query
walks the request's block hashes in order and follows only the nodes that held every
block so far, so its cost grows with the prefix length and the number of holders, not
with the size of the cluster.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable


class ResidencyIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = defaultdict(set)   # block hash -> node ids
        self._blocks: dict[str, set[int]] = defaultdict(set)    # node id -> block hashes
        self._sessions: dict[str, str] = {}                     # session key -> node id
        self._node_sessions: dict[str, set[str]] = defaultdict(set)

    # ---- updates -----------------------------------------------------------------------
    def stored(self, node: str, hashes: Iterable[int]) -> None:
        mine = self._blocks[node]
        for h in hashes:
            self._holders[h].add(node)
            mine.add(h)

    def removed(self, node: str, hashes: Iterable[int]) -> None:
        mine = self._blocks.get(node)
        if mine is None:
            return
        for h in hashes:
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(node)
                if not holders:
                    del self._holders[h]
            mine.discard(h)

    def session_resident(self, node: str, key: str) -> None:
        old = self._sessions.get(key)
        if old is not None and old != node:
            self._node_sessions[old].discard(key)
        self._sessions[key] = node
        self._node_sessions[node].add(key)

    def session_evicted(self, node: str, key: str) -> None:
        if self._sessions.get(key) == node:
            del self._sessions[key]
        self._node_sessions[node].discard(key)

    def replace(self, node: str, hashes: Iterable[int], sessions: Iterable[str]) -> None:
        """A node's full state (after a resync) replaces everything known about it."""
        self.purge(node)
        self.stored(node, hashes)
        for key in sessions:
            self.session_resident(node, key)

    def purge(self, node: str) -> None:
        self.removed(node, list(self._blocks.get(node, ())))
        self._blocks.pop(node, None)
        for key in self._node_sessions.pop(node, set()):
            if self._sessions.get(key) == node:
                del self._sessions[key]

    # ---- queries -------------------------------------------------------------------------
    def match(self, hashes: list[int], nodes: Iterable[str] | None = None) -> dict[str, int]:
        """Leading blocks of `hashes` held by each node (nodes holding none are omitted)."""
        if not hashes:
            return {}
        first = self._holders.get(hashes[0])
        if not first:
            return {}
        alive = first & set(nodes) if nodes is not None else set(first)
        matched: dict[str, int] = {}
        depth = 1
        for h in hashes[1:]:
            holders = self._holders.get(h)
            if not holders:
                break
            if not alive <= holders:  # some nodes stop here: record their depth
                for node in alive - holders:
                    matched[node] = depth
                alive &= holders
                if not alive:
                    break
            depth += 1
        for node in alive:
            matched[node] = depth
        return matched

    def session_node(self, key: str) -> str | None:
        return self._sessions.get(key)

    def node_blocks(self, node: str) -> set[int]:
        return set(self._blocks.get(node, ()))

    def node_sessions(self, node: str) -> set[str]:
        return set(self._node_sessions.get(node, ()))

    @property
    def num_entries(self) -> int:
        return sum(len(v) for v in self._blocks.values())
