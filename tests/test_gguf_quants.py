"""engine.loader.gguf_quants matches gguf-py's reference dequantization bit for bit."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants

from engine.loader.gguf_quants import SUPPORTED_TYPES, dequantize

ROWS, BLOCKS_PER_ROW = 6, 3
# byte offsets of the fp16 scale fields in the K-quant blocks that gguf-py cannot quantize
K_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _raw_blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for each block, with finite fp16 values in the scale fields."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS, BLOCKS_PER_ROW, type_size), dtype=np.uint8)
    for offset in K_SCALE_FIELDS[qtype]:
        scales = rng.uniform(-2, 2, size=(ROWS, BLOCKS_PER_ROW, 1)).astype(np.float16)
        raw[:, :, offset:offset + 2] = scales.view(np.uint8)
    return raw.reshape(ROWS, BLOCKS_PER_ROW * type_size)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    shape = (ROWS, BLOCKS_PER_ROW * block_size)
    if qtype in K_SCALE_FIELDS:
        raw = _raw_blocks(qtype, rng)
    else:
        raw = quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
    expected = raw if qtype == Q.F32 else quants.dequantize(raw, qtype)

    out = dequantize(raw, qtype, shape)

    assert out.dtype == torch.float32 and tuple(out.shape) == shape
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(out.numpy(), expected.reshape(shape))


def test_dequantize_accepts_a_flat_byte_tensor():
    rng = np.random.default_rng(0)
    raw = quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q4_1)
    out = dequantize(torch.from_numpy(raw.reshape(-1).copy()), Q.Q4_1, (4, 64))
    np.testing.assert_array_equal(out.numpy(), quants.dequantize(raw, Q.Q4_1))


def test_dequantize_returns_writable_memory_not_a_view_of_the_input():
    raw = np.arange(8, dtype=np.float32)
    out = dequantize(raw, Q.F32, (2, 4))
    out += 1
    assert raw[0] == 0 and out[0, 0] == 1


def test_unsupported_type_names_it_and_lists_supported_ones():
    with pytest.raises(ValueError, match=r"IQ2_XXS is not supported; supported types: F32, F16, BF16, Q8_0"):
        dequantize(np.zeros(66, np.uint8), Q.IQ2_XXS, (256,))


def test_size_mismatch_is_reported_as_a_corrupt_file():
    with pytest.raises(ValueError, match="does not match shape"):
        dequantize(np.zeros(35, np.uint8), Q.Q8_0, (32,))
