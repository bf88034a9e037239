"""Drives the Engine from one background thread and streams each request's outputs to asyncio.

Requests and cancellations reach the engine thread through an inbox processed at step boundaries;
outputs go back through each request's asyncio queue. Leaving a stream early (client disconnect)
cancels the request, which frees its KV blocks and slot pin at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from server.engine.engine import Engine, RequestOutput
from server.engine.sampling import SamplingParams
from server.engine.stats import StepStats

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    pass


class RequestFailed(RuntimeError):
    """This request failed inside the engine (the requests batched with it went on)."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int, on_stats: Callable[[StepStats], None] | None = None):
        self.engine = engine
        # admitted = what the running batch holds plus the queue, so a burst fills both before a 429
        self.max_num_requests = engine.cfg.max_num_seqs + max_queue
        self.on_stats = on_stats
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pica-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter=None) -> "RequestStream":
        """Queue a request and return its stream. Raises ValueError for a request the engine cannot serve
        and QueueFullError when the batch and the queue are full, before anything is queued."""
        self.engine.check_request(prompt_token_ids, params)
        out_queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._streams) >= self.max_num_requests:  # every unfinished request has a stream
                raise QueueFullError(f"the server is full ({self.max_num_requests} requests running or waiting); "
                                     "retry later")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), out_queue)
        self._inbox.put(("add", request_id, prompt_token_ids, params, adapter))
        self._wake.set()
        return RequestStream(self, request_id, out_queue)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its KV blocks and slot pin are freed at the next step boundary."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def drop_adapter(self, adapter_id: str) -> None:
        self._inbox.put(("drop_adapter", adapter_id))
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items) -> None:
        """Hand (request_id, output or exception) pairs to their streams: one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                loop, out_queue = stream
                if getattr(item, "finished", True):
                    del self._streams[request_id]
                by_loop.setdefault(loop, []).append((out_queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, batch)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind, *args = message
            if kind == "add":
                request_id, prompt, params, adapter = args
                try:
                    self.engine.add_request(request_id, prompt, params, adapter)
                except ValueError as exc:
                    self._deliver(request_id, exc)
            elif kind == "abort":
                self.engine.abort_request(args[0])
                with self._lock:
                    self._streams.pop(args[0], None)
            elif kind == "drop_adapter":
                self.engine.drop_adapter(args[0])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs, stats = self.engine.step()
            except Exception as exc:  # fail every in-flight request rather than hang them
                log.exception("engine step failed; failing in-flight requests")
                for request_id in list(self._streams):
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, RuntimeError(f"engine step failed: {exc}"))
                continue
            if self.on_stats is not None:  # before delivery: a client that saw its output sees its metrics
                try:
                    self.on_stats(stats)
                except Exception:
                    log.exception("stats callback failed")
            self._deliver_all([(out.request_id, RequestFailed(out.error) if out.error else out) for out in outputs])


def put_all(items) -> None:
    """Runs on an event loop: put each (queue, item) pair."""
    for out_queue, item in items:
        out_queue.put_nowait(item)


class RequestStream:
    """Async iterator over one request's outputs; `cancel()` (idempotent) aborts it unless it finished."""

    def __init__(self, engine: AsyncEngine, request_id: str, out_queue: asyncio.Queue):
        self._engine = engine
        self.request_id = request_id
        self._queue = out_queue
        self.finished = False
        self._cancelled = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self.finished and not self._cancelled:
            self._cancelled = True
            self._engine.abort(self.request_id)
