"""KV transfer benchmark: raw TCP, the gRPC transport, the shared-memory transport, memcpy.

    python bench/bench_transfer.py [--threads 2] [--tokens 512 2048 8192]

KV of the bundled model's shape (30 layers, 3 kv heads, head_dim 64, bfloat16: 23,040
bytes per token) moves from a "prefill" process to this "decode" process:
  raw TCP  loopback socket, 1 MiB sends, received with recv_into a preallocated buffer
  gRPC     PrefillService.Prefill streaming KVChunk messages (encode_kv per layer, split
           with split_token_ranges at 1 MiB or 4 MiB), decode_kv_into a preallocated pool
  shm      the prefill process writes a paged pool in a SharedKVBuffer; this process
           attaches and copies the request's blocks (random block tables on both sides,
           the worst case) into its own pool per layer with shm.copy_blocks; "shm idx" is
           the same copy with index_select / index_copy_, for reference
  memcpy   torch copy_ of the same number of bytes between two preallocated tensors
Each figure is the best of 3 runs after a warm-up. Targets: gRPC >= 50% of raw TCP,
shm >= 50% of memcpy.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import struct
import threading
import time
from concurrent import futures

import torch

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 30, 3, 64, torch.bfloat16
BLOCK_SIZE = 16
BYTES_PER_TOKEN = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
LAYER_BYTES_PER_TOKEN = 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize  # one KVChunk: k and v
MESSAGE_SIZES = (1 << 20, 4 << 20)
SEND_SIZE = 1 << 20
REPEATS = 3
MB = 1e6
GRPC_OPTIONS = [("grpc.max_receive_message_length", 16 << 20),
                ("grpc.max_send_message_length", 16 << 20)]


def pool_shape(num_blocks: int) -> tuple[int, ...]:
    return (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


def best_time(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up: page faults, connections, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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


def _make_servicer(kv: torch.Tensor):
    from pd._generated import prefill_pb2 as pb, prefill_pb2_grpc
    from pd.transport.wire import dtype_name, encode_kv, split_token_ranges

    name = dtype_name(DTYPE)

    class BenchPrefill(prefill_pb2_grpc.PrefillServiceServicer):
        def Prefill(self, request, context):
            num_tokens = len(request.token_ids)
            max_bytes = int(request.request_id)  # the benchmark's message size knob
            ranges = split_token_ranges(0, num_tokens, LAYER_BYTES_PER_TOKEN, max_bytes)
            for layer in range(NUM_LAYERS):
                for start, n in ranges:
                    k, k_scale = encode_kv(kv[layer, 0, start:start + n], request.wire_dtype)
                    v, v_scale = encode_kv(kv[layer, 1, start:start + n], request.wire_dtype)
                    yield pb.PrefillMessage(kv=pb.KVChunk(
                        layer=layer, start=start, num_tokens=n, wire_dtype=request.wire_dtype or name,
                        k=k, v=v, k_scale=k_scale, v_scale=v_scale))
            yield pb.PrefillMessage(done=pb.PrefillDone(num_tokens=num_tokens,
                                                        num_kv_messages=NUM_LAYERS * len(ranges)))

    return BenchPrefill()


def prefill_process(conn, max_tokens: int, threads: int) -> None:
    import grpc
    from pd._generated import prefill_pb2_grpc
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
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(_make_servicer(kv), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_serve_tcp, args=(listener,), daemon=True).start()

    conn.send((shm.name, shm.size, grpc_port, listener.getsockname()[1]))
    conn.recv()  # the benchmark is done
    server.stop(grace=None).wait()
    del server, pool, kv  # the servicer holds views of the pool
    shm.close()


# ---- the decode side: one measurement per transport -------------------------------------------

def raw_tcp_seconds(port: int, num_bytes: int) -> float:
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

    return best_time(receive)


def grpc_seconds(stub, num_tokens: int, max_message_bytes: int, dst: torch.Tensor) -> float:
    from pd._generated import prefill_pb2 as pb
    from pd.transport.wire import decode_kv_into

    request = pb.PrefillRequest(request_id=str(max_message_bytes), token_ids=range(num_tokens),
                                transport="grpc", wire_dtype="")

    def receive() -> None:
        for msg in stub.Prefill(request):
            if msg.WhichOneof("payload") != "kv":
                continue
            c = msg.kv
            decode_kv_into(c.k, c.wire_dtype, c.k_scale, dst[c.layer, 0, c.start:c.start + c.num_tokens])
            decode_kv_into(c.v, c.wire_dtype, c.v_scale, dst[c.layer, 1, c.start:c.start + c.num_tokens])

    return best_time(receive)


def shm_seconds(src_blocks: torch.Tensor, dst_blocks: torch.Tensor, num_tokens: int,
                use_index_copy: bool = False) -> float:
    from pd.transport.shm import copy_blocks

    gen = torch.Generator().manual_seed(num_tokens)
    num_blocks = num_tokens // BLOCK_SIZE
    src_ids = torch.randperm(src_blocks.shape[2], generator=gen)[:num_blocks]
    dst_ids = torch.randperm(dst_blocks.shape[2], generator=gen)[:num_blocks]

    def copy_request() -> None:
        for layer in range(NUM_LAYERS):
            if use_index_copy:
                dst_blocks[layer].index_copy_(1, dst_ids, src_blocks[layer].index_select(1, src_ids))
            else:
                copy_blocks(src_blocks[layer], dst_blocks[layer], src_ids, dst_ids)

    dst_blocks.zero_()
    seconds = best_time(copy_request)
    assert torch.equal(dst_blocks[:, :, dst_ids], src_blocks[:, :, src_ids])
    return seconds


def memcpy_seconds(src: torch.Tensor, dst: torch.Tensor, num_bytes: int) -> float:
    return best_time(lambda: dst[:num_bytes].copy_(src[:num_bytes]))


# ---- report -----------------------------------------------------------------------------------

def rate(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / MB


def verdict(ratio: float) -> str:
    return "PASS" if ratio >= 0.5 else "FAIL"


def print_table(rows: list[dict]) -> None:
    print(f"\nKV transfer, {BYTES_PER_TOKEN:,} bytes/token ({NUM_LAYERS} layers x k,v x "
          f"{NUM_KV_HEADS} heads x {HEAD_DIM} dim x bf16), MB/s = 1e6 bytes/s, best of {REPEATS}\n")
    head = (f"{'tokens':>6} {'MB':>7} | {'raw TCP':>8} {'gRPC 1M':>8} {'gRPC 4M':>8} {'best':>4} "
            f"{'gRPC/TCP':>8} {'>=50%':>5} | {'memcpy':>8} {'shm':>8} {'shm idx':>8} {'shm/mem':>7} {'>=50%':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        best_mb = max(MESSAGE_SIZES, key=lambda m: r["grpc"][m])
        g_ratio = r["grpc"][best_mb] / r["tcp"]
        s_ratio = r["shm"] / r["memcpy"]
        print(f"{r['tokens']:>6} {r['bytes'] / MB:>7.1f} | {r['tcp']:>8.0f} "
              f"{r['grpc'][1 << 20]:>8.0f} {r['grpc'][4 << 20]:>8.0f} {best_mb >> 20:>3}M "
              f"{g_ratio:>8.0%} {verdict(g_ratio):>5} | {r['memcpy']:>8.0f} {r['shm']:>8.0f} {r['shm_idx']:>8.0f} "
              f"{s_ratio:>7.0%} {verdict(s_ratio):>5}")
    totals = {m: sum(r["bytes"] / r["grpc"][m] for r in rows) for m in MESSAGE_SIZES}
    print(f"\ngRPC configuration: {min(totals, key=totals.get) >> 20} MiB messages "
          f"(less total time over all sizes), max send/receive message length 16 MiB")


def run(token_counts: list[int], threads: int) -> list[dict]:
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

    max_blocks = max_tokens // BLOCK_SIZE
    dst_blocks = torch.zeros(pool_shape(2 * max_blocks), dtype=DTYPE)  # the decode side's own pool
    dst_slots = dst_blocks.view(NUM_LAYERS, 2, -1, NUM_KV_HEADS, HEAD_DIM)
    mem_src = torch.ones(BYTES_PER_TOKEN * max_tokens, dtype=torch.uint8)
    mem_dst = torch.zeros_like(mem_src)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=GRPC_OPTIONS)
    stub = prefill_pb2_grpc.PrefillServiceStub(channel)
    rows = []
    with SharedKVBuffer.attach(shm_name, shm_size) as shm:
        src_blocks = shm.tensor(DTYPE).view(pool_shape(max_blocks))
        for num_tokens in token_counts:
            num_bytes = num_tokens * BYTES_PER_TOKEN
            rows.append({
                "tokens": num_tokens, "bytes": num_bytes,
                "tcp": rate(num_bytes, raw_tcp_seconds(tcp_port, num_bytes)),
                "grpc": {m: rate(num_bytes, grpc_seconds(stub, num_tokens, m, dst_slots))
                         for m in MESSAGE_SIZES},
                "memcpy": rate(num_bytes, memcpy_seconds(mem_src, mem_dst, num_bytes)),
                "shm": rate(num_bytes, shm_seconds(src_blocks, dst_blocks, num_tokens)),
                "shm_idx": rate(num_bytes, shm_seconds(src_blocks, dst_blocks, num_tokens, True)),
            })
        del src_blocks
    channel.close()
    conn.send("done")
    peer.join(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    args = parser.parse_args()
    if any(n % BLOCK_SIZE for n in args.tokens):
        parser.error(f"--tokens must be multiples of the block size {BLOCK_SIZE}")
    start = time.perf_counter()
    print_table(run(args.tokens, args.threads))
    print(f"total {time.perf_counter() - start:.1f} s, {args.threads} torch threads per process")


if __name__ == "__main__":
    main()
