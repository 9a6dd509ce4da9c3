"""One-token decode step of a plain MiniCPM4 model, compiled whole with `torch.compile`.

Batch-1 decode is memory-bound: every weight is read once per token. Eager PyTorch loses
time to per-op dispatch (~4 ms per step at 24 layers) and to GEMV kernels that reach about
half of the memory bandwidth, in bf16 less. Compiling the whole step with the linear layers
written as a fused multiply-and-reduce (`_gemv`) lets inductor emit one vectorised pass per
weight that streams it at close to bandwidth, for fp32 and bf16 alike
(benchmarks/results/ has the measurements).

Shapes stay static across steps (gpt-fast style): the step writes the new K/V at a position
given as a tensor and attends over the whole preallocated cache with a validity mask, so a
cache of one capacity compiles once. The reference is `MiniCPM4ForCausalLM.forward`; tests
compare the two. Shape legend: B batch, S cache capacity, D hidden, N query heads, K kv heads,
G = N // K, H head dim, V vocabulary.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from minicpm4.model.cache import StaticKVCache
from minicpm4.model.layers import apply_rotary
from minicpm4.model.transformer import MiniCPM4ForCausalLM


def _gemv(x_BD: torch.Tensor, w_OD: torch.Tensor) -> torch.Tensor:
    """x @ w.T; at batch 1 a multiply-and-sum that inductor turns into one streaming pass."""
    if x_BD.shape[0] != 1:
        return F.linear(x_BD, w_OD)
    return (w_OD.float() * x_BD.float()).sum(dim=-1).to(x_BD.dtype).unsqueeze(0)


def supports(model: MiniCPM4ForCausalLM) -> bool:
    """Plain dense MiniCPM4 layers only (no SALA gates or NoPE, no InfLLM v2), CPU or CUDA."""
    cfg = model.config
    return (set(cfg.layer_mixers) == {"minicpm4"} and cfg.attn_use_rope
            and not cfg.attn_use_output_gate and cfg.sparse_config is None)


class CompiledDecoder:
    """Callable `(ids_B1, cache) -> logits_BV` that also appends to the cache."""

    def __init__(self, model: MiniCPM4ForCausalLM) -> None:
        if not supports(model):
            raise ValueError("compiled decoding supports plain dense MiniCPM4 models only "
                             "(drop --compile, or --sparse / use --dense)")
        self.model = model
        self._step = torch.compile(self._forward, dynamic=False, fullgraph=True)

    @torch.inference_mode()
    def __call__(self, ids_B1: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        if cache.seq_len + 1 > cache.max_len:
            raise ValueError(f"KV cache overflow: {cache.seq_len + 1} > {cache.max_len}")
        positions_B1 = cache.num_valid().view(-1, 1).clone()
        write_1 = torch.tensor([cache.seq_len], device=ids_B1.device)
        key_valid_BS = cache.full_key_valid(upto=cache.seq_len + 1)
        logits_BV = self._step(ids_B1, positions_B1, write_1, key_valid_BS, cache.k, cache.v)
        cache.advance(None, 1)
        return logits_BV

    def _forward(self, ids_B1: torch.Tensor, positions_B1: torch.Tensor, write_1: torch.Tensor,
                 key_valid_BS: torch.Tensor, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor]) -> torch.Tensor:
        inner = self.model.model
        cfg = self.model.config
        B = ids_B1.shape[0]
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        cos_B1H, sin_B1H = inner.rotary_emb(positions_B1)
        mask_BK1S = key_valid_BS.view(B, 1, 1, -1)
        x_BD = inner.embed_tokens(ids_B1).view(B, -1) * inner.embed_scale
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h_BD = layer.input_layernorm(x_BD)
            q_BN1H = _gemv(h_BD, attn.q_proj.weight).view(B, N, 1, H)
            k_BK1H = _gemv(h_BD, attn.k_proj.weight).view(B, K, 1, H)
            v_BK1H = _gemv(h_BD, attn.v_proj.weight).view(B, K, 1, H)
            q_BN1H = apply_rotary(q_BN1H, cos_B1H, sin_B1H)
            k_BK1H = apply_rotary(k_BK1H, cos_B1H, sin_B1H)
            k_caches[i].index_copy_(2, write_1, k_BK1H)
            v_caches[i].index_copy_(2, write_1, v_BK1H)
            q_BKGH = q_BN1H.view(B, K, N // K, H)
            scores_BKGS = (q_BKGH.float() @ k_caches[i].float().transpose(-1, -2)) / math.sqrt(H)
            scores_BKGS = scores_BKGS.masked_fill(~mask_BK1S, float("-inf"))
            out_BKGH = scores_BKGS.softmax(dim=-1) @ v_caches[i].float()
            out_BD = out_BKGH.to(x_BD.dtype).reshape(B, N * H)
            x_BD = x_BD + _gemv(out_BD, attn.o_proj.weight) * layer.residual_scale
            h_BD = layer.post_attention_layernorm(x_BD)
            act_BF = F.silu(_gemv(h_BD, mlp.gate_proj.weight)) * _gemv(h_BD, mlp.up_proj.weight)
            x_BD = x_BD + _gemv(act_BF, mlp.down_proj.weight) * layer.residual_scale
        h_BD = inner.norm(x_BD) * self.model.logit_scale
        return _gemv(h_BD, self.model.lm_head.weight).float()


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model: MiniCPM4ForCausalLM) -> CompiledDecoder:
    """The model's `CompiledDecoder`, made once so later calls reuse its compiled graphs."""
    if model not in _DECODERS:
        _DECODERS[model] = CompiledDecoder(model)
    return _DECODERS[model]
