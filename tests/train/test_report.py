"""`minicpm4 report`: summary and loss curve of a run folder; malformed logs are named errors."""

from __future__ import annotations

import json

import pytest

from minicpm4.cli import main
from minicpm4.train import report
from minicpm4.train.loop import train
from tests.train._fixtures import tiny_train_config, write_shards


def test_report_summarises_and_plots_a_run(tmp_path, capsys) -> None:
    write_shards(tmp_path / "data")
    write_shards(tmp_path / "eval", seed=1, num_docs=20)
    cfg = tiny_train_config(tmp_path / "data", tmp_path / "run", steps=4,
                            eval_data=str(tmp_path / "eval"), eval_interval=2)
    train(cfg, log=lambda line: None)
    summary = report.summarize(tmp_path / "run")
    assert summary["steps"] == 4 and summary["tokens"] == 4 * cfg.batch_size * cfg.seq_len
    assert [e["step"] for e in summary["evals"]] == [2, 4]
    assert summary["config"]["seq_len"] == cfg.seq_len
    assert main(["report", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[:printed.rindex("}") + 1])["steps"] == 4
    png = tmp_path / "run" / "loss_curve.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_missing_or_malformed_logs_are_named_errors(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        report.summarize(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train"\n')
    assert main(["report", str(tmp_path)]) == 2
    assert "not JSON" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "loss": 1.0}\n')
    with pytest.raises(ValueError, match="no training steps"):
        report.summarize(tmp_path)
