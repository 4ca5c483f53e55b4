"""Conversions between engine dataclasses and pd.v1 protobuf messages."""
from __future__ import annotations

from dataclasses import asdict

from engine.kv_connector import RemotePrefillResult
from engine.layers.sampler import TopLogprobs
from engine.sampling_params import SamplingParams
from pd._generated import prefill_pb2 as pb
from pd.transport.fingerprint import Fingerprint, KVSpec


def fingerprint_to_pb(fp: Fingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(**asdict(fp))


def fingerprint_from_pb(msg: pb.ModelFingerprint) -> Fingerprint:
    return Fingerprint(msg.architecture, msg.num_layers, msg.hidden_size, msg.num_kv_heads, msg.head_dim,
                       msg.vocab_size, msg.tokenizer_hash)


def kv_spec_to_pb(spec: KVSpec) -> pb.KVSpec:
    return pb.KVSpec(**asdict(spec))


def kv_spec_from_pb(msg: pb.KVSpec) -> KVSpec:
    return KVSpec(msg.dtype, msg.block_size, msg.layout)


def sampling_to_pb(p: SamplingParams) -> pb.SamplingSpec:
    return pb.SamplingSpec(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty, has_seed=p.seed is not None, seed=p.seed or 0,
        logprobs=-1 if p.logprobs is None else p.logprobs, stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos, min_tokens=p.min_tokens)


def sampling_from_pb(s: pb.SamplingSpec) -> SamplingParams:
    """The prefill node samples only the first token: max_tokens is 1."""
    return SamplingParams(
        max_tokens=1, temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, min_p=s.min_p,
        repetition_penalty=s.repetition_penalty or 1.0, frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty, seed=s.seed if s.has_seed else None,
        logprobs=None if s.logprobs < 0 else s.logprobs, stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos, min_tokens=min(s.min_tokens, 1))


def logprobs_to_pb(lp: TopLogprobs | None) -> pb.TokenLogprob | None:
    if lp is None:
        return None
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank, top_ids=lp.top_ids,
                           top_logprobs=lp.top_logprobs)


def done_to_result(done: pb.PrefillDone, asked_logprobs: bool) -> RemotePrefillResult:
    lp = None
    if asked_logprobs and done.HasField("logprobs"):
        m = done.logprobs
        lp = TopLogprobs(m.token_id, m.logprob, m.rank, list(m.top_ids), list(m.top_logprobs))
    return RemotePrefillResult(done.first_token_id, lp, done.num_cached_tokens)
