"""KV transfer benchmark: raw TCP, the gRPC transport, the shared-memory transport, memcpy.

    python bench/bench_transfer.py [--threads 2] [--tokens 512 2048 8192] [--repeats 9]

KV of the bundled model's shape (30 layers, 3 kv heads, head_dim 64, bfloat16: 23,040
bytes per token) moves from a "prefill" process to this "decode" process:
  raw TCP  loopback socket, 1 MiB sends, received with recv_into a preallocated buffer
  gRPC     a grpc.aio server streaming PrefillService.Prefill with all layers ready, packed as
           PrefillServicer packs them (kv_frames.kv_messages: messages of up to 1 MiB or 4 MiB,
           short layers batched in KVBatch); "pb" sends one PrefillMessage object per layer
           and range instead; the client reads raw responses as the decode node does
           (kv_frames.read_kv_message, no protobuf copy) and decode_kv_into a preallocated pool
  shm      the prefill process writes a paged pool in a SharedKVBuffer; this process
           attaches and copies the request's blocks into its own pool, layer by layer,
           with kv_copy.KVCopyPlan (the decode node's local-transport copy). Block tables:
           "fresh" from the BlockPools of freshly started nodes (the ratio uses this),
           "churn" from BlockPools after a long mixed workload, "random" the worst case
  memcpy   torch copy_ of the same number of bytes between two preallocated tensors
Every figure is the median of --repeats runs after a warm-up; the runs of all transports
are interleaved so that a busy machine slows them alike. Targets: gRPC >= 50% of raw
TCP, shm >= 50% of memcpy.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable

import torch

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 30, 3, 64, torch.bfloat16
BLOCK_SIZE = 16
BYTES_PER_TOKEN = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
LAYER_BYTES_PER_TOKEN = 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize  # one KVChunk: k and v
MESSAGE_SIZES = (1 << 20, 4 << 20)
SEND_SIZE = 1 << 20
MB = 1e6
GRPC_OPTIONS = [("grpc.max_receive_message_length", 16 << 20),
                ("grpc.max_send_message_length", 16 << 20)]


def pool_shape(num_blocks: int) -> tuple[int, ...]:
    """A KVPool's [layer, k/v, slot, kv_heads, head_dim]."""
    return (NUM_LAYERS, 2, num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """CPU time of every thread of these processes, from the scheduler's ns counters."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # the thread ended meanwhile
    return total / 1e9


def median_times(runs: dict[str, Callable[[], None]], repeats: int,
                 pids: tuple[int, ...]) -> dict[str, tuple[float, float]]:
    """(median wall seconds, mean CPU seconds of both processes) over `repeats` calls of
    each function, after one warm-up call each (page faults, connections, caches). The
    rounds go over all functions in turn, so a busy machine slows them alike; the median
    is not swayed by the one lucky or unlucky run that a best-of or a mean would keep."""
    for fn in runs.values():
        fn()
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpu = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, fn in runs.items():
            cpu_start, start = cpu_seconds(pids), time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - start)
            cpu[name] += (cpu_seconds(pids) - cpu_start) / repeats
    return {name: (statistics.median(walls[name]), cpu[name]) for name in runs}


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


def _prefill_handler(kv: torch.Tensor):
    """PrefillService.Prefill streaming the KV of len(token_ids) tokens. request_id is
    "<max message bytes>/<fast|pb|raw>": fast packs with kv_frames.kv_messages, pb builds
    PrefillMessage objects and calls SerializeToString (what a generated servicer does),
    raw streams the same number of bytes from one prebuilt buffer (gRPC's own ceiling)."""
    import grpc
    from pd._generated import prefill_pb2 as pb
    from pd.transport.kv_frames import kv_messages
    from pd.transport.wire import dtype_name, encode_kv, split_token_ranges

    def pb_message(layer: int, start: int, k: torch.Tensor, v: torch.Tensor, wire_dtype: str) -> bytes:
        k_data, k_scale = encode_kv(k, wire_dtype)
        v_data, v_scale = encode_kv(v, wire_dtype)
        return pb.PrefillMessage(kv=pb.KVChunk(
            layer=layer, start=start, num_tokens=k.shape[0], wire_dtype=wire_dtype or dtype_name(k.dtype),
            k=k_data, v=v_data, k_scale=k_scale, v_scale=v_scale)).SerializeToString()

    raw_payload = bytes(SEND_SIZE)

    async def prefill(request, context):
        max_bytes, serializer = request.request_id.split("/")
        num_tokens, count = len(request.token_ids), 0
        if serializer == "raw":
            remaining = num_tokens * BYTES_PER_TOKEN
            while remaining:
                yield raw_payload[:min(remaining, SEND_SIZE)]
                remaining -= min(remaining, SEND_SIZE)
            return
        if serializer == "fast":  # what PrefillServicer sends when all layers are ready
            pieces = [(layer, 0, kv[layer, 0, :num_tokens], kv[layer, 1, :num_tokens]) for layer in range(NUM_LAYERS)]
            for message in kv_messages(pieces, request.wire_dtype, int(max_bytes)):
                count += 1
                yield message
        else:  # one PrefillMessage object per layer and token range, as a generated servicer would
            for layer in range(NUM_LAYERS):
                for start, n in split_token_ranges(0, num_tokens, LAYER_BYTES_PER_TOKEN, int(max_bytes)):
                    count += 1
                    yield pb_message(layer, start, kv[layer, 0, start:start + n], kv[layer, 1, start:start + n],
                                     request.wire_dtype)
        done = pb.PrefillDone(num_tokens=num_tokens, num_kv_messages=count)
        yield pb.PrefillMessage(done=done).SerializeToString()

    method = grpc.unary_stream_rpc_method_handler(
        prefill, request_deserializer=pb.PrefillRequest.FromString, response_serializer=None)
    return grpc.method_handlers_generic_handler("pd.v1.PrefillService", {"Prefill": method})


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

    handler = _prefill_handler(kv)

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


def grpc_receive(channel, num_tokens: int, max_message_bytes: int, dst: torch.Tensor,
                 serializer: str = "fast") -> Callable[[], None]:
    """Receives as the decode node does: raw responses, KV read in place by
    kv_frames.read_kv_message and decoded into the pool ("pb": parsed by PrefillMessage)."""
    from pd._generated import prefill_pb2 as pb
    from pd.transport.kv_frames import read_kv_message
    from pd.transport.wire import decode_kv_into

    request = pb.PrefillRequest(request_id=f"{max_message_bytes}/{serializer}",
                                token_ids=range(num_tokens), transport="grpc", wire_dtype="")
    prefill = channel.unary_stream("/pd.v1.PrefillService/Prefill",
                                   request_serializer=pb.PrefillRequest.SerializeToString,
                                   response_deserializer=None)

    def chunks(data: bytes):
        if serializer == "raw":
            return ()
        if serializer == "fast":
            return read_kv_message(data) or ()
        msg = pb.PrefillMessage.FromString(data)
        return (msg.kv,) if msg.WhichOneof("payload") == "kv" else ()

    def receive() -> None:
        for data in prefill(request):
            for c in chunks(data):
                decode_kv_into(c.k, c.wire_dtype, c.k_scale, dst[c.layer, 0, c.start:c.start + c.num_tokens])
                decode_kv_into(c.v, c.wire_dtype, c.v_scale, dst[c.layer, 1, c.start:c.start + c.num_tokens])

    return receive


def shm_copy(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_ids: list[int], dst_ids: list[int],
             num_tokens: int) -> Callable[[], None]:
    """The decode node's local-transport copy: one KVCopyPlan for the request, then one
    copy_layer per layer (as each LocalChunk arrives)."""
    from pd.transport.kv_copy import KVCopyPlan

    def copy_request() -> None:
        plan = KVCopyPlan(src_ids, dst_ids, 0, num_tokens, BLOCK_SIZE)
        for layer in range(NUM_LAYERS):
            plan.copy_layer(src_pool[layer], dst_pool[layer])

    return copy_request


def churned_table(num_blocks: int, need: int, seed: int) -> list[int]:
    """The block table a BlockPool (prefix caching on) hands out after a few hundred
    requests of 4-128 blocks came and went in random order, a quarter of it kept free."""
    from engine.kv_cache.block_pool import BlockPool

    rng, pool, live, next_hash = random.Random(seed), BlockPool(num_blocks), [], 0
    for _ in range(300):
        if live and (pool.num_free_blocks < num_blocks // 4 or rng.random() < 0.45):
            pool.free(list(reversed(live.pop(rng.randrange(len(live))))))  # tail first, as the engine does
            continue
        table = pool.allocate(min(rng.randint(4, 128), pool.num_free_blocks))
        for bid in table:
            next_hash += 1
            pool.cache_block(bid, next_hash, (next_hash,))
        live.append(table)
    while pool.num_free_blocks < need:
        pool.free(list(reversed(live.pop(0))))
    return pool.allocate(need)


def block_tables(num_tokens: int, num_src: int, num_dst: int) -> dict[str, tuple[list[int], list[int]]]:
    """Source and destination block tables: "fresh" = what BlockPools of freshly started
    nodes hand out, "churn" = after a long mixed workload, "random" = the worst case."""
    from engine.kv_cache.block_pool import BlockPool

    gen = torch.Generator().manual_seed(num_tokens)
    n = num_tokens // BLOCK_SIZE
    return {"fresh": (BlockPool(num_src).allocate(n), BlockPool(num_dst).allocate(n)),
            "churn": (churned_table(num_src, n, seed=1), churned_table(num_dst, n, seed=2)),
            "random": (torch.randperm(num_src, generator=gen)[:n].tolist(),
                       torch.randperm(num_dst, generator=gen)[:n].tolist())}


def measure_size(num_tokens: int, channel, tcp_port: int, src_pool: torch.Tensor, dst_pool: torch.Tensor,
                 dst_slots: torch.Tensor, mem: tuple[torch.Tensor, torch.Tensor], repeats: int,
                 pids: tuple[int, ...]) -> dict:
    num_bytes = num_tokens * BYTES_PER_TOKEN
    tables = block_tables(num_tokens, src_pool.shape[2] // BLOCK_SIZE, dst_pool.shape[2] // BLOCK_SIZE)
    shm_runs = {f"shm_{name}": shm_copy(src_pool, dst_pool, *ids, num_tokens) for name, ids in tables.items()}
    runs = {"tcp": raw_tcp_receive(tcp_port, num_bytes),
            **{f"grpc{m >> 20}M": grpc_receive(channel, num_tokens, m, dst_slots) for m in MESSAGE_SIZES},
            "pb": grpc_receive(channel, num_tokens, MESSAGE_SIZES[0], dst_slots, serializer="pb"),
            "grpc_raw": grpc_receive(channel, num_tokens, SEND_SIZE, dst_slots, serializer="raw"),
            "memcpy": lambda: mem[1][:num_bytes].copy_(mem[0][:num_bytes]),
            **shm_runs}
    times = median_times(runs, repeats, pids)
    for name, (src_ids, dst_ids) in tables.items():  # each table overwrites the others' blocks
        shm_runs[f"shm_{name}"]()
        pos = torch.arange(num_tokens)
        src = torch.tensor(src_ids)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        dst = torch.tensor(dst_ids)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        assert torch.equal(dst_pool[:, :, dst], src_pool[:, :, src]), f"shm copy ({name} tables) is wrong"
    assert torch.equal(dst_slots[:, :, :num_tokens], src_pool[:, :, :num_tokens]), "gRPC copy is wrong"
    return {"tokens": num_tokens, "bytes": num_bytes,
            **{name: num_bytes / wall / MB for name, (wall, _) in times.items()},
            "cpu": {name: cpu / (num_bytes / 1e9) for name, (_, cpu) in times.items()}}


# ---- report -----------------------------------------------------------------------------------

def verdict(ratio: float) -> str:
    return "PASS" if ratio >= 0.5 else "FAIL"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.0%}" if b > 1e-4 else "n/a"  # below the scheduler counters' resolution


def print_cpu_table(rows: list[dict]) -> None:
    """CPU ms per GB moved, both processes, all threads (mean of the runs). It varies less
    than throughput when other programs share the cores, though OpenMP spin-waits still
    inflate the torch-threaded memcpy column."""
    names = ["tcp", "grpc_raw", "grpc1M", "grpc4M", "pb", "memcpy", "shm_fresh", "shm_churn", "shm_random"]
    print(f"\nCPU ms per GB (both processes){'':>4}" + "".join(f"{n.replace('shm_', ''):>8}" for n in names)
          + f"{'TCP/gRPC':>9}{'mem/shm':>8}")
    for r in rows:
        cpu = r["cpu"]
        grpc_cpu = min(cpu["grpc1M"], cpu["grpc4M"])
        print(f"{r['tokens']:>6} tokens{'':>24}" + "".join(f"{cpu[n] * 1e3:>8.0f}" for n in names)
              + f"{_ratio(cpu['tcp'], grpc_cpu):>9}{_ratio(cpu['memcpy'], cpu['shm_fresh']):>8}")


def print_table(rows: list[dict], repeats: int) -> None:
    print(f"\nKV transfer, {BYTES_PER_TOKEN:,} bytes/token ({NUM_LAYERS} layers x k,v x {NUM_KV_HEADS} "
          f"heads x {HEAD_DIM} dim x bf16); MB/s (1e6 bytes/s), median of {repeats}")
    head = (f"{'tokens':>6} {'MB':>6} | {'TCP':>6} {'raw':>6} {'gRPC 1M':>7} {'gRPC 4M':>7} {'pb 1M':>6} "
            f"{'gRPC/TCP':>8} {'>=50%':>5} | {'memcpy':>6} {'fresh':>6} {'churn':>6} {'random':>6} "
            f"{'shm/mem':>7} {'>=50%':>5} {'churn':>6} {'random':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        grpc_best = max(r[f"grpc{m >> 20}M"] for m in MESSAGE_SIZES)
        g_ratio, s_ratio = grpc_best / r["tcp"], r["shm_fresh"] / r["memcpy"]
        print(f"{r['tokens']:>6} {r['bytes'] / MB:>6.1f} | {r['tcp']:>6.0f} {r['grpc_raw']:>6.0f} {r['grpc1M']:>7.0f} "
              f"{r['grpc4M']:>7.0f} {r['pb']:>6.0f} {g_ratio:>8.0%} {verdict(g_ratio):>5} | "
              f"{r['memcpy']:>6.0f} {r['shm_fresh']:>6.0f} {r['shm_churn']:>6.0f} {r['shm_random']:>6.0f} "
              f"{s_ratio:>7.0%} {verdict(s_ratio):>5} {r['shm_churn'] / r['memcpy']:>6.0%} "
              f"{r['shm_random'] / r['memcpy']:>6.0%}")
    print_cpu_table(rows)
    totals = {m: sum(r["bytes"] / r[f"grpc{m >> 20}M"] for r in rows) for m in MESSAGE_SIZES}
    print(f"gRPC configuration: {min(totals, key=totals.get) >> 20} MiB messages (least total time), "
          "max send/receive message length 16 MiB, kv_frames.kv_messages packing, glibc malloc "
          "tuned (engine.memory.tune_malloc); pb = PrefillMessage.SerializeToString; raw = gRPC "
          "alone (prebuilt 1 MiB byte strings, nothing decoded): the ceiling for any gRPC transport here")
    print("shm = KVCopyPlan.copy_layer per layer; block tables: fresh = BlockPools of freshly started "
          "nodes (shm/mem uses this), churn = BlockPools after a long mixed workload, random = worst case")


def run(token_counts: list[int], threads: int, repeats: int) -> list[dict]:
    import grpc
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
    dst_slots = torch.zeros(NUM_LAYERS, 2, max_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE)
    num_bytes = BYTES_PER_TOKEN * max_tokens
    mem = torch.ones(num_bytes, dtype=torch.uint8), torch.zeros(num_bytes, dtype=torch.uint8)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=GRPC_OPTIONS)
    with SharedKVBuffer.attach(shm_name, shm_size) as shm:
        src_pool = shm.tensor(DTYPE).view(pool_shape(2 * max_tokens // BLOCK_SIZE))
        pids = (os.getpid(), peer.pid)
        rows = [measure_size(n, channel, tcp_port, src_pool, dst_pool, dst_slots, mem, repeats, pids)
                for n in token_counts]
        del src_pool
    channel.close()
    conn.send("done")
    peer.join(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if any(n <= 0 or n % BLOCK_SIZE for n in args.tokens):
        parser.error(f"--tokens must be positive multiples of the block size {BLOCK_SIZE}")
    start = time.perf_counter()
    print_table(run(args.tokens, args.threads, args.repeats), args.repeats)
    print(f"total {time.perf_counter() - start:.1f} s, {args.threads} torch threads per process")


if __name__ == "__main__":
    main()
