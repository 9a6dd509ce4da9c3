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
which is the reference (tests/model/test_grouped.py). Padding (the left padding of a batch of
prompts of different lengths) is left out of the token-wise parts: they run on the real
tokens only, and each padded batch gets its padded `[B, T]` layout back for attention, with
zeros at the padding (masked there, so a real token's attention is unchanged), which spares
the GEMMs of up to half of a step of new prompts.
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
    # per batch: the flat [B * T] positions of its real tokens, None when none is padding
    real = [None if valid_BT is None else valid_BT.reshape(-1).nonzero().squeeze(1)
            for _, valid_BT in prepared]
    counts = [B * T if keep is None else keep.numel() for (B, T), keep in zip(shapes, real)]
    ids_1N = torch.cat([b.ids_BT.reshape(-1) if keep is None else
                        b.ids_BT.reshape(-1).index_select(0, keep)
                        for b, keep in zip(batches, real)]).view(1, -1)

    def padded(x_NF: torch.Tensor, keep: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
        if keep is None:
            return x_NF.view(B, T, -1)
        return x_NF.new_zeros(B * T, x_NF.shape[-1]).index_copy_(0, keep, x_NF).view(B, T, -1)

    def attend_per_batch(h_1ND: torch.Tensor, attn: Attention) -> torch.Tensor:
        q_1NF, k_1NF, v_1NF = attn.project(h_1ND)
        outs, start = [], 0
        for (B, T), (inp, _), keep, n in zip(shapes, prepared, real, counts):
            end = start + n
            out_BTF = attn.attend(*(padded(t_1NF[0, start:end], keep, B, T)
                                    for t_1NF in (q_1NF, k_1NF, v_1NF)), inp)
            out_NF = out_BTF.reshape(B * T, -1)
            outs.append(out_NF if keep is None else out_NF.index_select(0, keep))
            start = end
        return attn.finish(h_1ND, (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0))

    x_1ND = model.embed_tokens(ids_1N) * model.embed_scale
    for layer in model.layers:
        x_1ND = layer.block(x_1ND, lambda h, attn=layer.self_attn: attend_per_batch(h, attn))
    last, start = [], 0  # a row's last token is real (left padding): its last packed one
    for (B, T), batch, (_, valid_BT) in zip(shapes, batches, prepared):
        batch.cache.advance(valid_BT, T)
        for n in [T] * B if valid_BT is None else valid_BT.sum(dim=1).tolist():
            start += n
            last.append(start - 1)
    h_RD = model.norm(x_1ND[0].index_select(0, torch.tensor(last, device=x_1ND.device)))
    return lm.compute_logits(h_RD, keep_dtype=keep_dtype)
