"""HF-format checkpoints: `load_pretrained` / `save_pretrained` over safetensors (spec §1.2).

Single files (`model.safetensors`) and shards with `model.safetensors.index.json` are read one
tensor at a time into a model built on the `meta` device, so peak memory is the model plus
one tensor (an 8B checkpoint loads in about its own size of RAM). Every problem (truncated
file, missing, unexpected or mis-shaped tensor, bad index) is a `ValueError` naming the file
or tensor. The optional MTP draft head (spec §1.4, `model/mtp.py`) is stored as `mtp.*` tensors
next to the trunk; they are expected exactly when config.json has `num_mtp_layers: 1`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minicpm4.model.config import ModelConfig
from minicpm4.model.hf import load_config, save_config
from minicpm4.model.transformer import MiniCPM4ForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some exporters write; we recompute them."""

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map tensor name -> file holding it."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index: {exc}") from exc
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: 'weight_map' must be an object")
        files = {name: folder / str(file) for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise ValueError(f"{index} refers to missing shard {file.name}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{single} is not a readable safetensors file: {exc}") from exc


def _iter_tensors(files: dict[str, Path], *,
                  converting: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) backed by the file's memory map (no copy).

    When the caller converts each tensor (dtype or device change), the file is reopened per
    tensor so that each mapping is released as soon as its tensor is converted: peak memory
    stays at the converted model plus one source tensor, not plus the whole file.
    """
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise ValueError(f"tensor '{name}' is listed in the index but missing "
                                         f"from {file.name}")
                    if not converting:
                        yield name, f.get_tensor(name)
            if converting:
                for name in names:
                    with safe_open(file, framework="pt") as f:
                        tensor = f.get_tensor(name)
                    yield name, tensor
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{file} is truncated or corrupt: {exc}") from exc


def _stored_dtype(files: dict[str, Path]) -> torch.dtype | None:
    """dtype of the first tensor (None when the file cannot be read; errors come later)."""
    name, file = next(iter(files.items()))
    try:
        with safe_open(file, framework="pt") as f:
            return _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
    except (SafetensorError, OSError):
        return None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_pretrained(folder: str | Path, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu",
                    config: ModelConfig | None = None) -> MiniCPM4ForCausalLM:
    """Load an HF MiniCPM4 checkpoint folder. dtype None keeps the config's `torch_dtype`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist")
    cfg = config or load_config(folder)
    target = parse_dtype(dtype) or parse_dtype(cfg.torch_dtype) or torch.float32
    files = _weight_files(folder)
    with torch.device("meta"):
        model = MiniCPM4ForCausalLM(cfg)
    expected = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    tied = cfg.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    names = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if tied:
        names.discard("lm_head.weight")
    missing = sorted(set(expected) - names)
    if missing:
        raise ValueError(f"checkpoint {folder} is missing tensor(s): {_listing(missing)}"
                         + _mtp_hint(missing, cfg))
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise ValueError(f"checkpoint {folder} has unexpected tensor(s) for this config: "
                         f"{_listing(unexpected)}" + _mtp_hint(unexpected, cfg))
    loaded: dict[str, torch.Tensor] = {}
    stored = _stored_dtype(files)
    converting = torch.device(device).type != "cpu" or stored != target
    for name, tensor in _iter_tensors({n: files[n] for n in names}, converting=converting):
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"tensor '{name}' has shape {tuple(tensor.shape)}, the config "
                             f"expects {want}")
        if not tensor.is_floating_point():
            raise ValueError(f"tensor '{name}' has non-floating dtype {tensor.dtype}")
        loaded[name] = tensor.to(device=device, dtype=target)
    model.load_state_dict(loaded, strict=False, assign=True)
    model.model.rotary_emb.reset_buffers()
    model.model.rotary_emb.to(device)
    model.tie_weights()
    return model.eval()


def _listing(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _mtp_hint(names: list[str], cfg: ModelConfig) -> str:
    if not any(n.startswith("mtp.") for n in names):
        return ""
    return (f" (the MTP head's 'mtp.*' tensors are expected exactly when config field "
            f"'num_mtp_layers' is 1; it is {cfg.num_mtp_layers})")


def _state_for_saving(model: MiniCPM4ForCausalLM,
                      dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu")
        state[name] = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
    return state


def save_pretrained(model: MiniCPM4ForCausalLM, folder: str | Path, *,
                    dtype: str | torch.dtype | None = None,
                    max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`).

    Files are written to temporary names and renamed, so an interrupted save never leaves a
    half-written checkpoint under the final names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = parse_dtype(dtype)
    state = _state_for_saving(model, target)
    stored = target or model.dtype
    cfg = model.config.replace(torch_dtype=str(stored).removeprefix("torch."))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(shards[0], folder / SINGLE_FILE, metadata)
        (folder / INDEX_FILE).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, folder / fname, metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2))
        (folder / SINGLE_FILE).unlink(missing_ok=True)
    save_config(cfg, folder)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
