"""Command-line flags shared by every program that builds an engine."""
from __future__ import annotations

import argparse
import logging

from engine.builder import EngineBuilder
from engine.model_repo import ModelRepo

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    _add_engine_only_args(parser)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (default: the bundled SmolLM2-135M-Instruct)")
    src = model.add_mutually_exclusive_group()
    src.add_argument("--m", "--model", dest="hub_id", metavar="ORG/NAME",
                     help="Hugging Face hub id (uses the local HF cache; honours HF_HUB_OFFLINE/HF_TOKEN)")
    src.add_argument("--w", "--weights-dir", dest="weights_dir", metavar="DIR",
                     help="local Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    src.add_argument("--f", "--gguf", dest="gguf_file", metavar="FILE", help="GGUF file")
    model.add_argument("--revision", help="hub revision (with --m)")


def _add_engine_only_args(parser: argparse.ArgumentParser) -> None:
    eng = parser.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto",
                     help="auto|float32|bfloat16|float16 (auto: bfloat16 on CPUs with native bf16, else float32)")
    eng.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    eng.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    eng.add_argument("--max-model-len", type=int, default=None, help="context length (default: model's, <= 8192)")
    eng.add_argument("--max-num-seqs", type=int, default=64, help="max requests in the running batch")
    eng.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    eng.add_argument("--kv-cache-gb", type=float, default=None, help="CPU KV cache budget in GiB (default 1)")
    eng.add_argument("--kv-fraction", type=float, default=0.9, help="CUDA: fraction of free memory for KV")
    eng.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    eng.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt in one step")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def repo_from_args(args: argparse.Namespace) -> ModelRepo:
    if args.hub_id:
        return ModelRepo.hub(args.hub_id, args.revision)
    if args.weights_dir:
        return ModelRepo.dir(args.weights_dir)
    if args.gguf_file:
        return ModelRepo.file(args.gguf_file)
    return ModelRepo.bundled()


def builder_from_args(args: argparse.Namespace) -> EngineBuilder:
    return (EngineBuilder(repo_from_args(args)).device(args.device).dtype(args.dtype).threads(args.threads)
            .scheduler(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_chunked_prefill=not args.no_chunked_prefill)
            .cache(block_size=args.block_size, kv_cache_gb=args.kv_cache_gb, kv_fraction=args.kv_fraction,
                   enable_prefix_caching=not args.no_prefix_caching))


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT)
    for noisy in ("httpx", "httpcore"):  # one line per proxied request is too much at info
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
