"""`--context` presets (spec §1.3): parsing, the derived LongRoPE / YaRN factor lists, mscale,
clear errors, a forward beyond the original length, and continued training from a folder with
an extended (and sparse) config."""

from __future__ import annotations

import math

import pytest
import torch

from minicpm4.cli import main
from minicpm4.loading import apply_context, parse_context
from minicpm4.model.config import SparseConfig
from minicpm4.model.hf import load_config
from minicpm4.model.layers import RotaryEmbedding, longrope_mscale
from minicpm4.model.rope_extension import extend_factors, turns
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import REAL_8B_CONFIG, require, tiny_config


@pytest.mark.parametrize("text, tokens", [("32k", 32768), ("64K", 65536), ("128k", 131072),
                                          ("40000", 40000), (" 8k ", 8192), (4096, 4096)])
def test_parse_context(text, tokens) -> None:
    assert parse_context(text) == tokens


@pytest.mark.parametrize("bad", ["12q", "k", "", "-5", "0", "1.5k", "32kk", "0k"])
def test_parse_context_rejects(bad) -> None:
    with pytest.raises(ValueError, match="--context"):
        parse_context(bad)


@pytest.mark.parametrize("argv", [
    ["generate", "--random", "tiny", "--context", "12q", "--prompt", "x"],
    ["info", "--preset", "tiny", "--context", "12q"],
    ["eval", "--model", "nowhere", "--data", "nowhere", "--context", "0"],
])
def test_cli_bad_context_is_a_clear_error(argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --context") and "Traceback" not in err


def test_real_config_128k_derived_list() -> None:
    cfg = load_config(require(REAL_8B_CONFIG))
    shipped = cfg.rope_scaling.long_factor
    ext = apply_context(cfg, "128k")
    rs = ext.rope_scaling
    assert ext.max_position_embeddings == 131072
    assert rs.original_max_position_embeddings == 32768
    assert len(rs.long_factor) == cfg.head_dim_ // 2 == 64
    # the two facts spec §1.3 records about the published 128K list
    assert rs.long_factor[:21] == shipped[:21] and rs.long_factor[21] > shipped[21]
    assert max(rs.long_factor) == pytest.approx(124.096, abs=1e-3)
    assert max(rs.long_factor) == pytest.approx(4 * max(shipped))
    assert all(b >= a for a, b in zip(rs.long_factor, rs.long_factor[1:]))
    assert rs.short_factor == cfg.rope_scaling.short_factor  # inputs <= 32K rotate as shipped
    assert longrope_mscale(ext) == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32768)))
    assert apply_context(cfg, "32k") is cfg and apply_context(cfg, None) is cfg


def test_model_without_factors_gets_a_yarn_ramp() -> None:
    cfg = tiny_config(rope_scaling=None, max_position_embeddings=1024, hidden_size=256,
                      num_attention_heads=4)  # head_dim 64, like the demo model
    ext = apply_context(cfg, "32k")
    rs = ext.rope_scaling
    assert (ext.max_position_embeddings, rs.original_max_position_embeddings) == (32768, 1024)
    assert len(rs.long_factor) == len(rs.short_factor) == 32
    assert rs.short_factor == (1.0,) * 32
    r = turns(64, cfg.rope_theta, 1024)
    for f, turns_d in zip(rs.long_factor, r):
        if turns_d >= 64:
            assert f == 1.0  # fast pairs are not interpolated
        elif turns_d <= 1:
            assert f == pytest.approx(32.0)  # slow pairs stretched by the full ratio
        else:
            assert 1.0 < f < 32.0
    assert all(b >= a for a, b in zip(rs.long_factor, rs.long_factor[1:]))
    mscale = math.sqrt(1 + math.log(32) / math.log(1024))
    assert longrope_mscale(ext) == pytest.approx(mscale)
    cos_BTH, sin_BTH = RotaryEmbedding(ext)(torch.tensor([[0, 1]]))
    assert cos_BTH[0, 0, 0].item() == pytest.approx(mscale) and sin_BTH[0, 0, 0].item() == 0


def test_extend_factors_validates() -> None:
    with pytest.raises(ValueError, match="head_dim/2"):
        extend_factors((1.0,) * 3, head_dim=8, theta=1e4, base_len=64, scale=2)
    with pytest.raises(ValueError, match=">= 1"):
        extend_factors((1.0,) * 4, head_dim=8, theta=1e4, base_len=64, scale=0.5)


@torch.no_grad()
@pytest.mark.parametrize("sparse", [None, SparseConfig(kernel_size=8, kernel_stride=4,
                                                        block_size=16, window_size=32, topk=2,
                                                        dense_len=64)])
def test_forward_beyond_the_original_length(sparse) -> None:
    base = tiny_config(rope_scaling=None, max_position_embeddings=64)
    ext = apply_context(base, 256).replace(sparse_config=sparse)
    model = MiniCPM4ForCausalLM(ext)
    model.init_weights(seed=0)
    model.eval()
    ids_BT = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(0))
    logits_BTV = model(ids_BT, logits_to_keep=1)
    assert logits_BTV.shape == (1, 1, 512) and torch.isfinite(logits_BTV).all()
    rot = model.model.rotary_emb
    assert not torch.equal(rot.inv_freq_long, rot.inv_freq_short)  # the long list is in use


def test_continued_training_takes_the_extended_config(tmp_path) -> None:
    from minicpm4.train.config import OptimConfig, ScheduleConfig
    from minicpm4.train.loop import build_model
    from minicpm4.train.recipe import TrainConfig
    base = tiny_config(rope_scaling=None, max_position_embeddings=64, num_hidden_layers=2)
    src = MiniCPM4ForCausalLM(base)
    src.init_weights(seed=1)
    src.save_pretrained(tmp_path / "src")
    cfg = apply_context(base, "1k").replace(sparse_config=SparseConfig(dense_len=512))
    run = TrainConfig(model=cfg, init_from=str(tmp_path / "src"), data="unused",
                      run_dir=str(tmp_path / "run"), optim=OptimConfig(),
                      schedule=ScheduleConfig(warmup_steps=0, total_steps=1))
    model = build_model(run, torch.device("cpu"))
    assert model.config.max_position_embeddings == 1024
    assert model.config.sparse_config.dense_len == 512
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                       src.model.layers[0].self_attn.q_proj.weight)
