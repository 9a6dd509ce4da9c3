"""Lean decode forward: one new token per row over a paged cache, bf16 CPU inference (issue 5,
acceptance item 5; spec §4.1, CPM.cu's "few launches per token").

A decode step of a small model on CPU is mostly interpreter time: `MiniCPM4ForCausalLM.forward`
goes through module calls, dispatch checks (`applies` of every kernel, per call), views and
closures, ~225 us per layer of the demo model around ~75 us of GEMMs (measured with
cProfile and the torch profiler, 2-vCPU Xeon). `decode_logits` runs the *same ops with the same
arguments, in the same order* as that reference forward takes for such a step (the skinny GEMM,
the fused norms, the fused RoPE, the paged-attention op, torch's silu / mul / add), with the
checks done once per step instead of once per op, so its logits and cache contents are
bit-identical to the reference's (tests/model/test_fast_decode.py). The q/k/v projections run
as one `linear_multi` call, and gate/up as another: the skinny GEMM's several-weight entry,
whose outputs equal one `linear` call per weight bit for bit (tests/kernels/
test_skinny_linear.py) while sharing one repack of the input and one parallel region (demo
model offline, alternating A/B: 1.03x at batch 1, 1.05-1.14x at batch 8). Measured (offline
engine, 48 greedy steps, same tokens): demo model 3.9 -> 2.55 ms per step at batch 1,
0.5B-shaped 45-48 -> 38 ms.

It applies (`applies`) only where the reference would take exactly those kernels:
- the model: plain MiniCPM4 layers (softmax attention with RoPE, no InfLLM v2, no output gate,
  no biases), every weight bfloat16 on the CPU, the four C++ extensions built and switched on;
- the step: a cache that can attend in its pages (`decode_pages`, the engine's `PagedBatch` of
  decode rows), one token per row, no padding mask, at most `skinny_linear.max_rows()` rows, no
  autograd.
Anything else returns False and the caller runs the reference forward. Module forward hooks
do not run here (as on the skinny-GEMM path of `kernels/matmul.apply_linear`).
Shape legend: B rows, D hidden, N query heads, K kv heads, H head dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minicpm4.kernels import cpu_ext, fused_norm, fused_rotary, needs_grad, paged_attention, \
    skinny_linear
from minicpm4.model.attention import Attention
from minicpm4.model.layers import MLP, RMSNorm
from minicpm4.model.transformer import DecoderLayer, MiniCPM4ForCausalLM

_EXTENSIONS = ("skinny_gemm", "rms_norm", "rotary", "paged_attention")

FAST_DECODE = True
"""Module switch (tests and `benchmarks/engine_switches.py --switch lean` turn it off)."""


def supports(lm: MiniCPM4ForCausalLM) -> bool:
    """Whether the model's structure and weights allow the lean path (see module docstring);
    the kernels' switches and the step are checked by `applies`."""
    cfg = lm.config
    if set(cfg.layer_mixers) != {"minicpm4"} or cfg.sparse_config is not None \
            or not cfg.attn_use_rope:
        return False
    model = lm.model
    if type(model.norm) is not RMSNorm or type(lm.lm_head) is not nn.Linear:
        return False
    for layer in model.layers:
        if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention \
                or type(layer.mlp) is not MLP or layer.self_attn.o_gate is not None:
            return False
        linears = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                   layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                   layer.mlp.down_proj)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return False
    for p in lm.parameters():
        if p.dtype != torch.bfloat16 or p.device.type != "cpu" or type(p) is not nn.Parameter \
                or not p.is_contiguous():
            return False
    if not cpu_ext.enabled():
        return False
    return all(cpu_ext.load(name) for name in _EXTENSIONS)


def applies(lm: MiniCPM4ForCausalLM, ids_BT: torch.Tensor, cache) -> bool:
    """Whether this step may take `decode_logits` (given `supports(lm)` holds)."""
    if not (FAST_DECODE and skinny_linear.SKINNY_LINEAR and fused_norm.FUSED_NORM
            and fused_rotary.FUSED_ROTARY and paged_attention.PAGED_DECODE
            and cpu_ext.enabled()):
        return False
    if ids_BT.dim() != 2 or ids_BT.shape[1] != 1 or ids_BT.shape[0] > skinny_linear.max_rows():
        return False
    w = lm.lm_head.weight
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or needs_grad(w):
        return False
    get_pages = getattr(cache, "decode_pages", None)
    return get_pages is not None and get_pages(0) is not None


def decode_logits(lm: MiniCPM4ForCausalLM, ids_BT: torch.Tensor, cache) -> torch.Tensor:
    """Logits [B, V] in the model's dtype after one new token per row (ids [B, 1]), appending
    its keys and values to `cache`; as `lm.compute_logits(lm.model(ids, cache=cache)[:, -1],
    keep_dtype=True)`. Call `supports` and `applies` first."""
    model = lm.model
    cfg = lm.config
    B = ids_BT.shape[0]
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
    if int(ids_BT.min()) < 0 or int(ids_BT.max()) >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got range "
                         f"[{int(ids_BT.min())}, {int(ids_BT.max())}]")
    linear = torch.ops.minicpm4_skinny_gemm.linear
    linear_multi = torch.ops.minicpm4_skinny_gemm.linear_multi  # = one `linear` per weight
    rms_norm = torch.ops.minicpm4_rms_norm.rms_norm
    add_rms_norm = torch.ops.minicpm4_rms_norm.add_rms_norm
    rotary = torch.ops.minicpm4_rotary.rotary
    attend = torch.ops.minicpm4_paged_attention.decode
    cos_B1H, sin_B1H = model.rotary_emb(cache.num_valid().view(-1, 1))
    x_BD = (model.embed_tokens(ids_BT) * model.embed_scale).view(B, -1)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        n_in, n_post = layer.input_layernorm, layer.post_attention_layernorm
        scale = layer.residual_scale
        h_BD = rms_norm(x_BD, n_in.weight, n_in.variance_epsilon)
        q_BF, k_BF, v_BF = linear_multi(h_BD, [attn.q_proj.weight, attn.k_proj.weight,
                                               attn.v_proj.weight])
        q_B1NH = rotary(q_BF.view(B, 1, N, H), cos_B1H, sin_B1H)
        k_B1KH = rotary(k_BF.view(B, 1, K, H), cos_B1H, sin_B1H)
        v_B1KH = v_BF.view(B, 1, K, H)
        cache.write(attn.layer_idx, k_B1KH.transpose(1, 2), v_B1KH.transpose(1, 2))
        o_BNH = attend(q_B1NH.view(B, N, H), *cache.decode_pages(attn.layer_idx))
        x_BD, h_BD = add_rms_norm(x_BD, linear(o_BNH.view(B, N * H), attn.o_proj.weight, None),
                                  scale, n_post.weight, n_post.variance_epsilon)
        gate_BF, up_BF = linear_multi(h_BD, [mlp.gate_proj.weight, mlp.up_proj.weight])
        act_BF = F.silu(gate_BF) * up_BF
        x_BD = x_BD + linear(act_BF, mlp.down_proj.weight, None) * scale
    cache.advance(None, 1)
    return lm.compute_logits(model.norm(x_BD), keep_dtype=True)
