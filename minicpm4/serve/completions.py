"""`/v1/completions` (issue 5): raw prompts (text, token ids, or a batch of either) without a
chat template; `n` choices per prompt (choice index = prompt index * n + j), `echo`,
legacy-format `logprobs`, JSON or an SSE stream of `text_completion` objects + `[DONE]`."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from minicpm4.serve.errors import APIError
from minicpm4.serve.generation import (SSE_DONE, Choice, Job, budget,
                                       completion_logprobs, merged, sse, start_choices, usage)
from minicpm4.serve.protocol import CompletionRequest


class Completion(Job):
    """One completions request on its way through the engine."""

    def __init__(self, engine: Any, req: CompletionRequest, model_name: str, *,
                 default_max_tokens: int | None = None) -> None:
        super().__init__(engine, req, model_name, "cmpl")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        tok = engine.tokenizer
        vocab = getattr(tok, "vocab_size", None)
        self.prompts: list[list[int]] = []
        for p in req.prompts():
            if isinstance(p, str):
                ids = tok.encode(p)
            else:
                if vocab is not None and any(t >= vocab for t in p):
                    raise APIError(400, f"prompt token ids must be < {vocab}", param="prompt")
                ids = list(p)
            self.prompts.append(ids)
        self.echo_text = [tok.decode(ids) if req.echo else "" for ids in self.prompts]
        logprobs = req.engine_logprobs()
        self.want_logprobs = logprobs is not None
        self.jobs = []
        for ids in self.prompts:
            max_tokens = budget(len(ids), req.requested_max_tokens(), engine.max_model_len,
                                default_max_tokens)
            self.jobs += [(ids, req.sampling_params(max_tokens=max_tokens, logprobs=logprobs,
                                                    seed_offset=j)) for j in range(req.n)]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    async def start(self) -> list[Choice]:
        return await start_choices(self.engine, self.jobs, self.id)

    def _echo(self, index: int) -> str:
        return self.echo_text[index // self.req.n]

    def _object(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        out = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.model, "choices": choices, **extra}
        if self.req.stream and self.req.include_usage and "usage" not in out:
            out["usage"] = None
        return out

    async def complete(self, choices: list[Choice]) -> dict[str, Any]:
        n = len(choices)
        texts, reasons, counts, lps = await self.collect(choices,
                                                         [self._echo(i) for i in range(n)])
        result = [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                   "logprobs": completion_logprobs(lps[i], self.text_of, 0)
                   if self.want_logprobs else None} for i in range(n)]
        return self._object(result, usage=usage(self.prompt_tokens, sum(counts)))

    async def stream(self, choices: list[Choice]) -> AsyncIterator[bytes]:
        n = len(choices)
        counts, offsets = [0] * n, [0] * n
        for i in range(n):
            if self._echo(i):
                yield sse(self._object([{"index": i, "text": self._echo(i),
                                         "logprobs": None, "finish_reason": None}]))
                offsets[i] = len(self._echo(i))
        async with aclosing(merged(choices)) as stream:
            async for i, out in stream:
                counts[i] = out.num_generated_tokens
                logprobs = None
                if self.want_logprobs:
                    logprobs = completion_logprobs(out.logprobs or [], self.text_of, offsets[i])
                offsets[i] += len(out.new_text)
                if out.new_text or logprobs or out.finished:
                    yield sse(self._object([{"index": i, "text": out.new_text,
                                             "logprobs": logprobs,
                                             "finish_reason": out.finish_reason}]))
        if self.req.include_usage:
            yield sse(self._object([], usage=usage(self.prompt_tokens, sum(counts))))
        yield SSE_DONE
