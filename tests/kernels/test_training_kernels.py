"""The training kernels (custom autograd in `model/layers.py`, `kernels/matmul.py`) against the
plain-PyTorch path they replace: forward values and every gradient, fp32 and bf16.

The reference of each kernel is the inference code beside it (the path taken when autograd is
not involved), run with `kernels.matmul.TRAINING_KERNELS = False` so that autograd
differentiates it op by op.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from minicpm4.kernels import matmul
from minicpm4.model.attention import Attention, AttentionInputs
from minicpm4.model.layers import MLP, RMSNorm, RotaryEmbedding
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@contextlib.contextmanager
def plain_autograd():
    saved, matmul.TRAINING_KERNELS = matmul.TRAINING_KERNELS, False
    try:
        yield
    finally:
        matmul.TRAINING_KERNELS = saved


def _grads(fn, *leaves: torch.Tensor, seed: int = 0):
    """(output, grads of <output, random cotangent> w.r.t. leaves), fresh leaves per call."""
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    total = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    grads = torch.autograd.grad(total, leaves)
    return [o.detach() for o in outs], grads


def _compare(fn, *leaves: torch.Tensor, tol: dict) -> None:
    fast_out, fast_grads = _grads(fn, *leaves)
    with plain_autograd():
        ref_out, ref_grads = _grads(fn, *leaves)
    for a, b in zip(fast_out, ref_out):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    for i, (a, b) in enumerate(zip(fast_grads, ref_grads)):
        assert a.dtype == b.dtype, i
        torch.testing.assert_close(a, b, **tol, msg=f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_forward_and_backward_match_plain_autograd(dtype) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-6)
    w = (1 + 0.1 * torch.randn(48)).to(dtype)
    x = (3 * torch.randn(2, 7, 48)).to(dtype)

    def run(x_, w_):  # the module with the leaf as its weight
        del norm.weight
        norm.weight = w_
        return norm(x_)

    _compare(run, x, w, tol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_mlp_with_fused_gate_up_matches_plain_autograd(dtype) -> None:
    torch.manual_seed(1)
    cfg = tiny_config(hidden_size=128, intermediate_size=80)
    mlp = MLP(cfg)
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    x = torch.randn(3, 5, 128).to(dtype)

    def run(x_, g, u, d):
        for mod, w in ((mlp.gate_proj, g), (mlp.up_proj, u), (mlp.down_proj, d)):
            del mod.weight
            mod.weight = w
        return mlp(x_)

    _compare(run, x, *[w.detach().to(dtype) for w in weights], tol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", [False, True])
def test_attention_with_fused_qkv_and_rope_matches_plain_autograd(dtype, gate) -> None:
    torch.manual_seed(2)
    cfg = tiny_config(attn_use_output_gate=gate)
    attn = Attention(cfg, 0)
    B, T = 2, 11
    rope = RotaryEmbedding(cfg)
    cos_BTH, sin_BTH = rope(torch.arange(T).expand(B, T))
    names = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["o_gate"] if gate else [])
    x = torch.randn(B, T, cfg.hidden_size).to(dtype)

    def run(x_, *ws):
        for name, w in zip(names, ws):
            mod = getattr(attn, name)
            del mod.weight
            mod.weight = w
        inp = AttentionInputs(cos_BTH=cos_BTH, sin_BTH=sin_BTH, mask_B1TS=None,
                              is_causal=True, cache=None)
        return attn(x_, inp)

    ws = [getattr(attn, n).weight.detach().to(dtype) for n in names]
    _compare(run, x, *ws, tol=TOL[dtype])


def test_onednn_linear_matches_f_linear_forward_and_backward() -> None:
    torch.manual_seed(3)
    x, w = torch.randn(4, 9, 24), torch.randn(40, 24)
    _compare(lambda x_, w_: matmul.train_linear(x_, w_), x, w, tol=TOL[torch.float32])
    fast_out, fast_grads = _grads(matmul.train_linear, x, w)
    ref_out, ref_grads = _grads(F.linear, x, w)
    torch.testing.assert_close(fast_out[0], ref_out[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_training_kernels_only_run_when_autograd_needs_them() -> None:
    x = torch.randn(2, 3)
    assert not matmul.needs_training_kernels(x)
    assert matmul.needs_training_kernels(x.requires_grad_(True))
    with torch.no_grad():
        assert not matmul.needs_training_kernels(x)
    with plain_autograd():
        assert not matmul.needs_training_kernels(x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_model_gradients_match_plain_autograd(dtype) -> None:
    """Every parameter gradient of a full training loss (tied head, doc-masked packing) with
    the training kernels equals the plain-autograd one."""
    torch.manual_seed(4)
    model = MiniCPM4ForCausalLM(tiny_config(num_mtp_layers=1))
    model.init_weights(seed=4)
    ids = torch.randint(3, 512, (2, 24))
    labels = torch.randint(3, 512, (2, 24))
    labels[0, 5] = -100
    doc_ids = torch.zeros(2, 24, dtype=torch.long)
    doc_ids[1, 10:] = 1
    positions = torch.arange(24).expand(2, 24).clone()
    positions[1, 10:] -= 10
    mtp_labels = labels[:, 1:].clone()
    mtp_labels[:, -1] = -100

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
            sums = model(ids, labels_BT=labels, mtp_labels_BT=mtp_labels,
                         positions_BT=positions, doc_ids_BT=doc_ids)
        (sums.ntp / 47 + 0.3 * sums.mtp / 44).backward()
        return float(sums.ntp.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, fast = grads()
    with plain_autograd():
        ref_loss, ref = grads()
    tol = TOL[torch.float32 if dtype == "float32" else torch.bfloat16]
    assert loss == pytest.approx(ref_loss, rel=tol["rtol"])
    assert fast.keys() == ref.keys()
    for name in fast:
        scale = float(ref[name].abs().max()) or 1.0
        torch.testing.assert_close(fast[name] / scale, ref[name] / scale, **tol, msg=name)
