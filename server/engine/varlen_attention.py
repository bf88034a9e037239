"""Triton paged attention for steps with prompts: any number of query tokens per sequence (prompt chunks and
decodes in one step) against the paged KV cache, in one launch per layer.

Semantics: for each step token t of sequence s at absolute position p_t, and query head h (kv head
h // (H / Hkv)),
    out[t, h] = softmax(softcap(q[t, h] . K_s^T * scale) masked to positions n with
                max(0, p_t - window) < n + 1 <= p_t + 1) @ V_s
where K_s / V_s are sequence s's cache rows, found through its block table (the step's own K/V already
written). The host cuts each sequence's queries into tiles of at most BLOCK_M consecutive tokens; one program
handles one tile and one kv head, all its query heads at once, so each K/V block is read once per tile. The
padded-SDPA path it replaces gathered every sequence's context per layer and padded queries to the longest
chunk: about 0.8 ms of host per layer on the H200 (bench/results/prefill-steps-h200-piecewise.cprofile.txt).
The reference is `attention_reference` per sequence (server/engine/attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapters.expand_kernel import dot_precision
from server.engine.decode_attention import online_softmax_block
from server.engine.attention import VARLEN_BLOCK_M as BLOCK_M

@triton.jit(do_not_specialize=["num_tiles", "stride_bt", "stride_tiles"])  # they change every step: no recompiles
def _paged_varlen_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tiles_ptr, block_tables_ptr, num_tiles, scale, softcap,
    stride_q_t, stride_q_h, stride_kv_slot, stride_kv_h, stride_o_t, stride_o_h, stride_bt, stride_tiles,
    QUERIES_PER_KV: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    if tile < num_tiles:
        seq = tl.load(tiles_ptr + tile)
        row0 = tl.load(tiles_ptr + stride_tiles + tile)
        count = tl.load(tiles_ptr + 2 * stride_tiles + tile)
        pos0 = tl.load(tiles_ptr + 3 * stride_tiles + tile)
        offs_r = tl.arange(0, BLOCK_M * GROUP_PAD)  # row r: token r // GROUP_PAD, head r % GROUP_PAD of the group
        token = offs_r // GROUP_PAD
        group = offs_r % GROUP_PAD
        mask_r = (token < count) & (group < QUERIES_PER_KV)
        heads = kv_head * QUERIES_PER_KV + group
        offs_d = tl.arange(0, HEAD_PAD)
        mask_d = offs_d < HEAD_DIM
        rows = (row0 + token).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :],
                    mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        qpos = pos0 + token
        end = pos0 + count  # keys at positions < end
        m = tl.full((BLOCK_M * GROUP_PAD,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_M * GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M * GROUP_PAD, HEAD_PAD), dtype=tl.float32)
        n0 = end * 0
        if WINDOW > 0:
            n0 = tl.maximum(pos0 - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        while n0 < end:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            blocks = tl.load(block_tables_ptr + seq * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
            slots = blocks.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
            kv_offsets = slots[:, None] * stride_kv_slot + kv_head * stride_kv_h + offs_d[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, D]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [rows, BLOCK_N]
            if USE_SOFTCAP:
                s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1)  # softcap * tanh(s / softcap)
            allowed = mask_n[None, :] & (offs_n[None, :] <= qpos[:, None])
            if WINDOW > 0:
                allowed = allowed & (qpos[:, None] - offs_n[None, :] < WINDOW)
            s = tl.where(allowed, s, float("-inf"))
            v = tl.load(v_ptr + kv_offsets, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            m, l, acc = online_softmax_block(s, v, m, l, acc, PRECISION)  # a row with no key yet stays 0
            n0 += BLOCK_N
        out = acc / l[:, None]
        tl.store(out_ptr + rows[:, None] * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


def paged_varlen_attention(q, k_cache, v_cache, tiles, num_tiles: int, block_tables, block_size: int, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] (last dim contiguous), k/v_cache [slots, Hkv, D], tiles int32 [4, >= num_tiles] (plan_tiles),
    block_tables [S, B] int -> out [T, H, D] (rows no tile covers are left unwritten; `out`: written in place)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    per_kv = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tiles == 0:
        return out
    _paged_varlen_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, out, tiles, block_tables, num_tiles, scale, softcap or 1.0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), tiles.stride(0),
        QUERIES_PER_KV=per_kv, GROUP_PAD=triton.next_power_of_2(per_kv), BLOCK_M=BLOCK_M, HEAD_DIM=head_dim,
        HEAD_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        BLOCK_N=max(16, min(64, triton.next_power_of_2(block_size) * 4)), WINDOW=sliding_window or 0,
        USE_SOFTCAP=softcap is not None, PRECISION=dot_precision(q.dtype), num_warps=4,
    )
    return out
