"""Build a `tokenizers.Tokenizer` from GGUF metadata (`tokenizer.ggml.*`).

Two vocabulary kinds are supported, as llama.cpp names them in `tokenizer.ggml.model`:
- "gpt2": byte-level BPE with merges; the split regex comes from `tokenizer.ggml.pre`.
- "llama": SentencePiece-style BPE ("▁" for spaces, <0xNN> byte fallback), merges from the file
  or, when absent, recovered from the token scores.
Control and unknown tokens become special added tokens; user-defined ones (e.g. `<think>`)
become added tokens that are matched whole but are not special, as in transformers.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from engine.tokenizer import SpecialTokens, Tokenizer

logger = logging.getLogger(__name__)

# llama.cpp's llama_token_type values (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split regexes applied in order, ignore_merges, NFC normalization)
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "gpt2": ((_GPT2_SPLIT,), False, False),
    "default": ((_GPT2_SPLIT,), False, False),
    # StarCoder-style: every digit on its own, then the GPT-2 split.
    **{name: ((r"\p{N}", _GPT2_SPLIT), False, False)
       for name in ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva")},
    **{name: ((_LLAMA3_SPLIT,), True, False)
       for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx")},
    **{name: ((_QWEN2_SPLIT,), False, True)
       for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _vocab(tokens: list[str], types: list[int], respell: bool) -> dict[str, int]:
    """token -> id; with `respell`, normal tokens outside the byte alphabet get byte-level spelling."""
    spelling = _bytes_to_unicode() if respell else {}
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, types)):
        if respell and token_type == NORMAL and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, token_id)
    return vocab


def _merges_from_file(merges: Iterable[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"malformed merge {merge!r} in tokenizer.ggml.merges; the GGUF file is corrupt")
        pairs.append((left, right))
    return pairs


def _merges_from_scores(vocab: Mapping[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by the vocabulary: best-scoring merged piece first."""
    candidates = []
    for piece, piece_id in vocab.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        candidates.extend((scores[piece_id], left, right) for left, right in local)
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=True)
    return [(left, right) for _, left, right in candidates]


def _byte_level_backend(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> HFTokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        logger.warning("unknown tokenizer.ggml.pre %r; using the GPT-2 split regex", pre)
    splits, ignore_merges, nfc = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["gpt2"])
    merges = _merges_from_file(meta.get("tokenizer.ggml.merges", ()))
    model = BPE(_vocab(tokens, types, respell=True), merges, fuse_unk=False, byte_fallback=False,
                ignore_merges=ignore_merges)
    backend = HFTokenizer(model)
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> HFTokenizer:
    vocab = _vocab(tokens, types, respell=False)
    if "tokenizer.ggml.merges" in meta:
        merges = _merges_from_file(meta["tokenizer.ggml.merges"])
    elif "tokenizer.ggml.scores" in meta:
        merges = _merges_from_scores(vocab, list(meta["tokenizer.ggml.scores"]))
    else:
        raise ValueError("a 'llama' GGUF tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores; "
                         "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


_BUILDERS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def _add_special_tokens(backend: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _token_at(tokens: list[str], meta: Mapping[str, Any], key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def build_backend(meta: Mapping[str, Any]) -> HFTokenizer:
    """The `tokenizers.Tokenizer` described by a GGUF file's metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _BUILDERS:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: {sorted(_BUILDERS)}; "
                         "load the model from a Hugging Face directory instead")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types; "
                         "the file is corrupt")
    backend = _BUILDERS[kind](meta, tokens, types)
    _add_special_tokens(backend, tokens, types)
    return backend


def eos_token_ids(meta: Mapping[str, Any]) -> tuple[int, ...]:
    """eos, then end-of-turn / end-of-message ids when the file names them."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return tuple(ids)


def build_gguf_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """The engine Tokenizer (backend, special tokens, chat template) of a GGUF file."""
    backend = build_backend(meta)
    tokens = list(meta["tokenizer.ggml.tokens"])
    special = SpecialTokens(
        bos_token=_token_at(tokens, meta, "bos_token_id"),
        eos_token=_token_at(tokens, meta, "eos_token_id"),
        pad_token=_token_at(tokens, meta, "padding_token_id"),
        unk_token=_token_at(tokens, meta, "unknown_token_id"),
        # llama.cpp adds BOS for SentencePiece vocabularies that do not say otherwise
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", meta["tokenizer.ggml.model"] == "llama")),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    return Tokenizer(backend, special, chat_template=meta.get("tokenizer.chat_template"),
                     eos_token_ids=eos_token_ids(meta))
