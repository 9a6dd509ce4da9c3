"""`minicpm4 serve` as a real process (start, answer, SIGTERM -> graceful exit 0) and
`minicpm4 bench serve` against a running server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from minicpm4.cli import build_parser, main
from minicpm4.cli.serve import parse_bytes
from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.timeout(180)


def test_help_and_sizes(capsys) -> None:
    for cmd in (["serve"], ["bench", "serve"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*cmd, "--help"])
        assert exc.value.code == 0
    assert "--api-key" in capsys.readouterr().out
    assert parse_bytes("512M") == 512 * 2**20 and parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_serve_process_answers_and_stops_on_sigterm() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "minicpm4", "serve", "--random", "tiny", "--dtype", "float32",
         "--max-model-len", "256", "--port", str(port), "--api-key", "k", "--threads", "1",
         "--log-level", "warning"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"},
                       json={"model": "random-tiny", "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    err = proc.stderr.read()
    assert code == 0, err
    assert "serving random-tiny" in err and "server stopped" in err


def test_bench_serve_against_a_server(server, capsys) -> None:
    srv, _ = server
    code = main(["bench", "serve", "--url", srv.url, "--api-key", API_KEY, "--concurrency",
                 "1,4", "--num-requests", "6", "--max-tokens", "5", "--num-prompts", "3",
                 "--check-text"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "concurrency   1: 6/6 ok" in out and "concurrency   4: 6/6 ok" in out
    assert "token mismatches 0, text mismatches 0" in out
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--num-requests", "1"]) == 2
