"""InfLLM v2 block selection (`kernels.infllm_v2.selection`, spec §2.2 steps 2-5, §2.3).

The oracle is `_brute_select`, written straight from the spec with Python loops over query,
group, head, compressed key and block (fp64 Python floats); `select_blocks` (reference),
`select_blocks_chunked` (default), `select_blocks_varlen` and the decode path must reproduce
its rows exactly (ties go to the lower block id everywhere).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from minicpm4.kernels.infllm_v2 import (
    CompressedKeyBuffer,
    SparseParams,
    compress_keys,
    select_blocks,
    select_blocks_chunked,
    select_blocks_decode,
    select_blocks_varlen,
    stage1_scores,
)
from minicpm4.kernels.infllm_v2.selection import _num_visible

SMALL = SparseParams(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=3,
                     init_blocks=1)
NO_SINK = SparseParams(kernel_size=8, kernel_stride=4, block_size=16, window_size=16, topk=2,
                       init_blocks=0)
NO_LOCAL = SparseParams(kernel_size=8, kernel_stride=4, block_size=16, window_size=8, topk=4,
                        init_blocks=2)
WIDE_KERNEL = SparseParams(kernel_size=12, kernel_stride=4, block_size=8, window_size=8, topk=2,
                           init_blocks=0)
HEADS = [(16, 1), (8, 1), (4, 2), (2, 2)]  # (N, K): GQA groups of 16, 8, 2 and 1


def _brute_select(q_NTH, k_KSH, q_offset, p: SparseParams, lse: str) -> list:
    """Spec §2.2 steps 2-5 for one sequence, one scalar at a time. Returns [K][T] rows."""
    N, T, H = q_NTH.shape
    K, S, _ = k_KSH.shape
    G = N // K
    q, k = q_NTH.double().tolist(), k_KSH.double().tolist()

    def compress(kernel, stride):  # step 2: chunk j = mean(k[stride*j : stride*j + kernel])
        n = (S - kernel) // stride + 1 if S >= kernel else 0
        return [[[sum(k[g][stride * j + t][d] for t in range(kernel)) / kernel
                  for d in range(H)] for j in range(n)] for g in range(K)]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(H)

    def logsumexp(xs):
        if not xs:
            return -math.inf
        m = max(xs)
        return m + math.log(sum(math.exp(x - m) for x in xs))

    kc1 = compress(p.kernel_size, p.kernel_stride)
    kc2 = compress(p.coarse_kernel, p.coarse_stride)
    C, ps = len(kc1[0]), p.pool_stride
    num_blocks = -(-S // p.block_size)
    width = min(p.topk + p.window_size // p.block_size, num_blocks)
    rows = [[None] * T for _ in range(K)]
    for i in range(T):
        pos = q_offset + i
        q_blk = pos // p.block_size
        for g in range(K):
            score = [0.0] * C  # step 3: summed over the G heads; invisible keys count 0
            for h in range(g * G, (g + 1) * G):
                # a compressed key is visible iff its whole kernel is in the past
                vis = [j for j in range(C) if p.kernel_stride * j + p.kernel_size - 1 <= pos]
                logits = {j: dot(q[h][i], kc1[g][j]) for j in vis}
                lse_h = logsumexp(list(logits.values()))
                if lse == "approx":
                    vis2 = [j for j in range(len(kc2[g]))
                            if p.coarse_stride * j + p.coarse_kernel - 1 <= pos]
                    if vis2:  # no coarse key visible yet: keep the exact LSE
                        lse_h = logsumexp([dot(q[h][i], kc2[g][j]) for j in vis2])
                for j in vis:
                    score[j] += math.exp(logits[j] - lse_h)
            blk = []  # step 4: max over kernels ps*b-1 .. ps*b+ps-1, then forced / future
            for b in range(num_blocks):
                vals = [score[j] for j in range(ps * b - 1, ps * b + ps) if 0 <= j < C]
                s = max(vals) if vals else -math.inf
                if b > q_blk:
                    s = -math.inf
                elif b < p.init_blocks or q_blk - p.window_size // p.block_size <= b:
                    s = math.inf
                blk.append(s)
            # step 5: top-k (ties -> lower id), ascending, future -> -1 at the end
            chosen = sorted(sorted(range(num_blocks), key=lambda b: (-blk[b], b))[:width])
            kept = [b for b in chosen if b <= q_blk]
            rows[g][i] = kept + [-1] * (width - len(kept))
    return rows


def _data(seed, N, K, S, T, H=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, H, generator=g), torch.randn(K, S, H, generator=g)


CASES = [  # (params, S, T): full prefill, tail queries (q_offset > 0), odd lengths, tiny
    (SMALL, 93, 93), (SMALL, 150, 37), (SMALL, 7, 7), (NO_SINK, 101, 29),
    (NO_LOCAL, 120, 45), (WIDE_KERNEL, 77, 77), (SMALL, 130, 1),
]


@pytest.mark.parametrize("lse", ["exact", "approx"])
@pytest.mark.parametrize("N,K", HEADS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_brute_force(case, N, K, lse):
    p, S, T = CASES[case]
    q, k = _data(case * 100 + N, N, K, S, T)
    want = torch.tensor(_brute_select(q, k, S - T, p, lse), dtype=torch.int32)
    got = select_blocks(q, k, q_offset=S - T, params=p, lse=lse)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got, want)
    for chunk in (1, 5, None):
        fast = select_blocks_chunked(q, k, q_offset=S - T, params=p, lse=lse, chunk_size=chunk)
        assert torch.equal(fast, want), chunk


def test_chunked_byte_budget_matches_reference():
    q, k = _data(7, 8, 2, 300, 300)
    want = select_blocks(q, k, params=SMALL, lse="approx")
    got = select_blocks_chunked(q, k, params=SMALL, lse="approx", max_chunk_bytes=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("lse", ["exact", "approx"])
def test_forced_blocks_always_selected(lse):
    q, k = _data(3, 4, 2, 400, 250)
    idx = select_blocks_chunked(q, k, q_offset=150, params=SMALL, lse=lse)
    assert idx.shape == (2, 250, SMALL.num_selected)
    for i in range(250):
        q_blk = (150 + i) // SMALL.block_size
        forced = {0} | set(range(max(q_blk - SMALL.local_blocks, 0), q_blk + 1))
        for g in range(2):
            row = idx[g, i].tolist()
            assert forced <= set(row)
            assert max(row) <= q_blk and len(set(row) - {-1}) == len(row) - row.count(-1)


@pytest.mark.parametrize("S", [1, 16, 33, 80])
def test_everything_causal_selected_when_few_blocks(S):
    q, k = _data(S, 4, 1, S, S)
    idx = select_blocks_chunked(q, k, params=SMALL, lse="approx")
    nb = -(-S // SMALL.block_size)
    assert nb <= SMALL.num_selected and idx.shape == (1, S, nb)
    for i in range(S):
        q_blk = i // SMALL.block_size
        assert idx[0, i].tolist() == list(range(q_blk + 1)) + [-1] * (nb - q_blk - 1)


def test_spec_visibility_formulas_agree():
    p = SparseParams()
    pos = torch.arange(0, 5000)
    n1 = _num_visible(pos, p.kernel_size, p.kernel_stride, 10**6)
    n2 = _num_visible(pos, p.coarse_kernel, p.coarse_stride, 10**6)
    for x in range(0, 5000, 7):
        # spec: j < floor((i+1)/16) - 1  <=>  16j + 31 <= i; coarse: j < floor((i-63)/64)
        assert n1[x] == max((x + 1) // 16 - 1, 0) == sum(16 * j + 31 <= x for j in range(400))
        assert n2[x] == max((x - 63) // 64, 0) == sum(64 * j + 127 <= x for j in range(100))


def test_stage1_exact_rows_sum_to_group_size():
    q, k = _data(5, 8, 2, 90, 90)
    kc1 = compress_keys(k, SMALL.kernel_size, SMALL.kernel_stride)
    S_KTC = stage1_scores(q, kc1, q_offset=0, params=SMALL)
    assert S_KTC.dtype == torch.float32 and S_KTC.shape == (2, 90, kc1.shape[1])
    sums = S_KTC.sum(-1)
    seen = torch.arange(90) >= SMALL.kernel_size - 1
    torch.testing.assert_close(sums[:, seen], torch.full_like(sums[:, seen], 4.0))
    assert torch.all(sums[:, ~seen] == 0)


def test_compress_keys_counts_and_grad():
    k = torch.randn(2, 45, 3, requires_grad=True)
    kc = compress_keys(k, 8, 4)
    assert kc.shape == (2, (45 - 8) // 4 + 1, 3)
    torch.testing.assert_close(kc[:, 3], k[:, 12:20].mean(1))
    kc.sum().backward()
    assert k.grad[0, 0, 0] == pytest.approx(1 / 8) and k.grad[0, 5, 0] == pytest.approx(2 / 8)
    assert compress_keys(k[:, :7], 8, 4).shape == (2, 0, 3)


@pytest.mark.parametrize("pieces", ["one", "chunks"])
def test_buffer_equals_compress_keys(pieces):
    p = SparseParams(kernel_size=8, kernel_stride=4, block_size=16, window_size=16, topk=2)
    k = torch.randn(2, 203, 4, generator=torch.Generator().manual_seed(1))
    buf = CompressedKeyBuffer(p)
    sizes = [1] * 203 if pieces == "one" else [0, 5, 1, 30, 17, 3, 64, 83]
    t = 0
    for n in sizes:
        buf.append(k[:, t:t + n])
        t += n
        torch.testing.assert_close(buf.kc1_KCH, compress_keys(k[:, :t], 8, 4), atol=1e-6, rtol=0)
        torch.testing.assert_close(buf.kc2_KCH, compress_keys(k[:, :t], 32, 16), atol=1e-6, rtol=0)
        assert buf.num_tokens == t
    assert t == 203


@pytest.mark.parametrize("lse", ["exact", "approx"])
@pytest.mark.parametrize("N,K", [(16, 1), (4, 2)])
def test_decode_matches_prefill_last_row(N, K, lse):
    S = 170
    q, k = _data(11, N, K, S, S)
    prefill = select_blocks(q, k, params=SMALL, lse=lse)
    buf = CompressedKeyBuffer.from_keys(k[:, :60], SMALL)
    for pos in range(60, S):
        buf.append(k[:, pos:pos + 1])
        got = select_blocks_decode(q[:, pos], buf, cache_len=pos, params=SMALL, lse=lse)
        want = select_blocks(q[:, pos:pos + 1], k[:, :pos + 1], q_offset=pos, params=SMALL,
                             lse=lse)
        assert torch.equal(got, want), pos
    nb = -(-S // SMALL.block_size)
    assert torch.equal(got[:, 0], prefill[:, -1, :min(SMALL.num_selected, nb)])


def test_varlen_matches_per_sequence():
    lens = [(20, 50), (0, 30), (64, 64), (1, 129)]  # (len_q, len_k)
    qs, ks = zip(*[_data(i, 4, 2, lk, lq) for i, (lq, lk) in enumerate(lens)])
    cu_q = [0] + list(torch.tensor([lq for lq, _ in lens]).cumsum(0).tolist())
    cu_k = [0] + list(torch.tensor([lk for _, lk in lens]).cumsum(0).tolist())
    out = select_blocks_varlen(torch.cat(qs, 1), torch.cat(ks, 1), cu_seqlens_q=cu_q,
                               cu_seqlens_k=cu_k, params=SMALL, lse="approx")
    assert out.shape == (2, cu_q[-1], SMALL.num_selected)
    for b, (lq, lk) in enumerate(lens):
        one = select_blocks(qs[b], ks[b], q_offset=lk - lq, params=SMALL, lse="approx")
        got = out[:, cu_q[b]:cu_q[b + 1]]
        assert torch.equal(got[..., :one.shape[-1]], one)
        assert torch.all(got[..., one.shape[-1]:] == -1)


def test_use_nope_selects_with_pre_rope_inputs():
    p = dataclasses.replace(SMALL, use_nope=True)
    q, k = _data(2, 4, 2, 100, 100)
    qn, kn = _data(3, 4, 2, 100, 100)
    want = select_blocks(qn, kn, params=SMALL)
    assert torch.equal(select_blocks(q, k, params=p, q_nope_NTH=qn, k_nope_KSH=kn), want)
    assert torch.equal(select_blocks_chunked(q, k, params=p, q_nope_NTH=qn, k_nope_KSH=kn), want)
    with pytest.raises(ValueError, match="use_nope"):
        select_blocks(q, k, params=p)


def test_params_defaults_and_from_config():
    from minicpm4.model.config import SparseConfig

    p = SparseParams()
    assert (p.local_blocks, p.num_selected, p.coarse_kernel, p.coarse_stride, p.pool_stride) \
        == (32, 96, 128, 64, 4)
    assert SparseParams.from_config(SparseConfig()) == p
    q = SparseParams.from_config({"topk": 16, "window_size": 512, "use_nope": True})
    assert (q.topk, q.local_blocks, q.num_selected, q.use_nope) == (16, 8, 24, True)


@pytest.mark.parametrize("kw,field", [
    ({"kernel_size": 0}, "kernel_size"), ({"kernel_stride": -1}, "kernel_stride"),
    ({"block_size": 40}, "block_size"), ({"init_blocks": -1}, "init_blocks"),
    ({"topk": 1, "init_blocks": 1}, "topk"), ({"window_size": 0}, "window_size"),
    ({"dense_len": -2}, "dense_len"), ({"use_nope": "yes"}, "use_nope"),
    ({"topk": 2.0}, "topk"), ({"block_size": True}, "block_size"),
])
def test_bad_params_raise(kw, field):
    with pytest.raises(ValueError, match=f"sparse_config.{field}"):
        SparseParams(**kw)


def test_bad_inputs_raise():
    q, k = _data(0, 4, 2, 40, 40)
    for fn in (select_blocks, select_blocks_chunked):
        with pytest.raises(ValueError, match=r"q_NTH must be \[N, T, H\]"):
            fn(q[0], k, params=SMALL)
        with pytest.raises(ValueError, match=r"k_KSH must be \[K, S, H\]"):
            fn(q, k[None], params=SMALL)
        with pytest.raises(ValueError, match="multiple of kv heads"):
            fn(q[:3], k, params=SMALL)
        with pytest.raises(ValueError, match="head dims differ"):
            fn(q, k[..., :4], params=SMALL)
        with pytest.raises(ValueError, match="whole sequence"):
            fn(q, k, q_offset=3, params=SMALL)
        with pytest.raises(ValueError, match="lse must be"):
            fn(q, k, params=SMALL, lse="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        select_blocks_chunked(q, k, params=SMALL, chunk_size=0)
    with pytest.raises(TypeError, match="SparseParams"):
        select_blocks(q, k, params={"topk": 3})
    kc1 = compress_keys(k, 8, 4)
    with pytest.raises(ValueError, match="kc2_KCH"):
        stage1_scores(q, kc1, q_offset=0, params=SMALL, lse="approx")
    buf = CompressedKeyBuffer.from_keys(k, SMALL)
    with pytest.raises(ValueError, match="cache_len"):
        select_blocks_decode(q[:, -1], buf, cache_len=40, params=SMALL)
    with pytest.raises(ValueError, match=r"q_NH must be \[N, H\]"):
        select_blocks_decode(q[:, -1:], buf, cache_len=39, params=SMALL)
    with pytest.raises(ValueError, match="differ from the buffer"):
        select_blocks_decode(q[:, -1], buf, cache_len=39, params=NO_SINK)
    with pytest.raises(ValueError, match="does not match the buffer"):
        buf.append(torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match="cu_seqlens"):
        select_blocks_varlen(q, k, cu_seqlens_q=[0, 20], cu_seqlens_k=[0, 40], params=SMALL)
    with pytest.raises(ValueError, match="len_q <= len_k"):
        select_blocks_varlen(q, k[:, :30], cu_seqlens_q=[0, 40], cu_seqlens_k=[0, 30],
                             params=SMALL)
