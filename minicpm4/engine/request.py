"""Per-request sampling parameters (spec §4.1; the vLLM/OpenAI parameter set)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens and when to stop; validated on construction."""

    max_tokens: int = 256
    """Upper bound on generated tokens."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output (divides positive logits)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence of a token already generated."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text is cut before the first one that appears."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (EOS ids are added unless ignore_eos)."""
    ignore_eos: bool = False
    seed: int | None = None
    """Per-request RNG seed: the same seed gives the same sample."""
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely (k <= 20)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "max_tokens must be an integer >= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k must be -1, 0 or >= 1"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and
                                       0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be an integer in [0, {MAX_LOGPROBS}]"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any repetition / presence / frequency penalty applies (needs token counts)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or
                    self.frequency_penalty)


def check_prompt(num_prompt_tokens: int, params: SamplingParams, max_len: int, *,
                 what: str = "the prompt") -> None:
    """ValueError unless a prompt is non-empty and prompt + max_tokens fits in `max_len`."""
    if num_prompt_tokens == 0:
        raise ValueError(f"{what} is empty")
    if num_prompt_tokens + params.max_tokens > max_len:
        raise ValueError(f"{what}: {num_prompt_tokens} prompt tokens + max_tokens "
                         f"{params.max_tokens} exceed the model context of {max_len} tokens")
