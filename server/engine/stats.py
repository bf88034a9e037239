"""Plain per-step statistics the engine emits; the metrics module turns them into Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FinishedRequest:
    adapter_id: str | None
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    e2e_seconds: float

    @classmethod
    def of(cls, seq, now: float) -> "FinishedRequest":
        return cls(seq.adapter_id, seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens,
                   now - seq.arrival_time)


@dataclass(frozen=True)
class StepStats:
    batch_size: int
    """Sequences that computed tokens this step."""
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int
    num_waiting: int
    num_preempted: int
    kv_blocks_used: int
    kv_blocks_total: int
    gpu_slot_hits: int
    """GPU slot lookups this step that found the adapter resident."""
    gpu_slot_misses: int
    gpu_slot_evictions: int
    swap_seconds: tuple[float, ...]
    """Host-to-GPU adapter activations this step."""
    ttft_seconds: tuple[float, ...]
    """Time to first token of requests that got it this step."""
    itl_seconds: tuple[float, ...]
    """Gaps between consecutive tokens produced this step."""
    finished: tuple[FinishedRequest, ...]
    host_seconds: float = 0.0
    """The time the device sat idle for the host before this step: on CUDA between events at the end of the
    step launched before it (when work was already waiting) and at this step's start, else the host time
    from the step() call to the launch; on CPU the wall time of the step() call that returned this step
    and of the loop's gap before it."""
    gpu_seconds: float = 0.0
    """Device time of the step: its inputs, forward and sampling (CUDA events); 0 off CUDA."""
    launched_ahead: bool = False
    """Launched before the step before it had returned its tokens (async scheduling's lookahead)."""
    end_time: float = 0.0
    """time.monotonic() when the step's tokens reached the host (its outputs' time stamp)."""
    loop_seconds: float = 0.0
    """Wall time between the step() call that returned the step before and the one that returned this: the
    caller's own work in between (the engine core's messages, sends, adapter reads)."""
    call_seconds: float = 0.0
    """Wall time of the step() call that returned this step (scheduling, launching, waiting for its tokens)."""


@dataclass(frozen=True)
class EngineGauges:
    """The engine's and its caches' current occupancy, read at metrics scrape time. In-process it is read
    off the engine; the engine-core process sends it with every update it emits."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_gpu_adapters: int = 0
    """Adapters resident in GPU slots."""
    max_gpu_adapters: int = 0
    adapter_pages_used: int = 0
    adapter_pages_total: int = 0
    """Rank pages of the GPU adapter pool (adapters.rank_pages) held by resident adapters, and in all."""
    running_adapter_ids: tuple[str, ...] = ()
    """Distinct adapters of running requests, oldest first."""
    waiting_adapter_ids: tuple[str, ...] = ()
    num_host_adapters: int = 0
    host_hits: int = 0
    host_misses: int = 0
    host_evictions: int = 0
