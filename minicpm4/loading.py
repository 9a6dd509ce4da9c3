"""Resolve what the user asked for (model folder, preset, device, dtype) into objects.

Shared by the CLI and, later, the server: the bundled tokenizer and model locations, the
preset shapes, device/dtype policy (no float16 on CPU) and the `info` summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minicpm4.kernels.infllm_v2.selection import LSE_MODES
from minicpm4.model.checkpoint import load_pretrained, parse_dtype
from minicpm4.model.config import ModelConfig, SparseConfig
from minicpm4.model.hf import load_config
from minicpm4.model.rope_extension import extend_context
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_TOKENIZER = ASSETS / "tokenizer"
BUNDLED_MODEL = ASSETS / "demo"


def tiny_preset() -> ModelConfig:
    """A few-MB MiniCPM4 with the real vocabulary, for smoke tests and random-weight demos."""
    return ModelConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=4096, torch_dtype="float32")


PRESETS = {
    "minicpm4-8b": ModelConfig.minicpm4_8b,
    "minicpm4-0.5b": ModelConfig.minicpm4_0p5b,
    "tiny": tiny_preset,
}
RANDOM_PRESETS = PRESETS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"invalid device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """None means "as stored". float16 on CPU is refused: it runs ~100x slower than fp32."""
    dtype = None if name in (None, "auto") else parse_dtype(name)
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is not supported on CPU (about 0.4 GFLOP/s); "
                         "use --dtype float32 or bfloat16")
    return dtype


def _default_model_dir() -> Path:
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    raise ValueError("no bundled model in this build; pass --model DIR (an HF MiniCPM4 "
                     "folder) or --random PRESET")


def load_tokenizer(tokenizer_dir: str | None, model_dir: Path | None) -> Tokenizer:
    if tokenizer_dir is not None:
        return Tokenizer.from_pretrained(tokenizer_dir)
    if model_dir is not None and ((model_dir / "tokenizer.json").is_file() or
                                  (model_dir / "tokenizer.model").is_file()):
        return Tokenizer.from_pretrained(model_dir)
    return Tokenizer.from_pretrained(BUNDLED_TOKENIZER)


def random_model(preset: str, *, dtype: torch.dtype | None, device: torch.device,
                 seed: int = 0, config: ModelConfig | None = None) -> MiniCPM4ForCausalLM:
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(RANDOM_PRESETS)}")
    model = MiniCPM4ForCausalLM(config or RANDOM_PRESETS[preset]())
    model.init_weights(seed=seed)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def apply_sparse_args(cfg: ModelConfig, args: argparse.Namespace) -> ModelConfig:
    """InfLLM v2 switches of the CLI (spec §2.1): `--sparse` turns it on with the published
    defaults (or the checkpoint's own sparse_config), `--dense` turns it off, and
    `--sparse-topk/-window/-dense-len/-init-blocks` override single fields."""
    if getattr(args, "sparse", False) and getattr(args, "dense", False):
        raise ValueError("--sparse and --dense are mutually exclusive")
    if getattr(args, "dense", False):
        return cfg.replace(sparse_config=None)
    fields = {name: getattr(args, f"sparse_{name}", None)
              for name in ("topk", "window_size", "dense_len", "init_blocks")}
    fields = {k: v for k, v in fields.items() if v is not None}
    if not getattr(args, "sparse", False) and not fields:
        return cfg
    base = cfg.sparse_config or SparseConfig()
    return cfg.replace(sparse_config=base.replace(**fields) if fields else base)


def parse_context(value: str | int) -> int:
    """`--context` value -> tokens: a positive integer, or N with a `k` suffix (N x 1024, e.g.
    "32k" = 32768, "128k" = 131072)."""
    if isinstance(value, int) and not isinstance(value, bool):
        tokens = value
    else:
        text = str(value).strip().lower()
        number, mult = (text[:-1], 1024) if text.endswith("k") else (text, 1)
        if not number.isdigit():
            raise ValueError(f"--context must be a token count such as 4096, 32k, 64k or 128k, "
                             f"got {value!r}")
        tokens = int(number) * mult
    if tokens <= 0:
        raise ValueError(f"--context must be positive, got {value!r}")
    return tokens


def apply_context(cfg: ModelConfig, context: str | int | None) -> ModelConfig:
    """`--context` presets (spec §1.3): None leaves `cfg` alone; otherwise the model is made to
    reach that many positions: `max_position_embeddings` = the target and LongRoPE factors
    extended by `model.rope_extension.extend_context` (derived by YaRN's by-parts rule on top of
    the config's own factors; for MiniCPM4-8B's shipped 32K list, `--context 128k` gives a
    derived 128K list with original_max 32768, *not* the README's published one, which is not
    available offline). A target the model already reaches changes nothing."""
    if context is None:
        return cfg
    return extend_context(cfg, parse_context(context))


def set_sparse_lse(model: MiniCPM4ForCausalLM, mode: str | None) -> None:
    """Selection LSE mode of every InfLLM v2 layer ("approx" default, or "exact")."""
    if mode is None:
        return
    if mode not in LSE_MODES:
        raise ValueError(f"--sparse-lse must be one of {LSE_MODES}, got {mode!r}")
    for layer in model.model.layers:
        layer.self_attn.sparse_lse = mode


def load_model_and_tokenizer(args: argparse.Namespace
                             ) -> tuple[MiniCPM4ForCausalLM, Tokenizer]:
    """From CLI-style args: --model/--random, --tokenizer, --device, --dtype, --context and the
    sparse switches."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.random and args.model:
        raise ValueError("--random and --model are mutually exclusive")
    if args.random:
        cfg = apply_context(RANDOM_PRESETS[args.random](), getattr(args, "context", None))
        model, model_dir = random_model(args.random, dtype=dtype, device=device,
                                        config=apply_sparse_args(cfg, args)), None
    else:
        model_dir = Path(args.model) if args.model else _default_model_dir()
        if not model_dir.is_dir():
            raise ValueError(f"model folder {model_dir} does not exist")
        cfg = apply_context(load_config(model_dir), getattr(args, "context", None))
        cfg = apply_sparse_args(cfg, args)
        model = load_pretrained(model_dir, dtype=dtype, device=device, config=cfg)
        if dtype is None and model.dtype == torch.float16 and device.type == "cpu":
            model = model.float()
    set_sparse_lse(model, getattr(args, "sparse_lse", None))
    tok = load_tokenizer(args.tokenizer, model_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}")
    return model, tok


def resolve_config(*, model: str | None, preset: str | None) -> ModelConfig:
    if model and preset:
        raise ValueError("give --model or --preset, not both")
    if preset:
        return PRESETS[preset]()
    return load_config(Path(model) if model else _default_model_dir())


def _gib(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def describe(cfg: ModelConfig, *, context: int | None = None) -> str:
    """Human-readable summary: shape, parameter counts, weight and KV-cache memory."""
    context = context or cfg.max_position_embeddings
    total = cfg.num_parameters()
    emb = cfg.vocab_size * cfg.hidden_size
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim_
    rs = cfg.rope_scaling
    rope = "plain RoPE" if rs is None else \
        f"LongRoPE (original {rs.original_max_position_embeddings}, " \
        f"factors {min(rs.long_factor):.3f}..{max(rs.long_factor):.3f})"
    sparse = "off" if cfg.sparse_config is None else \
        f"InfLLM v2 topk {cfg.sparse_config.topk} + {cfg.sparse_config.local_blocks} local " \
        f"blocks of {cfg.sparse_config.block_size}, dense below {cfg.sparse_config.dense_len}"
    lines = [
        f"architecture      {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, ffn {cfg.intermediate_size}, heads {cfg.num_attention_heads} q / "
        f"{cfg.num_key_value_heads} kv x {cfg.head_dim_}",
        f"vocabulary        {cfg.vocab_size} ({'tied' if cfg.tie_word_embeddings else 'untied'}"
        f" embeddings)",
        f"positions         max {cfg.max_position_embeddings}, theta {cfg.rope_theta:g}, {rope}",
        f"muP               scale_emb {cfg.scale_emb:g}, scale_depth {cfg.scale_depth:g}, "
        f"dim_model_base {cfg.dim_model_base}",
        f"sparse attention  {sparse}",
        f"parameters        {total:,} ({total / 1e9:.3f} B; {total - emb:,} non-embedding)",
        f"weights           fp32 {_gib(total * 4)}, bf16 {_gib(total * 2)}, "
        f"int4 (group 128) ~{_gib(total * (0.5 + 2 / 128))}",
        f"KV cache          {kv_per_token:,} values/token; bf16 {_gib(kv_per_token * 2)}/token, "
        f"{_gib(kv_per_token * 2 * context)} at {context} tokens",
        f"decode reads      ~{_gib((total - (0 if cfg.tie_word_embeddings else emb)) * 2)} of "
        f"bf16 weights per token (batch 1)",
    ]
    return "\n".join(lines)
