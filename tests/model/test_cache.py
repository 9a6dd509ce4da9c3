"""Acceptance (issue 2, item 4): cached decoding equals a full-sequence forward.

A batch of 3 prompts of different lengths (left-padded) is prefilled into a StaticKVCache and
decoded for 64 steps; the logits of every step must equal those of one full forward over the
whole sequence (<= 1e-5 in fp32), and those of each row run alone without padding.

LongRoPE picks its factors by the current length, and cached keys keep the rotation they were
stored with (as in MiniCPM's own code), so the comparison is made with every row either
inside `original_max_position_embeddings` for the whole run, or beyond it from the start.
"""

from __future__ import annotations

import pytest
import torch

from minicpm4.model.cache import KVCache, StaticKVCache
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

STEPS = 64
LENGTHS = (5, 23, 41)


def _model(original_max: int) -> MiniCPM4ForCausalLM:
    cfg = tiny_config()
    cfg = cfg.replace(rope_scaling=cfg.rope_scaling.__class__(
        short_factor=cfg.rope_scaling.short_factor, long_factor=cfg.rope_scaling.long_factor,
        original_max_position_embeddings=original_max))
    m = MiniCPM4ForCausalLM(cfg)
    m.init_weights(seed=0)
    return m.eval()


@pytest.fixture(scope="module", params=[256, 4], ids=["short-factors", "long-factors"])
def model(request) -> MiniCPM4ForCausalLM:
    return _model(request.param)


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    full = torch.randint(3, vocab, (len(LENGTHS), width + STEPS), generator=gen)
    mask = torch.ones_like(full, dtype=torch.bool)
    for row, n in enumerate(LENGTHS):
        mask[row, :width - n] = False
        full[row, :width - n] = 0
    return full, mask, width


@torch.no_grad()
def test_cached_decode_matches_full_forward(model: MiniCPM4ForCausalLM) -> None:
    full, mask, width = _batch(model.config.vocab_size)
    reference = model(full, attention_mask_BT=mask)
    cache = StaticKVCache.for_model(model.config, batch_size=3, max_len=width + STEPS,
                                    dtype=torch.float32)
    assert isinstance(cache, KVCache)
    steps = [model(full[:, :width], attention_mask_BT=mask[:, :width], cache=cache)]
    for t in range(width, width + STEPS):
        steps.append(model(full[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    valid = mask.unsqueeze(-1).expand_as(reference)
    diff = (cached - reference).abs()[valid].max().item()
    print(f"max |cached - full| = {diff:.2e} over {STEPS} steps; "
          f"logit scale {reference.abs().max().item():.2f}")
    assert diff <= 1e-5
    for row, n in enumerate(LENGTHS):
        alone = model(full[row:row + 1, width - n:])
        diff_row = (cached[row, width - n:] - alone[0]).abs().max().item()
        assert diff_row <= 1e-5, (row, diff_row)


@torch.no_grad()
def test_cache_overflow_is_a_clear_error(model: MiniCPM4ForCausalLM) -> None:
    cache = StaticKVCache.for_model(model.config, batch_size=1, max_len=8, dtype=torch.float32)
    model(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)


def test_bad_inputs_are_clear_errors(model: MiniCPM4ForCausalLM) -> None:
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[1, 2, model.config.vocab_size]]))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.ones(2, 3, dtype=torch.long), attention_mask_BT=torch.ones(2, 4))
