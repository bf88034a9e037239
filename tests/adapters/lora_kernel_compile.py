"""Compile the LoRA kernels for sm_90 (the H100/H200) on a machine without a GPU, at the configs lora_grouped picks,
and read each kernel's registers and spills from the cubin: the interpreter runs the kernels' arithmetic but never
compiles them, so a kernel that does not lower, or spills at its default blocks, shows here first.

    python tests/adapters/lora_kernel_compile.py     # one line per kernel: registers, spill stack, shared memory
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adapters import lora_kernel as lk

INT32_POINTERS = ("ranks_ptr", "z_rank_ptr", "token_order_ptr", "tile_start_ptr", "tile_end_ptr", "tile_slot_ptr",
                  "num_tiles_ptr")


def signature(fn, dtype: str) -> dict[str, str]:
    """Triton's signature of a kernel from its argument names: activations and stacks in `dtype`, z in float32,
    token slots int64, ranks and SlotIndex's tile buffers int32, scalars int32, UPPER-case names constexpr."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name.isupper():
            sig[name] = "constexpr"
        elif name == "z_ptr":
            sig[name] = "*fp32"
        elif name == "slots_ptr":
            sig[name] = "*i64"
        elif name in INT32_POINTERS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


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


def resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK (spills), SHARED of the one kernel in a cubin, from cuobjdump (shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", out)}


def compile_for_sm90(fn, sig: dict[str, str], consts: dict, options: dict) -> dict:
    """One launch compiled for sm_90: the kernel's name, constexprs and options with its registers, spills and shared
    memory."""
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options=options)
    return {"kernel": fn.__name__, **consts, **options, **resources(kernel.asm["cubin"]),
            "dynamic_shared": kernel.metadata.shared}


def report(rows: list[dict], what: str) -> int:
    """Print one line per kernel and a summary; 1 where any kernel spills."""
    for row in rows:
        print(row)
    spilled = [row for row in rows if row["STACK"]]
    print(f"{what} compiled for sm_90: {len(rows)} kernels, {len(spilled)} spilling")
    return 1 if spilled else 0


def compile_all(ranks=(16, 64, 256), tile_tokens=(16, 64)) -> list[dict]:
    rows, seen = [], set()
    for rank in ranks:
        for tokens in tile_tokens:
            for fn, consts, warps in launches(rank, tokens):
                key = (fn.__name__, tuple(sorted(consts.items())), warps)
                if key not in seen:
                    seen.add(key)
                    rows.append(compile_for_sm90(fn, signature(fn, "bf16"), consts, {"num_warps": warps}))
    return rows


def main():
    return report(compile_all(), "lora kernels")


if __name__ == "__main__":
    sys.exit(main())
