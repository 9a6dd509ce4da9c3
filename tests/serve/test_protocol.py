"""OpenAI request schemas (serve/protocol.py): strict types, unknown fields ignored, limits,
and the mapping to the engine's SamplingParams."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from minicpm4.serve.protocol import MAX_N, ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                     "text": "b"}]}]


def test_chat_fields_map_to_sampling_params() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": MSG, "max_tokens": 5, "max_completion_tokens": 7,
        "temperature": 0, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 10,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
        "stop": "END", "stop_token_ids": [5], "ignore_eos": True, "logprobs": True,
        "top_logprobs": 3, "n": 2, "user": "u", "some_future_field": {"x": 1}})
    assert req.messages[0].text() == "ab"
    assert req.requested_max_tokens() == 7  # max_completion_tokens wins
    p = req.sampling_params(max_tokens=7, logprobs=req.engine_logprobs(), seed_offset=1,
                            stop_token_ids=(9,))
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (7, 0, 0.9, 40, 0.05)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == \
        (11, ("END",), (5, 9), True, 3)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    defaults = ChatCompletionRequest.model_validate({"messages": MSG}).sampling_params(
        max_tokens=3, logprobs=None)
    assert defaults.temperature == 1.0 and defaults.seed is None and defaults.logprobs is None


@pytest.mark.parametrize("bad", [
    {"messages": "hi"}, {"messages": []}, {"messages": MSG, "n": MAX_N + 1},
    {"messages": MSG, "n": "2"}, {"messages": MSG, "max_tokens": 0},
    {"messages": MSG, "max_tokens": True}, {"messages": MSG, "top_logprobs": 21},
    {"messages": MSG, "stop": ["x"] * 17}, {"messages": MSG, "tool_choice": "sometimes"},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"messages": MSG, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
])
def test_chat_rejects(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(bad)


def test_out_of_range_values_raise_value_error() -> None:
    req = ChatCompletionRequest.model_validate({"messages": MSG, "temperature": -1})
    with pytest.raises(ValueError, match="temperature"):
        req.sampling_params(max_tokens=4, logprobs=None)
    with pytest.raises(ValueError, match="logprobs"):
        ChatCompletionRequest.model_validate({"messages": MSG, "top_logprobs": 2}
                                             ).engine_logprobs()
    tools = [{"type": "function", "function": {"name": "f"}},
             {"type": "function", "function": {"name": "g"}}]
    named = ChatCompletionRequest.model_validate(
        {"messages": MSG, "tools": tools, "tool_choice": {"type": "function",
                                                          "function": {"name": "g"}}})
    assert [t.function.name for t in named.active_tools()] == ["g"]
    assert ChatCompletionRequest.model_validate(
        {"messages": MSG, "tools": tools, "tool_choice": "none"}).active_tools() == []


def test_completion_prompt_forms() -> None:
    def prompts(p):
        return CompletionRequest.model_validate({"prompt": p}).prompts()
    assert prompts("hi") == ["hi"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    assert CompletionRequest.model_validate({"prompt": "x"}).max_tokens == 16  # OpenAI default
    for bad in ({"a": 1}, [], [1, "a"], [[]], ["a"] * 17, [True]):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": bad})
