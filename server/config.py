"""Frozen, validated configuration objects, built once at start-up and passed down.

This is the only module that reads environment variables (`PICA_*`); everything else
receives these objects through its constructor.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SVD_METHODS = ("gram", "svd")


def env_default(option: str) -> str | None:
    """The value of $PICA_<OPTION> (e.g. PICA_MAX_GPU_ADAPTERS for --max-gpu-adapters), if set."""
    return os.environ.get("PICA_" + option.upper().replace("-", "_")) or None


def is_loopback(host: str) -> bool:
    """True for a bind address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def default_cache_dir() -> Path:
    """Root for the demo model and the basis cache: $PICA_CACHE_DIR, else ~/.cache/pica-serve."""
    env = os.environ.get("PICA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pica-serve"


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how to build its frozen basis."""

    model: str | None = None
    """Local folder, .gguf file (or a folder holding one) or hub id; None serves the built-in demo model."""
    dtype: str = "auto"
    """auto = bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    """auto = cuda when available, else cpu."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Name suffixes of the nn.Linear modules that adapters may change; each suffix is one group."""
    rank_max: int = 256
    """Columns of U kept per layer (clipped to min(out, in)); adapters may use any r <= this."""
    svd_method: str = "gram"
    """How U is computed: 'gram' (eigendecomposition of the smaller Gram matrix) or 'svd' (full SVD)."""
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self):
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.svd_method not in SVD_METHODS:
            problems.append(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.rank_max < 1:
            problems.append(f"rank_max must be >= 1, got {self.rank_max}")
        if not self.target_modules:
            problems.append("target_modules must name at least one module suffix")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def basis_dir(self) -> Path:
        return self.cache_dir / "basis"


@dataclass(frozen=True)
class EngineConfig:
    """Batching, KV cache and adapter residency limits."""

    max_num_seqs: int = 64
    """Sequences in the running batch at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks + decodes)."""
    max_prefill_tokens_with_decodes: int | None = 192
    """Prompt tokens a step may carry beside running decodes; None (or max_num_batched_tokens) = the whole budget.
    Every running stream waits for such a step, so a limit bounds how long new prompts stall them (inter-token
    p99), at the cost of spreading prompts over more steps (TTFT, some throughput). On the H200 (8B shape, 64
    streams, 133-token prompts) the engine's inter-token p99 was 12.4-12.5 ms at 128 and 192 and 14.9 at 256
    against 36-41 ms with the whole budget (p50 6.3-6.9 ms); first-wave TTFT 0.16-0.26 s at 192 against 0.10 s;
    output tok/s 3% lower (bench/results/README.md). With the 5.3 ms decode step a limit of 64 brought the
    client-side p99 to 1.4x p50, by making most steps carry prompts: p50 8.4 against 5.5 ms, output tok/s 25%
    lower, first-wave TTFT 0.48 against 0.13 s; so the default stays."""
    max_model_len: int | None = None
    """Prompt + output limit; None = the model's max_position_embeddings, capped at 8192."""
    block_size: int = 16
    """Tokens per KV cache block."""
    gpu_memory_utilization: float = 0.90
    """Share of GPU memory the server may use in all (weights + activations + KV)."""
    num_kv_blocks: int | None = None
    """Override the KV capacity computed at start."""
    cpu_kv_cache_gib: float = 1.0
    """KV cache size on CPU, where free memory says little."""
    max_gpu_adapters: int = 16
    """GPU slots: adapters resident in the preallocated stacks at once."""
    max_host_adapters: int = 256
    """Adapters kept in host RAM (the LRU between the store and the GPU slots)."""
    max_rank: int | None = None
    """Largest adapter r served (the z columns every adapted GEMM computes); None = the basis rank_max."""
    adapter_pool_ranks: int | None = None
    """Rank columns the GPU adapter slots hold in all (adapters.rank_pages): an adapter of rank r takes ceil(r / 16)
    pages of 16 columns, so slot memory follows each adapter's own rank. None = max_gpu_adapters * max_rank (any
    slot can hold a max-rank adapter); e.g. --max-gpu-adapters 512 --adapter-pool-ranks 16384 holds 512 r=32
    adapters (or 64 r=256) in the memory that 64 padded r=256 slots take."""
    max_lora_rank: int = 0
    """Largest LoRA rank served: every GPU slot holds per-layer A and B stacks of this rank (memory
    num_slots * max_lora_rank * sum over target layers of (in + out)); 0 serves no LoRA (like vLLM
    without --enable-lora)."""
    max_psoft_rank: int = 0
    """Largest PSOFT rank served: every GPU slot holds an R x R core per target layer (num_slots * R^2 * number of
    target layers), and each target layer holds E = W0 P_R^T [out, R] once (R * sum over target layers of out);
    0 serves no PSOFT. Capped by the basis rank (--rank-max): PSOFT's frozen factors come from the basis."""
    max_queue: int = 1024
    """Waiting requests accepted before new ones are refused (HTTP 429)."""
    cuda_graphs: bool = True
    """On CUDA, capture decode steps as CUDA graphs (batch buckets up to max_num_seqs)."""
    async_scheduling: bool | None = None
    """Schedule and launch decode step N+1 while step N runs on the device, then read N's tokens (vLLM's
    --async-scheduling); steps where that lookahead cannot be exact run synchronously. Greedy and seeded tokens are
    the same either way where the batch numerics match (README, "Async scheduling"). None = on with CUDA, off on CPU (where a forward does not run asynchronously)."""

    def __post_init__(self):
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_gpu_adapters",
                         "max_host_adapters", "max_queue")
            if getattr(self, name) < 1
        ]
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_lora_rank", "max_psoft_rank"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_rank is not None and self.max_psoft_rank > self.max_rank:
            problems.append(f"max_psoft_rank {self.max_psoft_rank} exceeds max_rank {self.max_rank}: PSOFT reads the "
                            "basis columns the base GEMM serves, max_rank of them")
        if self.adapter_pool_ranks is not None and self.max_rank is not None and self.adapter_pool_ranks < self.max_rank:
            problems.append(f"adapter_pool_ranks {self.adapter_pool_ranks} is less than max_rank {self.max_rank}: no "
                            "adapter of that rank would ever fit")
        for name in ("max_model_len", "num_kv_blocks", "max_rank", "adapter_pool_ranks", "max_prefill_tokens_with_decodes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings. Keys default to $PICA_API_KEY / $PICA_ADMIN_KEY."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default_factory=lambda: os.environ.get("PICA_API_KEY") or None)
    """When set, every /v1 route needs `Authorization: Bearer <api_key>`."""
    admin_key: str | None = field(default_factory=lambda: os.environ.get("PICA_ADMIN_KEY") or None)
    """When set, adapter uploads and deletes need it (instead of the api key)."""
    adapter_dir: Path | None = None
    """The adapter store; None = <cache_dir>/adapters."""
    served_model_name: str | None = None
    """Name of the base model in the OpenAI API; None = the model path or the demo model's name."""
    max_upload_bytes: int = 512 * 2**20
    max_unpacked_bytes: int = 1024 * 2**20
    max_body_bytes: int = 16 * 2**20
    """Largest body of any other request (JSON); larger ones get 413 before they are read."""
    max_adapter_labels: int = 100
    """Adapters that get their own metrics label; the rest are counted as 'other'."""
    allow_insecure_no_auth: bool = False
    """Listen on a non-loopback address without an admin key (anyone who reaches the port may then
    upload and delete adapters). Without it such a configuration is refused."""
    adapters: tuple[tuple[str, Path], ...] = ()
    """(adapter_id, folder) pairs stored at start, as `--adapter ID=PATH` gives them."""
    step_trace: Path | None = None
    """Append one JSON line per engine step here (server.step_trace): what each step carried and how long it
    took, to find the steps behind a latency tail."""
    engine_process: bool = False
    """Run the engine core (schedule, model, sampling) in its own process, the HTTP front end here, so the
    event loop and the GIL of this one never sit inside a decode step. `pica-serve serve` does by default
    (`--engine-in-process` keeps it in this process, for debugging); built directly, as the Ray replica and
    the tests build the app, the engine runs in-process."""

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_upload_bytes < 1 or self.max_unpacked_bytes < 1 or self.max_body_bytes < 1:
            raise ValueError("upload and body limits must be positive")
        if not is_loopback(self.host) and self.admin_key is None and not self.allow_insecure_no_auth:
            raise ValueError(
                f"refusing to listen on {self.host} without an admin key: anyone who reaches the port could "
                "upload and delete adapters. Set --admin-key or $PICA_ADMIN_KEY (and --api-key for generation), "
                "or pass --allow-insecure-no-auth to run open anyway"
            )


@dataclass(frozen=True)
class AppConfig:
    """Everything `pica-serve serve` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @property
    def adapter_dir(self) -> Path:
        return self.server.adapter_dir or self.model.cache_dir / "adapters"
