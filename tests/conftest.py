"""Shared fixtures: tiny random MiniCPM4 configs, the shared data folder, markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from minicpm4.model.config import ModelConfig, RopeScaling

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "minicpm4-tokenizer"
REAL_8B_CONFIG = SHARED_DATA / "configs" / "minicpm4-8b.config.json"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running; excluded from the default run")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_config(**overrides) -> ModelConfig:
    """hidden 128, 4 layers, 8 query / 2 KV heads (head_dim 16), vocab 512, LongRoPE factors
    subsampled from the shipped MiniCPM4-8B list with original_max_position_embeddings 64."""
    from minicpm4.model.hf import MINICPM4_8B_ROPE_FACTORS
    short = MINICPM4_8B_ROPE_FACTORS[::8]
    long = MINICPM4_8B_ROPE_FACTORS[7::8]
    base = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=(2,), initializer_range=0.02, torch_dtype="float32",
                rope_scaling=RopeScaling(short_factor=short, long_factor=long,
                                         original_max_position_embeddings=64))
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def tiny_model():
    from minicpm4.model.transformer import MiniCPM4ForCausalLM
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny_config())
    model.init_weights(seed=0)
    return model.eval()


@pytest.fixture
def tiny_bf16_model():
    """The tiny model without RoPE scaling, in bf16 (where the CPU inference kernels run)."""
    from minicpm4.model.transformer import MiniCPM4ForCausalLM
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny_config(rope_scaling=None))
    model.init_weights(seed=0)
    return model.bfloat16().eval()


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path
