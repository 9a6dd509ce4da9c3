"""One forward over several batches of different shapes (issue 5; docs/architecture.md
"Model <-> cache").

A serving step mixes kinds of work: decode rows (one new token after stored ones), the first
chunks of new prompts (left-padded to a common length) and continuing prefill chunks. Each
kind is a batch the cache protocol can express (`engine/kv_cache.PagedBatch`), but running one
`MiniCPM4ForCausalLM.forward` per batch reads every weight once per batch, and a decode step
is bound by reading the weights. `grouped_logits` reads them once per step: every token-wise
part (embedding, norms, q/k/v and o projections, MLP, LM head) runs on the tokens of all
batches together, flattened; only RoPE, the cache update and attention (`Attention.attend`)
run per batch, with that batch's positions, mask and cache. Per token the arithmetic is that
of `forward`, which is the reference (tests/model/test_grouped.py).
Shape legend: B rows, T tokens, N all tokens of all batches, D hidden, F features, R rows of
all batches, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.kernels import fused_norm
from minicpm4.model.attention import AttentionInputs
from minicpm4.model.cache import KVCache
from minicpm4.model.transformer import (MiniCPM4ForCausalLM, _positions_and_mask,
                                        _sparse_key_start)


@dataclass
class Batch:
    """One batch of a grouped forward: ids [B, T], its padding mask (True = real token; left
    padding only) and the cache view its new tokens are appended to."""

    ids_BT: torch.Tensor
    mask_BT: torch.Tensor | None
    cache: KVCache


def _inputs(lm: MiniCPM4ForCausalLM, batch: Batch) -> tuple[AttentionInputs,
                                                            torch.Tensor | None]:
    B, T = batch.ids_BT.shape
    dev = batch.ids_BT.device
    if T == 0 or B == 0:
        raise ValueError("a grouped forward's batch has no tokens")
    if batch.cache.seq_len + T > batch.cache.max_len:
        raise ValueError(f"{batch.cache.seq_len} cached + {T} new tokens exceed the cache "
                         f"capacity of {batch.cache.max_len}")
    valid_BT = None
    if batch.mask_BT is not None:
        if batch.mask_BT.shape != batch.ids_BT.shape:
            raise ValueError(f"mask shape {tuple(batch.mask_BT.shape)} != ids shape "
                             f"{tuple(batch.ids_BT.shape)}")
        valid_BT = batch.mask_BT.bool()
        if bool(valid_BT.all()):
            valid_BT = None
    positions_BT, mask_B1TS, is_causal = _positions_and_mask(
        batch=B, num_new=T, valid_BT=valid_BT, cache=batch.cache, device=dev)
    cos_BTH, sin_BTH = lm.model.rotary_emb(positions_BT)
    inp = AttentionInputs(cos_BTH=cos_BTH, sin_BTH=sin_BTH, mask_B1TS=mask_B1TS,
                          is_causal=is_causal, cache=batch.cache)
    if lm.config.sparse_config is not None:
        inp.key_start = _sparse_key_start(valid_BT, batch.cache, None, B, T, dev)
    return inp, valid_BT


@torch.inference_mode()
def grouped_logits(lm: MiniCPM4ForCausalLM, batches: list[Batch], *,
                   keep_dtype: bool = False) -> torch.Tensor:
    """fp32 logits [R, V] (the model's dtype with `keep_dtype`) after the last position of
    every row, batch after batch (row b of batch g at sum of the earlier batches' B, + b);
    appends every batch's keys to its cache."""
    if not batches:
        raise ValueError("a grouped forward needs at least one batch")
    model = lm.model
    prepared = [_inputs(lm, b) for b in batches]
    shapes = [tuple(b.ids_BT.shape) for b in batches]
    ids_1N = torch.cat([b.ids_BT.reshape(-1) for b in batches]).view(1, -1)
    vocab = lm.config.vocab_size
    if int(ids_1N.min()) < 0 or int(ids_1N.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got range "
                         f"[{int(ids_1N.min())}, {int(ids_1N.max())}]")
    x_1ND = model.embed_tokens(ids_1N) * model.embed_scale
    for layer in model.layers:
        attn = layer.self_attn
        h_1ND = fused_norm.rms_norm(x_1ND, layer.input_layernorm)
        q_1NF, k_1NF, v_1NF = attn.project(h_1ND)
        outs, start = [], 0
        for (B, T), (inp, _) in zip(shapes, prepared):
            end = start + B * T
            out_BTF = attn.attend(q_1NF[0, start:end].view(B, T, -1),
                                  k_1NF[0, start:end].view(B, T, -1),
                                  v_1NF[0, start:end].view(B, T, -1), inp)
            outs.append(out_BTF.reshape(1, B * T, -1))
            start = end
        out_1NF = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        x_1ND, h_1ND = fused_norm.add_rms_norm(x_1ND, attn.finish(h_1ND, out_1NF),
                                               layer.residual_scale,
                                               layer.post_attention_layernorm)
        x_1ND = x_1ND + layer.mlp(h_1ND) * layer.residual_scale
    last, start = [], 0
    for (B, T), batch, (_, valid_BT) in zip(shapes, batches, prepared):
        batch.cache.advance(valid_BT, T)
        last.extend(start + b * T + T - 1 for b in range(B))
        start += B * T
    h_RD = model.norm(x_1ND[0].index_select(0, torch.tensor(last, device=x_1ND.device)))
    return lm.compute_logits(h_RD, keep_dtype=keep_dtype)
