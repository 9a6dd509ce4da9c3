"""μP-aware AdamW groups (minicpm4/train/optim.py) and OptimConfig validation."""

from __future__ import annotations

import pytest
import torch

from minicpm4.model import mup
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.train.config import OptimConfig
from minicpm4.train.optim import build_optimizer, param_groups
from tests.conftest import tiny_config

M = 4.0  # hidden 128 / dim_model_base 32


def _model(**overrides) -> MiniCPM4ForCausalLM:
    model = MiniCPM4ForCausalLM(tiny_config(dim_model_base=32, **overrides))
    mup.init_model_(model, "mup", seed=0)
    return model


def _by_role(groups: list[dict]) -> dict[str, dict]:
    assert len({g["role"] for g in groups}) == len(groups)
    return {g["role"]: g for g in groups}


@pytest.mark.parametrize("tied", [False, True])
def test_groups_cover_every_parameter_once(tied: bool) -> None:
    model = _model(tie_word_embeddings=tied)
    groups = param_groups(model, OptimConfig())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert len(ids) == len(list(model.parameters()))
    names = [n for g in groups for n in g["param_names"]]
    assert names.count("model.embed_tokens.weight") == 1
    assert ("lm_head.weight" in names) is (not tied)
    assert ("head" in _by_role(groups)) is (not tied)
    for g in groups:
        assert len(g["param_names"]) == len(g["params"])


def test_mup_lr_multipliers_and_weight_decay() -> None:
    groups = _by_role(param_groups(_model(), OptimConfig(lr=0.02, weight_decay=0.1)))
    assert groups["matrix"]["lr_mult"] == pytest.approx(1 / M)
    assert groups["matrix"]["lr"] == pytest.approx(0.02 / M)
    for role in ("embedding", "head", "vector"):
        assert groups[role]["lr_mult"] == 1.0 and groups[role]["lr"] == pytest.approx(0.02)
    assert groups["matrix"]["weight_decay"] == 0.1 and groups["head"]["weight_decay"] == 0.1
    assert groups["vector"]["weight_decay"] == 0.0
    assert groups["embedding"]["weight_decay"] == 0.0
    assert all(n.endswith(("layernorm.weight", "norm.weight"))
               for n in groups["vector"]["param_names"])
    decayed = _by_role(param_groups(_model(), OptimConfig(decay_embeddings=True)))
    assert decayed["embedding"]["weight_decay"] == 0.1


def test_sp_and_literal_mup_multipliers() -> None:
    sp = _by_role(param_groups(_model(), OptimConfig(parametrization="sp")))
    assert all(g["lr_mult"] == 1.0 for g in sp.values())
    lit = _by_role(param_groups(_model(), OptimConfig(embeddings_as_matrices=True)))
    for role in ("embedding", "head", "matrix"):
        assert lit[role]["lr_mult"] == pytest.approx(1 / M)
    assert lit["vector"]["lr_mult"] == 1.0


def test_frozen_parameters_are_left_out() -> None:
    model = _model()
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = _by_role(param_groups(model, OptimConfig()))
    assert "embedding" not in groups
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters())) - 1


@pytest.mark.parametrize("fused", [None, False])
def test_first_adam_step_moves_each_role_by_its_lr(fused: bool | None) -> None:
    """Adam's first update is ±lr per coordinate, so the group LRs reach the weights."""
    model = _model()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0, fused=fused))
    assert isinstance(opt, torch.optim.AdamW)
    assert bool(opt.defaults["fused"]) is (fused is None)  # CPU has a fused kernel
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    roles = mup.param_roles(model)
    for name, p in model.named_parameters():
        step = (p.detach() - before[name]).abs().max().item()
        expected = 1e-3 / M if roles[name] == "matrix" else 1e-3
        assert step == pytest.approx(expected, rel=0.02), (name, step)
    state = opt.state_dict()
    assert [g["role"] for g in state["param_groups"]] == [g["role"] for g in opt.param_groups]
    assert all("lr_mult" in g for g in state["param_groups"])


@pytest.mark.parametrize("field,kwargs", [
    ("lr", {"lr": -1e-3}), ("lr", {"lr": 0.0}), ("lr", {"lr": float("nan")}),
    ("betas", {"betas": (0.9, 1.0)}), ("eps", {"eps": 0.0}),
    ("weight_decay", {"weight_decay": -0.1}), ("grad_clip", {"grad_clip": 0.0}),
    ("parametrization", {"parametrization": "ntk"}), ("fused", {"fused": "yes"}),
    ("decay_embeddings", {"decay_embeddings": 1}),
])
def test_bad_optim_config_names_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs)


def test_optim_config_is_frozen_and_keyword_only() -> None:
    cfg = OptimConfig(grad_clip=None)
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        OptimConfig(1e-3)  # type: ignore[misc]


def test_param_groups_needs_a_model_config() -> None:
    with pytest.raises(ValueError, match="config"):
        param_groups(torch.nn.Linear(2, 2), OptimConfig())
