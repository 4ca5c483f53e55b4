"""Load a Hugging Face model directory: config.json, tokenizer files, safetensors weights."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from engine.config import ModelConfig
from engine.loader.base import ModelSource, WeightStream
from engine.models.registry_names import SUPPORTED_ARCHITECTURES
from engine.tokenizer import SpecialTokens, Tokenizer

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_hf_dir(path: str) -> ModelSource:
    """Read a local Hugging Face model directory; weights are streamed later, one tensor at a time."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory {path} does not exist; pass a directory that holds config.json")
    hf_config = _read_json(root / "config.json")
    if hf_config is None:
        raise ValueError(f"{path} has no config.json; pass a Hugging Face model directory")
    generation_config = _read_json(root / "generation_config.json") or {}
    config = model_config_from_hf(hf_config, generation_config)
    tokenizer = load_hf_tokenizer(root, eos_token_ids=config.eos_token_ids)
    tensor_names = _tensor_names_by_file(root)
    num_tensors = sum(len(names) for names in tensor_names.values())
    num_bytes = sum((root / name).stat().st_size for name in tensor_names)
    logger.info("found %s in %s: %d layers, %d tensors in %d files (%.2f GB)", config.architecture, root,
                config.num_layers, num_tensors, len(tensor_names), num_bytes / 1e9)
    return ModelSource(
        config=config,
        tokenizer=tokenizer,
        open_weights=lambda: _stream_weights(root, tensor_names, num_tensors),
        num_tensors=num_tensors,
        description=str(root),
        generation_config=generation_config,
        weight_format="safetensors",
    )


# ----------------------------------------------------------------------------- config

def model_config_from_hf(hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """Translate a transformers config.json (v4 or v5 layout) into a ModelConfig."""
    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; only silu models can be loaded")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported; only bias-free MLPs can be loaded")
    _warn_sliding_window(architecture, hf)
    generation_config = generation_config or {}
    bos_token_id = next((v for v in (hf.get("bos_token_id"), generation_config.get("bos_token_id"))
                         if isinstance(v, int)), None)
    try:
        num_heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _rope(hf)
        return ModelConfig(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (and none on o_proj); the others follow attention_bias.
            attention_bias=architecture == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            bos_token_id=bos_token_id,
            eos_token_ids=_merge_ids(hf.get("eos_token_id"), generation_config.get("eos_token_id")),
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}; the checkpoint is incomplete, download it again") from None


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and a rope_scaling dict keyed by "rope_type" (None for plain RoPE)."""
    params = hf.get("rope_parameters")  # transformers v5 layout: theta and scaling in one dict
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params or "type" in params):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling:
        legacy_type = scaling.pop("type")
        scaling.setdefault("rope_type", legacy_type)
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def _merge_ids(*values: int | list[int] | None) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        for token_id in ([value] if isinstance(value, int) else value or []):
            if token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def _warn_sliding_window(architecture: str, hf: dict[str, Any]) -> None:
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", architecture == "MistralForCausalLM")
    if uses_window and window and window < hf.get("max_position_embeddings", 0):
        logger.warning("%s uses a %d-token sliding window, which pdserve ignores: outputs differ from the "
                       "reference past %d tokens of context", architecture, window, window)


# ----------------------------------------------------------------------------- tokenizer

def load_hf_tokenizer(root: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """Build a Tokenizer from tokenizer.json and its companion config files."""
    tokenizer_file = root / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"{root} has no tokenizer.json; convert the tokenizer once with transformers: "
                         "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tokenizer_config = _read_json(root / "tokenizer_config.json") or {}
    special_map = _read_json(root / "special_tokens_map.json") or {}

    def token(name: str) -> str | None:
        return _token_content(tokenizer_config.get(name, special_map.get(name)))

    prefix, suffix = _strip_template_processing(tokenizer_json)
    add_bos = tokenizer_config.get("add_bos_token")
    add_eos = tokenizer_config.get("add_eos_token")
    special = SpecialTokens(
        bos_token=token("bos_token") or prefix,
        eos_token=token("eos_token"),
        pad_token=token("pad_token"),
        unk_token=token("unk_token"),
        add_bos_token=bool(prefix) if add_bos is None else bool(add_bos),
        add_eos_token=bool(suffix and suffix == token("eos_token")) if add_eos is None else bool(add_eos),
    )
    backend = HFTokenizer.from_str(json.dumps(tokenizer_json))
    return Tokenizer(backend, special, chat_template=_chat_template(root, tokenizer_config),
                     eos_token_ids=eos_token_ids)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


def _strip_template_processing(tokenizer_json: dict[str, Any]) -> tuple[str | None, str | None]:
    """Remove TemplateProcessing from the post-processor; return the special tokens it put first and last.

    Tokenizer.encode adds bos/eos itself (per add_bos_token/add_eos_token), so the backend
    must add none, or a Llama-3 style post-processor would double the bos.
    """
    post = tokenizer_json.get("post_processor")
    if not isinstance(post, dict):
        return None, None
    if post.get("type") == "TemplateProcessing":
        tokenizer_json["post_processor"] = None
        return _template_ends(post)
    if post.get("type") == "Sequence":
        kept, ends = [], (None, None)
        for processor in post.get("processors", []):
            if processor.get("type") == "TemplateProcessing":
                ends = _template_ends(processor)
            else:
                kept.append(processor)
        tokenizer_json["post_processor"] = {**post, "processors": kept} if kept else None
        return ends
    return None, None


def _template_ends(template: dict[str, Any]) -> tuple[str | None, str | None]:
    single = template.get("single") or []

    def special_at(index: int) -> str | None:
        item = single[index] if single else None
        return item["SpecialToken"]["id"] if item and "SpecialToken" in item else None

    return special_at(0), special_at(-1)


def _chat_template(root: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = (_read_json(root / "chat_template.json") or {}).get("chat_template")
    template = template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


# ----------------------------------------------------------------------------- weights

def _tensor_names_by_file(root: Path) -> dict[str, list[str]]:
    """Shard file name -> tensor names in it (rotary inv_freq buffers left out)."""
    index = _read_json(root / INDEX_FILE)
    if index is not None:
        by_file: dict[str, list[str]] = {}
        for name, file_name in index["weight_map"].items():
            by_file.setdefault(file_name, []).append(name)
        missing = [f for f in by_file if not (root / f).is_file()]
        if missing:
            raise ValueError(f"{root} is missing weight shards {', '.join(missing)}; download the model again")
    elif (root / SINGLE_FILE).is_file():
        with safe_open(root / SINGLE_FILE, framework="pt") as f:
            by_file = {SINGLE_FILE: list(f.keys())}
    else:
        raise ValueError(f"{root} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors weights "
                         "are supported (re-save the model with transformers' save_pretrained)")
    return {file_name: [n for n in names if not n.endswith("rotary_emb.inv_freq")]
            for file_name, names in sorted(by_file.items())}


def _stream_weights(root: Path, tensor_names: dict[str, list[str]], num_tensors: int) -> WeightStream:
    with tqdm(total=num_tensors, desc=f"loading {root.name}", unit="tensor", leave=False) as bar:
        for file_name, names in tensor_names.items():
            with safe_open(root / file_name, framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
                    bar.update(1)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download the model again") from None
