"""Building blocks of the MiniCPM4 block: fp32 RMSNorm, rotate-half RoPE with LongRoPE, SwiGLU.

Spec §1.1 (RMSNorm in fp32, SwiGLU without biases) and §1.3 (LongRoPE short/long factors and
mscale). Shape legend: B batch, T tokens, N heads, K kv heads, H head dim, D hidden, F ffn.

Training path. When autograd will differentiate through them (`needs_training_kernels`),
RMSNorm, RoPE and SwiGLU run as `torch.autograd.Function`s with hand-written backwards,
`MLP` (and `attention.Attention`) run their input projections as one matmul against the
concatenated weights, and fp32 (non-autocast) matmuls go through oneDNN (`matmul_nt`). Same
math (RMSNorm and RoPE still in fp32), far fewer ops: plain autograd runs ~10 elementwise
kernels for an RMSNorm backward, ~9 per RoPE backward (slice backwards zero-fill whole
tensors), and 3 matmuls + 2 adds for the gradient of one input feeding q/k/v.
`benchmarks/train_step.py` measures the effect. Inference (no grad) keeps the straightforward
code below, so decoding and the parity tests see exactly the old numerics. Set
`MINICPM4_TRAINING_KERNELS=0` (or `kernels.matmul.TRAINING_KERNELS = False`) for plain
autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minicpm4.kernels.matmul import apply_linear, needs_training_kernels, train_linear
from minicpm4.model.config import ModelConfig


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a 6-kernel backward; forward identical to `RMSNorm.forward`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd, weight)
        return weight * y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # out = w * y, y = x * rstd:  dw = sum(g * y);  dx = rstd * (g*w - y * mean(g*w*y))
        y, rstd, weight = ctx.saved_tensors
        D = y.shape[-1]
        with torch.autocast(y.device.type, enabled=False):
            g = grad_out.float()
            y32 = y.float()
            w32 = weight.float()
            gy_ND = (g * y32).reshape(-1, D)
            grad_w = gy_ND.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                dot = torch.mv(gy_ND, w32).div_(D).view(*g.shape[:-1], 1)
                grad_x = torch.addcmul(g * w32, y32, dot, value=-1.0).mul_(rstd)
                grad_x = grad_x.to(y.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps)` computed in fp32, cast back, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_training_kernels(x, self.weight):
            return _RMSNormFunction.apply(x, self.weight, self.variance_epsilon)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


class _SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up of a fused [..., 2F] gate|up tensor; the gradient is written into one
    [..., 2F] buffer (autograd would zero-fill two full-size tensors for the halves' slices)."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor) -> torch.Tensor:
        gate, up = gu.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gu, act)
        return act * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gu, act = ctx.saved_tensors
        gate, up = gu.chunk(2, dim=-1)
        grad = torch.empty_like(gu)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_out, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_out * up, gate, grad_input=grad_gate)
        return grad


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if needs_training_kernels(x_BTD, self.gate_proj.weight, self.up_proj.weight):
            # One matmul (and one gradient matmul per operand) for gate and up.
            w_2FD = torch.cat((self.gate_proj.weight, self.up_proj.weight))
            act_BTF = _SwiGLUFunction.apply(train_linear(x_BTD, w_2FD))
            return apply_linear(self.down_proj, act_BTF)
        act_BTF = F.silu(apply_linear(self.gate_proj, x_BTD)) * apply_linear(self.up_proj, x_BTD)
        return apply_linear(self.down_proj, act_BTF)


def longrope_mscale(cfg: ModelConfig) -> float:
    """Scale applied to cos and sin: sqrt(1 + ln(s) / ln(original_max)), s = max/original."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.attention_factor is not None:
        return rs.attention_factor
    factor = rs.factor or cfg.max_position_embeddings / rs.original_max_position_embeddings
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(factor) / math.log(rs.original_max_position_embeddings))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, with LongRoPE per-dimension divisors.

    The long factors apply to a row whose sequence length (largest position + 1) exceeds
    `original_max_position_embeddings`, the short ones otherwise, as MiniCPM's LongRoPE does.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim_
        self.theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        self.mscale = longrope_mscale(cfg)
        self.register_buffer("inv_freq_short", torch.empty(self.head_dim // 2), persistent=False)
        self.register_buffer("inv_freq_long", torch.empty(self.head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the frequency buffers; needed after building the model on `meta`."""
        device = self.inv_freq_short.device
        if device.type == "meta":  # built under `torch.device("meta")`: these are tiny, make them real
            device = torch.device("cpu")
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32,
                                device=device) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent)
        short = long = torch.ones_like(inv_freq)
        if self.rope_scaling is not None:
            short = torch.tensor(self.rope_scaling.short_factor, dtype=torch.float32,
                                 device=device)
            long = torch.tensor(self.rope_scaling.long_factor, dtype=torch.float32,
                                device=device)
        self.inv_freq_short = inv_freq / short
        self.inv_freq_long = inv_freq / long

    def _apply(self, fn, recurse: bool = True):
        # `model.to(bfloat16)` must not round the frequencies: recompute them in fp32 on the
        # new device (cos/sin are built in fp32, spec §1.1).
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

    def forward(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin), each [B, T, H], for integer positions [B, T]."""
        return self._table(positions_BT, None)

    def tokens(self, positions_N: torch.Tensor, row_last_N: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin), each [N, 1, H], for tokens at positions [N] taken one by one,
        each with the factors `forward` gives it in its row, whose largest position is
        row_last_N: the same values (the same products, the same long/short choice)."""
        return self._table(positions_N.view(-1, 1), row_last_N)

    def _table(self, positions_BT: torch.Tensor, row_last_B: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, T, H]; row b takes the long factors when its largest position
        (row_last_B[b], or the row's own maximum where None) reaches the original context."""
        inv_freq_BH2 = self.inv_freq_short.expand(positions_BT.shape[0], -1)
        if self.rope_scaling is not None:
            limit = self.rope_scaling.original_max_position_embeddings
            if row_last_B is None:
                row_last_B = positions_BT.amax(dim=1)
            inv_freq_BH2 = torch.where((row_last_B + 1).unsqueeze(1) > limit,
                                       self.inv_freq_long, self.inv_freq_short)
        freqs_BTH2 = positions_BT.float().unsqueeze(-1) * inv_freq_BH2.unsqueeze(1)
        emb_BTH = torch.cat((freqs_BTH2, freqs_BTH2), dim=-1)
        return emb_BTH.cos() * self.mscale, emb_BTH.sin() * self.mscale


def apply_rotary(x_BNTH: torch.Tensor, cos_BTH: torch.Tensor,
                 sin_BTH: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE computed in fp32 and cast back to the input dtype."""
    x32 = x_BNTH.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    out = x32 * cos_BTH.unsqueeze(1) + rotated * sin_BTH.unsqueeze(1)
    return out.to(x_BNTH.dtype)


def signed_sin(sin_BTH: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, so that rotate_half(x) * sin == roll(x) * signed_sin,
    where roll(x) = cat(x2, x1) swaps the halves (`rotary_qkv`)."""
    half = sin_BTH.shape[-1] // 2
    return torch.cat((-sin_BTH[..., :half], sin_BTH[..., half:]), dim=-1)


class _RotaryQKVFunction(torch.autograd.Function):
    """Split a fused q|k|v projection into heads and apply RoPE to q and k together.

    out = x * cos + roll(x) * signed_sin in fp32 (x upcast on the fly, the result cast back
    to x's dtype), the math of `apply_rotary`. The backward, dx = g * cos +
    roll(g * signed_sin) (roll by half is its own inverse), writes the q, k and v gradients
    straight into one [B, T, (N + 2K) * H] buffer, the gradient of the fused projection.
    """

    @staticmethod
    def forward(ctx, qkv_BTF: torch.Tensor, cos_BTH: torch.Tensor, ssin_BTH: torch.Tensor,
                num_heads: int, num_kv_heads: int):
        B, T, _ = qkv_BTF.shape
        H = cos_BTH.shape[-1]
        N, K = num_heads, num_kv_heads
        x_BTSH = qkv_BTF.view(B, T, N + 2 * K, H)
        # One explicit upcast: mixed-dtype ops would each make a hidden fp32 copy.
        x_BTMH = x_BTSH[:, :, :N + K].float()
        cos_BT1H, ssin_BT1H = cos_BTH.unsqueeze(2), ssin_BTH.unsqueeze(2)
        out_BTMH = torch.addcmul(x_BTMH * cos_BT1H, x_BTMH.roll(H // 2, -1), ssin_BT1H)
        out_BTMH = out_BTMH.to(qkv_BTF.dtype)
        ctx.save_for_backward(cos_BTH, ssin_BTH)
        ctx.shape = (B, T, N, K, H)
        return (out_BTMH[:, :, :N].transpose(1, 2), out_BTMH[:, :, N:].transpose(1, 2),
                x_BTSH[:, :, N + K:].transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_q_BNTH, grad_k_BKTH, grad_v_BKTH):
        cos_BTH, ssin_BTH = ctx.saved_tensors
        B, T, N, K, H = ctx.shape
        grad_BTSH = torch.empty(B, T, N + 2 * K, H, dtype=grad_v_BKTH.dtype,
                                device=grad_v_BKTH.device)
        g_BTMH = torch.cat((grad_q_BNTH.transpose(1, 2), grad_k_BKTH.transpose(1, 2)),
                           dim=2).float()
        t_BTMH = g_BTMH * ssin_BTH.unsqueeze(2)
        torch.addcmul(t_BTMH.roll(H // 2, -1), g_BTMH, cos_BTH.unsqueeze(2),
                      out=grad_BTSH[:, :, :N + K])
        grad_BTSH[:, :, N + K:].copy_(grad_v_BKTH.transpose(1, 2))
        return grad_BTSH.view(B, T, -1), None, None, None, None


def rotary_qkv(qkv_BTF: torch.Tensor, cos_BTH: torch.Tensor, ssin_BTH: torch.Tensor,
               num_heads: int, num_kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [B, N, T, H], k [B, K, T, H], v [B, K, T, H]) from a fused projection
    qkv [B, T, (N + 2K) * H], with RoPE applied to q and k (`ssin` = `signed_sin(sin)`)."""
    return _RotaryQKVFunction.apply(qkv_BTF.contiguous(), cos_BTH, ssin_BTH, num_heads,
                                    num_kv_heads)
