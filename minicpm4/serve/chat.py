"""`/v1/chat/completions` (issue 5): messages -> ChatML prompt (tools rendered in MiniCPM4's
format), `n` engine requests, then one JSON response or an SSE stream of
`chat.completion.chunk`s ending with `data: [DONE]`.

Stream shape (the OpenAI one): per choice a first chunk with `delta.role`, content deltas
(with `logprobs.content` when asked), for a tool call one `delta.tool_calls` chunk, then a
chunk with `finish_reason`; with `stream_options.include_usage` every chunk carries
`"usage": null` and a last chunk with no choices carries the usage.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from minicpm4.serve.generation import (SSE_DONE, Choice, Job, budget, chat_logprobs,
                                       merged, sse, start_choices, usage)
from minicpm4.serve.protocol import ChatCompletionRequest
from minicpm4.serve.tools import (ToolStreamFilter, closing_deltas, final_message,
                                  render_messages)


_RESERVED_TEMPLATE_ARGS = {"messages", "tools", "documents", "tokenize",
                           "add_generation_prompt"}


def chat_prompt(tokenizer: Any, req: ChatCompletionRequest) -> tuple[list[int], list[str]]:
    """Prompt token ids and the names of the tools offered (empty: no tool parsing)."""
    tools = [t.model_dump(exclude_none=True) for t in req.active_tools()]
    template = getattr(tokenizer, "chat_template", None) or ""
    handles_tools = "tools" in template
    messages = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
        messages.append(msg)
    rendered = render_messages(messages, tools, handles_tools)
    extra = {k: v for k, v in (req.chat_template_kwargs or {}).items()
             if k not in _RESERVED_TEMPLATE_ARGS}
    if handles_tools and tools:
        extra["tools"] = tools
    ids = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True,
                                        **extra)
    return list(ids), [t["function"]["name"] for t in tools]


class ChatCompletion(Job):
    """One chat request on its way through the engine."""

    def __init__(self, engine: Any, req: ChatCompletionRequest, model_name: str, *,
                 default_max_tokens: int | None = None) -> None:
        super().__init__(engine, req, model_name, "chatcmpl")
        self.prompt_ids, self.tool_names = chat_prompt(engine.tokenizer, req)
        max_tokens = budget(len(self.prompt_ids), req.requested_max_tokens(),
                            engine.max_model_len, default_max_tokens)
        logprobs = req.engine_logprobs()
        self.want_logprobs = logprobs is not None
        self.params = [req.sampling_params(max_tokens=max_tokens, logprobs=logprobs,
                                           seed_offset=i) for i in range(req.n)]

    async def start(self) -> list[Choice]:
        return await start_choices(self.engine, [(self.prompt_ids, p) for p in self.params],
                                   self.id)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model, "choices": choices, **extra}
        if self.req.include_usage and "usage" not in out:
            out["usage"] = None
        return out

    # ------------------------------------------------------------------ non-streaming
    async def complete(self, choices: list[Choice]) -> dict[str, Any]:
        n = len(choices)
        texts, reasons, counts, lps = await self.collect(choices, [""] * n)
        result = []
        for i in range(n):
            message, reason = final_message(texts[i], reasons[i], self.tool_names)
            result.append({"index": i, "message": message, "finish_reason": reason,
                           "logprobs": {"content": chat_logprobs(lps[i], self.text_of)}
                           if self.want_logprobs else None})
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": result,
                "usage": usage(len(self.prompt_ids), sum(counts))}

    # ------------------------------------------------------------------ streaming
    async def stream(self, choices: list[Choice]) -> AsyncIterator[bytes]:
        n = len(choices)
        filters = [ToolStreamFilter(self.tool_names) if self.tool_names else None
                   for _ in range(n)]
        counts = [0] * n
        for i in range(n):
            yield sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]))
        async with aclosing(merged(choices)) as stream:
            async for i, out in stream:
                counts[i] = out.num_generated_tokens
                filt = filters[i]
                text = filt.push(out.new_text) if filt else out.new_text
                logprobs = {"content": chat_logprobs(out.logprobs or [], self.text_of)} \
                    if self.want_logprobs and out.logprobs else None
                if text or logprobs:
                    yield sse(self._chunk([{"index": i, "delta": {"content": text},
                                            "logprobs": logprobs, "finish_reason": None}]))
                if not out.finished:
                    continue
                reason = out.finish_reason
                if filt is not None:
                    deltas, reason = closing_deltas(filt, reason)
                    for delta in deltas:
                        yield sse(self._chunk([{"index": i, "delta": delta, "logprobs": None,
                                                "finish_reason": None}]))
                yield sse(self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                        "finish_reason": reason}]))
        if self.req.include_usage:
            yield sse(self._chunk([], usage=usage(len(self.prompt_ids), sum(counts))))
        yield SSE_DONE
