"""`kernels.linear_ce.linear_cross_entropy` (LM head fused with the cross-entropy) against
its plain reference (logits, then `F.cross_entropy`): loss and both gradients."""

from __future__ import annotations

import pytest
import torch

from minicpm4.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_reference


def _run(fn, h, w, y, *, autocast: bool, grad_scale: float = 1.0, **kw):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = fn(h, w, y, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def _data(seed: int, N: int = 37, D: int = 24, V: int = 301):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = 0.3 * torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("autocast", [False, True])
def test_loss_and_gradients_match_the_reference(reduction, autocast) -> None:
    h, w, y = _data(0)
    y[[3, 10, 11]] = -100
    kw = dict(scale=0.7, reduction=reduction)
    got = _run(linear_cross_entropy, h, w, y, autocast=autocast, grad_scale=2.5, **kw)
    ref = _run(linear_cross_entropy_reference, h, w, y, autocast=autocast, grad_scale=2.5, **kw)
    # bf16: both round the logits to bf16; errors relative to the largest entry
    tol = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    assert got[0].dtype == torch.float32
    for a, b, what in zip(got, ref, ("loss", "grad h", "grad w")):
        scale = float(b.abs().max())
        torch.testing.assert_close(a / scale, b / scale, **tol, msg=what)


def test_ignored_rows_get_no_gradient_and_all_ignored_mean_is_nan() -> None:
    h, w, y = _data(1, N=6)
    y[:] = -100
    y[2] = 5
    _, gh, _ = _run(linear_cross_entropy, h, w, y, autocast=False)
    assert torch.count_nonzero(gh[torch.arange(6) != 2]) == 0
    y[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, y))
    assert float(linear_cross_entropy(h, w, y, reduction="sum")) == 0.0


def test_no_grad_returns_the_same_loss() -> None:
    h, w, y = _data(2)
    with torch.no_grad():
        a = linear_cross_entropy(h, w, y)
    b = linear_cross_entropy_reference(h, w, y)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_named_errors() -> None:
    h, w, y = _data(3)
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h[None], w, y)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :5], y)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
