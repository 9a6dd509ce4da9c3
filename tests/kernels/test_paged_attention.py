"""Decode attention over the KV pages in place (kernels/paged_attention.py,
csrc/paged_attention.cpp): equal to the gather + fp32 softmax reference for GQA groups of
1-8, head dims 16-128, rows of 1 to many keys in scattered pages; bad tables and lengths are
refused; a bf16 model served by the engine decodes the same tokens with and without it."""

from __future__ import annotations

import random

import pytest
import torch

from minicpm4.kernels import cpu_ext, paged_attention


@pytest.fixture(scope="module")
def built() -> None:
    if not cpu_ext.load("paged_attention"):
        pytest.skip("the paged_attention C++ extension cannot be built here "
                    "(or MINICPM4_CPU_EXT=0)")


def _case(B: int, N: int, K: int, H: int, bs: int, lens: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks = 4 + sum(-(-n // bs) for n in lens)
    k_pages = torch.randn(blocks, bs, K, H, generator=g).bfloat16()
    v_pages = torch.randn(blocks, bs, K, H, generator=g).bfloat16()
    q = (torch.randn(B, N, H, generator=g) * 2).bfloat16()
    order = list(range(1, blocks))
    random.Random(seed).shuffle(order)  # a row's pages are scattered over the pool
    W = max(-(-n // bs) for n in lens)
    table = torch.zeros(B, W, dtype=torch.long)
    for b, n in enumerate(lens):
        for w in range(-(-n // bs)):
            table[b, w] = order.pop()
    return q, k_pages, v_pages, table, torch.tensor(lens)


@pytest.mark.parametrize("N,K,H,bs", [
    (8, 2, 64, 16), (16, 2, 128, 16), (8, 1, 64, 4),  # the vector path (H % 32 == 0): G heads
    (12, 2, 64, 16), (6, 2, 96, 8), (8, 8, 32, 16), (4, 2, 256, 16),  # in register blocks
    (4, 4, 16, 8), (4, 2, 40, 8)])  # other head dims: the scalar loop
def test_matches_reference(built, N, K, H, bs) -> None:
    lens = [1, 7, bs, 3 * bs + 1, 200]
    q, kp, vp, table, lens_B = _case(len(lens), N, K, H, bs, lens, seed=N + H)
    with torch.no_grad():
        assert paged_attention.applies(q, kp)
        got = paged_attention.decode(q, kp, vp, table, lens_B)
        ref = paged_attention.decode_reference(q, kp, vp, table, lens_B)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert (got != ref).float().mean().item() < 0.02  # rounding ties only


def test_refuses_bad_tables_and_lengths(built) -> None:
    op = torch.ops.minicpm4_paged_attention.decode
    q, kp, vp, table, lens = _case(2, 4, 2, 16, 8, [5, 9])
    with pytest.raises(RuntimeError, match="names block"):
        op(q, kp, vp, torch.full_like(table, 10_000), lens)
    with pytest.raises(RuntimeError, match="keys"):
        op(q, kp, vp, table, torch.tensor([0, 9]))
    with pytest.raises(RuntimeError, match="at most"):
        op(q, kp, vp, table, torch.tensor([5, 99]))
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(q.float(), kp, vp, table, lens)
    with pytest.raises(RuntimeError, match="expected"):
        op(q[:, :3], kp, vp, table, lens)  # 3 query heads over 2 kv heads


@torch.no_grad()
def test_engine_bf16_decodes_the_same_with_and_without(built, monkeypatch,
                                                       tiny_bf16_model) -> None:
    from minicpm4.engine.config import EngineConfig
    from minicpm4.engine.llm import LLM
    from minicpm4.engine.request import SamplingParams

    model = tiny_bf16_model
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(5, 30), ignore_eos=True)
              for _ in prompts]

    def run() -> list[list[int]]:
        llm = LLM(model, None, EngineConfig(block_size=8, num_kv_blocks=96,
                                            max_prefill_chunk=16))
        return [o.token_ids for o in llm.generate(prompts, params)]

    # the op, called from Python by the module path and the grouped forward, and from the
    # C++ layer loop (model/fast_decode._run_layers) through the dispatcher
    from minicpm4.model import fast_decode
    calls = []
    ns = torch.ops.minicpm4_paged_attention
    real_op, real_loop = ns.decode, fast_decode._run_layers
    monkeypatch.setattr(ns, "decode", lambda *args: calls.append(1) or real_op(*args))
    monkeypatch.setattr(fast_decode, "_run_layers",
                        lambda *args: calls.append(1) or real_loop(*args))
    with_paged = run()
    assert calls  # the decode steps took the paged path
    monkeypatch.setattr(paged_attention, "PAGED_DECODE", False)
    calls.clear()
    assert run() == with_paged and not calls
