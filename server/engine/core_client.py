"""The front end's side of the engine-core process: starts it, sends it requests, streams its outputs.

It offers what AsyncEngine offers (submit, abort, drop_adapter, shutdown), so the routes do not know
which one runs. One reader thread receives the core's per-step updates, detokenizes each request's new
tokens incrementally (O(1) per token), checks stop strings (a hit finishes the request here and aborts
it in the core) and hands the whole step to each event loop in one call. If the core process dies,
every in-flight request ends with EngineDeadError and `on_death` runs (the server then exits non-zero
so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq

from server.config import AppConfig
from server.engine.async_engine import QueueFullError, RequestFailed, RequestStream, put_all
from server.engine.core import run_engine_core
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import ModelLimits, RequestOutput, check_request
from server.engine.protocol import (
    AbortRequests,
    AdapterDeleted,
    AdapterStored,
    AddRequest,
    CoreFailed,
    CoreReady,
    CoreUpdate,
    Shutdown,
    encoder,
    from_core_decoder,
)
from server.engine.sampling import SamplingParams
from server.engine.stats import EngineGauges, StepStats

log = logging.getLogger(__name__)
LIVENESS_POLL_MS = 200
"""The reader thread checks that the core still runs at least this often."""


class EngineStartError(RuntimeError):
    """The engine core could not start (its message says why)."""


class EngineDeadError(RuntimeError):
    """The engine core process died; requests in flight cannot finish on this server."""


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version resolved in the store; its tensors live in the core's host cache."""

    adapter_id: str
    version: str


@dataclass
class _Tracked:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detokenizer: IncrementalDetokenizer


class CoreClient:
    def __init__(self, config: AppConfig, tokenizer_loader: Callable[[], object],
                 on_stats: Callable[[StepStats], None] | None = None,
                 on_disk_load: Callable[[float], None] | None = None,
                 on_death: Callable[[str], None] | None = None):
        """tokenizer_loader runs once the core is ready (the core may have built the model folder first)."""
        self.config = config
        self.max_num_requests = config.engine.max_num_seqs + config.engine.max_queue
        self._tokenizer_loader = tokenizer_loader
        self.on_stats, self.on_disk_load, self.on_death = on_stats, on_disk_load, on_death
        self.tokenizer = None
        self.ready: CoreReady | None = None
        self.limits: ModelLimits | None = None
        self.gauges = EngineGauges(max_gpu_adapters=config.engine.max_gpu_adapters)
        self.death: str | None = None
        self._streams: dict[str, _Tracked] = {}
        self._lock = threading.Lock()  # guards _streams and the send socket
        self._ipc_dir = Path(tempfile.mkdtemp(prefix="pica-core-"))
        self._context = zmq.Context()
        self._to_core = self._context.socket(zmq.PUSH)
        self._to_core.setsockopt(zmq.SNDHWM, 0)  # never block a route on a slow core: queue in memory
        self._from_core = self._context.socket(zmq.PULL)
        self._from_core.setsockopt(zmq.RCVHWM, 0)
        to_core, from_core = f"ipc://{self._ipc_dir}/to-core", f"ipc://{self._ipc_dir}/from-core"
        self._to_core.bind(to_core)
        self._from_core.bind(from_core)
        # spawn, not fork: a forked CUDA context or a forked uvicorn loop is not usable in the child
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(config, to_core, from_core, logging.getLogger().getEffectiveLevel()),
            name="pica-engine-core", daemon=True)
        self._stopping = False
        self._reader = threading.Thread(target=self._read_loop, name="pica-core-reader", daemon=True)

    @property
    def is_dead(self) -> bool:
        return self.death is not None

    def start(self) -> CoreReady:
        """Start the core and wait until it has loaded the model; EngineStartError if it cannot."""
        self.process.start()
        try:
            while True:
                if self._from_core.poll(LIVENESS_POLL_MS):
                    message = from_core_decoder.decode(self._from_core.recv())
                    if isinstance(message, CoreFailed):
                        raise EngineStartError(message.message)
                    if isinstance(message, CoreReady):
                        break
                elif not self.process.is_alive():
                    raise EngineStartError(f"the engine core process exited with code {self.process.exitcode} "
                                           "while starting (its log above says why)")
            self.tokenizer = self._tokenizer_loader()
        except BaseException:
            self._stop_process()
            raise
        self.ready = message
        self.limits = ModelLimits(message.max_model_len, message.vocab_size, frozenset(message.eos_token_ids))
        self.gauges = message.gauges
        self._reader.start()
        return message

    def _send(self, message) -> None:
        with self._lock:
            self._to_core.send(encoder.encode(message), copy=False)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        check_request(self.limits, prompt_token_ids, params)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               adapter: AdapterRef | None = None) -> RequestStream:
        """As AsyncEngine.submit; EngineDeadError once the core has died."""
        if self.death is not None:
            raise EngineDeadError(self.death)
        self.check_request(prompt_token_ids, params)
        tracked = _Tracked(asyncio.get_running_loop(), asyncio.Queue(),
                           IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop))
        with self._lock:
            if len(self._streams) >= self.max_num_requests:
                raise QueueFullError(f"the server is full ({self.max_num_requests} requests running or waiting); "
                                     "retry later")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = tracked
            self._to_core.send(encoder.encode(AddRequest(
                request_id, list(prompt_token_ids), params, adapter.adapter_id if adapter else None,
                adapter.version if adapter else None)), copy=False)
        return RequestStream(self, request_id, tracked.queue)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._streams.pop(request_id, None) is None:
                return  # finished (or failed) already: nothing in the core to free
            if self.death is None:
                self._to_core.send(encoder.encode(AbortRequests([request_id])), copy=False)

    def adapter_stored(self, adapter_id: str, version: str) -> None:
        if self.death is None:
            self._send(AdapterStored(adapter_id, version))

    def drop_adapter(self, adapter_id: str) -> None:
        if self.death is None:
            self._send(AdapterDeleted(adapter_id))

    def _read_loop(self) -> None:
        while not self._stopping:
            try:
                if not self._from_core.poll(LIVENESS_POLL_MS):
                    if not self.process.is_alive() and not self._stopping:
                        self._die(f"the engine core process exited with code {self.process.exitcode}")
                        return
                    continue
                message = from_core_decoder.decode(self._from_core.recv(copy=False).buffer)
                if isinstance(message, CoreUpdate):
                    self._apply(message)
            except Exception as exc:  # noqa: BLE001 - streams must not hang on a reader that stopped
                if self._stopping:
                    return
                log.exception("reading the engine core's updates failed")
                self.process.kill()  # its requests can no longer reach anyone: restart the whole server
                self._die(f"reading the engine core's updates failed: {type(exc).__name__}: {exc}")
                return

    def _apply(self, update: CoreUpdate) -> None:
        self.gauges = update.gauges
        if update.stats is not None and self.on_stats is not None:  # before delivery, as AsyncEngine
            self.on_stats(update.stats)
        if self.on_disk_load is not None:
            for seconds in update.disk_load_seconds:
                self.on_disk_load(seconds)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        stopped: list[str] = []
        with self._lock:
            for rejected in update.rejected:
                tracked = self._streams.pop(rejected.request_id, None)
                if tracked is not None:
                    by_loop.setdefault(tracked.loop, []).append((tracked.queue, RequestRejected(
                        rejected.status, rejected.message)))
            for out in update.outputs:
                tracked = self._streams.get(out.request_id)
                if tracked is None:
                    continue  # cancelled, or finished here by a stop string a step ago
                item = RequestFailed(out.error) if out.error else self._detokenize(tracked, out)
                if isinstance(item, RequestFailed) or item.finished:
                    del self._streams[out.request_id]
                    if not out.finished:
                        stopped.append(out.request_id)
                by_loop.setdefault(tracked.loop, []).append((tracked.queue, item))
            if stopped:
                self._to_core.send(encoder.encode(AbortRequests(stopped, "stop")), copy=False)
        for loop, items in by_loop.items():  # one wake-up per event loop per step
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass

    @staticmethod
    def _detokenize(tracked: _Tracked, out: RequestOutput) -> RequestOutput:
        """The core's token ids -> the same output the in-process engine gives, text and stop strings included."""
        detok, finished, reason = tracked.detokenizer, out.finished, out.finish_reason
        if not (finished and reason == "stop"):  # EOS and stop token ids are never part of the text
            for token in out.token_ids:
                if detok.add_token(token):
                    finished, reason = True, "stop"
                    break
        return dataclasses.replace(out, text=detok.take_delta(final=finished), finished=finished,
                                   finish_reason=reason)

    def _die(self, message: str) -> None:
        log.error("%s: failing every in-flight request", message)
        self.death = f"{message}; this server is stopping so that it can be restarted"
        with self._lock:
            streams, self._streams = self._streams, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for tracked in streams.values():
            by_loop.setdefault(tracked.loop, []).append((tracked.queue, EngineDeadError(self.death)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:
                pass
        if self.on_death is not None:
            self.on_death(self.death)

    def _stop_process(self) -> None:
        self._stopping = True
        if self._context.closed:
            return
        if self.process.is_alive():
            try:
                with self._lock:
                    self._to_core.send(encoder.encode(Shutdown()), copy=False)
            except zmq.ZMQError:
                pass
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._context.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def shutdown(self) -> None:
        self._stopping = True
        if self._reader.is_alive():
            self._reader.join(timeout=5)
        self._stop_process()


class RequestRejected(RuntimeError):
    """The core refused a request before running it (an adapter deleted meanwhile, a bad seed)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
