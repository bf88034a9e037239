"""Triton grouped shrink: z[t] = stack[slot[t]] @ x[t], reading each distinct slot's core once per tile.

Semantics: exactly `adapters.ops.shrink_reference`. Tokens arrive sorted by slot and cut into
tiles of one slot each (computed on the host once per step, see SlotIndex); one program owns one
tile and one block of r, loads that block of the core once and multiplies it with the tile's
tokens. In a decode step each adapter's tokens fit in one tile, so each distinct core is read once.
The grid is fixed by the number of tokens (programs past the last tile exit at once), and ranks
come from a per-slot tensor, so CUDA graphs can capture it and replay it for any slot mapping.
Base-model tokens (slot -1) get tiles too, and rows past an adapter's rank are written as zeros,
so z needs no separate clearing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_shrink_kernel(
    x_ptr, stack_ptr, z_ptr, token_order_ptr, tile_start_ptr, tile_end_ptr, tile_slot_ptr, num_tiles_ptr,
    slot_rank_ptr, rank_max, stride_x, stride_stack_slot, stride_stack_r, stride_z, IN_FEATURES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
):
    tile = tl.program_id(0)
    r_block = tl.program_id(1)
    k_first = tl.program_id(2) * K_PER_SPLIT
    if tile >= tl.load(num_tiles_ptr):
        return
    slot = tl.load(tile_slot_ptr + tile)
    rank = tl.load(slot_rank_ptr + tl.maximum(slot, 0))
    rank = tl.where(slot < 0, 0, rank)
    offs_t = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_T)
    mask_t = offs_t < tl.load(tile_end_ptr + tile)
    tokens = tl.load(token_order_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < rank
    core = stack_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_stack_slot
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    has_rows = r_block * BLOCK_R < rank  # else: store zeros (split-K: z starts zeroed)
    if has_rows:
        for k_step in range(0, K_PER_SPLIT, BLOCK_K):
            k0 = k_first + k_step
            mask_k = k0 + offs_k < IN_FEATURES
            x_tile = tl.load(x_ptr + tokens[:, None] * stride_x + (k0 + offs_k)[None, :],
                             mask=mask_t[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
            core_tile = tl.load(core + offs_r[None, :] * stride_stack_r + (k0 + offs_k)[:, None],
                                mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
            acc += tl.dot(x_tile, core_tile, input_precision=PRECISION)
    z_tile = z_ptr + tokens[:, None] * stride_z + offs_r[None, :]
    if SPLIT_K == 1:
        tl.store(z_tile, acc.to(z_ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_r < rank_max)[None, :])
    elif has_rows:
        tl.atomic_add(z_tile, acc, mask=mask_t[:, None] & mask_r[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs (Triton would use tf32); the native mode otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class ShrinkConfig:
    block_r: int = 16
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    """> 1 splits in_features over programs (more parallelism for small r) and sums with fp32 atomics."""


def default_config(num_tokens: int, rank_max: int, in_features: int = 4096) -> ShrinkConfig:
    """Chosen from bench/kernels_bench.py --sweep on an H100 (CUDA-graph timings): small ranks need more
    parallelism (split-K), large ranks are bandwidth-bound on the cores, long prefills split K too."""
    if rank_max <= 64:
        return ShrinkConfig(block_r=16 if rank_max <= 16 else 32, block_k=256 if in_features <= 8192 else 128,
                            split_k=4 if in_features > 8192 or num_tokens <= 32 else 1)
    return ShrinkConfig(block_r=32, block_k=128, split_k=4 if num_tokens > 256 else 1)


def grouped_shrink(x: torch.Tensor, stack: torch.Tensor, slot_rank: torch.Tensor, groups,
                   config: ShrinkConfig | None = None) -> torch.Tensor:
    """x [T, in], stack [S, R, in], slot_rank [S] int32, groups: the step's SlotIndex -> z [T, R]."""
    num_tokens, in_features = x.shape
    rank_max = stack.shape[1]
    cfg = config or default_config(num_tokens, rank_max, in_features)
    k_per_split = triton.cdiv(triton.cdiv(in_features, cfg.split_k), cfg.block_k) * cfg.block_k
    if cfg.split_k == 1:
        z = torch.empty(num_tokens, rank_max, dtype=x.dtype, device=x.device)
    else:
        z = torch.zeros(num_tokens, rank_max, dtype=torch.float32, device=x.device)
    grid = (num_tokens, triton.cdiv(rank_max, cfg.block_r), cfg.split_k)
    _grouped_shrink_kernel[grid](
        x, stack, z, groups.token_order, groups.tile_start, groups.tile_end, groups.tile_slot, groups.num_tiles,
        slot_rank, rank_max, x.stride(0), stack.stride(0), stack.stride(1), z.stride(0), IN_FEATURES=in_features,
        BLOCK_T=groups.tile_tokens, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, PRECISION=dot_precision(x.dtype),
        SPLIT_K=cfg.split_k, K_PER_SPLIT=k_per_split, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return z if cfg.split_k == 1 else z.to(x.dtype)
