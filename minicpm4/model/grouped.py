"""One forward over several batches of different shapes (issue 5; docs/architecture.md
"Model <-> cache").

A serving step mixes kinds of work: decode rows (one new token after stored ones), the first
chunks of new prompts (left-padded to a common length) and continuing prefill chunks. Each
kind is a batch the cache protocol can express (`engine/kv_cache.PagedBatch`), but running one
`MiniCPM4ForCausalLM.forward` per batch reads every weight once per batch, and a decode step
is bound by reading the weights. `grouped_logits` reads them once per step: every token-wise
part (embedding, norms, q/k/v and o projections, MLP, LM head) runs on the tokens of all
batches together, flattened; only RoPE, the cache update and attention (`Attention.attend`)
run per batch, with that batch's positions, mask and cache (`MiniCPM4Model.attention_inputs`,
inside the layer's own `DecoderLayer.block`). Per token the arithmetic is that of `forward`,
which is the reference (tests/model/test_grouped.py).
Shape legend: B rows, T tokens, N all tokens of all batches, D hidden, F features, R rows of
all batches, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.model.attention import Attention
from minicpm4.model.cache import KVCache
from minicpm4.model.transformer import MiniCPM4ForCausalLM


@dataclass
class Batch:
    """One batch of a grouped forward: ids [B, T], its padding mask (True = real token; left
    padding only) and the cache view its new tokens are appended to."""

    ids_BT: torch.Tensor
    mask_BT: torch.Tensor | None
    cache: KVCache


@torch.inference_mode()
def grouped_logits(lm: MiniCPM4ForCausalLM, batches: list[Batch], *,
                   keep_dtype: bool = False) -> torch.Tensor:
    """fp32 logits [R, V] (the model's dtype with `keep_dtype`) after the last position of
    every row, batch after batch (row b of batch g at sum of the earlier batches' B, + b);
    appends every batch's keys to its cache."""
    if not batches:
        raise ValueError("a grouped forward needs at least one batch")
    model = lm.model
    prepared = [model.attention_inputs(b.ids_BT, attention_mask_BT=b.mask_BT, cache=b.cache)
                for b in batches]
    shapes = [tuple(b.ids_BT.shape) for b in batches]
    ids_1N = torch.cat([b.ids_BT.reshape(-1) for b in batches]).view(1, -1)

    def attend_per_batch(h_1ND: torch.Tensor, attn: Attention) -> torch.Tensor:
        q_1NF, k_1NF, v_1NF = attn.project(h_1ND)
        outs, start = [], 0
        for (B, T), (inp, _) in zip(shapes, prepared):
            end = start + B * T
            out_BTF = attn.attend(q_1NF[0, start:end].view(B, T, -1),
                                  k_1NF[0, start:end].view(B, T, -1),
                                  v_1NF[0, start:end].view(B, T, -1), inp)
            outs.append(out_BTF.reshape(1, B * T, -1))
            start = end
        return attn.finish(h_1ND, outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))

    x_1ND = model.embed_tokens(ids_1N) * model.embed_scale
    for layer in model.layers:
        x_1ND = layer.block(x_1ND, lambda h, attn=layer.self_attn: attend_per_batch(h, attn))
    last, start = [], 0
    for (B, T), batch, (_, valid_BT) in zip(shapes, batches, prepared):
        batch.cache.advance(valid_BT, T)
        last.extend(start + b * T + T - 1 for b in range(B))
        start += B * T
    h_RD = model.norm(x_1ND[0].index_select(0, torch.tensor(last, device=x_1ND.device)))
    return lm.compute_logits(h_RD, keep_dtype=keep_dtype)
