"""The serving engine (engine/llm.py, scheduler.py, kv_cache.py, runner.py; issue 5 acceptance 1):
continuous batching with chunked prefill, preemption and prefix reuse gives exactly the greedy
output of `generate`; paged InfLLM v2 decode state; aborts; sampling options; bad requests."""

from __future__ import annotations

import random

import pytest
import torch

from minicpm4.engine.config import EngineConfig
from minicpm4.engine.generate import generate
from minicpm4.engine.llm import LLM
from minicpm4.engine.request import SamplingParams
from minicpm4.model.config import SparseConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config


def _mixed_requests(n: int, seed: int = 0, max_prompt: int = 60, max_new: int = 30):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(1, max_prompt))]
               for _ in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, max_new),
                             ignore_eos=True) for _ in prompts]
    return prompts, params


def _reference(model, prompts, params) -> list[list[int]]:
    return [generate(model, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]


@torch.no_grad()
def test_greedy_equals_generate_with_chunks_and_preemption(tiny_model, one_thread) -> None:
    """Acceptance 1: 16 concurrent requests of mixed lengths, prefill in chunks of 7 tokens,
    a pool of 39 four-token pages (too small for all of them): preemptions happen, and every
    output equals `generate` run on that prompt alone."""
    prompts, params = _mixed_requests(16)
    llm = LLM(tiny_model, None, EngineConfig(block_size=4, num_kv_blocks=40,
                                             max_prefill_chunk=7, max_num_batched_tokens=32))
    outs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["preemptions_total"] > 0
    assert [o.token_ids for o in outs] == _reference(tiny_model, prompts, params)
    assert all(o.finish_reason == "length" for o in outs)
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0
    assert stats["generation_tokens_total"] == sum(p.max_tokens for p in params)


@torch.no_grad()
def test_requests_are_batched_continuously(tiny_model, one_thread) -> None:
    """Several requests share forwards: far fewer forwards than tokens computed."""
    prompts, params = _mixed_requests(12, seed=1)
    llm = LLM(tiny_model, None, EngineConfig(block_size=8, num_kv_blocks=200))
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == _reference(tiny_model, prompts, params)
    assert llm.runner.num_forwards < sum(p.max_tokens for p in params) // 3


@torch.no_grad()
def test_prefix_cache_reuses_pages_and_changes_nothing(tiny_model, one_thread) -> None:
    rng = random.Random(2)
    shared = [rng.randrange(3, 512) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(k)] for k in (3, 9, 1)]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)] * 3
    llm = LLM(tiny_model, None, EngineConfig(block_size=8, num_kv_blocks=64))
    first = llm.generate(prompts[:1], params[:1])
    rest = llm.generate(prompts[1:], params[1:])
    assert llm.stats()["prefix_cache_hit_tokens_total"] >= 2 * 40 // 8 * 8
    assert [o.token_ids for o in first + rest] == _reference(tiny_model, prompts, params)
    plain = LLM(tiny_model, None, EngineConfig(block_size=8, num_kv_blocks=64,
                                               enable_prefix_caching=False))
    plain.generate(prompts, params)
    assert plain.stats()["prefix_cache_hit_tokens_total"] == 0


@pytest.mark.parametrize("chunk", [512, 24])
@torch.no_grad()
def test_sparse_model_decodes_like_generate(chunk, one_thread) -> None:
    """InfLLM v2 (dense_len 64, blocks of 16): the pages + per-sequence compressed keys give
    the same greedy tokens as `generate` over the contiguous cache, also when the compressed
    keys must be rebuilt from pages (after a preemption, or a prefix-cache hit on a prefix
    longer than dense_len)."""
    sparse = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1,
                          window_size=32, topk=2, dense_len=64)
    model = MiniCPM4ForCausalLM(tiny_config(sparse_config=sparse, rope_scaling=None))
    model.init_weights(seed=0)
    model.eval()
    prompts, params = _mixed_requests(6, seed=3, max_prompt=120, max_new=60)
    rng = random.Random(9)
    shared = [rng.randrange(3, 512) for _ in range(100)]
    later = [shared + [7, 8, 9], shared + [11]]
    later_params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)] * 2
    llm = LLM(model, None, EngineConfig(block_size=16, num_kv_blocks=14,
                                        max_prefill_chunk=chunk, max_num_batched_tokens=512))
    outs = llm.generate(prompts + later[:1], params + later_params[:1])
    outs += llm.generate(later[1:], later_params[1:])
    stats = llm.stats()
    assert stats["preemptions_total"] > 0 and stats["prefix_cache_hit_tokens_total"] >= 96
    assert [o.token_ids for o in outs] == _reference(model, prompts + later,
                                                     params + later_params)
    assert llm.pool.sparse_states == {}  # dropped with their sequences


@torch.no_grad()
def test_abort_frees_pages_and_reports(tiny_model) -> None:
    llm = LLM(tiny_model, None, EngineConfig(block_size=4, num_kv_blocks=64))
    keep = llm.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6,
                                                     ignore_eos=True))
    gone = llm.add_request([9, 10, 11, 12], SamplingParams(temperature=0.0, max_tokens=50,
                                                           ignore_eos=True))
    llm.step()
    llm.step()
    assert llm.stats()["kv_blocks_used"] > 0
    llm.abort(gone)
    finals = {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[gone].finish_reason == "abort" and finals[gone].num_generated_tokens < 50
    assert finals[keep].finish_reason == "length" and finals[keep].num_generated_tokens == 6
    assert llm.stats()["kv_blocks_used"] == 0 and llm.stats()["requests_aborted_total"] == 1


@torch.no_grad()
def test_seeded_sampling_and_logprobs(tiny_model) -> None:
    llm = LLM(tiny_model, None, EngineConfig(block_size=8, num_kv_blocks=64))
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7, ignore_eos=True,
                       logprobs=3)
    a, b = llm.generate([[5, 6, 7], [5, 6, 7]], [p, p])
    assert a.token_ids == b.token_ids
    c = llm.generate([[5, 6, 7]], [SamplingParams(temperature=1.0, max_tokens=10, seed=8,
                                                   ignore_eos=True)])[0]
    assert c.token_ids != a.token_ids
    rid = llm.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3,
                                                    ignore_eos=True, logprobs=2))
    entries = []
    while llm.has_unfinished():
        for out in llm.step():
            if out.request_id == rid:
                entries += out.logprobs
    assert len(entries) == 3
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top) == 2 and e.top[0][0] == e.token_id
        assert e.logprob == pytest.approx(e.top[0][1]) and e.logprob <= 0


def test_bad_requests_are_refused_clearly(tiny_model) -> None:
    llm = LLM(tiny_model, None, EngineConfig(block_size=4, num_kv_blocks=8))
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([], greedy)
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request([1, 99999], greedy)
    with pytest.raises(ValueError, match="context"):
        llm.add_request([1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="KV blocks"):
        llm.add_request([1] * 40, greedy)
    llm.add_request([1, 2], greedy, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request([1, 2], greedy, request_id="x")
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=50)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_model, None, EngineConfig(max_model_len=10_000))


def test_async_engine_streams_and_cancels(tiny_model) -> None:
    """AsyncEngine: concurrent streams equal the offline engine; leaving a stream early aborts
    its request and frees its pages."""
    import asyncio

    from minicpm4.engine.async_engine import AsyncEngine

    prompts, params = _mixed_requests(6, seed=4)
    expected = [o.token_ids for o in LLM(tiny_model).generate(prompts, params)]

    async def consume(engine, i):
        ids = []
        async for out in engine.generate(prompts[i], params[i], f"r{i}"):
            ids += out.new_token_ids
        return ids

    async def cancelled(engine):
        stream = engine.generate([7] * 20, SamplingParams(temperature=0.0, max_tokens=200,
                                                          ignore_eos=True), "cancel-me")
        async for _ in stream:
            break
        await stream.aclose()

    async def main():
        engine = AsyncEngine(LLM(tiny_model, None, EngineConfig(block_size=8,
                                                                num_kv_blocks=128)))
        await engine.start()
        try:
            got = await asyncio.gather(*(consume(engine, i) for i in range(6)),
                                       cancelled(engine))
            for _ in range(100):
                if engine.stats()["num_running"] == 0:
                    break
                await asyncio.sleep(0.02)
            with pytest.raises(ValueError, match="context"):
                async for _ in engine.generate([1] * 250, SamplingParams(max_tokens=9), "bad"):
                    pass
            return got[:6], engine.stats()
        finally:
            await engine.shutdown()

    got, stats = asyncio.run(main())
    assert got == expected
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
    assert stats["requests_aborted_total"] == 1


def test_a_full_queue_refuses_new_requests(tiny_model) -> None:
    from minicpm4.engine.errors import EngineBusyError

    llm = LLM(tiny_model, None, EngineConfig(max_queued_requests=2))
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.add_request([5, 6], greedy)
    llm.add_request([5, 7], greedy)
    with pytest.raises(EngineBusyError, match="retry later"):
        llm.add_request([5, 8], greedy)
    assert llm.load() == (0, 2)
    while llm.has_unfinished():
        llm.step()
    llm.add_request([5, 8], greedy)  # room again once the queue drained


def test_a_failed_step_ends_requests_in_flight_and_the_engine_serves_on(tiny_model) -> None:
    import asyncio

    from minicpm4.engine.async_engine import AsyncEngine, EngineDeadError

    llm = LLM(tiny_model, None, EngineConfig(block_size=8, num_kv_blocks=64))
    real_run, calls = llm.runner.run, []

    def flaky_run(scheduled):
        calls.append(len(scheduled))
        if len(calls) == 3:
            raise RuntimeError("injected kernel failure")
        return real_run(scheduled)

    llm.runner.run = flaky_run
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

    async def main():
        engine = AsyncEngine(llm)
        await engine.start()
        try:
            with pytest.raises(EngineDeadError, match="injected"):
                async for _ in engine.generate([5, 6, 7], greedy, "doomed"):
                    pass
            ids = []
            async for out in engine.generate([5, 6, 7], greedy, "after"):
                ids += out.new_token_ids
            return ids, engine.step_errors, engine.stats()
        finally:
            await engine.shutdown()

    ids, errors, stats = asyncio.run(asyncio.wait_for(main(), 120))
    assert errors == 1 and len(ids) == 20
    assert ids == generate(tiny_model, [[5, 6, 7]], greedy)[0].token_ids
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0


def test_sequence_token_slices_match_all_ids() -> None:
    from minicpm4.engine.sequence import Sequence
    from minicpm4.engine.stopping import StopChecker

    p = SamplingParams(max_tokens=5)
    seq = Sequence("s", [1, 2, 3, 4], p, stop=StopChecker(p, set(), None, [1, 2, 3, 4]))
    seq.output_ids = [5, 6, 7]
    for start in range(8):
        for end in range(start, 9):
            assert seq.tokens(start, end) == seq.all_ids[start:end], (start, end)


def test_a_slow_consumer_gets_merged_deltas_with_every_token(tiny_model) -> None:
    """AsyncEngine merges deltas that queued up while the consumer was busy: fewer events,
    the same tokens, text and logprob entries (one per token), the final one finished."""
    import asyncio

    from minicpm4.engine.async_engine import AsyncEngine

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    expected = LLM(tiny_model).generate([[5, 6, 7, 8]], [params])[0].token_ids

    async def main():
        engine = AsyncEngine(LLM(tiny_model, None, EngineConfig(block_size=8,
                                                                num_kv_blocks=64)))
        await engine.start()
        try:
            deltas = []
            async for out in engine.generate([5, 6, 7, 8], params, "slow"):
                deltas.append(out)
                await asyncio.sleep(0.05)  # the engine runs several steps meanwhile
            return deltas
        finally:
            await engine.shutdown()

    deltas = asyncio.run(main())
    ids = [t for d in deltas for t in d.new_token_ids]
    assert ids == expected and len(deltas) < len(expected)
    assert sum(len(d.logprobs) for d in deltas) == len(ids)
    assert [lp.token_id for d in deltas for lp in d.logprobs] == ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert deltas[-1].num_generated_tokens == len(ids) and deltas[-1].metrics is not None


def test_merged_deltas() -> None:
    from minicpm4.engine.outputs import RequestOutput, TokenLogprob

    a = RequestOutput("r", [1, 2], "ab", None, 3, 2)
    b = RequestOutput("r", [3], "c", "length", 3, 3, logprobs=[TokenLogprob(3, -0.5)])
    m = a.merged(b)
    assert (m.new_token_ids, m.new_text, m.finish_reason, m.num_generated_tokens) == \
        ([1, 2, 3], "abc", "length", 3)
    assert [e.token_id for e in m.logprobs] == [3] and a.merged(a).logprobs is None
