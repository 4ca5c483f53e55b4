"""load_hf_dir reads what transformers writes: config, tokenizer and weights of tiny models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loader.hf_loader import load_hf_dir, model_config_from_hf
from engine.models.registry_names import SUPPORTED_ARCHITECTURES
from tiny_models import LLAMA3_TEMPLATE, TINY_ARCHS, CHATML_TEMPLATE, build_tiny_model_dir, load_reference_tokenizer

TEXTS = [
    "Hello world, how are you today?",
    "Café naïve — 你好，世界！ def add(a, b): return a + b",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: build_tiny_model_dir(arch, root) for arch in TINY_ARCHS}


@pytest.fixture
def copy_of(tiny_dirs, tmp_path):
    def copy(arch: str) -> Path:
        return Path(shutil.copytree(tiny_dirs[arch][0], tmp_path / arch))
    return copy


def _streamed(source) -> dict[str, torch.Tensor]:
    tensors = dict(source.open_weights())
    assert len(tensors) == source.num_tensors
    return tensors


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_model_config_matches_transformers_config(tiny_dirs, arch):
    path, model = tiny_dirs[arch]
    hf = model.config
    config = load_hf_dir(str(path)).config
    assert config.architecture == type(model).__name__
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, 16)
    assert config.rms_norm_eps == hf.rms_norm_eps
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.max_position_embeddings == 512
    assert config.tie_word_embeddings is False
    assert config.attention_bias == (arch == "qwen2")
    assert config.qk_norm == (arch == "qwen3")
    assert config.bos_token_id == hf.bos_token_id


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_streamed_tensors_equal_the_models_state_dict(tiny_dirs, arch):
    path, model = tiny_dirs[arch]
    tensors = _streamed(load_hf_dir(str(path)))
    state = model.state_dict()
    assert sorted(tensors) == sorted(state)
    for name, tensor in tensors.items():
        assert tensor.shape == state[name].shape, name
        assert torch.equal(tensor, state[name]), name


def test_sharded_checkpoint_streams_every_tensor_once(tmp_path):
    path, model = build_tiny_model_dir("llama", tmp_path, max_shard_size="40KB")
    shards = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 2 and not (path / "model.safetensors").exists()
    tensors = _streamed(load_hf_dir(str(path)))
    state = model.state_dict()
    assert sorted(tensors) == sorted(state)
    assert all(torch.equal(tensors[name], state[name]) for name in state)


def test_tied_embeddings_have_no_lm_head_tensor(tmp_path):
    path, _ = build_tiny_model_dir("qwen3", tmp_path, tie_word_embeddings=True)
    source = load_hf_dir(str(path))
    assert source.config.tie_word_embeddings is True
    assert "lm_head.weight" not in _streamed(source)


def test_rotary_inv_freq_buffers_are_skipped(copy_of):
    path = copy_of("qwen2")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    streamed = _streamed(load_hf_dir(str(path)))
    assert len(streamed) == len(tensors) - 1
    assert not any(name.endswith("inv_freq") for name in streamed)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tokenizer_encodes_like_transformers(tiny_dirs, arch):
    path, _ = tiny_dirs[arch]
    tokenizer = load_hf_dir(str(path)).tokenizer
    reference = load_reference_tokenizer(path)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text), text
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_post_processor_bos_is_added_once_and_inferred(tiny_dirs):
    tokenizer = load_hf_dir(str(tiny_dirs["llama"][0])).tokenizer  # tokenizer_config has no add_bos_token
    bos = tokenizer.bos_token_id
    assert tokenizer.special.add_bos_token is True
    assert tokenizer.special.bos_token == "<|begin_of_text|>"  # read from a serialized AddedToken
    ids = tokenizer.encode("Hello")
    assert ids[0] == bos and ids.count(bos) == 1
    assert bos not in tokenizer.backend.encode("Hello", add_special_tokens=True).ids


def test_add_bos_token_with_template_post_processor_adds_one_bos(tiny_dirs):
    tokenizer = load_hf_dir(str(tiny_dirs["mistral"][0])).tokenizer
    ids = tokenizer.encode("Hello")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_models_without_bos_add_none(tiny_dirs):
    tokenizer = load_hf_dir(str(tiny_dirs["qwen2"][0])).tokenizer
    assert tokenizer.bos_token_id is None and tokenizer.special.add_bos_token is False
    assert tokenizer.special.pad_token == "<|endoftext|>"


def test_eos_ids_merge_config_generation_config_and_tokenizer(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    source = load_hf_dir(str(path))
    token_id = source.tokenizer.backend.token_to_id
    end_of_text, eot = token_id("<|end_of_text|>"), token_id("<|eot_id|>")
    assert source.config.eos_token_ids == (end_of_text, eot)
    assert source.tokenizer.eos_token_id == eot
    assert set(source.tokenizer.eos_token_ids) == {end_of_text, eot}
    assert source.generation_config["eos_token_id"] == [end_of_text, eot]


@pytest.mark.parametrize("arch, template", [("llama", LLAMA3_TEMPLATE), ("qwen2", CHATML_TEMPLATE)],
                         ids=["chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_renders_like_transformers(tiny_dirs, arch, template):
    path, _ = tiny_dirs[arch]
    tokenizer = load_hf_dir(str(path)).tokenizer
    assert tokenizer.chat_template.source == template
    messages = [{"role": "user", "content": "Hello world"}]
    expected = load_reference_tokenizer(path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == expected


def test_chat_template_json_file_is_read(copy_of):
    path = copy_of("qwen3")
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    tokenizer = load_hf_dir(str(path)).tokenizer
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_unknown_architecture_lists_supported_ones(copy_of):
    path = copy_of("llama")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported") as error:
        load_hf_dir(str(path))
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES)


def test_missing_weights_and_tokenizer_say_what_is_wrong(copy_of):
    path = copy_of("qwen2")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_dir(str(path))
    (path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_hf_dir(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_dir(str(path / "nope"))


BASE_HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64,
                  "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}


def test_v4_config_layout_with_legacy_rope_type_key():
    config = model_config_from_hf({**BASE_HF_CONFIG, "rope_theta": 500000.0,
                                   "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [5, 6]},
                                  {"eos_token_id": 7})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert (config.num_kv_heads, config.head_dim) == (4, 16)  # defaults: heads, hidden / heads
    assert config.eos_token_ids == (5, 6, 7)


def test_v5_rope_parameters_layout():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = model_config_from_hf({**BASE_HF_CONFIG, "rope_parameters": llama3})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {k: v for k, v in llama3.items() if k != "rope_theta"}


def test_incomplete_config_names_the_missing_key():
    incomplete = {k: v for k, v in BASE_HF_CONFIG.items() if k != "vocab_size"}
    with pytest.raises(ValueError, match="config.json lacks 'vocab_size'"):
        model_config_from_hf(incomplete)


def test_sliding_window_shorter_than_context_is_warned(caplog):
    mistral = {**BASE_HF_CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": 4096,
               "max_position_embeddings": 32768}
    model_config_from_hf(mistral)
    assert "4096-token sliding window" in caplog.text
