"""Bounded load test of the server on loopback (issue 5, acceptance 4).

Starts the real CLI server as a subprocess (`minicpm4 serve --random tiny --dtype float32
--api-key ...`, fp32 so that greedy answers do not depend on the batch they run in), then:
1. asks every distinct prompt once without streaming (greedy reference texts);
2. sends `--requests` streamed greedy chat requests, `--concurrency` in flight, from this
   process (`serve/loadgen.py`); every `--cancel-every`-th client hangs up after two events;
3. audits every answered stream: HTTP 200, ends with `data: [DONE]`, streamed tokens (one
   logprob entry each) == `usage.completion_tokens`, streamed text == the reference text;
4. checks the engine is idle afterwards (`/metrics`: nothing running or waiting, so the
   cancelled requests were aborted) and that SIGTERM shuts the server down cleanly (exit 0).
Prints the report and last  RESULT serve_load_p99_latency_s=<p99 request latency>.
Exit status 1 if any check fails.
Usage: python benchmarks/serve_load.py [--requests 300] [--concurrency 32] [--max-tokens 32]
       [--prompts 24] [--cancel-every 25] [--server-args "--random tiny --dtype float32"]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx
import torch

from minicpm4.cli.serve import bench_prompts
from minicpm4.serve import loadgen

API_KEY = "load-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("server did not become healthy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--cancel-every", type=int, default=25)
    ap.add_argument("--server-args", default="--random tiny --dtype float32 --threads 1 "
                    "--max-model-len 1024 --max-num-seqs 32")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "minicpm4", "serve", "--port", str(port), "--api-key",
           API_KEY, "--log-level", "warning", *shlex.split(args.server_args)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("server: " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    failures = []
    try:
        wait_healthy(url, proc)
        prompts = bench_prompts(args.prompts)
        t0 = time.perf_counter()
        refs = asyncio.run(loadgen.reference_texts(url, API_KEY, None, prompts,
                                                   args.max_tokens))
        print(f"references: {len(refs)} non-streamed greedy answers in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        report = asyncio.run(loadgen.run_load(
            url, api_key=API_KEY, model=None, prompts=prompts, num_requests=args.requests,
            concurrency=args.concurrency, max_tokens=args.max_tokens, references=refs,
            cancel_every=args.cancel_every))
        print(report.summary(), flush=True)
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(url + "/metrics", timeout=10).text
            busy = metric(text, "minicpm4_num_running") + metric(text, "minicpm4_num_waiting")
            if busy == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        fivexx = [ln for ln in text.splitlines()
                  if ln.startswith("minicpm4_http_requests_total") and 'status="5' in ln]
        print(f"after the load: running+waiting {busy:.0f}, KV blocks used "
              f"{metric(text, 'minicpm4_kv_blocks_used'):.0f}, requests finished "
              f"{metric(text, 'minicpm4_requests_finished_total'):.0f}, aborted "
              f"{metric(text, 'minicpm4_requests_aborted_total'):.0f}, server 5xx lines "
              f"{len(fivexx)}")
        if not report.clean or report.server_errors:
            failures.append("load report not clean")
        if busy:
            failures.append("engine not idle after the load")
        if fivexx:
            failures.append("server counted 5xx answers")
        if report.cancelled and metric(text, "minicpm4_requests_aborted_total") < 1:
            failures.append("cancelled streams were not aborted in the engine")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 60 s"
    print(f"server exit after SIGTERM: {code}")
    if code != 0:
        failures.append(f"server exit status {code}")
    print("checks: " + ("all passed" if not failures else "FAILED: " + "; ".join(failures)))
    print(f"RESULT serve_load_p99_latency_s={report.latency(99):.3f}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
