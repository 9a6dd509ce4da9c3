"""MiniCPM4 tool-call format (serve/tools.py): prompt rendering and the parser on hand-written
replies, streaming filter consistency."""

from __future__ import annotations

import json

import pytest

from minicpm4.serve.tools import (CALL_END, CALL_START, ToolStreamFilter, closing_deltas,
                                  final_message, format_calls, function_signature,
                                  parse_python_calls, parse_tool_calls, render_messages)
from minicpm4.tokenizer import Tokenizer
from tests.conftest import TOKENIZER_DIR, require

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "default": 1}}}}}

REPLY = (f"<|thought_start|>\nThe user wants the weather.\n<|thought_end|>\n{CALL_START}\n"
         f"```python\nget_weather(city=\"Paris\", unit=\"celsius\")\n"
         f"get_weather(city='Tōkyō', days=3, extra={{'a': [1, 2.5, None]}}, flag=true)\n```\n"
         f"{CALL_END}\nLet me check.")


def test_parse_minicpm_python_block() -> None:
    reply = parse_tool_calls(REPLY, ["get_weather"])
    assert [c.name for c in reply.calls] == ["get_weather", "get_weather"]
    assert reply.calls[0].arguments == {"city": "Paris", "unit": "celsius"}
    assert reply.calls[1].arguments == {"city": "Tōkyō", "days": 3,
                                        "extra": {"a": [1, 2.5, None]}, "flag": True}
    assert reply.content == ("<|thought_start|>\nThe user wants the weather.\n<|thought_end|>\n"
                             "\nLet me check.")
    openai = reply.calls[1].to_openai()
    assert openai["type"] == "function" and openai["id"].startswith("call_")
    assert json.loads(openai["function"]["arguments"])["city"] == "Tōkyō"


def test_parse_variants() -> None:
    # python keyword as argument name, negative numbers, attribute-style name, no fence
    calls = parse_python_calls('convert(from="USD", to=-2, amount=1e3)\nmath.sqrt(x=4)')
    assert calls[0].arguments == {"from": "USD", "to": -2, "amount": 1000.0}
    assert calls[1].name == "math.sqrt"
    # unterminated block (EOS right after the fence), no content left
    reply = parse_tool_calls(f"{CALL_START}\n```python\nf(a=1)\n```")
    assert reply.calls[0].arguments == {"a": 1} and reply.content is None
    # Hermes / Qwen JSON style
    reply = parse_tool_calls('ok <tool_call>\n{"name": "f", "arguments": {"x": [1]}}\n'
                             '</tool_call>')
    assert reply.calls[0].name == "f" and reply.calls[0].arguments == {"x": [1]}
    assert reply.content == "ok "


@pytest.mark.parametrize("text", [
    "plain answer, no call",
    f"{CALL_START}\n```python\nf(1, 2)\n```\n{CALL_END}",          # positional
    f"{CALL_START}\n```python\nimport os\n```\n{CALL_END}",         # not a call
    f"{CALL_START}\n```python\nf(a=open('x'))\n```\n{CALL_END}",    # not a literal
    f"{CALL_START}\n```python\nf(a=\n```\n{CALL_END}",              # syntax error
    "<tool_call>{not json}</tool_call>",
])
def test_unparseable_replies_stay_content(text: str) -> None:
    reply = parse_tool_calls(text)
    assert reply.calls == [] and reply.content == text


def test_unknown_tool_name_stays_content() -> None:
    text = f"{CALL_START}\n```python\nrm_rf(path='/')\n```\n{CALL_END}"
    assert parse_tool_calls(text, ["get_weather"]).calls == []
    assert parse_tool_calls(text).calls[0].name == "rm_rf"


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_stream_filter_agrees_with_parser(chunk: int) -> None:
    for text in (REPLY, "no tools here <|tool", "a <|tool_call_start|> broken(1)"):
        filt = ToolStreamFilter(["get_weather"])
        sent = "".join(filt.push(text[i:i + chunk]) for i in range(0, len(text), chunk))
        assert CALL_START not in sent
        rest, calls = filt.finish()
        expected = parse_tool_calls(text, ["get_weather"])
        assert sent + rest == (expected.content or "")
        assert [c.arguments for c in calls] == [c.arguments for c in expected.calls]


def test_signature_and_history_round_trip() -> None:
    sig = function_signature(**WEATHER["function"])
    assert sig.startswith('def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] '
                          '= None, days: int = 1):')
    assert "city: City name" in sig
    block = format_calls([{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}])
    assert parse_tool_calls(block).calls[0].arguments == {"city": "Paris", "days": 2}
    with pytest.raises(ValueError):
        format_calls([{"function": {"name": "f", "arguments": "{bad"}}])


def test_rendered_prompt_through_the_real_template() -> None:
    tok = Tokenizer.from_pretrained(require(TOKENIZER_DIR))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"}]
    rendered = render_messages(messages, [WEATHER], template_handles_tools=False)
    prompt = tok.apply_chat_template(rendered, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Functions\n")
    assert "def get_weather(city: str" in prompt
    assert f"<|im_start|>assistant\n{CALL_START}\n```python\nget_weather(city=\"Paris\")" in prompt
    assert '<|im_start|>tool\n{"temp": 21}<|im_end|>\n<|im_start|>assistant\n' in prompt
    assert render_messages(messages[1:2], [], False) == [{"role": "user",
                                                          "content": "Weather in Paris?"}]


def test_answers_in_the_openai_sdk_types() -> None:
    """The tool-call answers, streamed and not, parse as the `openai` SDK's own types and
    agree with each other."""
    openai_types = pytest.importorskip("openai.types.chat")
    from openai.types.chat.chat_completion_chunk import ChoiceDelta

    message, reason = final_message(REPLY, "stop", ["get_weather"])
    msg = openai_types.ChatCompletionMessage.model_validate(message)
    assert reason == "tool_calls" and len(msg.tool_calls) == 2
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris",
                                                                "unit": "celsius"}
    filt = ToolStreamFilter(["get_weather"])
    deltas = [{"content": filt.push(REPLY[i:i + 5])} for i in range(0, len(REPLY), 5)]
    closing, streamed_reason = closing_deltas(filt, "stop")
    parsed = [ChoiceDelta.model_validate(d) for d in deltas + closing]
    assert streamed_reason == "tool_calls"
    assert "".join(d.content or "" for d in parsed) == msg.content
    (calls,) = [d.tool_calls for d in parsed if d.tool_calls]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == \
        [(k, c.function.name, c.function.arguments) for k, c in enumerate(msg.tool_calls)]
    plain, plain_reason = final_message("no call here", "length", ["get_weather"])
    assert plain == {"role": "assistant", "content": "no call here"} and plain_reason == "length"
    assert final_message(REPLY, "stop", [])[0]["content"] == REPLY  # tools not offered
