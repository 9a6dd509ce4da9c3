"""`generate` / `generate_stream`: batched autoregressive decoding over a `StaticKVCache`.

Prompts of different lengths are left-padded into one batch; each row has its own
`SamplingParams` (penalties, seed, stop strings and tokens, max_tokens). Finished rows leave
the batch (the cache is compacted), so a long request does not make short ones pay.
Shape legend: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from minicpm4.engine.compiled_decode import decoder_for
from minicpm4.engine.request import SamplingParams, check_prompt
from minicpm4.engine.sampler import sample, token_counts
from minicpm4.engine.stopping import StopChecker
from minicpm4.model.cache import StaticKVCache
from minicpm4.model.transformer import MiniCPM4ForCausalLM


@dataclass
class StreamEvent:
    """One generated token of request `index`; `text` is the newly finished text (may be '')."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None = None
    """None while running, then 'stop' (EOS, stop token or string) or 'length'."""


@dataclass
class GenerationOutput:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0


def _check_prompts(model: MiniCPM4ForCausalLM, prompts: Sequence[Sequence[int]],
                   params: list[SamplingParams]) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        check_prompt(len(prompt), p, model.config.max_position_embeddings, what=f"prompt {i}")


def _capacity(needed: int, compiled: bool) -> int:
    """Cache positions; compiled decoding rounds up so that calls reuse one compiled graph."""
    return -(-needed // 256) * 256 if compiled else needed


@torch.inference_mode()
def generate_stream(model: MiniCPM4ForCausalLM, prompts: Sequence[Sequence[int]],
                    params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                    tokenizer=None, pad_id: int = 0, compile: bool = False
                    ) -> Iterator[StreamEvent]:
    """Yield a `StreamEvent` per generated token of each request, as soon as it is sampled.

    `compile=True` runs decode steps through `CompiledDecoder` (one compiled graph per batch
    size and cache bucket; the first call pays the compile). The batch then keeps its shape:
    finished rows stay in it, ignored, instead of being dropped.
    """
    plist = list(params) if isinstance(params, (list, tuple)) else \
        [params or SamplingParams()] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
    _check_prompts(model, prompts, plist)
    decoder = decoder_for(model) if compile else None
    device, vocab, batch = model.device, model.config.vocab_size, len(prompts)
    eos = set(model.config.eos_token_id)
    if tokenizer is not None:
        eos |= set(tokenizer.stop_token_ids)
    states = [StopChecker(p, eos, tokenizer, prompt) for p, prompt in zip(plist, prompts)]
    gens = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
            for p in plist]
    width = max(len(p) for p in prompts)
    ids_BT = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask_BT = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids_BT[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask_BT[row, width - len(prompt):] = True
    capacity = _capacity(width + max(p.max_tokens for p in plist), decoder is not None)
    cache = StaticKVCache.for_model(model.config, batch_size=batch, max_len=capacity,
                                    dtype=model.dtype, device=device)
    penalized = any(p.penalized for p in plist)
    prompt_counts = token_counts([list(p) for p in prompts], vocab, device) if penalized else None
    output_counts = torch.zeros(batch, vocab, device=device) if penalized else None
    active = list(range(batch))  # request index of each running row
    slots = list(range(batch))  # its row in the cache batch
    logits_BV = model(ids_BT, attention_mask_BT=mask_BT, cache=cache, logits_to_keep=1)[:, -1]
    while active:
        rows_A = torch.tensor(active, device=device)
        tokens = sample(logits_BV.index_select(0, torch.tensor(slots, device=device)),
                        [plist[i] for i in active], [gens[i] for i in active],
                        prompt_counts_BV=None if prompt_counts is None else
                        prompt_counts.index_select(0, rows_A),
                        output_counts_BV=None if output_counts is None else
                        output_counts.index_select(0, rows_A)).tolist()
        keep = []
        for j, (row, tok) in enumerate(zip(active, tokens)):
            text, reason = states[row].step(tok)
            yield StreamEvent(index=row, token_id=tok, text=text, finish_reason=reason)
            if reason is None:
                keep.append(j)
            if output_counts is not None:
                output_counts[row, tok] += 1
        active, tokens = [active[j] for j in keep], [tokens[j] for j in keep]
        if not active:
            break
        if decoder is None and len(keep) < len(slots):
            cache.reorder(torch.tensor([slots[j] for j in keep], device=device))
            slots = list(range(len(keep)))
        else:
            slots = [slots[j] for j in keep]
        step_ids = torch.full((cache.batch_size, 1), pad_id, dtype=torch.long, device=device)
        step_ids[slots, 0] = torch.tensor(tokens, dtype=torch.long, device=device)
        if decoder is not None:
            logits_BV = decoder(step_ids, cache)
        else:
            logits_BV = model(step_ids, cache=cache)[:, -1]


def generate(model: MiniCPM4ForCausalLM, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             tokenizer=None, compile: bool = False) -> list[GenerationOutput]:
    """Run `generate_stream` to completion; one `GenerationOutput` per prompt, in order."""
    outs = [GenerationOutput(prompt_tokens=len(p)) for p in prompts]
    for ev in generate_stream(model, prompts, params, tokenizer=tokenizer, compile=compile):
        out = outs[ev.index]
        out.token_ids.append(ev.token_id)
        out.text += ev.text
        out.finish_reason = ev.finish_reason or out.finish_reason
    return outs
