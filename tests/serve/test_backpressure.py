"""A full engine queue answers 503 with a JSON error body (issue 5: robust under load), and the
server serves again once the queue drains."""

from __future__ import annotations

import threading
import time

import httpx
import torch

from tests.conftest import TOKENIZER_DIR, require


def test_full_queue_is_a_503_then_service_resumes() -> None:
    from minicpm4.engine.async_engine import AsyncEngine
    from minicpm4.engine.config import EngineConfig
    from minicpm4.engine.llm import LLM
    from minicpm4.loading import random_model
    from minicpm4.serve.launch import ServerThread
    from minicpm4.serve.server import build_app
    from minicpm4.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tok = Tokenizer.from_pretrained(require(TOKENIZER_DIR))
    model = random_model("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=0)
    llm = LLM(model, tok, EngineConfig(max_model_len=4096, max_num_seqs=1,
                                       max_queued_requests=1))
    body = {"prompt": "hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    with ServerThread(build_app(AsyncEngine(llm))) as srv:
        url = srv.url + "/v1/completions"
        with httpx.Client(timeout=60) as client, \
                client.stream("POST", url, json={**body, "stream": True,
                                                 "max_tokens": 4000}) as running:
            lines = running.iter_lines()  # (kept: a dropped iterator closes the stream)
            next(lines)  # request 1 holds the only slot (for seconds)
            queued = threading.Thread(target=lambda: httpx.post(url, json=body, timeout=60))
            queued.start()
            deadline = time.monotonic() + 20
            while llm.load()[1] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert llm.load() == (1, 1)
            refused = client.post(url, json=body)
            assert refused.status_code == 503
            assert "retry later" in refused.json()["error"]["message"]
        # leaving the stream disconnects request 1 (aborted); the queued request then runs
        queued.join(60)
        assert not queued.is_alive()
        ok = httpx.post(url, json={**body, "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_engine_failure_mid_request_is_a_503_then_service_resumes() -> None:
    """A step that raises while requests run: a non-streaming request (n = 1 and n = 2) gets
    a 503 with a JSON error body, and the next request is served."""
    from minicpm4.engine.async_engine import AsyncEngine
    from minicpm4.engine.config import EngineConfig
    from minicpm4.engine.llm import LLM
    from minicpm4.loading import random_model
    from minicpm4.serve.launch import ServerThread
    from minicpm4.serve.server import build_app
    from minicpm4.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tok = Tokenizer.from_pretrained(require(TOKENIZER_DIR))
    model = random_model("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=0)
    llm = LLM(model, tok, EngineConfig(max_model_len=4096))
    real_run, fail = llm.runner.run, {"at": None, "calls": 0}

    def flaky_run(scheduled):
        fail["calls"] += 1
        if fail["calls"] == fail["at"]:
            raise RuntimeError("injected kernel failure")
        return real_run(scheduled)

    llm.runner.run = flaky_run
    body = {"prompt": "hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    with ServerThread(build_app(AsyncEngine(llm))) as srv:
        url = srv.url + "/v1/completions"
        for n in (1, 2):
            fail.update(at=fail["calls"] + 3)  # after the first token(s)
            r = httpx.post(url, json={**body, "n": n}, timeout=60)
            assert r.status_code == 503, r.text
            assert "injected" in r.json()["error"]["message"]
            ok = httpx.post(url, json={**body, "max_tokens": 3, "n": n}, timeout=60)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3 * n
