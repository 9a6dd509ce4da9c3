"""μP rules (minicpm4/model/mup.py): roles, init std per role, LR multipliers, forward scalars,
and a small coordinate check (anchors Part B §1.4, §1.6)."""

from __future__ import annotations

import math

import pytest
import torch

from minicpm4.model import mup
from minicpm4.model.config import ModelConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

L = 4  # tiny_config layers


def _model(**overrides) -> MiniCPM4ForCausalLM:
    return MiniCPM4ForCausalLM(tiny_config(**overrides))


def test_forward_scalars_of_the_8b() -> None:
    cfg = ModelConfig.minicpm4_8b()
    assert mup.width_multiplier(cfg) == 16
    assert mup.embedding_multiplier(cfg) == 12
    assert mup.residual_multiplier(cfg) == pytest.approx(1.4 / math.sqrt(32))
    assert mup.residual_multiplier(cfg, 33) == pytest.approx(1.4 / math.sqrt(33))
    assert mup.logit_multiplier(cfg) == 1 / 16
    assert mup.init_std(cfg, matrix=True) == pytest.approx(0.1 / 4)
    assert mup.init_std(cfg, matrix=False) == 0.1
    fm = mup.forward_multipliers(cfg, "mup")
    assert (fm.embedding, fm.residual, fm.logit) == (12.0, mup.residual_multiplier(cfg), 1 / 16)
    assert mup.forward_multipliers(cfg, "sp") == mup.ForwardMultipliers(1.0, 1.0, 1.0)


def test_roles_untied() -> None:
    roles = mup.param_roles(_model())
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert roles["lm_head.weight"] == "head"
    for i in range(L):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert roles[f"model.layers.{i}.self_attn.{proj}.weight"] == "matrix"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert roles[f"model.layers.{i}.mlp.{proj}.weight"] == "matrix"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert roles[f"model.layers.{i}.{norm}.weight"] == "vector"
    assert roles["model.norm.weight"] == "vector"
    counts = {r: list(roles.values()).count(r) for r in mup.ROLES}
    assert counts == {"embedding": 1, "head": 1, "matrix": 7 * L, "vector": 2 * L + 1}


def test_roles_tied_and_output_gate() -> None:
    model = _model(tie_word_embeddings=True, attn_use_output_gate=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    roles = mup.param_roles(model)
    assert "lm_head.weight" not in roles  # the shared tensor is reported once
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert "head" not in roles.values()
    assert roles["model.layers.0.self_attn.o_gate.weight"] == "matrix"
    assert len(roles) == len(list(model.parameters()))


def test_role_errors() -> None:
    with pytest.raises(ValueError, match="blocks.conv"):
        mup.param_role("blocks.conv", torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="embed_tokens"):
        mup.param_role("model.embed_tokens.weight", torch.zeros(8))
    with pytest.raises(ValueError, match="role"):
        mup.lr_multiplier(tiny_config(), "bias")
    with pytest.raises(ValueError, match="parametrization"):
        mup.role_init_std(tiny_config(), "matrix", "ntk")
    with pytest.raises(ValueError, match="parametrization"):
        mup.config_for(tiny_config(), "SP")


def test_rule_table() -> None:
    cfg = tiny_config(hidden_size=512, num_attention_heads=32, dim_model_base=128,
                      initializer_range=0.1)  # m = 4
    s = 0.1
    assert mup.role_init_std(cfg, "matrix", "mup") == pytest.approx(s / 2)
    assert mup.lr_multiplier(cfg, "matrix", "mup") == pytest.approx(1 / 4)
    for role in ("embedding", "head"):
        assert mup.role_init_std(cfg, role, "mup") == s
        assert mup.lr_multiplier(cfg, role, "mup") == 1.0
        assert mup.role_init_std(cfg, role, "mup", embeddings_as_matrices=True) == \
            pytest.approx(s / 2)
        assert mup.lr_multiplier(cfg, role, "mup", embeddings_as_matrices=True) == \
            pytest.approx(1 / 4)
    assert mup.lr_multiplier(cfg, "vector", "mup") == 1.0
    for role in ("embedding", "head", "matrix"):
        assert mup.role_init_std(cfg, role, "sp") == s
        assert mup.lr_multiplier(cfg, role, "sp", embeddings_as_matrices=True) == 1.0


@pytest.mark.parametrize("parametrization,tied,as_matrices", [
    ("mup", False, False), ("mup", True, False), ("sp", False, False), ("mup", False, True)])
def test_init_std_per_role_is_statistically_right(parametrization, tied, as_matrices) -> None:
    cfg = tiny_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                      num_attention_heads=32, dim_model_base=128, initializer_range=0.1,
                      tie_word_embeddings=tied)
    model = MiniCPM4ForCausalLM(cfg)
    roles = mup.init_model_(model, parametrization, seed=3, embeddings_as_matrices=as_matrices)
    m = 4.0
    for name, p in model.named_parameters():
        role = roles[name]
        if role == "vector":
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        scaled = parametrization == "mup" and (role == "matrix" or as_matrices)
        target = 0.1 / math.sqrt(m) if scaled else 0.1
        std = p.float().std().item()
        assert abs(std / target - 1) < 0.10, (name, role, std)
        assert abs(p.float().mean().item()) < 0.1 * target, name
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_init_is_seeded_and_dtype_independent() -> None:
    a, b, c = _model(), _model(), _model()
    mup.init_model_(a, "mup", seed=7)
    mup.init_model_(b.to(torch.bfloat16), "mup", seed=7)
    mup.init_model_(c, "mup", seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa.to(torch.bfloat16), pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name


def test_init_rejects_meta_and_configless_models() -> None:
    with torch.device("meta"):
        model = _model()
    with pytest.raises(ValueError, match="meta"):
        mup.init_model_(model, "mup", seed=0)
    with pytest.raises(ValueError, match="config"):
        mup.init_model_(torch.nn.Linear(2, 2), "mup", seed=0)


def test_sp_config_has_unit_forward_scalars() -> None:
    cfg = tiny_config()
    assert mup.config_for(cfg, "mup") is cfg
    sp = mup.config_for(cfg, "sp")
    model = MiniCPM4ForCausalLM(sp)
    assert model.model.embed_scale == 1.0 and model.logit_scale == 1.0
    assert all(layer.residual_scale == 1.0 for layer in model.model.layers)
    assert mup.forward_multipliers(sp, "mup") == mup.forward_multipliers(cfg, "sp")
    assert sp.hidden_size == cfg.hidden_size and sp.num_hidden_layers == cfg.num_hidden_layers


def _coord(width: int, parametrization: str, as_matrices: bool, steps: int = 4) -> float:
    """Mean |last block output| after `steps` AdamW steps at lr 1e-2 (anchors §1.6 recipe)."""
    from minicpm4.train.config import OptimConfig
    from minicpm4.train.optim import build_optimizer
    cfg = tiny_config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=width // 16, num_key_value_heads=width // 64,
                      dim_model_base=64)
    cfg = mup.config_for(cfg, parametrization)
    model = MiniCPM4ForCausalLM(cfg)
    mup.init_model_(model, parametrization, seed=0, embeddings_as_matrices=as_matrices)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0,
                                             parametrization=parametrization,
                                             embeddings_as_matrices=as_matrices))
    seen: list[float] = []
    model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: seen.append(out.abs().mean().item()))
    ids = torch.randint(0, cfg.vocab_size, (8, 33), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model(ids[:, :-1])
    return seen[-1]


def test_coordinate_check_mup_flat_sp_blows_up(one_thread) -> None:
    """μP keeps the block output width-independent after a few large-LR steps; SP grows with
    width; the literal "every 2-D tensor" reading (embeddings as matrices) shrinks with it."""
    mup_small, mup_wide = _coord(64, "mup", False), _coord(256, "mup", False)
    assert max(mup_small, mup_wide) / min(mup_small, mup_wide) < 1.3
    sp_small, sp_wide = _coord(64, "sp", False), _coord(256, "sp", False)
    assert sp_wide / sp_small > 5
    lit_wide = _coord(256, "mup", True)
    assert mup_small / lit_wide > 1.8
