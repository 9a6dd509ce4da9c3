"""minicpm4: run, serve, compress and train MiniCPM4-family models on your own hardware.

Public API: `ModelConfig`, `MiniCPM4ForCausalLM`, `Tokenizer`, `SamplingParams`, `generate`,
`LLM` / `EngineConfig` (the continuous-batching engine: `LLM(model, tokenizer).generate(...)`).
See docs/architecture.md for the map of the package.
"""

from minicpm4.engine.config import EngineConfig
from minicpm4.engine.generate import generate, generate_stream
from minicpm4.engine.llm import LLM
from minicpm4.engine.request import SamplingParams
from minicpm4.model.config import ModelConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "MiniCPM4ForCausalLM", "ModelConfig", "SamplingParams", "Tokenizer", "generate",
           "generate_stream"]
