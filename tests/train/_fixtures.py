"""Shared helpers for the train tests: a synthetic token-shard folder in the `data.tokenize`
format, a tiny model config and a fast `TrainConfig`."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np

from minicpm4.data.tokenize import FORMAT, OFFSET_DTYPE, TOKEN_DTYPE, VERSION
from minicpm4.model.config import ModelConfig
from minicpm4.model.hf import save_config
from minicpm4.train.config import OptimConfig, ScheduleConfig
from minicpm4.train.recipe import TrainConfig

VOCAB = 128


def write_shards(folder: Path, *, num_docs: int = 60, seed: int = 0, vocab: int = VOCAB,
                 docs_per_shard: int = 25) -> Path:
    """Documents ``1 ... 2`` of random length (8..120) with a learnable pattern, in shards."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(8, 120))
        start = int(rng.integers(3, vocab))
        body = (start + np.arange(n) * int(rng.integers(1, 4))) % (vocab - 3) + 3
        docs.append(np.concatenate([[1], body, [2]]).astype(TOKEN_DTYPE))
    shards, content = [], hashlib.sha256()
    for k in range(0, num_docs, docs_per_shard):
        chunk = docs[k:k + docs_per_shard]
        name = f"shard-{len(shards):05d}"
        data = np.concatenate(chunk).astype(TOKEN_DTYPE).tobytes()
        offsets = np.cumsum([0] + [len(d) for d in chunk]).astype(OFFSET_DTYPE).tobytes()
        (folder / f"{name}.bin").write_bytes(data)
        (folder / f"{name}.idx").write_bytes(offsets)
        content.update(data)
        content.update(offsets)
        shards.append({"tokens": f"{name}.bin", "offsets": f"{name}.idx",
                       "num_tokens": sum(len(d) for d in chunk), "num_documents": len(chunk),
                       "sha256": hashlib.sha256(data + offsets).hexdigest()})
    index = {"format": FORMAT, "version": VERSION, "dtype": TOKEN_DTYPE.str,
             "offsets_dtype": OFFSET_DTYPE.str, "bos_id": 1, "eos_id": 2,
             "num_documents": num_docs, "num_tokens": sum(s["num_tokens"] for s in shards),
             "shards": shards, "content_sha256": content.hexdigest()}
    (folder / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder


def tiny_model_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                eos_token_id=(2,), dim_model_base=16, torch_dtype="float32",
                tie_word_embeddings=False)
    base.update(overrides)
    return ModelConfig(**base)


def write_model_config(path: Path, **overrides) -> Path:
    """config.json of `tiny_model_config` in folder `path`; returns the file."""
    save_config(tiny_model_config(**overrides), path)
    return path / "config.json"


def tiny_train_config(data: Path, run_dir: Path, *, steps: int = 8, **overrides) -> TrainConfig:
    base = dict(model=tiny_model_config(), data=str(data), run_dir=str(run_dir),
                optim=OptimConfig(lr=1e-2, weight_decay=0.1),
                schedule=ScheduleConfig(warmup_steps=2, total_steps=steps, decay_fraction=0.25),
                seq_len=32, batch_size=4, device="cpu", distributed="none")
    base.update(overrides)
    return TrainConfig(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
