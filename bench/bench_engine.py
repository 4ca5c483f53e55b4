"""Engine benchmark on the bundled model, beside transformers (fp32) measured in the same run.

    python bench/bench_engine.py [--threads 2] [--dtype auto] [--skip-transformers] [--json out.json]

Figures: decode tokens/s at batch 1; prefill time of a 512-token prompt; total output
tokens/s for 8 and 32 concurrent requests of 128 output tokens each. Each figure is the
best of --repeats runs (after a warm-up), for both engines.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

PROMPT_TEXT = ("The history of computing is a story of ideas that build on one another, from the "
               "abacus to mechanical calculators, from punched cards to transistors and integrated circuits. ")


def make_prompt(tokenizer_encode, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer_encode(PROMPT_TEXT)
    return ids[:n_tokens]


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- ours ---------------------------------------------------------------------------------------
def bench_ours(args, prompt512: list[int], short: list[int]) -> dict[str, float]:
    from engine.api import EngineBuilder, ModelRepo, SamplingParams
    eng = (EngineBuilder(ModelRepo.bundled()).dtype(args.dtype).threads(args.threads)
           .scheduler(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=2048).build())
    greedy = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    res: dict[str, float] = {"dtype": str(eng.llm.pool.layout.dtype).replace("torch.", "")}

    def decode():
        return eng.generate(greedy, short)

    t = best_of(decode, args.repeats)
    res["decode_tok_s_b1"] = args.decode_tokens / t
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    eng.llm.block_pool.reset_cache()

    def prefill():
        eng.llm.block_pool.reset_cache()  # measure compute, not the prefix cache
        eng.generate(one, prompt512)

    res["prefill512_s"] = best_of(prefill, args.repeats)
    for n in (8, 32):
        params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        batch = [(params, short + [i + 100]) for i in range(n)]
        res[f"concurrent{n}_tok_s"] = n * 128 / best_of(lambda: eng.generate_batch(batch), args.repeats)
    return res


# ---- transformers -------------------------------------------------------------------------------
def bench_transformers(args, prompt512: list[int], short: list[int]) -> dict[str, float]:
    import transformers
    from engine.loader.bundled import bundled_model_path
    d, name = os.path.split(bundled_model_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    res: dict[str, float] = {"dtype": "float32"}

    def gen(ids: torch.Tensor, n: int, mask: torch.Tensor | None = None):
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)

    t = best_of(lambda: gen(torch.tensor([short]), args.decode_tokens), args.repeats)
    res["decode_tok_s_b1"] = args.decode_tokens / t
    res["prefill512_s"] = best_of(lambda: gen(torch.tensor([prompt512]), 1), args.repeats)
    for n in (8, 32):
        ids = torch.tensor([short + [i + 100] for i in range(n)])
        res[f"concurrent{n}_tok_s"] = n * 128 / best_of(lambda: gen(ids, 128), args.repeats)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from engine.loader.gguf_loader import load_gguf
    from engine.loader.bundled import bundled_model_path
    tok = load_gguf(bundled_model_path()).tokenizer
    prompt512 = make_prompt(lambda s: tok.encode(s, add_special_tokens=False), 512)
    short = tok.encode_chat([{"role": "user", "content": "Tell me a long story about a dragon."}])
    ours = bench_ours(args, prompt512, short)
    ref = {} if args.skip_transformers else bench_transformers(args, prompt512, short)
    rows = [("decode tok/s, batch 1", "decode_tok_s_b1", True),
            ("prefill 512 tokens, s", "prefill512_s", False),
            ("8 concurrent x 128, tok/s", "concurrent8_tok_s", True),
            ("32 concurrent x 128, tok/s", "concurrent32_tok_s", True)]
    print(f"threads={args.threads}  pdserve dtype={ours['dtype']}  transformers dtype=float32")
    print(f"{'figure':<30}{'pdserve':>12}{'transformers':>14}{'ratio':>9}")
    for label, key, higher_better in rows:
        a, b = ours[key], ref.get(key)
        ratio = "" if b is None else f"{(a / b if higher_better else b / a):.2f}x"
        print(f"{label:<30}{a:>12.3f}{(b if b is not None else float('nan')):>14.3f}{ratio:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pdserve": ours, "transformers": ref}, f, indent=2)


if __name__ == "__main__":
    main()
