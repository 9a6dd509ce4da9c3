"""One request inside the engine: its state machine and bookkeeping (issue 5).

States: WAITING (queued, or preempted and waiting to be recomputed) -> RUNNING (holds KV
blocks; prefill chunks, then one token per step) -> FINISHED (stop, length or abort). A
preempted request keeps its generated tokens: they are recomputed as part of its prompt, so
its output continues exactly where it stopped.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence as Seq

import torch

from minicpm4.engine.outputs import RequestMetrics, TokenLogprob
from minicpm4.engine.request import SamplingParams
from minicpm4.engine.stopping import StopChecker


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request: prompt, generated tokens, KV blocks, sampling and stop state, metrics."""

    def __init__(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams, *,
                 stop: StopChecker, device: torch.device | str = "cpu") -> None:
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.stop = stop
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        """Chain hashes of the leading full blocks registered (or found) in the prefix cache."""
        self.num_computed = 0
        """Tokens (prompt + output) whose K/V are stored in `block_table`."""
        self.generator = torch.Generator(device=device).manual_seed(params.seed) \
            if params.seed is not None else None
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.abort_requested = False
        # Produced since the last RequestOutput was handed out:
        self.pending_ids: list[int] = []
        self.pending_text = ""
        self.pending_logprobs: list[TokenLogprob] = []
        self.reported_finish = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building the whole list (a decode step reads one)."""
        cut = len(self.prompt_ids)
        if start >= cut:
            return self.output_ids[start - cut:end - cut]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - cut)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def record_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Append a sampled token and run the stop checks on it."""
        now = time.time()
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.output_ids.append(token_id)
        text, reason = self.stop.step(token_id)
        self.pending_ids.append(token_id)
        self.pending_text += text
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        if reason is not None:
            self._mark_finished(reason)

    def finish(self, reason: str) -> None:
        """End from outside the stop checks ("length" at the context limit, "abort"); text
        held back for a possible stop string is released."""
        if self.status is not Status.FINISHED:
            self.pending_text += self.stop.flush()
            self._mark_finished(reason)

    def _mark_finished(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.metrics.finished_time = time.time()
