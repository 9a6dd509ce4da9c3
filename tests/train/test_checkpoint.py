"""train/checkpoint.py: layout, keep-last-K, `latest`, HF-loadable model folder, and a SIGKILL
in the middle of a save that leaves the previous checkpoint loadable and resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.train import checkpoint as ckpt
from minicpm4.train.loop import train
from minicpm4.train.recipe import TrainConfig
from tests.train._fixtures import read_jsonl, tiny_train_config, write_model_config, write_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    write_shards(root / "data")
    write_model_config(root / "cfg")
    return root


def test_layout_keep_last_k_and_hf_loadable(data, tmp_path) -> None:
    cfg = tiny_train_config(data / "data", tmp_path / "run", steps=6, checkpoint_interval=2,
                            keep_checkpoints=2)
    result = train(cfg)
    found = ckpt.list_checkpoints(tmp_path / "run")
    assert [s for s, _ in found] == [4, 6]  # step 2 pruned
    last = ckpt.latest(tmp_path / "run")
    assert last == result.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in last.iterdir()) == ["model", "train_config.json", "trainer.pt"]
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]
    model = MiniCPM4ForCausalLM.from_pretrained(last / "model")
    assert model.dtype == torch.float32 and model.config.vocab_size == cfg.model.vocab_size
    state = ckpt.load_trainer_state(last)
    assert state["step"] == 6 and state["loader"]["step"] == 6 and len(state["rng"]) == 1
    assert state["schedule"]["last_step"] == 5
    assert TrainConfig.load(last / "train_config.json") == cfg
    assert TrainConfig.load(tmp_path / "run" / "config.json") == cfg


def test_latest_ignores_partial_folders_and_bad_files_are_value_errors(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000009-1" / "model").mkdir(parents=True)
    (root / "step-00000008").mkdir()  # no trainer.pt: not complete
    assert ckpt.latest(tmp_path) is None and ckpt.latest(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="not a training checkpoint"):
        ckpt.load_trainer_state(root / "step-00000008")
    (root / "step-00000008" / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read|not a"):
        ckpt.load_trainer_state(root / "step-00000008")


def _cli(run: Path, data: Path, *extra: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "minicpm4", "train", "--model-config", str(data / "cfg"),
            "--data", str(data / "data"), "--run-dir", str(run), "--steps", "6",
            "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "1",
            "--checkpoint-interval", "2", "--keep", "3", "--device", "cpu", *extra]


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop(ckpt.PAUSE_ENV, None)
    env.update(extra)
    return env


def _train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]


def test_sigkill_during_save_keeps_the_previous_checkpoint(data, tmp_path) -> None:
    ref = subprocess.run(_cli(tmp_path / "ref", data), env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run, data), env=_env(**{ckpt.PAUSE_ENV: "4:120"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    partial = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = list((run / "checkpoints").glob(".tmp-step-00000004-*/model/config.json"))
        if partial:
            break
        time.sleep(0.05)
    assert partial, f"the save of step 4 never started: {proc.poll()} {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest(run).name == "step-00000002"
    model = MiniCPM4ForCausalLM.from_pretrained(ckpt.latest(run) / "model")
    assert model.config.num_hidden_layers == 2
    assert ckpt.load_trainer_state(ckpt.latest(run))["step"] == 2
    resumed = subprocess.run(_cli(run, data, "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 2" in resumed.stderr
    assert _train_losses(run) == _train_losses(tmp_path / "ref")  # bit-exact
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
