"""The server end to end (issue 5, acceptance 2): real uvicorn, real `openai` client, real
engine on a tiny random model. Non-streaming, streaming, n, completions, logprobs, 16
concurrent streams, a cancelled stream, tool calls, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.serve.conftest import API_KEY, MAX_MODEL_LEN

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(120)

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three rivers in Europe."}]
GREEDY = dict(temperature=0.0, max_tokens=12)


def _wait_idle(engine, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.05)


def test_models_health_metrics(server, client, model_name) -> None:
    srv, _ = server
    assert [m.id for m in client.models.list().data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}  # no key needed
    text = httpx.get(srv.url + "/metrics").text
    for name in ("minicpm4_num_running", "minicpm4_generation_tokens_total",
                 "minicpm4_time_to_first_token_seconds_bucket",
                 "minicpm4_e2e_latency_seconds_count", "minicpm4_http_requests_total"):
        assert name in text
    assert "# TYPE minicpm4_time_to_first_token_seconds histogram" in text


def test_chat_non_streaming(client, model_name) -> None:
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    assert r.object == "chat.completion" and r.model == model_name
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    assert again.choices[0].message.content == choice.message.content  # greedy is stable


def test_chat_streaming_matches_non_streaming(client, model_name) -> None:
    whole = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    stream = client.chat.completions.create(model=model_name, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason and reasons.count(None) == \
        len(reasons) - 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens


def test_n_and_seed(client, model_name) -> None:
    kw = dict(model=model_name, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # seed + i differs per choice
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # counted once, not per choice


def test_n_streaming_matches_non_streaming(client, model_name) -> None:
    kw = dict(model=model_name, messages=MESSAGES, max_tokens=10, temperature=0.9, seed=3, n=3)
    whole = client.chat.completions.create(**kw)
    texts, reasons = ["", "", ""], [None, None, None]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]


def test_draining_server_answers_503(server) -> None:
    srv, _ = server
    state = srv.app.state.serve
    state.draining = True
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(srv.url + "/health").status_code == 503
    finally:
        state.draining = False
    assert httpx.get(srv.url + "/health").status_code == 200


def test_completions_text_tokens_echo(client, model_name) -> None:
    r = client.completions.create(model=model_name, prompt="Once upon a time", **GREEDY)
    assert r.object == "text_completion" and r.usage.completion_tokens >= 1
    ids = r.usage.prompt_tokens
    toks = client.completions.create(model=model_name, prompt=[1, 6417, 3392, 1348, 1150],
                                     **GREEDY)
    assert toks.usage.prompt_tokens == 5
    echo = client.completions.create(model=model_name, prompt="Once upon a time", echo=True,
                                     **GREEDY)
    assert echo.choices[0].text == "Once upon a time" + r.choices[0].text
    batch = client.completions.create(model=model_name, prompt=["a b c", "x y"], n=2,
                                      **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy, same prompt
    stream = client.completions.create(model=model_name, prompt="Once upon a time",
                                       stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
    assert ids >= 4


def test_logprobs(client, model_name) -> None:
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, logprobs=True,
                                       top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy
    stream = client.chat.completions.create(model=model_name, messages=MESSAGES, stream=True,
                                            logprobs=True, **GREEDY)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    comp = client.completions.create(model=model_name, prompt="Hello", logprobs=2, **GREEDY)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == comp.usage.completion_tokens
    if not any("\ufffd" in t for t in lp.tokens):  # whole characters: tokens spell the text
        assert "".join(lp.tokens) == comp.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    if not any("\ufffd" in e.token for e in content):
        assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content)


def test_sixteen_concurrent_streams(server, model_name) -> None:
    srv, engine = server

    async def one(c, i: int) -> tuple[str, int]:
        stream = await c.chat.completions.create(
            model=model_name, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"Count to {i}."}], temperature=0.0,
            max_tokens=8 + i % 5)
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY,
                                      max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    results = asyncio.run(main())
    assert len(results) == 16 and all(1 <= u <= 12 for _, u in results)
    _wait_idle(engine)


def test_cancelled_stream_frees_the_engine(server, client, model_name) -> None:
    _, engine = server
    before = _wait_idle(engine)
    budget = MAX_MODEL_LEN - 64
    stream = client.chat.completions.create(model=model_name, messages=MESSAGES, stream=True,
                                            temperature=0.0, max_tokens=budget,
                                            extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()  # the client goes away mid-generation
    stats = _wait_idle(engine)
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] <= before["kv_blocks_used"]
    assert stats["requests_aborted_total"] == before["requests_aborted_total"] + 1
    assert stats["generation_tokens_total"] - before["generation_tokens_total"] < budget
    # the server is still serving
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    assert r.choices[0].message.content is not None


def test_disconnect_during_non_streaming_request_aborts(server, model_name) -> None:
    srv, engine = server
    before = _wait_idle(engine)
    budget = MAX_MODEL_LEN - 64
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": budget, "n": 8,
            "temperature": 0.0, "ignore_eos": True}  # 8 x 448 tokens: seconds of work
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    stats = _wait_idle(engine)
    assert stats["requests_aborted_total"] == before["requests_aborted_total"] + 8
    assert stats["generation_tokens_total"] - before["generation_tokens_total"] < 8 * budget


def test_tool_call_request(server, client, model_name) -> None:
    """With a random model the reply is random: check the schema of a tools request end to
    end; the rendering and parsing are pinned down in test_tools.py."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    for stream in (False, True):
        r = client.chat.completions.create(model=model_name, messages=history, tools=tools,
                                           tool_choice="auto", stream=stream, **GREEDY)
        if stream:
            chunks = list(r)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
        else:
            assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
            assert r.choices[0].message.tool_calls in (None, []) or \
                r.choices[0].message.tool_calls[0].type == "function"
    srv, _ = server
    with_tools = httpx.post(srv.url + "/v1/chat/completions",
                            headers={"Authorization": f"Bearer {API_KEY}"},
                            json={"model": model_name, "messages": MESSAGES, "tools": tools,
                                  **GREEDY}).json()
    without = httpx.post(srv.url + "/v1/chat/completions",
                         headers={"Authorization": f"Bearer {API_KEY}"},
                         json={"model": model_name, "messages": MESSAGES, **GREEDY}).json()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 50
    assert json.dumps(with_tools)  # plain JSON all the way
