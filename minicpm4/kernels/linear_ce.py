"""Causal-LM cross-entropy fused with the LM head: no fp32 logits kept for the backward.

`F.cross_entropy(lm_head(h).float(), y)` materialises [N, V] logits, an fp32 copy (under bf16
autocast), the fp32 log-softmax, and in the backward a zero-filled [N, V] gradient, the
log-softmax gradient and its bf16 copy: about ten full passes over N x V values (V = 73448 for
MiniCPM4, so 600 MB per fp32 pass at N = 2048). `linear_cross_entropy` computes the logits
once in the compute dtype, turns them *in place* into the logit gradient softmax - onehot
(through an fp32 log-softmax, block by block for bf16 logits, so the loss and the gradient are
computed in fp32 as `F.cross_entropy` on fp32 logits would), and does the two backward
matmuls right away. What remains for autograd is two small gradients (h and the
head weight); the [N, V] buffer is freed before the trunk's backward starts.

`linear_cross_entropy_reference` beside it is the plain-PyTorch oracle (logits, then
`F.cross_entropy`); tests/kernels/test_linear_ce.py compares losses and both gradients.
The model's training loss (`MiniCPM4ForCausalLM.forward(labels_BT=...)`) goes through here.

Shape legend: N tokens (batch x time flattened), D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpm4.kernels.matmul import matmul_nt

IGNORE_INDEX = -100

_BLOCK_ELEMENTS = 1 << 24
"""Logits per fp32 block when the logits are not fp32 (bf16 autocast): 64 MB of fp32. Blocks
that fit in cache would touch memory less, but each op is a parallel region, and on a busy
2-core machine tiny ops cost a thread wake-up each (8-row blocks measured 12x slower)."""


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(h, weight)` would compute in here (autocast-aware)."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(h.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss in the forward, together with the gradients of h and the weight (saved for the
    backward, which only scales them by the incoming gradient)."""

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                scale: float, ignore_index: int, dtype: torch.dtype, mean: bool) -> torch.Tensor:
        N = h_ND.shape[0]
        valid_N = targets_N != ignore_index
        n_valid = int(valid_N.sum())
        tgt_N1 = torch.where(valid_N, targets_N, 0).view(N, 1)
        with torch.autocast(h_ND.device.type, enabled=False):
            hs_ND = (h_ND * scale).to(dtype) if scale != 1.0 else h_ND.to(dtype)
            w_VD = weight_VD.to(dtype)
            logits_NV = matmul_nt(hs_ND, w_VD)
            # Exact fp32 log-probabilities of the targets; the logits become exp(logprobs),
            # i.e. the softmax, block by block (in place, each block visits memory once).
            logp_N1 = torch.empty(N, 1, dtype=torch.float32, device=h_ND.device)
            rows = N if dtype == torch.float32 else max(1, _BLOCK_ELEMENTS // logits_NV.shape[1])
            buf = None if dtype == torch.float32 else torch.empty(
                min(N, rows), logits_NV.shape[1], dtype=torch.float32, device=h_ND.device)
            for s in range(0, N, rows):
                e = min(s + rows, N)
                block = logits_NV[s:e]
                work = block if buf is None else buf[:e - s].copy_(block)
                torch.ops.aten._log_softmax.out(work, -1, False, out=work)
                torch.gather(work, 1, tgt_N1[s:e], out=logp_N1[s:e])
                if buf is None:
                    work.exp_()
                else:  # exp(out=bf16) would go through a hidden fp32 temporary
                    block.copy_(work.exp_())
            logp_N = logp_N1.view(N)
            loss = -(logp_N * valid_N).sum()
            if mean:
                loss = loss / n_valid if n_valid else logp_N.new_tensor(float("nan"))
            if not ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]:
                return loss
            # softmax - onehot at the targets (computed in fp32, then rounded once); rows
            # whose target is ignored contribute nothing.
            g_NV = logits_NV  # scatter_ would copy all of it twice on CPU; indexing does not
            g_NV[torch.arange(N, device=g_NV.device), tgt_N1.view(N)] = \
                (logp_N.exp() - 1.0).to(dtype)
            if n_valid < N:
                g_NV[~valid_N] = 0.0
            inv = 1.0 / max(n_valid, 1) if mean else 1.0
            grad_h = None
            if ctx.needs_input_grad[0]:
                grad_h = matmul_nt(g_NV, w_VD.t()).to(h_ND.dtype).mul_(scale * inv)
            grad_w = None
            if ctx.needs_input_grad[1]:
                hg_ND = (h_ND * (scale * inv)).to(dtype)
                grad_w = (g_NV.t() @ hg_ND).to(weight_VD.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if bool(grad_loss != 1.0):
            grad_h = grad_h * grad_loss if grad_h is not None else None
            grad_w = grad_w * grad_loss if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         *, scale: float = 1.0, ignore_index: int = IGNORE_INDEX,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `(h * scale) @ weight.T` against `targets` (fp32 scalar).

    Equals `F.cross_entropy(F.linear(h * scale, weight).float(), targets,
    ignore_index=ignore_index, reduction=reduction)` with the logits in the autocast dtype
    when autocast is on (else in the dtype of h and weight) and the softmax in fp32.
    `reduction` is "mean" over the non-ignored targets (NaN if there are none) or "sum".
    The gradients of h and weight are computed during the forward (the logits are not kept),
    so a call costs the backward matmuls even if the loss is never back-propagated, unless
    grad mode is off or neither input requires grad.
    """
    if h_ND.dim() != 2 or targets_N.shape != h_ND.shape[:1]:
        raise ValueError(f"expected h [N, D] and targets [N], got {tuple(h_ND.shape)} and "
                         f"{tuple(targets_N.shape)}")
    if weight_VD.dim() != 2 or weight_VD.shape[1] != h_ND.shape[1]:
        raise ValueError(f"weight must be [V, {h_ND.shape[1]}], got {tuple(weight_VD.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = _compute_dtype(h_ND, weight_VD)
    return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, float(scale), ignore_index,
                                     dtype, reduction == "mean")


def linear_cross_entropy_reference(h_ND: torch.Tensor, weight_VD: torch.Tensor,
                                   targets_N: torch.Tensor, *, scale: float = 1.0,
                                   ignore_index: int = IGNORE_INDEX,
                                   reduction: str = "mean") -> torch.Tensor:
    """Plain autograd version of `linear_cross_entropy`: logits, fp32, `F.cross_entropy`."""
    logits_NV = F.linear(h_ND * scale, weight_VD).float()
    return F.cross_entropy(logits_NV, targets_N, ignore_index=ignore_index, reduction=reduction)
