"""Generated gRPC stubs for the pd.v1 protocol.

Do not edit: run python -m pd.tools.gen_proto.
"""
from . import prefill_pb2, prefill_pb2_grpc, router_pb2, router_pb2_grpc

PROTOCOL_VERSION = 3

__all__ = ["prefill_pb2", "prefill_pb2_grpc", "router_pb2", "router_pb2_grpc", "PROTOCOL_VERSION"]
