"""Building blocks of the MiniCPM4 block: fp32 RMSNorm, rotate-half RoPE with LongRoPE, SwiGLU.

Spec §1.1 (RMSNorm in fp32, SwiGLU without biases) and §1.3 (LongRoPE short/long factors and
mscale). Shape legend: B batch, T tokens, N heads, H head dim, D hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minicpm4.model.config import ModelConfig


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps)` computed in fp32, cast back, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


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
        inv_freq_BH2 = self.inv_freq_short.expand(positions_BT.shape[0], -1)
        if self.rope_scaling is not None:
            limit = self.rope_scaling.original_max_position_embeddings
            use_long_B1 = (positions_BT.amax(dim=1, keepdim=True) + 1) > limit
            inv_freq_BH2 = torch.where(use_long_B1, self.inv_freq_long, self.inv_freq_short)
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
