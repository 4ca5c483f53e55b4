"""KV transports between a prefill node and a decode node.

`wire` turns KV tensors into the bytes of a gRPC KVChunk and back; `shm` maps a KV pool
into POSIX shared memory for the local CPU transport; `cuda_ipc` shares a CUDA pool
between processes on one GPU host.
"""
