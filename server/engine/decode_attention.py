"""Triton paged decode attention: one query token per sequence against its paged KV cache.

Semantics: for each sequence s and query head h (kv head h // (H / Hkv)),
    out[s, h] = softmax(softcap(q[s, h] . K_s^T * scale) masked to positions in
                [max(0, L_s - window), L_s)) @ V_s
where K_s / V_s are the first L_s = context_lens[s] cache rows of sequence s, found through its
block table. One program handles one sequence and one kv head (all its query heads at once), so
K/V are read once; shapes do not depend on context lengths, so CUDA graphs can capture it.
The reference is `attention_reference` on gathered K/V (server/engine/attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapters.expand_kernel import dot_precision


@triton.jit
def online_softmax_block(s, v, m, l, acc, PRECISION: tl.constexpr):
    """Fold one block of keys into a running softmax (flash attention's update): scores s [R, N] (-inf where a
    key is masked), values v [N, D]; running max m [R], denominator l [R], output acc [R, D]. A row that has
    seen no key yet keeps l = acc = 0. Shared by the decode and varlen kernels."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr, scale, softcap,
    stride_q_t, stride_q_h, stride_kv_slot, stride_kv_h, stride_o_t, stride_o_h, stride_bt,
    QUERIES_PER_KV: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    offs_g = tl.arange(0, GROUP_PAD)
    mask_g = offs_g < QUERIES_PER_KV
    heads = kv_head * QUERIES_PER_KV + offs_g
    offs_d = tl.arange(0, HEAD_PAD)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_PAD), dtype=tl.float32)
    n0 = context_len * 0
    if WINDOW > 0:
        n0 = tl.maximum(context_len - WINDOW, 0) // BLOCK_N * BLOCK_N
    while n0 < context_len:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < context_len
        if WINDOW > 0:
            mask_n = mask_n & (offs_n >= context_len - WINDOW)
        blocks = tl.load(block_tables_ptr + seq * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        slots = blocks.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_offsets = slots[:, None] * stride_kv_slot + kv_head * stride_kv_h + offs_d[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, BLOCK_N]
        if USE_SOFTCAP:
            s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1)  # softcap * tanh(s / softcap)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        v = tl.load(v_ptr + kv_offsets, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        m, l, acc = online_softmax_block(s, v, m, l, acc, PRECISION)
        n0 += BLOCK_N
    out = acc / l[:, None]
    tl.store(out_ptr + seq * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [S, H, D] (any strides, last dim contiguous), k/v_cache [slots, Hkv, D], block_tables [S, B] int,
    context_lens [S] int -> out [S, H, D]."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    per_kv = num_heads // num_kv_heads
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale, softcap or 1.0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        QUERIES_PER_KV=per_kv, GROUP_PAD=max(16, triton.next_power_of_2(per_kv)), HEAD_DIM=head_dim,
        HEAD_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_N=max(16, min(64, triton.next_power_of_2(block_size) * 4)),
        WINDOW=sliding_window or 0, USE_SOFTCAP=softcap is not None, PRECISION=dot_precision(q.dtype), num_warps=4,
    )
    return out
