"""Engine behaviour on the bundled SmolLM2 (float32): batching, preemption, prefix cache,
block accounting, stops, seeded sampling, streaming, limits and the async engine.

Most tests share the session engine `engine_fp32`; the `engine` fixture below checks that
each test leaves it with no request behind. Tests that need other settings (a tiny KV
budget, no prefix cache, a background loop) build their own small engine once per module.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable, Iterator

import pytest

from engine.api import Engine, EngineBuilder, ModelRepo, SamplingParams
from engine.async_engine import AsyncEngine
from engine.engine import LLMEngine
from engine.outputs import EngineStats
from engine.request import RequestStatus

CORPUS = "\n\n".join((
    ("The history of the lighthouse begins with fires lit on hilltops to guide ships home at night. The "
     "Pharos of Alexandria, built in the third century before our era, stood more than a hundred metres "
     "tall and was counted among the wonders of the ancient world. For centuries afterwards, keepers "
     "burned wood, coal and later whale oil in iron baskets or glass lanterns, climbing hundreds of steps "
     "each evening to trim the wicks. The invention of the Fresnel lens in 1822 changed everything: rings "
     "of prisms bent the light of a single lamp into a narrow, powerful beam that could be seen from more "
     "than twenty miles away."),
    ("Bread is one of the oldest prepared foods. Flour, water, salt and yeast are mixed into a dough, "
     "which is kneaded until the gluten forms long elastic strands. The dough then rests while the yeast "
     "eats sugars and releases carbon dioxide, so that the loaf rises. A baker shapes it, lets it proof a "
     "second time and bakes it in a hot oven, where steam keeps the crust soft at first so the bread can "
     "expand before the surface browns. Sourdough replaces commercial yeast with a starter of wild yeast "
     "and lactic acid bacteria, which gives the loaf its tangy flavour and a longer shelf life."),
    ("A compiler translates a program written in a high-level language into machine code. The front end "
     "reads the source text, splits it into tokens and builds a syntax tree; the middle end checks types "
     "and rewrites the tree into an intermediate representation that is easier to optimise; the back end "
     "chooses instructions, allocates registers and writes the final binary. Optimisations such as "
     "constant folding, inlining and loop unrolling can make programs many times faster, but each one must"
     " preserve the meaning of the original code exactly, which is why compiler engineers test their work "
     "on millions of programs."),
    ("The monarch butterfly travels up to four thousand kilometres every autumn, from Canada and the "
     "northern United States to a few mountain forests in central Mexico. No single butterfly makes the "
     "round trip: the migrants that fly south live for about eight months, while the generations that "
     "carry the population north again in spring live only a few weeks each. Scientists believe the "
     "insects navigate with a sun compass in their antennae, corrected by an internal clock, and perhaps "
     "with the help of the magnetic field of the Earth."),
    ("Chess is played on a board of sixty-four squares by two players who move in turn. Each side starts "
     "with sixteen pieces: a king, a queen, two rooks, two bishops, two knights and eight pawns. The goal "
     "is to checkmate the opposing king, that is, to attack it so that it cannot escape. Openings have "
     "been studied for centuries, and modern engines that search millions of positions per second have "
     "shown that many lines once thought dubious are in fact perfectly sound. Even so, the game is far "
     "from solved, because the number of possible positions is astronomically large."),
    ("Rivers shape the land they cross. In the mountains, fast water carries stones and sand that grind "
     "the riverbed into steep valleys; on the plains, the current slows, drops its load and winds through "
     "wide meanders that shift from year to year. Where a river meets the sea it may build a delta of "
     "fertile silt, as the Nile and the Mississippi have done. Floods that once renewed farmland every "
     "spring are now often held back by dams and levees, which protect towns but also starve the delta of "
     "the sediment it needs."),
)) + "\n"

BEACH = [{"role": "user", "content": "Describe a walk along the beach at sunset."}]
FRENCH = [{"role": "user", "content": "Écris une phrase en français sur la crème brûlée et le café."}]

# Sixteen requests of mixed sizes for the preemption test: (prompt tokens, max_tokens).
MIXED = ((10, 8), (400, 40), (24, 8), (300, 16), (40, 12), (160, 8), (12, 24), (220, 8),
         (64, 32), (100, 8), (18, 12), (350, 16), (32, 8), (128, 20), (80, 8), (200, 12))
SMALL_NUM_BLOCKS = 48  # 768 token slots: the largest request needs 28 blocks, all of them 161

PREFIX_LEN = 500
BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048  # engine_fp32


def _greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def _idle_leftovers(llm: LLMEngine) -> list[str]:
    """Aborts whatever requests are left and returns their ids."""
    leftover = list(llm.scheduler.requests)
    for rid in leftover:
        llm.abort_request(rid)
    return leftover


@pytest.fixture
def engine(engine_fp32: Engine) -> Iterator[Engine]:
    """The shared session engine; fails the test (after cleaning up) if a request is left in it."""
    assert not engine_fp32.llm.has_unfinished_requests(), "an earlier test left requests in engine_fp32"
    yield engine_fp32
    leftover = _idle_leftovers(engine_fp32.llm)
    assert not leftover, f"the test left requests in the shared engine: {leftover}"


@pytest.fixture(scope="module")
def corpus_ids(engine_fp32: Engine) -> list[int]:
    ids = engine_fp32.tokenizer.encode(CORPUS)
    assert len(ids) > 700
    return ids


@pytest.fixture(scope="module")
def small_engine_module() -> Engine:
    return (EngineBuilder(ModelRepo.bundled()).dtype("float32")
            .scheduler(max_num_seqs=16, max_num_batched_tokens=128, max_model_len=1024)
            .cache(num_blocks_override=SMALL_NUM_BLOCKS).build())


@pytest.fixture
def small_engine(small_engine_module: Engine) -> Iterator[Engine]:
    """Chunked prefill with a 128-token step budget and a KV pool far smaller than the load;
    left with no request behind, whatever the test did."""
    yield small_engine_module
    leftover = _idle_leftovers(small_engine_module.llm)
    assert not leftover, f"the test left requests in the small engine: {leftover}"


@pytest.fixture(scope="module")
def engine_no_cache() -> Engine:
    return (EngineBuilder(ModelRepo.bundled()).dtype("float32")
            .scheduler(max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=1024)
            .cache(enable_prefix_caching=False).build())


@pytest.fixture(scope="module")
def async_llm() -> LLMEngine:
    """A separate engine for the background loop (never stepped from two threads at once)."""
    return (EngineBuilder(ModelRepo.bundled()).dtype("float32")
            .scheduler(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=512)
            .build_llm_engine())


@contextlib.contextmanager
def _running(llm: LLMEngine) -> Iterator[AsyncEngine]:
    aeng = AsyncEngine(llm).start()
    try:
        yield aeng
    finally:
        aeng.shutdown()
        _idle_leftovers(llm)


# ---- a. concurrency and preemption -------------------------------------------------------

def test_concurrent_mixed_requests_under_preemption_equal_their_alone_outputs(small_engine, corpus_ids):
    llm = small_engine.llm
    prompts = [corpus_ids[(i * 37) % (len(corpus_ids) - n):][:n] for i, (n, _) in enumerate(MIXED)]
    params = [_greedy(max_tokens) for _, max_tokens in MIXED]
    assert sum(-(-(n + m) // BLOCK_SIZE) for n, m in MIXED) > 3 * SMALL_NUM_BLOCKS

    preemptions_before = llm.stats().num_preemptions
    together = small_engine.generate_batch(list(zip(params, prompts)))
    assert llm.stats().num_preemptions > preemptions_before
    assert llm.stats().num_free_blocks == llm.stats().num_blocks

    preemptions = llm.stats().num_preemptions
    for i, (p, prompt) in enumerate(zip(params, prompts)):
        llm.block_pool.reset_cache()  # a cold cache: the reference computes everything itself
        alone = small_engine.generate(p, prompt)
        assert together[i].token_ids == alone.token_ids, f"request {i} ({MIXED[i]})"
        assert together[i].text == alone.text
        assert together[i].finish_reason == alone.finish_reason == "length"
    assert llm.stats().num_preemptions == preemptions  # alone, every request fits


# ---- b. prefix cache ---------------------------------------------------------------------

def test_shared_prefix_reuses_cached_blocks_and_matches_cache_off(engine, engine_no_cache, corpus_ids):
    tok = engine.tokenizer
    prefix = corpus_ids[:PREFIX_LEN]
    first = prefix + tok.encode("\n\nQuestion: What did the Fresnel lens change?\nAnswer:")
    second = prefix + tok.encode("\n\nQuestion: How does sourdough differ from other bread?\nAnswer:")
    params = _greedy(8)
    engine.generate(params, first)

    hits_before = engine.llm.stats().prefix_hits
    cached = engine.generate(params, second)
    reusable = PREFIX_LEN // BLOCK_SIZE * BLOCK_SIZE  # 496: full blocks only
    assert engine.llm.stats().prefix_hits - hits_before >= reusable
    assert cached.usage.cached_tokens >= reusable
    assert cached.usage.prompt_tokens == len(second)

    uncached = engine_no_cache.generate(params, second)
    assert uncached.usage.cached_tokens == 0
    assert cached.token_ids == uncached.token_ids
    assert cached.text == uncached.text


# ---- c. block accounting -------------------------------------------------------------------

def _run_steps_until(llm: LLMEngine, done: Callable[[], bool], max_steps: int = 50) -> None:
    for _ in range(max_steps):
        if done():
            return
        llm.step()
    raise AssertionError(f"condition not reached in {max_steps} steps")


def test_finished_request_returns_its_blocks(engine, corpus_ids):
    start = engine.llm.stats().num_free_blocks
    result = engine.generate(_greedy(8), corpus_ids[100:300])
    assert result.finish_reason == "length"
    assert engine.llm.stats().num_free_blocks == start


def test_request_aborted_mid_decode_returns_its_blocks(engine, corpus_ids):
    llm = engine.llm
    start = llm.stats().num_free_blocks
    req = llm.make_request(corpus_ids[200:400], _greedy(100))
    llm.add_request(req)
    _run_steps_until(llm, lambda: req.num_output_tokens >= 3)
    assert llm.stats().num_free_blocks < start
    assert llm.abort_request(req.request_id)
    assert req.finish_reason == "abort"
    assert llm.stats().num_free_blocks == start
    assert not llm.has_unfinished_requests()


def test_request_aborted_while_waiting_returns_its_blocks(engine, corpus_ids):
    llm = engine.llm
    start = llm.stats().num_free_blocks
    req = llm.make_request(corpus_ids[:50], _greedy(8))
    llm.add_request(req)
    assert llm.stats().num_waiting == 1
    assert llm.abort_request(req.request_id)
    assert llm.stats().num_waiting == 0
    assert llm.stats().num_free_blocks == start
    assert llm.step() == []


def test_request_aborted_mid_prefill_returns_its_blocks(small_engine, corpus_ids):
    llm = small_engine.llm
    start = llm.stats().num_free_blocks
    req = llm.make_request(corpus_ids[300:600], _greedy(8))  # 300 tokens: 3 chunks of <= 128
    llm.add_request(req)
    llm.step()
    assert 0 < req.num_computed_tokens < req.num_prompt_tokens
    assert llm.abort_request(req.request_id)
    assert llm.stats().num_free_blocks == start
    assert not llm.has_unfinished_requests()


def test_preempted_request_aborted_returns_its_blocks(small_engine, corpus_ids):
    """Two 383-token prompts fill all 48 blocks but one slot each: the first decode that
    needs a new block preempts the later request."""
    llm = small_engine.llm
    start = llm.stats().num_free_blocks
    assert start == SMALL_NUM_BLOCKS
    n = SMALL_NUM_BLOCKS // 2 * BLOCK_SIZE - 1
    reqs = [llm.make_request(corpus_ids[i * 300:i * 300 + n], _greedy(40)) for i in range(2)]
    for req in reqs:
        llm.add_request(req)
    _run_steps_until(llm, lambda: reqs[1].status == RequestStatus.PREEMPTED)
    assert reqs[0].status == RequestStatus.RUNNING
    assert llm.abort_request(reqs[1].request_id)
    assert llm.stats().num_waiting == 0
    assert llm.abort_request(reqs[0].request_id)
    assert llm.stats().num_free_blocks == start
    assert not llm.has_unfinished_requests()


# ---- d. stops ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def beach_reference(engine_fp32):
    """The no-stop greedy continuation that the stop tests cut."""
    result = engine_fp32.generate(_greedy(40), BEACH)
    assert len(result.token_ids) == 40 and len(result.text) > 60
    return result


def _stop_string_in(text: str) -> str:
    """Six characters from the middle of the text (spanning a token boundary)."""
    stop = text[len(text) // 2:len(text) // 2 + 6]
    assert stop.strip()
    return stop


def test_max_tokens_finishes_with_length(beach_reference):
    assert beach_reference.finish_reason == "length"
    assert beach_reference.stop_reason is None
    assert beach_reference.usage.completion_tokens == 40


def test_stop_string_cuts_the_text_before_it(engine, beach_reference):
    stop = _stop_string_in(beach_reference.text)
    result = engine.generate(_greedy(40, stop=(stop,)), BEACH)
    assert stop not in result.text
    assert result.text == beach_reference.text[:beach_reference.text.index(stop)]
    assert result.finish_reason == "stop"
    assert result.stop_reason == stop
    assert result.token_ids == beach_reference.token_ids[:len(result.token_ids)]
    assert len(result.token_ids) < 40


def test_earliest_of_several_stop_strings_wins(engine, beach_reference):
    text = beach_reference.text
    late, early = text[-8:], _stop_string_in(text)
    assert text.index(early) < text.index(late)
    result = engine.generate(_greedy(40, stop=(late, early)), BEACH)
    assert result.text == text[:text.index(early)]
    assert result.stop_reason == early


def test_stop_token_id_ends_with_stop(engine, beach_reference):
    stop_id = beach_reference.token_ids[10]
    first = beach_reference.token_ids.index(stop_id)
    result = engine.generate(_greedy(40, stop_token_ids=(stop_id,)), BEACH)
    assert result.token_ids == beach_reference.token_ids[:first + 1]
    assert result.finish_reason == "stop"
    assert result.stop_reason == stop_id


def test_stop_string_completed_by_the_last_allowed_token_finishes_with_stop(engine, beach_reference):
    tok = engine.tokenizer
    stop = _stop_string_in(beach_reference.text)
    ids = beach_reference.token_ids
    completing = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n]))
    result = engine.generate(_greedy(completing, stop=(stop,)), BEACH)
    assert result.text == beach_reference.text[:beach_reference.text.index(stop)]
    assert (result.finish_reason, result.stop_reason) == ("stop", stop)


# ---- e. seeded sampling ----------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    seeded = SamplingParams(temperature=0.8, seed=123, max_tokens=16, ignore_eos=True)
    first = engine.generate(seeded, BEACH)
    again = engine.generate(seeded, BEACH)
    assert again.token_ids == first.token_ids

    batch = engine.generate_batch([
        (_greedy(20), FRENCH),
        (SamplingParams(temperature=1.0, max_tokens=12), BEACH),                # unseeded
        (seeded, BEACH),
        (SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True), BEACH),
    ])
    assert batch[2].token_ids == first.token_ids
    assert batch[2].text == first.text
    assert batch[3].token_ids != first.token_ids  # the seed matters
    assert first.token_ids != engine.generate(_greedy(16), BEACH).token_ids  # it really samples


# ---- f. streaming ----------------------------------------------------------------------------

def test_streamed_chunks_concatenate_to_the_full_text(engine):
    params = _greedy(24)
    chunks = list(engine.stream(params, FRENCH))
    full = engine.generate(params, FRENCH)
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].finish_reason == full.finish_reason == "length"


# ---- g. limits -------------------------------------------------------------------------------

def test_prompt_longer_than_max_model_len_is_refused_with_both_numbers(engine, corpus_ids):
    prompt = (corpus_ids * 3)[:2100]
    with pytest.raises(ValueError) as info:
        engine.generate(_greedy(4), prompt)
    assert "2100" in str(info.value) and str(MAX_MODEL_LEN) in str(info.value)
    assert not engine.llm.has_unfinished_requests()


# ---- duplicate request ids -----------------------------------------------------------------------

def test_refused_duplicate_request_id_leaves_the_first_request_intact(engine, beach_reference):
    llm = engine.llm
    stop = _stop_string_in(beach_reference.text)
    prompt = engine.tokenizer.encode_chat(BEACH)
    first = llm.make_request(prompt, _greedy(40, stop=(stop,)), request_id="same-id")
    llm.add_request(first)
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request(llm.make_request(prompt[:5], _greedy(3), request_id="same-id"))
    text = ""
    while llm.has_unfinished_requests():
        text += "".join(out.new_text for out in llm.step())
    assert text == beach_reference.text[:beach_reference.text.index(stop)]
    assert first.finish_reason == "stop"


# ---- h. async engine ---------------------------------------------------------------------------

async def _collect_text(outputs: AsyncIterator) -> str:
    return "".join([out.new_text async for out in outputs])


async def _wait_until_idle(aeng: AsyncEngine, max_polls: int = 200) -> EngineStats:
    """Polls the loop thread until no request is left (each poll awaits a round trip)."""
    for _ in range(max_polls):
        stats = await aeng.call(lambda e: e.stats())
        if stats.num_running == stats.num_waiting == 0:
            return stats
    raise AssertionError("the async engine still has requests")


def test_async_engine_concurrent_consumers_get_the_sync_text(async_llm):
    params = _greedy(16)
    prompts = [async_llm.tokenizer.encode_chat(m) for m in (BEACH, FRENCH)]
    expected = Engine(async_llm).generate_batch([(params, p) for p in prompts])

    async def main() -> list[str]:
        with _running(async_llm) as aeng:
            return await asyncio.gather(*(_collect_text(aeng.generate(aeng.make_request(p, params)))
                                          for p in prompts))

    assert asyncio.run(main()) == [r.text for r in expected]


def test_async_engine_leaving_the_loop_early_aborts_the_request(async_llm):
    prompt = async_llm.tokenizer.encode_chat(BEACH)

    async def main() -> None:
        with _running(async_llm) as aeng:
            start = (await aeng.call(lambda e: e.stats())).num_free_blocks
            req = aeng.make_request(prompt, _greedy(400))
            received = 0
            async for _ in aeng.generate(req):
                received += 1
                if received == 3:
                    assert (await aeng.call(lambda e: e.stats())).num_free_blocks < start
                    break
            stats = await _wait_until_idle(aeng)
            assert req.finish_reason == "abort"
            assert req.num_output_tokens < 400
            assert stats.num_free_blocks == start
            assert aeng.is_running

    asyncio.run(main())


def test_async_engine_refuses_a_duplicate_request_id_and_keeps_serving(async_llm):
    params = _greedy(16)
    prompt = async_llm.tokenizer.encode_chat(BEACH)
    expected = Engine(async_llm).generate(params, prompt).text

    async def main() -> None:
        with _running(async_llm) as aeng:
            first = aeng.generate(aeng.make_request(prompt, params, request_id="same-id"))
            text = (await asyncio.wait_for(anext(first), 30)).new_text
            with pytest.raises(ValueError):
                await asyncio.wait_for(anext(aeng.generate(aeng.make_request(prompt, params,
                                                                             request_id="same-id"))), 30)
            assert aeng.is_running
            text += await asyncio.wait_for(_collect_text(first), 30)
            assert text == expected

    asyncio.run(main())
