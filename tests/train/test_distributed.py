"""`minicpm4 train` under torchrun with 2 gloo ranks (DDP and FSDP2) reproduces the
single-process run of the same global batch (anchors Part B §2: CPU CI can test DDP/FSDP2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.train import checkpoint as ckpt
from tests.train._fixtures import free_port, read_jsonl, write_model_config, write_shards

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _args(root: Path, run: str, batch: int, *extra: str) -> list[str]:
    return ["-m", "minicpm4", "train", "--model-config", str(root / "cfg"),
            "--data", str(root / "data"), "--eval-data", str(root / "eval"),
            "--run-dir", str(root / run), "--steps", "5", "--seq-len", "32",
            "--batch-size", str(batch), "--warmup-steps", "1", "--eval-interval", "5",
            "--eval-batches", "2", "--checkpoint-interval", "3", "--device", "cpu", *extra]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]


def _torchrun(root: Path, run: str, strategy: str, *extra: str) -> None:
    _run(["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
          *_args(root, run, 2, "--distributed", strategy, *extra)[1:]])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    write_shards(root / "data")
    write_shards(root / "eval", seed=1, num_docs=20)
    write_model_config(root / "cfg")
    _run(_args(root, "single", 4))  # 1 process x 4 rows = 2 ranks x 2 rows
    return root


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == kind]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(single: Path, strategy: str) -> None:
    _torchrun(single, strategy, strategy)
    ref, got = _records(single / "single", "train"), _records(single / strategy, "train")
    assert len(got) == len(ref) == 5
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (strategy, a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
        assert a["num_tokens"] == b["num_tokens"] and a["num_targets"] == b["num_targets"]
    ev_ref, ev = _records(single / "single", "eval"), _records(single / strategy, "eval")
    assert abs(ev_ref[0]["loss"] - ev[0]["loss"]) < 1e-5
    # the gathered full checkpoint equals the single-process weights; rank 0 wrote one RNG/rank
    a = MiniCPM4ForCausalLM.from_pretrained(ckpt.latest(single / "single") / "model")
    b = MiniCPM4ForCausalLM.from_pretrained(ckpt.latest(single / strategy) / "model")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)
    assert len(ckpt.load_trainer_state(ckpt.latest(single / strategy))["rng"]) == 2


def test_fsdp_run_resumes_exactly_from_its_checkpoint(single: Path) -> None:
    run = single / "fsdp-resume"
    _torchrun(single, "fsdp-resume", "fsdp", "--stop-after", "4")  # "killed" after step 4
    assert ckpt.latest(run).name == "step-00000003"
    assert len(_records(run, "train")) == 4
    _torchrun(single, "fsdp-resume", "fsdp", "--resume")
    full = single / "fsdp"
    if not (full / "metrics.jsonl").is_file():
        _torchrun(single, "fsdp", "fsdp")
    assert [r["loss"] for r in _records(run, "train")][3:] == \
        [r["loss"] for r in _records(full, "train")][3:]


def test_fsdp_with_the_mtp_head_matches_one_process(single: Path) -> None:
    pytest.importorskip("minicpm4.model.mtp")
    write_model_config(single / "cfg-mtp", num_mtp_layers=1)
    mtp = ("--model-config", str(single / "cfg-mtp"), "--mtp-lambda", "0.3")
    _run(_args(single, "single-mtp", 4, *mtp))
    _torchrun(single, "fsdp-mtp", "fsdp", *mtp)
    ref, got = _records(single / "single-mtp", "train"), _records(single / "fsdp-mtp", "train")
    assert len(ref) == len(got) == 5 and all("mtp_loss" in r for r in ref + got)
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["mtp_loss"] - b["mtp_loss"]) < 1e-5
    model = MiniCPM4ForCausalLM.from_pretrained(ckpt.latest(single / "fsdp-mtp") / "model")
    assert model.mtp is not None
