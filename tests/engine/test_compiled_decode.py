"""The compiled decode step equals the reference forward (`MiniCPM4ForCausalLM.forward`)."""

from __future__ import annotations

import pytest
import torch

from minicpm4.engine.compiled_decode import CompiledDecoder, supports
from minicpm4.engine.generate import generate
from minicpm4.engine.request import SamplingParams
from minicpm4.model.cache import StaticKVCache
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model() -> MiniCPM4ForCausalLM:
    m = MiniCPM4ForCausalLM(tiny_config(num_hidden_layers=2))
    m.init_weights(seed=0)
    return m.eval()


@torch.inference_mode()
def test_compiled_steps_match_reference_logits(model: MiniCPM4ForCausalLM) -> None:
    """Left-padded batch of 3: prefill, then 12 decode steps both ways, logits compared."""
    gen = torch.Generator().manual_seed(0)
    lengths, width, steps = (3, 9, 14), 14, 12
    ids = torch.randint(3, model.config.vocab_size, (3, width + steps), generator=gen)
    mask = torch.ones(3, width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :width - n] = False
    caches = [StaticKVCache.for_model(model.config, batch_size=3, max_len=64,
                                      dtype=torch.float32) for _ in range(2)]
    for cache in caches:
        model(ids[:, :width], attention_mask_BT=mask, cache=cache)
    decoder = CompiledDecoder(model)
    for t in range(width, width + steps):
        ref = model(ids[:, t:t + 1], cache=caches[0])[:, -1]
        out = decoder(ids[:, t:t + 1], caches[1])
        assert (out - ref).abs().max().item() <= 1e-4
    assert caches[1].seq_len == caches[0].seq_len
    for layer in range(model.config.num_hidden_layers):
        end = caches[0].seq_len
        torch.testing.assert_close(caches[1].k[layer][:, :, :end], caches[0].k[layer][:, :, :end])


def test_generate_compiled_equals_eager_greedy(model: MiniCPM4ForCausalLM) -> None:
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20] * 20]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (5, 17, 9)]
    eager = generate(model, prompts, params)
    compiled = generate(model, prompts, params, compile=True)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert [len(o.token_ids) for o in compiled] == [5, 17, 9]


def test_unsupported_models_are_refused() -> None:
    gated = MiniCPM4ForCausalLM(tiny_config(num_hidden_layers=1, attn_use_output_gate=True))
    assert not supports(gated)
    with pytest.raises(ValueError, match="plain dense MiniCPM4"):
        CompiledDecoder(gated)
    from minicpm4.model.config import SparseConfig
    sparse = MiniCPM4ForCausalLM(tiny_config(num_hidden_layers=1, sparse_config=SparseConfig()))
    assert not supports(sparse)  # InfLLM v2 is not in the compiled step: refuse, never go dense
