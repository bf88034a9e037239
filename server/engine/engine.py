"""The engine: turns requests into tokens, one `step()` at a time (schedule -> run -> postprocess).

Requests for different adapters share every batch. This class is synchronous and single-threaded;
AsyncEngine drives it from a background thread of the HTTP server, EngineCore from its own process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cache.host_cache import AdapterHandle
from cache.slot_table import SlotTable
from server.config import EngineConfig
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.model_runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, TokenLogprob
from server.engine.stats import EngineGauges, FinishedRequest, StepStats
from server.engine.warmup import warm_up

log = logging.getLogger(__name__)
DEFAULT_MAX_MODEL_LEN_CAP = 8192


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (deltas since the previous output)."""

    request_id: str
    adapter_id: str | None
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    """Set (with finish_reason 'error') when this request failed inside a step; the others go on."""


@dataclass(frozen=True)
class ModelLimits:
    """Facts discovered at start-up (not written back into config)."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]


def discover_limits(loaded, cfg: EngineConfig) -> ModelLimits:
    text_cfg = loaded.model.config.get_text_config()
    max_len = cfg.max_model_len or min(getattr(text_cfg, "max_position_embeddings", 2048), DEFAULT_MAX_MODEL_LEN_CAP)
    eos: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), text_cfg):
        value = getattr(source, "eos_token_id", None)
        eos.update([value] if isinstance(value, int) else (value or []))
    if loaded.tokenizer.eos_token_id is not None:
        eos.add(loaded.tokenizer.eos_token_id)
    return ModelLimits(max_len, loaded.model.get_output_embeddings().weight.shape[0], frozenset(eos))


def check_request(limits: ModelLimits, prompt_token_ids: list[int], params: SamplingParams) -> None:
    """Raise ValueError (a 400 at the HTTP edge) for a request a model of these limits cannot serve; the
    front end of the engine-core process checks with the limits the core reported, before sending."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in prompt_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    if len(prompt_token_ids) + params.max_tokens > limits.max_model_len:
        raise ValueError(
            f"the prompt has {len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens}: "
            f"together more than this model's context length {limits.max_model_len}"
        )


class Engine:
    def __init__(self, loaded, basis, cfg: EngineConfig, detokenize: bool = True):
        """detokenize=False: outputs carry token ids only and stop strings are the caller's to check (the
        engine-core process leaves both to the front end, which aborts a request that hit one)."""
        self.cfg = cfg
        self.detokenize = detokenize
        self.tokenizer = loaded.tokenizer
        self.limits = discover_limits(loaded, cfg)
        self.runner = ModelRunner(loaded, basis, cfg, self.limits.max_model_len)
        if self.runner.device.type == "cuda":  # compiles what graph capture did not, before the server is ready
            log.info("warm-up prefill: %.2f s", warm_up(self.runner, cfg.max_num_batched_tokens, cfg.max_num_seqs))
        self.slots = SlotTable(cfg.max_gpu_adapters)
        self.blocks = BlockManager(self.runner.num_kv_blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg.max_num_seqs, cfg.max_num_batched_tokens, self.blocks, self.slots)
        self._seqs: dict[str, Sequence] = {}
        self._aborted: list[FinishedRequest] = []  # reported with the next step's stats
        self._last_step_end: float | None = None  # set while work was left at the end of the last step

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def adapter_ids_by_state(self) -> tuple[list[str], list[str]]:
        """Distinct adapter ids of the running requests and of the waiting ones, each oldest first.

        Read by the metrics scrape from another thread: tuple() copies each queue in one C call, which the
        engine thread cannot interleave with under the GIL."""
        running, waiting = tuple(self.scheduler.running), tuple(self.scheduler.waiting)
        return (list(dict.fromkeys(s.adapter_id for s in running if s.adapter_id is not None)),
                list(dict.fromkeys(s.adapter_id for s in waiting if s.adapter_id is not None)))

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (a 400 at the HTTP edge) for a request the engine cannot serve."""
        check_request(self.limits, prompt_token_ids, params)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter: AdapterHandle | None = None
    ) -> None:
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(prompt_token_ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop) if self.detokenize else None
        seq = Sequence(request_id, list(prompt_token_ids), params, adapter, detok)
        self.runner.sampler.add(seq)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    @property
    def request_ids(self) -> list[str]:
        """Every unfinished request."""
        return list(self._seqs)

    def abort_request(self, request_id: str, finish_reason: str = "abort") -> bool:
        """Cancel a request and free its KV blocks and slot pin at once; False if it is not here.
        `finish_reason` is what its stats say ('stop' when the front end found a stop string)."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, finish_reason)
        self.runner.sampler.forget(request_id)
        self._aborted.append(FinishedRequest.of(seq, time.monotonic()))
        return True

    def drop_adapter(self, adapter_id: str) -> None:
        """A deleted adapter leaves the GPU slots it does not hold pinned; running requests finish."""
        self.slots.drop(adapter_id)

    def gauges(self, host_cache=None) -> EngineGauges:
        """Current occupancy (and the host cache's, when given). Safe from another thread: it reads lengths
        and counters only."""
        running, waiting = self.adapter_ids_by_state()
        host = host_cache.stats if host_cache is not None else None
        return EngineGauges(
            num_running=self.num_running, num_waiting=self.num_waiting, kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks, num_gpu_adapters=self.slots.num_resident,
            max_gpu_adapters=self.cfg.max_gpu_adapters, running_adapter_ids=tuple(running),
            waiting_adapter_ids=tuple(waiting), num_host_adapters=len(host_cache) if host_cache is not None else 0,
            host_hits=host.hits if host else 0, host_misses=host.misses if host else 0,
            host_evictions=host.evictions if host else 0,
        )

    def step(self, on_launched: Callable[[], None] | None = None) -> tuple[list[RequestOutput], StepStats]:
        """One step. `on_launched` runs once the forward is queued on the device and before the step waits for
        it (sampling syncs): host work that needs no result of this step (the engine core sends the previous
        step's outputs there) overlaps the GPU instead of following it."""
        start = time.perf_counter()
        gap = start - self._last_step_end if self._last_step_end is not None else 0.0  # the loop's own time
        hits, misses, evictions = self.slots.stats.hits, self.slots.stats.misses, self.slots.stats.evictions
        sched = self.scheduler.schedule()
        swap_seconds = tuple(self.runner.load_adapter(slot, handle.tensors) for slot, handle in sched.slot_loads)
        outputs: list[RequestOutput] = []
        ttft, itl, finished = [], [], self._aborted
        self._aborted = []
        prefill_tokens = decode_tokens = 0
        if sched.scheduled:
            logits = self.runner.run(sched.scheduled)
            if on_launched is not None:
                on_launched()
            sampling = [item.seq for item in sched.scheduled if item.samples]
            tokens, logprobs = self.runner.sampler(logits, sampling)
            now = time.monotonic()
            for item in sched.scheduled:
                item.seq.num_computed_tokens += item.num_tokens
                if item.num_tokens == 1 and item.seq.num_output_tokens > 0:
                    decode_tokens += 1
                else:
                    prefill_tokens += item.num_tokens
            for seq, token, logprob in zip(sampling, tokens, logprobs):
                if seq.first_token_time is None:
                    seq.first_token_time = now
                    ttft.append(now - seq.arrival_time)
                else:
                    itl.append(now - seq.last_token_time)
                seq.last_token_time = now
                try:
                    outputs.append(self._postprocess(seq, token, logprob))
                except Exception as exc:  # this request's own failure (detokenizing, stop strings): it alone ends
                    log.exception("request %s failed in a step; the others go on", seq.request_id)
                    outputs.append(self._fail(seq, exc))
                if seq.is_finished:
                    finished.append(FinishedRequest.of(seq, now))
        gpu_seconds = self.runner.forward_gpu_seconds() if sched.scheduled else 0.0
        end = time.perf_counter()
        self._last_step_end = end if self.has_work else None
        stats = StepStats(
            batch_size=len(sched.scheduled),
            num_prefill_tokens=prefill_tokens,
            num_decode_tokens=decode_tokens,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_preempted=sched.num_preempted,
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            gpu_slot_hits=self.slots.stats.hits - hits,
            gpu_slot_misses=self.slots.stats.misses - misses,
            gpu_slot_evictions=self.slots.stats.evictions - evictions,
            swap_seconds=swap_seconds,
            ttft_seconds=tuple(ttft),
            itl_seconds=tuple(itl),
            finished=tuple(finished),
            host_seconds=max(0.0, gap + end - start - gpu_seconds),
            gpu_seconds=gpu_seconds,
        )
        return outputs, stats

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        self._seqs.pop(seq.request_id, None)
        if not seq.is_finished:
            self.scheduler.finish(seq, "error")
        seq.finish_reason = "error"
        self.runner.sampler.forget(seq.request_id)
        return RequestOutput(seq.request_id, seq.adapter_id, "", (), (), True, "error", seq.num_prompt_tokens,
                             seq.num_output_tokens, f"{type(exc).__name__}: {exc}")

    def _postprocess(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        params = seq.params
        reason = None
        if (token in self.limits.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif seq.detokenizer is not None and seq.detokenizer.add_token(token):
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.limits.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.runner.sampler.forget(seq.request_id)
            del self._seqs[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            adapter_id=seq.adapter_id,
            text=seq.detokenizer.take_delta(final=reason is not None) if seq.detokenizer is not None else "",
            token_ids=(token,),
            logprobs=(logprob,) if logprob is not None else (),
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
        )
