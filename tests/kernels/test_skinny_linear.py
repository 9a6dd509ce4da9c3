"""The skinny bf16 GEMM for decode steps (kernels/skinny_linear.py, csrc/skinny_gemm.cpp; issue 5
acceptance 5): equal to an fp32 reference up to one bf16 rounding for every row count up to the
cut-over, odd K and N, bias, 3-D and strided inputs; F.linear wherever the kernel must not run;
a bf16 model decodes the same with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minicpm4 import loading
from minicpm4.engine.generate import generate
from minicpm4.engine.request import SamplingParams
from minicpm4.kernels import cpu_ext, skinny_linear
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def built() -> None:
    if not cpu_ext.load("skinny_gemm"):
        pytest.skip("the skinny_gemm C++ extension cannot be built on this machine "
                    "(or MINICPM4_CPU_EXT=0)")


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ w.float().T
    return y + b.float() if b is not None else y


def _assert_bf16_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """One bf16 rounding of an fp32 sum: relative 2^-8, plus a little for the fp32 order."""
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float() - ref).abs()
    tol = ref.abs() * 2.0 ** -8 + 1e-3 * ref.abs().max()
    assert bool((err <= tol).all()), f"max error {err.max().item()} (|ref| max " \
        f"{ref.abs().max().item()})"


def _data(M: int, K: int, N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    return x, w, b


@pytest.mark.parametrize("op_name", ["linear", "linear_portable"])
def test_op_matches_fp32_reference_for_every_row_count(built, op_name) -> None:
    op = getattr(torch.ops.minicpm4_skinny_gemm, op_name)
    for K, N in ((100, 37), (1000, 70), (32, 4), (7, 1)):
        for M in range(1, 34):
            x, w, b = _data(M, K, N, seed=M)
            for bias in (None, b):
                _assert_bf16_close(op(x, w, bias), _reference(x, w, bias))


@pytest.mark.parametrize("op_name", ["linear", "linear_avx512"])
def test_op_amx_shapes_match_fp32_reference(built, op_name) -> None:
    """K a multiple of 32 and N >= 32: where AMX exists `linear` takes the tile path (full
    groups of 32 weight rows, the N % 32 rest on AVX-512, one or two column blocks of x);
    `linear_avx512` is the vector path on the same shapes."""
    op = getattr(torch.ops.minicpm4_skinny_gemm, op_name)
    for K, N in ((64, 32), (256, 100), (1024, 70), (96, 45)):
        for M in (1, 2, 3, 15, 16, 17, 31, 32):
            x, w, b = _data(M, K, N, seed=M + K)
            for bias in (None, b):
                _assert_bf16_close(op(x, w, bias), _reference(x, w, bias))


def test_has_amx_reports_the_cpu(built) -> None:
    ops = torch.ops.minicpm4_skinny_gemm
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if ops.has_amx():
        assert "amx_bf16" in flags and ops.has_avx512_bf16()


@pytest.mark.parametrize("K", [300, 256])
def test_op_rows_do_not_depend_on_the_batch(built, K) -> None:
    """A row's result is the same alone or among others (decode batches stay reproducible),
    on the vector path (K = 300) and on the AMX one where it exists (K = 256, M up to 32)."""
    x, w, b = _data(32, K, 45)
    op = torch.ops.minicpm4_skinny_gemm.linear
    for M in (13, 17, 32):
        full = op(x[:M], w, b)
        for m in (0, 5, 11):
            assert torch.equal(op(x[m:m + 1], w, b), full[m:m + 1])
            assert torch.equal(op(x[m:m + 2], w, b), full[m:m + 2])


@pytest.mark.parametrize("M", [1, 3, 8, 17, 32])
def test_linear_multi_equals_one_linear_per_weight(built, M) -> None:
    """q/k/v-like and gate/up-like weight sets, AMX-sized and not (N < 32, N % 32 tails):
    bit-identical to separate `linear` calls."""
    op = torch.ops.minicpm4_skinny_gemm
    g = torch.Generator().manual_seed(M)
    for shapes in (((1024, 256), (128, 256), (128, 256)), ((640, 256), (640, 256)),
                   ((40, 64), (8, 64)), ((100, 96), (32, 96)), ((50, 72),)):
        ws = [torch.randn(n, k, generator=g).bfloat16() for n, k in shapes]
        x = torch.randn(M, shapes[0][1], generator=g).bfloat16()
        ys = op.linear_multi(x, ws)
        assert len(ys) == len(ws)
        for y, w in zip(ys, ws):
            assert torch.equal(y, op.linear(x, w, None))
    # a weight without rows beside real ones: an empty output, the others as before
    empty = torch.zeros(0, ws[0].shape[1], dtype=torch.bfloat16)
    y0, y1 = op.linear_multi(x, [ws[0], empty])
    assert torch.equal(y0, op.linear(x, ws[0], None)) and y1.shape == (M, 0)
    with pytest.raises(RuntimeError, match="no weights"):
        op.linear_multi(x, [])
    with pytest.raises(RuntimeError, match="inner dims differ"):
        op.linear_multi(x, [ws[0], torch.zeros(4, 8).bfloat16()])


def test_op_edge_cases(built) -> None:
    op = torch.ops.minicpm4_skinny_gemm.linear
    w, b = torch.randn(5, 0).bfloat16(), torch.randn(5).bfloat16()
    assert torch.equal(op(torch.empty(3, 0, dtype=torch.bfloat16), w, b), b.expand(3, 5))
    assert op(torch.empty(0, 8, dtype=torch.bfloat16), torch.randn(5, 8).bfloat16(), None
              ).shape == (0, 5)
    with pytest.raises(RuntimeError, match="inner dims"):
        op(torch.randn(2, 8).bfloat16(), torch.randn(5, 9).bfloat16(), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(2, 8).bfloat16(), torch.randn(8, 5).bfloat16().t(), None)


def test_linear_takes_the_kernel_for_3d_and_strided_inputs(built) -> None:
    _, w, b = _data(1, 100, 37)
    x3 = torch.randn(2, 3, 100).bfloat16()
    strided = torch.randn(100, 9).bfloat16().t()[::2]  # [5, 100], not contiguous
    assert not strided.is_contiguous()
    with torch.no_grad():
        for x in (x3, strided):
            for bias in (None, b):
                assert skinny_linear.applies(x, w, bias)
                y = skinny_linear.linear(x, w, bias)
                assert y.shape == (*x.shape[:-1], 37)
                _assert_bf16_close(y, _reference(x, w, bias))
    # without autograd needs, grad mode on is fine too
    assert skinny_linear.applies(x3, w, b)


def test_more_than_32_rows_only_on_the_tile_path(built) -> None:
    """Up to `max_rows()` rows where AMX runs (passes of 32 rows over the same weights), 32
    elsewhere; shapes the tiles cannot take stay at 32 rows."""
    amx = bool(torch.ops.minicpm4_skinny_gemm.has_amx())
    assert skinny_linear.max_rows() == (skinny_linear.MAX_ROWS_AMX if amx
                                        else skinny_linear.MAX_ROWS)
    for M in (33, 64, 90, skinny_linear.MAX_ROWS_AMX):
        x, w, b = _data(M, 96, 80, seed=M)
        assert skinny_linear.applies(x, w, b) == amx
        _assert_bf16_close(skinny_linear.linear(x, w, b), _reference(x, w, b))
    x, w, _ = _data(40, 96, 16)  # N < 32: no tile group
    assert not skinny_linear.applies(x, w)
    x, w, _ = _data(40, 72, 64)  # K % 32 != 0
    assert not skinny_linear.applies(x, w)


def test_linear_falls_back_to_f_linear(built, monkeypatch) -> None:
    x, w, b = _data(4, 64, 16)
    assert skinny_linear.applies(x, w, b)
    # fp32, mixed dtypes, too many rows
    assert not skinny_linear.applies(x.float(), w.float(), b.float())
    assert torch.equal(skinny_linear.linear(x.float(), w.float()), F.linear(x.float(), w.float()))
    assert not skinny_linear.applies(x, w, b.float())
    big = torch.randn(skinny_linear.max_rows() + 1, 64).bfloat16()
    assert not skinny_linear.applies(big, w)
    assert torch.equal(skinny_linear.linear(big, w, b), F.linear(big, w, b))
    # autograd: the kernel has no backward, so grad-requiring inputs take F.linear
    xg = x.clone().requires_grad_()
    assert not skinny_linear.applies(xg, w)
    skinny_linear.linear(xg, w, b).float().sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(xg.grad.float(), w.float().sum(0).expand(4, 64), rtol=2e-2,
                               atol=2e-2)
    wg = w.clone().requires_grad_()
    assert not skinny_linear.applies(x, wg)
    with torch.no_grad():
        assert skinny_linear.applies(x, wg)
    # switched off: environment, a failed build, the module switch
    monkeypatch.setenv("MINICPM4_CPU_EXT", "0")
    assert not skinny_linear.applies(x, w, b)
    assert torch.equal(skinny_linear.linear(x, w, b), F.linear(x, w, b))
    monkeypatch.delenv("MINICPM4_CPU_EXT")
    monkeypatch.setitem(cpu_ext._STATE, "skinny_gemm", False)
    assert not skinny_linear.applies(x, w, b)
    monkeypatch.setitem(cpu_ext._STATE, "skinny_gemm", True)
    assert skinny_linear.applies(x, w, b)
    monkeypatch.setattr(skinny_linear, "SKINNY_LINEAR", False)
    assert not skinny_linear.applies(x, w, b)


def _count_kernel_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = skinny_linear.kernel

    def counting(*args, **kw):
        calls[0] += 1
        return real(*args, **kw)
    monkeypatch.setattr(skinny_linear, "kernel", counting)
    return calls


@torch.no_grad()
def test_bf16_model_logits_and_greedy_decode_match_f_linear(built, monkeypatch, one_thread
                                                            ) -> None:
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny_config(torch_dtype="bfloat16"))
    model.init_weights(seed=0)
    model = model.bfloat16().eval()
    ids = torch.randint(3, 512, (3, 9))
    calls = _count_kernel_calls(monkeypatch)
    with_kernel = model(ids)
    n_layers = model.config.num_hidden_layers
    assert calls[0] == 7 * n_layers + 1  # q, k, v, o, gate, up, down per layer; the LM head
    monkeypatch.setattr(skinny_linear, "SKINNY_LINEAR", False)
    reference = model(ids)
    assert calls[0] == 7 * n_layers + 1
    scale = reference.abs().max()
    assert (with_kernel - reference).abs().max() <= 0.03 * scale

    # Greedy decoding of the trained demo model (confident predictions: no near-ties).
    demo = MiniCPM4ForCausalLM.from_pretrained(loading.BUNDLED_MODEL).eval()
    assert demo.dtype == torch.bfloat16
    prompts = [[1, 506, 1175, 317, 264], [1, 4770, 4020]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference_ids = [o.token_ids for o in generate(demo, prompts, params)]
    monkeypatch.setattr(skinny_linear, "SKINNY_LINEAR", True)
    before = calls[0]
    kernel_ids = [o.token_ids for o in generate(demo, prompts, params)]
    assert calls[0] > before
    assert kernel_ids == reference_ids
