"""Bad input (issue 5, acceptance 3): each case gets a 4xx with an OpenAI JSON error body,
and the server keeps serving valid requests afterwards. Raw HTTP through httpx, so that the
bodies can be malformed in ways the `openai` client would never send."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import API_KEY, MAX_MODEL_LEN, MAX_REQUEST_BYTES

pytestmark = pytest.mark.timeout(120)
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
MSG = [{"role": "user", "content": "hi"}]


def _chat(**fields) -> bytes:
    body = {"messages": MSG, "max_tokens": 4, **fields}
    return json.dumps(body).encode()


def _nested_array(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


CASES = {
    # name: (path, body bytes or JSON-able, headers override, expected status)
    "malformed json": ("/v1/chat/completions", b'{"model": "x", "messages": [', None, 400),
    "json nested too deeply": ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, None,
                               400),
    "stop a nested list": ("/v1/chat/completions", _chat(stop=[[["x"]]]), None, 400),
    "deeply nested tool schema": ("/v1/chat/completions", _chat(tools=[{
        "type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": _nested_array(900)}}}}]), None, 400),
    "json array body": ("/v1/chat/completions", b"[1, 2, 3]", None, 400),
    "empty body": ("/v1/chat/completions", b"", None, 400),
    "messages not a list": ("/v1/chat/completions", _chat(messages="hi"), None, 400),
    "empty messages": ("/v1/chat/completions", _chat(messages=[]), None, 400),
    "unknown role": ("/v1/chat/completions",
                     _chat(messages=[{"role": "wizard", "content": "x"}]), None, 400),
    "content a number": ("/v1/chat/completions",
                         _chat(messages=[{"role": "user", "content": 5}]), None, 400),
    "max_tokens a string": ("/v1/chat/completions", _chat(max_tokens="10"), None, 400),
    "temperature a string": ("/v1/chat/completions", _chat(temperature="hot"), None, 400),
    "stream a string": ("/v1/chat/completions", _chat(stream="yes"), None, 400),
    "n a float": ("/v1/chat/completions", _chat(n=1.5), None, 400),
    "negative max_tokens": ("/v1/chat/completions", _chat(max_tokens=-5), None, 400),
    "zero max_tokens": ("/v1/chat/completions", _chat(max_tokens=0), None, 400),
    "huge max_tokens": ("/v1/chat/completions", _chat(max_tokens=10**9), None, 400),
    "astronomic max_tokens": ("/v1/chat/completions", _chat(max_tokens=2**80), None, 400),
    "huge n": ("/v1/chat/completions", _chat(n=1000), None, 400),
    "negative temperature": ("/v1/chat/completions", _chat(temperature=-1.0), None, 400),
    "top_p zero": ("/v1/chat/completions", _chat(top_p=0.0), None, 400),
    "top_logprobs too many": ("/v1/chat/completions",
                              _chat(logprobs=True, top_logprobs=50), None, 400),
    "too many stop strings": ("/v1/chat/completions", _chat(stop=["x"] * 100), None, 400),
    "seed out of range": ("/v1/chat/completions", _chat(seed=2**64), None, 400),
    "unknown model": ("/v1/chat/completions", _chat(model="gpt-17"), None, 404),
    "prompt over the context": ("/v1/chat/completions",
                                _chat(messages=[{"role": "user",
                                                 "content": "word " * (MAX_MODEL_LEN * 2)}]),
                                None, 400),
    "prompt + max_tokens over the context": ("/v1/completions", json.dumps(
        {"prompt": "hello", "max_tokens": MAX_MODEL_LEN}).encode(), None, 400),
    "token id out of vocab": ("/v1/completions", json.dumps(
        {"prompt": [1, 99999999], "max_tokens": 2}).encode(), None, 400),
    "prompt a dict": ("/v1/completions", json.dumps({"prompt": {"a": 1}}).encode(), None,
                      400),
    "invalid utf-8": ("/v1/chat/completions",
                      b'{"messages": [{"role": "user", "content": "\xff\xfe bad"}]}', None,
                      400),
    "lone surrogate": ("/v1/chat/completions",
                       b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None, 400),
    "missing api key": ("/v1/chat/completions", _chat(), {"Content-Type": "application/json"},
                        401),
    "wrong api key": ("/v1/chat/completions", _chat(),
                      {"Authorization": "Bearer nope", "Content-Type": "application/json"},
                      401),
    "body too large": ("/v1/chat/completions",
                       _chat(messages=[{"role": "user",
                                        "content": "x" * (MAX_REQUEST_BYTES + 1000)}]),
                       None, 413),
    "unknown route": ("/v1/nothing-here", _chat(), None, 404),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_then_good_request(server, model_name, name: str) -> None:
    srv, _ = server
    path, body, headers, status = CASES[name]
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post(path, content=body, headers=headers or AUTH)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert set(err) == {"message", "type", "param", "code"}
        ok = http.post("/v1/chat/completions", headers=AUTH,
                       content=_chat(model=model_name, temperature=0.0))
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_chunked_body_over_the_limit(server) -> None:
    """No Content-Length (chunked upload): the limit is enforced while reading."""
    srv, _ = server

    def chunks():
        for _ in range(MAX_REQUEST_BYTES // 4096 + 4):
            yield b" " * 4096
        yield _chat()

    r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(), headers=AUTH,
                   timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_template_kwargs_cannot_break_the_call(server, model_name) -> None:
    srv, _ = server
    body = _chat(chat_template_kwargs={"tokenize": False, "add_generation_prompt": False,
                                       "enable_thinking": False})
    r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_wrong_method_and_open_health(server) -> None:
    srv, _ = server
    r = httpx.get(srv.url + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(srv.url + "/v1/models").status_code == 401
    assert httpx.get(srv.url + "/health").status_code == 200


def test_no_server_errors_counted(server) -> None:
    srv, _ = server
    text = httpx.get(srv.url + "/metrics").text
    fivexx = [line for line in text.splitlines()
              if line.startswith("minicpm4_http_requests_total") and 'status="5' in line]
    assert fivexx == []
