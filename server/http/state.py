"""The services behind the routes, built once at start-up, and the generation helpers routes share."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from adapters.format import AdapterExpectation, AdapterValidationError
from adapters.store import AdapterIdError, AdapterStore, DamagedAdapterError, check_adapter_id
from cache.basis_cache import Basis
from cache.host_cache import AdapterHandle, HostCache
from cache.svd_factors import SvdFactorsInCore
from server.config import AppConfig
from server.engine.async_engine import AsyncEngine, QueueFullError, RequestFailed, RequestStream
from server.engine.core_client import AdapterRef, CoreClient, EngineDeadError, RequestRejected
from server.engine.engine import Engine, ModelLimits, RequestOutput
from server.engine.served import load_served
from server.engine.sampling import SamplingParams
from server.engine.stats import EngineGauges
from server.http.errors import APIError
from server.metrics import Metrics
from server.step_trace import StepTrace
from server.model_loader import LoadedModel, model_source, served_name

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """With the engine in its own process (`config.server.engine_process`), `async_engine` is the CoreClient
    that talks to it and `loaded`, `engine` and `host_cache` are None: they live in the core, and `basis`
    has no P tensors (its identity and shapes, which validating uploads needs)."""

    config: AppConfig
    tokenizer: object
    basis: Basis
    limits: ModelLimits
    async_engine: AsyncEngine | CoreClient
    """What routes submit to: the in-process engine's thread, or the engine-core process's client."""
    store: AdapterStore
    metrics: Metrics
    model_name: str
    started_at: int
    loaded: LoadedModel | None = None
    engine: Engine | None = None
    host_cache: HostCache | None = None

    @property
    def engine_in_process(self) -> bool:
        return self.engine is not None

    def gauges(self) -> EngineGauges:
        if self.engine is not None:
            return self.engine.gauges(self.host_cache)
        return self.async_engine.gauges

    async def resolve_adapter(self, adapter_id: str | None, param: str) -> AdapterHandle | AdapterRef | None:
        """None for the base model; else the adapter's host-resident version (404 if unknown), or with the
        engine in its own process the version the core is to load."""
        if adapter_id is None or adapter_id == self.model_name:
            return None
        not_found = APIError(404, f"model or adapter {adapter_id!r} not found", param, "not_found_error")
        try:
            check_adapter_id(adapter_id)
        except AdapterIdError:
            raise not_found from None
        in_host = self.host_cache is not None and adapter_id in self.host_cache
        start = time.perf_counter()
        try:
            # the store's record first (one small read): in a store shared by several replicas, what another
            # replica deleted or replaced must not be served from this one's host cache
            version = (await run_in_threadpool(self.store.info, adapter_id)).checksum
            if self.host_cache is None:  # the core reads it (off its step loop) and reports the disk time
                return AdapterRef(adapter_id, version)
            handle = await run_in_threadpool(self.host_cache.get, adapter_id, version)
        except KeyError:
            raise not_found from None
        except DamagedAdapterError as exc:
            raise APIError(500, str(exc), param) from exc
        if not in_host:
            self.metrics.observe_disk_load(time.perf_counter() - start)
        return handle

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterHandle | None) -> RequestStream:
        """Queue a request; 400 for one the engine cannot serve, 429 when the batch and the queue are full."""
        try:
            return self.async_engine.submit(uuid.uuid4().hex, prompt_ids, params, adapter)
        except QueueFullError as exc:
            raise APIError(429, str(exc)) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    def adapter_stored(self, adapter_id: str, version: str) -> None:
        """An upload landed: the engine core reads it ahead of the first request (in-process: on demand)."""
        if isinstance(self.async_engine, CoreClient):
            self.async_engine.adapter_stored(adapter_id, version)

    def adapter_deleted(self, adapter_id: str) -> None:
        """Forget the host copy and the GPU slot it does not hold pinned; running requests finish."""
        if self.host_cache is not None:
            self.host_cache.invalidate(adapter_id)
        self.async_engine.drop_adapter(adapter_id)

    def max_tokens_for(self, prompt_ids: list[int], requested: int | None) -> int:
        """`max_tokens` as asked; absent, what the context leaves after the prompt (as OpenAI and vLLM do:
        generation runs to EOS). A prompt that fills the context gets 1, which check_request refuses."""
        if requested is not None:
            return requested
        return max(1, self.limits.max_model_len - len(prompt_ids))

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def engine_error(exc: BaseException) -> APIError | None:
    """The HTTP error for a request that failed in the engine, or None for an exception of another kind."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc))
    if isinstance(exc, RequestRejected):
        return APIError(exc.status, str(exc))
    if isinstance(exc, RequestFailed):
        return APIError(500, f"the request failed: {exc}")
    return None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sampling_params(body, max_tokens: int, logprobs: int | None, seed_offset: int = 0) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 8:
        raise APIError(400, "at most 8 stop strings are allowed", "stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=None if body.seed is None else body.seed + seed_offset,
            stop=tuple(stop),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


@dataclass
class Collected:
    text: str
    token_ids: list[int]
    logprobs: list
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


DISCONNECT_POLL_SECONDS = 0.05
"""How often a non-streaming request checks that its client is still there: a client that left stops holding
KV blocks and batch rows within this (a stream notices at its next write)."""


async def collect(streams: list[RequestStream], request: Request) -> list[Collected]:
    """Run requests to completion; a client that disconnects first cancels them all."""
    results = [Collected("", [], [], None, 0, 0) for _ in streams]

    async def gather() -> None:
        async for index, out in merge_streams(streams):
            _accumulate(results[index], out)

    task = asyncio.ensure_future(gather())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not done and await request.is_disconnected():
                raise APIError(499, "client disconnected")
        try:
            task.result()
        except (RequestFailed, EngineDeadError, RequestRejected) as exc:
            raise engine_error(exc) from exc
        return results
    finally:
        if not task.done():
            task.cancel()
        for stream in streams:
            stream.cancel()


def _accumulate(result: Collected, out: RequestOutput) -> None:
    result.text += out.text
    result.token_ids += out.token_ids
    result.logprobs += out.logprobs
    result.finish_reason = out.finish_reason
    result.num_prompt_tokens = out.num_prompt_tokens
    result.num_output_tokens = out.num_output_tokens


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as (index, output), for n > 1 or a list of prompts."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream):
        try:
            async for out in stream:
                await queue.put((index, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            if item.finished:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()


def provision_adapters(store: AdapterStore, adapters) -> None:
    """`--adapter ID=PATH`: store each folder under its id; a bad one is logged and skipped."""
    for adapter_id, folder in adapters:
        try:
            info = store.provision(adapter_id, folder)
        except (AdapterIdError, AdapterValidationError, FileExistsError, OSError) as exc:
            log.error("--adapter %s=%s skipped: %s", adapter_id, folder, exc)
        else:
            log.info("--adapter %s=%s: serving it (checksum %s)", adapter_id, folder, info.checksum[:12])


def step_observer(config: AppConfig, metrics: Metrics):
    """What sees each engine step's stats: the metrics, and the --step-trace file where one is named."""
    if config.server.step_trace is None:
        return metrics.observe_step
    trace = StepTrace(config.server.step_trace)

    def observe(stats) -> None:
        metrics.observe_step(stats)
        trace.record(stats)

    return observe


def build_state(config: AppConfig, metrics: Metrics, on_engine_died=None) -> ServerState:
    """Start the engine (in its own process, or in this one) and the services around it."""
    if config.server.engine_process:
        return build_split_state(config, metrics, on_engine_died)
    return build_in_process_state(config, metrics)


def build_in_process_state(config: AppConfig, metrics: Metrics) -> ServerState:
    """Load the model once, its basis from the cache (computing it if missing), and start the engine."""
    served = load_served(config)
    loaded, basis, store, host_cache = served.loaded, served.basis, served.store, served.host_cache
    provision_adapters(store, config.server.adapters)
    engine = Engine(loaded, basis, config.engine)
    async_engine = AsyncEngine(engine, config.engine.max_queue, on_stats=step_observer(config, metrics))
    async_engine.start()
    name = config.server.served_model_name or loaded.name
    state = ServerState(config, loaded.tokenizer, basis, engine.limits, async_engine, store, metrics, name,
                        int(time.time()), loaded=loaded, engine=engine, host_cache=host_cache)
    metrics.on_ready(state, loaded.load_seconds, basis)
    log.info("ready: %s with %d stored adapters", name, len(store))
    return state


def build_split_state(config: AppConfig, metrics: Metrics, on_engine_died=None) -> ServerState:
    """Start the engine-core process (it loads the model and basis) and, once it is ready, this process's
    tokenizer and store (validated against the basis the core reports)."""
    from transformers import AutoTokenizer

    client = CoreClient(config, lambda: AutoTokenizer.from_pretrained(model_source(config.model)),
                        on_stats=step_observer(config, metrics), on_disk_load=metrics.observe_disk_load, on_death=on_engine_died)
    ready = client.start()
    try:
        info = ready.basis
        basis = Basis(info.checksum, info.kind, info.rank_max, info.groups, {}, info.source, info.seconds)
        expect = AdapterExpectation.from_basis(basis, config.engine.max_lora_rank, SvdFactorsInCore(),
                                               config.engine.max_psoft_rank)
        store = AdapterStore(config.adapter_dir, expect)
        provision_adapters(store, config.server.adapters)
    except BaseException:
        client.shutdown()
        raise
    name = ready.model_name or served_name(config.model.model)
    state = ServerState(config, client.tokenizer, basis, client.limits, client, store, metrics, name, int(time.time()))
    metrics.on_ready(state, ready.model_load_seconds, basis)
    log.info("ready: %s with %d stored adapters (engine core in process %d)", name, len(store), client.process.pid)
    return state
