"""Compile a Triton kernel for sm_90 (the H100/H200) on a machine without a GPU and read its registers and spills
from the cubin: the interpreter runs the kernels' arithmetic but never compiles them, so a kernel that does not
lower, or spills at its blocks, shows here first. Used by lora_kernel_compile.py and expand_kernel_compile.py."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def signature(fn, dtype: str, pointer_types: dict[str, str]) -> dict[str, str]:
    """Triton's signature of a kernel from its argument names: UPPER-case names constexpr, the pointers named in
    pointer_types of their type there, other pointers to `dtype`, other scalars int32."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name.isupper():
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        else:
            sig[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
    return sig


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
