"""Async scheduling on the GPU: the synchronous and the async engine on one batch of decodes, side by side.

    python bench/async_steps_check.py --shape llama3-8b --batch 64 --num-adapters 8 --out $OUT/async-steps.json
    python bench/async_steps_check.py --shape small --batch 64 --out $OUT/async-steps-small.json   # a minute

Reports, for each engine, decode tok/s and the median GPU idle time before a decode step (StepStats.host_seconds,
between CUDA events: the target is < 1 ms at batch 64 on the H200) beside the median GPU time of a step, and
how many steps the async engine launched ahead. Requests ignore EOS and all stop by length, so the async
engine runs the synchronous engine's steps exactly and their tokens must be bit for bit the same (bf16, CUDA
graphs on); a second workload whose requests end on random stop token ids, arriving in waves, reports the
same numbers with the lookahead's fallbacks (arrivals while any request may end) and wasted rows (its
tokens may differ where bf16 numerics move with what shares a batch). Exits 1 if the first workload's tokens differ.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_bench import (SHAPES, WHOLE_BATCH_PREFILL, DecodeTimer, load_bench_model,  # noqa: E402
                                random_adapter)
from cache.host_cache import HostCache  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.rms_norm import restore_rms_norms  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402


def workload(batch: int, prompt_len: int, new_tokens: int, vocab: int, early_stops: bool, seed: int):
    """(call index, request id, prompt, params): all at once; or in four waves, of various lengths, with stop
    token ids (any request may then end on any step, so a step after an arrival runs synchronously)."""
    rng = random.Random(seed)
    jobs = []
    for i in range(batch if not early_stops else 2 * batch):
        params = SamplingParams(max_tokens=rng.randint(new_tokens // 4, new_tokens) if early_stops else new_tokens,
                                temperature=0, ignore_eos=True,
                                stop_token_ids=tuple(rng.sample(range(2, vocab), 64)) if early_stops else ())
        jobs.append((0 if not early_stops else (i // (batch // 2)) * new_tokens // 3, f"w{seed}-{i}",
                     [rng.randrange(2, vocab) for _ in range(prompt_len)], params))
    return jobs


def run(engine: Engine, jobs, handles) -> dict:
    tokens: dict[str, list[int]] = {}
    timer = DecodeTimer()
    pending = sorted(jobs, key=lambda j: j[0])
    call, lookahead_before = 0, engine.num_lookahead_steps
    while pending or engine.has_work:
        while pending and pending[0][0] <= call:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params, handles[len(tokens) % len(handles)] if handles else None)
            tokens[rid] = []
        call += 1
        if not engine.has_work:
            continue
        step_start = time.perf_counter()
        outputs, stats = engine.step()
        for out in outputs:
            tokens[out.request_id] += out.token_ids
        timer.record(step_start, stats)
    return {**timer.summary(time.perf_counter()), "lookahead_steps": engine.num_lookahead_steps - lookahead_before,
            "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=8, help="distinct PiCa r=32 adapters mixed (0: base)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pica-async-"))
    loaded, basis = load_bench_model(args.shape, workdir)
    vocab = loaded.model.config.vocab_size
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
              "batch": args.batch, "num_adapters": args.num_adapters, "command": " ".join(sys.argv)}
    results = {}
    for async_scheduling in (False, True):
        engine = Engine(loaded, basis, EngineConfig(max_num_seqs=args.batch, **WHOLE_BATCH_PREFILL,
                                                    max_model_len=args.prompt_len + args.new_tokens + 64,
                                                    max_gpu_adapters=max(args.num_adapters, 1), max_rank=32,
                                                    gpu_memory_utilization=0.85, async_scheduling=async_scheduling))
        host = HostCache(lambda _id: None, 1024, torch.bfloat16, pin_memory=True)
        handles = [host.handle_for(f"a{i}", random_adapter(basis, 32, seed=i)) for i in range(args.num_adapters)]
        run(engine, workload(4, 8, 4, vocab, False, seed=-1), handles)  # warm-up: compiles, allocates
        name = "async" if async_scheduling else "sync"
        for early_stops in (False, True):
            jobs = workload(args.batch, args.prompt_len, args.new_tokens, vocab, early_stops, seed=int(early_stops))
            results[(name, early_stops)] = run(engine, jobs, handles)
        engine.runner.adapted.detach()
        restore_rms_norms(loaded.model)
        loaded.model.set_attn_implementation("sdpa")
        del engine, host, handles
        gc.collect()
        torch.cuda.empty_cache()
    identical = True
    for early_stops in (False, True):
        sync, fast = results[("sync", early_stops)], results[("async", early_stops)]
        differing = sorted(r for r in sync["tokens"] if sync["tokens"][r] != fast["tokens"][r])
        if not early_stops:
            identical = not differing
        key = "early_stops" if early_stops else "length_stops"
        report[key] = {"requests_differing": len(differing), "requests": len(sync["tokens"]),
                       **{f"{mode}_{k}": v for mode, r in (("sync", sync), ("async", fast)) for k, v in r.items()
                          if k != "tokens"}}
        print(json.dumps({key: report[key]}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("tokens identical on the length-stop workload" if identical else "TOKENS DIFFER on the length-stop workload")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
