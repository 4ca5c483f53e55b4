"""Sampler: logits -> next token ids, with penalties, filters, seeded draws and logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """The rows sampled this step, in logits row order; built by the model runner."""
    params: list[SamplingParams]
    generators: list[torch.Generator | None]   # per request, seeded when params.seed is set
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]           # generated so far (before this step)
    eos_token_ids: tuple[int, ...] = ()         # blocked while a row is under min_tokens


@dataclass
class TopLogprobs:
    token_id: int
    logprob: float
    rank: int                  # 1-based rank of the sampled token in the distribution
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TopLogprobs | None]


class Sampler:
    """Samples one token per row.

    Order: repetition/frequency/presence penalties, min_tokens, temperature, top_k, top_p,
    min_p, then an exponential-race draw (argmax of probs / Exp(1) noise). Greedy rows take
    the argmax of the penalized logits. Seeded rows draw their noise from their own
    generator, so their tokens do not depend on the rest of the batch. Logprobs are taken
    from the raw logits, as vLLM does by default.
    """

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(batch.params):
            raise ValueError(f"logits must be [num_rows, vocab] with {len(batch.params)} rows, "
                             f"got shape {tuple(logits.shape)}")
        raw = logits.float()
        processed = apply_min_tokens(apply_penalties(raw, batch), batch)
        if all(p.is_greedy for p in batch.params):
            token_ids = processed.argmax(dim=-1)
        else:
            token_ids = _sample(processed, batch)
        return SamplerOutput(token_ids=token_ids.tolist(),
                             logprobs=_logprobs(raw, token_ids, batch.params))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """HF repetition penalty over prompt+output; OpenAI frequency/presence over output."""
    rows = [i for i, p in enumerate(batch.params) if p.has_penalties]
    if not rows:
        return logits
    params = [batch.params[i] for i in rows]
    vocab, device = logits.shape[1], logits.device
    sub = logits[rows]
    output_counts = _token_counts([batch.output_token_ids[i] for i in rows], vocab, device)
    is_in_output = output_counts > 0

    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = _token_counts([batch.prompt_token_ids[i] for i in rows], vocab, device)
        rep = _column([p.repetition_penalty for p in params], device)
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(is_in_output | (prompt_counts > 0), penalized, sub)

    freq = _column([p.frequency_penalty for p in params], device)
    presence = _column([p.presence_penalty for p in params], device)
    sub = sub - freq * output_counts - presence * is_in_output.float()
    return logits.index_copy(0, torch.tensor(rows, device=device), sub)


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Sets eos and stop token ids to -inf for rows that have not reached min_tokens."""
    vocab = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, p in enumerate(batch.params):
        if len(batch.output_token_ids[i]) >= p.min_tokens:
            continue
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids.update(batch.eos_token_ids)
        for token_id in stop_ids:
            if 0 <= token_id < vocab:
                rows.append(i)
                cols.append(token_id)
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(index, torch.tensor(_NEG_INF, device=logits.device))


def skip_draw(generator: torch.Generator, vocab_size: int) -> None:
    """Advances a request's generator past one sampling step (the draw _sample makes), for
    a token that was sampled elsewhere (e.g. the first token, on a prefill node)."""
    torch.empty(vocab_size, dtype=torch.float32).exponential_(generator=generator)


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Samples non-greedy rows; greedy rows in a mixed batch take the argmax."""
    params, device = batch.params, logits.device
    is_greedy = torch.tensor([p.is_greedy for p in params], device=device)
    temperature = _column([1.0 if p.is_greedy else p.temperature for p in params], device)
    probs = apply_top_k_top_p_min_p(logits / temperature, params).softmax(dim=-1)

    seeded = [i for i, (p, g) in enumerate(zip(params, batch.generators))
              if g is not None and not p.is_greedy]
    noise = torch.empty_like(probs)
    if len(seeded) < len(params):
        noise.exponential_()  # seeded rows are overwritten below
    for i in seeded:
        noise[i].exponential_(generator=batch.generators[i])
    sampled = (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
    return torch.where(is_greedy, logits.argmax(dim=-1), sampled)


def apply_top_k_top_p_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Masks filtered tokens to -inf for all rows at once (one sort over the batch)."""
    vocab, device = logits.shape[1], logits.device
    top_k = [p.effective_top_k if 0 < p.effective_top_k < vocab else vocab for p in params]
    use_top_k = any(k < vocab for k in top_k)
    use_top_p = any(p.top_p < 1.0 for p in params)
    use_min_p = any(p.min_p > 0.0 for p in params)
    if not (use_top_k or use_top_p or use_min_p):
        return logits

    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    if use_top_k:
        positions = torch.arange(vocab, device=device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(positions >= _column(top_k, device), _NEG_INF)
    if use_top_p:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        top_p = _column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, _NEG_INF)
    if use_min_p:
        probs = sorted_logits.softmax(dim=-1)
        min_p = _column([p.min_p for p in params], device)
        sorted_logits = sorted_logits.masked_fill(probs < min_p * probs[:, :1], _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter_(1, sorted_ids, sorted_logits)


def _logprobs(raw: torch.Tensor, token_ids: torch.Tensor,
              params: list[SamplingParams]) -> list[TopLogprobs | None]:
    """Sampled-token logprob, rank and top-n from log_softmax of the raw logits."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TopLogprobs | None] = [None] * len(params)
    if not rows:
        return result
    index = torch.tensor(rows, device=raw.device)
    logprobs = raw[index].log_softmax(dim=-1)
    sampled = token_ids[index].unsqueeze(1)
    sampled_logprobs = logprobs.gather(1, sampled)
    ranks = (logprobs > sampled_logprobs).sum(dim=-1) + 1
    num_top = max(params[i].logprobs or 0 for i in rows)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)

    columns = zip(sampled.squeeze(1).tolist(), sampled_logprobs.squeeze(1).tolist(),
                  ranks.tolist(), top_ids.tolist(), top_logprobs.tolist())
    for i, (token_id, logprob, rank, ids, lps) in zip(rows, columns):
        n = params[i].logprobs or 0
        result[i] = TopLogprobs(token_id=token_id, logprob=logprob, rank=rank,
                                top_ids=ids[:n], top_logprobs=lps[:n])
    return result


def _token_counts(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float counts of each id, built with one scatter_add."""
    max_len = max((len(ids) for ids in token_ids), default=0)
    counts = torch.zeros(len(token_ids), vocab + 1, device=device)
    if max_len:
        # Padding (and any id past the vocab) lands in the extra column, dropped below.
        padded = [ids + [vocab] * (max_len - len(ids)) for ids in token_ids]
        index = torch.tensor(padded, device=device).clamp_(0, vocab)
        counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab]


def _column(values: list[float] | list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
