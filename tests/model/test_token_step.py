"""The token-level step of bf16 CPU inference (`model/fast_decode.token_logits`, its layout
`engine/kv_cache.token_layout`, `RotaryEmbedding.tokens`): every new token of a step mixing
decode rows, a continuing prompt chunk and new prompts is a row of the C++ layer loop,
attending in the pages. Its reference is the grouped forward (`model/grouped.py`, itself
tested against one module forward per batch): the same logits and pages up to the bf16
rounding of another attention summation order; the engine generates the same greedy tokens
with it as without; where it must not apply, it does not."""

from __future__ import annotations

import random

import pytest
import torch

from minicpm4.engine.config import EngineConfig
from minicpm4.engine.kv_cache import BlockPool, token_layout
from minicpm4.engine.llm import LLM
from minicpm4.engine.request import SamplingParams
from minicpm4.kernels import cpu_ext
from minicpm4.model import fast_decode
from minicpm4.model.grouped import grouped_logits
from minicpm4.model.layers import RotaryEmbedding
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config
from tests.model.test_grouped import _batch, _clone_pool, _setup

needs_ext = pytest.mark.skipif(
    not all(cpu_ext.load(n) for n in ("skinny_gemm", "rms_norm", "rotary", "paged_attention",
                                      "decode_layers")),
    reason="the C++ CPU kernels did not build here")


def _model(heads: int = 8) -> MiniCPM4ForCausalLM:
    """heads 8: head dim 16 (the paged op's scalar loop); 4: 32 (its vector path), LongRoPE
    factors subsampled to 16 pairs."""
    overrides = {}
    if heads != 8:
        from minicpm4.model.config import RopeScaling
        from minicpm4.model.hf import MINICPM4_8B_ROPE_FACTORS
        overrides = dict(num_attention_heads=heads, rope_scaling=RopeScaling(
            short_factor=MINICPM4_8B_ROPE_FACTORS[::4], long_factor=MINICPM4_8B_ROPE_FACTORS[1::4],
            original_max_position_embeddings=64))
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny_config(**overrides))
    model.init_weights(seed=0)
    return model.bfloat16().eval()


def test_layout_gives_each_token_its_position_slot_table_and_keys() -> None:
    pool = BlockPool(tiny_config(), num_blocks=16, block_size=4, dtype=torch.bfloat16)
    tables = [[3, 7], [5], [2, 9, 11]]
    pos, slots, table, lens = token_layout(pool, tables, [5, 0, 6], [1, 3, 4])
    assert pos.tolist() == [5, 0, 1, 2, 6, 7, 8, 9]
    assert slots.tolist() == [7 * 4 + 1, 5 * 4, 5 * 4 + 1, 5 * 4 + 2,
                              9 * 4 + 2, 9 * 4 + 3, 11 * 4, 11 * 4 + 1]
    assert table.tolist() == [[3, 7, 0]] + [[5, 0, 0]] * 3 + [[2, 9, 11]] * 4
    assert lens.tolist() == [6, 1, 2, 3, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="cannot hold token"):
        token_layout(pool, [[3]], [2], [3])
    with pytest.raises(ValueError, match=">= 1 new token"):
        token_layout(pool, [[3]], [2], [0])


@pytest.mark.parametrize("start,n", [(0, 10), (50, 30), (70, 1), (63, 1)])
def test_rope_per_token_equals_the_rows_forward(start, n) -> None:
    """LongRoPE (original_max 64) picks its factors by the row's last position: tokens of a
    chunk crossing 64 all take the long ones, as the chunk's row does in `forward`."""
    rope = RotaryEmbedding(tiny_config())
    positions = torch.arange(start, start + n)
    cos_ref, sin_ref = rope(positions.view(1, -1))
    cos, sin = rope.tokens(positions, torch.full((n,), start + n - 1))
    assert cos.shape == (n, 1, rope.head_dim)
    assert torch.equal(cos[:, 0], cos_ref[0]) and torch.equal(sin[:, 0], sin_ref[0])


def _run_token_step(model, pool, step):
    seqs = [(seq, n) for group in step for seq, n in group]
    ids, row_last, last = [], [], []
    for seq, n in seqs:
        ids += seq.tokens[seq.computed:seq.computed + n]
        row_last += [seq.computed + n - 1] * n
        last.append(len(ids) - 1)
    computed, new = [s.computed for s, _ in seqs], [n for _, n in seqs]
    packed = fast_decode.pack_layers(model)
    assert fast_decode.token_applies(packed, computed, new)
    pos, slots, table, lens = token_layout(pool, [s.blocks for s, _ in seqs], computed, new)
    with torch.inference_mode():
        return fast_decode.token_logits(model, torch.tensor(ids), pos, torch.tensor(row_last),
                                        (pool.k, pool.v, slots, table, lens),
                                        torch.tensor(last), packed)


@needs_ext
@pytest.mark.parametrize("heads", [8, 4])
@pytest.mark.parametrize("long_prompt", [40, 180])  # 60 rows (skinny GEMM), 200 (oneDNN)
def test_token_step_matches_the_grouped_forward(heads, long_prompt) -> None:
    model = _model(heads)
    pool, step = _setup(model, False, long_prompt)
    twin = _clone_pool(pool)
    with torch.inference_mode():
        ref = grouped_logits(model, [_batch(pool, g, False) for g in step], keep_dtype=True)
    got = _run_token_step(model, twin, step)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape == (5, 512)
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.02, atol=0.02)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # the decode rows (s1, s2) see the same pages, with the same ops: the same logits
    assert torch.equal(got[:2], ref[:2])
    for a, b in zip(pool.k + pool.v, twin.k + twin.v):
        torch.testing.assert_close(a[1:].float(), b[1:].float(), rtol=0.02, atol=0.02)


@needs_ext
@pytest.mark.parametrize("long_prompt", [40, 180])
def test_token_step_is_as_accurate_as_the_grouped_forward(long_prompt) -> None:
    """Against the fp32 model on the same stored keys, the token-level step's logits are as
    close as the grouped forward's (both bf16; attention summed in another order): on random
    models whose logits are nearly flat the two may pick different greedy tokens."""
    import copy
    from minicpm4.model.grouped import grouped_logits as grouped
    model = _model(4)
    pool, step = _setup(model, False, long_prompt)
    twin, model32 = _clone_pool(pool), copy.deepcopy(model).float()
    pool32 = BlockPool(model32.config, num_blocks=pool.num_blocks, block_size=pool.block_size,
                       dtype=torch.float32)
    for dst, src in zip(pool32.k + pool32.v, pool.k + pool.v):
        dst.copy_(src.float())
    with torch.inference_mode():
        ref = torch.cat([model32(b.ids_BT, cache=b.cache, attention_mask_BT=b.mask_BT,
                                 logits_to_keep=1)[:, -1]
                         for b in (_batch(pool32, g, False) for g in step)])
        old = grouped(model, [_batch(pool, g, False) for g in step], keep_dtype=True)
    new = _run_token_step(model, twin, step)

    def err(x):
        return float((x.float() - ref).norm() / ref.norm())

    assert err(old) < 0.02 and err(new) <= 1.05 * err(old)


@needs_ext
def test_too_much_prompt_attention_is_left_to_the_grouped_forward(monkeypatch) -> None:
    packed = fast_decode.pack_layers(_model())
    monkeypatch.setattr(fast_decode, "TOKEN_ATTENTION_KEYS", 100)
    assert fast_decode.token_applies(packed, [10, 0], [1, 13])  # 91 keys
    assert not fast_decode.token_applies(packed, [10, 0], [1, 14])  # 105
    assert fast_decode.token_applies(packed, [900, 5], [1, 2])  # decode rows do not count
    assert not fast_decode.token_applies(packed, [0, 50], [1, 2])  # 2 * 50 + 3
    assert not fast_decode.token_applies(None, [10, 0], [1, 3])
    monkeypatch.setattr(fast_decode, "TOKEN_STEPS", False)
    assert not fast_decode.token_applies(packed, [10, 0], [1, 3])


@needs_ext
@pytest.mark.parametrize("heads", [8, 4])
def test_engine_takes_it_for_mixed_steps_and_generates_the_same_tokens(monkeypatch,
                                                                       heads) -> None:
    """Chunked prefill (chunks of 7) of 12 prompts joining running requests: the token-level
    steps give the greedy tokens the grouped forward gives."""
    model = _model(heads)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 60))] for _ in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 30), ignore_eos=True)
              for _ in prompts]
    config = EngineConfig(block_size=8, num_kv_blocks=200, max_prefill_chunk=7,
                          max_num_batched_tokens=40)
    calls = []
    real = fast_decode.token_logits
    monkeypatch.setattr(fast_decode, "token_logits",
                        lambda *args: calls.append(args[1].shape[0]) or real(*args))
    fast = [o.token_ids for o in LLM(model, None, config).generate(prompts, params)]
    assert len(calls) > 5 and max(calls) > 7  # mixed steps of several sequences took it
    monkeypatch.setattr(fast_decode, "TOKEN_STEPS", False)
    calls.clear()
    grouped = [o.token_ids for o in LLM(model, None, config).generate(prompts, params)]
    assert not calls
    assert fast == grouped
