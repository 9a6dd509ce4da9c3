"""The fused C++ CPU kernels of InfLLM v2 (stage 2 and selection) against the PyTorch oracles."""

from __future__ import annotations

import pytest
import torch

from minicpm4.kernels import cpu_ext
from minicpm4.kernels.infllm_v2 import select_cpp, stage2_cpp
from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels.infllm_v2.decode_selection import CompressedKeyBuffer, select_blocks_decode
from minicpm4.kernels.infllm_v2.selection import (block_scores, compress_keys,
                                                  select_blocks_chunked, stage1_scores)
from minicpm4.kernels.infllm_v2.stage2 import sparse_attention, sparse_attention_reference


@pytest.fixture(autouse=True)
def _built():
    if not (cpu_ext.load("sparse_attn") and cpu_ext.load("sparse_select")):
        pytest.skip("the C++ kernels cannot be built on this machine")


def _inputs(N, K, T, off, H, bs, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    S = off + T
    nb = -(-S // bs)
    q = torch.randn(N, T, H, generator=g).to(dtype)
    kk = torch.randn(K, S, H, generator=g).to(dtype)
    v = torch.randn(K, S, H, generator=g).to(dtype)
    # -1 slots, duplicates and future blocks included
    idx = torch.randint(-1, nb, (K, T, k), generator=g, dtype=torch.int32)
    return q, kk, v, idx


@pytest.fixture(params=[True, False], ids=["avx512", "mkl"])
def path(request, monkeypatch):
    """Both inner loops of stage 2: the AVX-512 tiles (where built) and the MKL sgemms."""
    monkeypatch.setattr(stage2_cpp, "AVX512", request.param)
    return request.param


def test_avx512_path_is_built_where_the_cpu_has_it() -> None:
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    has = torch.ops.minicpm4_sparse_attn.has_avx512_path
    assert has(128) == ("avx512f" in flags) and has(64) == has(16) == has(256) == has(128)
    assert not has(8) and not has(48)


@pytest.mark.parametrize("N,K,T,off,H,bs,k,rows", [
    (4, 2, 50, 0, 16, 8, 3, None),
    (8, 1, 40, 30, 32, 16, 4, 1),
    (8, 1, 40, 30, 32, 16, 4, 16),
    (6, 3, 1, 77, 8, 8, 5, None),      # a decode step
    (16, 2, 130, 0, 64, 64, 6, 64),    # G = 8, the 0.5B's group; a partial last block
    (8, 8, 33, 5, 16, 16, 4, 4),       # G = 1
    (4, 1, 300, 50, 16, 16, 6, 100),   # groups spanning several query blocks, two mask words
    (4, 2, 600, 0, 16, 8, 9, 256),     # four mask words
    (16, 1, 300, 200, 128, 64, 7, 128),  # MiniCPM4-8B's geometry (G = 16, H = 128), prepared K^T
    (16, 1, 1, 700, 128, 64, 7, None),   # ... one decode step (per-chunk K^T)
    (4, 1, 280, 0, 48, 16, 5, 64),     # H = 48: MKL path even when AVX-512 is asked for
])
def test_stage2_equals_reference(N, K, T, off, H, bs, k, rows, path) -> None:
    q, kk, v, idx = _inputs(N, K, T, off, H, bs, k)
    out = stage2_cpp.sparse_attention_cpp_one(q, kk, v, idx, bs, off, rows)
    ref = sparse_attention_reference(q, kk, v, idx, block_size=bs, q_offset=off)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_stage2_full_topk_equals_dense_and_empty_rows_are_zero(path) -> None:
    q, kk, v, _ = _inputs(4, 1, 100, 0, 16, 16, 1)
    all_KTk = torch.arange(7, dtype=torch.int32).expand(1, 100, 7)
    dense = torch.nn.functional.scaled_dot_product_attention(q, kk.expand(4, -1, -1),
                                                             v.expand(4, -1, -1), is_causal=True)
    out = sparse_attention(q, kk, v, all_KTk.contiguous(), block_size=16, backend="cpp")
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    none = torch.full((1, 100, 3), -1, dtype=torch.int32)
    assert sparse_attention(q, kk, v, none, block_size=16, backend="cpp").abs().max() == 0


@pytest.mark.parametrize("T,off", [(60, 20), (300, 20), (1, 90)])
def test_stage2_bf16_and_batch(T, off, path) -> None:
    q, kk, v, idx = _inputs(8, 2, T, off, 32, 16, 4, dtype=torch.bfloat16)
    out = sparse_attention(q[None].expand(2, -1, -1, -1), kk[None].expand(2, -1, -1, -1),
                           v[None].expand(2, -1, -1, -1), idx[None].expand(2, -1, -1, -1),
                           block_size=16, q_offset=off, backend="cpp")
    ref = sparse_attention_reference(q.float(), kk.float(), v.float(), idx, block_size=16,
                                     q_offset=off)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, T, 32)
    torch.testing.assert_close(out[1].float(), ref, rtol=1e-2, atol=1e-2)


def test_auto_uses_cpp_for_inference_only(monkeypatch) -> None:
    q, kk, v, idx = _inputs(4, 2, 40, 0, 16, 8, 3)
    calls = []
    real = stage2_cpp.sparse_attention_cpp_one
    monkeypatch.setattr(stage2_cpp, "sparse_attention_cpp_one",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        sparse_attention(q, kk, v, idx, block_size=8)
    assert calls == [1]
    q.requires_grad_(True)
    out = sparse_attention(q, kk, v, idx, block_size=8)  # training: a differentiable backend
    out.sum().backward()
    assert calls == [1] and q.grad is not None


def test_fallback_when_the_kernels_are_off(monkeypatch) -> None:
    monkeypatch.setattr(cpu_ext, "_STATE", {"sparse_attn": False, "sparse_select": False})
    q, kk, v, idx = _inputs(4, 2, 40, 0, 16, 8, 3)
    assert not stage2_cpp.available(q, kk, v) and not select_cpp.available(q)
    ref = sparse_attention_reference(q, kk, v, idx, block_size=8)
    torch.testing.assert_close(sparse_attention(q, kk, v, idx, block_size=8), ref,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not available"):
        stage2_cpp.sparse_attention_cpp_one(q, kk, v, idx, 8, 0)
    p = SparseParams(kernel_size=8, kernel_stride=4, block_size=8, window_size=16, topk=2)
    assert torch.equal(select_cpp.select_blocks_fast(q, kk, params=p),
                       select_blocks_chunked(q, kk, params=p))


def test_stage2_bad_rows() -> None:
    q, kk, v, idx = _inputs(4, 2, 40, 0, 16, 8, 3)
    with pytest.raises(ValueError, match="rows"):
        stage2_cpp.sparse_attention_cpp_one(q, kk, v, idx, 8, 0, rows=257)


# ----------------------------------------------------------------------------- selection

def _assert_same_up_to_ties(got_KTk, ref_KTk, scores_KTB, tol=1e-5) -> None:
    """Equal rows, or rows whose chosen blocks are a valid top-k of the reference scores up
    to `tol` (the sums run in another order, so exact ties may break the other way)."""
    diff = (got_KTk != ref_KTk).any(-1).nonzero().tolist()
    assert len(diff) <= max(2, ref_KTk.shape[0] * ref_KTk.shape[1] // 500), diff
    for kh, t in diff:
        s = scores_KTB[kh, t]
        got = {int(b) for b in got_KTk[kh, t] if b >= 0}
        ref = {int(b) for b in ref_KTk[kh, t] if b >= 0}
        assert len(got) == len(ref)
        worst_got = min(float(s[b]) for b in got - ref)
        best_missed = max(float(s[b]) for b in ref - got)
        assert worst_got >= best_missed - tol * max(1.0, abs(best_missed)), (kh, t)


def _ref_scores(q, k, off, p, lse):
    kc1 = compress_keys(k, p.kernel_size, p.kernel_stride)
    kc2 = compress_keys(k, p.coarse_kernel, p.coarse_stride)
    S = stage1_scores(q, kc1, q_offset=off, params=p, lse=lse, kc2_KCH=kc2)
    return block_scores(S, q_offset=off, num_blocks=-(-k.shape[1] // p.block_size), params=p)


SMALL = SparseParams(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1,
                     window_size=32, topk=3, dense_len=0)


@pytest.mark.parametrize("lse", ["exact", "approx"])
@pytest.mark.parametrize("N,K,T,off,H,p", [
    (4, 2, 300, 0, 16, SMALL),
    (16, 2, 200, 500, 32, SMALL.replace(init_blocks=2, window_size=16, topk=5)),  # G = 8
    (16, 1, 1500, 0, 64, SparseParams(kernel_size=32, kernel_stride=16, block_size=64,
                                      window_size=256, topk=8)),
    (4, 1, 1400, 300, 16, SMALL.replace(topk=6)),  # > 256 Kc1 keys: chunked approx pass
])
def test_selection_equals_pytorch(N, K, T, off, H, p, lse) -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(N, T, H, generator=g), torch.randn(K, off + T, H, generator=g)
    got = select_cpp.select_blocks_cpp(q, k, q_offset=off, params=p, lse=lse)
    ref = select_blocks_chunked(q, k, q_offset=off, params=p, lse=lse)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    _assert_same_up_to_ties(got, ref, _ref_scores(q, k, off, p, lse))


def test_selection_use_nope_and_decode() -> None:
    p = SMALL.replace(use_nope=True)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(8, 150, 16, generator=g), torch.randn(2, 150, 16, generator=g)
    qn, kn = torch.randn(8, 150, 16, generator=g), torch.randn(2, 150, 16, generator=g)
    got = select_cpp.select_blocks_cpp(q, k, params=p, lse="approx", q_nope_NTH=qn,
                                       k_nope_KSH=kn)
    ref = select_blocks_chunked(q, k, params=p, lse="approx", q_nope_NTH=qn, k_nope_KSH=kn)
    _assert_same_up_to_ties(got, ref, _ref_scores(qn, kn, 0, p, "approx"))
    buf = CompressedKeyBuffer.from_keys(k[:, :120], SMALL)
    for t in range(120, 150):
        buf.append(k[:, t:t + 1])
        dec = select_cpp.select_decode_fast(q[:, t], buf, cache_len=t, params=SMALL,
                                            lse="approx")
        assert torch.equal(dec, select_blocks_decode(q[:, t], buf, cache_len=t, params=SMALL,
                                                     lse="approx"))
    with pytest.raises(ValueError, match="cache_len"):
        select_cpp.select_decode_fast(q[:, 0], buf, cache_len=3, params=SMALL)
