"""train/step.py: loss normalisation over micro-batches, clipping, the schedule, bf16 autocast,
the MTP hook and evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minicpm4.data.loader import TokenLoader
from minicpm4.model.mup import init_model_
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.train.config import OptimConfig, ScheduleConfig
from minicpm4.train.optim import build_optimizer
from minicpm4.train.schedule import WSDSchedule
from minicpm4.train.step import evaluate, train_step
from tests.train._fixtures import tiny_model_config, write_shards

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("step") / "data")


def _setup(cfg=None, *, grad_clip=1.0):
    model = MiniCPM4ForCausalLM(cfg or tiny_model_config())
    init_model_(model, "mup", seed=0)
    optim_cfg = OptimConfig(lr=1e-2, grad_clip=grad_clip, fused=False)
    opt = build_optimizer(model, optim_cfg)
    sched = WSDSchedule(ScheduleConfig(warmup_steps=0, total_steps=10, decay_fraction=0.0), 1e-2)
    return model.train(), opt, sched


def _batches(shards, n, b):
    loader = TokenLoader(shards, 32, b, seed=0)
    return [next(loader) for _ in range(n)]


def _cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_loss_is_the_global_token_mean_and_accumulation_matches_one_big_batch(shards) -> None:
    micro = _batches(shards, 2, 3)
    whole = _cat(micro)
    assert int((whole["labels"] == -100).sum()) > 0  # boundaries make per-row counts differ
    model_a, opt_a, sched_a = _setup()
    model_b, opt_b, sched_b = _setup()
    with torch.no_grad():
        logits = model_a(whole["input_ids"], positions_BT=whole["positions"],
                         doc_ids_BT=whole["doc_ids"])
        expect = F.cross_entropy(logits.flatten(0, 1), whole["labels"].flatten()).item()
    one = train_step(model_a, opt_a, sched_a, [whole], step=3, device=CPU)
    two = train_step(model_b, opt_b, sched_b, micro, step=3, device=CPU)
    assert one.loss == pytest.approx(expect, rel=1e-6)
    assert two.loss == pytest.approx(one.loss, rel=1e-6)
    assert two.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
    assert one.num_targets == int((whole["labels"] != -100).sum())
    assert one.num_tokens == whole["input_ids"].numel() == two.num_tokens
    # the (clipped) gradients the optimizer saw are the same; the weights after AdamW are not
    # compared: Adam's g / sqrt(v) turns 1e-9 gradient differences of tiny entries into O(lr)
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        scale = float(pa.grad.abs().max())
        torch.testing.assert_close(pb.grad / scale, pa.grad / scale, rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_schedule_drives_the_lr_and_clip_bounds_the_update(shards) -> None:
    model, opt, sched = _setup(grad_clip=1e-3)
    batch = _batches(shards, 1, 2)
    m = train_step(model, opt, sched, batch, step=0, device=CPU, grad_clip=1e-3)
    assert m.lr == sched.lr(0)
    assert {g["lr"] for g in opt.param_groups} == {1e-2 * g["lr_mult"] for g in opt.param_groups}
    assert m.grad_norm > 1e-3  # reported before clipping
    clipped = torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_bf16_autocast_on_cpu_is_close_to_fp32(shards) -> None:
    batch = _batches(shards, 1, 2)
    model, opt, sched = _setup()
    ref = copy.deepcopy(model)
    m16 = train_step(model, opt, sched, batch, step=1, device=CPU, dtype="bfloat16")
    opt32 = build_optimizer(ref, OptimConfig(lr=1e-2, fused=False))
    m32 = train_step(ref, opt32, sched, batch, step=1, device=CPU)
    assert model.lm_head.weight.dtype == torch.float32  # master weights stay fp32
    assert abs(m16.loss - m32.loss) < 0.05 and math.isfinite(m16.grad_norm)


def test_bad_input_is_a_value_error(shards) -> None:
    model, opt, sched = _setup()
    with pytest.raises(ValueError, match="at least one micro-batch"):
        train_step(model, opt, sched, [], step=0, device=CPU)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        train_step(model, opt, sched, _batches(shards, 1, 1), step=0, device=CPU, dtype="float16")


def test_evaluate_reports_loss_and_perplexity(shards) -> None:
    model, _, _ = _setup()
    batches = _batches(shards, 2, 2)
    out = evaluate(model.train(), batches, device=CPU)
    assert model.training  # mode restored
    whole = _cat(batches)
    with torch.no_grad():
        logits = model(whole["input_ids"], positions_BT=whole["positions"],
                       doc_ids_BT=whole["doc_ids"])
    expect = F.cross_entropy(logits.flatten(0, 1), whole["labels"].flatten()).item()
    assert out["loss"] == pytest.approx(expect, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(expect), rel=1e-6)


def test_mtp_lambda_adds_the_mtp_loss(shards) -> None:
    mtp = pytest.importorskip("minicpm4.model.mtp")
    cfg = tiny_model_config(num_mtp_layers=1)
    model, opt, sched = _setup(cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "positions": torch.arange(16).expand(2, 16), "doc_ids": torch.zeros(2, 16)}
    with torch.no_grad():
        logits, mtp_logits = model.forward_with_mtp(batch["input_ids"])
        ntp = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()
        mtp_ref = mtp.mtp_loss(mtp_logits, batch["input_ids"]).item()
    m = train_step(model, opt, sched, [batch], step=1, device=CPU, mtp_lambda=0.3)
    assert m.ntp_loss == pytest.approx(ntp, rel=1e-6)
    assert m.mtp_loss == pytest.approx(mtp_ref, rel=1e-6)
    assert m.loss == pytest.approx(ntp + 0.3 * mtp_ref, rel=1e-6)
    assert model.mtp.fc1.weight.grad is not None
