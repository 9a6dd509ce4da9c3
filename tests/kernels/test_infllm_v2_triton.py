"""InfLLM v2 Triton kernels (`kernels/infllm_v2/triton_*.py`) against the PyTorch oracles.

CPU: the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported) on tiny fp32 shapes: stage-2 forward, LSE and dq/dk/dv equal
`sparse_attention_reference`, stage-1 scores equal `selection.stage1_scores` in both LSE
modes, all within 1e-4. Compiled kernels run in a subprocess without the interpreter: every
bf16 kernel is built for sm_90 with ptxas (no GPU needed), and the `gpu` tests (skipped
without CUDA) repeat the comparisons on CUDA at MiniCPM4-like shapes, in fp32 and bf16.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (0: subprocesses)

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from minicpm4.kernels.infllm_v2 import triton_kernels  # noqa: E402
from minicpm4.kernels.infllm_v2.params import SparseParams  # noqa: E402
from minicpm4.kernels.infllm_v2.selection import (  # noqa: E402
    compress_keys, select_blocks_chunked, stage1_scores)
from minicpm4.kernels.infllm_v2.stage2 import (block_mask_from_indices,  # noqa: E402
                                               sparse_attention_reference)
from minicpm4.kernels.infllm_v2.triton_kernels import (sparse_attention_triton,  # noqa: E402
                                                       stage1_scores_triton)

REPO = Path(__file__).resolve().parents[2]
TOL = dict(rtol=1e-4, atol=1e-4)
# (N, K, H, block_size, T, q_offset, slots): GQA groups 1, 2 and 8, lengths not multiples of
# the block, prefill from 0, a chunk after a prefix, decode (T=1).
CASES = [(4, 2, 16, 16, 37, 0, 3), (2, 1, 16, 16, 29, 19, 4), (4, 2, 16, 16, 1, 50, 3),
         (8, 1, 16, 16, 45, 18, 2), (2, 2, 16, 16, 64, 0, 4)]
TINY = SparseParams(kernel_size=4, kernel_stride=2, block_size=8, window_size=16, topk=4)


def random_indices(K, T, q_offset, bs, slots, *, gen, messy=False, device="cpu"):
    """int32 [K, T, slots]: random causal blocks incl. the query's own, ascending, -1 last.
    `messy` adds an all -1 row, a duplicate and a future block (both must be ignored)."""
    nb = -(-(q_offset + T) // bs)
    own_T1 = ((q_offset + torch.arange(T)) // bs)[:, None]
    b_1B = torch.arange(nb)[None, :]
    score = torch.rand(K, T, nb, generator=gen).masked_fill(b_1B > own_T1, -1.0)
    score = score.masked_fill(b_1B == own_T1, 2.0)
    top = score.topk(min(slots, nb), dim=-1)
    ids = torch.where(top.values >= 0, top.indices, nb).sort(-1).values
    idx = torch.where(ids == nb, -1, ids)
    if idx.shape[-1] < slots:
        idx = torch.cat([idx, idx.new_full((K, T, slots - idx.shape[-1]), -1)], -1)
    if messy and T > 2:
        idx[0, 0] = -1
        idx[-1, 1, -1] = idx[-1, 1, 0]
        idx[0, 2, -1] = nb - 1 if (q_offset + 2) // bs < nb - 1 else -1
    return idx.to(torch.int32).to(device)


def stage2_inputs(case, *, seed=0, dtype=torch.float32, device="cpu", messy=True):
    N, K, H, bs, T, off, slots = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, T + (off if n == K else 0), H, generator=gen)
               for n in (N, K, K))
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    return q, k, v, random_indices(K, T, off, bs, slots, gen=gen, messy=messy, device=device)


def run(fn, q, k, v, idx, bs, off, dout, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, idx, block_size=bs, q_offset=off, **kw)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out, leaves, dout)
    return (out.detach(), *grads)


def reference_lse(q, k, idx, bs, off):
    N, K = q.shape[-3], k.shape[-3]
    mask = block_mask_from_indices(idx, num_keys=k.shape[-2], block_size=bs, q_offset=off)
    s = q.float() @ k.float().repeat_interleave(N // K, 0).transpose(-1, -2)
    s = s / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask.repeat_interleave(N // K, 0), -math.inf).logsumexp(-1).where(
        mask.repeat_interleave(N // K, 0).any(-1), math.inf)


@pytest.mark.parametrize("rt", [1, 4], ids=lambda r: f"tile{r}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}K{}H{}bs{}T{}off{}k{}".format(*c))
def test_stage2_matches_reference(case, rt):
    q, k, v, idx = stage2_inputs(case)
    bs, off = case[3], case[5]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got = run(sparse_attention_triton, q, k, v, idx, bs, off, dout, seg_tokens=5,
              tokens_per_tile=rt)
    want = run(sparse_attention_reference, q, k, v, idx, bs, off, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")
    _, lse = sparse_attention_triton(q, k, v, idx, block_size=bs, q_offset=off,
                                     return_lse=True, tokens_per_tile=rt)
    torch.testing.assert_close(lse, reference_lse(q, k, idx, bs, off), **TOL)


def test_stage2_batched_default_segments_and_empty_rows():
    case = (4, 2, 16, 16, 33, 7, 3)
    ins = [stage2_inputs(case, seed=s) for s in (3, 4)]
    q, k, v, idx = (torch.stack(x) for x in zip(*ins))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    got = run(sparse_attention_triton, q, k, v, idx, 16, 7, dout, tokens_per_tile=2)
    want = run(sparse_attention_reference, q, k, v, idx, 16, 7, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    # the messy row 0 of kv head 0 selects nothing: zero output and zero dq for its heads
    assert got[0][:, :2, 0].abs().max() == 0 and got[1][:, :2, 0].abs().max() == 0


@pytest.mark.parametrize("rt", [4, 8])
def test_stage2_many_blocks_bitmask(rt):
    """70 blocks: selection bits in 3 words, incl. bit 31 (the int32 sign bit)."""
    case = (4, 2, 16, 16, 11, 1109, 6)
    q, k, v, idx = stage2_inputs(case, messy=False)
    idx[0, ::2, 1:5] = torch.tensor([31, 32, 63, 64], dtype=torch.int32)
    idx[1, 1::3, 1:3] = torch.tensor([31, 64], dtype=torch.int32)
    idx = idx.sort(-1).values
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    got = run(sparse_attention_triton, q, k, v, idx, 16, 1109, dout, tokens_per_tile=rt)
    want = run(sparse_attention_reference, q, k, v, idx, 16, 1109, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_stage2_bf16_interpreter():
    case = (4, 2, 16, 16, 40, 9, 3)
    q, k, v, idx = stage2_inputs(case, dtype=torch.bfloat16)
    out = sparse_attention_triton(q, k, v, idx, block_size=16, q_offset=9)
    assert out.dtype == torch.bfloat16
    want = sparse_attention_reference(q.float(), k.float(), v.float(), idx, block_size=16,
                                      q_offset=9)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_stage2_bad_shapes_raise():
    q, k, v, idx = stage2_inputs((2, 1, 12, 16, 8, 0, 2))
    with pytest.raises(ValueError, match="power-of-two"):
        sparse_attention_triton(q, k, v, idx, block_size=16)
    q, k, v, idx = stage2_inputs((2, 1, 16, 16, 8, 0, 2))
    with pytest.raises(ValueError, match="tokens_per_tile"):
        sparse_attention_triton(q, k, v, idx, block_size=16, tokens_per_tile=3)


def stage1_inputs(N, K, T, off, params, *, H=16, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, T, H, generator=gen)
    k = torch.randn(K, T + off, H, generator=gen)
    q, k = q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)
    kc1 = compress_keys(k, params.kernel_size, params.kernel_stride)
    kc2 = compress_keys(k, params.coarse_kernel, params.coarse_stride)
    return q, kc1, kc2


@pytest.mark.parametrize("lse", ["exact", "approx"])
@pytest.mark.parametrize("N,K,T,off,params", [
    (4, 2, 40, 0, TINY), (2, 1, 23, 41, TINY), (2, 2, 64, 0, TINY), (4, 2, 1, 30, TINY),
    (4, 2, 12, 0, TINY),  # no coarse key at all: approx falls back to exact everywhere
    (4, 2, 60, 100, SparseParams())], ids=lambda x: getattr(x, "kernel_size", x))
def test_stage1_matches_reference(N, K, T, off, params, lse):
    q, kc1, kc2 = stage1_inputs(N, K, T, off, params)
    got = stage1_scores_triton(q, kc1, q_offset=off, params=params, lse=lse, kc2_KCH=kc2)
    want = stage1_scores(q, kc1, q_offset=off, params=params, lse=lse, kc2_KCH=kc2)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("lse", ["exact", "approx"])
def test_stage1_small_tiles(lse):
    """Several key chunks per pass, zero-filled tail chunks, tiles mixing fallback rows."""
    from minicpm4.kernels.infllm_v2.triton_stage1 import stage1_scores_launch
    q, kc1, kc2 = stage1_inputs(4, 2, 50, 6, TINY, seed=5)
    got = stage1_scores_launch(q, kc1, kc2 if lse == "approx" else None, q_offset=6,
                               params=TINY, rows=16, block_c=16)
    want = stage1_scores(q, kc1, q_offset=6, params=TINY, lse=lse, kc2_KCH=kc2)
    torch.testing.assert_close(got, want, **TOL)


def test_imports_and_raises_without_triton(monkeypatch):
    """The module loads with triton absent (a fresh copy, `import triton` -> ImportError);
    its entry points then raise a RuntimeError naming triton."""
    import importlib.util
    monkeypatch.setitem(sys.modules, "triton", None)
    spec = importlib.util.spec_from_file_location("_tk_no_triton", triton_kernels.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HAVE_TRITON is False
    q, k, v, idx = stage2_inputs(CASES[0])
    with pytest.raises(RuntimeError, match="triton"):
        mod.sparse_attention_triton(q, k, v, idx, block_size=16)
    with pytest.raises(RuntimeError, match="triton"):
        mod.stage1_scores_triton(q, k, q_offset=0, params=TINY, lse="exact")
    assert triton_kernels.HAVE_TRITON is True


# ----------------------------------------------------------------------------- compiled
# Importing triton under TRITON_INTERPRET=1 turns triton's own library (tl.sum, tl.cdiv...)
# into interpreted functions for the whole process, so compiled kernels are checked in a
# fresh subprocess with TRITON_INTERPRET=0, which runs one of the _check_* functions below.

def _in_subprocess(check: str, *args, timeout: int = 600) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = (f"import runpy; m = runpy.run_path({str(Path(__file__))!r}); "
            f"m[{check!r}](*{args!r})")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, timeout=timeout,
                         capture_output=True, text=True)
    assert res.returncode == 0, f"{check}{args} failed:\n{res.stdout}\n{res.stderr[-6000:]}"


def _check_bf16_compile_sm90() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from minicpm4.kernels.infllm_v2 import triton_stage1 as s1
    from minicpm4.kernels.infllm_v2 import triton_stage2 as s2
    types = {**dict.fromkeys(["N", "K", "T", "S", "KT", "W", "NB", "C1", "C2", "q_offset"],
                             "i32"),
             **dict.fromkeys(["qk_scale", "sm_scale"], "fp32"),
             **dict.fromkeys(["LSE", "DELTA", "DK", "DV", "OUT"], "*fp32"),
             **dict.fromkeys(["IDX", "CNT", "BITS", "SEG_KEY", "SEG_START", "SEG_END", "TOK"],
                             "*i32")}

    def build(fn, consts, opts):  # q/k/v/o/dq/do/kc pointers: bf16
        sig = {a: "constexpr" if a in consts else types.get(a, "*bf16") for a in fn.arg_names}
        kernel = triton_compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                options=opts)
        assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, kernel.metadata.shared)

    common = dict(G=16, H=128, BS=64, UPCAST=False)
    for rt in (1, 4):
        build(s2._fwd_kernel, dict(common, BLOCK_G=16, RT=rt), s2._opts("fwd", torch.bfloat16))
        build(s2._dq_kernel, dict(common, BLOCK_G=16, RT=rt), s2._opts("dq", torch.bfloat16))
    build(s2._dkdv_kernel, dict(common, BLOCK_G=16, BLOCK_Q=2),
          s2._opts("dkdv", torch.bfloat16))
    for approx in (True, False):
        build(s1._stage1_kernel, dict(G=16, BLOCK_G=16, BLOCK_T=8, BLOCK_C=64, H=128, KER1=32,
                                      STR1=16, KER2=128, STR2=64, APPROX=approx,
                                      UPCAST=False), dict(num_warps=4))


def _close(a, b, rel):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= rel * b.float().abs().max().item() + rel, f"max err {err}"


def _check_gpu_stage2(dtype_name: str, rt: int, T: int = 4096, device: str = "cuda") -> None:
    dtype = getattr(torch, dtype_name)
    params = SparseParams(topk=8, window_size=512)  # 16 of 64 blocks at 4K: really sparse
    N, K, H = 16, 1, 128
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, T, H, generator=gen).to(device, dtype) for n in (N, K, K))
    idx = select_blocks_chunked(q, k, params=params, lse="approx")
    assert (idx >= 0).sum(-1).float().mean() <= 16
    dout = torch.randn(q.shape, generator=gen).to(device, dtype)
    got = run(sparse_attention_triton, q, k, v, idx, 64, 0, dout, tokens_per_tile=rt)
    want = run(sparse_attention_reference, q.float(), k.float(), v.float(), idx, 64, 0,
               dout.float())
    for a, b in zip(got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **TOL)
        else:
            _close(a, b, 2e-2)


def _check_gpu_stage1(dtype_name: str, lse: str, T: int = 4096, device: str = "cuda") -> None:
    dtype = getattr(torch, dtype_name)
    params = SparseParams()
    q, kc1, kc2 = stage1_inputs(16, 1, T, 0, params, H=128, dtype=dtype, device=device)
    got = stage1_scores_triton(q, kc1, q_offset=0, params=params, lse=lse, kc2_KCH=kc2)
    want = stage1_scores(q, kc1, q_offset=0, params=params, lse=lse, kc2_KCH=kc2)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **TOL)
    else:
        _close(got, want, 2e-2)


def test_bf16_kernels_compile_for_sm90():
    """No GPU needed: triton + ptxas build every bf16 kernel for sm_90 at MiniCPM4 shapes
    (G=16, H=128, bs=64) with the launch options used, within H100 shared memory."""
    _in_subprocess("_check_bf16_compile_sm90")


@pytest.mark.gpu
@pytest.mark.parametrize("rt", [1, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_stage2_minicpm4_shapes(dtype, rt):
    _in_subprocess("_check_gpu_stage2", dtype, rt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lse", ["exact", "approx"])
def test_gpu_stage1_minicpm4_shapes(dtype, lse):
    _in_subprocess("_check_gpu_stage1", dtype, lse)
