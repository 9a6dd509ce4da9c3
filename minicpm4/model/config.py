"""Typed, frozen model configuration for MiniCPM4 / MiniCPM4.1 / MiniCPM-SALA (spec §1.2, §2.1, §3.1).

`ModelConfig` owns every architecture field of a Hugging Face MiniCPM4 `config.json`; the
translation to and from that JSON lives in `model/hf.py`. Invariants are checked in
`__post_init__` and each failure names the offending field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from minicpm4.kernels.infllm_v2.params import SparseParams

MIXER_KINDS = ("minicpm4", "lightning-attn")
"""Per-layer token mixers: softmax attention (dense / InfLLM v2) or Lightning linear attention."""


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"config field '{name}': {msg}")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """LongRoPE per-dimension frequency divisors (spec §1.3).

    `short_factor` applies while the sequence fits in `original_max_position_embeddings`,
    `long_factor` beyond it; both have head_dim/2 entries.
    """

    rope_type: str = "longrope"
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float | None = None
    """Optional explicit context-extension factor; default max_pos / original_max."""
    attention_factor: float | None = None
    """Optional explicit mscale for cos/sin; default sqrt(1 + ln(factor)/ln(original_max))."""

    def __post_init__(self) -> None:
        if self.rope_type not in ("longrope", "su"):
            _fail("rope_scaling.rope_type", f"unsupported '{self.rope_type}' (only 'longrope')")
        if len(self.short_factor) != len(self.long_factor):
            _fail("rope_scaling.long_factor", "must have as many entries as short_factor")
        if self.original_max_position_embeddings <= 0:
            _fail("rope_scaling.original_max_position_embeddings", "must be positive")
        if any(not math.isfinite(f) or f <= 0 for f in self.short_factor + self.long_factor):
            _fail("rope_scaling.short_factor/long_factor", "factors must be positive and finite")


SparseConfig = SparseParams
"""InfLLM v2 settings (`sparse_config` in config.json, spec §2.1): the kernels' own
`SparseParams`, so the model hands them over unchanged."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a MiniCPM4-family causal LM; field names follow the HF config.json."""

    vocab_size: int = 73448
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int | None = None
    """Per-head width; None derives hidden_size // num_attention_heads."""
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    scale_emb: float = 12.0
    """μP: token embeddings are multiplied by this (spec §1.1)."""
    scale_depth: float = 1.4
    """μP: every residual branch is multiplied by scale_depth / sqrt(num_hidden_layers)."""
    dim_model_base: int = 256
    """μP: the LM head sees h / (hidden_size / dim_model_base)."""
    mup_denominator: int = 32
    """Used by the EAGLE/MTP draft head only (spec §1.1 item 5)."""
    num_mtp_layers: int = 0
    """Multi-token-prediction draft head (spec §1.4, `model/mtp.py`): 0 = none, 1 = one extra
    decoder layer predicting x_{t+2}, trained with L_NTP + λ·L_MTP and stored in the checkpoint
    as `mtp.*` tensors. Absent from config.json means 0; only 0 or 1 is supported."""
    tie_word_embeddings: bool = False
    initializer_range: float = 0.1
    attention_bias: bool = False
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (2, 73440)
    pad_token_id: int | None = 2
    torch_dtype: str = "bfloat16"
    sparse_config: SparseConfig | None = None
    """InfLLM v2 settings; None keeps every softmax layer dense."""
    mixer_types: tuple[str, ...] | None = None
    """MiniCPM-SALA per-layer mixers ('minicpm4' or 'lightning-attn'); None means all 'minicpm4'."""
    attn_use_rope: bool = True
    """SALA: False makes the softmax layers NoPE (HyPE, spec §3.2)."""
    attn_use_output_gate: bool = False
    """SALA: sigmoid(o_gate(x)) gate before o_proj in softmax layers."""
    lightning_use_rope: bool = True
    qk_norm: bool = False
    use_output_gate: bool = False
    use_output_norm: bool = False
    lightning_nh: int | None = None
    lightning_nkv: int | None = None
    lightning_head_dim: int | None = None
    lightning_scale: str = "1/sqrt(d)"
    model_type: str = "minicpm"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Unrecognised config.json keys, kept so a save reproduces them."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "dim_model_base")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_key_value_heads",
                  f"{self.num_key_value_heads} does not divide num_attention_heads "
                  f"{self.num_attention_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            _fail("hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads} and head_dim is not given")
        if self.head_dim_ % 2:
            _fail("head_dim", f"must be even for rotary embeddings, got {self.head_dim_}")
        if self.hidden_act != "silu":
            _fail("hidden_act", f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
        if self.attention_bias:
            _fail("attention_bias", "MiniCPM4 has no attention biases")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            _fail("rms_norm_eps/rope_theta", "must be positive")
        if self.scale_emb <= 0 or self.scale_depth <= 0:
            _fail("scale_emb/scale_depth", "must be positive")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if len(rs.short_factor) != self.head_dim_ // 2:
                _fail("rope_scaling.short_factor",
                      f"has {len(rs.short_factor)} entries, head_dim/2 = {self.head_dim_ // 2}")
            if rs.original_max_position_embeddings > self.max_position_embeddings:
                _fail("rope_scaling.original_max_position_embeddings",
                      "exceeds max_position_embeddings")
        if self.mixer_types is not None:
            if len(self.mixer_types) != self.num_hidden_layers:
                _fail("mixer_types", f"has {len(self.mixer_types)} entries for "
                                     f"{self.num_hidden_layers} layers")
            bad = sorted(set(self.mixer_types) - set(MIXER_KINDS))
            if bad:
                _fail("mixer_types", f"unknown mixer(s) {bad}; expected one of {MIXER_KINDS}")
        if not isinstance(self.num_mtp_layers, int) or isinstance(self.num_mtp_layers, bool) \
                or self.num_mtp_layers not in (0, 1):
            _fail("num_mtp_layers", f"must be 0 or 1 (one MTP/EAGLE draft layer, spec §1.4), "
                                    f"got {self.num_mtp_layers!r}")
        for name in ("bos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                _fail(name, f"{tok} is outside the vocabulary of {self.vocab_size}")
        if any(not 0 <= t < self.vocab_size for t in self.eos_token_id):
            _fail("eos_token_id", f"{self.eos_token_id} has ids outside the vocabulary")

    # Derived quantities -------------------------------------------------------------------
    @property
    def head_dim_(self) -> int:
        """The effective head dimension."""
        return self.head_dim if self.head_dim is not None else \
            self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def layer_mixers(self) -> tuple[str, ...]:
        return self.mixer_types or ("minicpm4",) * self.num_hidden_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self, *, include_embedding: bool = True) -> int:
        """Parameter count of the dense MiniCPM4 architecture (all 'minicpm4' layers), MTP
        head included when `num_mtp_layers` is 1."""
        d, hd = self.hidden_size, self.head_dim_
        attn = d * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        total = self.num_hidden_layers * per_layer + d
        total += emb if self.tie_word_embeddings else 2 * emb
        if self.num_mtp_layers:  # fc1 (with bias) + fc2, input_norm1/2, one layer, final norm
            total += self.num_mtp_layers * (2 * d * d + d + 3 * d + per_layer)
        return total if include_embedding else total - emb

    # Presets ------------------------------------------------------------------------------
    @classmethod
    def minicpm4_8b(cls) -> ModelConfig:
        """MiniCPM4-8B as shipped (spec §1.2); LongRoPE factors from the shipped config."""
        from minicpm4.model.hf import MINICPM4_8B_ROPE_FACTORS
        return cls(rope_scaling=RopeScaling(short_factor=MINICPM4_8B_ROPE_FACTORS,
                                            long_factor=MINICPM4_8B_ROPE_FACTORS,
                                            original_max_position_embeddings=32768))

    @classmethod
    def minicpm4_0p5b(cls) -> ModelConfig:
        """MiniCPM4-0.5B (spec §1.2, [CODE-3P]): 1024 hidden, 24 layers, 16/2 heads, tied."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)
