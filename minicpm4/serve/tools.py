"""MiniCPM4's tool-calling format: render `tools` into the prompt, parse calls out of the reply.

Issue 5 (server: "tools / function calling in MiniCPM4's tool-call format"). MiniCPM4 (and
MiniCPM3, same vocabulary) was tuned to answer a tool request as (OpenBMB/MiniCPM
`demo/minicpm4/MCP`, "Tool Call Parsing Rule"):

    <|thought_start|>
    why these calls
    <|thought_end|>
    <|tool_call_start|>
    ```python
    get_weather(city="Paris", unit="celsius")
    ```
    <|tool_call_end|>

i.e. Python keyword-argument calls in a fenced block. The markers are plain text in this
vocabulary (not special tokens), so they survive detokenization. The chat template shipped with
MiniCPM4 does not mention tools, so `render_messages` writes the tool list into the system
message itself (Python signatures with docstrings, then the output format) unless the
tokenizer's template handles `tools` on its own. The Hermes/Qwen style
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` is accepted by the parser as well.

`ToolStreamFilter` lets a stream show the text before a call as it is generated and hold back
everything from the first marker on, so streaming and non-streaming answers agree.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import re
import tokenize
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
MARKERS = (CALL_START, HERMES_START)
_KW_SUFFIX = "__kw"
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False,
               "None": None}
_PY_TYPES = {"string": "str", "number": "float", "integer": "int", "boolean": "bool",
             "array": "list", "object": "dict", "null": "None"}


# ----------------------------------------------------------------------------- rendering
def _py_type(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_PY_TYPES.get(k, "Any") for k in kind)
    if kind == "array" and isinstance(schema.get("items"), dict):
        return f"list[{_py_type(schema['items'])}]"
    if "enum" in schema:
        return "Literal[" + ", ".join(json.dumps(v, ensure_ascii=False)
                                      for v in schema["enum"]) + "]"
    return _PY_TYPES.get(kind, "Any") if isinstance(kind, str) else "Any"


def function_signature(name: str, description: str | None,
                       parameters: dict[str, Any] | None) -> str:
    """One tool as a Python stub: `def name(required: type, optional: type = default):` and a
    docstring with the description and one line per argument."""
    props = (parameters or {}).get("properties") or {}
    required = set((parameters or {}).get("required") or [])
    args, doc = [], []
    for arg, schema in props.items():
        schema = schema if isinstance(schema, dict) else {}
        text = f"{arg}: {_py_type(schema)}"
        if arg not in required:
            text += " = " + (json.dumps(schema["default"], ensure_ascii=False)
                             if "default" in schema else "None")
        args.append(text)
        if schema.get("description"):
            doc.append(f"        {arg}: {schema['description']}")
    ordered = [a for a in args if "=" not in a] + [a for a in args if "=" in a]
    lines = [f"def {name}({', '.join(ordered)}):", '    """' + (description or name)]
    if doc:
        lines += ["", "    Args:", *doc]
    lines.append('    """')
    return "\n".join(lines)


def tools_system_text(tools: Sequence[dict[str, Any]]) -> str:
    """The tool section appended to the system message."""
    stubs = "\n\n".join(function_signature(t["function"]["name"],
                                           t["function"].get("description"),
                                           t["function"].get("parameters")) for t in tools)
    return ("# Functions\nThese functions are available; their signatures are written in "
            "Python:\n```python\n" + stubs + "\n```\n\n# How to call them\n"
            "Answer directly when no function is needed, or ask for missing information. "
            "To call functions, explain your plan between <|thought_start|> and "
            "<|thought_end|>, then write the calls, one per line with keyword arguments, "
            "in a python code block between <|tool_call_start|> and <|tool_call_end|>:\n"
            "<|thought_start|>\n{your plan}\n<|thought_end|>\n<|tool_call_start|>\n"
            "```python\nfunction_name(argument=value, ...)\n```\n<|tool_call_end|>")


def format_calls(calls: Sequence[dict[str, Any]]) -> str:
    """Earlier assistant tool calls (OpenAI `tool_calls`, arguments as JSON text) written back
    in the model's own format, for the conversation history."""
    lines = []
    for call in calls:
        fn = call.get("function", call)
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call {fn.get('name')!r}: arguments are not JSON: {exc}")
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {fn.get('name')!r}: arguments must be a JSON object")
        args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
        lines.append(f"{fn['name']}({args})")
    return f"{CALL_START}\n```python\n" + "\n".join(lines) + f"\n```\n{CALL_END}\n"


def render_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]],
                    template_handles_tools: bool) -> list[dict[str, str]]:
    """OpenAI messages -> `{"role", "content": str}` dicts for the ChatML template: assistant
    tool calls written out, the `developer` role as `system`, the tool list in the system
    message (unless the template renders `tools` itself)."""
    out: list[dict[str, str]] = []
    for msg in messages:
        role = "system" if msg["role"] == "developer" else msg["role"]
        content = msg.get("content") or ""
        if role == "assistant" and msg.get("tool_calls"):
            content = format_calls(msg["tool_calls"]) + content
        out.append({"role": role, "content": content})
    if tools and not template_handles_tools:
        section = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


# ----------------------------------------------------------------------------- parsing
@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name,
                             "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def _rename_keyword_args(code: str) -> str:
    """`from=1` is a syntax error in Python; rename keyword-named arguments (outside strings)
    so that `ast` parses them, and `_literal_args` renames them back."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return code
    out = []
    for i, tok in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if (tok.type == tokenize.NAME and keyword.iskeyword(tok.string) and nxt is not None
                and nxt.type == tokenize.OP and nxt.string == "="):
            tok = tok._replace(string=tok.string + _KW_SUFFIX)
        out.append(tok)
    return tokenize.untokenize(out) if out != toks else code


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict literal")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore
    value = ast.literal_eval(node)
    if isinstance(value, (set, frozenset, bytes, complex)):
        raise ValueError(f"{type(value).__name__} is not a JSON value")
    return value


def _call_name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise ValueError("call target is not a name")
    return ".".join([func.id, *reversed(parts)])


def parse_python_calls(code: str) -> list[ParsedCall]:
    """`f(a=1)\\ng(b="x")` -> calls; ValueError unless every statement is a call with literal
    keyword arguments."""
    code = code.strip()
    fence = re.fullmatch(r"```[ \t]*(?:python|py)?[ \t]*\n?(.*?)\n?```", code, re.S)
    if fence:
        code = fence.group(1)
    try:
        tree = ast.parse(_rename_keyword_args(code.strip()))
    except SyntaxError as exc:
        raise ValueError(f"tool call is not valid Python: {exc.msg}") from exc
    calls = []
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            raise ValueError("tool call block holds something other than calls")
        call = stmt.value
        if call.args or any(kw.arg is None for kw in call.keywords):
            raise ValueError("tool calls must use keyword arguments only")
        args = {kw.arg.removesuffix(_KW_SUFFIX) if kw.arg.endswith(_KW_SUFFIX)  # type: ignore
                and keyword.iskeyword(kw.arg[:-len(_KW_SUFFIX)]) else kw.arg: _literal(kw.value)
                for kw in call.keywords}
        calls.append(ParsedCall(_call_name(call.func), args))
    if not calls:
        raise ValueError("empty tool call block")
    return calls


def parse_json_call(text: str) -> ParsedCall:
    obj = json.loads(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("tool call JSON needs a string 'name'")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("tool call arguments must be an object")
    return ParsedCall(obj["name"], args)


@dataclass
class ParsedReply:
    content: str | None
    """The reply without the call block; None when nothing but whitespace is left."""
    calls: list[ParsedCall]


def _blocks(text: str, start: str, end: str) -> list[tuple[int, int, str]]:
    """(begin, stop, inner) of every start...end block; an unterminated last block runs to
    the end of the text (generation stopped at EOS right after it)."""
    out, pos = [], 0
    while (b := text.find(start, pos)) != -1:
        e = text.find(end, b + len(start))
        stop = len(text) if e == -1 else e + len(end)
        out.append((b, stop, text[b + len(start):len(text) if e == -1 else e]))
        pos = stop
    return out


def parse_tool_calls(text: str, tool_names: Sequence[str] = ()) -> ParsedReply:
    """Split a generated reply into content and calls. A reply whose call block does not parse,
    or names a function not in `tool_names` (when given), is returned as plain content."""
    for start, end, parse in ((CALL_START, CALL_END, parse_python_calls),
                              (HERMES_START, HERMES_END, None)):
        blocks = _blocks(text, start, end)
        if not blocks:
            continue
        try:
            calls = [c for _, _, inner in blocks for c in
                     (parse(inner) if parse else [parse_json_call(inner)])]
        except (ValueError, json.JSONDecodeError, SyntaxError, TypeError):
            break
        if tool_names and any(c.name not in tool_names for c in calls):
            break
        content, pos = [], 0
        for b, stop, _ in blocks:
            content.append(text[pos:b])
            pos = stop
        content.append(text[pos:])
        joined = "".join(content)
        return ParsedReply(joined if joined.strip() else None, calls)
    return ParsedReply(text, [])


class ToolStreamFilter:
    """Streams content up to the first tool-call marker; the rest waits for `finish`."""

    def __init__(self, tool_names: Sequence[str] = ()) -> None:
        self._text = ""
        self._sent = 0
        self._names = tuple(tool_names)

    def _safe_end(self) -> int:
        """Length of the prefix that cannot belong to a marker."""
        hits = [i for m in MARKERS if (i := self._text.find(m)) != -1]
        if hits:
            return min(hits)
        for keep in range(max(len(m) for m in MARKERS) - 1, 0, -1):
            tail = self._text[-keep:]
            if any(m.startswith(tail) for m in MARKERS):
                return len(self._text) - keep
        return len(self._text)

    def push(self, delta: str) -> str:
        self._text += delta
        end = max(self._safe_end(), self._sent)
        out, self._sent = self._text[self._sent:end], end
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """(content not yet sent, calls). The sent text is always a prefix of the final
        content, so a client concatenating the deltas sees `parse_tool_calls`' content."""
        reply = parse_tool_calls(self._text, self._names)
        content = reply.content or ""
        if not content.startswith(self._text[:self._sent]):  # cannot happen; stay consistent
            return "", reply.calls
        return content[self._sent:], reply.calls


# ----------------------------------------------------------------------------- answers
def final_message(text: str, reason: str | None, tool_names: Sequence[str]
                  ) -> tuple[dict[str, Any], str | None]:
    """The non-streamed assistant message for a finished reply and its finish_reason:
    `tool_calls` (and reason "tool_calls") when the reply holds calls to offered tools."""
    if tool_names:
        reply = parse_tool_calls(text, tool_names)
        if reply.calls:
            return ({"role": "assistant", "content": reply.content,
                     "tool_calls": [c.to_openai() for c in reply.calls]}, "tool_calls")
    return {"role": "assistant", "content": text}, reason


def closing_deltas(filt: ToolStreamFilter, reason: str | None
                   ) -> tuple[list[dict[str, Any]], str | None]:
    """The last stream deltas of a reply (held-back content, then one `tool_calls` delta)
    and its finish_reason, consistent with `final_message`."""
    rest, calls = filt.finish()
    deltas: list[dict[str, Any]] = [{"content": rest}] if rest else []
    if calls:
        deltas.append({"tool_calls": [{"index": k, **c.to_openai()}
                                      for k, c in enumerate(calls)]})
        reason = "tool_calls"
    return deltas, reason
