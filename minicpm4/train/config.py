"""Typed, frozen training configs: `OptimConfig` and `ScheduleConfig` (spec minicpm4-system.md
§5.1 WSD, §1.1 item 4 μP rules; anchors Part B §1.1, §1.5).

Frozen, kw-only dataclasses with a docstring per field (docs/architecture.md "Config
ownership"). Invariants are checked in `__post_init__`; each ValueError names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from minicpm4.model.mup import check_parametrization

DECAY_TYPES = ("exponential", "linear", "cosine")
"""Shapes of the WSD decay phase; MiniCPM used exponential (spec §5.1)."""


def _fail(owner: str, name: str, msg: str) -> None:
    raise ValueError(f"{owner}.{name}: {msg}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with μP-aware parameter groups (built by `train.optim.param_groups`).

    Weight decay follows common LLM practice: it applies to the hidden matrices and the untied
    lm_head; never to vectors (RMSNorm gains, biases: nanoGPT, OLMo, torchtitan's recipes);
    not to embeddings by default (OLMo 2 found decaying embeddings hurts stability), which
    `decay_embeddings` turns back on. Decay is not width-scaled under μP (MiniCPM is
    AdamW-style, anchors Part B §1.1 last row), so the per-step shrink lr·λ of a hidden matrix
    follows its lr/m.
    """

    lr: float = 1e-2
    """Base learning rate η (the μP proxy LR; hidden matrices get η/m under "mup").
    MiniCPM-1's wind tunnel found 0.01; MiniCPM4-8B's stable phase used 7e-3 (spec §5.1)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam β1, β2 (the usual LLM-pretraining pair, as in the anchors' μP sweep §1.6)."""
    eps: float = 1e-8
    """Adam ε."""
    weight_decay: float = 0.1
    """Decoupled AdamW weight decay λ for decayed groups (see the class docstring)."""
    grad_clip: float | None = 1.0
    """Max global gradient L2 norm, applied by the train step before `optimizer.step()`;
    None disables clipping."""
    parametrization: str = "mup"
    """"mup" (MiniCPM's μP LR multipliers) or "sp" (every group at the base LR)."""
    decay_embeddings: bool = False
    """Also weight-decay the token embedding (and a tied lm_head, which is the same tensor)."""
    embeddings_as_matrices: bool = False
    """μP only: give the embedding and lm_head the hidden-matrix LR rule (lr/m), the literal
    "every 2-D tensor" reading of MiniCPM's table (anchors Part B §1.1 ★)."""
    fused: bool | None = None
    """AdamW implementation: True fused, False foreach, None picks fused when every parameter
    is a floating tensor on a device with a fused kernel (CPU included in torch >= 2.4)."""

    def __post_init__(self) -> None:
        own = "OptimConfig"
        if not _finite(self.lr) or self.lr <= 0:
            _fail(own, "lr", f"must be a positive finite number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas):
            _fail(own, "betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if not _finite(self.eps) or self.eps <= 0:
            _fail(own, "eps", f"must be a positive finite number, got {self.eps!r}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            _fail(own, "weight_decay", f"must be a finite number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and (not _finite(self.grad_clip) or self.grad_clip <= 0):
            _fail(own, "grad_clip", f"must be None or a positive finite number, "
                                    f"got {self.grad_clip!r}")
        check_parametrization(self.parametrization, field=f"{own}.parametrization")
        for name in ("decay_embeddings", "embeddings_as_matrices"):
            if not isinstance(getattr(self, name), bool):
                _fail(own, name, f"must be a bool, got {getattr(self, name)!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            _fail(own, "fused", f"must be True, False or None, got {self.fused!r}")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Warmup-Stable-Decay learning-rate schedule (MiniCPM-1, spec §5.1; anchors Part B §1.5).

    Steps are 0-based optimizer steps; a run takes `total_steps` of them. The LR factor rises
    linearly from 0 (step 0) to 1 (step `warmup_steps`), stays 1, and over the last
    `decay_steps` steps falls from 1 to `min_lr_ratio`, reached at step `total_steps`.
    """

    warmup_steps: int
    """Linear warmup length in optimizer steps (MiniCPM4-8B: 2,000; spec §2.3 / §3.4)."""
    total_steps: int
    """Optimizer steps in the whole run, warmup and decay included."""
    decay_fraction: float = 0.1
    """Share of `total_steps` spent decaying, in [0, 1]; MiniCPM found ~10% enough (§5.1)."""
    decay_type: str = "exponential"
    """"exponential" (MiniCPM: geometric from 1 to min_lr_ratio), "linear" or "cosine"."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak, in [0, 1] (> 0 for exponential decay)."""

    def __post_init__(self) -> None:
        own = "ScheduleConfig"
        for name, low in (("total_steps", 1), ("warmup_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                _fail(own, name, f"must be an integer >= {low}, got {value!r}")
        if not _finite(self.decay_fraction) or not 0.0 <= self.decay_fraction <= 1.0:
            _fail(own, "decay_fraction", f"must lie in [0, 1], got {self.decay_fraction!r}")
        if self.decay_type not in DECAY_TYPES:
            _fail(own, "decay_type", f"unknown {self.decay_type!r}; expected one of {DECAY_TYPES}")
        if not _finite(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail(own, "min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.decay_type == "exponential" and self.min_lr_ratio <= 0:
            _fail(own, "min_lr_ratio", "must be > 0 for exponential decay (a geometric decay "
                                       "never reaches 0)")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            _fail(own, "warmup_steps", f"{self.warmup_steps} warmup + {self.decay_steps} decay "
                                       f"steps exceed total_steps {self.total_steps}")

    @property
    def decay_steps(self) -> int:
        """round(decay_fraction · total_steps)."""
        return int(round(self.decay_fraction * self.total_steps))

    @property
    def decay_start(self) -> int:
        """First step of the decay phase (= end of the stable phase)."""
        return self.total_steps - self.decay_steps
