"""A small bounded load test (issue 5, acceptance 4; the 300-request one is
benchmarks/serve_load.py) and the server's lifecycle: graceful shutdown lets a running stream
finish, then the engine stops."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from minicpm4.serve import loadgen
from tests.serve.conftest import API_KEY, tiny_engine

pytestmark = pytest.mark.timeout(180)
PROMPTS = [f"Tell me about item number {i}." for i in range(10)]


def test_bounded_load_no_errors_no_lost_tokens(server, model_name) -> None:
    srv, engine = server
    refs = asyncio.run(loadgen.reference_texts(srv.url, API_KEY, model_name, PROMPTS, 12))
    report = asyncio.run(loadgen.run_load(srv.url, api_key=API_KEY, model=model_name,
                                          prompts=PROMPTS, num_requests=40, concurrency=8,
                                          max_tokens=12, references=refs))
    print(report.summary())
    assert len(report.results) == 40
    assert report.server_errors == 0 and len(report.ok) == 40
    assert report.missing_done == 0
    assert report.token_mismatches == 0  # streamed tokens == usage.completion_tokens
    assert report.text_mismatches == 0  # streamed greedy text == non-streamed greedy text
    assert all(r.usage_tokens and r.usage_tokens <= 12 for r in report.ok)
    assert report.latency(50) <= report.latency(99)
    assert engine.stats()["num_running"] == 0


def test_graceful_shutdown_finishes_the_running_stream() -> None:
    from minicpm4.serve.launch import ServerThread
    from minicpm4.serve.server import build_app

    engine = tiny_engine()
    app = build_app(engine)
    srv = ServerThread(app).start()
    first_token, result = threading.Event(), {}

    def client() -> None:
        body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 120,
                "temperature": 0.0, "stream": True, "ignore_eos": True}
        lines = []
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body,
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    first_token.set()
        result["lines"] = lines

    t = threading.Thread(target=client)
    t.start()
    assert first_token.wait(30)
    srv.stop()  # uvicorn stops accepting, waits for the stream, then the lifespan ends
    t.join(30)
    assert result["lines"][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in result["lines"][-2]
    assert app.state.serve.draining and not engine.accepting
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=5)
