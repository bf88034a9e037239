"""The no-adapter decode step's kernels one by one, each against what could replace it (issue 18's 80% bar).

    python bench/step_kernels_bench.py --out bench/results/step-kernels-h200.json

Llama-3-8B shapes at batch 64 (and 1), bf16, a distinct weight or KV cache per layer as in the model (the H200's
50 MB L2 would hold one layer's o_proj and flatter a loop over one), 32 layers a CUDA graph, replay time / 32:
- GEMMs: cuBLAS as torch calls it, cuBLASLt (`preferred_blas_library`), and a Triton weight-streaming GEMM
  (a program per block of output columns, the whole K pipelined; split-K optional) over a config grid;
- paged decode attention (server.engine.decode_attention) over its DecodeConfig grid, context 129..256;
- RoPE on q and k with the KV cache write: two `rope` and two `index_copy_` against `rope_store`.
Bandwidth columns count the bytes each kernel must read or write once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_bench import measured_bandwidth  # noqa: E402
from server.engine.decode_attention import DecodeConfig, paged_decode_attention  # noqa: E402
from server.engine.fused_pointwise import rope, rope_store  # noqa: E402

LAYERS = 32
GEMMS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def replay_us(fn, iters: int = 20) -> float:
    """Median microseconds per replay of a CUDA graph of fn (fn runs LAYERS kernels: divide by LAYERS)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


@triton.jit
def _stream_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                        NUM_STAGES: tl.constexpr):
    """y [M, N] = x [M, K] @ w[N, K]^T for M <= BLOCK_M: each program streams BLOCK_N rows of w over its K range."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(pid_k * k_chunk, tl.minimum((pid_k + 1) * k_chunk, K), BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, acc, mask=mask, sem="relaxed")


def stream_gemm(x, w, block_n, block_k, split_k, stages, warps):
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(n, block_n), split_k)
    args = dict(BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                NUM_STAGES=stages, num_warps=warps)
    if split_k == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        _stream_gemm_kernel[grid](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), **args)
        return y
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    _stream_gemm_kernel[grid](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), **args)
    return y.to(x.dtype)


def gemm_rows(batch: int, bandwidth: float, quick: bool) -> list[dict]:
    rows = []
    grid = list(itertools.product((16, 32, 64), (128, 256), (1, 2), (3, 4, 6), (4,)))
    if quick:
        grid = grid[:4]
    for name, (n, k) in GEMMS.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, weights[0]).float()
        gb = (n * k + batch * (n + k)) * 2 / 1e9
        row = {"gemm": name, "batch": batch, "n": n, "k": k, "MB_per_layer": gb * 1e3}

        def timed(fn):
            us = replay_us(lambda: [fn(x, w) for w in weights]) / LAYERS
            return {"us": round(us, 2), "TBps": round(gb / us * 1e6 / 1e3, 3),
                    "pct_of_copy_bw": round(100 * gb / us * 1e6 / 1e3 / bandwidth, 1)}

        row["cublas"] = timed(F.linear)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        row["cublaslt"] = timed(F.linear)
        torch.backends.cuda.preferred_blas_library("cublas")
        best = None
        for block_n, block_k, split_k, stages, warps in grid:
            cfg = dict(block_n=block_n, block_k=block_k, split_k=split_k, stages=stages, warps=warps)
            try:
                got = stream_gemm(x, weights[0], **cfg).float()
                err = float((got - ref).norm() / ref.norm())
                assert err < 2e-2, err
                result = timed(lambda a, b: stream_gemm(a, b, **cfg)) | cfg | {"rel_err": err}
            except Exception as e:  # a config that does not compile (shared memory) is skipped, noted
                result = cfg | {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            row.setdefault("triton", []).append(result)
            if "us" in result and (best is None or result["us"] < best["us"]):
                best = result
        row["triton_best"] = best
        print(json.dumps({k: v for k, v in row.items() if k != "triton"}), flush=True)
        rows.append(row)
    return rows


def kv_inputs(num_seqs, context, heads=32, kv_heads=8, head_dim=128, block_size=16):
    """A per-layer paged cache each, blocks handed out shuffled; every sequence at `context` tokens."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    perm = torch.randperm(num_blocks - 1)[: num_seqs * blocks_per_seq]
    tables = perm.view(num_seqs, blocks_per_seq).to("cuda", torch.int64)
    caches = [torch.randn(2, num_blocks * block_size, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
              for _ in range(LAYERS)]
    q = torch.randn(num_seqs, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((num_seqs,), context, device="cuda", dtype=torch.int64)
    return q, caches, tables, lens


def attention_rows(num_seqs: int, bandwidth: float, quick: bool) -> list[dict]:
    rows = []
    grid = [DecodeConfig(*c) for c in itertools.product((32, 64, 128), (1, 2, 4), (1, 2, 3), (2, 4))]
    if quick:
        grid = grid[:4]
    for context in (129, 192, 256):
        q, caches, tables, lens = kv_inputs(num_seqs, context)
        gb = (num_seqs * context * 8 * 128 * 2 * 2 + 2 * q.numel() * 2) / 1e9
        ref = paged_decode_attention(q, caches[0][0], caches[0][1], tables, lens, 16, 128**-0.5,
                                     config=DecodeConfig(64, 1, 1, 4)).float()
        row = {"num_seqs": num_seqs, "context": context, "MB_per_layer": gb * 1e3, "configs": []}
        for cfg in grid:
            try:
                got = paged_decode_attention(q, caches[0][0], caches[0][1], tables, lens, 16, 128**-0.5, config=cfg)
                err = float((got.float() - ref).norm() / ref.norm())
                assert err < 1e-2, err
                us = replay_us(lambda: [paged_decode_attention(q, c[0], c[1], tables, lens, 16, 128**-0.5, config=cfg)
                                        for c in caches]) / LAYERS
                result = {"config": list(cfg.__dict__.values()), "us": round(us, 2),
                          "pct_of_copy_bw": round(100 * gb / us * 1e6 / 1e3 / bandwidth, 1), "rel_err": err}
            except Exception as e:
                result = {"config": list(cfg.__dict__.values()), "error": f"{type(e).__name__}: {str(e)[:120]}"}
            row["configs"].append(result)
        timed = [c for c in row["configs"] if "us" in c]
        row["best"] = min(timed, key=lambda c: c["us"])
        chosen = list(DecodeConfig.for_step(num_seqs, 8).__dict__.values())
        row["default"] = next((c for c in timed if c["config"] == chosen), None)  # what the engine picks
        row["unpipelined"] = next((c for c in timed if c["config"] == [64, 1, 1, 4]), None)  # the kernel before
        print(json.dumps({k: v for k, v in row.items() if k != "configs"}), flush=True)
        rows.append(row)
    return rows


def rope_store_row(tokens: int) -> dict:
    q, k, v = (torch.randn(tokens, h, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8))
    angles = torch.randn(tokens, 64, device="cuda").repeat(1, 2)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    caches = [torch.zeros(2, 4096 * 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    slots = torch.randperm(4096 * 16, device="cuda")[:tokens]

    def separate():
        for c in caches:
            rope(q, cos, sin)
            c[0].index_copy_(0, slots, rope(k, cos, sin))
            c[1].index_copy_(0, slots, v)

    return {"tokens": tokens, "rope_x2_index_copy_x2_us": round(replay_us(separate) / LAYERS, 2),
            "rope_store_us": round(replay_us(lambda: [rope_store(q, k, v, cos, sin, c[0], c[1], slots)
                                                       for c in caches]) / LAYERS, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a few configs each (a smoke run)")
    parser.add_argument("--skip-gemms", action="store_true")
    parser.add_argument("--num-seqs", default="64", help="sequences of the attention rows (comma-separated)")
    args = parser.parse_args()
    start = time.perf_counter()
    bandwidth = measured_bandwidth() / 1e12
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(sys.argv), "copy_bandwidth_TBps": bandwidth}
    print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sections = {"rope_store": lambda: [rope_store_row(t) for t in (1, 64)],
                "attention": lambda: [row for s in args.num_seqs.split(",")
                                      for row in attention_rows(int(s), bandwidth, args.quick)],
                "gemms": lambda: [] if args.skip_gemms else gemm_rows(64, bandwidth, args.quick)}
    for name, rows in sections.items():  # written after each, so a cut-off run keeps what it measured
        result[name] = rows()
        result["seconds"] = time.perf_counter() - start
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
