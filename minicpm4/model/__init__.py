"""The MiniCPM4 network: single-device PyTorch with HF parameter names (spec §1)."""

from minicpm4.model.config import ModelConfig, RopeScaling, SparseConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM

__all__ = ["MiniCPM4ForCausalLM", "ModelConfig", "RopeScaling", "SparseConfig"]
