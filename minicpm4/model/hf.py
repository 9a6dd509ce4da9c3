"""Hugging Face `config.json` <-> `ModelConfig` translation (spec §1.2, §2.1, §3.1).

Reads the fields of MiniCPM4 / MiniCPM4.1 (`model_type: minicpm`) and MiniCPM-SALA
(`minicpm_sala`) configs. A missing required field or a value of the wrong type is a
`ValueError` that names the field; unknown top-level keys are kept in `ModelConfig.extra`
so that saving reproduces them. `num_mtp_layers` (the MTP draft head of spec §1.4, not an HF
key) is read when present (absent = 0) and written only when non-zero, so configs without
an MTP head stay byte-identical to the HF ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minicpm4.model.config import ModelConfig, RopeScaling, SparseConfig

MINICPM4_8B_ROPE_FACTORS: tuple[float, ...] = (
    0.9977997200264581, 1.014658295992452, 1.0349680404997148, 1.059429246056193,
    1.0888815016813513, 1.1243301355211495, 1.166977103606075, 1.2182568066927284,
    1.2798772354275727, 1.3538666751582975, 1.4426259039919596, 1.5489853358570191,
    1.6762658237220625, 1.8283407612492941, 2.0096956085876183, 2.225478927469756,
    2.481536379650452, 2.784415934557119, 3.1413289096347365, 3.560047844772632, 4.048719380066383,
    4.615569542115128, 5.2684819496549835, 6.014438591970396, 6.858830049237097, 7.804668263503327,
    8.851768731513417, 9.99600492938444, 11.228766118181639, 12.536757560834843,
    13.902257701387796, 15.303885189125953, 16.717837610115794, 18.119465097853947,
    19.484965238406907, 20.792956681060105, 22.02571786985731, 23.16995406772833,
    24.217054535738416, 25.16289275000465, 26.007284207271347, 26.753240849586767,
    27.40615325712662, 27.973003419175363, 28.461674954469114, 28.880393889607006,
    29.237306864684626, 29.540186419591297, 29.79624387177199, 30.01202719065413,
    30.193382037992453, 30.34545697551969, 30.47273746338473, 30.579096895249787,
    30.66785612408345, 30.741845563814174, 30.80346599254902, 30.85474569563567,
    30.897392663720595, 30.932841297560394, 30.962293553185553, 30.986754758742034,
    31.007064503249293, 31.02392307921529,
)

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "scale_emb", "scale_depth", "dim_model_base")
"""Fields with no safe default: guessing a μP scalar would silently give wrong logits."""

_INT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "dim_model_base", "mup_denominator", "bos_token_id", "pad_token_id", "lightning_nh",
        "lightning_nkv", "lightning_head_dim")
_FLOAT = ("rms_norm_eps", "rope_theta", "scale_emb", "scale_depth", "initializer_range")
_BOOL = ("tie_word_embeddings", "attention_bias", "attn_use_rope", "attn_use_output_gate",
         "lightning_use_rope", "qk_norm", "use_output_gate", "use_output_norm")
_STR = ("hidden_act", "torch_dtype", "lightning_scale", "model_type")
_IGNORED = ("architectures", "auto_map", "transformers_version", "_name_or_path", "use_cache",
            "dtype", "rope_parameters")
_MODEL_TYPES = ("minicpm", "minicpm4", "minicpm_sala")


def _bad(name: str, msg: str) -> ValueError:
    return ValueError(f"config field '{name}': {msg}")


def _typed(name: str, value: Any, kind: type) -> Any:
    if value is None and name in ("head_dim", "pad_token_id", "lightning_nh", "lightning_nkv",
                                  "lightning_head_dim"):
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(name, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _rope_scaling(raw: Any) -> RopeScaling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("rope_scaling", f"expected an object or null, got {raw!r}")
    rope_type = raw.get("rope_type", raw.get("type"))
    if rope_type in (None, "default"):
        return None
    for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
        if key not in raw:
            raise _bad(f"rope_scaling.{key}", "missing")
    factors = {}
    for key in ("short_factor", "long_factor"):
        seq = raw[key]
        if not isinstance(seq, list) or not all(isinstance(x, (int, float)) for x in seq):
            raise _bad(f"rope_scaling.{key}", "expected a list of numbers")
        factors[key] = tuple(float(x) for x in seq)
    return RopeScaling(rope_type=str(rope_type), **factors,
                       original_max_position_embeddings=_typed(
                           "rope_scaling.original_max_position_embeddings",
                           raw["original_max_position_embeddings"], int),
                       factor=raw.get("factor"), attention_factor=raw.get("attention_factor"))


def _sparse_config(raw: Any) -> SparseConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("sparse_config", f"expected an object or null, got {raw!r}")
    known = {f.name: f.type for f in SparseConfig.__dataclass_fields__.values()}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise _bad("sparse_config", f"unknown key(s) {unknown}; known: {sorted(known)}")
    values = {k: _typed(f"sparse_config.{k}", v, bool if k == "use_nope" else int)
              for k, v in raw.items()}
    return SparseConfig(**values)


def config_from_hf_dict(raw: dict[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from a parsed HF config.json; errors name the bad field."""
    if not isinstance(raw, dict):
        raise ValueError("config.json must contain a JSON object")
    model_type = raw.get("model_type", "minicpm")
    if model_type not in _MODEL_TYPES:
        raise _bad("model_type", f"{model_type!r} is not a MiniCPM4 family model "
                                 f"(expected one of {_MODEL_TYPES})")
    for name in _REQUIRED:
        if name not in raw:
            raise _bad(name, "missing (required for a MiniCPM4 model)")
    kwargs: dict[str, Any] = {}
    for names, kind in ((_INT, int), (_FLOAT, float), (_BOOL, bool), (_STR, str)):
        for name in names:
            if name in raw:
                kwargs[name] = _typed(name, raw[name], kind)
    kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
    eos = raw.get("eos_token_id", [2, 73440])
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(t, int) for t in eos) or not eos:
        raise _bad("eos_token_id", f"expected an int or a list of ints, got {eos!r}")
    kwargs["eos_token_id"] = tuple(eos)
    rope_raw = raw.get("rope_scaling", raw.get("rope_parameters"))
    kwargs["rope_scaling"] = _rope_scaling(rope_raw)
    if isinstance(rope_raw, dict) and "rope_theta" in rope_raw and "rope_theta" not in raw:
        kwargs["rope_theta"] = _typed("rope_theta", rope_raw["rope_theta"], float)
    kwargs["sparse_config"] = _sparse_config(raw.get("sparse_config"))
    if "num_mtp_layers" in raw:
        kwargs["num_mtp_layers"] = _typed("num_mtp_layers", raw["num_mtp_layers"], int)
    mixers = raw.get("mixer_types")
    if mixers is not None:
        if not isinstance(mixers, list) or not all(isinstance(m, str) for m in mixers):
            raise _bad("mixer_types", "expected a list of strings")
        kwargs["mixer_types"] = tuple(mixers)
    handled = set(kwargs) | set(_IGNORED) | {"eos_token_id", "rope_scaling", "sparse_config",
                                             "mixer_types", "num_mtp_layers"}
    kwargs["extra"] = {k: v for k, v in raw.items() if k not in handled}
    return ModelConfig(**kwargs)


def config_to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json object for `cfg` (round-trips through `config_from_hf_dict`)."""
    out: dict[str, Any] = {
        "architectures": ["MiniCPMSALAForCausalLM" if cfg.model_type == "minicpm_sala"
                          else "MiniCPMForCausalLM"],
    }
    for name in _INT + _FLOAT + _BOOL + _STR:
        value = getattr(cfg, name)
        if value is not None or name == "pad_token_id":  # absent pad_token_id reads back as 2
            out[name] = value
    out["eos_token_id"] = list(cfg.eos_token_id)
    rs = cfg.rope_scaling
    out["rope_scaling"] = None if rs is None else {
        "rope_type": rs.rope_type, "long_factor": list(rs.long_factor),
        "short_factor": list(rs.short_factor),
        "original_max_position_embeddings": rs.original_max_position_embeddings,
        **({"factor": rs.factor} if rs.factor is not None else {}),
        **({"attention_factor": rs.attention_factor} if rs.attention_factor is not None else {}),
    }
    if cfg.sparse_config is not None:
        out["sparse_config"] = {f: getattr(cfg.sparse_config, f)
                                for f in SparseConfig.__dataclass_fields__}
    if cfg.mixer_types is not None:
        out["mixer_types"] = list(cfg.mixer_types)
    if cfg.num_mtp_layers:
        out["num_mtp_layers"] = cfg.num_mtp_layers
    out.update(cfg.extra)
    return out


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no config.json at {file}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    try:
        return config_from_hf_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc


def save_config(cfg: ModelConfig, folder: str | Path) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    text = json.dumps(config_to_hf_dict(cfg), indent=2)
    (Path(folder) / "config.json").write_text(text + "\n", encoding="utf-8")
