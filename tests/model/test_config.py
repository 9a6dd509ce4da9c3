"""ModelConfig and the HF config.json translation (model/config.py, model/hf.py)."""

from __future__ import annotations

import copy
import json

import pytest

from minicpm4.model.config import ModelConfig, RopeScaling, SparseConfig
from minicpm4.model.hf import (MINICPM4_8B_ROPE_FACTORS, config_from_hf_dict, config_to_hf_dict,
                               load_config, save_config)
from tests.conftest import REAL_8B_CONFIG, require, tiny_config


@pytest.fixture
def real_raw() -> dict:
    return json.loads(require(REAL_8B_CONFIG).read_text(encoding="utf-8"))


@pytest.fixture
def real_cfg() -> ModelConfig:
    return load_config(require(REAL_8B_CONFIG))


# --------------------------------------------------------------------------- the real 8B config
def test_real_8b_config_fields_match_json(real_cfg: ModelConfig, real_raw: dict) -> None:
    cfg = real_cfg
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                 "rms_norm_eps", "rope_theta", "scale_emb", "scale_depth", "dim_model_base",
                 "mup_denominator", "tie_word_embeddings", "initializer_range", "bos_token_id",
                 "pad_token_id", "hidden_act", "torch_dtype", "model_type"):
        assert getattr(cfg, name) == real_raw[name], name
    assert cfg.vocab_size == 73448
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (4096, 32, 16384)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 2)
    assert cfg.head_dim_ == 128 and cfg.num_kv_groups == 16
    assert cfg.scale_emb == 12 and cfg.scale_depth == 1.4
    assert cfg.dim_model_base == 256 and cfg.mup_denominator == 32
    assert cfg.tie_word_embeddings is False
    assert cfg.eos_token_id == (2, 73440)
    rs = cfg.rope_scaling
    assert rs is not None and rs.rope_type == "longrope"
    assert rs.short_factor == tuple(real_raw["rope_scaling"]["short_factor"])
    assert rs.long_factor == tuple(real_raw["rope_scaling"]["long_factor"])
    assert len(rs.short_factor) == cfg.head_dim_ // 2 == 64
    assert rs.original_max_position_embeddings == 32768
    assert rs.short_factor == MINICPM4_8B_ROPE_FACTORS
    assert cfg.sparse_config is None and cfg.mixer_types is None
    assert cfg.layer_mixers == ("minicpm4",) * 32
    # HF bookkeeping keys are dropped, not kept as unknown extras.
    assert cfg.extra == {}


def test_real_8b_config_equals_preset(real_cfg: ModelConfig) -> None:
    assert real_cfg == ModelConfig.minicpm4_8b()


def test_real_8b_parameter_count(real_cfg: ModelConfig) -> None:
    n = real_cfg.num_parameters()
    assert n == pytest.approx(8.19e9, rel=2e-3)
    # Untied: embedding and LM head are counted separately.
    assert n - real_cfg.num_parameters(include_embedding=False) == 73448 * 4096
    assert real_cfg.replace(tie_word_embeddings=True).num_parameters() == n - 73448 * 4096


def test_0p5b_preset() -> None:
    cfg = ModelConfig.minicpm4_0p5b()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads) == (1024, 24, 16, 2)
    assert cfg.tie_word_embeddings is True
    assert cfg.head_dim_ == 64
    assert cfg.num_parameters() == pytest.approx(434e6, rel=5e-3)


def test_num_parameters_matches_built_model() -> None:
    from minicpm4.model.transformer import MiniCPM4ForCausalLM
    for tied in (False, True):
        cfg = tiny_config(tie_word_embeddings=tied)
        model = MiniCPM4ForCausalLM(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- round trips
def test_real_config_round_trips(real_cfg: ModelConfig, tmp_path) -> None:
    assert config_from_hf_dict(config_to_hf_dict(real_cfg)) == real_cfg
    save_config(real_cfg, tmp_path)
    assert load_config(tmp_path) == real_cfg
    assert load_config(tmp_path / "config.json") == real_cfg
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["scale_emb"] == 12 and saved["eos_token_id"] == [2, 73440]
    assert saved["rope_scaling"]["long_factor"] == list(MINICPM4_8B_ROPE_FACTORS)


def test_round_trip_sparse_sala_and_extra_keys() -> None:
    layers = 4
    cfg = tiny_config(
        num_hidden_layers=layers, model_type="minicpm_sala", head_dim=32,
        rope_scaling=None, eos_token_id=(2, 7), pad_token_id=None,
        sparse_config=SparseConfig(kernel_size=16, kernel_stride=8, block_size=32, init_blocks=2,
                                   window_size=256, topk=8, use_nope=True, dense_len=-1),
        mixer_types=("minicpm4", "lightning-attn", "lightning-attn", "minicpm4"),
        attn_use_rope=False, attn_use_output_gate=True, lightning_use_rope=False, qk_norm=True,
        use_output_gate=True, use_output_norm=True, lightning_nh=4, lightning_nkv=2,
        lightning_head_dim=32, lightning_scale="1",
        extra={"my_custom_key": [1, 2, {"a": None}], "another": "x"})
    raw = config_to_hf_dict(cfg)
    assert raw["architectures"] == ["MiniCPMSALAForCausalLM"]
    assert raw["mixer_types"] == list(cfg.mixer_types)
    assert raw["sparse_config"]["dense_len"] == -1
    assert raw["my_custom_key"] == [1, 2, {"a": None}]
    back = config_from_hf_dict(json.loads(json.dumps(raw)))
    assert back == cfg
    # Every field (compare=False ones included) survives.
    for name in ModelConfig.__dataclass_fields__:
        assert getattr(back, name) == getattr(cfg, name), name
    assert back.extra == {"my_custom_key": [1, 2, {"a": None}], "another": "x"}
    assert back.sparse_config.use_nope is True and back.sparse_config.dense_len == -1


def test_round_trip_rope_scaling_options() -> None:
    rs = tiny_config().rope_scaling
    cfg = tiny_config(rope_scaling=RopeScaling(
        short_factor=rs.short_factor, long_factor=rs.long_factor,
        original_max_position_embeddings=64, factor=3.0, attention_factor=1.25))
    assert config_from_hf_dict(config_to_hf_dict(cfg)) == cfg
    assert config_from_hf_dict(config_to_hf_dict(tiny_config(rope_scaling=None))).rope_scaling \
        is None


def test_unknown_keys_from_json_are_preserved(real_raw: dict) -> None:
    raw = dict(real_raw, future_feature={"on": True}, some_number=3)
    cfg = config_from_hf_dict(raw)
    assert cfg.extra == {"future_feature": {"on": True}, "some_number": 3}
    out = config_to_hf_dict(cfg)
    assert out["future_feature"] == {"on": True} and out["some_number"] == 3
    assert config_from_hf_dict(out).extra == cfg.extra


def test_defaults_when_optional_fields_absent(real_raw: dict) -> None:
    raw = {k: real_raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads", "scale_emb",
                                     "scale_depth", "dim_model_base")}
    cfg = config_from_hf_dict(raw)
    # num_key_value_heads defaults to num_attention_heads (plain MHA), as HF does.
    assert cfg.num_key_value_heads == 32
    assert cfg.rope_scaling is None and cfg.sparse_config is None
    assert cfg.eos_token_id == (2, 73440)


def test_single_int_eos_and_rope_parameters_alias(real_raw: dict) -> None:
    raw = copy.deepcopy(real_raw)
    raw["eos_token_id"] = 73440
    rope = raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = dict(rope, rope_theta=50000.0)
    cfg = config_from_hf_dict(raw)
    assert cfg.eos_token_id == (73440,)
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling.short_factor == MINICPM4_8B_ROPE_FACTORS


# --------------------------------------------------------------------------- sparse_config
def test_sparse_config_defaults_parse(real_raw: dict) -> None:
    cfg = config_from_hf_dict(dict(real_raw, sparse_config={}))
    sc = cfg.sparse_config
    assert sc == SparseConfig()
    assert (sc.kernel_size, sc.kernel_stride, sc.block_size, sc.window_size, sc.topk,
            sc.init_blocks, sc.dense_len, sc.use_nope) == (32, 16, 64, 2048, 64, 1, 8192, False)
    assert sc.local_blocks == 32


def test_sparse_config_dense_len_minus_one(real_raw: dict) -> None:
    cfg = config_from_hf_dict(dict(real_raw, sparse_config={"dense_len": -1, "topk": 8}))
    assert cfg.sparse_config.dense_len == -1
    assert cfg.sparse_config.topk == 8
    with pytest.raises(ValueError, match="sparse_config.dense_len"):
        config_from_hf_dict(dict(real_raw, sparse_config={"dense_len": -2}))


# --------------------------------------------------------------------------- errors
def _without(raw: dict, key: str) -> dict:
    raw = dict(raw)
    del raw[key]
    return raw


@pytest.mark.parametrize("field", ["hidden_size", "scale_emb", "vocab_size", "scale_depth",
                                   "dim_model_base", "num_attention_heads"])
def test_missing_required_field_is_named(real_raw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'.*missing"):
        config_from_hf_dict(_without(real_raw, field))


def test_missing_field_through_load_config_names_field_and_file(real_raw: dict,
                                                                 tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_without(real_raw, "scale_emb")))
    with pytest.raises(ValueError, match="scale_emb") as info:
        load_config(tmp_path)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", "32"),
    ("hidden_size", 4096.5),
    ("scale_emb", "12"),
    ("tie_word_embeddings", "false"),
    ("num_key_value_heads", True),
    ("hidden_act", 1),
])
def test_wrong_type_is_named(real_raw: dict, field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        config_from_hf_dict(dict(real_raw, **{field: value}))


def test_integral_float_is_accepted_as_int(real_raw: dict) -> None:
    assert config_from_hf_dict(dict(real_raw, num_hidden_layers=32.0)).num_hidden_layers == 32


def test_heads_not_divisible_by_kv_heads(real_raw: dict) -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        config_from_hf_dict(dict(real_raw, num_key_value_heads=3))


def test_non_positive_sizes_are_named(real_raw: dict) -> None:
    with pytest.raises(ValueError, match="num_hidden_layers"):
        config_from_hf_dict(dict(real_raw, num_hidden_layers=0))
    with pytest.raises(ValueError, match="vocab_size"):
        config_from_hf_dict(dict(real_raw, vocab_size=-5))


def test_rope_factors_of_wrong_length(real_raw: dict) -> None:
    raw = copy.deepcopy(real_raw)
    raw["rope_scaling"]["short_factor"] = raw["rope_scaling"]["short_factor"][:-1]
    with pytest.raises(ValueError, match="short_factor|long_factor"):
        config_from_hf_dict(raw)
    raw = copy.deepcopy(real_raw)
    raw["rope_scaling"]["short_factor"] = raw["rope_scaling"]["short_factor"][:32]
    raw["rope_scaling"]["long_factor"] = raw["rope_scaling"]["long_factor"][:32]
    with pytest.raises(ValueError, match="rope_scaling.short_factor"):
        config_from_hf_dict(raw)


def test_rope_factors_must_be_numbers(real_raw: dict) -> None:
    raw = copy.deepcopy(real_raw)
    raw["rope_scaling"]["long_factor"][3] = "x"
    with pytest.raises(ValueError, match="rope_scaling.long_factor"):
        config_from_hf_dict(raw)
    raw = copy.deepcopy(real_raw)
    del raw["rope_scaling"]["original_max_position_embeddings"]
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        config_from_hf_dict(raw)


def test_unknown_sparse_config_key(real_raw: dict) -> None:
    with pytest.raises(ValueError, match="sparse_config.*topkk"):
        config_from_hf_dict(dict(real_raw, sparse_config={"topkk": 8}))


def test_bad_sparse_config_value(real_raw: dict) -> None:
    with pytest.raises(ValueError, match="sparse_config.block_size"):
        config_from_hf_dict(dict(real_raw, sparse_config={"block_size": "64"}))
    with pytest.raises(ValueError, match="sparse_config.block_size"):
        config_from_hf_dict(dict(real_raw, sparse_config={"block_size": 40}))


def test_bad_mixer_type(real_raw: dict) -> None:
    mixers = ["minicpm4"] * 31 + ["mamba"]
    with pytest.raises(ValueError, match="mixer_types.*mamba"):
        config_from_hf_dict(dict(real_raw, mixer_types=mixers))
    with pytest.raises(ValueError, match="mixer_types"):
        config_from_hf_dict(dict(real_raw, mixer_types="minicpm4"))


def test_mixer_types_length_mismatch(real_raw: dict) -> None:
    with pytest.raises(ValueError, match="mixer_types.*31.*32"):
        config_from_hf_dict(dict(real_raw, mixer_types=["minicpm4"] * 31))


def test_eos_id_outside_vocab(real_raw: dict) -> None:
    with pytest.raises(ValueError, match="eos_token_id"):
        config_from_hf_dict(dict(real_raw, eos_token_id=[2, 73448]))
    with pytest.raises(ValueError, match="eos_token_id"):
        config_from_hf_dict(dict(real_raw, eos_token_id=[]))
    with pytest.raises(ValueError, match="bos_token_id"):
        config_from_hf_dict(dict(real_raw, bos_token_id=80000))


def test_non_json_file(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 4096,,}')
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path)


def test_json_that_is_not_an_object(tmp_path) -> None:
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="JSON object"):
        load_config(tmp_path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match="nope"):
        load_config(tmp_path / "nope" / "config.json")


def test_unknown_model_type(real_raw: dict) -> None:
    with pytest.raises(ValueError, match="model_type.*llama"):
        config_from_hf_dict(dict(real_raw, model_type="llama"))


@pytest.mark.parametrize("model_type", ["minicpm", "minicpm4", "minicpm_sala"])
def test_known_model_types(real_raw: dict, model_type: str) -> None:
    assert config_from_hf_dict(dict(real_raw, model_type=model_type)).model_type == model_type


def test_direct_construction_errors_name_fields() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_config(hidden_size=130)  # not divisible by 8 heads, no head_dim
    with pytest.raises(ValueError, match="head_dim"):
        tiny_config(head_dim=15, rope_scaling=None)
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_config(hidden_act="gelu")
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        tiny_config(max_position_embeddings=32)
    with pytest.raises(ValueError, match="pad_token_id"):
        tiny_config(pad_token_id=512)


def test_config_is_frozen_and_replace_validates() -> None:
    cfg = tiny_config()
    with pytest.raises(AttributeError):
        cfg.hidden_size = 64  # type: ignore[misc]
    assert cfg.replace(num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="num_key_value_heads"):
        cfg.replace(num_key_value_heads=3)
