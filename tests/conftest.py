"""Session-wide fixtures: each real model is loaded once per test session."""
from __future__ import annotations

import os

# Server processes started by the tests inherit this: idle OpenMP workers sleep instead of
# spinning, so several engines sharing the two cores don't stall each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("PDSERVE_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def bundled_path() -> str:
    from engine.loader.bundled import bundled_model_path
    return bundled_model_path()


@pytest.fixture(scope="session")
def engine_fp32():
    """The bundled SmolLM2 in float32 (the reference-comparison configuration)."""
    from engine.api import EngineBuilder, ModelRepo
    return (EngineBuilder(ModelRepo.bundled()).dtype("float32")
            .scheduler(max_num_seqs=32, max_num_batched_tokens=1024, max_model_len=2048)
            .kv_cache_gb(0.5).build())


@pytest.fixture(scope="session")
def hf_smollm(bundled_path):
    """transformers' float32 model dequantized from the same GGUF (the numerical reference)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    d, name = os.path.split(bundled_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return model.eval()
