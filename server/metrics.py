"""Every Prometheus metric of the server, under the `pica_` prefix, in one registry per app.

Beside them, a few gauges under vLLM's names (`vllm:*`), with vLLM's meaning: Kubernetes gateways that
pick a pod for each request (the Gateway API Inference Extension's endpoint picker, vLLM
production-stack's router) scrape those names.

The engine and caches only emit plain stats (StepStats, cache counters); this module turns them
into metrics. Adapter labels are bounded: the first `max_adapter_labels` adapter ids seen get their
own label, later ones count as "other", the base model is "base".
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cache.slot_table import CacheStats
from server.engine.stats import EngineGauges, StepStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04,
               0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Inter-token gaps sit near one decode step (milliseconds): buckets fine enough there for a p99 of 2x the p50
(bench/serve_bench.py reads the engine's percentiles from them)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_LORA_INFO_IDS = 16
"""Adapter ids per list in vllm:lora_requests_info, oldest first (the waiting ones load next), the rest
left out: ids are at most 128 characters with no comma, so a label stays near 2 KB at most."""


class _StateCollector:
    """Reads residency, host-cache counters and the engine's queue and KV occupancy at scrape time, so
    they are current even when no step ran since requests finished or were cancelled (the engine-core
    process sends fresh gauges after every message it handles, steps or not)."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics

    def collect(self):
        state = self.metrics.state
        if state is None:
            return
        gauges, gpu = state.gauges(), self.metrics.gpu_slot_totals
        for name, host_value, gpu_value, doc in (
            ("pica_adapter_cache_hits", gauges.host_hits, gpu.hits, "Adapter cache lookups that found the adapter in the tier"),
            ("pica_adapter_cache_misses", gauges.host_misses, gpu.misses, "Adapter cache lookups that had to load from the tier below"),
            ("pica_adapter_cache_evictions", gauges.host_evictions, gpu.evictions, "Adapters evicted from the tier"),
        ):
            family = CounterMetricFamily(name, doc, labels=["tier"])
            family.add_metric(["host"], host_value)
            family.add_metric(["gpu"], gpu_value)
            yield family
        adapters = GaugeMetricFamily("pica_adapters", "Adapters per residency tier", labels=["tier"])
        adapters.add_metric(["store"], len(state.store))
        adapters.add_metric(["host"], gauges.num_host_adapters)
        adapters.add_metric(["gpu"], gauges.num_gpu_adapters)
        yield adapters
        kv_usage = gauges.kv_blocks_used / max(1, gauges.kv_blocks_total)
        yield GaugeMetricFamily("pica_requests_running", "Requests in the running batch", value=gauges.num_running)
        yield GaugeMetricFamily("pica_requests_waiting", "Requests waiting for a batch slot, KV memory or an adapter slot",
                                value=gauges.num_waiting)
        yield GaugeMetricFamily("pica_kv_cache_usage_ratio", "Share of KV cache blocks in use", value=kv_usage)
        yield GaugeMetricFamily("pica_adapter_pool_usage_ratio",
                                "Share of the GPU adapter pool's rank pages held by resident adapters (--adapter-pool-ranks)",
                                value=gauges.adapter_pages_used / max(1, gauges.adapter_pages_total))
        yield GaugeMetricFamily("pica_store_damaged_adapters",
                                "Store entries that cannot be read back (logged, left out of listings)",
                                value=len(state.store.damaged))
        yield from vllm_families(state, kv_usage, gauges)


def vllm_families(state, kv_usage: float, gauges: EngineGauges | None = None):
    """vLLM's gauges that gateways route on, one series each, labelled like vLLM's (model_name). Without
    `gauges`, they are read off `state.engine`."""
    if gauges is None:
        engine = state.engine
        running, waiting = engine.adapter_ids_by_state()
        gauges = EngineGauges(num_running=engine.num_running, num_waiting=engine.num_waiting,
                              max_gpu_adapters=engine.cfg.max_gpu_adapters, running_adapter_ids=tuple(running),
                              waiting_adapter_ids=tuple(waiting))
    model = [state.model_name]
    for name, doc, value in (
        ("vllm:num_requests_running", "Requests in the running batch (pica_requests_running)", gauges.num_running),
        ("vllm:num_requests_waiting", "Requests waiting to be scheduled (pica_requests_waiting)", gauges.num_waiting),
        ("vllm:kv_cache_usage_perc", "KV cache usage, 1 means 100 percent (pica_kv_cache_usage_ratio)", kv_usage),
        # vLLM's older name for the same gauge; production-stack's router still reads it
        ("vllm:gpu_cache_usage_perc", "KV cache usage, 1 means 100 percent (pica_kv_cache_usage_ratio)", kv_usage),
    ):
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric(model, value)
        yield family
    # The value is the time of this scrape: a scraper that keeps several series of this family (vLLM leaves
    # one per label set it ever had) takes the largest value as the current one. Requests without an
    # adapter are in neither list, as in vLLM.
    running, waiting = gauges.running_adapter_ids, gauges.waiting_adapter_ids
    lora = GaugeMetricFamily("vllm:lora_requests_info", "Adapters of running and of waiting requests; value: unix time",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    lora.add_metric([str(gauges.max_gpu_adapters), ",".join(running[:MAX_LORA_INFO_IDS]),
                     ",".join(waiting[:MAX_LORA_INFO_IDS])], time.time())
    yield lora


class Metrics:
    def __init__(self, max_adapter_labels: int = 100):
        self.registry = CollectorRegistry()
        self.state = None  # set once the model is loaded
        self._max_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self.gpu_slot_totals = CacheStats()  # summed from the engine's per-step stats
        r = self.registry
        self.http_requests = Counter("pica_http_requests", "HTTP requests by route and status", ["endpoint", "status"], registry=r)
        self.adapter_requests = Counter(
            "pica_adapter_requests", "Finished generation requests by adapter and finish reason", ["adapter", "finish_reason"], registry=r
        )
        self.method_requests = Counter(
            "pica_method_requests", "Finished generation requests by adapter method ('base': none) and finish reason",
            ["method", "finish_reason"], registry=r)
        self.method_generation_tokens = Counter(
            "pica_method_generation_tokens", "Generated tokens of finished requests by adapter method", ["method"], registry=r)
        self._methods: dict[str, str] = {}  # adapter_id -> method, read once from the store
        self.ttft = Histogram("pica_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pica_inter_token_latency_seconds", "Time between tokens of a request", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pica_e2e_request_latency_seconds", "Request arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pica_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("pica_generation_tokens", "Generated tokens of finished requests", registry=r)
        self.batch_size = Histogram("pica_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.step_tokens = Counter("pica_step_tokens", "Tokens computed by engine steps", ["phase"], registry=r)
        self.preemptions = Counter("pica_preemptions", "Sequences preempted for KV memory", registry=r)
        # kind: 'decode' for steps of decodes only, 'mixed' for steps holding prefill; host / steps is the
        # host time per step that the serving benchmark reports
        self.engine_steps = Counter("pica_engine_steps", "Engine steps that computed tokens", ["kind"], registry=r)
        self.engine_host_seconds = Counter(
            "pica_engine_step_host_seconds", "Time the device sat idle for the host before each step (CUDA events; "
            "on CPU the step's wall time and the loop's gap before it)", ["kind"], registry=r)
        self.engine_gpu_seconds = Counter("pica_engine_step_gpu_seconds", "Device time of steps (inputs, forward, "
                                          "sampling; CUDA only)",
                                          ["kind"], registry=r)
        self.swap = Histogram(
            "pica_adapter_swap_seconds", "Adapter activation latency by path", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.basis_seconds = Gauge("pica_basis_seconds", "Basis load or compute time at start", ["source"], registry=r)
        self.model_load_seconds = Gauge("pica_model_load_seconds", "Base model load time at start", registry=r)
        self.ready = Gauge("pica_ready", "1 once the model and basis are loaded", registry=r)
        r.register(_StateCollector(self))
        for path in ("disk_to_host", "host_to_gpu"):  # known label values are exported from the start
            self.swap.labels(path)
        for phase in ("prefill", "decode"):
            self.step_tokens.labels(phase)
        for kind in ("decode", "mixed"):
            for counter in (self.engine_steps, self.engine_host_seconds, self.engine_gpu_seconds):
                counter.labels(kind)

    def adapter_label(self, adapter_id: str | None) -> str:
        if adapter_id is None:
            return "base"
        with self._lock:
            if adapter_id in self._labels:
                return adapter_id
            if len(self._labels) < self._max_labels:
                self._labels.add(adapter_id)
                return adapter_id
        return "other"

    def on_ready(self, state, model_load_seconds: float, basis) -> None:
        self.state = state
        self.model_load_seconds.set(model_load_seconds)
        self.basis_seconds.labels(basis.source).set(basis.seconds)
        self.ready.set(1)

    def observe_step(self, stats: StepStats) -> None:
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
            kind = "mixed" if stats.num_prefill_tokens else "decode"
            self.engine_steps.labels(kind).inc()
            self.engine_host_seconds.labels(kind).inc(stats.host_seconds)
            self.engine_gpu_seconds.labels(kind).inc(stats.gpu_seconds)
        self.step_tokens.labels("prefill").inc(stats.num_prefill_tokens)
        self.step_tokens.labels("decode").inc(stats.num_decode_tokens)
        self.preemptions.inc(stats.num_preempted)
        self.gpu_slot_totals.hits += stats.gpu_slot_hits
        self.gpu_slot_totals.misses += stats.gpu_slot_misses
        self.gpu_slot_totals.evictions += stats.gpu_slot_evictions
        for seconds in stats.swap_seconds:
            self.swap.labels("host_to_gpu").observe(seconds)
        for seconds in stats.ttft_seconds:
            self.ttft.observe(seconds)
        for seconds in stats.itl_seconds:
            self.itl.observe(seconds)
        for done in stats.finished:
            self.adapter_requests.labels(self.adapter_label(done.adapter_id), done.finish_reason).inc()
            method = self.method_of(done.adapter_id)
            self.method_requests.labels(method, done.finish_reason).inc()
            self.method_generation_tokens.labels(method).inc(done.num_output_tokens)
            self.prompt_tokens.inc(done.num_prompt_tokens)
            self.generation_tokens.inc(done.num_output_tokens)
            self.e2e.observe(done.e2e_seconds)

    def method_of(self, adapter_id: str | None) -> str:
        """The adapter's method for the method label (a few known names, so the label set stays small)."""
        if adapter_id is None:
            return "base"
        method = self._methods.get(adapter_id)
        if method is None:
            try:
                method = self.state.store.info(adapter_id).method
            except Exception:  # deleted meanwhile, damaged, or no state yet: still counted
                return "unknown"
            if len(self._methods) > 100_000:
                self._methods.clear()
            self._methods[adapter_id] = method
        return method

    def observe_disk_load(self, seconds: float) -> None:
        self.swap.labels("disk_to_host").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
