"""Sampler: greedy, filters, penalties, min_tokens, seeded draws, distribution, logprobs."""
from __future__ import annotations

import math

import torch

from engine.layers.sampler import (Sampler, SamplingBatch, apply_min_tokens, apply_penalties,
                                   apply_top_k_top_p_min_p)
from engine.sampling_params import SamplingParams

EOS = 4


def make_batch(params: list[SamplingParams], prompts: list[list[int]] | None = None,
               outputs: list[list[int]] | None = None) -> SamplingBatch:
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
    return SamplingBatch(params=params, generators=generators,
                         prompt_token_ids=prompts or [[] for _ in params],
                         output_token_ids=outputs or [[] for _ in params], eos_token_ids=(EOS,))


def repeated(logits: list[float], params: SamplingParams,
             rows: int) -> tuple[torch.Tensor, SamplingBatch]:
    return torch.tensor([logits] * rows), make_batch([params] * rows)


def frequencies(token_ids: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(token_ids), minlength=vocab).float() / len(token_ids)


def test_greedy_takes_the_argmax_of_each_row():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 6))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_rows_in_a_mixed_batch_take_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 2
    out = Sampler()(logits, make_batch(params))
    assert [out.token_ids[0], out.token_ids[2]] == logits[[0, 2]].argmax(-1).tolist()


def test_top_k_1_equals_greedy_at_any_temperature():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    for temperature in (0.3, 1.0, 5.0, 100.0):
        out = Sampler()(logits, make_batch([SamplingParams(temperature=temperature, top_k=1)] * 8))
        assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_selects_the_max():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(3))
    out = Sampler()(logits, make_batch([SamplingParams(temperature=2.0, top_p=1e-6)] * 8))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits, batch = repeated([0.0, 3.0, 1.0, 2.0, -1.0], SamplingParams(top_k=2), rows=2000)
    assert set(Sampler()(logits, batch).token_ids) == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits, batch = repeated(probs.log().tolist(), SamplingParams(top_p=0.7), rows=2000)
    assert set(Sampler()(logits, batch).token_ids) == {0, 1}


def test_min_p_drops_tokens_below_min_p_times_the_max_prob():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    filtered = apply_top_k_top_p_min_p(probs.log()[None], [SamplingParams(min_p=0.35)])
    # threshold 0.35 * 0.5 = 0.175 keeps tokens 0 and 1 only
    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False]
    assert torch.allclose(filtered[0, :2], probs.log()[:2])


def test_min_p_samples_renormalize_over_the_kept_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits, batch = repeated(probs.log().tolist(), SamplingParams(min_p=0.35), rows=20000)
    freqs = frequencies(Sampler()(logits, batch).token_ids, 4)
    assert torch.allclose(freqs, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.02)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0)
    batch = make_batch([params], prompts=[[0, 1]], outputs=[[1, 3, 3]])
    expected = torch.tensor([[1.0, -2.0, 0.5, 1.5, -2.0, 1.0]])
    assert torch.equal(apply_penalties(logits, batch), expected)


def test_frequency_penalty_subtracts_count_times_penalty_for_output_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(frequency_penalty=0.5)
    batch = make_batch([params], prompts=[[0, 2]], outputs=[[1, 3, 3]])
    expected = torch.tensor([[2.0, -1.5, 0.5, 2.0, -2.0, 1.0]])
    assert torch.equal(apply_penalties(logits, batch), expected)


def test_presence_penalty_subtracts_once_per_output_token_present():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(presence_penalty=0.75)
    batch = make_batch([params], prompts=[[0, 2]], outputs=[[1, 3, 3]])
    expected = torch.tensor([[2.0, -1.75, 0.5, 2.25, -2.0, 1.0]])
    assert torch.equal(apply_penalties(logits, batch), expected)


def test_penalties_leave_rows_that_do_not_ask_for_them_untouched():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]] * 2)
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)]
    batch = make_batch(params, prompts=[[0], [0]], outputs=[[1, 3], [1, 3]])
    result = apply_penalties(logits, batch)
    assert torch.equal(result[0], logits[0])
    assert torch.equal(result[1], torch.tensor([2.0, -3.0, 0.5, 1.0]))


def test_penalties_steer_greedy_away_from_a_repeated_token():
    logits = torch.tensor([[1.0, 3.0, 2.5, 0.0, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    out = Sampler()(logits, make_batch([params], outputs=[[1]]))
    assert out.token_ids == [2]


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached():
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(2,))
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 9.0]] * 2)  # eos (4) then stop id (2) are the max
    batch = make_batch([params] * 2, outputs=[[1, 1], [1, 1, 1]])
    blocked = apply_min_tokens(logits, batch)
    assert blocked[0].tolist() == [0.0, 1.0, -math.inf, 2.0, -math.inf]
    assert torch.equal(blocked[1], logits[1])
    assert Sampler()(logits, batch).token_ids == [3, EOS]


def test_min_tokens_leaves_eos_alone_when_eos_is_ignored():
    params = SamplingParams(min_tokens=3, ignore_eos=True)
    logits = torch.zeros(1, 5)
    assert torch.equal(apply_min_tokens(logits, make_batch([params], outputs=[[1]])), logits)


def test_seeded_sampling_is_reproducible_across_calls():
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = torch.randn(10, 1, 64, generator=torch.Generator().manual_seed(5))

    def run() -> list[int]:
        batch = make_batch([params])
        return [Sampler()(step, batch).token_ids[0] for step in logits]

    first = run()
    assert first == run()
    assert len(set(first)) > 1  # it really samples


def test_seeded_row_is_independent_of_the_rest_of_the_batch():
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=42)
    others = [SamplingParams(temperature=1.3), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=7, top_k=5), SamplingParams(min_p=0.1)]
    gen = torch.Generator().manual_seed(6)
    steps = [(torch.randn(1, 64, generator=gen), torch.randn(4, 64, generator=gen))
             for _ in range(10)]
    alone, in_batch = make_batch([seeded]), make_batch(others[:2] + [seeded] + others[2:])
    alone_ids, batch_ids = [], []
    for row, rest in steps:
        alone_ids.append(Sampler()(row, alone).token_ids[0])
        logits = torch.cat([rest[:2], row, rest[2:]])
        batch_ids.append(Sampler()(logits, in_batch).token_ids[2])
    assert alone_ids == batch_ids


def test_unseeded_samples_follow_softmax_at_temperature_1():
    logits = [1.0, 2.0, 0.5, 3.0, -1.0]
    rows, batch = repeated(logits, SamplingParams(temperature=1.0), rows=20000)
    freqs = frequencies(Sampler()(rows, batch).token_ids, 5)
    assert torch.allclose(freqs, torch.tensor(logits).softmax(-1), atol=0.015)


def test_temperature_scales_the_distribution():
    logits = [1.0, 2.0, 0.5, 3.0, -1.0]
    rows, batch = repeated(logits, SamplingParams(temperature=2.0), rows=20000)
    freqs = frequencies(Sampler()(rows, batch).token_ids, 5)
    assert torch.allclose(freqs, (torch.tensor(logits) / 2.0).softmax(-1), atol=0.015)


def test_logprobs_come_from_raw_logits_with_sorted_top_n():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(8))
    params = SamplingParams(temperature=0.7, top_k=10, repetition_penalty=1.5, logprobs=5)
    out = Sampler()(logits, make_batch([params] * 3, outputs=[[1, 2]] * 3))
    expected = logits.log_softmax(-1)
    for row, (token_id, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp is not None and lp.token_id == token_id
        assert math.isclose(lp.logprob, expected[row, token_id].item(), rel_tol=1e-6)
        top_lps, top_ids = expected[row].topk(5)
        assert lp.top_ids == top_ids.tolist()
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert torch.allclose(torch.tensor(lp.top_logprobs), top_lps)
        assert lp.rank == int((expected[row] > expected[row, token_id]).sum()) + 1


def test_logprob_rank_counts_tokens_more_likely_than_the_sampled_one():
    params = SamplingParams(temperature=0.0, min_tokens=1, logprobs=0)
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 9.0]])  # eos is blocked, so token 2 (rank 2) wins
    lp = Sampler()(logits, make_batch([params])).logprobs[0]
    assert lp is not None
    assert (lp.token_id, lp.rank, lp.top_ids, lp.top_logprobs) == (2, 2, [], [])
    assert math.isclose(lp.logprob, logits.log_softmax(-1)[0, 2].item(), rel_tol=1e-6)


def test_logprobs_are_only_returned_for_rows_that_ask():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(9))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(temperature=0.0)]
    out = Sampler()(logits, make_batch(params))
    assert out.logprobs[0] is None and out.logprobs[2] is None
    assert out.logprobs[1] is not None and len(out.logprobs[1].top_ids) == 2
