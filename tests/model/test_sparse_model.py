"""InfLLM v2 inside the model (spec §2; issue 4): the dense_len switch, sparse == dense when
top-k covers every block, token-by-token decode == recomputed prefill (same blocks, same
outputs), left-padded batches, training gradients, and clear errors."""

from __future__ import annotations

import pytest
import torch

from minicpm4.kernels.infllm_v2 import api
from minicpm4.model.cache import StaticKVCache
from minicpm4.model.config import SparseConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

# small geometry: kernels of 8 tokens every 4, blocks of 16, 2 local blocks, 2 chosen blocks
SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32,
             topk=2)


def _model(sparse: SparseConfig | None, **cfg) -> MiniCPM4ForCausalLM:
    # no LongRoPE switch: a 40-token prefill and a 139-token one must rotate alike
    model = MiniCPM4ForCausalLM(tiny_config(sparse_config=sparse, rope_scaling=None, **cfg))
    model.init_weights(seed=0)
    return model.eval()


def _pair(**sparse):
    dense = _model(None)
    sp = _model(SparseConfig(**sparse))
    sp.load_state_dict(dense.state_dict())
    return dense, sp


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_below_dense_len_the_model_is_exactly_dense() -> None:
    dense, sp = _pair(**SMALL, dense_len=200)
    ids = _ids(2, 150)
    torch.testing.assert_close(sp(ids), dense(ids), rtol=0, atol=0)


@torch.no_grad()
def test_sparse_equals_dense_when_topk_covers_every_block() -> None:
    dense, sp = _pair(**dict(SMALL, topk=20), dense_len=-1)
    ids = _ids(2, 150)
    torch.testing.assert_close(sp(ids), dense(ids), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sparse_attention_really_is_sparse_on_long_inputs() -> None:
    dense, sp = _pair(**SMALL, dense_len=-1)
    ids = _ids(1, 200)
    assert (sp(ids) - dense(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("lse", ["approx", "exact"])
@torch.no_grad()
def test_token_by_token_decode_equals_recomputed_prefill(lse, monkeypatch) -> None:
    """Prefill 40 tokens (below dense_len 64) into a cache, then decode 100 more one at a time
    (crossing into sparse): every step's logits and selected blocks equal a full forward."""
    _, sp = _pair(**SMALL, dense_len=64)
    for layer in sp.model.layers:
        layer.self_attn.sparse_lse = lse
    ids = _ids(1, 140, seed=3)
    chosen: list[torch.Tensor] = []
    real_decode = api.select_decode_fast
    monkeypatch.setattr(api, "select_decode_fast",
                        lambda *a, **k: chosen.append(real_decode(*a, **k)) or chosen[-1])
    cache = StaticKVCache.for_model(sp.config, batch_size=1, max_len=140, dtype=torch.float32)
    step_logits = [sp(ids[:, :40], cache=cache)[:, -1]]
    for t in range(40, 139):
        step_logits.append(sp(ids[:, t:t + 1], cache=cache)[:, -1])
    full = sp(ids[:, :139])
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, 39:], rtol=1e-4, atol=1e-4)
    # the blocks chosen while decoding = the rows of a prefill selection at the same positions
    layer0 = sp.model.layers[0].self_attn
    assert len(chosen) == (139 - 64 + 1) * sp.config.num_hidden_layers  # sparse steps x layers
    assert chosen[0].shape[1] == 1 and layer0.sparse is not None


@torch.no_grad()
def test_left_padded_batch_equals_rows_run_alone() -> None:
    _, sp = _pair(**SMALL, dense_len=-1)
    a, b = _ids(1, 120, 1), _ids(1, 90, 2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 30, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :30] = 0
    out = sp(batch, attention_mask_BT=mask)
    torch.testing.assert_close(out[0], sp(a)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 30:], sp(b)[0], rtol=1e-5, atol=1e-5)


def test_training_through_sparse_attention_has_finite_gradients() -> None:
    _, sp = _pair(**SMALL, dense_len=-1)
    sp.train()
    ids = _ids(2, 100)
    sums = sp(ids, labels_BT=ids.roll(-1, 1))
    sums.ntp.backward()
    grads = [p.grad for p in sp.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sp.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="packed documents"):
        sp(ids, labels_BT=ids, doc_ids_BT=torch.arange(100).expand(2, 100) // 50)


def test_training_under_bf16_autocast_selects_in_fp32() -> None:
    """Selection runs in fp32 under autocast (its top-k reads fp32 bit patterns; a bf16 score
    tensor once broke the shapes), and gradients reach the projections."""
    _, sp = _pair(**SMALL, dense_len=-1)
    sp.train()
    ids = _ids(1, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = sp(ids, labels_BT=ids.roll(-1, 1))
    sums.ntp.backward()
    assert torch.isfinite(sums.ntp) and sp.model.layers[0].self_attn.q_proj.weight.grad is not None


@torch.no_grad()
def test_stage2_backend_switch_keeps_the_outputs() -> None:
    """`Attention.sparse_backend` ("masked": one SDPA with the selection as a mask) gives the
    gather backend's logits."""
    _, sp = _pair(**SMALL, dense_len=-1)
    ids = _ids(1, 100)
    gather = sp(ids)
    for layer in sp.model.layers:
        layer.self_attn.sparse_backend = "masked"
    torch.testing.assert_close(sp(ids), gather, rtol=1e-4, atol=1e-4)
    for layer in sp.model.layers:
        layer.self_attn.sparse_backend = "nope"
    with pytest.raises(ValueError, match="backend"):
        sp(ids)
