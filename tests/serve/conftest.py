"""A real server for the serve tests: the real engine on a tiny random MiniCPM4 (real
vocabulary) with the real tokenizer, behind a real uvicorn on 127.0.0.1, one per module."""

from __future__ import annotations

import pytest
import torch

from minicpm4.tokenizer import Tokenizer
from tests.conftest import TOKENIZER_DIR, require

API_KEY = "test-key"
MAX_MODEL_LEN = 512
MAX_REQUEST_BYTES = 256 * 1024


def tiny_engine(*, max_model_len: int = MAX_MODEL_LEN, max_num_seqs: int = 32):
    """AsyncEngine over a 4-layer, hidden-128 random model with the 73448-token vocabulary."""
    from minicpm4.engine.async_engine import AsyncEngine
    from minicpm4.engine.config import EngineConfig
    from minicpm4.engine.llm import LLM
    from minicpm4.loading import random_model

    torch.set_num_threads(1)
    tok = Tokenizer.from_pretrained(require(TOKENIZER_DIR))
    model = random_model("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=0)
    llm = LLM(model, tok, EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs))
    return AsyncEngine(llm)


@pytest.fixture(scope="module")
def server():
    """(ServerThread, engine) with API key `API_KEY`."""
    from minicpm4.serve.launch import ServerThread
    from minicpm4.serve.server import build_app

    engine = tiny_engine()
    app = build_app(engine, api_key=API_KEY, max_request_bytes=MAX_REQUEST_BYTES)
    with ServerThread(app) as srv:
        yield srv, engine


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    srv, _ = server
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return server[1].model_name
