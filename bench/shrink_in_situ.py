"""Shrink variants timed inside the engine's decode step.

    python bench/shrink_in_situ.py --out bench/results/shrink-in-situ-h100.json

kernels_bench.py times a layer alone, replayed back to back; in a real step each shrink runs between
other kernels, with ~500 MB of weights streamed between two uses of the same cores, and takes longer
(~8.5 us against 5-8 us for Llama-3-8B's r=32 shrinks), so launch choices are ranked here. This
script builds a random Llama-3-8B-shaped model in GPU memory (random orthonormal bases: timings do
not depend on them), runs the engine with 8 adapters r=32 mixed in a batch of 64, and for each
variant (the RMSNorm inside the q/k/v and gate/up shrink or not, silu·mul inside down_proj's or not)
re-captures the decode graphs and times the batch-64 step replayed back to back (GPU only) and
engine steps (with the host). The no-adapter step is timed the same way in each variant and, with
the host, once per round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server.engine.gated_mlp as gated_mlp  # noqa: E402
from adapters.targets import find_target_linears, group_targets  # noqa: E402
from bench.decode_bench import SHAPES, NullTokenizer, random_adapter, start_decoding  # noqa: E402
from cache.basis import random_basis  # noqa: E402
from cache.basis_cache import Basis  # noqa: E402
from cache.host_cache import HostCache  # noqa: E402
from server.config import DEFAULT_TARGET_MODULES, EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.rms_norm import FusedRMSNorm  # noqa: E402
from server.model_loader import LoadedModel  # noqa: E402

GATE_INSIDE_MAX_TOKENS = gated_mlp.GATE_INSIDE_MAX_TOKENS


VARIANTS = {  # name -> (RMSNorm inside the q/k/v and gate/up shrink, silu·mul inside down_proj's)
    "default": (True, True),
    "silu-mul separate": (True, False),
    "norm separate": (False, True),
}


def random_model(shape: str) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return LoadedModel(model, NullTokenizer(), shape, torch.device("cuda"), torch.bfloat16, 0.0)


def random_bases(model, rank: int) -> Basis:
    """A Basis of random orthonormal U for every target linear (the timings do not depend on U)."""
    linears = find_target_linears(model, DEFAULT_TARGET_MODULES)
    u = {name: random_basis(m.out_features, rank, seed=i) for i, (name, m) in enumerate(linears.items())}
    return Basis("bench", "random", rank, group_targets(linears, DEFAULT_TARGET_MODULES), u, "computed", 0.0)


def measure(engine, handles, batch, prompt_len, steps, seed) -> dict:
    """A fresh batch (same context lengths in every variant): prefill, then time the decode step."""
    start_decoding(engine, handles, batch, prompt_len, steps + 8, seed)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    graphs = engine.runner.graphs
    result = {"engine_step_ms": wall * 1e3, "graph_ms": graphs.replay_seconds(batch, bool(handles), 50) * 1e3,
              "graph_no_adapter_ms": graphs.replay_seconds(batch, False, 50) * 1e3}
    while engine.has_work:
        engine.step()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="every variant this many times, interleaved")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = random_model(args.shape)
    basis = random_bases(loaded.model, args.rank)
    engine = Engine(loaded, basis, EngineConfig(max_num_seqs=args.batch, max_num_batched_tokens=4096,
                                                max_model_len=args.prompt_len + args.steps + 64,
                                                max_gpu_adapters=args.num_adapters, max_rank=args.rank,
                                                gpu_memory_utilization=0.85))
    host = HostCache(lambda _id: None, 1024, torch.bfloat16, pin_memory=True)
    handles = [host.handle_for(f"a{i}", random_adapter(basis, args.rank, seed=i)) for i in range(args.num_adapters)]
    norms = [m for m in loaded.model.modules() if isinstance(m, FusedRMSNorm)]
    feeds = {id(m): m.feeds for m in norms}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
              "shape": args.shape, "rank": args.rank, "num_adapters": args.num_adapters, "batch": args.batch,
              "norms_feeding_a_shrink": sum(f is not None for f in feeds.values()),
              "gated_mlps": sum(isinstance(m, gated_mlp.GatedMLP) for m in loaded.model.modules()), "rows": []}
    for round_ in range(args.rounds):
        engine.runner.graphs.capture()
        row = {"variant": "no adapter", "round": round_, **measure(engine, [], args.batch, args.prompt_len, args.steps,
                                                                   seed=round_)}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        for name in args.variants.split(","):
            norm_inside, gate_inside = VARIANTS[name]
            gated_mlp.GATE_INSIDE_MAX_TOKENS = GATE_INSIDE_MAX_TOKENS if gate_inside else 0
            for m in norms:
                m.feeds = feeds[id(m)] if norm_inside else None
            engine.runner.graphs.capture()
            row = {"variant": name, "round": round_, **measure(engine, handles, args.batch, args.prompt_len,
                                                                args.steps, seed=round_)}
            row["graph_ratio"] = row["graph_no_adapter_ms"] / row["graph_ms"]
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
