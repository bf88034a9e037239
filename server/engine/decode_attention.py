"""Triton paged decode attention: one query token per sequence against its paged KV cache.

Semantics: for each sequence s and query head h (kv head h // (H / Hkv)),
    out[s, h] = softmax(softcap(q[s, h] . K_s^T * scale) masked to positions in
                [max(0, L_s - window), L_s)) @ V_s
where K_s / V_s are the first L_s = context_lens[s] cache rows of sequence s, found through its
block table. One program handles one sequence and one kv head (all its query heads at once), so
K/V are read once, its blocks loaded a few ahead (a pipelined loop); or, split (DecodeConfig.splits), a range
of them, the partial softmaxes combined by a second kernel (flash-decoding). Shapes do not depend on context
lengths, so CUDA graphs can capture it.
The reference is `attention_reference` on gathered K/V (server/engine/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, block_tables_ptr, context_lens_ptr, scale, softcap,
    stride_q_t, stride_q_h, stride_kv_slot, stride_kv_h, stride_o_t, stride_o_h, stride_bt,
    QUERIES_PER_KV: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, NUM_STAGES: tl.constexpr,
    WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
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
    first = context_len * 0
    if WINDOW > 0:
        first = tl.maximum(context_len - WINDOW, 0) // BLOCK_N * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(context_len - first, BLOCK_N), SPLITS) * BLOCK_N  # this split's keys
    start = first + split * per_split
    stop = tl.minimum(start + per_split, context_len)
    for n0 in tl.range(start, stop, BLOCK_N, num_stages=NUM_STAGES):  # pipelined: the next blocks load meanwhile
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        if WINDOW > 0:
            mask_n = mask_n & (offs_n >= context_len - WINDOW)
        blocks = tl.load(block_tables_ptr + seq * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        slots = blocks.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_offsets = slots[:, None] * stride_kv_slot + kv_head * stride_kv_h + offs_d[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptr + kv_offsets, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, BLOCK_N]
        if USE_SOFTCAP:
            s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1)  # softcap * tanh(s / softcap)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m, l, acc = online_softmax_block(s, v, m, l, acc, PRECISION)
    if SPLITS == 1:
        out = acc / l[:, None]
        tl.store(out_ptr + seq * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:  # partials [S, Hkv, SPLITS, GROUP_PAD, HEAD_PAD + 2]: acc, then m and l (an empty split: m = -inf, l = 0)
        row = ((seq * tl.num_programs(1) + kv_head) * SPLITS + split) * GROUP_PAD + offs_g
        part = part_ptr + row.to(tl.int64) * (HEAD_PAD + 2)
        tl.store(part[:, None] + offs_d[None, :], acc)
        tl.store(part + HEAD_PAD, m)
        tl.store(part + HEAD_PAD + 1, l)


@triton.jit
def _combine_splits_kernel(part_ptr, out_ptr, stride_o_t, stride_o_h, QUERIES_PER_KV: tl.constexpr,
                           GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                           SPLITS: tl.constexpr):
    """Flash-decoding's second pass: the splits' partial softmaxes of one sequence and kv head, rescaled to
    their common max and summed."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    base = (seq * tl.num_programs(1) + kv_head) * SPLITS
    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_PAD), dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        part = part_ptr + ((base + split) * GROUP_PAD + offs_g).to(tl.int64) * (HEAD_PAD + 2)
        m_s = tl.load(part + HEAD_PAD)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp(m - m_safe), tl.exp(m_s - m_safe)
        l = l * alpha + tl.load(part + HEAD_PAD + 1) * beta
        acc = acc * alpha[:, None] + tl.load(part[:, None] + offs_d[None, :]) * beta[:, None]
        m = m_new
    heads = kv_head * QUERIES_PER_KV + offs_g
    mask = (offs_g < QUERIES_PER_KV)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(out_ptr + seq * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :],
             (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class DecodeConfig:
    """The kernel's launch shape: keys per block, programs per sequence and kv head (flash-decoding's split),
    pipeline depth and warps. The default is the H200's best summed over contexts 129, 192 and 256 on the
    Llama-3-8B decode shape at 64 sequences (bench/results/step-kernels-h200.json): 52.7 us against 56.9 for
    the loop without pipelining; splits lost there at every context."""

    block_n: int = 64
    splits: int = 1
    num_stages: int = 3
    num_warps: int = 2

    @classmethod
    def for_step(cls, num_seqs: int, num_kv_heads: int) -> "DecodeConfig":
        """Small batches split: at 64 programs or fewer (8 sequences of 8 kv heads) the H200 keeps most of its
        132 SMs idle; split in two, 128 keys a block, a layer took 5.5-5.7 us against 6.8-9.7 at one sequence
        and 7.2-8.0 against 8.6-11.4 at eight (bench/results/step-kernels-attention-h200.json)."""
        return cls(block_n=128, splits=2, num_stages=2, num_warps=4) if num_seqs * num_kv_heads <= 64 else cls()


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None,
                           config: DecodeConfig | None = None) -> torch.Tensor:
    """q [S, H, D] (any strides, last dim contiguous), k/v_cache [slots, Hkv, D], block_tables [S, B] int,
    context_lens [S] int -> out [S, H, D]. config None: DecodeConfig.for_step."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    config = config or DecodeConfig.for_step(num_seqs, num_kv_heads)
    per_kv = num_heads // num_kv_heads
    group_pad, head_pad = max(16, triton.next_power_of_2(per_kv)), max(16, triton.next_power_of_2(head_dim))
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    splits = config.splits
    part = out if splits == 1 else torch.empty(num_seqs * num_kv_heads * splits * group_pad * (head_pad + 2),
                                               dtype=torch.float32, device=q.device)
    common = dict(QUERIES_PER_KV=per_kv, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_PAD=head_pad)
    _paged_decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, k_cache, v_cache, out, part, block_tables, context_lens, scale, softcap or 1.0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), **common, BLOCK_SIZE=block_size, BLOCK_N=config.block_n, SPLITS=splits,
        NUM_STAGES=config.num_stages, WINDOW=sliding_window or 0, USE_SOFTCAP=softcap is not None,
        PRECISION=dot_precision(q.dtype), num_warps=config.num_warps,
    )
    if splits > 1:
        _combine_splits_kernel[(num_seqs, num_kv_heads)](part, out, out.stride(0), out.stride(1), **common,
                                                         SPLITS=splits, num_warps=4)
    return out
