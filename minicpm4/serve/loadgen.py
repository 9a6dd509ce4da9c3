"""Client-side load generator for an OpenAI-compatible server (issue 5: `minicpm4 bench serve`,
acceptance 4's load test, `benchmarks/serve.py`).

Each request is a streamed chat completion with `logprobs: true` (one logprob entry per
generated token) and `stream_options.include_usage`, so every stream can be audited: it must
end with `data: [DONE]`, and the number of streamed tokens must equal `usage.completion_tokens`
(no token lost or sent twice). Optionally the streamed text is compared with a reference text
for the same prompt (greedy requests: the non-streamed answer). Latency is measured from
sending the request to `[DONE]`, TTFT to the first content token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import httpx


@dataclass
class RequestResult:
    status: int
    latency_s: float = 0.0
    ttft_s: float | None = None
    text: str = ""
    streamed_tokens: int = 0
    usage_tokens: int | None = None
    saw_done: bool = False
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    """The client closed the stream early on purpose (not audited)."""


@dataclass
class LoadReport:
    concurrency: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)
    text_mismatches: int = 0

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.status == 200 and r.error is None
                and not r.cancelled]

    @property
    def cancelled(self) -> int:
        return sum(1 for r in self.results if r.cancelled)

    @property
    def server_errors(self) -> int:
        return sum(1 for r in self.results if r.status >= 500 or r.status == 0)

    @property
    def missing_done(self) -> int:
        return sum(1 for r in self.results if r.status == 200 and not r.saw_done
                   and not r.cancelled)

    @property
    def token_mismatches(self) -> int:
        return sum(1 for r in self.ok if r.usage_tokens != r.streamed_tokens)

    @property
    def generated_tokens(self) -> int:
        return sum(r.usage_tokens or 0 for r in self.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile([r.latency_s for r in self.ok], q)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok if r.ttft_s is not None], q)

    @property
    def clean(self) -> bool:
        return (len(self.ok) + self.cancelled == len(self.results) and not self.missing_done
                and not self.token_mismatches and not self.text_mismatches)

    def summary(self) -> str:
        cancelled = f" (+{self.cancelled} cancelled)" if self.cancelled else ""
        return (f"concurrency {self.concurrency:>3}: {len(self.ok)}/{len(self.results)} ok"
                f"{cancelled}, 5xx {self.server_errors}, missing [DONE] {self.missing_done}, "
                f"token mismatches {self.token_mismatches}, text mismatches {self.text_mismatches}"
                f" | {self.generated_tokens} tokens in {self.wall_s:.2f} s = "
                f"{self.tokens_per_s:.1f} tok/s | latency p50 {self.latency(50):.3f} s p99 "
                f"{self.latency(99):.3f} s | TTFT p50 {self.ttft(50):.3f} s p99 "
                f"{self.ttft(99):.3f} s")

    def as_dict(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "requests": len(self.results),
                "ok": len(self.ok), "cancelled": self.cancelled,
                "server_errors": self.server_errors,
                "missing_done": self.missing_done, "token_mismatches": self.token_mismatches,
                "text_mismatches": self.text_mismatches, "wall_s": self.wall_s,
                "generated_tokens": self.generated_tokens, "tokens_per_s": self.tokens_per_s,
                "latency_p50_s": self.latency(50), "latency_p99_s": self.latency(99),
                "ttft_p50_s": self.ttft(50), "ttft_p99_s": self.ttft(99)}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    vals = sorted(values)
    if not vals:
        return float("nan")
    pos = (len(vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def chat_payload(model: str | None, prompt: str, max_tokens: int, *, stream: bool,
                 temperature: float = 0.0, ignore_eos: bool = False,
                 seed: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": temperature,
                            "stream": stream, "ignore_eos": ignore_eos}
    if model:
        body["model"] = model
    if seed is not None:
        body["seed"] = seed
    if stream:
        body.update(logprobs=True, stream_options={"include_usage": True})
    return body


async def stream_one(client: httpx.AsyncClient, payload: dict[str, Any], *,
                     cancel_after: int | None = None) -> RequestResult:
    """One streamed chat completion, audited (see the module docstring). `cancel_after`:
    hang up after that many events, like a client that goes away."""
    t0 = time.perf_counter()
    res = RequestResult(status=0)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = (await resp.aread()).decode(errors="replace")[:300]
                return res
            events = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if cancel_after is not None and events > cancel_after:
                    res.cancelled = True
                    break
                data = line[6:]
                if data == "[DONE]":
                    res.saw_done = True
                    continue
                if res.saw_done:
                    res.error = "data after [DONE]"
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"].get("message"))
                    continue
                if event.get("usage"):
                    res.usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content") or ""
                    if text and res.ttft_s is None:
                        res.ttft_s = time.perf_counter() - t0
                    res.text += text
                    if choice.get("logprobs"):
                        res.streamed_tokens += len(choice["logprobs"].get("content") or [])
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.latency_s = time.perf_counter() - t0
    return res


async def complete_one(client: httpx.AsyncClient, payload: dict[str, Any]
                       ) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/chat/completions", json={**payload, "stream": False})
    return resp.status_code, resp.json()


def make_client(url: str, api_key: str | None, concurrency: int,
                timeout_s: float = 600.0) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4,
                          max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                             timeout=httpx.Timeout(timeout_s, connect=30.0))


async def reference_texts(url: str, api_key: str | None, model: str | None,
                          prompts: Sequence[str], max_tokens: int, *,
                          ignore_eos: bool = False, concurrency: int = 8) -> list[str]:
    """Non-streamed greedy answers, the yardstick for the streamed ones."""
    sem = asyncio.Semaphore(concurrency)
    async with make_client(url, api_key, concurrency) as client:
        async def one(p: str) -> str:
            async with sem:
                status, body = await complete_one(client, chat_payload(
                    model, p, max_tokens, stream=False, ignore_eos=ignore_eos))
            if status != 200:
                raise RuntimeError(f"reference request failed with {status}: {body}")
            return body["choices"][0]["message"]["content"]
        return list(await asyncio.gather(*(one(p) for p in prompts)))


async def run_load(url: str, *, api_key: str | None, model: str | None,
                   prompts: Sequence[str], num_requests: int, concurrency: int,
                   max_tokens: int, ignore_eos: bool = False,
                   references: Sequence[str] | None = None,
                   cancel_every: int | None = None) -> LoadReport:
    """`num_requests` greedy streamed requests (prompt i % len(prompts)), at most
    `concurrency` in flight; stops by itself. With `cancel_every` k, every k-th request
    hangs up after two events."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    results: list[RequestResult | None] = [None] * num_requests
    async with make_client(url, api_key, concurrency) as client:
        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                payload = chat_payload(model, prompts[i % len(prompts)], max_tokens,
                                       stream=True, ignore_eos=ignore_eos)
                cancel = 2 if cancel_every and i % cancel_every == cancel_every - 1 else None
                results[i] = await stream_one(client, payload, cancel_after=cancel)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    report = LoadReport(concurrency, wall, [r for r in results if r is not None])
    if references is not None:
        report.text_mismatches = sum(
            1 for i, r in enumerate(report.results)
            if r.status == 200 and r.error is None and not r.cancelled
            and r.text != references[i % len(prompts)])
    return report


