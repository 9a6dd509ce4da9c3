"""train/loop.py and the `train` / `eval` CLI: bit-exact resume, the metrics log and resolved
config, evaluation, friendly errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minicpm4.cli import build_parser, main
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.train import checkpoint as ckpt
from minicpm4.train.loop import train
from minicpm4.train.recipe import TrainConfig
from tests.train._fixtures import read_jsonl, tiny_train_config, write_model_config, write_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    write_shards(root / "data")
    write_shards(root / "eval", seed=1, num_docs=20)
    write_model_config(root / "cfg")
    return root


def _strip(records) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _losses(records) -> list[float]:
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("accum", [1, 2])
def test_interrupted_and_resumed_run_is_bit_exact(data, tmp_path, accum) -> None:
    kw = dict(steps=8, checkpoint_interval=3, grad_accum=accum, batch_size=2,
              eval_data=str(data / "eval"), eval_interval=4, eval_batches=2)
    full = train(tiny_train_config(data / "data", tmp_path / "full", **kw))
    cfg = tiny_train_config(data / "data", tmp_path / "cut", **kw)
    first = train(cfg, stop_after=5)  # "killed" after step 5; newest checkpoint is step 3
    assert first.end_step == 5 and ckpt.latest(cfg.run_dir).name == "step-00000003"
    second = train(cfg, resume=True)
    assert second.start_step == 3 and second.end_step == 8
    logged = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert _losses(logged) == _losses(full.records)  # every step, exactly once, bit-exact
    assert [r["step"] for r in logged] == [r["step"] for r in full.records]
    assert _strip(logged) == _strip(full.records)  # eval losses, lr, grad norms too
    assert _losses(full.records)[-1] < _losses(full.records)[0]


def test_refuses_a_used_run_dir_without_resume_and_resume_of_nothing_starts_fresh(
        data, tmp_path) -> None:
    cfg = tiny_train_config(data / "data", tmp_path / "run", steps=2)
    assert train(cfg, resume=True).start_step == 0  # nothing to resume: a fresh start
    with pytest.raises(ValueError, match="--resume"):
        train(cfg)


def test_train_config_validation_and_json_round_trip(data, tmp_path) -> None:
    cfg = tiny_train_config(data / "data", tmp_path, eval_data="x", dtype="bfloat16")
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for bad, match in [(dict(seq_len=0), "seq_len"), (dict(dtype="float16"), "dtype"),
                       (dict(seq_len=1024), "max_position_embeddings"),
                       (dict(distributed="tp"), "distributed"), (dict(mtp_lambda=0.3), "MTP"),
                       (dict(grad_accum=1.5), "grad_accum")]:
        with pytest.raises(ValueError, match=match):
            tiny_train_config(data / "data", tmp_path, **bad)


def _train_args(data, run, *extra) -> list[str]:
    return ["train", "--model-config", str(data / "cfg" / "config.json"),
            "--data", str(data / "data"), "--eval-data", str(data / "eval"),
            "--run-dir", str(run), "--steps", "4", "--seq-len", "32", "--batch-size", "2",
            "--eval-interval", "2", "--eval-batches", "2", "--checkpoint-interval", "2",
            "--device", "cpu", *extra]


def test_cli_train_writes_log_config_and_checkpoints_then_eval(data, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(_train_args(data, run)) == 0
    out, err = capsys.readouterr()
    assert "final checkpoint:" in out and "tok/s" in err and "loss" in err and "lr" in err
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["train", "train", "eval", "train", "train", "eval"]
    assert {"loss", "lr", "grad_norm", "num_tokens", "seconds"} <= set(records[0])
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["seq_len"] == 32 and resolved["schedule"]["total_steps"] == 4
    assert resolved["model"]["hidden_size"] == 32 and resolved["optim"]["parametrization"] == "mup"
    assert TrainConfig.load(ckpt.latest(run) / "train_config.json").run_dir == str(run)
    last = ckpt.latest(run)
    assert main(["eval", "--model", str(last / "model"), "--data", str(data / "eval"),
                 "--seq-len", "32", "--batch-size", "2", "--batches", "2"]) == 0
    line = capsys.readouterr().out
    loss, ppl = float(line.split()[1]), float(line.split()[3])
    assert line.startswith("loss ") and "perplexity" in line
    assert math.isclose(ppl, math.exp(loss), rel_tol=1e-3)
    assert loss == pytest.approx(records[-1]["loss"], abs=1e-4)  # the loop's eval, same windows
    assert main(["eval", "--model", str(last), "--data", str(data / "eval"), "--seq-len", "32",
                 "--batch-size", "2", "--batches", "2"]) == 0  # a checkpoint folder works too
    assert capsys.readouterr().out == line
    # export: the run folder (newest checkpoint) -> a standalone bf16 HF folder + tokenizer
    out_dir = tmp_path / "exported"
    assert main(["export", str(run), str(out_dir), "--tokenizer"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert (out_dir / "tokenizer.json").is_file() and (out_dir / "model.safetensors").is_file()
    src = MiniCPM4ForCausalLM.from_pretrained(last / "model")
    exported = MiniCPM4ForCausalLM.from_pretrained(out_dir)
    assert exported.dtype == torch.bfloat16
    for (name, a), b in zip(src.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "neither a model folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["--seq-len", "0"], "seq_len"),
    (["--steps", "0"], "steps"),
    (["--lr", "-1"], "lr"),
    (["--preset", "tiny"], "exactly one of"),
    (["--warmup-steps", "10"], "warmup"),
    (["--distributed", "ddp"], "torchrun"),
])
def test_cli_bad_values_are_friendly_errors(data, tmp_path, capsys, args, match) -> None:
    assert main(_train_args(data, tmp_path / "bad", *args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err and "Traceback" not in err


def test_cli_bad_flags_exit_2(data, tmp_path, capsys) -> None:
    for argv in (["train", "--steps", "3"], ["train", *_train_args(data, tmp_path)[1:],
                                              "--dtype", "float16"],
                 ["eval", "--model", "x"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2
        assert "error:" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", str(data / "eval")]) == 2
    assert "error:" in capsys.readouterr().err
    for cmd in (["train", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(cmd)
        assert exc.value.code == 0


def test_resume_refuses_another_stream_or_model(data, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(_train_args(data, run)) == 0
    capsys.readouterr()
    assert main(_train_args(data, run, "--resume", "--batch-size", "4")) == 2
    assert "another stream" in capsys.readouterr().err
    write_model_config(tmp_path / "wide", hidden_size=64)
    args = _train_args(data, run, "--resume")
    args[args.index("--model-config") + 1] = str(tmp_path / "wide")
    assert main(args) == 2
    assert "does not fit" in capsys.readouterr().err
