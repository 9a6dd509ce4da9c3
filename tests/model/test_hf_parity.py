"""Acceptance (issue 2, item 1): logits equal transformers' own LlamaForCausalLM.

MiniCPM4's μP scalars are folded into Llama weights (embedding x scale_emb, o_proj and
down_proj x scale_depth/sqrt(L), lm_head / (hidden/dim_model_base)); LongRoPE maps to
transformers' "longrope" rope type. Prompts are shorter and longer than
original_max_position_embeddings (64 in the tiny config), so both factor sets are checked.
"""

from __future__ import annotations

import pytest
import torch

from minicpm4.model.llama_export import llama_config_dict, llama_state_dict
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")


def folded_llama(model: MiniCPM4ForCausalLM):
    hf_cfg = transformers.LlamaConfig(**llama_config_dict(model.config))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(llama_state_dict(model, model.config), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("length", [17, 64, 65, 150])
def test_logits_match_transformers_llama(length: int, tied: bool) -> None:
    cfg = tiny_config(tie_word_embeddings=tied, initializer_range=0.1)
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg)
    model.init_weights(seed=1)
    model.eval()
    hf = folded_llama(model)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    print(f"length {length} tied {tied}: max |logit diff| = {diff:.2e}, "
          f"max |logit| = {theirs.abs().max().item():.2f}")
    assert diff <= 1e-4


def test_long_factors_really_differ_from_short() -> None:
    """Guard: the parity above is only meaningful if crossing original_max changes the logits."""
    cfg = tiny_config(initializer_range=0.1)
    model = MiniCPM4ForCausalLM(cfg)
    model.init_weights(seed=1)
    ids = torch.randint(0, cfg.vocab_size, (1, 65), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        long = model(ids)[:, :60]
        short = model(ids[:, :60])
    assert (long - short).abs().max() > 1e-3
