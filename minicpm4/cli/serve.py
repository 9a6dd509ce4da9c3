"""`minicpm4 serve` (the OpenAI-compatible server) and `minicpm4 bench serve` (a load generator
against one), issue 5. The model is resolved by `loading.py` (default: the bundled demo model),
wrapped in the engine (`LLM` + `AsyncEngine`) and served by `serve.server.build_app` under
uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

import torch

from minicpm4 import loading
from minicpm4.cli.run import add_context_sparse_args

Handler = Callable[[argparse.Namespace], int]
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?)i?B?\s*$", re.I)


def parse_bytes(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1048576' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 512M, 2G)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be >= 1")
    return values


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", default=None,
                   help="HF-format MiniCPM4 folder; default: the bundled demo model")
    g.add_argument("--random", metavar="PRESET", choices=sorted(loading.RANDOM_PRESETS),
                   help="random weights of a preset shape instead of --model (load tests)")
    g.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer folder (default: the model's, else the bundled one)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = the checkpoint's dtype (float16 is refused on CPU)")
    g.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model` (default: the folder or preset name)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    add_context_sparse_args(p)
    e = p.add_argument_group("engine")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + generated tokens per request (default: the model's context)")
    e.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens computed per engine step (decode + prefill chunks)")
    e.add_argument("--kv-blocks", type=int, default=None,
                   help="KV-cache blocks in the pool (overrides --kv-memory)")
    e.add_argument("--kv-memory", default="512M",
                   help="memory for the KV-cache pool, e.g. 512M or 4G (default 512M)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    e.add_argument("--max-queued-requests", type=int, default=4096,
                   help="queued requests beyond which new ones get 503 (default 4096)")
    e.add_argument("--max-prefill-chunk", type=int, default=512,
                   help="longest prefill piece of one request per step (chunked prefill)")
    e.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse KV blocks of shared prompt prefixes")
    s = p.add_argument_group("HTTP")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("MINICPM4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                        "$MINICPM4_API_KEY, else no key)")
    s.add_argument("--max-request-bytes", default="4M", help="largest request body (4M)")
    s.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens when a request gives none (default: the rest of the "
                        "context)")
    s.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let running requests finish on shutdown")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--api-key", default=os.environ.get("MINICPM4_API_KEY"))
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 8, 32],
                   help="comma-separated concurrency levels (default 1,8,32)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument("--num-prompts", type=int, default=16, help="distinct prompts cycled")
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate max_tokens (steady token counts)")
    p.add_argument("--check-text", action="store_true",
                   help="also compare every streamed text with the non-streamed greedy "
                        "answer of its prompt")
    p.add_argument("--json", metavar="FILE", default=None, help="write the reports as JSON")


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve a model over /v1/chat/completions, "
                                       "/v1/completions, /v1/models, /health, /metrics.")
    _add_serve_args(serve)
    bench = sub.add_parser("bench", help="benchmarks (bench serve: load a running server)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="TARGET")
    _add_bench_args(bsub.add_parser(
        "serve", help="streamed chat load at several concurrency levels",
        description="Greedy streamed chat requests against a running server; checks every "
                    "stream ends with [DONE] and its token count equals usage; prints "
                    "throughput, latency and TTFT percentiles."))
    return {"serve": _cmd_serve, "bench": _cmd_bench}


def build_engine(args: argparse.Namespace):
    """(AsyncEngine, model name) from the serve arguments."""
    from minicpm4.engine.async_engine import AsyncEngine
    from minicpm4.engine.config import EngineConfig
    from minicpm4.engine.llm import LLM

    model, tok = loading.load_model_and_tokenizer(args)
    config = EngineConfig(
        block_size=args.block_size, num_kv_blocks=args.kv_blocks,
        kv_cache_bytes=parse_bytes(args.kv_memory), max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching, max_model_len=args.max_model_len,
        max_queued_requests=args.max_queued_requests, max_prefill_chunk=args.max_prefill_chunk)
    name = args.served_model_name or (args.random and f"random-{args.random}") or \
        Path(args.model or loading.BUNDLED_MODEL).resolve().name
    if name == "demo" and not args.model:
        name = "minicpm4-demo"
    return AsyncEngine(LLM(model, tok, config), model_name=name), name


def _cmd_serve(args: argparse.Namespace) -> int:
    from minicpm4.serve.launch import serve_forever
    from minicpm4.serve.server import build_app

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine, name = build_engine(args)
    app = build_app(engine, api_key=args.api_key,
                    max_request_bytes=parse_bytes(args.max_request_bytes),
                    default_max_tokens=args.default_max_tokens)
    print(f"serving {name} (context {engine.max_model_len}, {engine.llm.pool.num_usable} KV "
          f"blocks) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal; ours turns
    # that into a normal return, so that a clean shutdown exits with status 0.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        serve_forever(app, args.host, args.port, log_level=args.log_level,
                      graceful_timeout_s=args.graceful_timeout)
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("server stopped", file=sys.stderr, flush=True)
    return 0


class _Stopped(Exception):
    pass


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped(signum)


BENCH_PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "What is the capital of France, and why is it famous?",
    "Write three lines about the sea.",
    "Explain how a bicycle stays upright.",
    "List five fruits and their colours.",
    "Describe a rainy afternoon in a small village.",
    "Why do cats purr?",
    "Give me advice for learning to play the violin.",
]


def bench_prompts(n: int) -> list[str]:
    return [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] + ("" if i < len(BENCH_PROMPTS)
                                                     else f" (variant {i})") for i in range(n)]


def _cmd_bench(args: argparse.Namespace) -> int:
    import httpx

    from minicpm4.serve import loadgen

    if args.num_requests < 1 or args.max_tokens < 1 or args.num_prompts < 1:
        raise ValueError("--num-requests, --max-tokens and --num-prompts must be >= 1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(args.url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {args.url}: {exc}") from exc
    if models.status_code != 200:
        raise ValueError(f"{args.url}/v1/models answered {models.status_code}: "
                         f"{models.text[:200]}")
    model = args.model or models.json()["data"][0]["id"]
    prompts = bench_prompts(args.num_prompts)
    refs = None
    if args.check_text:
        refs = asyncio.run(loadgen.reference_texts(args.url, args.api_key, model, prompts,
                                                   args.max_tokens, ignore_eos=args.ignore_eos))
    reports = []
    for conc in args.concurrency:
        report = asyncio.run(loadgen.run_load(
            args.url, api_key=args.api_key, model=model, prompts=prompts,
            num_requests=args.num_requests, concurrency=conc, max_tokens=args.max_tokens,
            ignore_eos=args.ignore_eos, references=refs))
        print(report.summary(), flush=True)
        reports.append(report)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in reports], indent=2))
    return 0 if all(r.clean for r in reports) else 1
