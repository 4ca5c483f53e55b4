"""KV transfer benchmark: raw TCP, the gRPC transport, the shared-memory transport, memcpy.

    python bench/bench_transfer.py [--threads 2] [--tokens 512 2048 8192] [--repeats 3]

KV of the bundled model's shape (30 layers, 3 kv heads, head_dim 64, bfloat16: 23,040
bytes per token) moves from a "prefill" process to this "decode" process:
  raw TCP  loopback socket, 1 MiB sends, received with recv_into a preallocated buffer
  gRPC     a grpc.server streaming PrefillService.Prefill: one KVChunk per layer and token
           range (split_token_ranges at 1 MiB or 4 MiB), serialized by
           wire.kv_chunk_message ("pb": PrefillMessage(...).SerializeToString() instead);
           the client is the generated stub, decode_kv_into a preallocated pool
  shm      the prefill process writes a paged pool in a SharedKVBuffer; this process
           attaches and copies the request's blocks into its own pool, layer by layer,
           with shm.copy_blocks: random block tables on both sides (the worst case), and
           "seq" consecutive ones (a fresh pool); "idx" is the random case with
           index_select / index_copy_, for reference
  memcpy   torch copy_ of the same number of bytes between two preallocated tensors
Every figure is the best of --repeats runs after a warm-up; the runs of all transports
are interleaved so that a busy machine slows them alike. Targets: gRPC >= 50% of raw
TCP, shm >= 50% of memcpy.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent import futures

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
    return (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


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


def best_times(runs: dict[str, Callable[[], None]], repeats: int,
               pids: tuple[int, ...]) -> dict[str, tuple[float, float]]:
    """(fastest wall seconds, mean CPU seconds of both processes) over `repeats` calls of
    each function, after one warm-up call each (page faults, connections, caches). The
    rounds go over all functions in turn, so a busy machine slows them alike."""
    for fn in runs.values():
        fn()
    best, cpu = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, fn in runs.items():
            cpu_start, start = cpu_seconds(pids), time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
            cpu[name] += (cpu_seconds(pids) - cpu_start) / repeats
    return {name: (best[name], cpu[name]) for name in runs}


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
    "<max message bytes>/<fast|pb>": fast serializes with wire.kv_chunk_message, pb builds
    PrefillMessage objects and calls SerializeToString (what a generated servicer does)."""
    import grpc
    from pd._generated import prefill_pb2 as pb
    from pd.transport.wire import dtype_name, encode_kv, kv_chunk_message, split_token_ranges

    def pb_message(layer: int, start: int, k: torch.Tensor, v: torch.Tensor, wire_dtype: str) -> bytes:
        k_data, k_scale = encode_kv(k, wire_dtype)
        v_data, v_scale = encode_kv(v, wire_dtype)
        return pb.PrefillMessage(kv=pb.KVChunk(
            layer=layer, start=start, num_tokens=k.shape[0], wire_dtype=wire_dtype or dtype_name(k.dtype),
            k=k_data, v=v_data, k_scale=k_scale, v_scale=v_scale)).SerializeToString()

    def prefill(request, context):
        max_bytes, serializer = request.request_id.split("/")
        make = kv_chunk_message if serializer == "fast" else pb_message
        num_tokens = len(request.token_ids)
        ranges = split_token_ranges(0, num_tokens, LAYER_BYTES_PER_TOKEN, int(max_bytes))
        for layer in range(NUM_LAYERS):
            for start, n in ranges:
                yield make(layer, start, kv[layer, 0, start:start + n], kv[layer, 1, start:start + n],
                           request.wire_dtype)
        done = pb.PrefillDone(num_tokens=num_tokens, num_kv_messages=NUM_LAYERS * len(ranges))
        yield pb.PrefillMessage(done=done).SerializeToString()

    method = grpc.unary_stream_rpc_method_handler(
        prefill, request_deserializer=pb.PrefillRequest.FromString, response_serializer=None)
    return grpc.method_handlers_generic_handler("pd.v1.PrefillService", {"Prefill": method})


def prefill_process(conn, max_tokens: int, threads: int) -> None:
    import grpc
    from pd.transport.shm import SharedKVBuffer
    from pd.transport.wire import tune_malloc_for_kv_messages

    tune_malloc_for_kv_messages()
    torch.set_num_threads(threads)
    num_blocks = max_tokens // BLOCK_SIZE
    shm = SharedKVBuffer.create(BYTES_PER_TOKEN * max_tokens, name_prefix="pdbench")
    pool = shm.tensor(DTYPE).view(pool_shape(num_blocks))
    pool.copy_(torch.randn(pool.shape, dtype=torch.float32))  # the "prefill" writes its KV
    kv = pool.view(NUM_LAYERS, 2, num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_prefill_handler(kv),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_serve_tcp, args=(listener,), daemon=True).start()

    conn.send((shm.name, shm.size, grpc_port, listener.getsockname()[1]))
    conn.recv()  # the benchmark is done
    server.stop(grace=None).wait()
    del server, pool, kv  # the handler holds views of the pool
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


def grpc_receive(stub, num_tokens: int, max_message_bytes: int, dst: torch.Tensor,
                 serializer: str = "fast") -> Callable[[], None]:
    from pd._generated import prefill_pb2 as pb
    from pd.transport.wire import decode_kv_into

    request = pb.PrefillRequest(request_id=f"{max_message_bytes}/{serializer}",
                                token_ids=range(num_tokens), transport="grpc", wire_dtype="")

    def receive() -> None:
        for msg in stub.Prefill(request):
            if msg.WhichOneof("payload") != "kv":
                continue
            c = msg.kv
            decode_kv_into(c.k, c.wire_dtype, c.k_scale, dst[c.layer, 0, c.start:c.start + c.num_tokens])
            decode_kv_into(c.v, c.wire_dtype, c.v_scale, dst[c.layer, 1, c.start:c.start + c.num_tokens])

    return receive


def shm_copy(src_blocks: torch.Tensor, dst_blocks: torch.Tensor, src_ids: torch.Tensor,
             dst_ids: torch.Tensor, use_index_copy: bool = False) -> Callable[[], None]:
    from pd.transport.shm import copy_blocks

    def copy_request() -> None:
        for layer in range(NUM_LAYERS):
            if use_index_copy:
                dst_blocks[layer].index_copy_(1, dst_ids, src_blocks[layer].index_select(1, src_ids))
            else:
                copy_blocks(src_blocks[layer], dst_blocks[layer], src_ids, dst_ids)

    return copy_request


def block_tables(num_tokens: int, num_src: int, num_dst: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(num_tokens)
    n = num_tokens // BLOCK_SIZE
    half = num_dst // 2  # the two tables write disjoint halves of the destination pool
    return {"random": (torch.randperm(num_src, generator=gen)[:n], torch.randperm(half, generator=gen)[:n]),
            "seq": (torch.arange(n), torch.arange(half, half + n))}


def measure_size(num_tokens: int, stub, tcp_port: int, src_blocks: torch.Tensor, dst_blocks: torch.Tensor,
                 dst_slots: torch.Tensor, mem: tuple[torch.Tensor, torch.Tensor], repeats: int,
                 pids: tuple[int, ...]) -> dict:
    num_bytes = num_tokens * BYTES_PER_TOKEN
    tables = block_tables(num_tokens, src_blocks.shape[2], dst_blocks.shape[2])
    runs = {"tcp": raw_tcp_receive(tcp_port, num_bytes),
            **{f"grpc{m >> 20}M": grpc_receive(stub, num_tokens, m, dst_slots) for m in MESSAGE_SIZES},
            "pb": grpc_receive(stub, num_tokens, MESSAGE_SIZES[0], dst_slots, serializer="pb"),
            "memcpy": lambda: mem[1][:num_bytes].copy_(mem[0][:num_bytes]),
            "shm": shm_copy(src_blocks, dst_blocks, *tables["random"]),
            "shm_seq": shm_copy(src_blocks, dst_blocks, *tables["seq"]),
            "shm_idx": shm_copy(src_blocks, dst_blocks, *tables["random"], use_index_copy=True)}
    times = best_times(runs, repeats, pids)
    for src_ids, dst_ids in tables.values():
        assert torch.equal(dst_blocks[:, :, dst_ids], src_blocks[:, :, src_ids]), "shm copy is wrong"
    return {"tokens": num_tokens, "bytes": num_bytes,
            **{name: num_bytes / wall / MB for name, (wall, _) in times.items()},
            "cpu": {name: cpu / (num_bytes / 1e9) for name, (_, cpu) in times.items()}}


# ---- report -----------------------------------------------------------------------------------

def verdict(ratio: float) -> str:
    return "PASS" if ratio >= 0.5 else "FAIL"


def print_cpu_table(rows: list[dict]) -> None:
    """CPU ms per GB moved, both processes, all threads (mean of the runs). It varies less
    than throughput when other programs share the cores, though OpenMP spin-waits still
    inflate the torch-threaded columns (memcpy, idx)."""
    names = ["tcp", "grpc1M", "grpc4M", "pb", "memcpy", "shm", "shm_seq", "shm_idx"]
    print(f"\nCPU ms per GB (both processes){'':>4}" + "".join(f"{n:>8}" for n in names)
          + f"{'TCP/gRPC':>9}{'mem/shm':>8}")
    for r in rows:
        cpu = r["cpu"]
        grpc_cpu = min(cpu["grpc1M"], cpu["grpc4M"])
        print(f"{r['tokens']:>6} tokens{'':>24}" + "".join(f"{cpu[n] * 1e3:>8.0f}" for n in names)
              + f"{cpu['tcp'] / grpc_cpu:>9.0%}{cpu['memcpy'] / cpu['shm']:>8.0%}")


def print_table(rows: list[dict], repeats: int) -> None:
    print(f"\nKV transfer, {BYTES_PER_TOKEN:,} bytes/token ({NUM_LAYERS} layers x k,v x {NUM_KV_HEADS} "
          f"heads x {HEAD_DIM} dim x bf16); MB/s (1e6 bytes/s), best of {repeats}")
    head = (f"{'tokens':>6} {'MB':>6} | {'TCP':>6} {'gRPC 1M':>7} {'gRPC 4M':>7} {'pb 1M':>6} "
            f"{'gRPC/TCP':>8} {'>=50%':>5} | {'memcpy':>6} {'shm':>6} {'seq':>6} {'idx':>6} "
            f"{'shm/mem':>7} {'>=50%':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        grpc_best = max(r[f"grpc{m >> 20}M"] for m in MESSAGE_SIZES)
        g_ratio, s_ratio = grpc_best / r["tcp"], r["shm"] / r["memcpy"]
        print(f"{r['tokens']:>6} {r['bytes'] / MB:>6.1f} | {r['tcp']:>6.0f} {r['grpc1M']:>7.0f} "
              f"{r['grpc4M']:>7.0f} {r['pb']:>6.0f} {g_ratio:>8.0%} {verdict(g_ratio):>5} | "
              f"{r['memcpy']:>6.0f} {r['shm']:>6.0f} {r['shm_seq']:>6.0f} {r['shm_idx']:>6.0f} "
              f"{s_ratio:>7.0%} {verdict(s_ratio):>5}")
    print_cpu_table(rows)
    totals = {m: sum(r["bytes"] / r[f"grpc{m >> 20}M"] for r in rows) for m in MESSAGE_SIZES}
    print(f"gRPC configuration: {min(totals, key=totals.get) >> 20} MiB messages (least total time), "
          "max send/receive message length 16 MiB, wire.kv_chunk_message serializer, glibc malloc "
          "tuned (wire.tune_malloc_for_kv_messages); pb = PrefillMessage.SerializeToString")
    print("shm = copy_blocks with random block tables (the ratio uses this), seq = consecutive "
          "tables, idx = index_select/index_copy_ with random tables")


def run(token_counts: list[int], threads: int, repeats: int) -> list[dict]:
    import grpc
    from pd._generated import prefill_pb2_grpc
    from pd.transport.shm import SharedKVBuffer
    from pd.transport.wire import tune_malloc_for_kv_messages

    tune_malloc_for_kv_messages()
    torch.set_num_threads(threads)
    max_tokens = max(token_counts)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    peer = ctx.Process(target=prefill_process, args=(child_conn, max_tokens, threads), daemon=True)
    peer.start()
    shm_name, shm_size, grpc_port, tcp_port = conn.recv()

    dst_blocks = torch.zeros(pool_shape(2 * max_tokens // BLOCK_SIZE), dtype=DTYPE)  # our own pools
    dst_slots = torch.zeros(NUM_LAYERS, 2, max_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE)
    num_bytes = BYTES_PER_TOKEN * max_tokens
    mem = torch.ones(num_bytes, dtype=torch.uint8), torch.zeros(num_bytes, dtype=torch.uint8)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=GRPC_OPTIONS)
    stub = prefill_pb2_grpc.PrefillServiceStub(channel)
    with SharedKVBuffer.attach(shm_name, shm_size) as shm:
        src_blocks = shm.tensor(DTYPE).view(pool_shape(max_tokens // BLOCK_SIZE))
        pids = (os.getpid(), peer.pid)
        rows = [measure_size(n, stub, tcp_port, src_blocks, dst_blocks, dst_slots, mem, repeats, pids)
                for n in token_counts]
        del src_blocks
    channel.close()
    conn.send("done")
    peer.join(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if any(n <= 0 or n % BLOCK_SIZE for n in args.tokens):
        parser.error(f"--tokens must be positive multiples of the block size {BLOCK_SIZE}")
    start = time.perf_counter()
    print_table(run(args.tokens, args.threads, args.repeats), args.repeats)
    print(f"total {time.perf_counter() - start:.1f} s, {args.threads} torch threads per process")


if __name__ == "__main__":
    main()
