"""KV transfer benchmark: raw TCP, the gRPC transport, the shared-memory transport, memcpy.

    python bench/bench_transfer.py [--threads 2] [--tokens 512 2048 8192] [--repeats 25]

KV of the bundled model's shape (30 layers, 3 kv heads, head_dim 64, bfloat16: 23,040
bytes per token) moves from a "prefill" process to this "decode" process:
  raw TCP  loopback socket, 1 MiB sends, received with recv_into a preallocated buffer
  gRPC     a grpc.aio server answering PrefillService.PrefillStream with all layers ready,
           packed as PrefillServicer packs them (kv_frames.kv_messages: messages of up to 2 MiB
           or 4 MiB, short layers batched in KVBatch); the client sends each request on an
           idle long-lived call (kv_stream.StreamPool, as the decode node does), reads raw
           responses (kv_frames.read_kv_message, no protobuf copy) up to Done and
           decode_kv_into a preallocated pool; "call" opens one Prefill call per transfer
           instead (protocol v2's way); "raw" streams the same 2 MiB messages, packed once
           beforehand, on a PrefillStream call and reads them without decoding: gRPC's own
           ceiling here
  shm      the prefill process writes a paged pool in a SharedKVBuffer; this process
           attaches and copies the request's blocks into its own pool, layer by layer,
           with kv_copy.KVCopyPlan (the decode node's local-transport copy). Block tables:
           "fresh" from the BlockPools of freshly started nodes (the ratio uses this),
           "churn" from BlockPools after a long mixed workload, "random" the worst case
  memcpy   C memcpy of the same number of bytes between two preallocated buffers, one thread
           (as the shm copy runs: on the transfer thread, leaving the cores to the engine);
           "copy_ Nt" is torch's copy_ with --threads threads, for reference
Every figure is the median of --repeats runs after a warm-up; the runs of all transports
are interleaved so that a busy machine slows them alike (25 by default: a 512-token TCP
transfer lasts ~3 ms, and its median over 9 runs still moved by a third between runs of
this script). Targets: gRPC >= 50% of raw TCP, shm >= 50% of memcpy.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import multiprocessing as mp
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable

import torch
from transfer_shm import BLOCK_SIZE, block_tables, shm_copy  # bench/, beside this script

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 30, 3, 64, torch.bfloat16
BYTES_PER_TOKEN = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
LAYER_BYTES_PER_TOKEN = 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize  # one KVChunk: k and v
MESSAGE_SIZES = (2 << 20, 4 << 20)
SEND_SIZE = 1 << 20
BACK_TO_BACK = 4
MB = 1e6
GRPC_OPTIONS = [("grpc.max_receive_message_length", 16 << 20),
                ("grpc.max_send_message_length", 16 << 20)]


def pool_shape(num_blocks: int) -> tuple[int, ...]:
    """A KVPool's [layer, k/v, slot, kv_heads, head_dim]."""
    return (NUM_LAYERS, 2, num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


def median_times(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median wall seconds over `repeats` calls of each function, after one warm-up call
    each (page faults, connections, caches). The rounds go over all functions in turn, so
    a busy machine slows them alike; the median is not swayed by the one lucky or unlucky
    run that a best-of or a mean would keep."""
    for fn in runs.values():
        fn()
    walls: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - start)
    return {name: statistics.median(walls[name]) for name in runs}


# ---- the prefill-side process ----------------------------------------------------------------

def _serve_tcp(listener: socket.socket) -> None:
    payload = memoryview(bytearray(SEND_SIZE))
    while True:
        conn, _ = listener.accept()
        with conn:
            header = conn.recv(8, socket.MSG_WAITALL)
            if len(header) < 8:
                continue
            (remaining,) = struct.unpack("<Q", header)
            while remaining:
                n = min(remaining, SEND_SIZE)
                conn.sendall(payload[:n])
                remaining -= n


def _prefill_handlers(kv: torch.Tensor):
    """PrefillService.Prefill and PrefillStream streaming the KV of len(token_ids) tokens,
    then Done. request_id is "<max message bytes>/<fast|raw>": fast packs with
    kv_frames.kv_messages as PrefillServicer does, raw streams the same messages packed
    once beforehand (gRPC's own ceiling)."""
    import grpc
    from pd._generated import prefill_pb2 as pb
    from pd.transport.kv_frames import kv_messages

    packed: dict[tuple[int, int], list[bytes]] = {}

    async def prefill(request, context):
        max_bytes, mode = request.request_id.split("/")
        num_tokens, count = len(request.token_ids), 0
        pieces = [(layer, 0, kv[layer, 0, :num_tokens], kv[layer, 1, :num_tokens]) for layer in range(NUM_LAYERS)]
        messages = kv_messages(pieces, request.wire_dtype, int(max_bytes))  # what PrefillServicer sends
        if mode == "raw":  # packed once, on the warm-up transfer
            key = (num_tokens, int(max_bytes))
            if key not in packed:
                packed[key] = list(messages)
            messages = packed[key]
        for message in messages:
            count += 1
            yield message
        done = pb.PrefillDone(num_tokens=num_tokens, num_kv_messages=count)
        yield pb.PrefillMessage(done=done).SerializeToString()

    async def prefill_stream(requests, context):
        async for request in requests:
            async for message in prefill(request, context):
                yield message

    return grpc.method_handlers_generic_handler("pd.v1.PrefillService", {
        "Prefill": grpc.unary_stream_rpc_method_handler(
            prefill, request_deserializer=pb.PrefillRequest.FromString, response_serializer=None),
        "PrefillStream": grpc.stream_stream_rpc_method_handler(
            prefill_stream, request_deserializer=pb.PrefillRequest.FromString, response_serializer=None)})


def prefill_process(conn, max_tokens: int, threads: int) -> None:
    import grpc
    from pd.transport.shm import SharedKVBuffer
    from engine.memory import tune_malloc

    tune_malloc()
    torch.set_num_threads(threads)
    num_blocks = 2 * max_tokens // BLOCK_SIZE  # room for the request twice over
    shm = SharedKVBuffer.create(BYTES_PER_TOKEN * num_blocks * BLOCK_SIZE, name_prefix="pdbench")
    kv = shm.tensor(DTYPE).view(pool_shape(num_blocks))
    for layer in kv:  # the "prefill" writes its KV
        layer.copy_(torch.randn(layer.shape, dtype=torch.float32))
    del layer

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_serve_tcp, args=(listener,), daemon=True).start()

    handler = _prefill_handlers(kv)

    async def serve(handler=handler) -> None:  # a grpc.aio server, as pd-prefill runs
        server = grpc.aio.server(options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send((shm.name, shm.size, grpc_port, listener.getsockname()[1]))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the benchmark is done
        await server.stop(grace=None)

    asyncio.run(serve())
    del serve, handler, kv  # the handler holds views of the pool
    shm.close()


# ---- the decode side: one transfer per function -----------------------------------------------

def raw_tcp_receive(port: int, num_bytes: int) -> Callable[[], None]:
    buf = memoryview(bytearray(SEND_SIZE))

    def receive() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(struct.pack("<Q", num_bytes))
            remaining = num_bytes
            while remaining:
                n = sock.recv_into(buf, min(remaining, SEND_SIZE))
                if n == 0:
                    raise ConnectionError("raw TCP sender closed early")
                remaining -= n

    return receive


class _OneCall:
    """A new Prefill call per transfer, shaped like the KVStream the decode node reads."""
    reused = False

    def __init__(self, call, owner):
        self.call, self.owner = call, owner

    def __iter__(self):
        return iter(self.call)

    def cancel(self, owner=None) -> None:
        self.call.cancel()


def grpc_receive(channel, streams, pool, block_ids: list[int], num_tokens: int, max_message_bytes: int,
                 per_call: bool = False) -> Callable[[], None]:
    """One transfer received by the decode node's own code, DecodeConnector._stream: the
    request goes out on an idle PrefillStream call of `streams` (or a new Prefill call
    per transfer), KV is read in place from the raw responses and written into the pool
    slots of block_ids, up to Done."""
    from types import SimpleNamespace
    from pd._generated import prefill_pb2 as pb
    from pd.decode.pd_connector import DecodeConnector, PDPolicy, Transfer

    request = pb.PrefillRequest(request_id=f"{max_message_bytes}/fast", token_ids=range(num_tokens),
                                transport="grpc", wire_dtype="")
    prefill = channel.unary_stream("/pd.v1.PrefillService/Prefill",
                                   request_serializer=pb.PrefillRequest.SerializeToString,
                                   response_deserializer=None)
    if per_call:
        peer = SimpleNamespace(start_transfer=lambda m, owner, fresh: _OneCall(prefill(m), owner),
                               end_transfer=lambda stream, complete: None)
    else:
        peer = SimpleNamespace(start_transfer=lambda m, owner, fresh: streams.acquire(channel, m, owner, fresh),
                               end_transfer=streams.release)
    peer.local_pool, peer.transport, peer.address = None, "grpc", "bench"
    connector = DecodeConnector([], PDPolicy())
    connector.register_kv_pool(pool, {})
    token_ids = list(range(num_tokens))

    def receive() -> None:
        connector._stream(Transfer("bench", peer, token_ids, 0, block_ids, request, False))

    return receive


def grpc_raw_receive(channel, streams, num_tokens: int) -> Callable[[], None]:
    """gRPC alone: 2 MiB messages packed beforehand on a PrefillStream call, nothing decoded."""
    from pd._generated import prefill_pb2 as pb

    request = pb.PrefillRequest(request_id=f"{MESSAGE_SIZES[0]}/raw", token_ids=range(num_tokens))
    done_tag = pb.PrefillMessage(done=pb.PrefillDone(num_tokens=1)).SerializeToString()[:1]

    def receive() -> None:
        stream = streams.acquire(channel, request, owner=receive)
        for data in stream:
            if data[:1] == done_tag:
                break
        streams.release(stream, reusable=True)

    return receive


def measure_size(num_tokens: int, channel, streams, tcp_port: int, src_pool: torch.Tensor, dst_pool: torch.Tensor,
                 grpc_pool, mem: tuple[torch.Tensor, torch.Tensor], repeats: int) -> dict:
    from engine.kv_cache.block_pool import BlockPool

    num_bytes = num_tokens * BYTES_PER_TOKEN
    tables = block_tables(num_tokens, src_pool.shape[2] // BLOCK_SIZE, dst_pool.shape[2] // BLOCK_SIZE)
    grpc_blocks = BlockPool(grpc_pool.layout.num_blocks).allocate(num_tokens // BLOCK_SIZE)
    shm_runs = {f"shm_{name}": shm_copy(src_pool, dst_pool, *ids, num_tokens) for name, ids in tables.items()}
    runs = {"tcp": raw_tcp_receive(tcp_port, num_bytes),
            **{f"grpc{m >> 20}M": grpc_receive(channel, streams, grpc_pool, grpc_blocks, num_tokens, m)
               for m in MESSAGE_SIZES},
            "call": grpc_receive(channel, streams, grpc_pool, grpc_blocks, num_tokens, MESSAGE_SIZES[0], per_call=True),
            "grpc_raw": grpc_raw_receive(channel, streams, num_tokens),
            "tcp_b2b": back_to_back(raw_tcp_receive(tcp_port, num_bytes)),
            "grpc_b2b": back_to_back(grpc_receive(channel, streams, grpc_pool, grpc_blocks, num_tokens,
                                                  MESSAGE_SIZES[0])),
            "memcpy": lambda: ctypes.memmove(mem[1].data_ptr(), mem[0].data_ptr(), num_bytes),
            "copy_": lambda: mem[1][:num_bytes].copy_(mem[0][:num_bytes]),
            **shm_runs}
    times = median_times(runs, repeats)
    for name, (src_ids, dst_ids) in tables.items():  # each table overwrites the others' blocks
        shm_runs[f"shm_{name}"]()
        pos = torch.arange(num_tokens)
        src = torch.tensor(src_ids)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        dst = torch.tensor(dst_ids)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        assert torch.equal(dst_pool[:, :, dst], src_pool[:, :, src]), f"shm copy ({name} tables) is wrong"
    pos = torch.arange(num_tokens)
    slots = torch.tensor(grpc_blocks)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    assert torch.equal(grpc_pool.data[:, :, slots], src_pool[:, :, :num_tokens]), "gRPC copy is wrong"
    return {"tokens": num_tokens, "bytes": num_bytes,
            **{name: num_bytes * (BACK_TO_BACK if name.endswith("_b2b") else 1) / wall / MB
               for name, wall in times.items()}}


def back_to_back(receive: Callable[[], None]) -> Callable[[], None]:
    """BACK_TO_BACK transfers in a row, as a busy decode node receives them."""
    def receive_all() -> None:
        for _ in range(BACK_TO_BACK):
            receive()
    return receive_all


# ---- report -----------------------------------------------------------------------------------

def verdict(ratio: float) -> str:
    return "PASS" if ratio >= 0.5 else "FAIL"


def print_table(rows: list[dict], repeats: int, threads: int) -> None:
    print(f"\nKV transfer, {BYTES_PER_TOKEN:,} bytes/token ({NUM_LAYERS} layers x k,v x {NUM_KV_HEADS} "
          f"heads x {HEAD_DIM} dim x bf16); MB/s (1e6 bytes/s), median of {repeats}")
    head = (f"{'tokens':>6} {'MB':>6} | {'TCP':>6} {'raw':>6} {'gRPC 2M':>7} {'gRPC 4M':>7} {'call 2M':>7} "
            f"{'gRPC/TCP':>8} {'>=50%':>5} | {f'x{BACK_TO_BACK}: TCP':>8} {'gRPC 2M':>7} {'gRPC/TCP':>8} {'>=50%':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        g_ratio = max(r[f"grpc{m >> 20}M"] for m in MESSAGE_SIZES) / r["tcp"]
        b_ratio = r["grpc_b2b"] / r["tcp_b2b"]
        print(f"{r['tokens']:>6} {r['bytes'] / MB:>6.1f} | {r['tcp']:>6.0f} {r['grpc_raw']:>6.0f} {r['grpc2M']:>7.0f} "
              f"{r['grpc4M']:>7.0f} {r['call']:>7.0f} {g_ratio:>8.0%} {verdict(g_ratio):>5} | "
              f"{r['tcp_b2b']:>8.0f} {r['grpc_b2b']:>7.0f} {b_ratio:>8.0%} {verdict(b_ratio):>5}")
    totals = {m: sum(r["bytes"] / r[f"grpc{m >> 20}M"] for r in rows) for m in MESSAGE_SIZES}
    print(f"gRPC = DecodeConnector._stream (the decode node's code) on PrefillStream calls kept open between "
          f"transfers; {min(totals, key=totals.get) >> 20} MiB messages took the least total time; call = a "
          f"new Prefill call per transfer; raw = gRPC alone (the same 2 MiB messages packed beforehand, "
          f"nothing decoded): the ceiling for any gRPC transport here; x{BACK_TO_BACK} = {BACK_TO_BACK} transfers "
          "back to back (a busy node), the others one transfer between other work")
    head = (f"{'tokens':>6} {'MB':>6} | {'memcpy':>6} {f'copy_{threads}t':>8} {'fresh':>6} {'churn':>6} "
            f"{'random':>6} {'shm/mem':>7} {'>=50%':>5} {f'/copy_{threads}t':>9} {'churn':>6} {'random':>6}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        s_ratio = r["shm_fresh"] / r["memcpy"]
        print(f"{r['tokens']:>6} {r['bytes'] / MB:>6.1f} | {r['memcpy']:>6.0f} {r['copy_']:>8.0f} "
              f"{r['shm_fresh']:>6.0f} {r['shm_churn']:>6.0f} {r['shm_random']:>6.0f} {s_ratio:>7.0%} "
              f"{verdict(s_ratio):>5} {r['shm_fresh'] / r['copy_']:>9.0%} {r['shm_churn'] / r['memcpy']:>6.0%} "
              f"{r['shm_random'] / r['memcpy']:>6.0%}")
    print(f"memcpy = C memcpy, one thread (the shm copy's own budget); copy_{threads}t = torch copy_ on "
          f"{threads} threads. shm = KVCopyPlan.copy_layer per layer; block tables: fresh = BlockPools "
          "of freshly started nodes (shm/mem uses this), churn = BlockPools after a long mixed workload, "
          "random = worst case. Max gRPC message length 16 MiB; glibc malloc tuned (engine.memory.tune_malloc)")


def run(token_counts: list[int], threads: int, repeats: int) -> list[dict]:
    import grpc
    from engine.kv_cache.kv_pool import KVLayout, KVPool
    from pd.decode.kv_stream import StreamPool
    from pd.transport.shm import SharedKVBuffer
    from engine.memory import tune_malloc

    tune_malloc()
    torch.set_num_threads(threads)
    max_tokens = max(token_counts)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    peer = ctx.Process(target=prefill_process, args=(child_conn, max_tokens, threads), daemon=True)
    peer.start()
    shm_name, shm_size, grpc_port, tcp_port = conn.recv()

    dst_pool = torch.zeros(pool_shape(2 * max_tokens // BLOCK_SIZE), dtype=DTYPE)  # our own pools
    grpc_pool = KVPool(KVLayout(NUM_LAYERS, 2 * max_tokens // BLOCK_SIZE, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, DTYPE))
    num_bytes = BYTES_PER_TOKEN * max_tokens
    mem = torch.ones(num_bytes, dtype=torch.uint8), torch.zeros(num_bytes, dtype=torch.uint8)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=GRPC_OPTIONS)
    streams = StreamPool()
    with SharedKVBuffer.attach(shm_name, shm_size) as shm:
        src_pool = shm.tensor(DTYPE).view(pool_shape(2 * max_tokens // BLOCK_SIZE))
        rows = [measure_size(n, channel, streams, tcp_port, src_pool, dst_pool, grpc_pool, mem, repeats)
                for n in token_counts]
        del src_pool
    streams.close()
    channel.close()
    conn.send("done")
    peer.join(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    if any(n <= 0 or n % BLOCK_SIZE for n in args.tokens):
        parser.error(f"--tokens must be positive multiples of the block size {BLOCK_SIZE}")
    start = time.perf_counter()
    print_table(run(args.tokens, args.threads, args.repeats), args.repeats, args.threads)
    print(f"total {time.perf_counter() - start:.1f} s, {args.threads} torch threads per process")


if __name__ == "__main__":
    main()
