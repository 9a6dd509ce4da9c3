"""Context extension of RoPE: LongRoPE / YaRN-style per-dimension factor lists (spec §1.3).

MiniCPM4's LongRoPE divides each rotary frequency by a per-pair factor (`long_factor` beyond
`original_max_position_embeddings`, `short_factor` within it) and multiplies cos/sin by
``mscale = sqrt(1 + ln(max_pos / original_max) / ln(original_max))`` (`layers.longrope_mscale`).

How the published factor lists were computed is not documented (spec §9), and the 128K list of
the MiniCPM4 README is *not* available offline (only the shipped 32K list is, in
`../shared/data/configs/minicpm4-8b.config.json`). `extend_factors` therefore **derives** a
list by a stated rule, YaRN's "NTK-by-parts" ramp applied on top of the factors the model
already has:

- for rotary pair d, the effective wavelength is ``2*pi * theta**(2d/D) * base_factor[d]``
  and ``r_d = base_len / wavelength`` is how many turns the pair makes over the length the base
  factors were made for (``base_len`` = the config's `max_position_embeddings`);
- ``gamma_d = clip((r_d - ALPHA) / (BETA - ALPHA), 0, 1)``; pairs that turn more than BETA
  times keep their factor (gamma 1: high frequencies are not interpolated), pairs that turn
  less than ALPHA times are stretched by the full length ratio ``s`` (gamma 0), the ones between
  by ``1 / ((1 - gamma)/s + gamma)``;
- ``new_factor[d] = base_factor[d] * that stretch``.

ALPHA = 1, BETA = 64 are chosen so that, applied to the shipped 32K list with ``s = 4``, the
rule reproduces the two facts spec §1.3 records about the published 128K list: its first 21
entries equal the shipped ones, and its maximum is 124.096 = 4 x 31.024 (`tests/test_context.py`
checks both). The entries between are this rule's, not the published values.
"""

from __future__ import annotations

import math

from minicpm4.model.config import ModelConfig, RopeScaling

ALPHA = 1.0
"""Pairs turning fewer times than this over the base length are stretched by the full ratio."""
BETA = 64.0
"""Pairs turning more times than this over the base length keep their factor."""


def turns(head_dim: int, theta: float, length: int,
          factors: tuple[float, ...] | None = None) -> list[float]:
    """Per rotary pair: full turns over `length` positions of frequency theta^(-2d/D)/factor."""
    factors = factors or (1.0,) * (head_dim // 2)
    return [length / (2 * math.pi * theta ** (2 * d / head_dim) * f)
            for d, f in enumerate(factors)]


def extend_factors(base: tuple[float, ...], *, head_dim: int, theta: float, base_len: int,
                   scale: float, alpha: float = ALPHA, beta: float = BETA) -> tuple[float, ...]:
    """The factor list for `scale` x `base_len` positions derived from `base` (module doc)."""
    if len(base) != head_dim // 2:
        raise ValueError(f"expected {head_dim // 2} base factors (head_dim/2), got {len(base)}")
    if scale < 1.0:
        raise ValueError(f"the length ratio must be >= 1, got {scale}")
    if not 0 < alpha < beta:
        raise ValueError(f"need 0 < alpha < beta, got {alpha}, {beta}")
    out = []
    for f, r in zip(base, turns(head_dim, theta, base_len, base)):
        gamma = min(1.0, max(0.0, (r - alpha) / (beta - alpha)))
        out.append(f / ((1.0 - gamma) / scale + gamma))
    return tuple(out)


def extend_context(cfg: ModelConfig, target: int) -> ModelConfig:
    """`cfg` made to reach `target` positions (spec §1.3).

    A target within `max_position_embeddings` returns `cfg` unchanged (nothing to extend).
    Otherwise `max_position_embeddings` becomes `target` and `rope_scaling` becomes LongRoPE
    with `long_factor` = `extend_factors(current long factors or ones, scale=target/max_pos)`;
    `short_factor` and `original_max_position_embeddings` are kept (a model without
    rope_scaling gets ones and its old max as the original length), so an input that fits the
    original window is rotated as before, only scaled by the new mscale. (CPM.cu's
    `apply_minicpm4_yarn_config` writes its list into both; keeping the trained short list
    is this package's choice.) An explicit `factor` / `attention_factor` is dropped so mscale
    follows the new length.
    """
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {target!r}")
    if target <= cfg.max_position_embeddings:
        return cfg
    half = cfg.head_dim_ // 2
    rs = cfg.rope_scaling
    long = rs.long_factor if rs is not None else (1.0,) * half
    short = rs.short_factor if rs is not None else (1.0,) * half
    original = rs.original_max_position_embeddings if rs is not None \
        else cfg.max_position_embeddings
    new_long = extend_factors(long, head_dim=cfg.head_dim_, theta=cfg.rope_theta,
                              base_len=cfg.max_position_embeddings,
                              scale=target / cfg.max_position_embeddings)
    scaling = RopeScaling(rope_type="longrope", short_factor=tuple(short), long_factor=new_long,
                          original_max_position_embeddings=original)
    return cfg.replace(max_position_embeddings=target, rope_scaling=scaling)
