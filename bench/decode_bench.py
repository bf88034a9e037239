"""Mixed-adapter decode benchmark, everything side by side in one run on one GPU.

    python bench/decode_bench.py --shape llama3-8b --out bench/results/decode-llama3-8b-h100.json

Builds a random-weight model of the named shape (saved once with save_pretrained and loaded back
through the server's loader, to time the model load), then measures: HF `generate` on the base
model; our engine with no adapter; our engine with 8 and 64 distinct PiCa adapters (r=32, r=256)
mixed in batches of 1, 16, 64, and with one adapter for the whole batch; PEFT with 8 mixed LoRA
adapters (r=16, `adapter_names`); the adapter-aware floor (base weights + KV + P_r of every layer +
each distinct adapter's M once per layer, over the measured copy bandwidth); TTFT; adapter activation host->GPU and
disk->GPU; basis compute vs cache load; peak GPU memory; kernel profiles of the batch-64 steps. With
--mixed-methods (or --mixed-methods-only), 16 LoRA r=16 + 16 PiCa r=32 + 16 PSOFT r=16 adapters mixed at
batch 64, and each method alone on the same engine (LoRA and PSOFT stacks held).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.format import Adapter, AdapterConfig, AdapterExpectation, load_adapter_dir, save_adapter_dir  # noqa: E402
from adapters.rank_pages import RANK_PAGE, pages_for_rank  # noqa: E402
from cache.basis_cache import BasisCache  # noqa: E402
from cache.host_cache import HostCache  # noqa: E402
from server.config import DEFAULT_TARGET_MODULES, EngineConfig, ModelConfig  # noqa: E402
from server.demo_model import build_byte_tokenizer  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.rms_norm import restore_rms_norms  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.model_loader import load_model  # noqa: E402

WHOLE_BATCH_PREFILL = dict(max_num_batched_tokens=4096, max_prefill_tokens_with_decodes=4096)
"""The engines' batching here, whatever the server's defaults: a batch's prompts are all computed before it decodes
(4096 tokens a step, whether or not others decode), so every row decodes the whole batch at once."""

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
}


class NullTokenizer:
    """Random token ids have no text: the benchmark skips detokenization."""

    eos_token_id = None

    def decode(self, ids, **kwargs):
        return ""


def has_model_dir(shape: str, path: Path) -> bool:
    """Whether `path` holds a model of this shape already (build_model_dir's weights depend on the shape only)."""
    config = path / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else None
    return saved is not None and all(saved.get(k, v) == v for k, v in SHAPES[shape].items())  # rope_theta moved


def build_model_dir(shape: str, path: Path, device: str = "cuda") -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    model.save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def drop_page_cache() -> bool:
    """Cold-start timings: empty the OS page cache (root on a machine of our own); False if not allowed."""
    try:
        import os

        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measured_bandwidth() -> float:
    import triton

    a = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median") * 1000
    return 2 * (1 << 31) / (us * 1e-6)


def load_bench_model(shape: str, workdir: Path, device: str = "cuda", rank: int = 32):
    """(loaded model, bf16 basis of rank `rank`) of a random model of this shape in workdir, built there first where
    it is missing; no tokenizer (NullTokenizer), as the engine-level benches feed token ids."""
    if not has_model_dir(shape, workdir / "model"):
        build_model_dir(shape, workdir / "model", device)
    cfg = ModelConfig(model=str(workdir / "model"), device=device, dtype="bfloat16", rank_max=rank,
                      cache_dir=workdir / "cache")
    loaded = dataclasses.replace(load_model(cfg), tokenizer=NullTokenizer())
    basis = BasisCache(cfg.basis_dir).load_or_compute(loaded.model, DEFAULT_TARGET_MODULES, rank, progress=False,
                                                      device=device, dtype=torch.bfloat16)
    return loaded, basis


def random_adapter(basis, rank: int, seed: int) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"M.{g}": (torch.randn(info.out_features, rank, generator=gen) * 0.01).to(torch.bfloat16)
               for g, info in basis.groups.items()}
    config = AdapterConfig("pica", rank, tuple(basis.groups), "bench", basis.checksum)
    return Adapter(config, tensors, f"bench-{rank}-{seed}")


def random_lora_handle(host, basis, rank: int, seed: int):
    """A LoRA adapter's slot tensors (A [r, in], B [out, r] per layer, scaling folded in), random."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for info in basis.groups.values():
        for layer, in_features in zip(info.layers, info.in_features):
            tensors[f"lora_A.{layer}"] = (torch.randn(rank, in_features, generator=gen) * 0.01).to(torch.bfloat16)
            tensors[f"lora_B.{layer}"] = (torch.randn(info.out_features, rank, generator=gen) * 0.01).to(torch.bfloat16)
    return host.handle_from_tensors(f"lora-{seed}", f"bench-lora-{seed}", tensors)


def psoft_shaped_handle(host, basis, rank: int, seed: int):
    """A PSOFT adapter's slot tensors, `core.<group>` = K' [num_layers, r, r] (R - I with R random orthogonal:
    what a PSOFT whose SVD agrees with the basis, Q = I, loads to), so the benchmark needs no SVD of every weight.
    Served cost is what the bench measures: it equals a real PSOFT's (E = W0 P^T and z = P x are the layers')."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for g, info in basis.groups.items():
        rot, _ = torch.linalg.qr(torch.randn(len(info.layers), rank, rank, generator=gen))
        tensors[f"core.{g}"] = (rot - torch.eye(rank)).to(torch.bfloat16)
    return host.handle_from_tensors(f"psoft-{seed}", f"bench-psoft-{seed}", tensors)


def mixed_methods_rows(loaded, basis, args, emit, batch=64) -> None:
    """16 LoRA r=16 + 16 PiCa r=32 + 16 PSOFT r=16 adapters round-robin in one batch (and each method alone
    at the same batch, for comparison)."""
    host = HostCache(lambda _id: None, 1024, torch.bfloat16, pin_memory=True)
    by_method = {
        "pica": [host.handle_for(f"p{i}", random_adapter(basis, 32, seed=5000 + i)) for i in range(16)],
        "lora": [random_lora_handle(host, basis, 16, seed=6000 + i) for i in range(16)],
        "psoft": [psoft_shaped_handle(host, basis, 16, seed=7000 + i) for i in range(16)],
    }
    mixed = [h for triple in zip(*by_method.values()) for h in triple]
    engine = Engine(loaded, basis, EngineConfig(max_num_seqs=batch, **WHOLE_BATCH_PREFILL,
                                                max_model_len=args.prompt_len + args.new_tokens + 64,
                                                max_gpu_adapters=48, max_rank=32, max_lora_rank=16, max_psoft_rank=16,
                                                gpu_memory_utilization=0.85, async_scheduling=args.async_scheduling))
    run_batch(engine, mixed[:6], 6, args.prompt_len, 4, seed=-2)  # warm-up
    emit({"system": "pica_engine_mixed_methods", "adapters": 48, "rank": "pica32+lora16+psoft16",
          **run_batch(engine, mixed, batch, args.prompt_len, args.new_tokens, seed=11)})
    for i, (method, handles) in enumerate(by_method.items()):
        emit({"system": f"pica_engine_{method}_only_lora_psoft_stacks_on", "adapters": 16,
              "rank": 32 if method == "pica" else 16,
              **run_batch(engine, handles, batch, args.prompt_len, args.new_tokens, seed=20 + i)})
    release(engine, loaded.model)
    del engine, host, by_method, mixed
    gc.collect()
    torch.cuda.empty_cache()


def mixed_ranks_rows(loaded, basis, args, emit, bandwidth, batch: int = 64) -> None:
    """--mixed-ranks 8,32,256: `batch` distinct PiCa adapters with those ranks in turn, one batch, on an engine whose
    GPU pool holds just their rank pages (memory in proportion to each rank); beside it the same engine on each rank
    alone (`batch` distinct of it, as many as the pool holds). Floors count each distinct adapter's M at its own rank
    and P at the widest (z comes out of every adapted GEMM at max_rank)."""
    ranks = [int(r) for r in args.mixed_ranks.split(",")]
    mixed = [ranks[i % len(ranks)] for i in range(batch)]
    paged_width = lambda r: pages_for_rank(r, RANK_PAGE) * RANK_PAGE  # noqa: E731 - the columns r's pages hold
    pool_ranks = sum(paged_width(r) for r in mixed)
    engine = Engine(loaded, basis, EngineConfig(max_num_seqs=batch, **WHOLE_BATCH_PREFILL,
                                                max_model_len=args.prompt_len + args.new_tokens + 64,
                                                max_gpu_adapters=batch, max_rank=max(ranks), adapter_pool_ranks=pool_ranks,
                                                gpu_memory_utilization=0.85, async_scheduling=args.async_scheduling))
    host = HostCache(lambda _id: None, 4 * batch, torch.bfloat16, pin_memory=True)
    handles = [host.handle_for(f"mr{i}", random_adapter(basis, r, seed=8000 + i)) for i, r in enumerate(mixed)]
    stacks = engine.runner.adapted.slot_stacks
    context = args.prompt_len + args.new_tokens // 2
    run_batch(engine, handles[:4], 4, args.prompt_len, 4, seed=-4)  # warm-up
    emit({"system": "pica_engine_mixed_ranks", "adapters": batch, "distinct_in_batch": batch, "rank": args.mixed_ranks,
          "pool_bytes": stacks.bytes_per_page * stacks.num_pages,
          "padded_pool_bytes": stacks.bytes_per_page * stacks.max_pages * batch,
          **run_batch(engine, handles, batch, args.prompt_len, args.new_tokens, seed=41),
          "floor_tok_s": floor_tokens_per_s(loaded.model, basis, batch, context, max(ranks), batch, bandwidth, mixed),
          "profile": profile_steps(engine, handles, batch, args.prompt_len)})
    for r in ranks:
        alone = [host.handle_for(f"mr{r}-{i}", random_adapter(basis, r, seed=8500 + r + i))
                 for i in range(min(batch, pool_ranks // paged_width(r)))]
        emit({"system": "pica_engine_one_rank_same_pool", "adapters": len(alone), "distinct_in_batch": len(alone),
              "rank": r, **run_batch(engine, alone, batch, args.prompt_len, args.new_tokens, seed=42 + r),
              "floor_tok_s": floor_tokens_per_s(loaded.model, basis, batch, context, max(ranks), len(alone), bandwidth,
                                                [r] * len(alone))})
    release(engine, loaded.model)
    del engine, host, handles
    gc.collect()
    torch.cuda.empty_cache()


def resident_rows(loaded, basis, args, emit, rank: int, batch: int) -> None:
    """--resident N: an engine with N GPU adapter slots, every one of them loaded, decoding a batch over `batch`
    distinct adapters spread across the slots; beside it the same engine with only those `batch` loaded, and the
    slot memory per adapter (what residency costs, and whether a step slows with it)."""
    n = args.resident
    engine = Engine(loaded, basis, EngineConfig(max_num_seqs=batch, **WHOLE_BATCH_PREFILL,
                                                max_model_len=args.prompt_len + args.new_tokens + 64,
                                                max_gpu_adapters=n, max_rank=rank, gpu_memory_utilization=0.85,
                                                async_scheduling=args.async_scheduling))
    host = HostCache(lambda _id: None, n, torch.bfloat16, pin_memory=True)
    handles = [host.handle_for(f"res{i}", random_adapter(basis, rank, seed=9000 + i)) for i in range(n)]
    spread = handles[:: max(1, n // batch)][:batch]
    stacks = engine.runner.adapted.slot_stacks
    slot_bytes = stacks.bytes_per_page * stacks.pages_for(handles[0].tensors)
    run_batch(engine, spread[:4], 4, args.prompt_len, 4, seed=-3)  # warm-up
    row = {"system": "pica_engine", "adapters": batch, "distinct_in_batch": batch, "rank": rank, "gpu_slots": n,
           "slot_bytes_per_adapter": slot_bytes}
    emit({**row, "resident": engine.slots.num_resident,
          **run_batch(engine, spread, batch, args.prompt_len, args.new_tokens, seed=31)})
    for start in range(0, n, batch):  # every slot loaded: short requests over the rest
        run_batch(engine, handles[start : start + batch], min(batch, n - start), 4, 2, seed=start)
    emit({**row, "resident": engine.slots.num_resident,
          **run_batch(engine, spread, batch, args.prompt_len, args.new_tokens, seed=32)})
    release(engine, loaded.model)
    del engine, host, handles, spread
    gc.collect()
    torch.cuda.empty_cache()


def release(engine, model) -> None:
    """Give the model back as loaded (the next engine wraps it again)."""
    engine.runner.adapted.detach()
    restore_rms_norms(model)
    model.set_attn_implementation("sdpa")


def floor_tokens_per_s(model, basis, batch, context, rank, num_distinct, bandwidth, distinct_ranks=None) -> float:
    """Tokens a second if a step read only: the base weights, the KV, P at `rank` (where any adapter runs) and the M's
    of num_distinct adapters once per layer, at `rank` or each at its own (distinct_ranks)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    weights += batch * cfg.hidden_size * 2  # the embedding rows read
    kv = batch * context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    p = sum(rank * p.shape[1] * 2 for p in basis.p.values()) if num_distinct else 0  # [W0; P] rows per layer
    m_rank = sum(distinct_ranks) if distinct_ranks is not None else num_distinct * rank
    m = m_rank * sum(info.out_features * 2 * len(info.layers) for info in basis.groups.values())
    return batch / ((weights + kv + p + m) / bandwidth)


def run_batch(engine, handles, batch, prompt_len, new_tokens, seed) -> dict:
    rng = random.Random(seed)
    vocab = engine.limits.vocab_size
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(batch):
        engine.add_request(f"s{seed}-{i}", [rng.randrange(2, vocab) for _ in range(prompt_len)], params,
                           handles[i % len(handles)] if handles else None)
    timer = DecodeTimer()
    while engine.has_work:
        step_start = time.perf_counter()
        _, stats = engine.step()
        timer.record(step_start, stats)
    end = time.perf_counter()
    return {"batch": batch, **timer.summary(end), "ttft_s": timer.decode_start - start,
            "total_s": end - start, "total_tok_s": batch * new_tokens / (end - start),
            "async_scheduling": engine.async_scheduling}


class DecodeTimer:
    """Decode tok/s from the first step with no prefill (every request has its first token) to the end, and
    per decode step the GPU's idle time before it (StepStats.host_seconds) and its GPU time, as medians."""

    def __init__(self):
        self.decode_start: float | None = None
        self.decode_tokens = 0
        self.host: list[float] = []
        self.gpu: list[float] = []

    def record(self, step_start: float, stats) -> None:
        if stats.batch_size and not stats.num_prefill_tokens:
            self.decode_start = self.decode_start or step_start
            self.decode_tokens += stats.num_decode_tokens
            self.host.append(stats.host_seconds)
            self.gpu.append(stats.gpu_seconds)

    def summary(self, end: float) -> dict:
        median_ms = lambda values: 1e3 * sorted(values)[len(values) // 2] if values else None  # noqa: E731
        return {"decode_tok_s": self.decode_tokens / (end - self.decode_start) if self.decode_start else None,
                "host_ms_per_decode_step": median_ms(self.host), "gpu_ms_per_decode_step": median_ms(self.gpu),
                "decode_steps": len(self.host)}


def hf_generate(model, batch, prompt_len, new_tokens, adapter_names=None) -> dict:
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt_len), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names

    def timed(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up
    t_prefill, t_full = timed(1), timed(new_tokens)
    return {"batch": batch, "decode_tok_s": batch * (new_tokens - 1) / (t_full - t_prefill), "ttft_s": t_prefill,
            "total_tok_s": batch * new_tokens / t_full}


def start_decoding(engine, handles, batch, prompt_len, max_tokens, seed) -> None:
    """Add `batch` random prompts (adapters round-robin over `handles`, none if empty) and step until every
    sequence has its first token, so that the next steps are decode steps of the whole batch."""
    rng, vocab = random.Random(seed), min(1000, engine.limits.vocab_size)
    for i in range(batch):
        engine.add_request(f"{seed}-{i}", [rng.randrange(2, vocab) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           handles[i % len(handles)] if handles else None)
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()


def profile_steps(engine, handles, batch, prompt_len, steps=8) -> dict:
    """Kernel time per decode step (top kernels), the step's graph replayed back to back (kernels plus the
    gaps between them, no host), and wall time per step (profiled, so inflated)."""
    from torch.profiler import ProfilerActivity, profile

    start_decoding(engine, handles, batch, prompt_len, steps + 4, seed=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
    wall = (time.perf_counter() - start) / steps
    graph_s = engine.runner.graphs.replay_seconds(batch)  # the last step again, back to back
    while engine.has_work:
        engine.step()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) or 1
    events.sort(key=lambda e: -e.device_time_total)
    return {"adapters": len(handles), "batch": batch, "wall_ms_per_step_profiled": wall * 1e3,
            "graph_replay_ms_per_step": graph_s * 1e3,
            "gpu_ms_per_step": total / steps / 1e3, "kernel_launches_per_step": sum(e.count for e in events) / steps,
            "top": [{"kernel": e.key[:120], "share": e.device_time_total / total, "us_per_step": e.device_time_total / steps,
                     "calls_per_step": e.count / steps} for e in events[:12]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--ranks", default="32,256")
    parser.add_argument("--num-adapters", default="8,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--mixed-methods", action="store_true",
                        help="add the row of 16 LoRA r=16 + 16 PiCa r=32 + 16 PSOFT r=16 adapters mixed at batch 64")
    parser.add_argument("--mixed-methods-only", action="store_true", help="only that row (after start-up)")
    parser.add_argument("--resident", type=int, default=0,
                        help="also an engine with this many GPU adapter slots, all loaded, decoding over a spread of them")
    parser.add_argument("--mixed-ranks", default="",
                        help="also a batch of distinct adapters of these ranks in turn (e.g. 8,32,256) on an engine whose "
                             "pool holds just their pages, and each rank alone there")
    parser.add_argument("--startup-only", action="store_true", help="model load and basis timings, then stop")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine's async scheduling (default: on, as on any CUDA server)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    counts = [int(n) for n in args.num_adapters.split(",")]
    basis_rank = max(ranks + [int(r) for r in args.mixed_ranks.split(",") if r])  # the basis serves every rank asked
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pica-bench-"))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "command": " ".join(sys.argv),
              "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("PICA_")}}
    rows = []

    rows_log = args.out.with_suffix(".rows.jsonl")
    rows_log.parent.mkdir(parents=True, exist_ok=True)

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with rows_log.open("a") as f:  # partial results survive a crash later in the run
            f.write(json.dumps(row) + "\n")

    bandwidth = measured_bandwidth()
    report["copy_bandwidth_TBps"] = bandwidth / 1e12
    start = time.perf_counter()
    if not has_model_dir(args.shape, workdir / "model"):  # the same seed builds the same weights: reuse a folder
        build_model_dir(args.shape, workdir / "model")
        report["model_build_and_save_s"] = time.perf_counter() - start
    cfg = ModelConfig(model=str(workdir / "model"), device="cuda", dtype="bfloat16", rank_max=basis_rank,
                      cache_dir=workdir / "cache")
    report["cold_model_load"] = drop_page_cache()
    loaded = load_model(cfg)
    loaded = dataclasses.replace(loaded, tokenizer=NullTokenizer())
    report["model_load_s"] = loaded.load_seconds
    model = loaded.model
    cache = BasisCache(cfg.basis_dir)
    report["basis_compute_s"] = cache.load_or_compute(model, DEFAULT_TARGET_MODULES, basis_rank, progress=False,
                                                      device="cuda").seconds  # dropped before the timed load
    torch.cuda.empty_cache()
    # what a server does at start: its model's dtype; the first time writes the bf16 serving copy
    report["basis_first_bf16_load_s"] = cache.load_or_compute(model, DEFAULT_TARGET_MODULES, basis_rank, progress=False,
                                                              device="cuda", dtype=torch.bfloat16).seconds
    torch.cuda.empty_cache()
    report["cold_basis_load"] = drop_page_cache()
    loaded_basis = cache.load_or_compute(model, DEFAULT_TARGET_MODULES, basis_rank, progress=False, device="cuda",
                                         dtype=torch.bfloat16)
    report["basis_cache_load_s"] = loaded_basis.seconds
    report["basis_load_over_model_load"] = loaded_basis.seconds / loaded.load_seconds
    basis = loaded_basis
    context = args.prompt_len + args.new_tokens // 2
    if args.startup_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return

    if args.mixed_methods_only:
        ranks = []
        args.skip_peft = True
        batches = []
    for batch in batches:  # HF generate on the plain base model first (our engine wraps the model)
        emit({"system": "hf_generate_base", "adapters": 0, "rank": 0, **hf_generate(model, batch, args.prompt_len, args.new_tokens),
              "floor_tok_s": floor_tokens_per_s(model, basis, batch, context, 0, 0, bandwidth)})

    for rank in ranks:
        torch.cuda.reset_peak_memory_stats()
        engine = Engine(loaded, basis, EngineConfig(max_num_seqs=max(batches), **WHOLE_BATCH_PREFILL,
                                                    max_model_len=args.prompt_len + args.new_tokens + 64,
                                                    max_gpu_adapters=max(counts), max_rank=rank,
                                                    gpu_memory_utilization=0.85,
                                                    async_scheduling=args.async_scheduling))
        host = HostCache(lambda _id: None, 1024, torch.bfloat16, pin_memory=True)
        handles = [host.handle_for(f"a{i}", random_adapter(basis, rank, seed=1000 * rank + i)) for i in range(max(counts))]
        run_batch(engine, handles[:2], 4, args.prompt_len, 4, seed=-1)  # warm-up, untimed: compiles, allocates
        # activation latency: host (pinned) -> GPU slot, and disk -> host -> GPU slot
        swaps = [engine.runner.load_adapter(0, handles[0].tensors, engine.slots.pages_of(0)) for _ in range(20)]
        adapter_dir = workdir / f"adapter-r{rank}"
        save_adapter_dir(adapter_dir, random_adapter(basis, rank, 7).config, random_adapter(basis, rank, 7).tensors)
        disk_start = time.perf_counter()
        from_disk = host.handle_for("disk", load_adapter_dir(adapter_dir, AdapterExpectation.from_basis(basis)))
        engine.runner.load_adapter(1, from_disk.tensors, engine.slots.pages_of(1))
        adapter_bytes = sum(c.numel() * c.element_size() for c in handles[0].tensors.values())
        report[f"swap_r{rank}"] = {"adapter_MB": adapter_bytes / 1e6, "host_to_gpu_ms": sorted(swaps)[10] * 1e3,
                                   "disk_to_gpu_ms": (time.perf_counter() - disk_start) * 1e3}
        if rank == ranks[0]:
            for batch in batches:
                emit({"system": "pica_engine", "adapters": 0, "rank": 0, **run_batch(engine, [], batch, args.prompt_len,
                      args.new_tokens, seed=batch), "floor_tok_s": floor_tokens_per_s(model, basis, batch, context, 0, 0, bandwidth)})
        for count in counts:
            for batch in batches:
                distinct = min(batch, count)
                emit({"system": "pica_engine", "adapters": count, "distinct_in_batch": distinct, "rank": rank,
                      **run_batch(engine, handles[:count], batch, args.prompt_len, args.new_tokens, seed=batch + count),
                      "floor_tok_s": floor_tokens_per_s(model, basis, batch, context, rank, distinct, bandwidth)})
        for batch in batches[-1:]:  # one adapter for the whole batch (what merging would speed up)
            emit({"system": "pica_engine", "adapters": 1, "distinct_in_batch": 1, "rank": rank,
                  **run_batch(engine, handles[:1], batch, args.prompt_len, args.new_tokens, seed=5),
                  "floor_tok_s": floor_tokens_per_s(model, basis, batch, context, rank, 1, bandwidth)})
        report[f"peak_gpu_memory_GiB_r{rank}"] = torch.cuda.max_memory_allocated() / 2**30
        if rank == ranks[0]:
            report.setdefault("profiles", []).append(profile_steps(engine, [], max(batches), args.prompt_len))
        for count in counts:
            report.setdefault("profiles", []).append(
                dict(rank=rank, **profile_steps(engine, handles[:count], max(batches), args.prompt_len)))
        release(engine, model)
        del engine, host, handles
        gc.collect()
        torch.cuda.empty_cache()

    if args.mixed_methods or args.mixed_methods_only:
        mixed_methods_rows(loaded, basis, args, emit)
    if args.mixed_ranks:
        mixed_ranks_rows(loaded, basis, args, emit, bandwidth, batch=max(batches or [64]))
    if args.resident:
        resident_rows(loaded, basis, args, emit, rank=min(ranks or [32]), batch=max(batches or [64]))

    if not args.skip_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, target_modules=list(DEFAULT_TARGET_MODULES), init_lora_weights=False)
        peft_model = get_peft_model(model, lora, adapter_name="a0")
        for i in range(1, 8):
            peft_model.add_adapter(f"a{i}", lora)
        peft_model.to(torch.bfloat16).eval()
        for batch in batches:
            emit({"system": "peft_mixed_lora_r16", "adapters": 8, "rank": 16,
                  **hf_generate(peft_model, batch, args.prompt_len, args.new_tokens, [f"a{i % 8}" for i in range(batch)])})

    report["rows"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['device']}  shape={args.shape}  prompt={args.prompt_len}  new={args.new_tokens}  "
          f"copy BW {report['copy_bandwidth_TBps']:.2f} TB/s")
    print(f"model load {report['model_load_s']:.1f}s  basis compute {report['basis_compute_s']:.1f}s  "
          f"basis cache load {report['basis_cache_load_s']:.2f}s")
    for p in report.get("profiles", []):
        print(f"profile: {p['adapters']} adapters r={p.get('rank', 0)} batch {p['batch']}: kernels "
              f"{p['gpu_ms_per_step']:.2f} ms, graph replayed back to back {p['graph_replay_ms_per_step']:.2f} ms per step")
    print(f"{'system':<22}{'adapters':>9}{'rank':>6}{'batch':>7}{'decode tok/s':>14}{'floor':>9}{'% floor':>9}{'TTFT s':>8}")
    for r in rows:
        floor = r.get("floor_tok_s")
        pct = f"{100 * r['decode_tok_s'] / floor:.0f}%" if floor else "-"
        print(f"{r['system']:<22}{r['adapters']:>9}{r['rank']:>6}{r['batch']:>7}{r['decode_tok_s']:>14.0f}"
              f"{(floor or 0):>9.0f}{pct:>9}{(r['ttft_s'] or 0):>8.3f}")


if __name__ == "__main__":
    main()
