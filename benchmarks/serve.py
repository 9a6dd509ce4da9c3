"""Serving throughput at concurrency 1, 8 and 32 against transformers' static batching (issue 5 #5).

For each model (a random MiniCPM4-0.5B-shaped model and the bundled demo model, both in the
dtype given, default bfloat16) and each concurrency C, the same workload is run twice in this
process:
- ours: a real uvicorn server on 127.0.0.1 (`serve.build_app` over `AsyncEngine`), C clients
  streaming `/v1/completions` (token-id prompts, greedy) until every request is answered.
  The clients run in their own process on the same 2 cores, so their CPU time is taken from
  the server. By default (`--client httpx`, as in every recorded run) httpx handles each SSE
  line as it arrives: 0.18 s of CPU at C=1 and 0.25 s at C=8 for the demo's workloads (~10%
  and ~16% of a core). `--client raw` sends each request over a plain asyncio socket that
  reads the stream as it arrives and checks it once complete (HTTP 200, the chunked body,
  every event an SSE data line, the usage count, [DONE]); measured against httpx in one
  process: ours +4% at C=1, +3.5% at C=8, the same C=8 / C=1;
- transformers: `LlamaForCausalLM.generate` on the same weights (μP scalars folded in,
  `model/llama_export.py`), the requests in arrival order in static batches of C (left padding,
  each batch generating until its longest request's max_tokens).
The workload is a seeded mix of prompt lengths and max_tokens (what a server sees: requests
differ); both sides are credited only with the tokens each request asked for. Throughput =
those tokens / wall time. Every stream is checked: its token count equals the request's
max_tokens (ignore_eos) and the usage count.
This VM's speed drifts by up to ~30% within minutes (transformers alone, three runs of the
same workload in one process: 315, 290, 261 tok/s), so each (model, C) is measured
`--repeats` times (default 3), ours and transformers alternating and the order flipped every
repeat; the table shows the median of each side (the ratio is median / median) and a
`# runs` line lists every measurement. Each repeat measures every C in turn (the order
reversed every other repeat), so that the ratios between concurrencies compare measurements
of the same minutes; a last comment line gives the demo's C=8 / C=1 of each repeat.

Prints a table and last  RESULT serve_throughput_c8_vs_c1=<ours C=8 / ours C=1, demo model>.
Targets: C=8 >= 4x C=1; >= 2x transformers at equal batch.
Workloads per model (CPU-sized; override with the flags): demo: prompts of 16-128 tokens,
max_tokens 16-128, max(8, 8 C) requests; 0.5b: prompts of 8-48, max_tokens 16-48, max(4, 4 C)
requests. The clients record how long each request was in flight; the table's `in flight`
column is their sum / wall time (median over repeats), the mean concurrency the server really
saw. At the end of a run fewer than C requests are left, so a workload of few requests per
slot measures a lower concurrency than its C: until 2026-12-07 the workloads were 3 C (demo)
and 2 C (0.5b) requests, which held 6.5-6.7 requests in flight at C = 8 (both models) and
26.5 at C = 32 (0.5b); 8 C and 4 C hold 7.5 (demo) and 7.2 (0.5b) at C = 8, 29.4 (0.5b) at
C = 32 (one measurement each, 2026-12-07). vLLM's `benchmark_serving` sends 1000 prompts by
default, so that its tail is short too.
Usage: python benchmarks/serve.py [--models demo,0.5b] [--concurrency 1,8,32] [--dtype bfloat16]
       [--repeats 3] [--requests-per-slot N] [--min-requests N] [--prompt-len LO,HI]
       [--max-tokens LO,HI] [--client raw|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import time
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

from minicpm4.engine.async_engine import AsyncEngine  # noqa: E402
from minicpm4.engine.config import EngineConfig  # noqa: E402
from minicpm4.engine.llm import LLM  # noqa: E402
from minicpm4.loading import BUNDLED_MODEL, BUNDLED_TOKENIZER, PRESETS  # noqa: E402
from minicpm4.model.checkpoint import load_pretrained  # noqa: E402
from minicpm4.model.llama_export import llama_config_dict, llama_state_dict  # noqa: E402
from minicpm4.model.transformer import MiniCPM4ForCausalLM  # noqa: E402
from minicpm4.serve.launch import ServerThread  # noqa: E402
from minicpm4.serve.server import build_app  # noqa: E402
from minicpm4.tokenizer import Tokenizer  # noqa: E402
from minicpm4.utils.openmp import release_thread_pool  # noqa: E402


WORKLOADS = {
    "demo": dict(prompt_len=(16, 128), max_tokens=(16, 128), requests_per_slot=8, min_requests=8),
    "0.5b": dict(prompt_len=(8, 48), max_tokens=(16, 48), requests_per_slot=4, min_requests=4),
}


def load_model(name: str, dtype: torch.dtype) -> MiniCPM4ForCausalLM:
    if name == "demo":
        return load_pretrained(BUNDLED_MODEL, dtype=dtype).eval()
    if name == "0.5b":
        torch.manual_seed(0)
        model = MiniCPM4ForCausalLM(PRESETS["minicpm4-0.5b"]())
        model.init_weights(seed=0)
        return model.to(dtype).eval()
    raise ValueError(f"unknown model {name!r} (demo, 0.5b)")


def workload(n: int, vocab: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int],
             seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_len))],
             rng.randint(*max_tokens)) for _ in range(n)]


def _body(prompt: list[int], max_tokens: int) -> dict:
    return {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}


def _check(events: list[bytes], max_tokens: int) -> int:
    """The SSE events of one stream (payloads after "data: "): text chunks, the usage chunk,
    [DONE]; returns the usage's completion_tokens, which must equal max_tokens."""
    if len(events) < 3 or events[-1] != b"[DONE]":
        raise RuntimeError(f"stream incomplete: {len(events)} events, last {events[-1:]!r}")
    usage = json.loads(events[-2]).get("usage") or {}
    if usage.get("completion_tokens") != max_tokens:
        raise RuntimeError(f"stream incomplete: usage {usage}, wanted {max_tokens}")
    return max_tokens


async def _one_httpx(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int
                     ) -> int:
    """One streamed request through httpx, each SSE line handled as it arrives."""
    events = []
    async with client.stream("POST", url + "/v1/completions",
                             json=_body(prompt, max_tokens)) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:].encode())
            elif line:
                raise RuntimeError(f"not an SSE data line: {line!r}")
    return _check(events, max_tokens)


def _dechunk(payload: bytes) -> bytes:
    """An HTTP/1.1 chunked body, decoded."""
    out, pos = [], 0
    while True:
        eol = payload.index(b"\r\n", pos)
        size = int(payload[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(payload[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2


async def _one_raw(url: str, prompt: list[int], max_tokens: int) -> int:
    """One streamed request over a plain socket: the response is read as it arrives and
    parsed once complete (HTTP status, chunked body, every SSE event a data line)."""
    parts = urlsplit(url)
    body = json.dumps(_body(prompt, max_tokens)).encode()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (parts.netloc.encode(), len(body)) + body)
        await writer.drain()
        raw = await reader.read()  # until the server closes the connection
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.1 ") else b"?"
    if status != b"200":
        raise RuntimeError(f"HTTP {status!r}: {raw[:500]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        payload = _dechunk(payload)
    events = []
    for event in payload.split(b"\n\n")[:-1]:
        if not event.startswith(b"data: "):
            raise RuntimeError(f"not an SSE data event: {event[:100]!r}")
        events.append(event[6:])
    return _check(events, max_tokens)


async def _drive(url: str, work: list[tuple[list[int], int]], concurrency: int,
                 client_kind: str = "httpx") -> tuple[float, float]:
    """(generated tokens/s, mean number of requests in flight over the run)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    busy = []  # seconds each request was in flight
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def run(item):
            async with sem:
                start = time.perf_counter()
                if client_kind == "httpx":
                    n = await _one_httpx(client, url, *item)
                else:
                    n = await _one_raw(url, *item)
                busy.append(time.perf_counter() - start)
                return n
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(run(w) for w in work))
        dt = time.perf_counter() - t0
    assert sum(counts) == sum(m for _, m in work)
    return sum(counts) / dt, sum(busy) / dt


def _client_process(url: str, work, concurrency: int, results, client_kind: str) -> None:
    torch.set_num_threads(1)
    results.put(asyncio.run(_drive(url, work, concurrency, client_kind)))


def ours(model: MiniCPM4ForCausalLM, tok: Tokenizer, work, concurrency: int,
         client_kind: str = "httpx") -> tuple[float, float]:
    """(tokens/s, mean requests in flight) of the workload through a real server. The
    clients run in their own process (as real clients would), so that they do not compete
    with the server for this process's interpreter lock."""
    llm = LLM(model, tok, EngineConfig(max_num_seqs=concurrency))
    llm.generate([work[0][0]], [None])  # warm-up outside the timing (allocations, kernels)
    # The server runs in a thread here, so AsyncEngine.start() cannot release this (main)
    # thread's OpenMP pool, as it does under `minicpm4 serve`; do it here (utils/openmp.py).
    release_thread_pool()
    engine = AsyncEngine(llm, model_name="bench")
    srv = ServerThread(build_app(engine)).start()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(srv.url, work, concurrency, results,
                                                         client_kind))
    try:
        proc.start()
        measured = results.get(timeout=3600)
        proc.join(60)
        return measured
    finally:
        if proc.is_alive():
            proc.kill()
        srv.stop()


def transformers_static(hf, work, batch: int, pad_id: int) -> float:
    useful = sum(m for _, m in work)
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        chunk = work[i:i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        longest = max(m for _, m in chunk)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=longest,
                        min_new_tokens=longest, do_sample=False, pad_token_id=pad_id)
    return useful / (time.perf_counter() - t0)


def hf_twin(model: MiniCPM4ForCausalLM):
    import transformers
    cfg = transformers.LlamaConfig(**llama_config_dict(model.config))
    hf = transformers.LlamaForCausalLM(cfg).to(model.dtype).eval()
    hf.load_state_dict(llama_state_dict(model, model.config), strict=False)
    with torch.inference_mode():  # warm-up
        hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False,
                    pad_token_id=0)
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,0.5b")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--requests-per-slot", type=int, default=None)
    ap.add_argument("--min-requests", type=int, default=None)
    ap.add_argument("--prompt-len", default=None, help="LO,HI (default: per model)")
    ap.add_argument("--max-tokens", default=None, help="LO,HI (default: per model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--client", choices=["raw", "httpx"], default="httpx",
                    help="the clients' HTTP stack (module docstring)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measurements per side and (model, C), alternating; medians reported")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    concs = [int(c) for c in args.concurrency.split(",")]
    tok = Tokenizer.from_pretrained(BUNDLED_TOKENIZER)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"{'model':>6} {'C':>3} {'reqs':>5} {'tokens':>7} {'ours tok/s':>11} "
          f"{'HF tok/s':>9} {'ours/HF':>8} {'ours/C=1':>9} {'in flight':>9}")
    headline = None
    for name in args.models.split(","):
        if name not in WORKLOADS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(WORKLOADS)}")
        w = dict(WORKLOADS[name])
        for key in ("prompt_len", "max_tokens"):
            if getattr(args, key) is not None:
                w[key] = tuple(int(x) for x in getattr(args, key).split(","))
        for key in ("requests_per_slot", "min_requests"):
            if getattr(args, key) is not None:
                w[key] = getattr(args, key)
        print(f"# {name}: prompt len {w['prompt_len']}, max_tokens {w['max_tokens']}, "
              f"max({w['min_requests']}, {w['requests_per_slot']} C) requests", flush=True)
        model = load_model(name, dtype)
        hf = hf_twin(model)
        works = {c: workload(max(w["min_requests"], w["requests_per_slot"] * c),
                             model.config.vocab_size, w["prompt_len"], w["max_tokens"],
                             args.seed + c) for c in concs}
        runs = {c: {"ours": [], "hf": [], "in_flight": []} for c in concs}
        # Every repeat measures every C (the order reversed every other repeat), so that the
        # VM's drift over minutes touches all of them alike, not one C more than another.
        for rep in range(max(1, args.repeats)):
            for c in (concs if rep % 2 == 0 else concs[::-1]):
                order = ("ours", "hf") if rep % 2 == 0 else ("hf", "ours")
                for side in order:
                    if side == "ours":
                        tps, in_flight = ours(model, tok, works[c], c, args.client)
                        runs[c]["ours"].append(tps)
                        runs[c]["in_flight"].append(in_flight)
                    else:
                        runs[c]["hf"].append(transformers_static(hf, works[c], c, pad_id=0))
        base = None
        for c in concs:
            work = works[c]
            ours_tps, hf_tps = (statistics.median(runs[c][k]) for k in ("ours", "hf"))
            print(f"# runs {name} C={c}: ours " + " ".join(f"{x:.1f}" for x in runs[c]["ours"])
                  + " | HF " + " ".join(f"{x:.1f}" for x in runs[c]["hf"])
                  + " | ours' mean requests in flight " + " ".join(
                      f"{x:.2f}" for x in runs[c]["in_flight"]), flush=True)
            base = base or ours_tps
            print(f"{name:>6} {c:>3} {len(work):>5} {sum(m for _, m in work):>7} "
                  f"{ours_tps:>11.1f} {hf_tps:>9.1f} {ours_tps / hf_tps:>8.2f} "
                  f"{ours_tps / base:>9.2f} "
                  f"{statistics.median(runs[c]['in_flight']):>9.2f}", flush=True)
            if name == "demo" and c == 8:
                headline = ours_tps / base
        if name == "demo" and 8 in runs and concs[0] in runs:
            print("# demo C=8 / C=%d within each repeat: " % concs[0] + " ".join(
                f"{a / b:.2f}" for a, b in zip(runs[8]["ours"], runs[concs[0]]["ours"])))
        del model, hf
    if headline is not None:
        print(f"RESULT serve_throughput_c8_vs_c1={headline:.3f}")


if __name__ == "__main__":
    main()
