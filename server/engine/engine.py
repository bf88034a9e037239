"""The engine: turns requests into tokens, one `step()` at a time (schedule -> run -> postprocess).

Requests for different adapters share every batch. This class is synchronous and single-threaded;
AsyncEngine drives it from a background thread of the HTTP server, EngineCore from its own process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cache.host_cache import AdapterHandle
from cache.slot_table import SlotTable
from server.config import EngineConfig
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.model_runner import DeviceTokens, ModelRunner
from server.engine.sampler import SampledTokens
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput
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


@dataclass
class _Launched:
    """A step queued on the device, until `Engine._finish` reads its tokens."""

    sched: SchedulerOutput
    sampling: list[Sequence]
    """The sequences this step samples for, in the order of its sampled tokens."""
    swap_seconds: tuple[float, ...]
    slot_hits: int
    slot_misses: int
    slot_evictions: int
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    sampled: SampledTokens | None = None
    rows: dict[int, int] = field(default_factory=dict)
    """id(sequence) -> its row in sampled.tokens."""
    start_event: object = None
    end_event: object = None
    prev_end_event: object = None
    """CUDA: the end of the step launched before this one, when the engine was busy in between."""
    host_seconds_before: float = 0.0
    """Wall time from the start of the launching step() call to this launch (host time of a step after idle)."""
    num_waiting: int = 0
    """Requests left waiting once this step was scheduled."""
    launched_ahead: bool = False
    end_time: float = 0.0
    """time.monotonic() when its tokens were read."""


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
        stacks = self.runner.adapted.slot_stacks
        self.slots = SlotTable(cfg.max_gpu_adapters, stacks.num_pages)
        self.blocks = BlockManager(self.runner.num_kv_blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg.max_num_seqs, cfg.max_num_batched_tokens, self.blocks, self.slots,
                                   cfg.max_prefill_tokens_with_decodes, lambda handle: stacks.pages_for(handle.tensors))
        self._seqs: dict[str, Sequence] = {}
        self._aborted: list[FinishedRequest] = []  # reported with the next step's stats
        self._last_step_end: float | None = None  # set while work was left at the end of the last step
        self._last_end_event = None  # CUDA: the end of the last launched step, while work went on
        self._inflight: _Launched | None = None  # async scheduling: a launched step whose tokens are not read yet
        self.async_scheduling = (cfg.async_scheduling if cfg.async_scheduling is not None
                                 else self.runner.device.type == "cuda")
        self.num_lookahead_steps = 0
        """Steps launched ahead of the previous step's tokens (the rest ran synchronously)."""

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

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
        `finish_reason` is what its stats say ('stop' when the front end found a stop string). A lookahead step
        in flight may still write the freed blocks and read the slot: safe, since whatever reuses them (a KV
        write, a slot load's copy) is queued after it on the one stream; its token for the request is dropped."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, finish_reason)
        self.runner.sampler.forget(request_id)
        self._aborted.append(FinishedRequest.of(seq, time.monotonic()))
        self._drop_dead_inflight()
        return True

    def _drop_dead_inflight(self) -> None:
        """Forget a lookahead step whose every row belongs to a finished request: nothing would read it. Its
        staging buffers and pinned copies are guarded by events, its KV writes precede any later step's."""
        if self._inflight is not None and all(seq.is_finished for seq in self._inflight.sampling):
            self._inflight = None
            if not self.has_work:
                self._last_end_event = self._last_step_end = None

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
            max_gpu_adapters=self.cfg.max_gpu_adapters, adapter_pages_total=self.slots.num_pages,
            adapter_pages_used=self.slots.num_pages - self.slots.num_free_pages, running_adapter_ids=tuple(running),
            waiting_adapter_ids=tuple(waiting), num_host_adapters=len(host_cache) if host_cache is not None else 0,
            host_hits=host.hits if host else 0, host_misses=host.misses if host else 0,
            host_evictions=host.evictions if host else 0,
        )

    @property
    def has_step_in_flight(self) -> bool:
        """A lookahead step is queued on the device; the next step() reads its tokens."""
        return self._inflight is not None

    def step(self, on_launched: Callable[[], None] | None = None) -> tuple[list[RequestOutput], StepStats]:
        """Postprocess one step's tokens and return its outputs.

        Synchronous: schedule, launch, read the tokens, postprocess. With async scheduling, the step after the
        one being postprocessed is scheduled and launched first when the lookahead is exact (decodes and
        admissions that do not depend on this step's tokens: Scheduler.schedule_lookahead), its decodes' input
        tokens read on the device from this step's samples; reading
        this step's tokens then waits for this step alone, and the host work overlaps the next forward.
        `on_launched` runs once the device has work queued and before the step waits for it (the engine core
        sends the previous step's outputs there)."""
        call_start = time.perf_counter()
        gap = call_start - self._last_step_end if self._last_step_end is not None else 0.0  # the loop's own time
        done, self._inflight = self._inflight, None
        if done is None:
            done = self._launch(self._schedule(), None, call_start)
        if self.async_scheduling and done.sampled is not None:
            hits = self.slots.stats.hits
            sched = self.scheduler.schedule_lookahead(lambda seq: id(seq) in done.rows, self._will_finish,
                                                      self._may_finish)
            if sched is not None:  # its admissions pin resident slots only
                self._inflight = self._launch((sched, (), (self.slots.stats.hits - hits, 0, 0)), done, call_start)
                self.num_lookahead_steps += 1
        if on_launched is not None and done.sampled is not None:
            on_launched()
        outputs, ttft, itl, finished = self._finish(done)
        self._drop_dead_inflight()
        end = time.perf_counter()
        self._last_step_end = end if self.has_work else None
        if not self.has_work:
            self._last_end_event = None
        if done.end_event is not None:  # CUDA: the device's own idle time before this step, between the events
            done.end_event.synchronize()
            gpu_seconds = done.start_event.elapsed_time(done.end_event) / 1000
            host_seconds = (done.prev_end_event.elapsed_time(done.start_event) / 1000 if done.prev_end_event
                            else done.host_seconds_before)
        else:
            gpu_seconds, host_seconds = 0.0, gap + end - call_start
        stats = StepStats(
            batch_size=len(done.sched.scheduled),
            num_prefill_tokens=done.num_prefill_tokens,
            num_decode_tokens=done.num_decode_tokens,
            num_running=self.num_running,
            num_waiting=done.num_waiting,
            num_preempted=done.sched.num_preempted,
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            gpu_slot_hits=done.slot_hits,
            gpu_slot_misses=done.slot_misses,
            gpu_slot_evictions=done.slot_evictions,
            swap_seconds=done.swap_seconds,
            ttft_seconds=tuple(ttft),
            itl_seconds=tuple(itl),
            finished=tuple(finished),
            host_seconds=max(0.0, host_seconds),
            gpu_seconds=gpu_seconds,
            launched_ahead=done.launched_ahead,
            end_time=done.end_time or time.monotonic(),
            loop_seconds=gap,
            call_seconds=end - call_start,
        )
        return outputs, stats

    def _schedule(self) -> tuple[SchedulerOutput, tuple[float, ...], tuple[int, int, int]]:
        """schedule() with its adapter slot loads done; only while no step is in flight (it may preempt)."""
        stats = self.slots.stats
        hits, misses, evictions = stats.hits, stats.misses, stats.evictions
        sched = self.scheduler.schedule()
        swap_seconds = tuple(self.runner.load_adapter(slot, handle.tensors, self.slots.pages_of(slot))
                              for slot, handle in sched.slot_loads)
        return sched, swap_seconds, (stats.hits - hits, stats.misses - misses, stats.evictions - evictions)

    def _launch(self, scheduled, after: "_Launched | None", call_start: float) -> "_Launched":
        """Queue a step's forward and sampling on the device (no host sync). `after`: the step in flight whose
        sampled tokens are the inputs of this lookahead step's decodes (the first of its sequences)."""
        sched, swap_seconds, (hits, misses, evictions) = scheduled
        done = _Launched(sched, [item.seq for item in sched.scheduled if item.samples], swap_seconds, hits, misses,
                         evictions, num_waiting=self.num_waiting, launched_ahead=after is not None)
        if not sched.scheduled:
            return done
        device_tokens = None
        if after is not None:
            device_tokens = DeviceTokens(after.sampled.tokens, [after.rows[id(item.seq)] for item in sched.scheduled
                                                                if id(item.seq) in after.rows])
        for i, item in enumerate(sched.scheduled):  # a decode computes the newest output token (Scheduler's
            # _decodes), not a one-token chunk of a preempted sequence's recompute
            if (device_tokens is not None and i < len(device_tokens.rows)) or (
                    item.num_tokens == 1 and item.samples and item.seq.num_output_tokens > 0):
                done.num_decode_tokens += 1
            else:
                done.num_prefill_tokens += item.num_tokens
        done.prev_end_event = self._last_end_event
        done.host_seconds_before = time.perf_counter() - call_start
        done.start_event = self.runner.timing_event()
        logits = self.runner.run(sched.scheduled, device_tokens)
        done.sampled = self.runner.sampler.sample(logits, done.sampling)
        done.end_event = self._last_end_event = self.runner.timing_event()
        for item in sched.scheduled:  # their K/V are written by this step (so the lookahead's positions follow)
            item.seq.num_computed_tokens += item.num_tokens
        done.rows = {id(seq): row for row, seq in enumerate(done.sampling)}
        return done

    def _at_length(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether the sequence is at its length limit (max_tokens, or the model's length) `ahead` tokens from now."""
        return (seq.num_output_tokens + ahead >= seq.params.max_tokens
                or len(seq.token_ids) + ahead >= self.limits.max_model_len)

    def _will_finish(self, seq: Sequence) -> bool:
        """Certain to finish with the token in flight (its length), whatever the token is."""
        return self._at_length(seq, ahead=1)

    def _may_finish(self, seq: Sequence) -> bool:
        """Could finish on the token in flight (EOS, a stop token id, a stop string checked here)."""
        params = seq.params
        return (self._will_finish(seq) or bool(params.stop_token_ids)
                or (not params.ignore_eos and bool(self.limits.eos_token_ids))
                or (seq.detokenizer is not None and bool(params.stop)))

    def _finish(self, done: "_Launched"):
        """Read a launched step's tokens (waits for that step only) and postprocess them."""
        outputs: list[RequestOutput] = []
        ttft, itl, finished = [], [], self._aborted
        self._aborted = []
        if done.sampled is None:
            return outputs, ttft, itl, finished
        tokens, logprobs = done.sampled.to_host()
        now = done.end_time = time.monotonic()
        for seq, token, logprob in zip(done.sampling, tokens, logprobs):
            if seq.is_finished:
                # finished at the step before (or aborted) while this lookahead step ran: the token is wasted
                # and never emitted; its KV blocks were freed then, which is safe because any step reusing them
                # is launched after this one, and one stream runs steps in launch order
                continue
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
        return outputs, ttft, itl, finished

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
        elif self._at_length(seq):
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
