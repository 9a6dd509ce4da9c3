"""`model/grouped.grouped_logits` (one forward over several batches) against its reference,
`MiniCPM4ForCausalLM.forward` run once per batch: the same logits and the same keys in the
pages, dense and InfLLM v2 (whose per-sequence compressed keys must match too); bad batches
are refused."""

from __future__ import annotations

import random

import pytest
import torch

from minicpm4.engine.kv_cache import BlockPool, PagedBatch
from minicpm4.kernels import cpu_ext
from minicpm4.model import fast_decode
from minicpm4.model.config import SparseConfig
from minicpm4.model.grouped import Batch, grouped_logits
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

BS = 8  # tokens per page


class _Seq:
    def __init__(self, sid: str, tokens: list[int], blocks: list[int]) -> None:
        self.sid, self.tokens, self.blocks, self.computed = sid, tokens, blocks, 0


def _model(sparse: bool) -> MiniCPM4ForCausalLM:
    cfg = tiny_config(rope_scaling=None, sparse_config=SparseConfig(
        kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=2,
        dense_len=32)) if sparse else tiny_config()
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg)
    model.init_weights(seed=0)
    return model.eval()


def _batch(pool: BlockPool, group: list[tuple[_Seq, int]], sparse: bool) -> Batch:
    T = max(n for _, n in group)
    ids_BT = torch.zeros(len(group), T, dtype=torch.long)
    mask_BT = torch.zeros(len(group), T, dtype=torch.bool)
    for b, (seq, n) in enumerate(group):
        ids_BT[b, T - n:] = torch.tensor(seq.tokens[seq.computed:seq.computed + n])
        mask_BT[b, T - n:] = True
    cache = PagedBatch(pool, [s.blocks for s, _ in group], [s.computed for s, _ in group],
                       [n for _, n in group], seq_ids=[s.sid for s, _ in group] if sparse
                       else None)
    return Batch(ids_BT, None if bool(mask_BT.all()) else mask_BT, cache)


def _setup(model: MiniCPM4ForCausalLM, sparse: bool, long_prompt: int = 40):
    """A pool holding three sequences' first tokens, and the step to run: decode rows (s1,
    s2), a continuing chunk (s3) and two new prompts of different lengths (s4, s5)."""
    rng = random.Random(1)
    lens = {"s1": 41, "s2": 37, "s3": 45, "s4": long_prompt, "s5": 3}
    stored = {"s1": 40, "s2": 36, "s3": 30}
    pool = BlockPool(model.config, num_blocks=64, block_size=BS, dtype=model.dtype)
    seqs = {}
    for sid, n in lens.items():
        seqs[sid] = _Seq(sid, [rng.randrange(3, 512) for _ in range(n)],
                         pool.allocate(pool.blocks_for(n)))
    for sid, n in stored.items():  # one forward per sequence fills its first tokens
        seq = seqs[sid]
        b = _batch(pool, [(seq, n)], sparse)
        with torch.inference_mode():
            model(b.ids_BT, cache=b.cache, attention_mask_BT=b.mask_BT, logits_to_keep=1)
        seq.computed = n
    step = [[(seqs["s1"], 1), (seqs["s2"], 1)], [(seqs["s3"], 15)],
            [(seqs["s4"], long_prompt), (seqs["s5"], 3)]]
    return pool, step


def _clone_pool(pool: BlockPool) -> BlockPool:
    twin = BlockPool(pool.cfg, num_blocks=pool.num_blocks, block_size=pool.block_size,
                     dtype=pool.k[0].dtype)
    for dst, src in zip(twin.k + twin.v, pool.k + pool.v):
        dst.copy_(src)
    for sid, states in pool.sparse_states.items():
        twin_states = twin.sparse_layers(sid)
        for t, s in zip(twin_states, states):
            t.buffers[0].__dict__.update({k: (v.clone() if torch.is_tensor(v) else v)
                                          for k, v in s.buffers[0].__dict__.items()})
    return twin


@pytest.mark.parametrize("sparse", [False, True])
def test_grouped_equals_one_forward_per_batch(sparse) -> None:
    model = _model(sparse)
    pool, step = _setup(model, sparse)
    twin = _clone_pool(pool)
    with torch.inference_mode():
        ref = torch.cat([model(b.ids_BT, cache=b.cache, attention_mask_BT=b.mask_BT,
                               logits_to_keep=1)[:, -1]
                         for b in (_batch(pool, g, sparse) for g in step)])
        got = grouped_logits(model, [_batch(twin, g, sparse) for g in step])
    assert got.shape == ref.shape == (5, model.config.vocab_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # every page but block 0, the scratch page padding writes to: the grouped forward leaves
    # padding out of its projections (zeros there), the reference projects the pad tokens
    for a, b in zip(pool.k + pool.v, twin.k + twin.v):
        torch.testing.assert_close(a[1:], b[1:], rtol=1e-5, atol=1e-6)
    if sparse:  # the decode state (compressed keys) was fed the same keys
        assert set(pool.sparse_states) == set(twin.sparse_states) == {"s1", "s2", "s3", "s4",
                                                                      "s5"}
        for sid in pool.sparse_states:
            for s, t in zip(pool.sparse_layers(sid), twin.sparse_layers(sid)):
                for name, value in vars(s.buffers[0]).items():
                    if torch.is_tensor(value):
                        torch.testing.assert_close(getattr(t.buffers[0], name), value,
                                                   rtol=1e-5, atol=1e-6)


def test_grouped_refuses_bad_batches() -> None:
    model = _model(False)
    pool, step = _setup(model, False)
    with pytest.raises(ValueError, match="at least one batch"):
        grouped_logits(model, [])
    b = _batch(pool, step[0], False)
    with pytest.raises(ValueError, match="token ids"):
        grouped_logits(model, [Batch(b.ids_BT + 10_000, None, b.cache)])
    with pytest.raises(ValueError, match="mask shape"):
        grouped_logits(model, [Batch(b.ids_BT, torch.ones(3, 3, dtype=torch.bool), b.cache)])


def test_padding_is_left_out_of_the_token_wise_parts(monkeypatch) -> None:
    """The projections see the real tokens only: 2 + 15 + 40 + 3, not the padded 2 + 15 + 80;
    a lone padded batch gives the reference's logits too."""
    from minicpm4.model.attention import Attention
    model = _model(False)
    pool, step = _setup(model, False)
    twin = _clone_pool(pool)
    seen = []
    project = Attention.project

    def counting(self, x_BTD):
        seen.append(x_BTD.shape[:-1].numel())
        return project(self, x_BTD)

    monkeypatch.setattr(Attention, "project", counting)
    with torch.inference_mode():
        grouped_logits(model, [_batch(pool, g, False) for g in step])
        assert set(seen) == {2 + 15 + 40 + 3}
        seen.clear()
        fresh = _batch(twin, step[2], False)
        assert fresh.mask_BT is not None
        ref = model(fresh.ids_BT, cache=_batch(_clone_pool(twin), step[2], False).cache,
                    attention_mask_BT=fresh.mask_BT, logits_to_keep=1)[:, -1]
        seen.clear()
        got = grouped_logits(model, [fresh])
    assert set(seen) == {40 + 3}
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not all(cpu_ext.load(n) for n in ("skinny_gemm", "rms_norm", "rotary",
                                                         "paged_attention")),
                    reason="the C++ CPU kernels did not build here")
@pytest.mark.parametrize("long_prompt", [40, 180])  # 60 rows (skinny GEMM), 200 (oneDNN)
def test_lean_layers_are_bit_identical_to_the_module_path(monkeypatch, long_prompt) -> None:
    """bf16 CPU: the grouped forward's lean layers (`fast_decode.grouped_layer`, decode
    batches through `fast_decode.decode_attend`) give the module path's logits and pages
    bit for bit."""
    model = _model(False).bfloat16()
    pool, step = _setup(model, False, long_prompt)
    twin = _clone_pool(pool)
    calls, paged = [], []
    layer_fn, attend_fn = fast_decode.grouped_layer, fast_decode.decode_attend
    monkeypatch.setattr(fast_decode, "grouped_layer",
                        lambda *a: calls.append(1) or layer_fn(*a))
    monkeypatch.setattr(fast_decode, "decode_attend",
                        lambda *a: paged.append(1) or attend_fn(*a))
    with torch.inference_mode():
        monkeypatch.setattr(fast_decode, "FAST_DECODE", False)
        ref = grouped_logits(model, [_batch(pool, g, False) for g in step], keep_dtype=True)
        assert not calls and not paged
        monkeypatch.setattr(fast_decode, "FAST_DECODE", True)
        got = grouped_logits(model, [_batch(twin, g, False) for g in step], keep_dtype=True)
    assert len(calls) == len(paged) == model.config.num_hidden_layers  # s1, s2: in pages
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    for a, b in zip(pool.k + pool.v, twin.k + twin.v):
        assert torch.equal(a, b)
