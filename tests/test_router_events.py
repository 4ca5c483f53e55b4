"""The router's worker event stream, in process: a real RouterReporter on a real (tiny) engine
streams block/session events to the router's RouterEventService, and the router's residency
index for that node must equal the engine's true state, also after a forced gap (resync).

The router side runs on an asyncio loop in a background thread (grpc.aio), exactly the
service pd-router serves; the tests read its Registry/ResidencyIndex on that loop. A small
KV pool (NUM_BLOCKS) makes generation evict cached blocks and sessions, so "removed" and
"evicted" events are exercised too. Hand-driven gRPC clients play workers that go silent,
drop their stream, or speak before registering.
"""
from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from typing import Any, Callable

import grpc
import pytest

from engine.api import EngineBuilder, ModelRepo, SamplingParams
from engine.async_engine import AsyncEngine
from pd._generated import router_pb2 as rpb
from pd._generated import router_pb2_grpc as rpb_grpc
from pd.router.events import RouterEventService
from pd.router.index import ResidencyIndex
from pd.router.registry import Registry
from pd.router.reporter import RouterReporter
from server_utils import wait_for
from tiny_models import build_tiny_model_dir

NUM_BLOCKS = 24            # 16-token blocks: a few prompts fill the pool, later ones evict
HEARTBEAT_S = 0.2          # the real reporter's heartbeat
SILENCE_TIMEOUT_S = 1.0    # the router's heartbeat timeout (registry.expire_silent)
NODE_ID = "decode-test-node"
EVER_CACHED: set[int] = set()   # every block hash the engine ever cached (its own block pool listener)


# ---- the router, on its own event loop ------------------------------------------------------

class RouterThread:
    def __init__(self, heartbeat_timeout_s: float):
        self.index = ResidencyIndex()
        self.registry = Registry(self.index, heartbeat_timeout_s=heartbeat_timeout_s)
        self.service = RouterEventService(self.registry)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="router-loop", daemon=True)
        self.thread.start()
        self.port = self.run(self._start())

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        rpb_grpc.add_RouterServiceServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """fn() on the router's loop (a consistent read of registry and index)."""
        async def call():
            return fn()
        return self.run(call())

    def node(self, node_id: str) -> dict | None:
        def read():
            w = self.registry.workers.get(node_id)
            if w is None:
                return None
            return {"healthy": w.view.healthy, "registered": w.registered,
                    "blocks": self.index.node_blocks(node_id), "sessions": self.index.node_sessions(node_id),
                    "num_blocks": w.view.num_blocks}
        return self.on_loop(read)

    def stop(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def router():
    r = RouterThread(SILENCE_TIMEOUT_S)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path, _ = build_tiny_model_dir("llama", tmp_path_factory.mktemp("router-events"))
    llm = (EngineBuilder(ModelRepo.dir(str(path))).dtype("float32")
           .scheduler(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256)
           .cache(num_blocks_override=NUM_BLOCKS).build_llm_engine())
    llm.block_pool.listeners.append(lambda kind, hashes: EVER_CACHED.update(hashes))
    eng = AsyncEngine(llm).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reporter(router, engine):
    info = rpb.WorkerInfo(node_id=NODE_ID, role="decode", address="http://127.0.0.1:1",
                          block_size=engine.engine.kv.block_size, model="tiny", num_blocks=NUM_BLOCKS,
                          health_url="http://127.0.0.1:1/health")
    rep = RouterReporter(router.address, info, engine, heartbeat_s=HEARTBEAT_S).start()
    assert rep.connected.wait(10), "the reporter never connected"
    wait_for(lambda: (router.node(NODE_ID) or {}).get("healthy"), what="the node to register")
    yield rep
    rep.stop("module teardown")


# ---- helpers ---------------------------------------------------------------------------------------

def prompts(seed: int, n: int, length: int, vocab: int, shared: list[int] | None = None) -> list[list[int]]:
    r = random.Random(seed)
    head = list(shared or [])
    return [head + [r.randrange(4, vocab) for _ in range(length - len(head))] for _ in range(n)]


def generate(engine: AsyncEngine, batch: list[list[int]], session_keys: list[str | None] | None = None,
             max_tokens: int = 8) -> list:
    keys = session_keys or [None] * len(batch)

    async def one(ids, key):
        req = engine.make_request(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                  session_key=key)
        last = None
        async for out in engine.generate(req):
            last = out
        assert last is not None and last.finished
        return last

    async def everything():
        return await asyncio.gather(*(one(p, k) for p, k in zip(batch, keys)))

    return asyncio.run(everything())


def truth(engine: AsyncEngine) -> tuple[set[int], set[str]]:
    """The worker's real state, read on the engine thread once it is idle (a finished session
    request is stored one step after its last token is delivered)."""
    def read(llm):
        if llm.has_unfinished_requests():
            return None
        return set(llm.block_pool.cached_hashes()), set(llm.scheduler.sessions.sessions)
    return wait_for(lambda: engine.call_sync(read, timeout=10), 10, "the engine to be idle")


def assert_index_converges(router: RouterThread, engine: AsyncEngine, node_id: str = NODE_ID,
                           timeout: float = 10.0) -> tuple[set[int], set[str]]:
    """Waits until the router's index for node_id equals the engine's state; returns that state."""
    last: dict = {}

    def same():
        blocks, sessions = truth(engine)
        seen = router.node(node_id) or {}
        last.update(truth_blocks=blocks, truth_sessions=sessions, router=seen)
        return seen.get("blocks") == blocks and seen.get("sessions") == sessions

    try:
        wait_for(same, timeout, "the router's index to match the engine")
    except AssertionError:
        r = last.get("router", {})
        tb, rb = last.get("truth_blocks", set()), r.get("blocks", set())
        raise AssertionError(f"index diverged: {len(tb - rb)} blocks missing, {len(rb - tb)} stale; sessions "
                             f"engine {sorted(last.get('truth_sessions', ()))} router {sorted(r.get('sessions', ()))}")
    return last["truth_blocks"], last["truth_sessions"]


def vocab(engine: AsyncEngine) -> int:
    return engine.engine.config.model.vocab_size


class FakeWorker:
    """A hand-driven event stream (sync gRPC): send() queues a message, close() half-closes."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self._out: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.call = rpb_grpc.RouterServiceStub(self.channel).Connect(self._requests())
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self):
        while True:
            msg = self._out.get()
            if msg is None:
                return
            yield msg

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.replies.put(msg)
        except grpc.RpcError as exc:
            self.error = exc

    def send(self, **payload) -> None:
        self._out.put(rpb.WorkerMessage(**payload))

    def register(self, node_id: str, address: str, hashes: list[int], sessions: list[str]) -> None:
        self.send(seq=1, register=rpb.WorkerInfo(node_id=node_id, role="decode", address=address, block_size=16,
                                                 num_blocks=100, health_url=address + "/health"))
        self.send(seq=2, full_state=rpb.FullState(hashes=hashes, sessions=sessions,
                                                  load=rpb.LoadReport(num_free_blocks=97, num_blocks=100)))

    def close(self) -> None:
        self._out.put(None)

    def cancel(self) -> None:
        self.call.cancel()
        self.channel.close()


# ---- tests -------------------------------------------------------------------------------------------

def test_index_follows_stores_and_evictions(router, engine, reporter):
    v = vocab(engine)
    # 10 distinct 80-token prompts (5 full blocks each) through a 24-block pool: evictions
    for group in range(3):
        generate(engine, prompts(group, 3 if group < 2 else 4, 80, v))
    assert engine.engine.block_pool.num_evictions > 0, "the pool never evicted: the test needs a smaller pool"
    blocks, _ = assert_index_converges(router, engine)
    assert blocks, "nothing cached"
    assert router.service.num_resyncs == 0
    node = router.node(NODE_ID)
    assert node["healthy"] and node["registered"] and node["num_blocks"] == NUM_BLOCKS


def test_index_follows_sessions_and_their_eviction(router, engine, reporter):
    v = vocab(engine)
    shared = prompts(100, 1, 48, v)[0]
    keys = ["anon:chat-a", "anon:chat-b"]
    generate(engine, prompts(101, 2, 64, v, shared), keys)
    _, sessions = assert_index_converges(router, engine)
    assert sessions == set(keys)
    assert router.on_loop(lambda: [router.index.session_node(k) for k in keys]) == [NODE_ID, NODE_ID]
    # long session prompts under KV pressure: older sessions are evicted
    evicted_before = engine.engine.scheduler.sessions.num_evicted
    generate(engine, prompts(102, 1, 150, v), ["anon:chat-c"])
    generate(engine, prompts(103, 1, 150, v), ["anon:chat-d"])
    assert engine.engine.scheduler.sessions.num_evicted > evicted_before
    _, sessions = assert_index_converges(router, engine)
    assert "anon:chat-d" in sessions and not set(keys) <= sessions


def test_gap_forces_resync_and_index_matches_engine(router, engine, reporter):
    v = vocab(engine)
    resyncs = router.service.num_resyncs
    reporter.drop_next_events(3)
    generate(engine, prompts(200, 3, 80, v), ["anon:after-gap", None, None])
    generate(engine, prompts(201, 3, 72, v))
    wait_for(lambda: router.service.num_resyncs > resyncs, 10, "the router to ask for a resync")
    blocks, sessions = assert_index_converges(router, engine)
    assert blocks and "anon:after-gap" in sessions
    # a second gap in the middle of more traffic: still consistent afterwards
    resyncs = router.service.num_resyncs
    reporter.drop_next_events(1)
    generate(engine, prompts(202, 4, 64, v))
    wait_for(lambda: router.service.num_resyncs > resyncs, 10, "a second resync")
    assert_index_converges(router, engine)
    assert router.node(NODE_ID)["healthy"]


def test_register_must_come_first(router):
    w = FakeWorker(router.address)
    w.send(seq=1, load=rpb.LoadReport(num_blocks=1))
    wait_for(lambda: w.error is not None, 5, "the stream to be refused")
    assert w.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    w.cancel()


def test_silent_worker_is_marked_down_and_purged(router, reporter):
    w = FakeWorker(router.address)
    w.register("silent-node", "http://127.0.0.1:2", [11, 22, 33], ["anon:quiet"])
    wait_for(lambda: (router.node("silent-node") or {}).get("blocks") == {11, 22, 33}, what="the fake node's state")
    time.sleep(SILENCE_TIMEOUT_S + 0.3)
    router.on_loop(router.registry.expire_silent)
    node = router.node("silent-node")
    assert node is not None and not node["healthy"]
    assert node["blocks"] == set() and node["sessions"] == set()
    assert router.on_loop(lambda: router.index.session_node("anon:quiet")) is None
    assert "silent-node" not in {v.node_id for v in router.on_loop(lambda: router.registry.usable("decode"))}
    # the real reporter heartbeats: it is not expired with the silent one
    assert router.node(NODE_ID)["healthy"]
    w.cancel()


def test_worker_back_from_silence_is_resynced_before_it_is_routable(router):
    w = FakeWorker(router.address)
    w.register("flaky-node", "http://127.0.0.1:3", [44, 55], ["anon:flaky"])
    wait_for(lambda: (router.node("flaky-node") or {}).get("blocks") == {44, 55}, what="the fake node's state")
    time.sleep(SILENCE_TIMEOUT_S + 0.3)
    router.on_loop(router.registry.expire_silent)
    assert not router.node("flaky-node")["healthy"]
    w.send(seq=3, load=rpb.LoadReport(num_free_blocks=98, num_blocks=100))   # back, with its blocks still held
    try:
        reply = w.replies.get(timeout=1.0)
    except queue.Empty:
        reply = None
    node = router.node("flaky-node")
    w.cancel()
    # routable again only with a correct index: either it stays down, or the router asked for its full state
    assert not node["healthy"] or (reply is not None and reply.WhichOneof("payload") == "resync")




def held_by(router: RouterThread, node_id: str, hashes: set[int]) -> set[int]:
    """The hashes the index's query side (match) says node_id holds."""
    return router.on_loop(lambda: {h for h in hashes if node_id in router.index.match([h])})


def test_after_a_resync_match_sees_only_the_engines_blocks(router, engine, reporter):
    v = vocab(engine)
    before, _ = assert_index_converges(router, engine)
    resyncs = router.service.num_resyncs
    reporter.drop_next_events(2)
    generate(engine, prompts(300, 4, 80, v))
    wait_for(lambda: router.service.num_resyncs > resyncs, 10, "the router to ask for a resync")
    after, _ = assert_index_converges(router, engine)
    assert before - after, "nothing was evicted across the gap"
    assert held_by(router, NODE_ID, EVER_CACHED) == after


@pytest.mark.parametrize("how", ["stream-lost", "deregister"])
def test_a_gone_node_is_out_of_match(router, how):
    node_id, hashes = f"purged-{how}", [88, 99] if how == "deregister" else [888, 999]
    w = FakeWorker(router.address)
    w.register(node_id, f"http://127.0.0.1:{6 if how == 'deregister' else 7}", hashes, [])
    wait_for(lambda: (router.node(node_id) or {}).get("blocks") == set(hashes), what="the fake node's state")
    if how == "deregister":
        w.send(seq=3, deregister=rpb.Deregister(reason="bye"))
        wait_for(lambda: router.node(node_id) is None, 5, "the node to be removed")
    else:
        w.cancel()
        wait_for(lambda: not router.node(node_id)["healthy"], 5, "the node to be marked down")
        assert router.node(node_id)["blocks"] == set()
    found = router.on_loop(lambda: router.index.match(hashes))
    w.cancel()
    assert found == {}


@pytest.mark.parametrize("how", ["cancel", "half-close"])
def test_stream_end_without_deregister_marks_down_and_purges(router, how):
    node_id = f"dropped-{how}"
    w = FakeWorker(router.address)
    w.register(node_id, f"http://127.0.0.1:{4 if how == 'cancel' else 5}", [66, 77], [f"anon:{how}"])
    w.send(seq=3, load=rpb.LoadReport(num_free_blocks=98, num_blocks=100))
    wait_for(lambda: (router.node(node_id) or {}).get("blocks") == {66, 77}, what="the fake node's state")
    w.cancel() if how == "cancel" else w.close()
    wait_for(lambda: not router.node(node_id)["healthy"], 5, "the node to be marked down")
    node = router.node(node_id)
    assert node["blocks"] == set() and node["sessions"] == set()
    assert router.on_loop(lambda: router.index.session_node(f"anon:{how}")) is None
    if how != "cancel":
        w.cancel()


def test_deregister_removes_the_worker(router, engine, reporter):
    assert router.node(NODE_ID)["blocks"]
    reporter.stop("test done")
    wait_for(lambda: router.node(NODE_ID) is None, 5, "the node to be removed")
    assert router.on_loop(lambda: (router.index.node_blocks(NODE_ID), router.index.node_sessions(NODE_ID))) \
        == (set(), set())
