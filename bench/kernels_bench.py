"""Per-layer GPU micro-benchmarks: shrink variants, expand (separate vs fused), basis routes.

    python bench/kernels_bench.py --out bench/results/kernels-h100.json

Timings are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph), as the engine runs
decode steps, so Python launch costs stay out; the per-adapter loop (host syncs) uses do_bench.
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

from adapters.layer import SlotIndex, SlotStacks  # noqa: E402
from adapters.ops import shrink_reference, shrink_torch  # noqa: E402
from adapters.shrink_kernel import ShrinkConfig, default_config, grouped_shrink  # noqa: E402
from cache.basis import principal_basis  # noqa: E402


def bench(fn, warmup=25, rep=200, graph=True) -> float:
    """Median microseconds (of graph replays unless graph=False)."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1000
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1000


def shrink_variants(tokens, in_features, out_features, rank, num_adapters, num_slots, dtype=torch.bfloat16):
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(dev, dtype)
    u = torch.linalg.qr(torch.randn(out_features, rank, generator=gen))[0].to(dev, dtype)
    stacks = SlotStacks({"g": (rank, in_features)}, num_slots, dtype, dev)
    for slot in range(num_adapters):
        stacks.write(slot, {"g": (torch.randn(rank, in_features, generator=gen) * 0.02).to(dtype)})
    stack, ranks = stacks.stacks["g"], stacks.ranks["g"]
    slots = [i % num_adapters for i in range(tokens)]
    index = SlotIndex(max(tokens, 16), dev)
    index.set(slots)
    slot_tensor = torch.tensor(slots, device=dev)
    xs = [torch.randn(tokens, in_features, device=dev, dtype=dtype) for _ in range(8)]
    it = iter(range(10**9))

    def x():
        return xs[next(it) % len(xs)]

    ref = shrink_reference(xs[0].float(), stack.float(), slot_tensor)
    got = grouped_shrink(xs[0], stack, ranks, index).float()
    rel_err = float((got - ref).norm() / ref.norm())

    def loop_over_adapters():
        xx = x()
        z = torch.zeros(tokens, rank, device=dev, dtype=dtype)
        for a in range(num_adapters):
            rows = (slot_tensor == a).nonzero().squeeze(1)
            z[rows] = xx[rows] @ stack[a].T
        return z

    w_cat = torch.cat([w, u], dim=1)  # [out, in + r]: fused expand
    z0 = grouped_shrink(xs[0], stack, ranks, index)
    result = {
        "tokens": tokens, "in": in_features, "out": out_features, "rank": rank, "num_adapters": num_adapters,
        "grouped_kernel_rel_err_vs_fp32_reference": rel_err,
        "base_linear_us": bench(lambda: F.linear(x(), w)),
        "shrink_torch_gather_bmm_us": bench(lambda: torch.bmm(stack[slot_tensor], x()[:, :, None])),
        "shrink_torch_loop_over_adapters_us": bench(loop_over_adapters, warmup=5, rep=50, graph=False),
        "shrink_torch_all_slots_us": bench(lambda: shrink_torch(x(), stack, slot_tensor)),
        "shrink_grouped_kernel_us": bench(lambda: grouped_shrink(x(), stack, ranks, index)),
        "expand_addmm_after_base_us": bench(lambda: torch.addmm(F.linear(x(), w), z0, u.t())),
        "expand_fused_concat_us": bench(lambda: F.linear(torch.cat([x(), z0], dim=1), w_cat)),
    }
    b_bytes = num_adapters * rank * in_features * stack.element_size()
    result["grouped_kernel_GBps_on_B"] = b_bytes / (result["shrink_grouped_kernel_us"] * 1e-6) / 1e9
    return result


SWEEP = [ShrinkConfig(block_r=br, block_k=bk, num_warps=w, num_stages=st, split_k=sk)
         for br in (16, 32) for bk in (128, 256) for w, st in ((4, 3), (8, 4)) for sk in (1, 4, 8)]


def tune_shrink(tokens, in_features, rank, num_adapters, dtype=torch.bfloat16):
    """Time every sweep config on one shape; returns the default's and the best configs' times."""
    dev = "cuda"
    gen = torch.Generator().manual_seed(1)
    stacks = SlotStacks({"g": (rank, in_features)}, num_adapters, dtype, dev)
    for slot in range(num_adapters):
        stacks.write(slot, {"g": (torch.randn(rank, in_features, generator=gen) * 0.02).to(dtype)})
    index = SlotIndex(max(tokens, 16), dev)
    index.set([i % num_adapters for i in range(tokens)])
    x = torch.randn(tokens, in_features, device=dev, dtype=dtype)
    ref = grouped_shrink(x, stacks.stacks["g"], stacks.ranks["g"], index, ShrinkConfig()).float()
    times = {}
    for cfg in SWEEP:
        if cfg.block_r > rank:
            continue
        z = grouped_shrink(x, stacks.stacks["g"], stacks.ranks["g"], index, cfg).float()
        assert (z - ref).norm() / ref.norm() < 1e-2, cfg
        times[cfg] = bench(lambda: grouped_shrink(x, stacks.stacks["g"], stacks.ranks["g"], index, cfg), rep=60)
    best = sorted(times, key=times.get)[:3]
    default = default_config(tokens, rank, in_features)
    return {"tokens": tokens, "in": in_features, "rank": rank, "num_adapters": num_adapters,
            "default": vars(default) | {"us": times.get(default)},
            "best": [vars(c) | {"us": times[c]} for c in best]}


def basis_routes():
    rows = []
    for out_features, in_features in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
        for method in ("gram", "svd"):
            torch.cuda.synchronize()
            start = time.perf_counter()
            u = principal_basis(w, 256, method)
            torch.cuda.synchronize()
            rows.append({"shape": [out_features, in_features], "method": method, "seconds": time.perf_counter() - start,
                         "orthonormality_err": float((u.T @ u - torch.eye(256, device="cuda")).abs().max())})
    return rows


def device_ceilings():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_us = bench(lambda: b.copy_(a), graph=False)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = bench(lambda: x @ x, rep=100, graph=False)
    return {"copy_TBps_read_plus_write": 2 * n / (copy_us * 1e-6) / 1e12, "bf16_matmul_TFLOPs": 2 * 8192**3 / (mm_us * 1e-6) / 1e12}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-basis", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time shrink kernel configs")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "ceilings": device_ceilings()}
    report["shrink"] = [
        shrink_variants(64, 4096, 4096, 256, 16, 16),  # the anchor
        shrink_variants(64, 4096, 4096, 32, 8, 64),
        shrink_variants(64, 4096, 4096, 256, 64, 64),
        shrink_variants(64, 14336, 4096, 256, 64, 64),
        shrink_variants(2048, 4096, 4096, 256, 16, 16),  # a prefill chunk
    ]
    if args.sweep:
        report["sweep"] = [tune_shrink(t, k, r, a) for t, k, r, a in (
            (16, 4096, 32, 8), (64, 4096, 32, 8), (64, 4096, 32, 64), (64, 14336, 32, 64),
            (64, 4096, 256, 64), (64, 14336, 256, 64), (2048, 4096, 256, 16))]
        for row in report["sweep"]:
            print("sweep", {k: row[k] for k in ("tokens", "in", "rank", "num_adapters")}, "default", row["default"],
                  "best", row["best"][0])
    if not args.skip_basis:
        report["basis"] = basis_routes()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["ceilings"]))
    cols = ["tokens", "in", "rank", "num_adapters", "base_linear_us", "shrink_torch_gather_bmm_us",
            "shrink_torch_loop_over_adapters_us", "shrink_torch_all_slots_us", "shrink_grouped_kernel_us",
            "expand_addmm_after_base_us", "expand_fused_concat_us", "grouped_kernel_rel_err_vs_fp32_reference"]
    print(" | ".join(c.replace("shrink_", "").replace("_us", "") for c in cols))
    for row in report["shrink"]:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    for row in report.get("basis", []):
        print(row)


if __name__ == "__main__":
    main()
