"""Prefill on the GPU as a server sees it: the first wave after start, later waves, and prompts arriving while
32 streams decode, step by step.

    python bench/prefill_steps.py --shape llama3-8b --workdir /tmp/b8 --out $OUT/prefill-steps.json

The engine is built as `pica-serve serve` builds it (warm-up included; budget 4096, 64 sequences, 320-token
context, 64 r=32 slots), so its first wave is what the first clients after a (re)start wait for. Reports each
step (prompt and decode tokens; wall, GPU and CPU ms) of three waves of 64 fresh prompts, the first under
torch.profiler (its busiest ops in `.profile.txt` beside the JSON); then the steps of prompts arriving two a
step beside 32 decodes under each prompt budget (`--budgets`, values of `--max-prefill-tokens-with-decodes`):
what a stream's inter-token gap becomes when new requests join its batch. The first budget's arrivals are run
again under cProfile (`.cprofile.txt`: where a mixed step's host time goes), with cuDNN's SDPA allowed, and
with garbage collection off; and as the serving benchmark's steady state runs (63 streams, one fresh prompt
a step) under torch.profiler (`.mixed-profile.txt`: the kernels of steps with prompts beside decodes).
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import gc
import io
import json
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_bench import load_bench_model  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine import attention  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402


def step_row(engine: Engine) -> tuple[dict, list]:
    """One step's tokens and times; cpu_ms is this process's CPU time in it (near wall_ms: the host is the bound)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs, stats = engine.step()
    return {"prefill_tokens": stats.num_prefill_tokens, "decode_tokens": stats.num_decode_tokens,
            "wall_ms": round(1e3 * (time.perf_counter() - start), 3), "gpu_ms": round(1e3 * stats.gpu_seconds, 3),
            "cpu_ms": round(1e3 * (time.process_time() - cpu_start), 3),
            "host_ms": round(1e3 * stats.host_seconds, 3)}, outputs


def wave(engine: Engine, rng: random.Random, vocab: int, name: str, batch: int, prompt_len: int) -> dict:
    """`batch` fresh prompts at once, stepped until every one has its first token."""
    start = time.perf_counter()
    for i in range(batch):
        engine.add_request(f"{name}-{i}", [rng.randrange(2, vocab) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), None)
    first, steps = set(), []
    while len(first) < batch:
        row, outputs = step_row(engine)
        steps.append(row)
        first |= {out.request_id for out in outputs if out.token_ids}
    ttft = time.perf_counter() - start
    while engine.has_work:
        engine.step()
    return {"ttft_all_s": round(ttft, 4), "steps": steps}


def arrivals(engine: Engine, rng: random.Random, vocab: int, batch: int, prompt_len: int, per_step: int,
             num_steps: int, profiler=None) -> dict:
    """`batch` streams decoding, `per_step` new prompts added before each of num_steps steps; the steps' times
    (those steps alone run inside `profiler` where given)."""
    for i in range(batch):
        engine.add_request(f"stream-{i}", [rng.randrange(2, vocab) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=num_steps + 64, temperature=0, ignore_eos=True), None)
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    for _ in range(8):  # decode-only steps as a baseline
        engine.step()
    decode_only = [step_row(engine)[0] for _ in range(8)]
    mixed = []
    with profiler or contextlib.nullcontext():
        for n in range(num_steps):
            for j in range(per_step):
                engine.add_request(f"new-{n}-{j}", [rng.randrange(2, vocab) for _ in range(prompt_len)],
                                   SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), None)
            mixed.append(step_row(engine)[0])
    for rid in list(engine.request_ids):
        engine.abort_request(rid)
    while engine.has_work:
        engine.step()
    median = lambda rows: sorted(r["wall_ms"] for r in rows)[len(rows) // 2]  # noqa: E731
    return {"decode_only_wall_ms_median": median(decode_only),
            "with_prompts_wall_ms_median": median([r for r in mixed if r["prefill_tokens"]] or mixed),
            "with_prompts_wall_ms_max": max(r["wall_ms"] for r in mixed), "steps": mixed}


def busiest_ops(prof, cuda: bool) -> str:
    """A torch.profiler run's busiest ops by host time, then (CUDA) by device time."""
    table = prof.key_averages()
    return (table.table(sort_by="self_cpu_time_total", row_limit=25) + "\n\n"
            + table.table(sort_by="self_device_time_total", row_limit=25) * cuda)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--prompt-len", type=int, default=133, help="the serving benchmark's 35-word prompts")
    parser.add_argument("--budgets", default="192,4096", help="--max-prefill-tokens-with-decodes values to compare")
    parser.add_argument("--device", default="cuda", help="cpu: a check of the script itself (--shape small)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pica-prefill-"))
    loaded, basis = load_bench_model(args.shape, workdir, args.device)
    start = time.perf_counter()
    engine = Engine(loaded, basis, EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=320,
                                                max_gpu_adapters=64, max_rank=32, gpu_memory_utilization=0.85))
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "torch": torch.__version__, "shape": args.shape,
              "command": " ".join(sys.argv), "engine_start_s": round(time.perf_counter() - start, 2)}
    rng, vocab = random.Random(0), loaded.model.config.vocab_size
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        report["first_wave"] = wave(engine, rng, vocab, "first", 64, args.prompt_len)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".profile.txt").write_text(busiest_ops(prof, args.device == "cuda"))
    report["second_wave"] = wave(engine, rng, vocab, "second", 64, args.prompt_len)
    report["third_wave"] = wave(engine, rng, vocab, "third", 64, args.prompt_len)
    report["arrivals"] = {}
    for budget in (int(b) for b in args.budgets.split(",")):
        engine.scheduler.max_prefill_tokens_with_decodes = budget
        report["arrivals"][budget] = arrivals(engine, rng, vocab, 32, args.prompt_len, per_step=2, num_steps=16)
    budget = int(args.budgets.split(",")[0])
    engine.scheduler.max_prefill_tokens_with_decodes = budget
    # the serving benchmark's steady state: 63 streams decoding, a fresh prompt joining each step; kernels profiled
    prof = torch.profiler.profile(activities=activities)
    report["arrivals"][f"{budget}-63-streams-profiled"] = arrivals(engine, rng, vocab, 63, args.prompt_len,
                                                                   per_step=1, num_steps=8, profiler=prof)
    args.out.with_suffix(".mixed-profile.txt").write_text(busiest_ops(prof, args.device == "cuda"))
    with cProfile.Profile() as host_profile:  # where a mixed step's host time goes, by Python function
        report["arrivals"][f"{budget}-cprofile"] = arrivals(engine, rng, vocab, 32, args.prompt_len, per_step=2,
                                                            num_steps=8)
    stream = io.StringIO()
    pstats.Stats(host_profile, stream=stream).sort_stats("tottime").print_stats(30)
    pstats.Stats(host_profile, stream=stream).sort_stats("cumulative").print_stats(30)
    args.out.with_suffix(".cprofile.txt").write_text(stream.getvalue())
    if args.device == "cuda":  # the same arrivals with cuDNN's SDPA allowed again, for comparison
        default = attention.VARIED_SHAPE_BACKENDS
        attention.VARIED_SHAPE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *default]
        report["arrivals"][f"{budget}-cudnn"] = arrivals(engine, rng, vocab, 32, args.prompt_len, per_step=2,
                                                         num_steps=16)
        attention.VARIED_SHAPE_BACKENDS = default
    gc.collect()
    gc.disable()  # and with no garbage collection pauses
    report["arrivals"][f"{budget}-no-gc"] = arrivals(engine, rng, vocab, 32, args.prompt_len, per_step=2, num_steps=16)
    gc.enable()
    for key in ("first_wave", "second_wave", "third_wave"):
        print(key, report[key]["ttft_all_s"], [(r["prefill_tokens"], r["wall_ms"]) for r in report[key]["steps"]])
    for budget, r in report["arrivals"].items():
        print("budget", budget, {k: v for k, v in r.items() if k != "steps"})
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
