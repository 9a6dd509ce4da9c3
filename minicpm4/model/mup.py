"""Every μP rule of MiniCPM in one place (spec §1.1): the three forward scalars and init std.

The model, and later the optimizer and the μP search, read these functions rather than
re-deriving the constants (docs/architecture.md).
"""

from __future__ import annotations

import math

from minicpm4.model.config import ModelConfig


def width_multiplier(cfg: ModelConfig) -> float:
    """m = hidden_size / dim_model_base: how much wider than the μP base width."""
    return cfg.hidden_size / cfg.dim_model_base


def embedding_multiplier(cfg: ModelConfig) -> float:
    """Token embeddings are multiplied by scale_emb."""
    return float(cfg.scale_emb)


def residual_multiplier(cfg: ModelConfig, num_layers: int | None = None) -> float:
    """Each residual branch is multiplied by scale_depth / sqrt(L).

    The EAGLE/MTP draft layer passes L + 1 (spec §1.1 item 5).
    """
    return cfg.scale_depth / math.sqrt(num_layers or cfg.num_hidden_layers)


def logit_multiplier(cfg: ModelConfig) -> float:
    """The LM head sees h / m, i.e. h * dim_model_base / hidden_size."""
    return 1.0 / width_multiplier(cfg)


def init_std(cfg: ModelConfig, *, matrix: bool) -> float:
    """Init std: initializer_range for vectors/embeddings, ÷ sqrt(m) for hidden 2-D weights."""
    return cfg.initializer_range / math.sqrt(width_multiplier(cfg)) if matrix \
        else cfg.initializer_range
