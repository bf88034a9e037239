"""Per-layer GPU micro-benchmarks: adapted blocks (base vs adapter path), expand configs, LoRA's per-layer
factors (the gathered torch path vs the Triton kernels), basis routes.

    python bench/kernels_bench.py --out bench/results/kernels-h200.json [--tune adapters/expand_configs.json]
    python bench/kernels_bench.py --out bench/results/kernels-lora-h200.json --lora-only --skip-basis

Timings are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph), as the engine runs
decode steps, so Python launch costs stay out.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters import expand_kernel  # noqa: E402
from adapters.expand_kernel import ExpandConfig, config_key, expand_grouped  # noqa: E402
from adapters.layer import SharedGemm, SlotIndex, SlotStacks  # noqa: E402
from adapters.lora_kernel import lora_grouped  # noqa: E402
from adapters.ops import expand_reference, lora_gathered, lora_torch  # noqa: E402
from cache.basis import principal_basis  # noqa: E402


def bench(fn, rep=200, graph=True) -> float:
    """Median microseconds (of graph replays unless graph=False)."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1000
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1000


def block_inputs(tokens, in_features, outs, rank, num_adapters, num_slots, dtype=torch.bfloat16, adapter_ranks=None):
    """One input's adapted layers as the engine builds them (e.g. q/k/v: outs=(4096, 1024, 1024)), with
    num_adapters distinct adapters spread round-robin over the tokens; each of rank `rank`, or adapter_ranks
    in turn (on a server of rank `rank`)."""
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    groups = tuple(f"g{m}" for m in range(len(outs)))
    stacks = SlotStacks({g: (o, rank, 1) for g, o in zip(groups, outs)}, num_slots, dtype, dev)
    served = stacks.served(groups)
    for slot in range(num_adapters):
        r = rank if adapter_ranks is None else adapter_ranks[slot % len(adapter_ranks)]
        stacks.write(slot, {g: (torch.randn(o, r, generator=gen) * 0.02).to(dtype) for g, o in zip(groups, outs)})
    index = SlotIndex(max(tokens, 16), dev, stacks.slot_ranks)
    slots = [i % num_adapters for i in range(tokens)]
    index.set(slots)
    linears = [torch.nn.Linear(in_features, o, bias=False, device=dev, dtype=dtype) for o in outs]
    contiguous = [lin.weight.detach().clone() for lin in linears]
    bases = [torch.linalg.qr(torch.randn(in_features, rank, generator=gen))[0].T.to(dev, dtype) for _ in outs]
    shared = SharedGemm(linears, bases, served, 0, index)
    x = torch.randn(tokens, in_features, device=dev, dtype=dtype)
    return shared, contiguous, x, slots, index


def adapted_block(tokens, in_features, outs, rank, num_adapters, num_slots):
    """Base path (the model's own GEMMs, and the shared one) vs the adapter path ([W; P] GEMM + expand)."""
    shared, contiguous, x, slots, index = block_inputs(tokens, in_features, outs, rank, num_adapters, num_slots)
    bounds = shared.bounds
    y0z = F.linear(x, shared.weight)
    ref = expand_reference(y0z.float(), shared.paged, 0, bounds, torch.tensor(slots, device="cuda"))
    got = expand_grouped(y0z.clone(), shared.paged, 0, bounds, index).float()
    rel_err = float((got - ref).norm() / ref.norm())
    distinct = min(num_adapters, tokens)
    m_bytes = distinct * sum(outs) * rank * 2
    row = {"tokens": tokens, "in": in_features, "outs": list(outs), "rank": rank, "num_adapters": num_adapters,
           "base_separate_us": bench(lambda: [F.linear(x, w) for w in contiguous]),
           "base_shared_us": bench(lambda: F.linear(x, shared.weight[: shared.num_out])),
           "gemm_with_p_us": bench(lambda: F.linear(x, shared.weight)),
           "expand_us": bench(lambda: expand_grouped(y0z, shared.paged, 0, bounds, index)),
           "rel_err_vs_fp32_reference": rel_err}
    index.set(slots)
    row["adapter_path_us"] = bench(lambda: shared.output_for(0, x) if len(outs) == 1 else
                                   [shared.output_for(m, x) for m in range(len(outs))])
    row["adapter_overhead_us"] = row["adapter_path_us"] - row["base_separate_us"]
    row["expand_GBps_on_M"] = m_bytes / (row["expand_us"] * 1e-6) / 1e9
    print("block", json.dumps(row), flush=True)
    return row


def rank_split_rows(tokens=64) -> list[dict]:
    """The per-token expand over `tokens` distinct adapters: on a server of rank 256, ranks 8, 32 and 256 in turn and
    all 256, each with the rank split (the rule) and as one launch; beside them all r=32 on a server of rank 32."""
    rows = []
    shapes = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
              "down": (14336, (4096,))}
    for (name, (in_features, outs)), (server_rank, ranks) in itertools.product(
            shapes.items(), ((256, (8, 32, 256)), (256, (256,)), (32, (32,)))):
        shared, _, x, slots, index = block_inputs(tokens, in_features, outs, server_rank, tokens, tokens,
                                                  adapter_ranks=ranks)
        assert index.per_token
        y0z = F.linear(x, shared.weight)
        ref = expand_reference(y0z.float(), shared.paged, 0, shared.bounds, torch.tensor(slots, device="cuda"))
        m_bytes = sum(ranks[s % len(ranks)] for s in range(tokens)) * sum(outs) * 2
        row = {"shape": name, "server_rank": server_rank, "adapter_ranks": list(ranks), "tokens": tokens}
        for label, split in (("split", None), ("one_launch", 0)):
            got = expand_grouped(y0z.clone(), shared.paged, 0, shared.bounds, index, split=split).float()
            work = y0z.clone()  # the timing loop adds into its input again and again: never the one checked next
            us = bench(lambda: expand_grouped(work, shared.paged, 0, shared.bounds, index, split=split))
            row[f"{label}_us"] = us
            row[f"{label}_GBps_on_M"] = m_bytes / us / 1e3
            row[f"{label}_rel_err"] = float((got - ref).norm() / ref.norm())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def candidate_configs(rank: int) -> list[ExpandConfig]:
    """The configs --tune times: both kernels (a program per tile of one slot's tokens, tensor-core dots; a
    program per token, CUDA-core dots), over column blocks, K blocks up to the whole rank (a program then
    reads its rows of M as one contiguous piece) and warps."""
    product = itertools.product
    if rank <= 32:
        tiles = [ExpandConfig(bn, 32, w, 2) for bn, w in product((64, 128, 256), (2, 4, 8))] + [ExpandConfig(128, 32)]
        tokens = [ExpandConfig(bn, 32, w, 2, per_token=True) for bn, w in product((32, 64, 128, 256), (1, 2, 4))]
        return tiles + tokens
    tiles = [ExpandConfig(bn, bk, w, st) for (bn, bk), w, st in
             product(((64, 64), (128, 64), (32, 128), (64, 128)), (4, 8), (2, 3))]
    tiles += [ExpandConfig(bn, 256, w, 2) for bn, w in product((16, 32, 64), (4, 8))]
    tokens = [ExpandConfig(bn, bk, w, 2, per_token=True) for bn, bk, w in product((16, 32, 64), (64, 256), (2, 4, 8))]
    # wider column blocks, so each program has more of M in flight (64 tokens x 448 blocks already fill the GPU)
    tokens += [ExpandConfig(bn, bk, w, 2, per_token=True) for bn, bk, w in product((128, 256), (32, 64), (4, 8))]
    return [cfg for cfg in tiles + tokens if cfg.block_k <= rank]


TUNE_SHAPES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336))}  # Llama-3-8B


def tune_expand(ranks=(32, 256), tokens=64):
    """Time every candidate config of each kernel on the decode shapes, the tile kernel on 8 and 16 adapters and
    the per-token kernel on 16 and 64 (the steps SlotIndex.prefers_per_token gives each; 16 slots of 4 tokens is
    the rule's boundary, both kernels timed there). The best of a kernel for a shape is the fastest at 8
    adapters (tiles) or 64 (per token)."""
    rows, table = [], {}
    for rank, (name, (in_features, outs)) in itertools.product(ranks, TUNE_SHAPES.items()):
        times: dict[tuple[int, ExpandConfig], float] = {}
        for count in (8, 16, 64):
            shared, _, x, _, index = block_inputs(tokens, in_features, outs, rank, count, count)
            y0z = F.linear(x, shared.weight)
            for cfg in candidate_configs(rank):
                if any(b % cfg.block_n for b in shared.bounds[1:-1]) or count == (64 if not cfg.per_token else 8):
                    continue
                us = bench(lambda: expand_grouped(y0z, shared.paged, 0, shared.bounds, index, cfg), rep=30)
                rows.append({"shape": name, "rank": rank, "num_adapters": count, **asdict(cfg), "us": us})
                times[(count, cfg)] = us
        for per_token, count in ((False, 8), (True, 64)):
            mine = {cfg: us for (c, cfg), us in times.items() if c == count and cfg.per_token == per_token}
            best = min(mine, key=mine.get)
            table[config_key(sum(outs), rank, SlotIndex.tile_tokens_for(tokens), per_token)] = asdict(best)
            at_16 = times.get((16, best), float("nan"))
            print("tune", name, rank, "per_token" if per_token else "tiles", asdict(best), f"{mine[best]:.1f} us at",
                  count, f"adapters, {at_16:.1f} us at 16", flush=True)
    return rows, table


PAGE_SHAPES = {**TUNE_SHAPES, "down": (14336, (4096,))}
PAGE_STEPS = [(64, 32, 1, None), (64, 32, 8, None), (64, 32, 64, None), (64, 256, 8, None), (64, 256, 25, None),
              (64, 256, 64, None), (64, 256, 64, (8, 32, 256)), (1, 32, 1, None), (512, 32, 8, None)]
"""(tokens, server rank, distinct adapters, their ranks in turn or None: the server's) for --pages."""
PAGE_CONFIGS = [ExpandConfig(bn, 16, w, st, pages=True) for bn, w, st in
                ((64, 4, 3), (128, 4, 3), (128, 4, 5), (256, 4, 3), (128, 8, 4), (256, 8, 4))]
UNROLLED_CONFIGS = [ExpandConfig(bn, 16, w, 1, pages=True, unroll=True) for bn, w in
                    ((64, 2), (64, 4), (128, 4), (256, 4), (256, 8))]
"""The page loop unrolled (timed on servers of rank <= 64 only)."""


@contextlib.contextmanager
def classic_kernels():
    """The expand as before the page kernel (PICA_EXPAND_KERNEL=classic), for side-by-side rows."""
    saved, expand_kernel.PAGES_KERNEL = expand_kernel.PAGES_KERNEL, False
    try:
        yield
    finally:
        expand_kernel.PAGES_KERNEL = saved


def pages_rows(sweep: str = "all"):
    """The expand as the engine runs it (`product_us`) against the kernels picked before the page kernel
    (`picked_us`, PICA_EXPAND_KERNEL=classic) and the page kernel in each config the sweep names, on
    the decode steps of PAGE_STEPS and a prefill-sized one, each shape of Llama-3-8B; GB/s on the M bytes the step
    must read (each distinct adapter's M once). Returns the rows and the best config per shape key (the least
    summed time over the steps the engine runs through the page kernel)."""
    rows, sums = [], {}
    for (name, (in_features, outs)), (tokens, rank, count, ranks) in itertools.product(PAGE_SHAPES.items(), PAGE_STEPS):
        shared, _, x, slots, index = block_inputs(tokens, in_features, outs, rank, count, count, adapter_ranks=ranks)
        y0z = F.linear(x, shared.weight)
        ref = expand_reference(y0z.float(), shared.paged, 0, shared.bounds, torch.tensor(slots, device="cuda"))
        own = [rank if ranks is None else ranks[s % len(ranks)] for s in range(min(count, tokens))]
        m_bytes = sum(own) * sum(outs) * 2
        row = {"shape": name, "tokens": tokens, "server_rank": rank, "num_adapters": count,
               "adapter_ranks": list(ranks or [rank]), "picked": "per_token" if index.per_token else "tiles"}
        work = y0z.clone()
        with classic_kernels():
            row["picked_us"] = bench(lambda: expand_grouped(work, shared.paged, 0, shared.bounds, index), rep=30)
        got = expand_grouped(y0z.clone(), shared.paged, 0, shared.bounds, index).float()
        row["product_rel_err"] = float((got - ref).norm() / ref.norm())
        row["product_us"] = bench(lambda: expand_grouped(work, shared.paged, 0, shared.bounds, index), rep=30)
        configs = {"all": PAGE_CONFIGS + UNROLLED_CONFIGS, "unrolled": UNROLLED_CONFIGS, "none": []}[sweep]
        for cfg in configs:
            if any(b % cfg.block_n for b in shared.bounds[1:-1]) or (cfg.unroll and rank > 64):
                continue
            tag = f"pages_{cfg.block_n}x{cfg.num_warps}w{cfg.num_stages}s{'u' if cfg.unroll else ''}"
            got = expand_grouped(y0z.clone(), shared.paged, 0, shared.bounds, index, cfg).float()
            row[f"{tag}_rel_err"] = float((got - ref).norm() / ref.norm())
            work = y0z.clone()
            us = bench(lambda: expand_grouped(work, shared.paged, 0, shared.bounds, index, cfg), rep=30)
            row[f"{tag}_us"] = us
            if not index.per_token or rank > expand_kernel.PER_TOKEN_MAX_RANK:  # a step the engine runs in pages
                key = config_key(sum(outs), rank, index.tile_tokens, False, pages=True)
                sums.setdefault(key, {}).setdefault(cfg, 0.0)
                sums[key][cfg] += us
        if any(k.startswith("pages_") for k in row):
            best = min((k for k in row if k.startswith("pages_") and k.endswith("_us")), key=row.get)
            row["best_pages"], row["best_pages_us"] = best, row[best]
            row["best_pages_GBps_on_M"] = m_bytes / row["best_pages_us"] / 1e3
        row["picked_GBps_on_M"] = m_bytes / row["picked_us"] / 1e3
        row["product_GBps_on_M"] = m_bytes / row["product_us"] / 1e3
        rows.append(row)
        print("pages", json.dumps({k: v for k, v in row.items() if not k.endswith("_rel_err")}), flush=True)
    return rows, {key: asdict(min(times, key=times.get)) for key, times in sums.items()}


LORA_LAYERS = {"q": (4096, 4096), "k_v": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}
"""Llama-3-8B's per-layer shapes (in, out) for the LoRA rows (k and v share a shape, so do gate and up)."""


def lora_row(tokens, layer, rank, num_adapters, num_slots=64, lora_rank=None, dtype=torch.bfloat16, dev="cuda"):
    """One layer's `y += B[slot] A[slot] x` on `tokens` tokens spread round-robin over num_adapters slots: the
    gathered torch path (the GPU path before the kernels), the kernels in each form and in the one SlotIndex picks,
    and for prefill the per-slot torch matmuls. lora_rank=0 fills the slots with adapters of no per-layer factors
    (PiCa slots with the LoRA stacks on: every op still runs, only the kernels skip the work)."""
    in_features, out_features = LORA_LAYERS[layer]
    lora_rank = rank if lora_rank is None else lora_rank
    gen = torch.Generator().manual_seed(0)
    stacks = SlotStacks({}, num_slots, dtype, dev, {"l": (out_features, in_features)}, rank)
    for slot in range(num_adapters):
        stacks.write(slot, {} if not lora_rank else {
            "lora_A.l": (torch.randn(lora_rank, in_features, generator=gen) / in_features**0.5).to(dtype),
            "lora_B.l": (torch.randn(out_features, lora_rank, generator=gen) * 0.02).to(dtype)})
    a_stack, b_stack, host_ranks, ranks = stacks.per_layer("l")
    slots = [i % num_adapters for i in range(tokens)]
    index = SlotIndex(max(tokens, 16), dev)
    index.set(slots)
    picked = "per_token" if index.per_token else "tiles"
    x = torch.randn(tokens, in_features, generator=gen).to(dev, dtype)
    y = (torch.randn(tokens, out_features, generator=gen) * 0.1).to(dev, dtype)
    ref = y.float().clone()
    lora_torch(x.float(), ref, a_stack.float(), b_stack.float(), host_ranks, index)
    got = y.clone()
    lora_grouped(x, got, a_stack, b_stack, ranks, index)
    distinct = min(num_adapters, tokens)
    ab_bytes = distinct * lora_rank * (in_features + out_features) * x.element_size()
    row = {"tokens": tokens, "layer": layer, "in": in_features, "out": out_features, "stack_rank": rank,
           "lora_rank": lora_rank, "num_adapters": num_adapters, "picked": picked,
           "rel_err_vs_fp32": float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)),
           "max_abs_err_vs_fp32": float((got.float() - ref).abs().max())}
    work = y.clone()
    row["gathered_us"] = bench(lambda: lora_gathered(x, work, a_stack, b_stack, index.token_slots))
    if tokens > 256:
        row["torch_grouped_us"] = bench(lambda: lora_torch(x, work, a_stack, b_stack, host_ranks, index), graph=False)
    for form in ("tiles", "per_token"):
        index.set(slots, per_token=form == "per_token")
        row[f"kernel_{form}_us"] = bench(lambda: lora_grouped(x, work, a_stack, b_stack, ranks, index))
    row["kernel_us"] = row[f"kernel_{picked}_us"]
    row["speedup_vs_gathered"] = row["gathered_us"] / row["kernel_us"]
    row["kernel_GBps_on_AB"] = ab_bytes / (row["kernel_us"] * 1e-6) / 1e9
    print("lora", json.dumps(row), flush=True)
    return row


def lora_rows():
    """Decode (64 tokens over 8 and 64 slots, r=16 and 64), prefill (2048 tokens over 8 slots), and a decode step
    whose slots hold no LoRA (16 PiCa adapters with --max-lora-rank 16)."""
    rows = [lora_row(64, layer, rank, adapters) for rank, adapters, layer in
            itertools.product((16, 64), (8, 64), LORA_LAYERS)]
    rows += [lora_row(2048, layer, rank, 8) for rank, layer in itertools.product((16, 64), LORA_LAYERS)]
    rows += [lora_row(64, layer, 16, 16, lora_rank=0) for layer in LORA_LAYERS]
    return rows


def basis_routes():
    rows = []
    for out_features, in_features in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
        for method in ("gram", "svd"):
            torch.cuda.synchronize()
            start = time.perf_counter()
            p = principal_basis(w, 256, method)
            torch.cuda.synchronize()
            rows.append({"shape": [out_features, in_features], "method": method, "seconds": time.perf_counter() - start,
                         "orthonormality_err": float((p @ p.T - torch.eye(256, device="cuda")).abs().max())})
    return rows


def device_ceilings():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_us = bench(lambda: b.copy_(a), graph=False)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = bench(lambda: x @ x, rep=100, graph=False)
    z = torch.zeros(1, device="cuda")
    return {"copy_TBps_read_plus_write": 2 * n / (copy_us * 1e-6) / 1e12,
            "bf16_matmul_TFLOPs": 2 * 8192**3 / (mm_us * 1e-6) / 1e12, "empty_launch_us": bench(lambda: z.add_(1))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-basis", action="store_true")
    parser.add_argument("--tune", type=Path, help="time the expand configs on the decode shapes and write the best per "
                        "shape for this device into this file (merged into what it holds; adapters/expand_configs.json "
                        "is the committed one)")
    parser.add_argument("--tune-only", action="store_true", help="with --tune: skip the block and LoRA timings")
    parser.add_argument("--tune-ranks", default="32,256", help="with --tune: the ranks to time (others keep their entries)")
    parser.add_argument("--lora-only", action="store_true", help="only the LoRA rows (and the device ceilings)")
    parser.add_argument("--rank-split-only", action="store_true",
                        help="only the per-token expand over mixed ranks, rank split on and off (and the ceilings)")
    parser.add_argument("--pages-sweep", default="all", choices=["all", "unrolled", "none"],
                        help="with --pages: the configs timed beside the engine's own")
    parser.add_argument("--pages", type=Path, help="only the page kernel against today's pick (and the ceilings); "
                        "its best configs merged into this file")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(sys.argv), "ceilings": device_ceilings()}
    qkv, gate_up = (4096, 1024, 1024), (14336, 14336)  # Llama-3-8B
    report["blocks"] = []
    if args.pages:
        report["pages"], table = pages_rows(args.pages_sweep)
        tuned = json.loads(args.pages.read_text()) if args.pages.exists() else {}
        tuned.setdefault(report["device"], {}).update(table)
        args.pages.write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")
        args.tune_only, args.skip_basis, args.tune = True, True, None
    if args.rank_split_only:
        report["rank_split"] = rank_split_rows()
        args.tune_only, args.skip_basis, args.tune = True, True, None
    for rank, adapters in (() if args.tune_only or args.lora_only else ((32, 8), (256, 64))):
        for in_features, outs in ((4096, qkv), (4096, (4096,)), (4096, gate_up), (14336, (4096,))):
            report["blocks"].append(adapted_block(64, in_features, outs, rank, adapters, 64))
    if not (args.tune_only or args.lora_only):
        report["blocks"].append(adapted_block(2048, 4096, qkv, 256, 16, 16))  # a prefill chunk
    if not args.tune_only and not args.rank_split_only:
        report["lora"] = lora_rows()
    if args.tune:
        report["tune"], table = tune_expand(tuple(int(r) for r in args.tune_ranks.split(",")))
        tuned = json.loads(args.tune.read_text()) if args.tune.exists() else {}
        tuned.setdefault(report["device"], {}).update(table)
        args.tune.parent.mkdir(parents=True, exist_ok=True)
        args.tune.write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")
    if not args.skip_basis:
        report["basis"] = basis_routes()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["ceilings"]))
    cols = ["tokens", "outs", "rank", "num_adapters", "base_separate_us", "base_shared_us", "gemm_with_p_us",
            "expand_us", "adapter_path_us", "adapter_overhead_us", "expand_GBps_on_M", "rel_err_vs_fp32_reference"]
    print(" | ".join(c.replace("_us", "") for c in cols))
    for row in report["blocks"]:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    cols = ["tokens", "layer", "lora_rank", "num_adapters", "picked", "gathered_us", "kernel_tiles_us",
            "kernel_per_token_us", "speedup_vs_gathered", "kernel_GBps_on_AB", "rel_err_vs_fp32"]
    print(" | ".join(c.replace("_us", "") for c in cols))
    for row in report.get("lora", []):
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    for row in report.get("basis", []):
        print(row)


if __name__ == "__main__":
    main()
