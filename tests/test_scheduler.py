"""Scheduler driven step by step without a model: made-up sampled tokens stand in for the runner."""
from __future__ import annotations

import pytest

from engine.config import SchedulerConfig
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager
from engine.kv_connector import FinishedTransfers, KVConnector, RemotePrefillResult
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

BS = 4
EOS = 2
TOKEN = 7  # a sampled token that stops nothing
MAX_STEPS = 200


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 32,
                   max_model_len: int = 256, connector: KVConnector | None = None,
                   enable_chunked_prefill: bool = True) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          enable_chunked_prefill=enable_chunked_prefill)
    return Scheduler(cfg, max_model_len, KVCacheManager(BlockPool(num_blocks), BS), connector)


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, first_id: int = 1000,
                 **params) -> Request:
    return Request(rid, list(range(first_id, first_id + prompt_len)),
                   SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=(EOS,), max_tokens=max_tokens)


def step(sched: Scheduler, tokens: dict[str, int] | None = None) -> SchedulerOutput:
    out = sched.schedule()
    tokens = tokens or {}
    sampled = {s.request.request_id: tokens.get(s.request.request_id, TOKEN)
               for s in out.scheduled if s.samples}
    sched.update_from_output(out, sampled)
    return out


def run_until_idle(sched: Scheduler) -> list[SchedulerOutput]:
    outs = []
    for _ in range(MAX_STEPS):
        if not sched.has_work():
            return outs
        outs.append(step(sched))
    raise AssertionError(f"scheduler still busy after {MAX_STEPS} steps")


def free_blocks(sched: Scheduler) -> int:
    return sched.kv.pool.num_free_blocks


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled]


# ---- token budget, chunked prefill, batching ---------------------------------------------------

def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    req = make_request("a", 20)
    sched.add_request(req)
    planned = []
    for _ in range(3):
        out = sched.schedule()
        planned.append((chunks(out), out.scheduled[0].samples))  # samples: read before the update
        sched.update_from_output(out, {"a": TOKEN} if out.scheduled[0].samples else {})
    assert planned == [([("a", 0, 8)], False), ([("a", 8, 8)], False), ([("a", 16, 4)], True)]
    assert req.output_token_ids == [TOKEN]
    assert req.num_computed_tokens == 20


def test_prompt_is_not_split_without_chunked_prefill():
    sched = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    sched.add_request(make_request("a", 10))
    sched.add_request(make_request("b", 10, first_id=2000))
    assert chunks(step(sched)) == [("a", 0, 10)]
    assert chunks(step(sched)) == [("a", 10, 1), ("b", 0, 10)]


def test_every_step_stays_within_the_token_budget():
    sched = make_scheduler(max_num_batched_tokens=10)
    for i, n in enumerate([3, 17, 9, 25, 1, 12]):
        sched.add_request(make_request(f"r{i}", n, max_tokens=5, first_id=1000 + 100 * i))
    outs = run_until_idle(sched)
    assert all(0 < o.num_tokens <= 10 for o in outs)
    assert sum(o.num_tokens for o in outs) == (3 + 17 + 9 + 25 + 1 + 12) + 6 * 4


def test_decodes_are_listed_before_prefill_chunks():
    sched = make_scheduler()
    sched.add_request(make_request("a", 5, max_tokens=10))
    step(sched)
    sched.add_request(make_request("b", 6, first_id=2000))
    out = step(sched)
    assert chunks(out) == [("a", 5, 1), ("b", 0, 6)]
    assert [s.is_decode for s in out.scheduled] == [True, False]


def test_decode_is_scheduled_before_a_prefill_in_progress_takes_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", 3, max_tokens=10))
    sched.add_request(make_request("b", 30, first_id=2000))
    step(sched)  # a: 3 tokens, b: first 5
    out = step(sched)
    assert chunks(out) == [("a", 3, 1), ("b", 5, 7)]


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", 4, max_tokens=3, first_id=1000 + 100 * i) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    outs = []
    while sched.has_work() and len(outs) < MAX_STEPS:
        outs.append(step(sched))
        assert len(sched.running) <= 2
    assert all(len(o.scheduled) <= 2 for o in outs)
    assert {s.request.request_id for s in outs[0].scheduled} == {"r0", "r1"}
    assert all(r.finish_reason == "length" for r in reqs)


def test_new_request_joins_the_running_batch_mid_flight():
    sched = make_scheduler()
    a = make_request("a", 4, max_tokens=6)
    sched.add_request(a)
    step(sched)
    step(sched)
    sched.add_request(make_request("b", 4, first_id=2000))
    out = step(sched)
    assert chunks(out) == [("a", 5, 1), ("b", 0, 4)]
    assert a.num_output_tokens == 3
    assert [r.request_id for r in sched.running] == ["a", "b"]


# ---- preemption ------------------------------------------------------------------------------

def fill_pool_until_preemption(sched: Scheduler) -> SchedulerOutput:
    for _ in range(MAX_STEPS):
        out = step(sched)
        if out.preempted_ids:
            return out
    raise AssertionError("no preemption happened")


def preemption_setup() -> tuple[Scheduler, list[Request]]:
    # 4 blocks of 4 tokens: a and b (6-token prompts) fit at first, then outgrow the pool.
    sched = make_scheduler(num_blocks=4, max_num_seqs=2)
    reqs = [make_request("a", 6, max_tokens=6), make_request("b", 6, max_tokens=6, first_id=2000),
            make_request("c", 3, max_tokens=2, first_id=3000)]
    for r in reqs:
        sched.add_request(r)
    return sched, reqs


def test_running_out_of_blocks_preempts_the_most_recently_admitted_request():
    sched, (a, b, c) = preemption_setup()
    out = fill_pool_until_preemption(sched)
    assert out.preempted_ids == ["b"]
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    assert sched.running == [a]
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_preemptions == 1


def test_preempted_request_is_requeued_at_the_front_with_nothing_computed():
    sched, (a, b, c) = preemption_setup()
    fill_pool_until_preemption(sched)
    assert list(sched.waiting) == [b, c]
    assert b.num_computed_tokens == 0
    assert sched.kv.block_table("b") == []


def test_preempted_request_is_recomputed_and_completes():
    sched, reqs = preemption_setup()
    fill_pool_until_preemption(sched)
    b_outputs = list(reqs[1].output_token_ids)
    run_until_idle(sched)
    assert [r.finish_reason for r in reqs] == ["length", "length", "length"]
    assert reqs[1].output_token_ids[:len(b_outputs)] == b_outputs
    assert reqs[1].num_output_tokens == 6
    assert free_blocks(sched) == 4
    assert sched.num_preemptions >= 1


# ---- stop conditions -------------------------------------------------------------------------

def test_max_tokens_finishes_with_length():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=3)
    sched.add_request(req)
    run_until_idle(sched)
    assert req.output_token_ids == [TOKEN] * 3
    assert req.finish_reason == "length"
    assert req.stop_reason is None


def test_reaching_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=8)
    req = make_request("a", 5, max_tokens=100)
    sched.add_request(req)
    run_until_idle(sched)
    assert req.num_tokens == 8
    assert req.finish_reason == "length"


def test_eos_finishes_with_stop():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10)
    sched.add_request(req)
    step(sched)
    step(sched, {"a": EOS})
    assert req.output_token_ids == [TOKEN, EOS]
    assert req.finish_reason == "stop"
    assert req.stop_reason is None
    assert not sched.has_work()


def test_eos_is_ignored_with_ignore_eos():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=3, ignore_eos=True)
    sched.add_request(req)
    for _ in range(3):
        step(sched, {"a": EOS})
    assert req.output_token_ids == [EOS] * 3
    assert req.finish_reason == "length"


def test_stop_token_id_finishes_with_stop_and_records_the_stop_reason():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10, stop_token_ids=(42,))
    sched.add_request(req)
    step(sched)
    step(sched, {"a": 42})
    assert req.finish_reason == "stop"
    assert req.stop_reason == 42


def test_stop_token_id_stops_even_with_ignore_eos():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10, stop_token_ids=(42,), ignore_eos=True)
    sched.add_request(req)
    step(sched, {"a": 42})
    assert req.finish_reason == "stop"
    assert req.stop_reason == 42


def test_min_tokens_prevents_an_early_eos_stop():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10, min_tokens=3)
    sched.add_request(req)
    for _ in range(3):
        step(sched, {"a": EOS})
    assert req.output_token_ids == [EOS] * 3
    assert req.finish_reason == "stop"


def test_min_tokens_prevents_an_early_stop_token_stop():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10, min_tokens=2, stop_token_ids=(42,))
    sched.add_request(req)
    step(sched, {"a": 42})
    assert not req.is_finished
    step(sched, {"a": 42})
    assert req.finish_reason == "stop"
    assert req.stop_reason == 42


# ---- abort and block accounting --------------------------------------------------------------

def test_abort_of_a_waiting_request_removes_it():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("a", 4, max_tokens=10))
    waiting = make_request("b", 4, first_id=2000)
    sched.add_request(waiting)
    step(sched)
    held = free_blocks(sched)
    assert sched.finish_request("b", RequestStatus.FINISHED_ABORTED) is waiting
    assert waiting.finish_reason == "abort"
    assert waiting not in sched.waiting
    assert free_blocks(sched) == held


def test_abort_of_a_running_request_frees_its_blocks():
    sched = make_scheduler()
    baseline = free_blocks(sched)
    req = make_request("a", 10, max_tokens=10)
    sched.add_request(req)
    step(sched)
    assert free_blocks(sched) < baseline
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert req.finish_reason == "abort"
    assert sched.running == []
    assert free_blocks(sched) == baseline
    assert not sched.has_work()


def test_abort_while_a_step_is_in_flight_discards_that_steps_token():
    sched = make_scheduler()
    baseline = free_blocks(sched)
    req = make_request("a", 5, max_tokens=10)
    sched.add_request(req)
    out = sched.schedule()
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, {"a": TOKEN}) == []
    assert req.output_token_ids == []
    assert free_blocks(sched) == baseline


def test_abort_of_an_unknown_request_returns_none():
    assert make_scheduler().finish_request("nope", RequestStatus.FINISHED_ABORTED) is None


def test_duplicate_request_id_is_rejected():
    sched = make_scheduler()
    sched.add_request(make_request("a", 4))
    with pytest.raises(ValueError):
        sched.add_request(make_request("a", 4))


def test_every_block_returns_to_the_pool_after_requests_finish_or_abort():
    sched = make_scheduler(num_blocks=12, max_num_seqs=3, max_num_batched_tokens=8)
    baseline = free_blocks(sched)
    for i, n in enumerate([5, 13, 9, 3, 11]):
        sched.add_request(make_request(f"r{i}", n, max_tokens=6, first_id=1000 + 100 * i))
    for _ in range(3):
        step(sched)
    sched.finish_request("r1", RequestStatus.FINISHED_ABORTED)  # running
    sched.finish_request("r4", RequestStatus.FINISHED_ABORTED)  # waiting
    run_until_idle(sched)
    assert free_blocks(sched) == baseline
    assert sched.kv.num_held_blocks() == 0


def test_repeated_prompt_starts_after_its_cached_prefix():
    sched = make_scheduler()
    sched.add_request(make_request("a", 10, max_tokens=1))
    run_until_idle(sched)
    again = make_request("b", 10, max_tokens=1)
    sched.add_request(again)
    out = step(sched)
    assert chunks(out) == [("b", 8, 2)]
    assert again.num_cached_tokens == 8


# ---- remote KV through a connector -----------------------------------------------------------

class FakeConnector(KVConnector):
    """Claims the whole uncomputed prompt of the requests in `remote_ids`; the test reports
    transfers by filling `pending`, which the next get_finished() hands over."""

    def __init__(self, remote_ids: tuple[str, ...] = (), keep_ids: tuple[str, ...] = ()):
        self.remote_ids = set(remote_ids)
        self.keep_ids = set(keep_ids)
        self.queried: list[str] = []
        self.allocated: dict[str, tuple[list[int], int]] = {}
        self.finished_ids: list[str] = []
        self.aborted_ids: list[str] = []
        self.pending = FinishedTransfers()

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        self.queried.append(request.request_id)
        if request.request_id not in self.remote_ids:
            return 0
        return request.num_tokens - num_computed_tokens

    def update_state_after_alloc(self, request: Request, block_ids: list[int],
                                 num_external_tokens: int) -> None:
        self.allocated[request.request_id] = (list(block_ids), num_external_tokens)

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        self.finished_ids.append(request.request_id)
        return request.request_id in self.keep_ids

    def abort_load(self, request: Request) -> None:
        self.aborted_ids.append(request.request_id)

    def get_finished(self) -> FinishedTransfers:
        finished, self.pending = self.pending, FinishedTransfers()
        return finished


def test_remote_prefill_moves_the_request_to_waiting_for_remote_kv_with_blocks_allocated():
    conn = FakeConnector(remote_ids=("x",))
    sched = make_scheduler(connector=conn)
    baseline = free_blocks(sched)
    req = make_request("x", 10)
    sched.add_request(req)
    out = step(sched)
    assert out.is_empty
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert sched.remote == {"x": req}
    assert conn.allocated == {"x": (sched.kv.block_table("x"), 10)}
    assert len(sched.kv.block_table("x")) == 3
    assert free_blocks(sched) == baseline - 3


def test_loaded_remote_kv_makes_the_request_running_with_its_first_token():
    conn = FakeConnector(remote_ids=("x",))
    sched = make_scheduler(connector=conn)
    req = make_request("x", 10)
    sched.add_request(req)
    step(sched)
    conn.pending.loaded["x"] = RemotePrefillResult(first_token_id=55)
    out = sched.schedule()
    assert req.status == RequestStatus.RUNNING
    assert req.output_token_ids == [55]
    assert sched.running == [req]
    assert [(r.request_id, res.first_token_id) for r, res in sched.remote_results] == [("x", 55)]
    assert chunks(out) == [("x", 10, 1)]
    assert req.num_computed_tokens == 10  # the prompt, before this decode step completes
    assert sched.kv.pool.num_cached_blocks == 2


def test_remote_request_completes_and_frees_its_blocks():
    conn = FakeConnector(remote_ids=("x",))
    sched = make_scheduler(connector=conn)
    baseline = free_blocks(sched)
    req = make_request("x", 10, max_tokens=3)
    sched.add_request(req)
    step(sched)
    conn.pending.loaded["x"] = RemotePrefillResult(first_token_id=55)
    run_until_idle(sched)
    assert req.output_token_ids == [55, TOKEN, TOKEN]
    assert req.finish_reason == "length"
    assert free_blocks(sched) == baseline


def test_failed_remote_load_requeues_the_request_with_its_blocks_freed():
    conn = FakeConnector(remote_ids=("x",))
    sched = make_scheduler(max_num_batched_tokens=8, connector=conn)
    x = make_request("x", 10)
    sched.add_request(x)
    step(sched)
    sched.add_request(make_request("busy", 40, first_id=2000))
    step(sched)  # "busy" prefills 8 tokens a step: no budget is left to re-admit x
    conn.pending.load_failed["x"] = "prefill node unreachable"
    step(sched)
    held_by_busy = len(sched.kv.block_table("busy"))
    assert x.status == RequestStatus.WAITING
    assert list(sched.waiting) == [x]
    assert x.num_computed_tokens == 0
    assert sched.kv.block_table("x") == []
    assert free_blocks(sched) == 64 - held_by_busy


def test_failed_remote_load_is_computed_locally_without_asking_the_connector_again():
    conn = FakeConnector(remote_ids=("x",))
    sched = make_scheduler(connector=conn)
    x = make_request("x", 10, max_tokens=2)
    sched.add_request(x)
    step(sched)
    conn.pending.load_failed["x"] = "timeout"
    out = step(sched)
    assert chunks(out) == [("x", 0, 10)]
    run_until_idle(sched)
    assert x.finish_reason == "length"
    assert conn.queried == ["x"]
    assert free_blocks(sched) == 64


def test_abort_during_a_remote_load_tells_the_connector_and_frees_the_blocks():
    conn = FakeConnector(remote_ids=("x",))
    sched = make_scheduler(connector=conn)
    sched.add_request(make_request("x", 10))
    step(sched)
    sched.finish_request("x", RequestStatus.FINISHED_ABORTED)
    assert conn.aborted_ids == ["x"]
    assert sched.remote == {}
    assert free_blocks(sched) == 64


def test_request_finished_returning_true_delays_the_free_until_sent():
    conn = FakeConnector(keep_ids=("a",))
    sched = make_scheduler(connector=conn)
    req = make_request("a", 10, max_tokens=1)
    sched.add_request(req)
    step(sched)
    assert req.finish_reason == "length"
    assert conn.finished_ids == ["a"]
    assert sched.sending == {"a": req}
    assert free_blocks(sched) == 61
    assert sched.has_work()
    step(sched)  # nothing reported yet
    assert free_blocks(sched) == 61
    conn.pending.sent.add("a")
    step(sched)
    assert sched.sending == {}
    assert free_blocks(sched) == 64
    assert not sched.has_work()


def test_remote_request_short_of_blocks_is_retried_remotely_not_prefilled_locally():
    conn = FakeConnector(remote_ids=("x",))
    sched = make_scheduler(num_blocks=4, connector=conn)
    sched.add_request(make_request("local", 8, max_tokens=1))  # holds 2 blocks for one step
    x = make_request("x", 12, first_id=2000)                      # needs 3 blocks
    sched.add_request(x)
    step(sched)
    assert x.status == RequestStatus.WAITING
    step(sched)
    assert x.status == RequestStatus.WAITING_FOR_REMOTE_KV


def test_max_num_seqs_also_bounds_requests_whose_remote_kv_loaded():
    conn = FakeConnector(remote_ids=("x",))
    sched = make_scheduler(max_num_seqs=1, connector=conn)
    sched.add_request(make_request("x", 10))
    step(sched)
    sched.add_request(make_request("busy", 4, max_tokens=10, first_id=2000))
    step(sched)
    conn.pending.loaded["x"] = RemotePrefillResult(first_token_id=55)
    out = step(sched)
    assert len(sched.running) <= 1
    assert len(out.scheduled) <= 1
