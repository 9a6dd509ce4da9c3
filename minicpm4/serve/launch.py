"""Running the app under uvicorn (issue 5): in the foreground for `minicpm4 serve`, or in a
background thread on a free loopback port for tests and the load benchmark.

Shutdown is uvicorn's graceful one: stop accepting, let in-flight requests finish (up to
`graceful_timeout_s`), then the app's lifespan calls `engine.shutdown()`.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


def _config(app: Any, host: str, port: int, *, log_level: str,
            graceful_timeout_s: float | None, access_log: bool = False) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          access_log=access_log, timeout_graceful_shutdown=graceful_timeout_s,
                          timeout_keep_alive=30)


def serve_forever(app: Any, host: str = "127.0.0.1", port: int = 8000, *,
                  log_level: str = "info", graceful_timeout_s: float | None = 30.0,
                  access_log: bool = True) -> None:
    """Blocking; returns after SIGINT / SIGTERM and a graceful shutdown."""
    uvicorn.Server(_config(app, host, port, log_level=log_level,
                           graceful_timeout_s=graceful_timeout_s,
                           access_log=access_log)).run()


class ServerThread:
    """`with ServerThread(app) as srv: httpx.get(srv.url + "/health")` — a real uvicorn
    server on 127.0.0.1 and a free port, in a daemon thread with its own event loop."""

    def __init__(self, app: Any, *, log_level: str = "warning",
                 graceful_timeout_s: float | None = 10.0) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(_config(app, "127.0.0.1", self.port, log_level=log_level,
                                             graceful_timeout_s=graceful_timeout_s))
        self._thread = threading.Thread(target=self._run, name="uvicorn", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # reported by start()/stop()
            self._error = exc

    def start(self, timeout_s: float = 60.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()
        if self._thread.is_alive():
            raise TimeoutError("server did not stop in time")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
