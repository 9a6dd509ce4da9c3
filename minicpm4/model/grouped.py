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
the GEMMs of up to half of a step of new prompts. On bf16 CPU where the lean decode path
applies (`fast_decode.supports` / `grouped_applies`), each layer runs through
`fast_decode.grouped_layer` (the same kernels with the same arguments, called directly:
bit-identical, tests/model/test_grouped.py) and decode batches attend through
`fast_decode.decode_attend`; this spares the per-op dispatch of a step that mixes new prompts
with decode rows (demo model offline, alternating A/B: 1.037x at C = 8, 1.013x at C = 1).
Shape legend: B rows, T tokens, N all tokens of all batches, D hidden, F features, R rows of
all batches, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.model import fast_decode
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
                   keep_dtype: bool = False, lean: bool | None = None) -> torch.Tensor:
    """fp32 logits [R, V] (the model's dtype with `keep_dtype`) after the last position of
    every row, batch after batch (row b of batch g at sum of the earlier batches' B, + b);
    appends every batch's keys to its cache. `lean`: whether the lean layers apply
    (`fast_decode.supports(lm)`, which walks every parameter, and `grouped_applies`); None
    works it out (callers that step often pass the answer they keep)."""
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

    if lean is None:
        lean = fast_decode.grouped_applies(lm) and fast_decode.supports(lm)
    paged = [lean and fast_decode.in_pages(b.cache) for b in batches]  # decode batches

    def attend_per_batch(q_NF: torch.Tensor, k_NF: torch.Tensor, v_NF: torch.Tensor,
                         attn: Attention) -> torch.Tensor:
        outs, start = [], 0
        for (B, T), (inp, _), keep, n, batch, in_pages in zip(shapes, prepared, real, counts,
                                                               batches, paged):
            end = start + n
            if in_pages:  # a decode batch on the lean path: the same ops as `attn.attend`
                outs.append(fast_decode.decode_attend(
                    attn, q_NF[start:end], k_NF[start:end], v_NF[start:end], inp.cos_BTH,
                    inp.sin_BTH, batch.cache))
            else:
                out_BTF = attn.attend(*(padded(t_NF[start:end], keep, B, T)
                                        for t_NF in (q_NF, k_NF, v_NF)), inp)
                out_NF = out_BTF.reshape(B * T, -1)
                outs.append(out_NF if keep is None else out_NF.index_select(0, keep))
            start = end
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def mix(h_1ND: torch.Tensor, attn: Attention) -> torch.Tensor:
        q_1NF, k_1NF, v_1NF = attn.project(h_1ND)
        return attn.finish(h_1ND, attend_per_batch(q_1NF[0], k_1NF[0], v_1NF[0], attn)
                           .unsqueeze(0))

    x_1ND = model.embed_tokens(ids_1N) * model.embed_scale
    if lean:  # the same ops without their per-op dispatch (`fast_decode.grouped_layer`)
        x_ND = x_1ND[0]
        for layer in model.layers:
            x_ND = fast_decode.grouped_layer(
                layer, x_ND, lambda q, k, v, attn=layer.self_attn: attend_per_batch(q, k, v,
                                                                                     attn))
        x_1ND = x_ND.unsqueeze(0)
    else:
        for layer in model.layers:
            x_1ND = layer.block(x_1ND, lambda h, attn=layer.self_attn: mix(h, attn))
    last, start = [], 0  # a row's last token is real (left padding): its last packed one
    for (B, T), batch, (_, valid_BT) in zip(shapes, batches, prepared):
        batch.cache.advance(valid_BT, T)
        for n in [T] * B if valid_BT is None else valid_BT.sum(dim=1).tolist():
            start += n
            last.append(start - 1)
    h_RD = model.norm(x_1ND[0].index_select(0, torch.tensor(last, device=x_1ND.device)))
    return lm.compute_logits(h_RD, keep_dtype=keep_dtype)
