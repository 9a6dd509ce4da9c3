"""`AsyncEngine`: the `LLM` step loop on a background thread, streamed to asyncio (issue 5).

The server (`serve/`) only talks to this class. A step that raises ends the requests then in
flight with `EngineDeadError` (HTTP 503), frees every page and the engine serves on.
`generate` is an async iterator of `RequestOutput` deltas; deltas that queued up while the
consumer was busy are merged into one, so a slow client costs one event per turn instead of
one per token. Leaving it early (the consumer's `aclose()`, or its task being cancelled when
a client disconnects) aborts the request, which frees its KV pages at the next step. The
engine thread sleeps while there is no work and wakes on every new request or abort.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence

from minicpm4.engine.errors import EngineBusyError, EngineDeadError
from minicpm4.engine.llm import LLM
from minicpm4.engine.outputs import RequestOutput
from minicpm4.engine.request import SamplingParams
from minicpm4.utils.openmp import release_thread_pool

log = logging.getLogger(__name__)


__all__ = ["AsyncEngine", "EngineBusyError", "EngineDeadError"]


class AsyncEngine:
    def __init__(self, llm: LLM, *, model_name: str = "minicpm4") -> None:
        self.llm = llm
        self.model_name = model_name
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = False
        self._accepting = False
        self.error: BaseException | None = None
        """Set when the engine cannot go on (its reset after a failed step failed too)."""
        self.step_errors = 0
        """Failed steps so far; each one ends the requests then in flight with an error, and
        the engine serves on from an empty pool."""

    # ---------------------------------------------------------------- facts
    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stats(self) -> dict:
        return self.llm.stats()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop = False
        self._accepting = True
        # This thread (the server's, which usually loaded the model) will not run torch ops
        # any more: its idle OpenMP workers would make every parallel region of the engine
        # thread wait for a wake-up (utils/openmp.py).
        release_thread_pool()
        self._thread = threading.Thread(target=self._run, name="minicpm4-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop accepting; let running requests finish for up to `grace_s`, abort the rest."""
        self._accepting = False
        waited = 0.0
        while self._queues and waited < grace_s:
            await asyncio.sleep(0.05)
            waited += 0.05
        for rid in list(self._queues):
            self.abort(rid)
        waited = 0.0
        while self._queues and waited < 2.0:
            await asyncio.sleep(0.02)
            waited += 0.02
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    # ---------------------------------------------------------------- requests
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Deltas of one request until its final one (finish_reason set). Raises ValueError
        for an invalid request, EngineDeadError if the engine loop failed."""
        if not self._accepting:
            raise EngineDeadError("the engine is not running (shutting down or not started)")
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error!r}")
        queue: asyncio.Queue = asyncio.Queue()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = queue
        finished = added = False
        pending = None  # an item taken while coalescing, to be handled next
        try:
            self.llm.add_request(prompt_ids, params, request_id)
            added = True
            self._wake.set()
            while True:
                item, pending = (pending, None) if pending is not None else \
                    (await queue.get(), None)
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item!r}") from item
                # Deltas that queued up while the consumer was busy go out as one.
                while not item.finished and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        pending = nxt
                        break
                    item = item.merged(nxt)
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._queues.pop(request_id, None)
            if added and not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.llm.abort(request_id)
        self._wake.set()

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while not self._stop:
            if not self.llm.has_unfinished():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = self.llm.step()
            except Exception as exc:  # noqa: BLE001 - reported to every request in flight
                log.exception("engine step failed; aborting the requests in flight")
                self.step_errors += 1
                try:  # the pages of a failed step are not trusted: start from a clean pool
                    ended = self.llm.abort_all()
                except Exception as reset_exc:  # noqa: BLE001
                    log.exception("engine reset failed; the engine is dead")
                    self.error = reset_exc
                    self._fail(exc, list(self._queues))
                    return
                self._fail(exc, ended)
                continue
            if outputs:  # one wake-up of the event loop per step, not one per request
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: hand a step's outputs to their requests' queues."""
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail(self, exc: BaseException, request_ids: list[str]) -> None:
        for rid in request_ids:
            queue = self._queues.get(rid)
            if queue is not None:
                self._loop.call_soon_threadsafe(queue.put_nowait, exc)
