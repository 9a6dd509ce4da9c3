"""Driving the engine for one HTTP request (issue 5): fan-out of `n` choices, merged streams,
cancellation, and the pieces both OpenAI endpoints share (SSE framing, usage, logprobs).

`start_choices` submits one engine request per choice and waits for each one's first output, so
that a request the engine refuses (`ValueError`: prompt over the context, bad token ids...) is a
clean 400 before any byte of a response is sent. `merged` then interleaves the choices' deltas.
Leaving the `merged` generator early (client disconnect cancels the task that iterates it, or
an error) cancels the pump tasks, which closes the engine's generators and aborts the requests
there (their KV blocks are freed by the engine).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from minicpm4.engine.async_engine import EngineDeadError
from minicpm4.detokenize import byte_of_piece
from minicpm4.engine.outputs import RequestOutput, TokenLogprob
from minicpm4.serve.errors import APIError

log = logging.getLogger("minicpm4.serve")
_END = object()


class Job:
    """What a chat and a completions request share: the engine, the parsed request, the model
    name, the response id and creation time, and the token-text lookup."""

    def __init__(self, engine: Any, req: Any, model_name: str, id_prefix: str) -> None:
        self.engine, self.req, self.model = engine, req, model_name
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text_of = TokenText(engine.tokenizer)

    @staticmethod
    async def collect(choices: Sequence["Choice"], texts: list[str]
                      ) -> tuple[list[str], list[str | None], list[int], list[list[TokenLogprob]]]:
        """Run the choices to their ends (non-streaming answers): texts (appended to the given
        starts), finish reasons, generated-token counts and logprob entries, per choice."""
        n = len(choices)
        reasons: list[str | None] = [None] * n
        counts, lps = [0] * n, [[] for _ in range(n)]
        async with aclosing(merged(choices)) as stream:
            async for i, out in stream:
                texts[i] += out.new_text
                counts[i] = out.num_generated_tokens
                lps[i].extend(out.logprobs or [])
                if out.finished:
                    reasons[i] = out.finish_reason
        return texts, reasons, counts, lps


@dataclass
class Choice:
    """One running engine request of an HTTP request."""

    index: int
    first: RequestOutput | None
    stream: AsyncIterator[RequestOutput]


async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _close(streams: Sequence[AsyncIterator[RequestOutput]]) -> None:
    for stream in streams:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # closing must not mask the error being reported
                log.exception("closing an engine stream failed")


async def start_choices(engine: Any, jobs: Sequence[tuple[list[int], Any]],
                        request_id: str) -> list[Choice]:
    """Submit `(prompt_ids, SamplingParams)` jobs as requests `{request_id}-{i}`; ValueError
    from the engine becomes a 400 (and every job is withdrawn)."""
    streams = [engine.generate(prompt, params, f"{request_id}-{i}")
               for i, (prompt, params) in enumerate(jobs)]
    tasks = [asyncio.ensure_future(_first(s)) for s in streams]
    try:
        firsts = await asyncio.gather(*tasks)
    except BaseException as exc:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(streams)
        if isinstance(exc, ValueError):
            raise APIError(400, str(exc), code="invalid_request") from exc
        if isinstance(exc, EngineDeadError):
            raise APIError(503, str(exc), code="engine_unavailable") from exc
        raise
    return [Choice(i, first, s) for i, (first, s) in enumerate(zip(firsts, streams))]


async def merged(choices: Sequence[Choice]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, delta) pairs of all choices as they arrive, first outputs first."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            if choice.first is not None and not choice.first.finished:
                async for out in choice.stream:
                    queue.put_nowait((choice.index, out))
                    if out.finished:
                        break
            queue.put_nowait((choice.index, _END))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait((choice.index, exc))

    if len(choices) == 1:  # the usual n = 1: no pump task, no second queue per token
        async with aclosing(_single(choices[0])) as single:
            async for pair in single:
                yield pair
        return
    for choice in choices:
        if choice.first is not None:
            yield choice.index, choice.first
    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, EngineDeadError):
                raise APIError(503, str(item), code="engine_unavailable") from item
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close([c.stream for c in choices])


async def _single(choice: Choice) -> AsyncIterator[tuple[int, RequestOutput]]:
    """`merged` of one choice: its deltas straight from the engine's stream."""
    try:
        if choice.first is None:
            return
        yield choice.index, choice.first
        if choice.first.finished:
            return
        try:
            async for out in choice.stream:
                yield choice.index, out
                if out.finished:
                    break
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc
    finally:
        await _close([choice.stream])


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


async def until_disconnected(request: Any, work: Awaitable[Any], poll_s: float = 0.25) -> Any:
    """Await `work`; if the client goes away first, cancel it (which aborts its engine
    requests) and raise ClientDisconnected. For the part of a request before a streaming
    response starts, and for non-streaming responses, which Starlette does not cancel."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client disconnected; cancelling its generation")
                raise ClientDisconnected
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def sse(obj: Any) -> bytes:
    """One server-sent event carrying JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Text and bytes of single token ids for logprobs, cached. From the vocabulary piece, not
    `decode([id])` (which drops a piece's leading space): '▁' is a space, a byte-fallback piece
    `<0xNN>` is that byte (its text U+FFFD until the bytes form a character, as OpenAI does)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def raw(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self._tok.convert_ids_to_tokens(token_id)
            byte = byte_of_piece(piece)
            data = bytes([byte]) if byte is not None else \
                piece.replace("\u2581", " ").encode("utf-8")
            hit = (data.decode("utf-8", errors="replace"), data)
            if len(self._cache) < 100_000:
                self._cache[token_id] = hit
        return hit

    def __call__(self, token_id: int) -> str:
        return self.raw(token_id)[0]


def chat_logprobs(entries: Sequence[TokenLogprob], text_of: TokenText
                  ) -> list[dict[str, Any]]:
    """Chat format: `[{"token", "logprob", "bytes", "top_logprobs": [...]}]`."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text, data = text_of.raw(token_id)
        return {"token": text, "logprob": max(float(logprob), -9999.0), "bytes": list(data)}
    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries]


def completion_logprobs(entries: Sequence[TokenLogprob], text_of: Callable[[int], str],
                        offset: int) -> dict[str, Any]:
    """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(text_of(e.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens,
            "token_logprobs": [max(float(e.logprob), -9999.0) for e in entries],
            "top_logprobs": [{text_of(t): max(float(lp), -9999.0) for t, lp in e.top}
                             for e in entries],
            "text_offset": offsets}


def budget(prompt_len: int, requested: int | None, max_model_len: int,
           default: int | None) -> int:
    """max_tokens for a prompt: the request's, else the server default, capped by the
    context; 400 when the prompt leaves no room or the request asks for more than is left."""
    room = max_model_len - prompt_len
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; the context is "
                       f"{max_model_len} (no room to generate)", param="messages",
                       code="context_length_exceeded")
    if requested is not None:
        if requested > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({requested}) "
                           f"exceeds the context ({max_model_len})", param="max_tokens",
                           code="context_length_exceeded")
        return requested
    return room if default is None else min(default, room)
