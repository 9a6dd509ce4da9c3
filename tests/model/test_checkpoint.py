"""HF-format checkpoints (model/checkpoint.py).

Issue acceptance: save -> load round-trip is bit-exact; sharded load works; broken checkpoints
give the named error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minicpm4.model import checkpoint
from minicpm4.model.checkpoint import INDEX_FILE, SINGLE_FILE, load_pretrained, save_pretrained
from minicpm4.model.hf import load_config
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config

IDS = torch.tensor([[5, 17, 300, 2, 99, 511, 0, 42], [1, 2, 3, 4, 5, 6, 7, 8]])


def _model(seed: int = 0, **overrides) -> MiniCPM4ForCausalLM:
    model = MiniCPM4ForCausalLM(tiny_config(**overrides))
    model.init_weights(seed=seed)
    with torch.no_grad():  # norms are all ones after init: make them distinguishable
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model.eval()


def _with_param_dtype(model: MiniCPM4ForCausalLM, dtype: torch.dtype) -> MiniCPM4ForCausalLM:
    """A copy whose parameters are cast to `dtype`; the fp32 RoPE buffers stay fp32, as in a
    model loaded in that dtype (`Module.to(dtype)` would also round the buffers)."""
    ref = MiniCPM4ForCausalLM(model.config)
    ref.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True)
    ref.tie_weights()
    return ref.eval()


def _assert_same(a: MiniCPM4ForCausalLM, b: MiniCPM4ForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    for name, p in b.named_parameters():
        assert not p.is_meta, name
    for name, buf in b.named_buffers():
        assert not buf.is_meta, name
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


@pytest.fixture(scope="module")
def saved_fp32(tmp_path_factory) -> tuple[MiniCPM4ForCausalLM, Path]:
    model = _model(seed=1)
    folder = tmp_path_factory.mktemp("ckpt_fp32")
    save_pretrained(model, folder)
    return model, folder


# --------------------------------------------------------------------------- round trips
def test_round_trip_fp32_bit_exact(saved_fp32) -> None:
    model, folder = saved_fp32
    assert (folder / SINGLE_FILE).is_file() and not (folder / INDEX_FILE).exists()
    assert load_config(folder).torch_dtype == "float32"
    loaded = MiniCPM4ForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.float32
    assert loaded.config == model.config
    _assert_same(model, loaded)
    assert not loaded.training


def test_round_trip_bf16_bit_exact(tmp_path) -> None:
    model = _model(seed=2)
    model.save_pretrained(tmp_path, dtype="bfloat16")
    assert load_config(tmp_path).torch_dtype == "bfloat16"
    with safe_open(tmp_path / SINGLE_FILE, framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    loaded = MiniCPM4ForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    _assert_same(_with_param_dtype(model, torch.bfloat16), loaded)


def test_round_trip_of_bf16_model_without_dtype_argument(tmp_path) -> None:
    model = _with_param_dtype(_model(seed=3), torch.bfloat16)
    save_pretrained(model, tmp_path)
    assert load_config(tmp_path).torch_dtype == "bfloat16"
    _assert_same(model, load_pretrained(tmp_path))


def test_tied_round_trip(tmp_path) -> None:
    model = _model(seed=4, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_pretrained(model, tmp_path)
    names = set(load_file(tmp_path / SINGLE_FILE))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded = load_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _assert_same(model, loaded)


def test_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path) -> None:
    model = _model(seed=4, tie_word_embeddings=True)
    save_pretrained(model, tmp_path)
    state = load_file(tmp_path / SINGLE_FILE)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / SINGLE_FILE)
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _assert_same(model, loaded)


def test_untied_round_trip(saved_fp32) -> None:
    model, folder = saved_fp32
    names = set(load_file(folder / SINGLE_FILE))
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names
    assert names == set(model.state_dict())
    loaded = load_pretrained(folder)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    _assert_same(model, loaded)


def test_sharded_round_trip(tmp_path) -> None:
    model = _model(seed=5)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    save_pretrained(model, tmp_path, max_shard_bytes=total // 4)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 4
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (tmp_path / SINGLE_FILE).exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == total
    for shard in shards:  # each shard holds exactly what the index says
        with safe_open(tmp_path / shard, framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    _assert_same(model, load_pretrained(tmp_path))


def test_resave_switches_between_single_and_sharded(tmp_path) -> None:
    model = _model(seed=6)
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / INDEX_FILE).is_file()
    other = _model(seed=7)
    save_pretrained(other, tmp_path)
    assert (tmp_path / SINGLE_FILE).is_file() and not (tmp_path / INDEX_FILE).exists()
    _assert_same(other, load_pretrained(tmp_path))
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    assert not (tmp_path / SINGLE_FILE).exists()
    _assert_same(model, load_pretrained(tmp_path))
    assert not list(tmp_path.glob(".tmp-*"))


def test_loaded_model_survives_resave_into_same_folder(tmp_path) -> None:
    """Loaded CPU weights may be memory-mapped from the checkpoint file; saving another model
    into the same folder must not change (or crash) the already loaded one."""
    first = _model(seed=10)
    save_pretrained(first, tmp_path)
    loaded = load_pretrained(tmp_path)
    save_pretrained(_model(seed=11), tmp_path)
    _assert_same(first, loaded)


def test_load_bf16_checkpoint_as_float32(tmp_path) -> None:
    model = _model(seed=8)
    save_pretrained(model, tmp_path, dtype="bfloat16")
    loaded = load_pretrained(tmp_path, dtype="float32")
    assert loaded.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    expected = _with_param_dtype(_with_param_dtype(model, torch.bfloat16), torch.float32)
    _assert_same(expected, loaded)


def test_load_fp32_checkpoint_as_bf16(saved_fp32) -> None:
    model, folder = saved_fp32
    loaded = load_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name].to(torch.bfloat16)), name


def test_unknown_dtype_is_rejected(saved_fp32) -> None:
    _, folder = saved_fp32
    with pytest.raises(ValueError, match="float8"):
        load_pretrained(folder, dtype="float8")


# --------------------------------------------------------------------------- memory
def test_load_builds_the_model_on_meta_only(saved_fp32, monkeypatch) -> None:
    """The loader never materialises a randomly initialised model: every instance it builds
    has its parameters on `meta`, and none is left there after loading."""
    _, folder = saved_fp32
    built: list[set[str]] = []
    original = MiniCPM4ForCausalLM.__init__

    def recording_init(self, cfg) -> None:
        original(self, cfg)
        built.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(MiniCPM4ForCausalLM, "__init__", recording_init)
    loaded = load_pretrained(folder)
    assert built == [{"meta"}]
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert {b.device.type for b in loaded.buffers()} == {"cpu"}


# --------------------------------------------------------------------------- broken checkpoints
@pytest.fixture
def ckpt(tmp_path) -> Path:
    save_pretrained(_model(seed=9), tmp_path)
    return tmp_path


def test_truncated_file(ckpt: Path) -> None:
    file = ckpt / SINGLE_FILE
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=SINGLE_FILE.replace(".", r"\.")):
        load_pretrained(ckpt)


def test_truncated_shard(tmp_path) -> None:
    save_pretrained(_model(seed=9), tmp_path, max_shard_bytes=200_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(ValueError, match=shard.name):
        load_pretrained(tmp_path)


def test_garbage_file(ckpt: Path) -> None:
    (ckpt / SINGLE_FILE).write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=SINGLE_FILE):
        load_pretrained(ckpt)


def test_missing_tensor(ckpt: Path) -> None:
    state = load_file(ckpt / SINGLE_FILE)
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, ckpt / SINGLE_FILE)
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_pretrained(ckpt)


def test_missing_lm_head_when_untied(ckpt: Path) -> None:
    state = load_file(ckpt / SINGLE_FILE)
    del state["lm_head.weight"]
    save_file(state, ckpt / SINGLE_FILE)
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        load_pretrained(ckpt)


def test_misshaped_tensor(ckpt: Path) -> None:
    state = load_file(ckpt / SINGLE_FILE)
    name = "model.layers.1.self_attn.k_proj.weight"
    assert state[name].shape == (32, 128)
    state[name] = torch.zeros(48, 128)
    save_file(state, ckpt / SINGLE_FILE)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight") as info:
        load_pretrained(ckpt)
    msg = str(info.value)
    assert "(48, 128)" in msg and "(32, 128)" in msg


def test_unexpected_tensor(ckpt: Path) -> None:
    state = load_file(ckpt / SINGLE_FILE)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, ckpt / SINGLE_FILE)
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_norm"):
        load_pretrained(ckpt)


def test_extra_layer_is_unexpected(ckpt: Path) -> None:
    """A checkpoint with more layers than config.json says is an error, not silently cut."""
    state = load_file(ckpt / SINGLE_FILE)
    state["model.layers.4.mlp.up_proj.weight"] = state["model.layers.3.mlp.up_proj.weight"]
    save_file({k: v.clone() for k, v in state.items()}, ckpt / SINGLE_FILE)
    with pytest.raises(ValueError, match=r"model\.layers\.4\.mlp\.up_proj\.weight"):
        load_pretrained(ckpt)


def test_integer_tensor_is_rejected(ckpt: Path) -> None:
    state = load_file(ckpt / SINGLE_FILE)
    state["model.norm.weight"] = torch.ones(128, dtype=torch.int32)
    save_file(state, ckpt / SINGLE_FILE)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_pretrained(ckpt)


def test_index_refers_to_missing_shard(tmp_path) -> None:
    save_pretrained(_model(seed=9), tmp_path, max_shard_bytes=200_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        load_pretrained(tmp_path)


def test_index_lists_tensor_absent_from_its_shard(tmp_path) -> None:
    save_pretrained(_model(seed=9), tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    name = "model.layers.0.mlp.gate_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values()))
                 if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        load_pretrained(tmp_path)


def test_corrupt_index(tmp_path) -> None:
    save_pretrained(_model(seed=9), tmp_path, max_shard_bytes=200_000)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=INDEX_FILE.replace(".", r"\.")):
        load_pretrained(tmp_path)
    (tmp_path / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="index"):
        load_pretrained(tmp_path)


def test_no_weights(ckpt: Path) -> None:
    (ckpt / SINGLE_FILE).unlink()
    with pytest.raises(ValueError, match=SINGLE_FILE):
        load_pretrained(ckpt)


def test_corrupted_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"hidden_size": 128, ')
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(ckpt)


def test_config_with_bad_field(ckpt: Path) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    raw["num_hidden_layers"] = "4"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_pretrained(ckpt)


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(ckpt)


def test_folder_does_not_exist(tmp_path) -> None:
    with pytest.raises(ValueError, match="does-not-exist"):
        load_pretrained(tmp_path / "does-not-exist")


def test_config_that_disagrees_with_weights(ckpt: Path) -> None:
    """config.json says intermediate 200 but the tensors are 256 wide: a shape error."""
    raw = json.loads((ckpt / "config.json").read_text())
    raw["intermediate_size"] = 200
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*\(256, 128\)"
                                         r"|mlp\.(gate|up|down)_proj\.weight.*\(128, 256\)"):
        load_pretrained(ckpt)


# --------------------------------------------------------------------------- compatibility
def test_rotary_inv_freq_in_checkpoint_is_ignored(ckpt: Path) -> None:
    state = load_file(ckpt / SINGLE_FILE)
    for i in range(4):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.full((8,), 123.0)
    save_file(state, ckpt / SINGLE_FILE)
    loaded = load_pretrained(ckpt)
    reference = MiniCPM4ForCausalLM(loaded.config)
    rotary, ref_rotary = loaded.model.rotary_emb, reference.model.rotary_emb
    assert torch.equal(rotary.inv_freq_short, ref_rotary.inv_freq_short)
    assert torch.equal(rotary.inv_freq_long, ref_rotary.inv_freq_long)
    assert not torch.isnan(loaded(IDS)).any()


def test_loaded_rope_buffers_equal_fresh_model(saved_fp32) -> None:
    model, folder = saved_fp32
    loaded = load_pretrained(folder)
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name


def test_explicit_config_argument_overrides_file(saved_fp32) -> None:
    model, folder = saved_fp32
    loaded = load_pretrained(folder, config=model.config.replace(torch_dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16


def test_parse_dtype() -> None:
    assert checkpoint.parse_dtype("bf16") is torch.bfloat16
    assert checkpoint.parse_dtype(torch.float16) is torch.float16
    assert checkpoint.parse_dtype(None) is None
    with pytest.raises(ValueError, match="int8"):
        checkpoint.parse_dtype("int8")
