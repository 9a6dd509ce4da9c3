"""Per-request stop handling shared by `generate` and the engine (issue 5): EOS / stop token
ids, stop strings (text held back while it could still begin one), max_tokens; streaming
detokenization of what is emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

from minicpm4.detokenize import StreamDetokenizer
from minicpm4.engine.request import SamplingParams


class StopChecker:
    """Stop handling for one request: stop tokens, and stop strings held back until decided."""

    def __init__(self, params: SamplingParams, eos_ids: set[int], tokenizer,
                 prompt: Sequence[int]) -> None:
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        # The prompt's tail is decoding context, so a first token "▁word" keeps its space.
        self.detok = None if tokenizer is None else \
            StreamDetokenizer(tokenizer, context_ids=list(prompt[-8:]))
        if params.stop and self.detok is None:
            raise ValueError("stop strings need a tokenizer")
        self.pending = ""
        self.generated = 0

    def step(self, token_id: int) -> tuple[str, str | None]:
        """Feed one token; returns (text to emit, finish reason or None)."""
        self.generated += 1
        if token_id in self.stop_ids:
            return self._drain(), "stop"
        if self.detok is not None:
            self.pending += self.detok.push(token_id)
        for stop in self.params.stop:
            at = self.pending.find(stop)
            if at >= 0:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                text, self.pending = self.pending[:end], ""
                return text, "stop"
        if self.generated >= self.params.max_tokens:
            return self._drain(), "length"
        keep = self._held_back()
        text = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return text, None

    def _held_back(self) -> int:
        """Length of the longest tail of `pending` that could still begin a stop string."""
        best = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if stop.startswith(self.pending[-n:]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason."""
        return self._drain()

    def _drain(self) -> str:
        text = self.pending + (self.detok.flush() if self.detok is not None else "")
        self.pending = ""
        return text
