"""ModelTunnel (minicpm4/train/coord_check.py, mup_search.py, `minicpm4 tune`): the μP coordinate
check (anchors Part B §1.4, §1.6), the LR-sweep machinery and the conditional-loss indicator
(spec minicpm4-system.md §5.2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from minicpm4.cli import main
from minicpm4.train import coord_check as cc
from minicpm4.train import mup_search as ms
from tests.train._fixtures import write_shards


@pytest.fixture(scope="module")
def coord_result():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cc.coord_check((64, 128, 256), steps=4, seeds=(0, 1))
    finally:
        torch.set_num_threads(before)


def test_coord_check_mup_flat_sp_grows(coord_result) -> None:
    """Issue 3: μP block outputs within 2x across widths after 4 large-LR steps; SP's grow
    (anchors §1.6 measured 62x over 64 -> 512; this box 48-54x over 64 -> 256)."""
    res = coord_result
    assert res["modules"] == ["embedding", "layer.0", "layer.1", "logits"]
    for module in ("embedding", "layer.0", "layer.1"):
        assert res["ratios"]["mup"][module] < 2.0, (module, res["ratios"]["mup"])
    for module in ("layer.0", "layer.1"):
        assert res["ratios"]["sp"][module] > 5.0, (module, res["ratios"]["sp"])
        wide, narrow = (res["curves"]["sp"][module][str(w)][-1] for w in (256, 64))
        assert wide > narrow  # SP grows with width, it does not just wobble
    # logits carry the expected 1/sqrt(m) init transient under μP (anchors §1.4); they
    # flatten after a few steps but are not held to the block-output bound
    assert res["ratios"]["mup"]["logits"] < 2.5
    for curve in res["curves"]["mup"]["layer.1"].values():
        assert len(curve) == 5 and all(math.isfinite(v) and v > 0 for v in curve)


def test_coord_report_files(coord_result, tmp_path) -> None:
    paths = cc.write_report(tmp_path, "coord_check", coord_result, "t", "cmd",
                            [("table", cc.coord_table(coord_result))], cc.plot_coord_check)
    assert [p.name for p in paths] == ["coord_check.json", "coord_check.png", "coord_check.md"]
    assert json.loads(paths[0].read_text())["ratios"] == coord_result["ratios"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths[2].read_text()
    assert "| mup | layer.1, t=4 |" in md and "machine:" in md and "`cmd`" in md


def test_conditional_nll_matches_a_hand_computation() -> None:
    # one passage x = [0, 1, 2, 1] (L = 4), context_len 2: continuation tokens x_2, x_3
    passages = torch.tensor([[0, 1, 2, 1]])
    logits = torch.tensor([[[0.0, 1.0, 0.0],     # predicts x_1 = 1
                            [2.0, 0.0, 1.0],     # predicts x_2 = 2
                            [0.0, 3.0, 0.0]]])   # predicts x_3 = 1

    def nll(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    rows = logits[0].tolist()
    n1, n2, n3 = nll(rows[0], 1), nll(rows[1], 2), nll(rows[2], 1)
    cond, plain = ms.conditional_nll(logits, passages, context_len=2)
    assert cond == pytest.approx((n2 + n3) / 2, rel=1e-6)
    assert plain == pytest.approx((n1 + n2 + n3) / 3, rel=1e-6)
    cond3, _ = ms.conditional_nll(logits, passages, context_len=3)
    assert cond3 == pytest.approx(n3, rel=1e-6)
    with pytest.raises(ValueError, match="context_len"):
        ms.conditional_nll(logits, passages, context_len=4)
    with pytest.raises(ValueError, match="logits"):
        ms.conditional_nll(logits[:, :2], passages, context_len=2)


def test_compact_vocab_keeps_the_most_frequent_ids() -> None:
    train = np.array([7, 7, 7, 9, 9, 3, 5, 5, 5, 5])
    corpus = ms.compact_vocab(train, np.array([5, 9, 3, 11]), vocab_size=3)
    assert corpus.kept_ids.tolist() == [-1, 5, 7]
    assert corpus.train.tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1, 1]
    assert corpus.eval.tolist() == [1, 0, 0, 0]
    assert corpus.oov_rate == {"train": 0.3, "eval": 0.75}
    with pytest.raises(ValueError, match="vocab_size"):
        ms.compact_vocab(train, train, vocab_size=1)


def _toy_corpus(tmp_path) -> ms.Corpus:
    write_shards(tmp_path / "tok" / "train", num_docs=60, seed=0)
    write_shards(tmp_path / "tok" / "eval", num_docs=20, seed=1)
    return ms.prepare_corpus(tmp_path / "tok", tmp_path / "work", vocab_size=64)


def test_sweep_machinery_picks_the_argmin(tmp_path, one_thread) -> None:
    corpus = _toy_corpus(tmp_path)
    assert corpus.vocab_size == 64
    settings = ms.SweepSettings(steps=4, batch=4, seq_len=16, num_passages=4)
    lrs = [2.0 ** -10, 2.0 ** -7, 2.0 ** -4]
    res = ms.lr_sweep(corpus, (64, 128), lrs, settings=settings)
    assert len(res["runs"]) == 2 * 2 * 3 and res["dim_model_base"] == 64
    for p in ("mup", "sp"):
        for w in (64, 128):
            mine = [r for r in res["runs"] if r["parametrization"] == p and r["width"] == w]
            assert sorted(r["lr"] for r in mine) == sorted(lrs)
            assert all(math.isfinite(r["cond_loss"]) and math.isfinite(r["lm_loss"])
                       for r in mine)
            best = min(mine, key=lambda r: r["cond_loss"])
            assert res["best"][p][str(w)]["lr"] == best["lr"]
    chosen = res["chosen"]
    mup_runs = [r for r in res["runs"] if r["parametrization"] == "mup"]
    mean = {lr: np.mean([r["cond_loss"] for r in mup_runs if r["lr"] == lr]) for lr in lrs}
    assert chosen["lr"] == min(mean, key=mean.get)
    assert chosen["mean_cond_loss"] == pytest.approx(mean[chosen["lr"]])
    assert isinstance(chosen["argmin_within_one_grid_step"], bool)
    json.dumps(res)  # JSON-ready
    halves = [{**res, "parametrizations": [p], "best": {p: res["best"][p]},
               "runs": [r for r in res["runs"] if r["parametrization"] == p]}
              for p in ("mup", "sp")]
    merged = ms.merge_sweeps(halves)
    assert merged["chosen"] == chosen and merged["runs"] == res["runs"]
    with pytest.raises(ValueError, match="overlap"):
        ms.merge_sweeps([halves[0], halves[0]])
    table = ms.sweep_table(res)
    assert table.count("**") == 2 * 4 and "| mup | 128 |" in table
    assert ms.plot_sweep(res, tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="lrs"):
        ms.lr_sweep(corpus, (64,), [0.0], settings=settings)


def test_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="width"):
        cc.coord_config(100)
    with pytest.raises(ValueError, match="widths"):
        cc.coord_check([])
    with pytest.raises(ValueError, match="parametrization"):
        cc.coord_check([64], parametrizations=["ntk"])
    with pytest.raises(ValueError, match="seq_len"):
        ms.SweepSettings(seq_len=2)
    with pytest.raises(ValueError, match="dim_model_base"):
        ms.SweepSettings(dim_model_base=0)
    with pytest.raises(ValueError, match="holdout"):
        ms.prepare_corpus("/nonexistent-text-folder", "/tmp/unused")


def test_cli_tune_writes_results(tmp_path, one_thread, capsys) -> None:
    out = tmp_path / "cc"
    assert main(["tune", "coord-check", "--widths", "64", "128", "--seeds", "0",
                 "--steps", "2", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"coord_check.json", "coord_check.png",
                                               "coord_check.md"}
    assert "mup: max/min across widths at t=2" in capsys.readouterr().out
    _toy_corpus(tmp_path)
    out = tmp_path / "sweep"
    assert main(["tune", "lr-sweep", "--data", str(tmp_path / "tok"), "--widths", "64",
                 "--lrs", "0.001", "0.01", "--steps", "2", "--seq-len", "16",
                 "--batch-size", "2", "--vocab-size", "64", "--parametrizations", "mup",
                 "--out", str(out)]) == 0
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["lr"] in (0.001, 0.01) and chosen["parametrization"] == "mup"
    assert (out / "lr_sweep.md").exists() and (out / "lr_sweep.png").exists()
    assert main(["tune", "coord-check", "--widths", "100", "--out", str(out)]) == 2
