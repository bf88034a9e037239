"""Compile the LoRA kernels for sm_90 (the H100/H200) on a machine without a GPU, at the configs lora_grouped picks,
and read each kernel's registers and spills from the cubin: the interpreter runs the kernels' arithmetic but never
compiles them, so a kernel that does not lower, or spills at its default blocks, shows here first.

    python tests/adapters/lora_kernel_compile.py     # one line per kernel: registers, spill stack, shared memory
"""

from __future__ import annotations

import sys

import triton

from adapters import lora_kernel as lk
from tests.adapters.sm90_compile import compile_for_sm90, report, signature

POINTER_TYPES = {"z_ptr": "*fp32", "slots_ptr": "*i64", **{name: "*i32" for name in (
    "ranks_ptr", "z_rank_ptr", "token_order_ptr", "tile_start_ptr", "tile_end_ptr", "tile_slot_ptr", "num_tiles_ptr")}}
"""Besides activations and stacks (bf16): z in float32, token slots int64, ranks and SlotIndex's tile buffers int32."""


def launches(rank: int, tile_tokens: int):
    """(kernel, constexprs, num_warps) as lora_grouped launches them for stacks of this rank (bf16)."""
    block_r = max(16, triton.next_power_of_2(rank))
    tok = lk.default_config(rank, True)
    tiles = lk.default_config(rank, False, tile_tokens)
    common = {"RANK": rank, "BLOCK_R": block_r}
    yield lk._shrink_token_kernel, {**common, "BLOCK_K": tok.block_k}, tok.num_warps
    yield lk._expand_token_kernel, {**common, "BLOCK_N": tok.block_n,
                                    "BLOCK_S": max(2, triton.next_power_of_2(tok.max_splits))}, tok.num_warps
    tile = {**common, "BLOCK_T": tile_tokens, "PRECISION": "tf32"}
    yield lk._shrink_tile_kernel, {**tile, "BLOCK_K": tiles.block_k}, tiles.num_warps
    yield lk._expand_tile_kernel, {**tile, "BLOCK_N": tiles.block_n}, tiles.num_warps


def compile_all(ranks=(16, 64, 256), tile_tokens=(16, 64)) -> list[dict]:
    rows, seen = [], set()
    for rank in ranks:
        for tokens in tile_tokens:
            for fn, consts, warps in launches(rank, tokens):
                key = (fn.__name__, tuple(sorted(consts.items())), warps)
                if key not in seen:
                    seen.add(key)
                    rows.append(compile_for_sm90(fn, signature(fn, "bf16", POINTER_TYPES), consts, {"num_warps": warps}))
    return rows


def main():
    return report(compile_all(), "lora kernels")


if __name__ == "__main__":
    sys.exit(main())
