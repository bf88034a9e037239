"""Does the expand hide behind the base GEMM on a second stream? (issue 18: 8 adapters cost +22% a step)

    python bench/overlap_expand_bench.py --out bench/results/overlap-expand-h200.json

At decode sizes the expand (`y += M[slot] z`) is a chain of dependent loads with little of the GPU busy (gate/up
over 8 adapters: ~20 us a layer for ~15 MB of M in the step), while the base GEMM streams the weights at the copy
bandwidth. The engine runs them one after the other: `[W; P] @ x`, then the expand in place. Here, per Llama-3-8B
shape at 64 tokens, 32 layers a CUDA graph with a distinct weight per layer (so M leaves L2 between layers, as in
the model), replay time / 32 of:
- `base`: `W @ x` alone (no adapter; the floor of the others);
- `inline`: the engine's way, `[W; P] @ x` and the expand in place;
- `overlap`: `W @ x` on the main stream while a side stream computes `z = P @ x` and expands into a zeroed
  delta; the main stream then waits and adds the delta (`+add`), or not (`no_add`: what a consumer that
  reads the delta itself, e.g. SiLU*up, would pay).
Each variant's result is checked against `inline`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.expand_kernel import expand_grouped  # noqa: E402
from bench.kernels_bench import block_inputs  # noqa: E402
from bench.step_kernels_bench import LAYERS, replay_us  # noqa: E402

SHAPES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
          "down": (14336, (4096,))}


def overlap_row(name: str, num_adapters: int, rank: int = 32, tokens: int = 64) -> dict:
    in_features, outs = SHAPES[name]
    shared, _, x, _, index = block_inputs(tokens, in_features, outs, rank, num_adapters, max(16, num_adapters))
    num_out, bounds, paged = shared.num_out, shared.bounds, shared.paged
    weights = [shared.weight] + [torch.randn_like(shared.weight) * 0.02 for _ in range(LAYERS - 1)]
    bases = [w[:num_out] for w in weights]
    projections = [w[num_out:] for w in weights]
    outputs = [torch.empty(tokens, weights[0].shape[0], device="cuda", dtype=x.dtype) for _ in weights]
    deltas = [torch.empty_like(o) for o in outputs]
    side = torch.cuda.Stream()

    def base():
        return [F.linear(x, w) for w in bases]

    def inline():
        for w, out in zip(weights, outputs):
            torch.matmul(x, w.t(), out=out)
            expand_grouped(out, paged, 0, bounds, index)
        return [o[:, :num_out] for o in outputs]

    def overlap(add: bool):
        ys = []
        for w, p, delta in zip(bases, projections, deltas):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                delta[:, :num_out].zero_()
                delta[:, num_out:].copy_(F.linear(x, p))
                expand_grouped(delta, paged, 0, bounds, index)
            y = F.linear(x, w)
            torch.cuda.current_stream().wait_stream(side)
            if add:
                y += delta[:, :num_out]
            ys.append(y)
        return ys

    ref = torch.stack(inline()).float()
    got = torch.stack(overlap(True)).float()
    row = {"shape": name, "tokens": tokens, "rank": rank, "num_adapters": num_adapters,
           "kernel": "per token" if index.per_token else "tiles",
           "overlap_rel_err_vs_inline": float((got - ref).norm() / ref.norm())}
    for label, fn in (("base", base), ("inline", inline), ("overlap_add", lambda: overlap(True)),
                      ("overlap_no_add", lambda: overlap(False))):
        row[f"{label}_us"] = round(replay_us(fn) / LAYERS, 2)
    row["inline_over_base_us"] = round(row["inline_us"] - row["base_us"], 2)
    row["overlap_add_over_base_us"] = round(row["overlap_add_us"] - row["base_us"], 2)
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-adapters", default="8,64")
    args = parser.parse_args()
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(sys.argv), "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in (int(v) for v in args.num_adapters.split(",")):
        for name in SHAPES:
            result["rows"].append(overlap_row(name, n))
            result["seconds"] = time.perf_counter() - start
            args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
