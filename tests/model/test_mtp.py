"""The MTP / EAGLE draft head (model/mtp.py, spec §1.4): definition, shifts, loss, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minicpm4.model import mup
from minicpm4.model.checkpoint import SINGLE_FILE, load_pretrained, save_pretrained
from minicpm4.model.config import ModelConfig
from minicpm4.model.hf import config_from_hf_dict, config_to_hf_dict, load_config, save_config
from minicpm4.model.layers import apply_rotary
from minicpm4.model.mtp import (DEFAULT_MTP_WEIGHT, MTPHead, mtp_loss, ntp_loss,
                                ntp_mtp_loss)
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

IDS = torch.tensor([[5, 17, 300, 2, 99, 511, 0, 42, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]])


def _mtp_model(seed: int = 0, **overrides) -> MiniCPM4ForCausalLM:
    """Tiny model with an MTP head; norms and the fc1 bias perturbed so that they matter."""
    model = MiniCPM4ForCausalLM(tiny_config(num_mtp_layers=1, **overrides))
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") \
                    or name.endswith("norm2.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        model.mtp.fc1.bias.copy_(torch.randn(model.mtp.fc1.bias.shape, generator=gen) * 0.1)
    return model.eval()


# --------------------------------------------------------------------------- config
def test_config_field_default_and_validation() -> None:
    assert ModelConfig().num_mtp_layers == 0
    assert tiny_config(num_mtp_layers=1).num_mtp_layers == 1
    for bad in (2, -1, True, 1.0):
        with pytest.raises(ValueError, match="num_mtp_layers"):
            tiny_config(num_mtp_layers=bad)


def test_config_json_round_trip(tmp_path) -> None:
    cfg = tiny_config(num_mtp_layers=1)
    raw = config_to_hf_dict(cfg)
    assert raw["num_mtp_layers"] == 1
    assert config_from_hf_dict(raw) == cfg
    save_config(cfg, tmp_path)
    assert load_config(tmp_path) == cfg
    # Absent means 0, and a model without MTP writes no key (HF configs stay unchanged).
    plain = config_to_hf_dict(tiny_config())
    assert "num_mtp_layers" not in plain
    assert config_from_hf_dict(plain).num_mtp_layers == 0
    assert config_from_hf_dict(plain).extra == {}
    with pytest.raises(ValueError, match="num_mtp_layers"):
        config_from_hf_dict(dict(raw, num_mtp_layers="1"))
    with pytest.raises(ValueError, match="num_mtp_layers"):
        config_from_hf_dict(dict(raw, num_mtp_layers=3))


def test_parameter_count_includes_the_head() -> None:
    for tied in (False, True):
        cfg = tiny_config(num_mtp_layers=1, tie_word_embeddings=tied)
        model = MiniCPM4ForCausalLM(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- model structure
def test_no_head_without_config_and_trunk_is_unchanged() -> None:
    plain = MiniCPM4ForCausalLM(tiny_config())
    plain.init_weights(seed=3)
    assert plain.mtp is None
    assert not any(n.startswith("mtp.") for n in plain.state_dict())
    with pytest.raises(ValueError, match="num_mtp_layers"):
        plain.forward_with_mtp(IDS)
    # Same seed with a head: identical trunk weights and logits (the head inits last).
    with_head = MiniCPM4ForCausalLM(tiny_config(num_mtp_layers=1))
    with_head.init_weights(seed=3)
    head_state = with_head.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, head_state[name]), name
    with torch.no_grad():
        logits, _ = with_head.forward_with_mtp(IDS)
        assert torch.equal(plain(IDS), with_head(IDS))
        assert torch.equal(logits, plain(IDS))


def test_parameter_names_and_init() -> None:
    model = MiniCPM4ForCausalLM(tiny_config(num_mtp_layers=1))
    model.init_weights(seed=0)
    names = {n for n in model.state_dict() if n.startswith("mtp.")}
    layer = "mtp.layers.0."
    assert names == {
        "mtp.input_norm1.weight", "mtp.input_norm2.weight", "mtp.fc1.weight", "mtp.fc1.bias",
        "mtp.fc2.weight", "mtp.norm.weight",
        *(layer + f"self_attn.{p}_proj.weight" for p in "qkvo"),
        *(layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"}
    assert model.mtp.fc2.bias is None
    assert torch.equal(model.mtp.fc1.bias, torch.zeros(128))
    assert torch.equal(model.mtp.norm.weight, torch.ones(128))
    std = mup.init_std(model.config, matrix=True)
    assert abs(model.mtp.fc1.weight.std().item() - std) < 0.1 * std


def test_residual_scale_is_that_of_layer_L_plus_1() -> None:
    model = MiniCPM4ForCausalLM(tiny_config(num_mtp_layers=1))
    assert model.mtp.layers[0].residual_scale == pytest.approx(1.4 / math.sqrt(5))
    assert model.model.layers[0].residual_scale == pytest.approx(1.4 / math.sqrt(4))
    with torch.device("meta"):
        head = MTPHead(ModelConfig.minicpm4_8b().replace(num_mtp_layers=1))
    assert head.layers[0].residual_scale == pytest.approx(1.4 / math.sqrt(33))  # spec §1.4


def test_fc1_plus_fc2_is_a_linear_on_the_concatenation() -> None:
    head = _mtp_model(seed=1).mtp
    gen = torch.Generator().manual_seed(0)
    h_BTD, emb_BTD = torch.randn(2, 5, 128, generator=gen), torch.randn(2, 5, 128, generator=gen)
    fused = head.concat_linear()
    assert tuple(fused.weight.shape) == (128, 256)
    with torch.no_grad():
        expected = fused(torch.cat([head.input_norm1(emb_BTD), head.input_norm2(h_BTD)], -1))
        torch.testing.assert_close(head.fuse(h_BTD, emb_BTD), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- forward and shifts
def test_shapes_and_dtype() -> None:
    model = _mtp_model()
    with torch.no_grad():
        logits, mtp_logits = model.forward_with_mtp(IDS)
    assert logits.shape == (2, 9, 512) and mtp_logits.shape == (2, 8, 512)
    assert logits.dtype == mtp_logits.dtype == torch.float32
    with pytest.raises(ValueError, match="2 tokens"):
        model.forward_with_mtp(IDS[:, :1])


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _manual_mtp_logits(model: MiniCPM4ForCausalLM, ids: torch.Tensor, t: int) -> torch.Tensor:
    """mtp logits of row 0, position t, from the definition of spec §1.4 (one query)."""
    cfg, head, layer = model.config, model.mtp, model.mtp.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    h_TD = model.model(ids[:1])[0, :t + 1]                       # trunk h_0..h_t
    emb_TD = model.model.embed_tokens.weight[ids[0, 1:t + 2]] * cfg.scale_emb
    u_TD = F.linear(_rms(emb_TD, head.input_norm1.weight), head.fc1.weight, head.fc1.bias) \
        + F.linear(_rms(h_TD, head.input_norm2.weight), head.fc2.weight)
    alpha = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers + 1)
    x_TD = _rms(u_TD, layer.input_layernorm.weight)
    hd, n, k = cfg.head_dim_, cfg.num_attention_heads, cfg.num_key_value_heads
    q_NTH = F.linear(x_TD, attn.q_proj.weight).view(t + 1, n, hd).transpose(0, 1)
    k_KTH = F.linear(x_TD, attn.k_proj.weight).view(t + 1, k, hd).transpose(0, 1)
    v_KTH = F.linear(x_TD, attn.v_proj.weight).view(t + 1, k, hd).transpose(0, 1)
    cos, sin = model.model.rotary_emb(torch.arange(t + 1).view(1, -1))
    q_NTH = apply_rotary(q_NTH[None], cos, sin)[0]
    k_KTH = apply_rotary(k_KTH[None], cos, sin)[0]
    heads = []
    for i in range(n):
        kv = i // (n // k)
        scores_T = k_KTH[kv] @ q_NTH[i, t] / math.sqrt(hd)     # query t sees keys 0..t
        heads.append(torch.softmax(scores_T, dim=0) @ v_KTH[kv])
    y_D = u_TD[t] + alpha * F.linear(torch.cat(heads), attn.o_proj.weight)
    z_D = _rms(y_D, layer.post_attention_layernorm.weight)
    y_D = y_D + alpha * F.linear(F.silu(F.linear(z_D, mlp.gate_proj.weight))
                                 * F.linear(z_D, mlp.up_proj.weight), mlp.down_proj.weight)
    out_D = _rms(y_D, head.norm.weight)
    return F.linear(out_D * cfg.dim_model_base / cfg.hidden_size, model.lm_head.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_manual_definition(tied: bool) -> None:
    model = _mtp_model(seed=2, tie_word_embeddings=tied)
    with torch.no_grad():
        _, mtp_logits = model.forward_with_mtp(IDS)
        for t in range(IDS.shape[1] - 1):
            torch.testing.assert_close(mtp_logits[0, t], _manual_mtp_logits(model, IDS, t),
                                       rtol=1e-4, atol=1e-4)


def test_column_t_sees_tokens_up_to_t_plus_1_only() -> None:
    """mtp[:, t] is a function of x_0..x_{t+1}: changing x_k changes columns >= k-1 only."""
    model = _mtp_model(seed=3)
    with torch.no_grad():
        _, base = model.forward_with_mtp(IDS)
        for k in range(1, IDS.shape[1]):
            ids = IDS.clone()
            ids[:, k] = (ids[:, k] + 1) % 512
            _, changed = model.forward_with_mtp(ids)
            assert torch.equal(changed[:, :k - 1], base[:, :k - 1]), k
            assert (changed[:, k - 1] - base[:, k - 1]).abs().max() > 1e-4, k


def test_left_padding_matches_unpadded_rows() -> None:
    model = _mtp_model(seed=4)
    pad = 3
    ids = torch.cat([torch.full((1, pad), 2), IDS[1:]], dim=1)
    ids = torch.cat([ids, torch.cat([IDS[:1], IDS[:1, :pad]], dim=1)])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    with torch.no_grad():
        logits, mtp_logits = model.forward_with_mtp(ids, attention_mask_BT=mask)
        ref_logits, ref_mtp = model.forward_with_mtp(IDS[1:])
    torch.testing.assert_close(logits[0, pad:], ref_logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mtp_logits[0, pad:], ref_mtp[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(mtp_logits).all()


# --------------------------------------------------------------------------- loss
def test_loss_targets_are_shifted_by_one_and_two() -> None:
    labels = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    onehot = F.one_hot(labels, 10).float() * 50.0          # column t "predicts" labels[t]
    ntp_logits = torch.cat([onehot[:, 1:], onehot[:, :1]], dim=1)   # column t -> labels[t+1]
    mtp_logits = onehot[:, 2:]                                       # column t -> labels[t+2]
    mtp_logits = torch.cat([mtp_logits, onehot[:, :1]], dim=1)       # T-1 columns
    assert ntp_loss(ntp_logits, labels) < 1e-6
    assert mtp_loss(mtp_logits, labels) < 1e-6
    assert ntp_loss(onehot, labels) > 10                             # unshifted is wrong
    assert mtp_loss(ntp_logits[:, :-1], labels) > 10                 # shift by one is wrong
    total, ntp, mtp = ntp_mtp_loss(ntp_logits + 1, mtp_logits.roll(1, 1), labels, lam=0.5)
    assert total == pytest.approx(ntp.item() + 0.5 * mtp.item())
    with pytest.raises(ValueError, match="mtp_logits"):
        mtp_loss(onehot, labels)


def test_loss_ignore_index_and_empty_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    masked = labels.clone()
    masked[1] = -100
    expected = F.cross_entropy(logits[:1, :-2].reshape(-1, 11), labels[0, 2:])
    torch.testing.assert_close(mtp_loss(logits[:, :-1], masked), expected)
    empty = mtp_loss(logits[:, :-1], torch.full_like(labels, -100))
    assert empty.item() == 0.0
    empty.backward()
    assert DEFAULT_MTP_WEIGHT == 0.3


def test_mtp_loss_gradient_reaches_shared_embedding_and_head() -> None:
    model = _mtp_model(seed=5).train()
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    _, mtp_logits = model.forward_with_mtp(ids)
    mtp_loss(mtp_logits, ids).backward()
    emb_grad = model.model.embed_tokens.weight.grad
    # Scored columns are t <= T-3. Token 16 (= x_{T-2}) reaches them only as the head's
    # Emb(x_{t+1}) input of column T-3 (in the trunk it only shapes h_{T-2}, h_{T-1}, which
    # feed unscored columns), so its untied embedding row learns through the head alone.
    assert emb_grad[16].abs().sum() > 0
    assert emb_grad[17].abs().sum() == 0                      # x_{T-1} has no scored use
    assert emb_grad[10].abs().sum() > 0                       # via h_0 through the trunk
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.mtp.parameters())


def test_training_reduces_both_losses() -> None:
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny_config(num_mtp_layers=1))
    model.init_weights(seed=0)
    model.train()
    motif = torch.randperm(512, generator=torch.Generator().manual_seed(1))[:12]
    ids = motif.repeat(5)[None].repeat(2, 1)                  # [2, 60], a repeated sequence
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = []
    for _ in range(30):
        logits, mtp_logits = model.forward_with_mtp(ids)
        total, ntp, mtp = ntp_mtp_loss(logits, mtp_logits, ids)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append((ntp.item(), mtp.item()))
    (ntp0, mtp0), (ntp1, mtp1) = history[0], history[-1]
    print(f"ntp {ntp0:.3f} -> {ntp1:.3f}, mtp {mtp0:.3f} -> {mtp1:.3f}")
    assert ntp1 < 0.5 * ntp0 and mtp1 < 0.5 * mtp0


# --------------------------------------------------------------------------- checkpoints
def _assert_same(a: MiniCPM4ForCausalLM, b: MiniCPM4ForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    with torch.no_grad():
        for x, y in zip(a.forward_with_mtp(IDS), b.forward_with_mtp(IDS)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, 200_000])
def test_round_trip_bit_exact_with_head(tmp_path, tied: bool, shard: int | None) -> None:
    model = _mtp_model(seed=6, tie_word_embeddings=tied)
    save_pretrained(model, tmp_path, max_shard_bytes=shard)
    assert json.loads((tmp_path / "config.json").read_text())["num_mtp_layers"] == 1
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.mtp is not None
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    _assert_same(model, loaded)
    if shard is None:
        names = set(load_file(tmp_path / SINGLE_FILE))
        assert "mtp.fc1.bias" in names and "mtp.layers.0.mlp.up_proj.weight" in names
        assert ("lm_head.weight" in names) != tied


def test_head_tensors_without_config_field_are_unexpected(tmp_path) -> None:
    save_pretrained(_mtp_model(seed=7), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["num_mtp_layers"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unexpected.*mtp\.fc1\.bias.*num_mtp_layers"):
        load_pretrained(tmp_path)


def test_config_field_without_head_tensors_is_missing(tmp_path) -> None:
    plain = MiniCPM4ForCausalLM(tiny_config())
    plain.init_weights(seed=8)
    save_pretrained(plain, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, num_mtp_layers=1)))
    with pytest.raises(ValueError, match=r"missing.*mtp\..*num_mtp_layers"):
        load_pretrained(tmp_path)


def test_one_missing_head_tensor_is_named(tmp_path) -> None:
    save_pretrained(_mtp_model(seed=9), tmp_path)
    state = load_file(tmp_path / SINGLE_FILE)
    del state["mtp.layers.0.self_attn.k_proj.weight"]
    save_file(state, tmp_path / SINGLE_FILE)
    with pytest.raises(ValueError, match=r"missing.*mtp\.layers\.0\.self_attn\.k_proj\.weight"):
        load_pretrained(tmp_path)
