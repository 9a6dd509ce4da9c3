"""Fold MiniCPM4's μP scalars into plain Llama weights (spec §1.1).

A MiniCPM4 model equals a Llama model whose embedding is multiplied by scale_emb, whose
o_proj and down_proj are multiplied by scale_depth/sqrt(L) and whose lm_head is divided by
hidden/dim_model_base. LongRoPE maps to the "longrope" rope type. This is what the parity
test and the decode benchmark feed to transformers' `LlamaForCausalLM`, and what a user can
export to run a MiniCPM4 checkpoint on Llama-only runtimes.
"""

from __future__ import annotations

from typing import Any

import torch

from minicpm4.model import mup
from minicpm4.model.config import ModelConfig


def llama_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` (also valid as a Llama config.json)."""
    if cfg.layer_mixers != ("minicpm4",) * cfg.num_hidden_layers or cfg.attn_use_output_gate \
            or not cfg.attn_use_rope:
        raise ValueError("only plain MiniCPM4 models (RoPE softmax attention, no gates) fold "
                         "into Llama")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rs = cfg.rope_scaling
    if rs is not None:
        rope = {"rope_type": "longrope", "rope_theta": cfg.rope_theta,
                "short_factor": list(rs.short_factor), "long_factor": list(rs.long_factor),
                "original_max_position_embeddings": rs.original_max_position_embeddings}
        if rs.factor is not None:
            rope["factor"] = rs.factor
        if rs.attention_factor is not None:
            rope["attention_factor"] = rs.attention_factor
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim_,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_id),
        pad_token_id=cfg.pad_token_id)


@torch.no_grad()
def llama_state_dict(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama parameter names -> tensors with the μP scalars folded in (untied head)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    res = mup.residual_multiplier(cfg)
    out = dict(state)
    out["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * cfg.scale_emb
    out["lm_head.weight"] = state["lm_head.weight"] * mup.logit_multiplier(cfg)
    for i in range(cfg.num_hidden_layers):
        for name in (f"model.layers.{i}.self_attn.o_proj.weight",
                     f"model.layers.{i}.mlp.down_proj.weight"):
            out[name] = state[name] * res
    return out
