"""The router's view of its workers: static and self-registered nodes, health, circuit breaking."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pd.router.index import ResidencyIndex
from pd.router.policy import NodeView

logger = logging.getLogger("pd.router.registry")


@dataclass
class Worker:
    view: NodeView
    health_url: str | None = None      # HTTP health endpoint (decode nodes, registered prefill nodes)
    registered: bool = False           # streams events (else: static, probed only)
    last_seen: float = 0.0
    failures: int = 0
    open_until: float = 0.0            # circuit breaker: skipped until then
    block_size: int = 16


class Registry:
    def __init__(self, index: ResidencyIndex, heartbeat_timeout_s: float = 3.0):
        self.index = index
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers: dict[str, Worker] = {}

    def add_static(self, role: str, address: str) -> Worker:
        url = address if address.startswith("http") else (f"http://{address}" if role == "decode" else address)
        w = Worker(NodeView(node_id=url, role=role, address=url, healthy=False),
                   health_url=f"{url}/health" if role == "decode" else None)
        self.workers[w.view.node_id] = w
        return w

    def register(self, node_id: str, role: str, address: str, health_url: str, block_size: int,
                 num_blocks: int) -> Worker:
        w = self.workers.get(node_id)
        if w is None:
            # a static entry for the same address becomes this registered worker
            for key, other in list(self.workers.items()):
                if other.view.address == address and other.view.role == role:
                    del self.workers[key]
                    self.index.purge(key)
            w = Worker(NodeView(node_id=node_id, role=role, address=address))
            self.workers[node_id] = w
        w.registered, w.health_url, w.block_size = True, health_url or None, block_size
        w.view.num_blocks = max(num_blocks, 1)
        self.seen(node_id)
        logger.info("%s node %s registered (%s)", role, node_id, address)
        return w

    def seen(self, node_id: str, mark_up: bool = True) -> None:
        """A message from the node; mark_up=False while its index state is not yet rebuilt."""
        w = self.workers.get(node_id)
        if w is not None:
            w.last_seen = time.monotonic()
            if mark_up and not w.view.healthy:
                self.mark_up(node_id)

    def is_up(self, node_id: str) -> bool:
        w = self.workers.get(node_id)
        return w is not None and w.view.healthy

    def remove(self, node_id: str, reason: str) -> None:
        if self.workers.pop(node_id, None) is not None:
            self.index.purge(node_id)
            logger.info("node %s left: %s", node_id, reason)

    def mark_down(self, node_id: str, reason: str) -> None:
        w = self.workers.get(node_id)
        if w is None:
            return
        w.failures += 1
        w.open_until = time.monotonic() + min(0.5 * 2 ** (w.failures - 1), 10.0)
        if w.view.healthy:
            logger.warning("node %s marked down: %s", node_id, reason)
        w.view.healthy = False
        self.index.purge(node_id)

    def mark_up(self, node_id: str) -> None:
        w = self.workers.get(node_id)
        if w is not None and not w.view.healthy:
            logger.info("node %s is up", node_id)
            w.view.healthy = True
        if w is not None:
            w.failures = 0
            w.open_until = 0.0

    def expire_silent(self) -> None:
        now = time.monotonic()
        for node_id, w in list(self.workers.items()):
            if w.registered and w.view.healthy and now - w.last_seen > self.heartbeat_timeout_s:
                self.mark_down(node_id, f"no heartbeat for {now - w.last_seen:.1f} s")

    def usable(self, role: str, exclude: set[str] = frozenset()) -> list[NodeView]:
        now = time.monotonic()
        return [w.view for w in self.workers.values()
                if w.view.role == role and w.view.healthy and w.open_until <= now and w.view.node_id not in exclude]

    def views(self, role: str) -> list[NodeView]:
        return [w.view for w in self.workers.values() if w.view.role == role]

    @property
    def block_size(self) -> int:
        sizes = {w.block_size for w in self.workers.values() if w.registered}
        return sizes.pop() if len(sizes) == 1 else 16
