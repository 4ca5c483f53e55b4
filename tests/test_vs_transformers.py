"""Greedy output of the bundled model equals transformers' (fp32, same GGUF dequantized)."""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams

NUM_TOKENS = 32
NEAR_TIE = 0.05      # transformers' top-1/top-2 logit margin below which ids may legitimately differ
LOGPROB_TOL = 2e-3

LONG_CONTEXT = (
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light "
    "energy into chemical energy. During photosynthesis, light energy is captured by chlorophyll "
    "and used to convert water, carbon dioxide and minerals into oxygen and energy-rich organic "
    "compounds. The light-dependent reactions take place in the thylakoid membranes and produce "
    "ATP and NADPH, while the Calvin cycle in the stroma uses them to fix carbon dioxide into "
    "sugars. Plants release the oxygen as a by-product, which is why forests and oceans with "
    "phytoplankton are so important for the atmosphere of our planet."
)

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Explain recursion to a child."},
     {"role": "assistant", "content": "It is when something is defined using itself."},
     {"role": "user", "content": "Give an example in Python."}],
    [{"role": "user", "content": LONG_CONTEXT + "\n\nSummarize the text above in two sentences."}],
]


def _hf_greedy(model, prompt_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy ids and its per-step logits [steps, vocab] with EOS suppressed."""
    eos = model.generation_config.eos_token_id
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=eos if isinstance(eos, int) else eos[0])
    ids = out.sequences[0, len(prompt_ids):].tolist()
    return ids, torch.cat(out.logits, dim=0).float()


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_greedy_matches_transformers(engine_fp32, hf_smollm, index):
    messages = PROMPTS[index]
    prompt_ids = engine_fp32.tokenizer.encode_chat(messages)
    if index == len(PROMPTS) - 1:
        assert len(prompt_ids) > 150
    ours = engine_fp32.generate(
        SamplingParams(temperature=0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, logprobs=2), prompt_ids)
    with torch.inference_mode():
        ref_ids, ref_logits = _hf_greedy(hf_smollm, prompt_ids)
    assert len(ours.token_ids) == NUM_TOKENS
    ref_logprobs = torch.log_softmax(ref_logits, dim=-1)
    for step in range(NUM_TOKENS):
        top2 = ref_logits[step].topk(2).values
        margin = float(top2[0] - top2[1])
        ours_lp = ours.logprobs[step]
        # our distribution at this step matches the reference (same context so far)
        assert ours_lp.top_logprobs[0] == pytest.approx(float(ref_logprobs[step].max()), abs=LOGPROB_TOL)
        if margin < NEAR_TIE:
            # near tie: either token is acceptable; from here on the contexts may differ,
            # so compare the logits of this step and stop comparing ids
            for tok in ours_lp.top_ids[:2]:
                assert float(ref_logprobs[step, tok]) == pytest.approx(
                    ours_lp.top_logprobs[ours_lp.top_ids.index(tok)], abs=LOGPROB_TOL)
            if ours.token_ids[step] != ref_ids[step]:
                return
            continue
        assert ours.token_ids[step] == ref_ids[step], (
            f"step {step}: ours {ours.token_ids[step]} vs transformers {ref_ids[step]} (margin {margin:.3f})")


def test_prompt_tokens_match_transformers_tokenizer(engine_fp32, bundled_path):
    transformers = pytest.importorskip("transformers")
    import os
    d, name = os.path.split(bundled_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    for messages in PROMPTS:
        ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ref, dict) or hasattr(ref, "input_ids"):
            ref = ref["input_ids"]
        assert engine_fp32.tokenizer.encode_chat(messages) == list(ref)
