"""The bundled demo model (recipes/demo, issue 3): shipped as bf16 safetensors <= 60 MB with
its MTP head, and it has learned English: low perplexity on the opening of the held-out book."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minicpm4 import loading
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import SHARED_DATA, require


def test_bundled_demo_model_is_small_bf16_with_an_mtp_head() -> None:
    folder = loading.BUNDLED_MODEL
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert 0 < size <= 60 * 2**20
    model = MiniCPM4ForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and model.mtp is not None
    assert model.config.vocab_size == 73448


@torch.no_grad()
def test_bundled_demo_model_predicts_held_out_austen() -> None:
    book = require(SHARED_DATA / "gutenberg" / "austen-persuasion.txt")
    model = MiniCPM4ForCausalLM.from_pretrained(loading.BUNDLED_MODEL, dtype="float32").eval()
    tok = loading.load_tokenizer(None, loading.BUNDLED_MODEL)
    ids = torch.tensor([tok.encode(book.read_text(encoding="utf-8")[:12000])[:1025]])
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits[0], ids[0, 1:]).item()
    # recorded in recipes/demo/README.md: 88 over the whole book; an untrained model: ~73,000
    assert math.exp(loss) < 200, loss
