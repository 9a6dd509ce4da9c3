"""`model/fast_decode.decode_logits` (the lean decode forward) against its reference,
`MiniCPM4ForCausalLM.forward` on the same paged decode step: bit-identical logits and pages;
where it must not apply (other models, other steps, kernels switched off) it says so; the
engine takes it for decode steps and generates the same tokens with it as without."""

from __future__ import annotations

import random

import pytest
import torch

from minicpm4.engine.kv_cache import BlockPool, PagedBatch
from minicpm4.engine.llm import LLM
from minicpm4.engine.request import SamplingParams
from minicpm4.kernels import cpu_ext, paged_attention, skinny_linear
from minicpm4.model import fast_decode
from minicpm4.model.config import SparseConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

BS = 8  # tokens per page

needs_ext = pytest.mark.skipif(
    not all(cpu_ext.load(n) for n in ("skinny_gemm", "rms_norm", "rotary", "paged_attention")),
    reason="the C++ CPU kernels did not build here")


def _model(**overrides) -> MiniCPM4ForCausalLM:
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny_config(rope_scaling=None, **overrides))
    model.init_weights(seed=0)
    return model.bfloat16().eval()


def _prefilled(model: MiniCPM4ForCausalLM, lens: list[int]):
    """A pool holding sequences of `lens` tokens (one reference forward each); returns the
    pool, their block tables and the next token of each."""
    rng = random.Random(0)
    pool = BlockPool(model.config, num_blocks=64, block_size=BS, dtype=torch.bfloat16)
    tables = []
    for n in lens:
        table = pool.allocate(pool.blocks_for(n + 1))
        ids = torch.tensor([[rng.randrange(3, 512) for _ in range(n)]])
        with torch.inference_mode():
            model(ids, cache=PagedBatch(pool, [table], [0], [n]), logits_to_keep=1)
        tables.append(table)
    nxt = torch.tensor([[rng.randrange(3, 512)] for _ in lens])
    return pool, tables, nxt


def _clone(pool: BlockPool) -> BlockPool:
    twin = BlockPool(pool.cfg, num_blocks=pool.num_blocks, block_size=pool.block_size,
                     dtype=pool.k[0].dtype)
    for dst, src in zip(twin.k + twin.v, pool.k + pool.v):
        dst.copy_(src)
    return twin


@needs_ext
@pytest.mark.parametrize("lens", [[5], [9, 17, 3, 24]])
@pytest.mark.parametrize("cpp_loop", [False, True])  # the Python loop / csrc/decode_layers.cpp
def test_bit_identical_to_the_reference_forward(lens, cpp_loop, monkeypatch):
    model = _model()
    assert fast_decode.supports(model)
    packed = fast_decode.pack_layers(model) if cpp_loop else None
    if cpp_loop:
        assert packed is not None, "the decode_layers extension did not build"
        calls = []
        real_op = torch.ops.minicpm4_decode_layers.decode_layers
        monkeypatch.setattr(torch.ops.minicpm4_decode_layers, "decode_layers",
                            lambda *a: calls.append(1) or real_op(*a))
    pool, tables, ids_B1 = _prefilled(model, lens)
    twin = _clone(pool)
    ref_cache = PagedBatch(pool, tables, lens, [1] * len(lens))
    fast_cache = PagedBatch(twin, tables, lens, [1] * len(lens))
    with torch.inference_mode():
        assert fast_decode.applies(model, ids_B1, fast_cache)
        ref_BV = model.compute_logits(model.model(ids_B1, cache=ref_cache)[:, -1],
                                      keep_dtype=True)
        fast_BV = fast_decode.decode_logits(model, ids_B1, fast_cache, packed)
    if cpp_loop:
        assert calls == [1]
    assert fast_BV.dtype == torch.bfloat16 and fast_BV.shape == ref_BV.shape
    assert torch.equal(fast_BV, ref_BV)
    for a, b in zip(pool.k + pool.v, twin.k + twin.v):
        assert torch.equal(a, b)


@needs_ext
def test_applies_only_to_steps_the_reference_runs_with_the_same_kernels(monkeypatch):
    model = _model()
    pool, tables, ids_B1 = _prefilled(model, [6, 7])
    decode = PagedBatch(pool, tables, [6, 7], [1, 1])
    assert not fast_decode.applies(model, ids_B1, decode)  # autograd on: training kernels
    torch.set_grad_enabled(False)
    try:
        _applies_checks(model, pool, tables, ids_B1, decode, monkeypatch)
    finally:
        torch.set_grad_enabled(True)


def _applies_checks(model, pool, tables, ids_B1, decode, monkeypatch) -> None:
    assert fast_decode.applies(model, ids_B1, decode)
    # two new tokens per row; rows starting from nothing; no cache at all
    assert not fast_decode.applies(model, torch.cat([ids_B1, ids_B1], 1),
                                   PagedBatch(pool, tables, [6, 7], [2, 2]))
    assert not fast_decode.applies(model, ids_B1, PagedBatch(pool, tables, [0, 0], [1, 1]))
    assert not fast_decode.applies(model, ids_B1, None)
    # more rows than the skinny GEMM takes
    many = torch.zeros(skinny_linear.max_rows() + 1, 1, dtype=torch.long)
    assert not fast_decode.applies(model, many, decode)
    # a kernel switched off: the reference runs its PyTorch path, so must the engine
    monkeypatch.setattr(paged_attention, "PAGED_DECODE", False)
    assert not fast_decode.applies(model, ids_B1, decode)
    monkeypatch.setattr(paged_attention, "PAGED_DECODE", True)
    monkeypatch.setenv("MINICPM4_CPU_EXT", "0")
    assert not fast_decode.applies(model, ids_B1, decode)
    assert not fast_decode.supports(model)


def test_supports_only_plain_bf16_cpu_models():
    assert not fast_decode.supports(_model().float())
    assert not fast_decode.supports(_model(attn_use_output_gate=True))
    assert not fast_decode.supports(_model(sparse_config=SparseConfig(
        kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=2,
        dense_len=32)))


@needs_ext
def test_out_of_range_token_is_refused():
    model = _model()
    pool, tables, _ = _prefilled(model, [4])
    with pytest.raises(ValueError, match="token ids must lie"), torch.inference_mode():
        fast_decode.decode_logits(model, torch.tensor([[512]]),
                                  PagedBatch(pool, tables, [4], [1]))


@needs_ext
def test_engine_takes_it_for_decode_steps_and_generates_the_same_tokens(monkeypatch):
    model = _model()
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 11, 20, 7, 30)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in (12, 5, 9, 16, 7)]
    calls = []
    real = fast_decode.decode_logits

    def counted(*args):
        calls.append(args[1].shape[0])
        return real(*args)

    monkeypatch.setattr(fast_decode, "decode_logits", counted)
    llm = LLM(model)
    assert llm.runner.fast_decode
    fast = [o.token_ids for o in llm.generate(prompts, params)]
    assert calls and max(calls) > 1  # batched decode steps took it
    slow_llm = LLM(model)
    slow_llm.runner.fast_decode = False
    calls.clear()
    slow = [o.token_ids for o in slow_llm.generate(prompts, params)]
    assert not calls
    assert fast == slow


@needs_ext
def test_engine_under_preemption_and_prefix_reuse_generates_the_same_tokens(monkeypatch):
    """16 requests sharing prompt prefixes, chunked prefill, a pool too small for all of them:
    the lean forward runs the decode steps between preemptions and prefix hits, and every
    output equals the one the reference forward gives (FAST_DECODE off)."""
    from minicpm4.engine.config import EngineConfig
    model = _model()
    rng = random.Random(5)
    shared = [rng.randrange(3, 512) for _ in range(9)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(rng.randint(1, 20))]
               for _ in range(16)]
    params = [SamplingParams(max_tokens=rng.randint(4, 14), temperature=0.0, ignore_eos=True)
              for _ in prompts]
    config = EngineConfig(block_size=4, num_kv_blocks=40, max_prefill_chunk=7,
                          max_num_batched_tokens=32)
    calls = []
    real = fast_decode.decode_logits
    monkeypatch.setattr(fast_decode, "decode_logits",
                        lambda *args: calls.append(1) or real(*args))
    llm = LLM(model, None, config)
    fast = [o.token_ids for o in llm.generate(prompts, params)]
    stats = llm.stats()
    assert calls and stats["preemptions_total"] > 0
    assert stats["prefix_cache_hit_tokens_total"] > 0
    monkeypatch.setattr(fast_decode, "FAST_DECODE", False)
    calls.clear()
    slow = [o.token_ids for o in LLM(model, None, config).generate(prompts, params)]
    assert not calls
    assert fast == slow
