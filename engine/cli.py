"""pd-generate: one chat generation from the command line, streamed to the terminal.

    pd-generate "What is the capital of France?"
    pd-generate --f model.gguf --max-tokens 64 --temperature 0.7 "Tell me a joke"
"""
from __future__ import annotations

import argparse
import sys
import time

from engine.args import add_engine_args, builder_from_args, setup_logging
from engine.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pd-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--raw", action="store_true", help="send the prompt as-is (no chat template)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        engine = builder_from_args(args).build()
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    prompt = args.prompt if args.raw else messages
    t0 = time.perf_counter()
    n = 0
    for chunk in engine.stream(params, prompt):
        n += len(chunk.token_ids)
        print(chunk.text, end="", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
