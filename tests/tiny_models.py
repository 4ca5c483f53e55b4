"""Tiny random-weight Hugging Face model directories, built offline from configs.

`build_tiny_model_dir("qwen2", dir)` writes what a hub snapshot holds (config.json,
generation_config.json, safetensors weights, tokenizer.json, tokenizer_config.json, a chat
template) and returns the directory with the transformers model it was saved from, the
numerical reference. Weights come from torch.manual_seed(seed), so one call per session
(with tmp_path_factory.mktemp) serves every test that needs the same model.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",                       # ChatML (Qwen, SmolLM2)
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",        # Llama 3
    "<|end_header_id|>", "<|eot_id|>",
    "<s>", "</s>", "<unk>",                                               # Llama 2 / Mistral
)

_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "You are a helpful assistant. What is the capital of France? Paris is the capital.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Café, naïve, façade — 你好，世界！ Numbers: 0123456789.",
)

CHATML_TEMPLATE = (  # SmolLM2-Instruct, verbatim
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct, verbatim
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1, verbatim
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

_TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_theta=10000.0, tie_word_embeddings=False,
)


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(_TRAINING_TEXT) * 8, trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer(bos_token: str | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer (~400 ids); with bos_token, its post-processor prepends it (Llama style)."""
    tokenizer = Tokenizer.from_str(_trained_tokenizer_json())
    if bos_token is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))])
    return tokenizer


def build_hf_tokenizer(bos_token: str | None = None, eos_token: str | None = None,
                       chat_template: str | None = None,
                       bos_in_post_processor: bool = False) -> transformers.PreTrainedTokenizerFast:
    """The tiny tokenizer wrapped by transformers, for reference encodings and chat rendering."""
    backend = build_tiny_tokenizer(bos_token if bos_in_post_processor else None)
    kwargs = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tokenizer.chat_template = chat_template
    return tokenizer


# Per family: transformers classes, and the tokenizer conventions of a real model of it.
_ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(  # Llama 3 Instruct: bos from the post-processor, several eos ids
        config_class=transformers.LlamaConfig, model_class=transformers.LlamaForCausalLM,
        bos="<|begin_of_text|>", eos="<|eot_id|>", config_eos="<|end_of_text|>",
        generation_eos=("<|end_of_text|>", "<|eot_id|>"), bos_in_post_processor=True,
        chat_template=LLAMA3_TEMPLATE, template_in="chat_template.jinja"),
    "mistral": dict(  # Llama 2 / Mistral v0.1: add_bos_token in tokenizer_config AND in the post-processor
        config_class=transformers.MistralConfig, model_class=transformers.MistralForCausalLM,
        bos="<s>", eos="</s>", config_eos="</s>", generation_eos=("</s>",), bos_in_post_processor=True,
        add_bos_token=True, chat_template=MISTRAL_TEMPLATE, template_in="tokenizer_config.json"),
    "qwen2": dict(  # Qwen2.5 Instruct: no bos, ChatML, eos <|im_end|> plus <|endoftext|>
        config_class=transformers.Qwen2Config, model_class=transformers.Qwen2ForCausalLM,
        bos=None, eos="<|im_end|>", config_eos="<|im_end|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
        pad="<|endoftext|>", chat_template=CHATML_TEMPLATE, template_in="tokenizer_config.json"),
    "qwen3": dict(
        config_class=transformers.Qwen3Config, model_class=transformers.Qwen3ForCausalLM,
        bos=None, eos="<|im_end|>", config_eos="<|im_end|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
        pad="<|endoftext|>", chat_template=CHATML_TEMPLATE, template_in="chat_template.jinja"),
}
_ARCH_ALIASES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
TINY_ARCHS = tuple(_ARCHS)


def build_tiny_model_dir(arch: str, tmp_path: Path, *, seed: int = 0, max_shard_size: str | None = None,
                         **config_overrides: Any) -> tuple[Path, transformers.PreTrainedModel]:
    """Write a tiny `arch` model ("llama", "mistral", "qwen2", "qwen3" or the HF class name) under tmp_path.

    config_overrides go to the transformers config (e.g. tie_word_embeddings=True,
    num_hidden_layers=3). max_shard_size (e.g. "40KB") splits the weights into shards.
    Returns (model directory, the float32 transformers model in eval mode).
    """
    spec = _ARCHS[_ARCH_ALIASES.get(arch, arch)]
    path = Path(tmp_path) / f"tiny-{_ARCH_ALIASES.get(arch, arch)}"
    path.mkdir(parents=True, exist_ok=True)
    backend = build_tiny_tokenizer(spec["bos"] if spec.get("bos_in_post_processor") else None)
    token_id = backend.token_to_id

    config = spec["config_class"](**{
        **_TINY_CONFIG,
        "vocab_size": backend.get_vocab_size(),
        "bos_token_id": token_id(spec["bos"]) if spec["bos"] else None,
        "eos_token_id": token_id(spec["config_eos"]),
        **config_overrides,
    })
    torch.manual_seed(seed)
    model = spec["model_class"](config).to(torch.float32).eval()
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))

    generation_config = {"eos_token_id": [token_id(t) for t in spec["generation_eos"]], "do_sample": False}
    if spec["bos"]:
        generation_config["bos_token_id"] = token_id(spec["bos"])
    _write_json(path / "generation_config.json", generation_config)
    _write_tokenizer_files(path, backend, spec)
    return path, model


def load_reference_tokenizer(path: Path) -> transformers.PreTrainedTokenizerBase:
    """What transformers makes of the directory's tokenizer files (local files only)."""
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _write_tokenizer_files(path: Path, backend: Tokenizer, spec: dict[str, Any]) -> None:
    backend.save(str(path / "tokenizer.json"))
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _TINY_CONFIG["max_position_embeddings"],
        # bos as a serialized AddedToken, as older checkpoints store it; eos as a plain string
        "bos_token": _added_token(spec["bos"]) if spec["bos"] else None,
        "eos_token": spec["eos"],
        "pad_token": spec.get("pad"),
        "unk_token": None,
    }
    if "add_bos_token" in spec:
        tokenizer_config["add_bos_token"] = spec["add_bos_token"]
    if spec["template_in"] == "chat_template.jinja":
        (path / "chat_template.jinja").write_text(spec["chat_template"], encoding="utf-8")
    else:
        tokenizer_config["chat_template"] = spec["chat_template"]
    _write_json(path / "tokenizer_config.json", tokenizer_config)


def _added_token(content: str) -> dict[str, Any]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
