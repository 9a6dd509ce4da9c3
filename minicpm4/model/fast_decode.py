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
With `pack_layers`' arguments (the engine's runner keeps them) the layers of a decode step
run in the C++ loop `csrc/decode_layers.cpp`: the same calls through the dispatcher,
bit-identical to the Python loop of `decode_logits`, which stays as its reference
(`benchmarks/engine_switches.py --switch cpploop --fresh`, offline: demo model 1.31x at
C = 1, 1.29x at C = 8; 0.5B-shaped 1.09x at C = 1).
`token_logits` runs a step that computes prompt chunks through the same C++ loop, one row
per new token attending to its sequence's keys in the pages (`token_applies` says where;
not bit-identical to the grouped forward, whose prompt attention is SDPA, but as close to
the fp32 model: tests/model/test_token_step.py; `engine_switches.py --switch token
--fresh`: 0.5B-shaped 1.10x at C = 32, demo 1.09x at C = 8).
`grouped_layer` and `decode_attend` are the same lean calls for one layer of the grouped
forward (`model/grouped.py`: a step mixing new prompts and decode rows, token-wise parts on
the packed tokens of all batches; `grouped_applies` says where), equal bit for bit to the
layer's module path there.
Shape legend: B rows, D hidden, N query heads, K kv heads, H head dim, V vocabulary;
in the grouped calls N is the packed tokens and F features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minicpm4.kernels import cpu_ext, fused_norm, fused_rotary, matmul, needs_grad, \
    paged_attention, skinny_linear
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


def _kernels_on() -> bool:
    """The lean path's kernels and this module are switched on."""
    return (FAST_DECODE and skinny_linear.SKINNY_LINEAR and fused_norm.FUSED_NORM
            and fused_rotary.FUSED_ROTARY and paged_attention.PAGED_DECODE
            and cpu_ext.enabled())


def in_pages(cache) -> bool:
    """Whether `cache` is a decode batch that attends in its pages (`decode_pages`)."""
    get_pages = getattr(cache, "decode_pages", None)
    return get_pages is not None and get_pages(0) is not None


def applies(lm: MiniCPM4ForCausalLM, ids_BT: torch.Tensor, cache) -> bool:
    """Whether this step may take `decode_logits` (given `supports(lm)` holds)."""
    if not _kernels_on():
        return False
    if ids_BT.dim() != 2 or ids_BT.shape[1] != 1 or ids_BT.shape[0] > skinny_linear.max_rows():
        return False
    w = lm.lm_head.weight
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or needs_grad(w):
        return False
    return in_pages(cache)


DECODE_LAYERS = True
"""Switch of the C++ layer loop (`csrc/decode_layers.cpp`); off, the Python loop runs."""


def pack_layers(lm: MiniCPM4ForCausalLM) -> tuple[list, list[float], list[float], bool] | None:
    """The per-layer arguments of the C++ layer loop, gathered once (the engine keeps them,
    as it keeps `supports`' answer: the model's modules are not replaced while it serves):
    9 weights, 2 norm eps and the residual scale per layer, and whether every linear weight
    may take the skinny GEMM's tile path beyond 32 rows (`_tile_shaped`); None where the op is
    not built. Call `supports` first."""
    if not cpu_ext.load("decode_layers"):
        return None
    weights, eps, scales = [], [], []
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        n_in, n_post = layer.input_layernorm, layer.post_attention_layernorm
        weights += [n_in.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                    attn.o_proj.weight, n_post.weight, mlp.gate_proj.weight,
                    mlp.up_proj.weight, mlp.down_proj.weight]
        eps += [float(n_in.variance_epsilon), float(n_post.variance_epsilon)]
        scales.append(float(layer.residual_scale))
    tiles = all(_tile_shaped(w) for w in weights if w.dim() == 2)
    return weights, eps, scales, tiles


def _embedded(lm: MiniCPM4ForCausalLM, ids_B1: torch.Tensor) -> torch.Tensor:
    """The scaled embeddings [B, D] of one token per row (ids [B, 1]), after checking the
    ids."""
    vocab = lm.config.vocab_size
    if int(ids_B1.min()) < 0 or int(ids_B1.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got range "
                         f"[{int(ids_B1.min())}, {int(ids_B1.max())}]")
    model = lm.model
    return (model.embed_tokens(ids_B1) * model.embed_scale).view(ids_B1.shape[0], -1)


def _run_layers(x_ND: torch.Tensor, packed, layout, cfg) -> torch.Tensor:
    """The C++ layer loop on the rows x [N, D] (one new token each) with `layout` = (K pages
    per layer, V pages per layer, slots [N], block table [N, W], keys per row [N]) and the
    rows' cos / sin; the GEMMs as `_linears` takes them for N rows."""
    weights, eps, scales, tiles = packed
    k_pages, v_pages, slots_N, table_NW, lens_N, cos_N1H, sin_N1H = layout
    rows = x_ND.shape[0]
    max_rows = skinny_linear.max_rows() if tiles else skinny_linear.MAX_ROWS
    bucket = matmul.bucket_rows(rows) if rows > max_rows and matmul.ROW_BUCKETS else rows
    return torch.ops.minicpm4_decode_layers.decode_layers(
        x_ND, weights, k_pages, v_pages, slots_N, table_NW, lens_N, cos_N1H, sin_N1H, eps,
        scales, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_, max_rows,
        bucket)


def decode_logits(lm: MiniCPM4ForCausalLM, ids_BT: torch.Tensor, cache,
                  packed: tuple[list, list[float], list[float]] | None = None) -> torch.Tensor:
    """Logits [B, V] in the model's dtype after one new token per row (ids [B, 1]), appending
    its keys and values to `cache`; as `lm.compute_logits(lm.model(ids, cache=cache)[:, -1],
    keep_dtype=True)`. Call `supports` and `applies` first. With `packed` (`pack_layers`) and
    a cache that gives its `decode_layout`, the layers run in the C++ loop (the same calls as
    the Python loop below, bit-identical)."""
    model = lm.model
    cfg = lm.config
    x_BD = _embedded(lm, ids_BT)
    cos_B1H, sin_B1H = model.rotary_emb(cache.num_valid().view(-1, 1))
    layout = getattr(cache, "decode_layout", None)
    layout = layout() if packed is not None and DECODE_LAYERS and layout is not None else None
    if layout is not None:
        x_BD = _run_layers(x_BD, packed, (*layout, cos_B1H, sin_B1H), cfg)
    else:
        for layer in model.layers:
            x_BD = grouped_layer(layer, x_BD, lambda q, k, v, attn=layer.self_attn:
                                 decode_attend(attn, q, k, v, cos_B1H, sin_B1H, cache))
    cache.advance(None, 1)
    return lm.compute_logits(model.norm(x_BD), keep_dtype=True)


TOKEN_STEPS = True
"""Switch of the token-level step (`token_logits`); off, steps with prompt chunks take the
grouped forward (`model/grouped.py`)."""

TOKEN_ATTENTION_KEYS = 1 << 18
"""Most keys the prompt tokens of a token-level step may attend to in all (one row each, in
the pages): beyond, the grouped forward's blocked prefill attention is the better tool.
Measured (2 prompts of n tokens in one step, 2-vCPU Xeon, token-level vs grouped, budget
lifted): demo model n = 512 (262K keys) 53 vs 57 ms, n = 1000 (1M) 174 vs 129 ms;
0.5B-shaped n = 512 706 vs 807 ms, n = 1000 1634 vs 1726 ms, n = 2000 (4M) 4329 vs 4065
ms. The attention's share grows with heads x head dim over the layer's weights (largest for
the demo model), so 2^18 keeps both on the winning side."""


def token_applies(packed, num_computed: list[int], num_new: list[int]) -> bool:
    """Whether a step computing num_new[s] tokens after num_computed[s] stored ones of each
    sequence may take `token_logits` (given `supports(lm)`; `packed` from `pack_layers`)."""
    if packed is None or not (TOKEN_STEPS and DECODE_LAYERS and _kernels_on()):
        return False
    keys = sum(n * c + n * (n + 1) // 2 for c, n in zip(num_computed, num_new) if n > 1)
    return keys <= TOKEN_ATTENTION_KEYS


def token_logits(lm: MiniCPM4ForCausalLM, ids_N: torch.Tensor, positions_N: torch.Tensor,
                 row_last_N: torch.Tensor, layout, last_R: torch.Tensor, packed
                 ) -> torch.Tensor:
    """Logits [R, V] in the model's dtype after the tokens `last_R` of a step whose every new
    token (ids [N] at positions [N]; row_last_N: the last position of its sequence's chunk,
    for LongRoPE's choice) is a row of its own: a decode row, or a token of a prompt chunk
    that attends to its sequence's keys up to itself in the pages (`layout` = (K pages per
    layer, V pages per layer, slots [N], block table [N, W], keys per row [N]),
    `engine/kv_cache.token_layout`). So a step mixing prompts and decode rows runs as one
    call of the C++ layer loop, with no padding and no per-batch Python (against the grouped
    forward: prompt tokens attend with the paged op instead of SDPA, the same math in
    another summation order). Call `supports` and `token_applies` first."""
    model = lm.model
    x_ND = _embedded(lm, ids_N.view(-1, 1))
    cos_N1H, sin_N1H = model.rotary_emb.tokens(positions_N, row_last_N)
    x_ND = _run_layers(x_ND, packed, (*layout, cos_N1H, sin_N1H), lm.config)
    return lm.compute_logits(model.norm(x_ND.index_select(0, last_R)), keep_dtype=True)


def grouped_applies(lm: MiniCPM4ForCausalLM) -> bool:
    """Whether `model/grouped.py` may run its layers through `grouped_layer` (given
    `supports(lm)`): the lean path's kernels are switched on."""
    return _kernels_on()


def _tile_shaped(w: torch.Tensor) -> bool:
    """The weight may take the skinny GEMM's tile path beyond `skinny_linear.MAX_ROWS` rows."""
    return w.shape[1] % 32 == 0 and w.shape[0] >= 32


def _skinny(rows: int, w: torch.Tensor) -> bool:
    """`skinny_linear.applies` for a bf16 CPU weight of a `supports` model and `rows` rows."""
    return rows <= skinny_linear.MAX_ROWS or (rows <= skinny_linear.max_rows()
                                              and _tile_shaped(w))


def _linears(x_ND: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """`matmul.apply_linear` of each weight on x [N, D] (no autograd, bf16 CPU), the same
    kernel for the same rows: the skinny GEMM (weights sharing x in one `linear_multi` call,
    bit-identical to one call each), else oneDNN on rows padded to a bucket."""
    rows = x_ND.shape[0]
    if rows <= skinny_linear.MAX_ROWS or all(_skinny(rows, w) for w in weights):
        if len(weights) == 1:
            return [torch.ops.minicpm4_skinny_gemm.linear(x_ND, weights[0], None)]
        return list(torch.ops.minicpm4_skinny_gemm.linear_multi(x_ND, weights))
    return [torch.ops.minicpm4_skinny_gemm.linear(x_ND, w, None) if _skinny(rows, w)
            else matmul.bucketed_linear(x_ND, w) if matmul.ROW_BUCKETS else F.linear(x_ND, w)
            for w in weights]


def grouped_layer(layer: DecoderLayer, x_ND: torch.Tensor, mix) -> torch.Tensor:
    """`layer.block` on the packed tokens x [N, D] of a grouped forward (`model/grouped.py`)
    with the same ops, arguments and order as the reference takes for bf16 CPU inference,
    without its per-op dispatch (also the Python loop of `decode_logits`, the reference of
    the C++ loop, with `decode_attend` as `mix`);
    `mix(q_NF, k_NF, v_NF)` is the attention per batch (RoPE, cache update, attention)
    returning [N, N_heads * H] before o_proj. Call `supports` and
    `grouped_applies` first."""
    attn, mlp = layer.self_attn, layer.mlp
    n_in, n_post = layer.input_layernorm, layer.post_attention_layernorm
    scale = layer.residual_scale
    h_ND = torch.ops.minicpm4_rms_norm.rms_norm(x_ND, n_in.weight, n_in.variance_epsilon)
    q_NF, k_NF, v_NF = _linears(h_ND, [attn.q_proj.weight, attn.k_proj.weight,
                                       attn.v_proj.weight])
    o_ND = _linears(mix(q_NF, k_NF, v_NF), [attn.o_proj.weight])[0]
    x_ND, h_ND = torch.ops.minicpm4_rms_norm.add_rms_norm(x_ND, o_ND, scale, n_post.weight,
                                                          n_post.variance_epsilon)
    gate_NF, up_NF = _linears(h_ND, [mlp.gate_proj.weight, mlp.up_proj.weight])
    return x_ND + _linears(F.silu(gate_NF) * up_NF, [mlp.down_proj.weight])[0] * scale


def decode_attend(attn: Attention, q_BF: torch.Tensor, k_BF: torch.Tensor, v_BF: torch.Tensor,
                  cos_B1H: torch.Tensor, sin_B1H: torch.Tensor, cache) -> torch.Tensor:
    """`attn.attend` of a decode batch (one new token per row, no padding) whose cache
    attends in its pages (`decode_pages`): RoPE, the cache write, the paged op; [B, N * H]."""
    B = q_BF.shape[0]
    N, K, H = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rotary = torch.ops.minicpm4_rotary.rotary
    q_B1NH = rotary(q_BF.view(B, 1, N, H), cos_B1H, sin_B1H)
    k_B1KH = rotary(k_BF.view(B, 1, K, H), cos_B1H, sin_B1H)
    cache.write(attn.layer_idx, k_B1KH.transpose(1, 2), v_BF.view(B, 1, K, H).transpose(1, 2))
    out_BNH = torch.ops.minicpm4_paged_attention.decode(q_B1NH.view(B, N, H),
                                                        *cache.decode_pages(attn.layer_idx))
    return out_BNH.view(B, N * H)
