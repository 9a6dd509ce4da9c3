"""InfLLM v2 stage 2 (`kernels/infllm_v2/stage2.py`, spec §2.2 step 6) against SDPA.

Acceptance: stage 2 equals `F.scaled_dot_product_attention` with the equivalent boolean mask,
in the forward pass and in the q/k/v gradients. The test also checks that selecting every
causal block gives dense causal attention, that -1 slots and duplicated indices are handled,
and that bad shapes raise ValueError.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minicpm4.kernels.infllm_v2.stage2 import (block_mask_from_indices, sparse_attention,
                                               sparse_attention_flex, sparse_attention_gather,
                                               sparse_attention_reference)

TOL = dict(rtol=1e-5, atol=1e-5)
# (N, K, H, block_size, T, q_offset, slots): GQA groups 2 and 8, lengths not multiples of the
# block, prefill from 0, a chunk after a prefix, decode (T=1), short chunks across and
# inside one block.
CASES = [(4, 2, 16, 8, 37, 0, 4), (8, 1, 16, 16, 50, 45, 3), (4, 2, 16, 8, 1, 70, 5),
         (4, 2, 16, 16, 29, 19, 6), (8, 1, 16, 8, 5, 60, 3), (4, 2, 16, 16, 3, 17, 4)]
GATHER_VARIANTS = {
    "gather": dict(backend="gather"),
    "auto": dict(backend="auto"),
    "masked": dict(backend="masked"),
    "gather-block-chunk1": dict(rows="block", chunk=1),
    "gather-token": dict(rows="token"),
    "gather-token-chunk7": dict(rows="token", chunk=7),
    "gather-rows3": dict(rows=3),
}


def random_indices(K: int, T: int, q_offset: int, block_size: int, slots: int, *, seed: int = 0,
                   duplicates: bool = False) -> torch.Tensor:
    """int32 [K, T, slots]: per (kv head, query) a random subset of its causal blocks that
    always holds the query's own block, sorted ascending, -1 in the unused trailing slots."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.full((K, T, slots), -1, dtype=torch.int32)
    for h in range(K):
        for t in range(T):
            own = (q_offset + t) // block_size
            n_other = int(torch.randint(0, slots, (1,), generator=gen))
            others = torch.randperm(own, generator=gen)[:n_other] if own else torch.zeros(0)
            chosen = torch.cat([others.long(), torch.tensor([own])])
            if duplicates and len(chosen) < slots:
                chosen = torch.cat([chosen, chosen[:1]])
            chosen = chosen.sort().values
            idx[h, t, :len(chosen)] = chosen.to(torch.int32)
    return idx


def sdpa_oracle(q_NTH, k_KSH, v_KSH, idx_KTk, block_size: int, q_offset: int):
    N, K = q_NTH.shape[0], k_KSH.shape[0]
    mask_KTS = block_mask_from_indices(idx_KTk, num_keys=k_KSH.shape[1], block_size=block_size,
                                       q_offset=q_offset)
    out = F.scaled_dot_product_attention(
        q_NTH[None], k_KSH.repeat_interleave(N // K, 0)[None],
        v_KSH.repeat_interleave(N // K, 0)[None],
        attn_mask=mask_KTS.repeat_interleave(N // K, 0)[None])
    return out[0]


def inputs(case, *, seed: int = 0, dtype=torch.float32):
    N, K, H, bs, T, off, slots = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, T, H, generator=gen).to(dtype)
    k = torch.randn(K, off + T, H, generator=gen).to(dtype)
    v = torch.randn(K, off + T, H, generator=gen).to(dtype)
    return q, k, v, random_indices(K, T, off, bs, slots, seed=seed), bs, off


def forward_and_grads(fn, q, k, v):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * cot).sum(), leaves)
    return out.detach(), grads


def _backend_fn(name: str, idx, bs: int, off: int):
    if name == "reference":
        return lambda q, k, v: sparse_attention_reference(q, k, v, idx, block_size=bs,
                                                          q_offset=off)
    opts = GATHER_VARIANTS[name]
    if "backend" in opts:
        return lambda q, k, v: sparse_attention(q, k, v, idx, block_size=bs, q_offset=off,
                                                **opts)
    return lambda q, k, v: sparse_attention_gather(q, k, v, idx, block_size=bs, q_offset=off,
                                                   **opts)


@pytest.mark.parametrize("backend", ["reference", *GATHER_VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}K{}H{}bs{}T{}off{}k{}".format(*c))
def test_forward_and_grads_equal_sdpa_with_boolean_mask(case, backend) -> None:
    q, k, v, idx, bs, off = inputs(case)
    fn = _backend_fn(backend, idx, bs, off)
    out, grads = forward_and_grads(fn, q, k, v)
    ref_out, ref_grads = forward_and_grads(
        lambda q, k, v: sdpa_oracle(q, k, v, idx, bs, off), q, k, v)
    torch.testing.assert_close(out, ref_out, **TOL)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["prefill", "chunk-after-prefix"])
def test_flex_forward_equals_sdpa_and_backward_if_supported(case) -> None:
    q, k, v, idx, bs, off = inputs(case)
    out = sparse_attention(q, k, v, idx, block_size=bs, q_offset=off, backend="flex")
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, idx, bs, off), **TOL)
    # Compiled with this shape already: a new selection and the batched form reuse it.
    idx2 = random_indices(idx.shape[0], q.shape[1], off, bs, idx.shape[2], seed=5)
    torch.testing.assert_close(sparse_attention_flex(q[None], k[None], v[None], idx2[None],
                                                     block_size=bs, q_offset=off)[0],
                               sdpa_oracle(q, k, v, idx2, bs, off), **TOL)
    try:
        out, grads = forward_and_grads(
            lambda q, k, v: sparse_attention_flex(q, k, v, idx, block_size=bs, q_offset=off),
            q, k, v)
    except NotImplementedError as err:  # torch 2.13: "does not support backward on CPU"
        pytest.skip(f"flex_attention backward unavailable on this device: {err}")
    _, ref_grads = forward_and_grads(lambda q, k, v: sdpa_oracle(q, k, v, idx, bs, off),
                                     q, k, v)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", ["reference", "gather", "auto"])
@pytest.mark.parametrize("off", [0, 21])
def test_all_causal_blocks_selected_equals_dense_causal(backend, off) -> None:
    N, K, H, bs, T = 8, 2, 16, 8, 43
    S = off + T
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, L, H, generator=gen) for n, L in ((N, T), (K, S), (K, S)))
    nb = -(-S // bs)
    own_T1 = (off + torch.arange(T))[:, None] // bs
    all_Tb = torch.arange(nb).expand(T, nb)
    idx = torch.where(all_Tb <= own_T1, all_Tb, -1).to(torch.int32).expand(K, T, nb)
    causal_TS = torch.arange(S)[None, :] <= (off + torch.arange(T))[:, None]

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q[None], k.repeat_interleave(N // K, 0)[None],
                                              v.repeat_interleave(N // K, 0)[None],
                                              attn_mask=causal_TS)[0]
    out, grads = forward_and_grads(lambda q, k, v: sparse_attention(
        q, k, v, idx, block_size=bs, q_offset=off, backend=backend), q, k, v)
    ref_out, ref_grads = forward_and_grads(dense, q, k, v)
    torch.testing.assert_close(out, ref_out, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", ["reference", "gather", "flex"])
def test_padding_duplicates_and_future_blocks_are_ignored(backend) -> None:
    case = CASES[3]
    q, k, v, idx, bs, off = inputs(case)
    K, T, slots = idx.shape
    nb = -(-(off + T) // bs)
    dup = random_indices(K, T, off, bs, slots, seed=0, duplicates=True)
    assert (dup[..., 1:] == dup[..., :-1]).any() or slots == 1
    # More slots: -1 in front (unsorted is fine too) and a future block, hidden by causality.
    own_KT1 = ((off + torch.arange(T)) // bs).expand(K, T)[..., None]
    future = torch.where(own_KT1 + 1 < nb, own_KT1 + 1, -1).to(torch.int32)
    messy = torch.cat([torch.full((K, T, 2), -1, dtype=torch.int32), idx, dup, future], dim=-1)
    clean = sparse_attention(q, k, v, idx, block_size=bs, q_offset=off, backend=backend)
    out = sparse_attention(q, k, v, messy, block_size=bs, q_offset=off, backend=backend)
    torch.testing.assert_close(out, clean, **TOL)
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, idx, bs, off), **TOL)


@pytest.mark.parametrize("backend", ["reference", "gather", "masked"])
def test_rows_without_visible_keys_give_zero_and_finite_grads(backend) -> None:
    q, k, v, idx, bs, off = inputs(CASES[0])
    idx = idx.clone()
    idx[0, 3:6] = -1  # kv head 0 (query heads 0, 1): queries 3-5 select nothing
    out, grads = forward_and_grads(_backend_fn(backend, idx, bs, off), q, k, v)
    assert torch.equal(out[:2, 3:6], torch.zeros_like(out[:2, 3:6]))
    assert all(torch.isfinite(g).all() for g in grads)
    ref_out, ref_grads = forward_and_grads(_backend_fn("reference", idx, bs, off), q, k, v)
    torch.testing.assert_close(out, ref_out, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", ["reference", "gather", "masked"])
def test_batch_equals_per_sequence(backend) -> None:
    case = CASES[1]
    seqs = [inputs(case, seed=s) for s in range(3)]
    bs, off = seqs[0][4], seqs[0][5]
    q, k, v, idx = (torch.stack([s[i] for s in seqs]) for i in range(4))
    out = sparse_attention(q, k, v, idx, block_size=bs, q_offset=off, backend=backend)
    assert out.shape == q.shape
    for b, (qb, kb, vb, ib, _, _) in enumerate(seqs):
        torch.testing.assert_close(out[b], sdpa_oracle(qb, kb, vb, ib, bs, off), **TOL)
    out, grads = forward_and_grads(lambda q, k, v: sparse_attention(
        q, k, v, idx, block_size=bs, q_offset=off, backend=backend), q, k, v)
    _, ref = forward_and_grads(lambda q, k, v: torch.stack([sdpa_oracle(
        q[b], k[b], v[b], idx[b], bs, off) for b in range(3)]), q, k, v)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, **TOL)


def test_auto_trains_through_the_masked_kernel(monkeypatch) -> None:
    """auto = one masked SDPA for a CPU backward within MASKED_MAX_SCORES, gather otherwise."""
    import minicpm4.kernels.infllm_v2.stage2 as stage2
    calls = []
    real = stage2.masked_one
    monkeypatch.setattr(stage2, "masked_one", lambda *a: calls.append(1) or real(*a))
    q, k, v, idx, bs, off = inputs(CASES[0])
    sparse_attention(q.requires_grad_(), k, v, idx, block_size=bs, q_offset=off)
    assert calls == [1]
    with torch.no_grad():
        sparse_attention(q, k, v, idx, block_size=bs, q_offset=off)
    assert calls == [1]


def test_bfloat16_inputs_keep_their_dtype() -> None:
    q, k, v, idx, bs, off = inputs(CASES[0], dtype=torch.bfloat16)
    ref = sdpa_oracle(q.float(), k.float(), v.float(), idx, bs, off)
    for backend in ("reference", "gather", "masked"):
        out, grads = forward_and_grads(lambda q, k, v: sparse_attention(
            q, k, v, idx, block_size=bs, q_offset=off, backend=backend), q, k, v)
        assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_block_mask_from_indices_matches_definition() -> None:
    idx = torch.tensor([[[0, 2, -1], [1, -1, -1], [2, 2, 0]]], dtype=torch.int32)
    mask = block_mask_from_indices(idx, num_keys=11, block_size=4, q_offset=8)
    expect = torch.zeros(1, 3, 11, dtype=torch.bool)
    expect[0, 0, [0, 1, 2, 3, 8]] = True            # query at position 8
    expect[0, 1, [4, 5, 6, 7]] = True               # position 9, block 1 only
    expect[0, 2, [0, 1, 2, 3, 8, 9, 10]] = True     # position 10
    assert torch.equal(mask, expect)


BAD = {
    "q not 3-D": dict(q=(2, 4, 5, 8, 3)),
    "N not a multiple of K": dict(q=(3, 5, 8)),
    "k and v differ": dict(v=(1, 9, 8)),
    "head dims differ": dict(k=(2, 9, 4), v=(2, 9, 4)),
    "idx wrong T": dict(idx=(2, 4, 3)),
    "S != q_offset + T": dict(k=(2, 10, 8), v=(2, 10, 8)),
}


@pytest.mark.parametrize("backend", ["reference", "gather", "flex"])
@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_bad_shapes_raise_value_error(bad, backend) -> None:
    shapes = dict(q=(4, 5, 8), k=(2, 9, 8), v=(2, 9, 8), idx=(2, 5, 3)) | BAD[bad]
    q, k, v = (torch.randn(*shapes[n]) for n in "qkv")
    idx = torch.zeros(*shapes["idx"], dtype=torch.int32)
    with pytest.raises(ValueError):
        sparse_attention(q, k, v, idx, block_size=4, q_offset=4, backend=backend)


def test_bad_indices_and_options_raise_value_error() -> None:
    q, k, v = torch.randn(4, 5, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    idx = torch.zeros(2, 5, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="block indices"):
        sparse_attention(q, k, v, idx + 3, block_size=4, q_offset=4)  # only blocks 0..2 exist
    with pytest.raises(ValueError, match="block indices"):
        sparse_attention(q, k, v, idx - 2, block_size=4, q_offset=4)
    with pytest.raises(ValueError, match="integer"):
        sparse_attention(q, k, v, idx.float(), block_size=4, q_offset=4)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, k, v, idx, block_size=4, q_offset=4, backend="triton")
    with pytest.raises(ValueError, match="rows"):
        sparse_attention_gather(q, k, v, idx, block_size=4, q_offset=4, rows="heads")
    with pytest.raises(ValueError, match="batch"):
        sparse_attention(q[None], k[None], v[None], idx, block_size=4, q_offset=4)


@pytest.mark.parametrize("backend", ["reference", "gather", "flex"])
def test_empty_query_chunk(backend) -> None:
    q, k, v = torch.randn(4, 0, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    out = sparse_attention(q, k, v, torch.zeros(2, 0, 3, dtype=torch.int32), block_size=4,
                           q_offset=6, backend=backend)
    assert out.shape == (4, 0, 8)


def test_auto_row_groups_follow_the_agreement_of_the_rows() -> None:
    from minicpm4.kernels.infllm_v2.stage2 import _Plan
    T, bs = 256, 16
    own_T = torch.arange(T) // bs
    # Every row of a query block selects the same blocks: one group per query block.
    same = torch.stack([torch.zeros(T), own_T // 2, own_T - 1, own_T], -1).clamp_min(0)
    plan = _Plan(same[None].int(), T, T, 16, 128, bs, 0, None, "auto")
    assert plan.R == bs
    # Each row picks its own far blocks: per-token groups score far fewer keys.
    gen = torch.Generator().manual_seed(0)
    far = (torch.rand(T, 2, generator=gen) * own_T[:, None].clamp_min(1)).long()
    mixed = torch.cat([far, own_T[:, None], own_T[:, None]], -1).sort(-1).values
    plan = _Plan(mixed[None].int(), T, T, 16, 128, bs, 0, None, "auto")
    assert plan.R < bs
    q, k, v = torch.randn(16, T, 8), torch.randn(1, T, 8), torch.randn(1, T, 8)
    torch.testing.assert_close(sparse_attention(q, k, v, mixed[None].int(), block_size=bs),
                               sdpa_oracle(q, k, v, mixed[None].int(), bs, 0), **TOL)
