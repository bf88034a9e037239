"""Per-layer GPU micro-benchmarks: adapted blocks (base vs adapter path), shrink configs, basis routes.

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

from adapters.layer import AdaptedLinear, SharedInput, SlotIndex, SlotStacks  # noqa: E402
from adapters.ops import concat_inputs, concat_inputs_reference, empty_padded_rows, shrink_torch  # noqa: E402
from adapters.shrink_kernel import ShrinkConfig, counters_size, default_config, shrink_concat  # noqa: E402
from cache.basis import principal_basis  # noqa: E402


def bench(fn, warmup=25, rep=200, graph=True) -> float:
    """Median microseconds (of graph replays unless graph=False)."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1000
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1000


def adapted_block(tokens, in_features, outs, rank, num_adapters, num_slots, dtype=torch.bfloat16):
    """The adapted layers that read one input (e.g. q/k/v: outs=(4096, 1024, 1024)), as the engine builds
    them: base path vs adapter path (one shrink launch + one [W0|U] GEMM per layer)."""
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    groups = tuple(f"g{m}" for m in range(len(outs)))
    stacks = SlotStacks({g: (rank, in_features) for g in groups}, num_slots, dtype, dev)
    stack, ranks = stacks.fuse(groups) if len(groups) > 1 else (stacks.stacks["g0"], stacks.ranks["g0"][None])
    for slot in range(num_adapters):
        stacks.write(slot, {g: (torch.randn(rank, in_features, generator=gen) * 0.02).to(dtype) for g in groups})
    index = SlotIndex(max(tokens, 16), dev)
    shared = SharedInput(stack, ranks, index)
    layers = []
    for m, out_features in enumerate(outs):
        base = torch.nn.Linear(in_features, out_features, bias=False, device=dev, dtype=dtype)
        u = torch.linalg.qr(torch.randn(out_features, rank, generator=gen))[0].to(dev, dtype)
        layer = AdaptedLinear(base, u, index)
        layer.shared_input, layer.member = shared, m
        layers.append(layer)
    contiguous = [layer.base.weight.contiguous() for layer in layers]
    slots = [i % num_adapters for i in range(tokens)]
    x = torch.randn(tokens, in_features, device=dev, dtype=dtype)

    def run_layers():
        return [layer(x) for layer in layers]

    index.set(slots)
    got = concat_inputs(x, stack, ranks, index, shared.counters).float()
    ref = concat_inputs_reference(x.float(), stack.float(), len(outs), torch.tensor(slots, device=dev))
    result = {"tokens": tokens, "in": in_features, "outs": list(outs), "rank": rank, "num_adapters": num_adapters,
              "shrink_rel_err_vs_fp32_reference": float((got - ref).norm() / ref.norm()),
              "base_contiguous_us": bench(lambda: [F.linear(x, w) for w in contiguous]),
              "shrink_concat_us": bench(lambda: concat_inputs(x, stack, ranks, index, shared.counters)),
              "adapter_path_us": bench(run_layers)}
    if len(outs) > 1:  # q/k/v and gate/up read an RMSNorm's output: the norm as its own launch, or in the shrink's
        from server.engine.rms_norm import rms_norm

        w, eps = torch.randn(in_features, generator=gen).to(dev, dtype), 1e-5
        result["norm_then_shrink_us"] = bench(lambda: concat_inputs(rms_norm(x, w, eps), stack, ranks, index,
                                                                    shared.counters))
        result["norm_in_shrink_us"] = bench(lambda: concat_inputs(x, stack, ranks, index, shared.counters, (w, eps)))
    index.set([-1] * tokens)
    result["base_path_us"] = bench(run_layers)  # the base linears reading their W0 views of [W0 | U]
    result["adapter_overhead_us"] = result["adapter_path_us"] - result["base_path_us"]
    b_bytes = min(num_adapters, tokens) * len(outs) * rank * in_features * 2
    result["shrink_GBps_on_cores"] = b_bytes / (result["shrink_concat_us"] * 1e-6) / 1e9
    return result


def torch_shrinks(tokens, in_features, rank, num_adapters, dtype=torch.bfloat16):
    """The issue's anchor: the shrink done with plain torch ops, for comparison with shrink_concat_us."""
    dev = "cuda"
    stack = torch.randn(num_adapters, rank, in_features, device=dev, dtype=dtype) * 0.02
    slot_tensor = torch.tensor([i % num_adapters for i in range(tokens)], device=dev)
    x = torch.randn(tokens, in_features, device=dev, dtype=dtype)

    def loop_over_adapters():
        z = torch.zeros(tokens, rank, device=dev, dtype=dtype)
        for a in range(num_adapters):
            rows = (slot_tensor == a).nonzero().squeeze(1)
            z[rows] = x[rows] @ stack[a].T
        return z

    return {"tokens": tokens, "in": in_features, "rank": rank, "num_adapters": num_adapters,
            "gather_bmm_us": bench(lambda: torch.bmm(stack[slot_tensor], x[:, :, None])),
            "loop_over_adapters_us": bench(loop_over_adapters, warmup=5, rep=50, graph=False),
            "all_slots_us": bench(lambda: shrink_torch(x, stack, slot_tensor))}


SMALL_RANK_SWEEP = [ShrinkConfig(block_r=br, block_k=bk, split_k=sk, tile_programs=tp)  # decode, rank <= 64
                    for br in (16, 32) for bk in (128, 256) for sk in (8, 16) for tp in (0, 8, 16)]
LARGE_RANK_SWEEP = [ShrinkConfig(block_r=br, block_k=bk, num_warps=w, num_stages=st, tile_major=major)
                    for br, bk in ((16, 256), (32, 128), (32, 256), (64, 128)) for w, st in ((4, 3), (8, 4))
                    for major in (True, False)]  # no 64x256 blocks: wrong results on Triton 3.6 (H100)


def tune_shrink(tokens, in_features, num_members, rank, num_adapters, sweep, dtype=torch.bfloat16):
    """Time every sweep config on one shape; returns the default's and the best configs' times."""
    dev = "cuda"
    gen = torch.Generator().manual_seed(1)
    stack = (torch.randn(num_adapters, num_members * rank, in_features, generator=gen) * 0.02).to(dev, dtype)
    ranks = torch.full((num_members, num_adapters), rank, dtype=torch.int32, device=dev)
    index = SlotIndex(max(tokens, 16), dev)
    index.set([i % num_adapters for i in range(tokens)])
    x = torch.randn(tokens, in_features, device=dev, dtype=dtype)
    out = torch.empty(num_members, tokens, in_features + rank, device=dev, dtype=dtype)
    counters = torch.zeros(counters_size(tokens, num_members, rank), dtype=torch.int32, device=dev)
    ref = shrink_concat(x, stack, ranks, index, out.clone(), counters, ShrinkConfig()).float()
    times, wrong = {}, []
    default = default_config(tokens, rank, in_features, num_members)
    for cfg in [default, *sweep]:
        if cfg in times or cfg.block_r > rank or cfg.block_k > in_features:
            continue
        got = shrink_concat(x, stack, ranks, index, out, counters, cfg).float()
        if not (got - ref).norm() / ref.norm() < 1e-2:  # kept out of the defaults; reported
            wrong.append(vars(cfg))
            continue
        times[cfg] = bench(lambda: shrink_concat(x, stack, ranks, index, out, counters, cfg), rep=60)
    best = sorted(times, key=times.get)[:3]
    return {"tokens": tokens, "in": in_features, "members": num_members, "rank": rank, "num_adapters": num_adapters,
            "default": vars(default) | {"us": times.get(default)},
            "best": [vars(c) | {"us": times[c]} for c in best], "wrong_results": wrong}


def gemm_k_padding(tokens=64):
    """The [W0 | U] GEMM's cost against the base GEMM, for each width R of the appended U (r_max) and
    for inputs whose rows are packed (in + R) or padded to 64 elements: does an odd K slow cuBLAS?"""
    rows = []
    for out_features, in_features in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        for rank in (0, 16, 32, 48, 64, 128, 256):
            width = in_features + rank
            weight = empty_padded_rows(out_features, width, dtype=torch.bfloat16, device="cuda").normal_()
            packed = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
            padded = empty_padded_rows(tokens, width, dtype=torch.bfloat16, device="cuda").normal_()
            rows.append({"out": out_features, "in": in_features, "rank": rank,
                         "packed_input_us": bench(lambda: F.linear(packed, weight)),
                         "padded_input_us": bench(lambda: F.linear(padded, weight))})
    return rows


def empty_launch_us():
    """One CUDA-graph replay of a one-program kernel: the floor under every launch in a decode step."""
    x = torch.zeros(1, device="cuda")
    return bench(lambda: x.add_(1))


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
              "ceilings": device_ceilings() | {"empty_launch_us": empty_launch_us()}}
    report["gemm_k_padding"] = gemm_k_padding()
    for row in report["gemm_k_padding"]:
        print("gemm", row)
    qkv, gate_up = (4096, 1024, 1024), (14336, 14336)  # Llama-3-8B
    report["blocks"] = [adapted_block(64, 4096, (4096,), 256, 16, 16)]  # the anchor layer
    for rank, adapters in ((32, 8), (256, 64)):
        for in_features, outs in ((4096, qkv), (4096, (4096,)), (4096, gate_up), (14336, (4096,))):
            report["blocks"].append(adapted_block(64, in_features, outs, rank, adapters, 64))
    report["blocks"].append(adapted_block(2048, 4096, qkv, 256, 16, 16))  # a prefill chunk
    report["torch_shrinks"] = [torch_shrinks(64, 4096, 256, 16), torch_shrinks(64, 4096, 256, 64)]
    if args.sweep:
        report["sweep"] = [
            tune_shrink(t, k, m, r, a, SMALL_RANK_SWEEP if r <= 64 else LARGE_RANK_SWEEP) for t, k, m, r, a in (
                (64, 4096, 3, 32, 8), (64, 4096, 1, 32, 8), (64, 14336, 1, 32, 8), (64, 4096, 2, 32, 8),
                (64, 4096, 3, 256, 64), (64, 4096, 1, 256, 64), (64, 14336, 1, 256, 64), (64, 4096, 2, 256, 64),
                (2048, 4096, 3, 256, 16))]
        for row in report["sweep"]:
            print("sweep", {k: row[k] for k in ("tokens", "in", "members", "rank", "num_adapters")},
                  "default", row["default"], "best", row["best"][0])
    if not args.skip_basis:
        report["basis"] = basis_routes()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["ceilings"]))
    cols = ["tokens", "in", "outs", "rank", "num_adapters", "base_contiguous_us", "base_path_us", "shrink_concat_us",
            "adapter_path_us", "adapter_overhead_us", "shrink_GBps_on_cores", "shrink_rel_err_vs_fp32_reference"]
    print(" | ".join(c.replace("_us", "") for c in cols))
    for row in report["blocks"]:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols),
              {k: round(row[k], 2) for k in ("norm_then_shrink_us", "norm_in_shrink_us") if k in row})
    for row in report["torch_shrinks"]:
        print(row)
    for row in report.get("basis", []):
        print(row)


if __name__ == "__main__":
    main()
