"""Every μP rule of MiniCPM in one place (spec minicpm4-system.md §1.1; anchors Part B §1.1).

The model, the optimizer (`train/optim.py`) and the μP search read these functions rather
than re-deriving the constants (docs/architecture.md). With m = hidden_size / dim_model_base:

| role (`param_role`)                | μP init std | μP LR mult | SP init std | SP LR mult |
| ---------------------------------- | ----------- | ---------- | ----------- | ---------- |
| "matrix" (q/k/v/o, gate/up/down)   | σ / √m      | 1 / m      | σ           | 1          |
| "embedding" (embed_tokens, tied)   | σ           | 1          | σ           | 1          |
| "head" (untied lm_head)            | σ           | 1          | σ           | 1          |
| "vector" (RMSNorm gains, biases)   | 1 (0 bias)  | 1          | 1 (0 bias)  | 1          |

σ = `initializer_range`. Decisions, with their sources:

* **Embeddings are vector-like** (one width-sized dim): init σ and LR unscaled, the canonical
  rule of microsoft/mup and nanoGPT-mup. MiniCPM's paper says "every two-dimensional tensor",
  which read literally would include them; anchors §1.1 ★ decides "follow the canonical rule
  (embeddings excluded), expose it as a flag": `embeddings_as_matrices=True` gives the literal
  reading (embedding and head get the matrix rules).
* **The untied lm_head is MiniCPM's μP readout.** MiniCPM spells μP's `MuReadout` as
  "hidden state ÷ (hidden/dim_model_base) before lm_head" (anchors §1.1 table, "Output logits";
  spec §1.1 item 3). In mup the readout weight is vector-like (LR unscaled) with a
  width-independent init and the 1/m lives in the forward (anchors §1.2), so the head gets the
  embedding rules. Applying σ/√m and lr/m on top of the forward ÷ m would make the logit update
  shrink like 1/m, i.e. the readout would stop learning as width grows. The tied 0.5B head *is*
  the embedding, so tied and untied models follow the same rule. Measured (2 layers, widths
  64→512, base 64, AdamW 1e-2, 4 steps; tests/model/test_mup.py has the 64/256 version): mean
  |last block output| stays 0.35 under this rule, falls 0.35→0.10 with
  `embeddings_as_matrices`, and grows 0.14→25 under SP.
* **SP disables the forward scalars.** The anchors' SP column (§1.1 table) is x·W_emb,
  x + f(x) and x·W_outᵀ, and the measured μP-vs-SP sweep (§1.6) lists scale_emb, the residual
  scale and logits ÷ m as part of the μP arm. `forward_multipliers(cfg, "sp")` is therefore
  (1, 1, 1). The model itself always reads `cfg` (transformer.py is unchanged), so an SP model
  is built from `config_for(cfg, "sp")`: scale_emb 1, scale_depth √L and dim_model_base =
  hidden_size give exactly those unit scalars (and m = 1). Under "mup" the scalars stay, as in
  every released MiniCPM config.
* **Weight decay is not width-scaled** (MiniCPM is AdamW-style, anchors §1.1 last row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from minicpm4.model.config import ModelConfig
from minicpm4.model.layers import RotaryEmbedding

Parametrization = Literal["mup", "sp"]
"""μP (MiniCPM's maximal update parametrization) or the standard parametrization."""
PARAMETRIZATIONS: tuple[str, ...] = get_args(Parametrization)

Role = Literal["embedding", "matrix", "vector", "head"]
"""How a parameter scales with width; decides its init std and LR multiplier."""
ROLES: tuple[str, ...] = get_args(Role)


# The three forward scalars and the original init rule (used by transformer.py) -----------
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


# Parametrizations -------------------------------------------------------------------------
def check_parametrization(value: str, field: str = "parametrization") -> Parametrization:
    """Return `value` if it names a parametrization, else ValueError naming `field`."""
    if value not in PARAMETRIZATIONS:
        raise ValueError(f"{field}: unknown parametrization {value!r}; "
                         f"expected one of {PARAMETRIZATIONS}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ForwardMultipliers:
    """The three forward-time scalars of MiniCPM (spec §1.1 items 1-3)."""

    embedding: float
    """Multiplies the token embeddings (scale_emb)."""
    residual: float
    """Multiplies every attention / MLP branch (scale_depth / sqrt(L))."""
    logit: float
    """Multiplies the final hidden state before lm_head (1 / m)."""


def forward_multipliers(cfg: ModelConfig, parametrization: str = "mup") -> ForwardMultipliers:
    """The forward scalars a model of this parametrization uses: MiniCPM's under "mup",
    all 1 under "sp" (anchors Part B §1.1 SP column; see the module docstring)."""
    if check_parametrization(parametrization) == "sp":
        return ForwardMultipliers(embedding=1.0, residual=1.0, logit=1.0)
    return ForwardMultipliers(embedding=embedding_multiplier(cfg),
                              residual=residual_multiplier(cfg), logit=logit_multiplier(cfg))


def config_for(cfg: ModelConfig, parametrization: str = "mup") -> ModelConfig:
    """The config to build a model of `parametrization` from.

    "mup" returns `cfg` unchanged. "sp" returns a copy whose forward scalars are all exactly 1
    (scale_emb 1, scale_depth sqrt(L), dim_model_base = hidden_size, hence m = 1), so that
    `MiniCPM4ForCausalLM(config_for(cfg, "sp"))` is a standard-parametrization model that saves
    and reloads consistently.
    """
    if check_parametrization(parametrization) == "mup":
        return cfg
    return cfg.replace(scale_emb=1.0, scale_depth=math.sqrt(cfg.num_hidden_layers),
                       dim_model_base=cfg.hidden_size)


# Roles ------------------------------------------------------------------------------------
def param_role(name: str, param: torch.Tensor) -> Role:
    """Classify a parameter by its HF name and shape.

    `*embed_tokens.weight` -> "embedding"; `lm_head.weight` -> "head" (when the head is tied,
    `named_parameters()` reports the shared tensor once, as `model.embed_tokens.weight`, so
    it is an "embedding"); any other 2-D tensor (q/k/v/o/o_gate, gate/up/down) -> "matrix";
    0-D/1-D tensors (RMSNorm gains, biases) -> "vector". Anything else is a ValueError.
    """
    if name.endswith("embed_tokens.weight"):
        role: Role = "embedding"
    elif name == "lm_head.weight" or name.endswith(".lm_head.weight"):
        role = "head"
    elif param.dim() <= 1:
        return "vector"
    elif param.dim() == 2:
        return "matrix"
    else:
        raise ValueError(f"parameter {name!r}: cannot classify a {param.dim()}-D tensor "
                         f"of shape {tuple(param.shape)} for μP (expected 1-D or 2-D)")
    if param.dim() != 2:
        raise ValueError(f"parameter {name!r}: {role} weights must be 2-D, "
                         f"got shape {tuple(param.shape)}")
    return role


def param_roles(model: nn.Module) -> dict[str, Role]:
    """{name: role} for every distinct parameter (tied tensors once, under their first name)."""
    return {name: param_role(name, p) for name, p in model.named_parameters()}


def _matrix_rules(role: str, embeddings_as_matrices: bool) -> bool:
    if role not in ROLES:
        raise ValueError(f"role: unknown parameter role {role!r}; expected one of {ROLES}")
    return role == "matrix" or (embeddings_as_matrices and role in ("embedding", "head"))


def role_init_std(cfg: ModelConfig, role: str, parametrization: str = "mup", *,
                  embeddings_as_matrices: bool = False) -> float:
    """Init std of a weight of this role (the module-docstring table).

    For "vector" this is the std of nothing: vectors are set to constants (norm gains 1,
    biases 0) and the function returns 0.0.
    """
    matrix = _matrix_rules(role, embeddings_as_matrices)
    if role == "vector":
        return 0.0
    if check_parametrization(parametrization) == "sp":
        return cfg.initializer_range
    return init_std(cfg, matrix=matrix)


def lr_multiplier(cfg: ModelConfig, role: str, parametrization: str = "mup", *,
                  embeddings_as_matrices: bool = False) -> float:
    """Adam LR multiplier of this role: 1/m for hidden matrices under μP, 1 otherwise."""
    matrix = _matrix_rules(role, embeddings_as_matrices)
    if check_parametrization(parametrization) == "sp" or not matrix:
        return 1.0
    return 1.0 / width_multiplier(cfg)


# Initialisation ---------------------------------------------------------------------------
@torch.no_grad()
def init_model_(model: nn.Module, parametrization: str = "mup", seed: int | None = None, *,
                embeddings_as_matrices: bool = False) -> dict[str, Role]:
    """Initialise every parameter of `model` (which carries `.config: ModelConfig`) by role.

    Weights are drawn from normal(0, `role_init_std`) in fp32 with one generator seeded by
    `seed` (in `named_parameters()` order, so the result is reproducible and independent of
    the parameter dtype/device); RMSNorm gains are set to 1 and biases to 0. Rotary buffers are
    recomputed and tied weights re-tied. Returns the roles used. The forward scalars are not
    touched: build SP models from `config_for(cfg, "sp")`.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("model: init_model_ needs a model with a `.config` ModelConfig")
    parametrization = check_parametrization(parametrization)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    roles = param_roles(model)
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"parameter {name!r} is on the meta device; materialise the "
                             "model (e.g. model.to_empty(device=...)) before init_model_")
        role = roles[name]
        if role == "vector":
            p.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        std = role_init_std(cfg, role, parametrization,
                            embeddings_as_matrices=embeddings_as_matrices)
        sample = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        p.copy_(sample)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    return roles
