"""The engine-core process: a busy loop that only schedules, runs the model and samples.

No asyncio, no HTTP, no detokenization: the front end (server/engine/core_client.py, in the uvicorn
process) sends requests over one ZeroMQ socket and gets one `CoreUpdate` per step back on another,
so the GIL and the event loop of the HTTP server never sit inside a decode step. A step's update is
encoded and sent while the next step's forward runs on the GPU: with async scheduling as soon as the
step returns (the lookahead step is already queued), otherwise once the next step has launched (its
tokens reach clients that much later, one forward later on CPU). The adapter store on
disk stays the source of truth: the core reads adapters from it into its own host cache, in a loader
thread, so a disk read never stalls the step loop. While idle it reads the store's newest adapters ahead,
as many as the host cache holds, so after a restart their first requests find them in host memory.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import zmq

from adapters.store import AdapterStore, DamagedAdapterError
from cache.host_cache import HostCache
from server.config import AppConfig
from server.engine.engine import Engine, RequestOutput
from server.engine.protocol import (
    AbortRequests,
    AdapterDeleted,
    AdapterStored,
    AddRequest,
    BasisInfo,
    CoreFailed,
    CoreReady,
    CoreUpdate,
    Rejected,
    Shutdown,
    encoder,
    to_core_decoder,
)
from server.engine.served import load_served


log = logging.getLogger(__name__)
PARENT_CHECK_SECONDS = 1.0
"""How often the core checks that the front end still runs (an orphaned core would hold the GPU)."""
LOAD_POLL_MS = 2
"""Poll timeout while adapter reads are in flight and nothing else runs."""


class EngineCore:
    def __init__(self, engine: Engine, store: AdapterStore, host_cache: HostCache, inbox: zmq.Socket,
                 outbox: zmq.Socket):
        self.engine = engine
        self.store = store
        self.host_cache = host_cache
        self.inbox = inbox
        self.outbox = outbox
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pica-adapter-loader")
        self._loading: dict[str, tuple[AddRequest, Future]] = {}  # request_id -> its adapter read
        self._rejected: list[Rejected] = []
        self._disk_loads: deque[float] = deque()  # appended by the loader thread
        self._parent = os.getppid()
        self._warm_ids = deque(newest_stored(store, host_cache.max_adapters))
        """Stored adapters still to read ahead while idle, newest first (a restart's host cache starts empty)."""
        self._warm_read: Future | None = None
        self._pending: tuple[list[RequestOutput], object] | None = None
        """The last step's outputs and stats, sent while the next step's forward runs (or at once when no
        step follows)."""

    def _load(self, adapter_id: str, version: str | None):
        in_host = adapter_id in self.host_cache
        start = time.perf_counter()
        handle = self.host_cache.get(adapter_id, version)
        if not in_host:
            self._disk_loads.append(time.perf_counter() - start)
        return handle

    def _handle(self, message) -> bool:
        """Apply one message; False for Shutdown."""
        if isinstance(message, AddRequest):
            if message.adapter_id is None:
                self._add(message, None)
            else:
                self._loading[message.request_id] = (
                    message, self.loader.submit(self._load, message.adapter_id, message.adapter_version))
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                if self._loading.pop(request_id, None) is None:
                    self.engine.abort_request(request_id, message.finish_reason)
        elif isinstance(message, AdapterStored):
            self.loader.submit(self._prefetch, message.adapter_id, message.version)
        elif isinstance(message, AdapterDeleted):
            self.host_cache.invalidate(message.adapter_id)
            self.engine.drop_adapter(message.adapter_id)
        elif isinstance(message, Shutdown):
            return False
        return True

    def _prefetch(self, adapter_id: str, version: str) -> None:
        try:
            self._load(adapter_id, version)
        except Exception as exc:  # noqa: BLE001 - a request for it will report the problem
            log.warning("prefetch of adapter %r failed: %s", adapter_id, exc)

    def _warm_next(self) -> None:
        """Read the next stored adapter ahead, one at a time: a request's own read waits behind one at most."""
        if self._warm_read is not None and not self._warm_read.done():
            return
        if len(self.host_cache) >= self.host_cache.max_adapters:  # never evict what requests brought in
            self._warm_ids.clear()
            return
        while self._warm_ids:
            adapter_id = self._warm_ids.popleft()
            if adapter_id not in self.host_cache:
                self._warm_read = self.loader.submit(self._prefetch, adapter_id, None)
                return

    def _add(self, message: AddRequest, adapter) -> None:
        try:
            self.engine.add_request(message.request_id, message.prompt_token_ids, message.params, adapter)
        except ValueError as exc:
            self._rejected.append(Rejected(message.request_id, 400, str(exc)))

    def _admit_loaded(self) -> None:
        """Requests whose adapter read finished join the engine, in arrival order."""
        for request_id in [r for r, (_, future) in self._loading.items() if future.done()]:
            message, future = self._loading.pop(request_id)
            try:
                self._add(message, future.result())
            except KeyError:
                self._rejected.append(Rejected(request_id, 404, f"adapter {message.adapter_id!r} not found"))
            except DamagedAdapterError as exc:
                self._rejected.append(Rejected(request_id, 500, str(exc)))
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                log.exception("reading adapter %r failed", message.adapter_id)
                self._rejected.append(Rejected(request_id, 500, f"reading adapter {message.adapter_id!r} failed: {exc}"))

    def _drain_inbox(self, timeout_ms: int | None) -> tuple[bool, bool]:
        """Handle every waiting message, waiting up to timeout_ms for the first; (running, handled any)."""
        handled = False
        if not self.inbox.poll(timeout_ms):
            return True, False
        while True:
            try:
                frame = self.inbox.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True, handled
            handled = True
            if not self._handle(to_core_decoder.decode(frame.buffer)):
                return False, handled

    def _step(self) -> tuple[list[RequestOutput], object]:
        try:
            return self.engine.step(on_launched=self._flush)
        except Exception as exc:  # fail every in-flight request rather than hang them; the loop goes on
            log.exception("engine step failed; failing in-flight requests")
            outputs = []
            for request_id in self.engine.request_ids:
                self.engine.abort_request(request_id, "error")
                outputs.append(RequestOutput(request_id, None, "", (), (), True, "error", 0, 0,
                                             f"engine step failed: {exc}"))
            return outputs, None

    def run(self) -> None:
        last_parent_check = time.monotonic()
        while True:
            if self.engine.has_work:
                timeout = 0
            elif self._loading or self._warm_ids:
                timeout = LOAD_POLL_MS
            else:
                timeout = int(PARENT_CHECK_SECONDS * 1000)
            running, handled = self._drain_inbox(timeout)
            if not running:
                return
            if time.monotonic() - last_parent_check > PARENT_CHECK_SECONDS:
                last_parent_check = time.monotonic()
                if os.getppid() != self._parent:
                    log.error("the front end process is gone; the engine core exits")
                    return
            if self._loading:
                self._admit_loaded()
            elif self._warm_ids and not self.engine.has_work:
                self._warm_next()
            # a step after messages even with nothing to run: it reports what an abort just finished
            if self.engine.has_work or handled:
                outputs, stats = self._step()
                self._flush()  # a step that launched nothing did not send the one before
                if self.engine.has_step_in_flight:  # async scheduling: the next forward runs; send now
                    self._send_update(outputs, stats)
                else:
                    self._pending = (outputs, stats)
            if not self.engine.has_work and (self._pending is not None or self._rejected or self._disk_loads):
                self._flush(always=True)  # no step follows soon: send now

    def _flush(self, always: bool = False) -> None:
        """Send the pending step's update (with any rejections and disk reads since)."""
        if self._pending is None and not always:
            return
        outputs, stats = self._pending or ([], None)
        self._pending = None
        self._send_update(outputs, stats)

    def _send_update(self, outputs, stats) -> None:
        disk_loads = []
        while self._disk_loads:
            disk_loads.append(self._disk_loads.popleft())
        rejected, self._rejected = self._rejected, []
        update = CoreUpdate(outputs, stats, self.engine.gauges(self.host_cache), rejected, disk_loads)
        self.outbox.send(encoder.encode(update), copy=False)


def newest_stored(store: AdapterStore, limit: int) -> list[str]:
    """Up to `limit` stored adapter ids, the most recently stored first (damaged or vanished ones left out)."""
    created = {}
    for adapter_id in store.ids():
        try:
            created[adapter_id] = store.info(adapter_id).created
        except (KeyError, DamagedAdapterError):
            continue
    return sorted(created, key=lambda a: (-created[a], a))[:limit]


def build_core(config: AppConfig) -> tuple[Engine, AdapterStore, HostCache, CoreReady]:
    """Load the model once and its basis (computing it if missing), as the in-process server does."""
    served = load_served(config)
    loaded, basis, store, host_cache = served.loaded, served.basis, served.store, served.host_cache
    engine = Engine(loaded, basis, config.engine, detokenize=False)
    limits = engine.limits
    ready = CoreReady(
        model_name=config.server.served_model_name or loaded.name, model_load_seconds=loaded.load_seconds,
        basis=BasisInfo(basis.checksum, basis.kind, basis.rank_max, basis.groups, basis.source, basis.seconds),
        max_model_len=limits.max_model_len, vocab_size=limits.vocab_size,
        eos_token_ids=sorted(limits.eos_token_ids), gauges=engine.gauges(host_cache),
    )
    return engine, store, host_cache, ready


def freeze_startup_objects() -> None:
    """Move everything start-up made (model modules, graphs, tokenizer) out of the collector's reach: a full
    collection would otherwise walk millions of long-lived objects in the middle of a step (vLLM does the same)."""
    gc.collect()
    gc.freeze()


def run_engine_core(config: AppConfig, inbox_address: str, outbox_address: str, log_level: int) -> None:
    """The process's entry point: connect, load, report ready (or why not), then loop until told to stop."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    context = zmq.Context()
    inbox, outbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inbox.connect(inbox_address)
    outbox.connect(outbox_address)
    try:
        engine, store, host_cache, ready = build_core(config)
    except Exception as exc:  # noqa: BLE001 - reported to the front end, which exits with it
        log.exception("engine core start-up failed")
        outbox.send(encoder.encode(CoreFailed(f"{type(exc).__name__}: {exc}")))
        outbox.close(linger=5000)
        context.term()
        sys.exit(1)
    freeze_startup_objects()
    outbox.send(encoder.encode(ready))
    log.info("engine core ready: %s", ready.model_name)
    core = EngineCore(engine, store, host_cache, inbox, outbox)
    try:
        core.run()
    finally:
        core.loader.shutdown(wait=False, cancel_futures=True)
        inbox.close(linger=0)
        outbox.close(linger=1000)
        context.term()
