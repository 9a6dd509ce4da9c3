"""What the engine hands back per request (issue 5): streamed deltas and final metrics.

`RequestOutput` is one delta of one request: the tokens sampled since the previous delta, the
text they completed, optional logprobs, and, on the last delta, the finish reason and the
request's metrics. `engine/llm.py` produces them; `engine/async_engine.py` streams them to the
server (`serve/`), which only ever sees these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token and the `top` most likely alternatives (id, logprob),
    after penalties, before temperature / top-k / top-p (the OpenAI convention)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestMetrics:
    """Timings of one request, seconds since the epoch (time.time()) and derived figures."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    def time_per_output_token(self, num_generated: int) -> float | None:
        """Seconds per token after the first one (first token to finish), once finished and
        with at least two tokens."""
        if self.first_token_time is None or self.finished_time is None or num_generated < 2:
            return None
        return (self.finished_time - self.first_token_time) / (num_generated - 1)

    def tokens_per_s(self, num_generated: int) -> float | None:
        """Decode speed of the request: 1 / `time_per_output_token` (None when unknown or
        when the tokens came within the clock's resolution)."""
        tpot = self.time_per_output_token(num_generated)
        return None if not tpot else 1.0 / tpot


@dataclass
class RequestOutput:
    """One streamed delta of request `request_id`."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None
    """None while running; then "stop" (EOS, stop token or stop string), "length"
    (max_tokens or the context) or "abort" (cancelled)."""
    num_prompt_tokens: int
    num_generated_tokens: int
    """Generated tokens so far, this delta included."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per token of `new_token_ids` when the request asked for logprobs."""
    metrics: RequestMetrics | None = None
    """Set on the final delta."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens_per_s(self) -> float | None:
        """On the final delta: the request's decode speed (`RequestMetrics.tokens_per_s`)."""
        return None if self.metrics is None else \
            self.metrics.tokens_per_s(self.num_generated_tokens)

    def merged(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by the next one of the same request, as one delta."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return RequestOutput(
            request_id=self.request_id, new_token_ids=self.new_token_ids + later.new_token_ids,
            new_text=self.new_text + later.new_text, finish_reason=later.finish_reason,
            num_prompt_tokens=later.num_prompt_tokens,
            num_generated_tokens=later.num_generated_tokens, logprobs=logprobs,
            metrics=later.metrics)
