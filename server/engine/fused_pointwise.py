"""The decoder layer's elementwise work in one kernel each (Triton): RoPE on q and k, and SiLU(gate) * up.

Written as torch ops, transformers' rotate-half RoPE is five kernels per tensor (negate, concatenate, two
products, a sum) and the gated MLP's activation two (SiLU, product): on a Llama-3-8B decode step about 380 of its
launches, each a few microseconds of a memory-bound step for a few hundred KB. Semantics: exactly
`llama_decoder.rotate` and `F.silu(gate) * up`, computed in float32 and rounded once to the inputs' dtype (the
torch ops round after each op: the two agree to a rounding step in bf16, exactly in fp32 up to summation order).
Inputs may be strided views (the q/k/v and gate/up slices of one GEMM's output); the last axis must be dense.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, stride_xt, stride_xh, stride_ct, stride_yt, stride_yh, heads,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < HALF)
    x = x_ptr + t * stride_xt + h * stride_xh + d
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos_ptr + t * stride_ct + d
    s = sin_ptr + t * stride_ct + d
    c1 = tl.load(c, mask=d < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=d < HALF, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=d < HALF, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=d < HALF, other=0.0).to(tl.float32)
    y = y_ptr + t * stride_yt + h * stride_yh + d
    tl.store(y, (x1 * c1 - x2 * s1).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y + HALF, (x2 * c2 + x1 * s2).to(y_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (a view whose last axis is dense), cos/sin [T, D] -> a new [T, heads, D] tensor."""
    tokens, heads, dim = x.shape
    assert x.stride(-1) == 1 and dim % 2 == 0
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        _rope_kernel[(tokens,)](x, cos, sin, y, x.stride(0), x.stride(1), cos.stride(0), y.stride(0), y.stride(1),
                                heads, HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads),
                                BLOCK_D=triton.next_power_of_2(dim // 2), num_warps=4)
    return y


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, stride_g, stride_u, stride_y, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds to the dtype
    tl.store(y_ptr + row * stride_y + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, n] (row-strided views allowed) -> F.silu(gate) * up, a new [T, n] tensor."""
    assert gate.shape == up.shape and gate.stride(-1) == 1 and up.stride(-1) == 1
    tokens, n = gate.shape
    y = torch.empty((tokens, n), dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(n))
    if tokens:
        _silu_mul_kernel[(tokens, triton.cdiv(n, block))](gate, up, y, gate.stride(0), up.stride(0), y.stride(0), n,
                                                          BLOCK=block, num_warps=4)
    return y
