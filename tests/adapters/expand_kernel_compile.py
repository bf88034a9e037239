"""Compile the PiCa expand kernels for sm_90 (the H100/H200) on a machine without a GPU, at every launch expand_grouped
makes on Llama-3-8B's shapes with the H200's tuned configs and with the defaults, and read each kernel's registers and
spills from the cubin (the interpreter runs the kernels' arithmetic but never compiles them).

    python tests/adapters/expand_kernel_compile.py     # one line per kernel: registers, spill stack, shared memory
"""

from __future__ import annotations

import itertools
import sys

import triton

from adapters import expand_kernel as ek
from adapters.rank_pages import RANK_PAGE
from tests.adapters.sm90_compile import compile_for_sm90, report, signature

POINTER_TYPES = {"token_slots_ptr": "*i64", **{name: "*i32" for name in (
    "ranks_ptr", "table_ptr", "token_order_ptr", "tile_start_ptr", "tile_end_ptr", "tile_slot_ptr", "num_tiles_ptr",
    "token_ranks_ptr")}}
"""Besides y0z, pools and signs (bf16): token slots int64, ranks, the page table and SlotIndex's buffers int32."""
LLAMA3_8B_BOUNDS = {"qkv": (0, 4096, 5120, 6144), "o": (0, 4096), "gate_up": (0, 14336, 28672), "down": (0, 4096)}


def launches(device: str, bounds: tuple[int, ...], rank: int, tile_tokens: int):
    """(kernel, constexprs, options) of each launch expand_grouped makes for these bounds on `device`'s table (bf16):
    the page kernel's tiles, the older tile kernel (PICA_EXPAND_KERNEL=classic) and the per-token kernel's buckets."""
    members = {"NUM_OUT": bounds[-1], "RANK": rank, "PAGE": RANK_PAGE, "BOUND1": bounds[1] if len(bounds) > 2 else
               bounds[-1], "BOUND2": bounds[2] if len(bounds) > 3 else bounds[-1]}
    cfg = ek.pages_config(device, rank, bounds, tile_tokens)
    yield ek._expand_pages_kernel, {**members, "BLOCK_T": tile_tokens, "BLOCK_N": cfg.block_n,
                                    "NUM_STAGES": cfg.num_stages, "UNROLL": cfg.unroll, "PRECISION": "tf32"}, \
        {"num_warps": cfg.num_warps}
    cfg = ek.pick_config(device, rank, bounds, tile_tokens, False)
    yield ek._expand_kernel, {**members, "BLOCK_T": tile_tokens, "BLOCK_N": cfg.block_n,
                              "BLOCK_K": max(RANK_PAGE, cfg.block_k), "PRECISION": "tf32"}, \
        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if tile_tokens == 16:  # the per-token kernel serves decode-sized steps only
        for lo, hi in ek.rank_buckets(rank):
            cfg = ek.pick_config(device, hi, bounds, tile_tokens, True)
            yield ek._expand_token_kernel, {**members, "RANK_LO": lo, "RANK_HI": hi, "BLOCK_N": cfg.block_n,
                                            "BLOCK_K": max(RANK_PAGE, min(cfg.block_k, triton.next_power_of_2(hi)))}, \
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def compile_all(devices=("NVIDIA H200", "cuda"), ranks=(32, 256), tile_tokens=(16, 64)) -> list[dict]:
    """Every distinct launch of `launches` over Llama-3-8B's shapes ("cuda": a device with no tuned table)."""
    rows, seen = [], set()
    for device, bounds, rank, tokens in itertools.product(devices, LLAMA3_8B_BOUNDS.values(), ranks, tile_tokens):
        for fn, consts, options in launches(device, bounds, rank, tokens):
            key = (fn.__name__, tuple(sorted(consts.items())), tuple(sorted(options.items())))
            if key not in seen:
                seen.add(key)
                rows.append(compile_for_sm90(fn, signature(fn, "bf16", POINTER_TYPES), consts, options))
    return rows


if __name__ == "__main__":
    sys.exit(report(compile_all(), "expand kernels"))
