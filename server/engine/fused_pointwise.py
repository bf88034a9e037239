"""The decoder layer's elementwise work in one kernel each (Triton): RoPE on q and k (with the KV cache write,
`rope_store`), and SiLU(gate) * up.

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
def _rotate_heads(x, stride_xh, y, stride_yh, c1, c2, s1, s2, heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """RoPE on one token's heads: x and y point at its head 0; c1/c2/s1/s2 [1, BLOCK_D] the halves of cos, sin."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < HALF)
    x = x + h * stride_xh + d
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    y = y + h * stride_yh + d
    tl.store(y, (x1 * c1 - x2 * s1).to(y.dtype.element_ty), mask=mask)
    tl.store(y + HALF, (x2 * c2 + x1 * s2).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, t, stride_ct, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)[None, :]
    c = cos_ptr + t * stride_ct + d
    s = sin_ptr + t * stride_ct + d
    mask = d < HALF
    return (tl.load(c, mask=mask, other=0.0).to(tl.float32), tl.load(c + HALF, mask=mask, other=0.0).to(tl.float32),
            tl.load(s, mask=mask, other=0.0).to(tl.float32), tl.load(s + HALF, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, stride_xt, stride_xh, stride_ct, stride_yt, stride_yh, heads,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, t, stride_ct, HALF, BLOCK_D)
    _rotate_heads(x_ptr + t * stride_xt, stride_xh, y_ptr + t * stride_yt, stride_yh, c1, c2, s1, s2, heads, HALF,
                  BLOCK_H, BLOCK_D)


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
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ot,
                       stride_oh, stride_cache_slot, stride_cache_h, heads, kv_heads, HALF: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, t, stride_ct, HALF, BLOCK_D)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * stride_ot, stride_oh, c1, c2, s1, s2, heads,
                  HALF, BLOCK_H, BLOCK_D)
    slot = tl.load(slots_ptr + t).to(tl.int64) * stride_cache_slot
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, k_cache_ptr + slot, stride_cache_h, c1, c2, s1, s2, kv_heads,
                  HALF, BLOCK_KV, BLOCK_D)
    h = tl.arange(0, BLOCK_KV)[:, None]
    d = tl.arange(0, 2 * BLOCK_D)[None, :]
    mask = (h < kv_heads) & (d < 2 * HALF)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    tl.store(v_cache_ptr + slot + h * stride_cache_h + d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k with k and v written into the paged cache, one kernel for what is otherwise four (two
    RoPEs, two index copies: on a Llama-3-8B decode step 128 launches, 0.28 ms). q [T, H, D], k/v [T, Hkv, D]
    (views whose last axis is dense), cos/sin [T, D], k/v_cache [slots, Hkv, D] (last two axes dense),
    slot_mapping [T] -> the rotated q, a new [T, H, D] tensor; k_cache[slot_mapping[t]] = rope(k[t]) and
    v_cache[slot_mapping[t]] = v[t], as `rope` then `index_copy_` would."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and dim % 2 == 0
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and k_cache.stride(1) == dim
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((tokens, heads, dim), dtype=q.dtype, device=q.device)
    if tokens:
        _rope_store_kernel[(tokens,)](
            q, k, v, cos, sin, out, k_cache, v_cache, slot_mapping, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), cos.stride(0), out.stride(0), out.stride(1), k_cache.stride(0),
            k_cache.stride(1), heads, kv_heads, HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_KV=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(dim // 2), num_warps=4)
    return out


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
