"""A real in-process gRPC server answering PrefillService.PrefillStream with a test's own
handler, and the transfer peer DecodeConnector reads from (calls kept open in a StreamPool)."""
from __future__ import annotations

from concurrent import futures
from types import SimpleNamespace

import grpc

from pd._generated import prefill_pb2 as pb


def serve_prefill_stream(handler, max_workers: int = 4) -> tuple[grpc.Server, grpc.Channel, int]:
    """Starts a server whose PrefillStream is handler(requests, context) yielding raw bytes;
    returns it, a channel to it and its port (close the channel, then stop the server)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pd.v1.PrefillService", {
        "PrefillStream": grpc.stream_stream_rpc_method_handler(
            handler, request_deserializer=pb.PrefillRequest.FromString, response_serializer=None)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}"), port


def stream_peer(streams, channel: grpc.Channel) -> SimpleNamespace:
    """The PrefillPeer face DecodeConnector._stream uses, on calls of this StreamPool."""
    return SimpleNamespace(start_transfer=lambda m, owner, fresh: streams.acquire(channel, m, owner, fresh),
                           end_transfer=streams.release, local_pool=None, transport="grpc", address="test")
