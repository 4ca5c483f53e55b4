"""The committed gRPC stubs in pd/_generated/ match proto/*.proto (regenerate with
python -m pd.tools.gen_proto when this fails)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from pd.tools.gen_proto import DEFAULT_OUT, generate, make_imports_relative  # noqa: E402


def test_committed_stubs_equal_freshly_generated_ones(tmp_path: Path):
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path / "_generated")}
    committed = {p.name: p.read_bytes() for p in DEFAULT_OUT.iterdir()
                 if p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run python -m pd.tools.gen_proto"


def test_only_imports_of_generated_modules_become_relative(tmp_path: Path):
    (tmp_path / "a_pb2.py").write_text("import b_pb2 as b__pb2\nimport other_pb2 as o\n")
    (tmp_path / "b_pb2.py").write_text("")
    (tmp_path / "a_pb2_grpc.py").write_text("import grpc\nimport a_pb2 as a__pb2\n")
    make_imports_relative(tmp_path)
    assert (tmp_path / "a_pb2.py").read_text() == "from . import b_pb2 as b__pb2\nimport other_pb2 as o\n"
    assert (tmp_path / "a_pb2_grpc.py").read_text() == "import grpc\nfrom . import a_pb2 as a__pb2\n"


def test_grpc_stubs_import_relatively_and_export_the_protocol_version():
    from pd import _generated
    from pd.tools.gen_proto import PROTO_DIR
    from pd.transport.fingerprint import PROTOCOL_VERSION
    assert _generated.PROTOCOL_VERSION == PROTOCOL_VERSION
    assert f"protocol, version {PROTOCOL_VERSION} " in (PROTO_DIR / "prefill.proto").read_text()
    assert _generated.prefill_pb2_grpc.prefill__pb2 is _generated.prefill_pb2
    assert hasattr(_generated.prefill_pb2_grpc, "PrefillServiceServicer")


def test_prefill_message_round_trips():
    from pd._generated import prefill_pb2 as pb
    msg = pb.PrefillMessage(kv=pb.KVChunk(layer=3, start=16, num_tokens=2, wire_dtype="bfloat16",
                                          k=b"\x01\x02", v=b"\x03\x04", k_scale=0.5))
    back = pb.PrefillMessage.FromString(msg.SerializeToString())
    assert back == msg
    assert back.WhichOneof("payload") == "kv" and back.kv.k == b"\x01\x02"
    done = pb.PrefillMessage(done=pb.PrefillDone(first_token_id=7, num_tokens=40, lease_id=2**40))
    assert pb.PrefillMessage.FromString(done.SerializeToString()).done.lease_id == 2**40
