"""OpenAI request schemas of the server (issue 5; spec architecture.md §3 `serve/protocol.py`).

Pydantic models for `/v1/chat/completions` and `/v1/completions` requests: the OpenAI fields
plus the vLLM-style extensions (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, `include_stop_str_in_output`). Unknown fields are ignored; types are checked
strictly (a string where a number belongs is a 400, not a silent conversion). `sampling_params`
turns a request into the engine's `SamplingParams`; the range checks live there and surface as
`ValueError`, which the server answers with 400. Responses are plain dicts built in
`serve/responses.py` (their shape is the OpenAI one; the `openai` client parses them in tests).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from minicpm4.engine.request import SamplingParams

MAX_N = 8
"""Most choices per request (`n`); each choice is one engine request."""
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_PROMPTS = 16
"""Most prompts in one /v1/completions batch."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str = "{}"
    """JSON text, as OpenAI sends it back in the conversation history."""


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined, None as empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


StopField = Union[str, Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)], None]


class _SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Annotated[int, Field(ge=-2**63, le=2**63 - 1 - MAX_N)] | None = None
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, *, max_tokens: int, logprobs: int | None, seed_offset: int = 0,
                        stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """Engine parameters for choice `seed_offset` (seed + i, so that n choices differ);
        ValueError with the engine's message for out-of-range values."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        fields: dict[str, Any] = dict(
            max_tokens=max_tokens, stop=stop, ignore_eos=self.ignore_eos,
            stop_token_ids=tuple(self.stop_token_ids or ()) + stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            seed=None if self.seed is None else self.seed + seed_offset)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if logprobs is not None:
            fields["logprobs"] = logprobs
        return SamplingParams(**fields)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def engine_logprobs(self) -> int | None:
        """None = no logprobs; k = the sampled token plus k alternatives."""
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0

    def active_tools(self) -> list[Tool]:
        """The tools to offer the model: none for tool_choice "none", only the named one for a
        named choice, else all of them."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            chosen = [t for t in self.tools if t.function.name == self.tool_choice.function.name]
            if not chosen:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, "
                                 "which is not in tools")
            return chosen
        return list(self.tools)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[int], Field(min_length=1)],
                  Annotated[list[Annotated[list[int], Field(min_length=1)]],
                            Field(min_length=1, max_length=MAX_PROMPTS)]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (a text or a token-id list each)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def engine_logprobs(self) -> int | None:
        return self.logprobs
