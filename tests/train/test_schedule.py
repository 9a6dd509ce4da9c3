"""WSD schedule (minicpm4/train/schedule.py) and ScheduleConfig validation."""

from __future__ import annotations

import json
import math

import pytest

from minicpm4.model import mup
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.train.config import OptimConfig, ScheduleConfig
from minicpm4.train.optim import build_optimizer
from minicpm4.train.schedule import WSDSchedule
from tests.conftest import tiny_config

R = 0.1


def _sched(decay_type: str = "exponential", **kw) -> WSDSchedule:
    args = dict(warmup_steps=10, total_steps=100, decay_fraction=0.2, decay_type=decay_type,
                min_lr_ratio=R)
    args.update(kw)
    return WSDSchedule(ScheduleConfig(**args), base_lr=0.01)


@pytest.mark.parametrize("decay_type,quarter", [
    ("exponential", R ** 0.25), ("linear", 1 - (1 - R) * 0.25),
    ("cosine", R + (1 - R) * 0.5 * (1 + math.cos(math.pi / 4)))])
def test_key_steps(decay_type: str, quarter: float) -> None:
    s = _sched(decay_type)
    assert s.cfg.decay_steps == 20 and s.cfg.decay_start == 80
    assert s.lr_factor(0) == 0.0
    assert s.lr_factor(5) == pytest.approx(0.5)
    assert s.lr_factor(10) == 1.0
    assert s.lr_factor(50) == 1.0 and s.lr_factor(80) == 1.0
    assert s.lr_factor(85) == pytest.approx(quarter)
    assert R < s.lr_factor(99) < s.lr_factor(98)  # one decay step short of the floor
    assert s.lr_factor(100) == pytest.approx(R, abs=1e-12)
    assert s.lr_factor(10_000) == pytest.approx(R, abs=1e-12)
    warm = [s.lr_factor(i) for i in range(11)]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    decay = [s.lr_factor(i) for i in range(80, 101)]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert s.lr(85) == pytest.approx(0.01 * quarter)


def test_exponential_is_minicpm_half_life_form() -> None:
    s = _sched("exponential")
    half_life = 20 * math.log(2) / math.log(1 / R)
    for step in range(80, 101):
        assert s.lr_factor(step) == pytest.approx(0.5 ** ((step - 80) / half_life))


def test_no_warmup_no_decay_and_all_decay() -> None:
    assert _sched(warmup_steps=0).lr_factor(0) == 1.0
    flat = _sched(decay_fraction=0.0)
    assert [flat.lr_factor(i) for i in (10, 99, 100, 500)] == [1.0] * 4
    full = _sched("linear", warmup_steps=0, decay_fraction=1.0, min_lr_ratio=0.0)
    assert full.lr_factor(0) == 1.0 and full.lr_factor(50) == pytest.approx(0.5)
    assert full.lr_factor(100) == 0.0


def test_apply_sets_group_lrs_with_mup_multipliers() -> None:
    model = MiniCPM4ForCausalLM(tiny_config(dim_model_base=32))
    opt = build_optimizer(model, OptimConfig(lr=0.01))
    s = _sched("cosine")
    for step in (0, 5, 50, 90):
        factor = s.apply(opt, step)
        assert factor == s.lr_factor(step) and s.last_step == step
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(0.01 * g["lr_mult"] * factor)
    assert {g["lr_mult"] for g in opt.param_groups} == {1.0, 0.25}
    assert mup.lr_multiplier(model.config, "matrix") == 0.25


def test_state_round_trip() -> None:
    s = _sched("linear")
    s.apply(build_optimizer(MiniCPM4ForCausalLM(tiny_config()), OptimConfig()), 37)
    state = json.loads(json.dumps(s.state_dict()))
    other = WSDSchedule(ScheduleConfig(warmup_steps=0, total_steps=5), base_lr=1.0)
    other.load_state_dict(state)
    assert other.cfg == s.cfg and other.base_lr == s.base_lr and other.last_step == 37
    assert [other.lr_factor(i) for i in range(120)] == [s.lr_factor(i) for i in range(120)]
    assert other.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="last_step"):
        other.load_state_dict({**state, "last_step": -3})
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"config": state["config"]})
    with pytest.raises(ValueError, match="decay_type"):
        other.load_state_dict({**state, "config": {**state["config"], "decay_type": "step"}})


@pytest.mark.parametrize("field,kwargs", [
    ("decay_fraction", {"decay_fraction": -0.1}), ("decay_fraction", {"decay_fraction": 1.5}),
    ("decay_type", {"decay_type": "step"}), ("min_lr_ratio", {"min_lr_ratio": 1.5}),
    ("min_lr_ratio", {"min_lr_ratio": 0.0}),  # exponential can't reach 0
    ("total_steps", {"total_steps": 0}), ("warmup_steps", {"warmup_steps": -1}),
    ("warmup_steps", {"warmup_steps": 90}),  # 90 warmup + 20 decay > 100
])
def test_bad_schedule_config_names_the_field(field: str, kwargs: dict) -> None:
    args = dict(warmup_steps=10, total_steps=100, decay_fraction=0.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        ScheduleConfig(**args)


def test_bad_schedule_inputs() -> None:
    assert ScheduleConfig(warmup_steps=0, total_steps=10, decay_type="linear",
                          min_lr_ratio=0.0).min_lr_ratio == 0.0
    with pytest.raises(ValueError, match="base_lr"):
        WSDSchedule(ScheduleConfig(warmup_steps=0, total_steps=10), base_lr=-1e-3)
    with pytest.raises(ValueError, match="step"):
        _sched().lr_factor(-1)
