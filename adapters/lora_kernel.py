"""Triton kernels for per-layer factors (LoRA): `y[t] += B[slot_t] (A[slot_t] x[t])`, in place.

Semantics: exactly `adapters.ops.lora_reference` (z kept in float32 between the two products). Two launches, a
shrink `z = A[slot] x` and an expand `y += B[slot] z`, in one of two forms that SlotIndex.per_token picks per step
(the same flag that picks the PiCa expand kernel, so a CUDA graph of either kind holds both consistently):
- per token (`_shrink_token_kernel`, `_expand_token_kernel`): a decode step over many slots. A program per token
  alone would leave most SMs idle (64 programs on 132 SMs, each streaming R * in elements), so the shrink also
  splits the `in` reduction: programs (token, split) each write a float32 partial z, and the expand sums the
  splits as it loads z (a two-pass reduction with the second pass inside the expand's loads; no atomics, so
  results do not depend on timing).
- tiles (`_shrink_tile_kernel`, `_expand_tile_kernel`): SlotIndex's tiles of one slot's tokens (prefill, or a
  decode step over a few slots); a program loads a block of its slot's A (or B) once for the whole tile and
  multiplies on the tensor cores; the shrink splits `in` the same way where the tiles are too few.
Base tokens (slot -1) and slots of rank 0 in this layer (a PiCa or PSOFT slot, or a LoRA that leaves the layer
alone) load nothing, and rows past a slot's own rank (the device `ranks` [S] of the layer) are masked off. Grids
and split counts depend only on the token count (and, for tiles while a graph is captured, on the most tiles a
step can have), never on slot data, so a captured graph replays right for any slot mapping of its kind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from adapters.expand_kernel import dot_precision, tile_tokens


@triton.jit
def _shrink_token_kernel(x_ptr, a_ptr, ranks_ptr, slots_ptr, z_ptr, z_rank_ptr, in_features, k_per_split,
                         stride_x, stride_a_s, stride_a_r, stride_z_split,
                         RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (token, split): z_part[split, token, :rank] = A[slot, :rank, k-range] x[token, k-range]. Split 0
    also writes the token's rank (0 for base tokens), so the expand gets it from the token index alone."""
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), RANK)
    rank = tl.where(slot < 0, 0, rank)
    if split == 0:
        tl.store(z_rank_ptr + token, rank)
    if rank == 0:  # base token, or a slot this layer leaves alone
        return
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    x_row = x_ptr + token * stride_x
    a_rows = a_ptr + slot * stride_a_s + offs_r[:, None].to(tl.int64) * stride_a_r
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        a = tl.load(a_rows + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(z_ptr + split * stride_z_split + token * RANK + offs_r, acc, mask=mask_r)


@triton.jit
def _expand_token_kernel(y_ptr, b_ptr, slots_ptr, z_ptr, z_rank_ptr, num_out, num_splits, stride_y, stride_b_s,
                         stride_b_n, stride_z_split,
                         RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (token, column block): y[token, block] += B[slot, block, :rank] (sum over splits of z_part).
    Slot, rank and y need only the token's index: one round of loads, then z and B in the next."""
    token = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    slot = tl.load(slots_ptr + token)
    rank = tl.load(z_rank_ptr + token)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_out
    y_ptrs = y_ptr + token * stride_y + offs_n
    y = tl.load(y_ptrs, mask=mask_n)
    if rank == 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_s = tl.arange(0, BLOCK_S)
    z_parts = tl.load(z_ptr + offs_s[:, None] * stride_z_split + token * RANK + offs_r[None, :],
                      mask=(offs_s < num_splits)[:, None] & mask_r[None, :], other=0.0)
    z = tl.sum(z_parts, axis=0)  # [BLOCK_R] float32
    b = tl.load(b_ptr + slot * stride_b_s + offs_n[:, None].to(tl.int64) * stride_b_n + offs_r[None, :],
                mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    acc = tl.sum(b.to(tl.float32) * z[None, :], axis=1)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask_n)


@triton.jit
def _shrink_tile_kernel(x_ptr, a_ptr, ranks_ptr, token_order_ptr, tile_start_ptr, tile_end_ptr, tile_slot_ptr,
                        num_tiles_ptr, last_tile, z_ptr, in_features, k_per_split, stride_x, stride_a_s, stride_a_r,
                        stride_z_split,
                        RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Program (tile, split): z_part[split, rows, :rank] = x[rows, k-range] A[slot, :rank, k-range]^T, one dot per
    K block on the tensor cores, the slot's A block loaded once for the tile's tokens."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    slot, offs_t, mask_t, idle = tile_tokens(tile, last_tile, num_tiles_ptr, tile_slot_ptr, tile_start_ptr,
                                             tile_end_ptr, BLOCK_T)
    if idle:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), RANK)
    if rank == 0:
        return
    rows = tl.load(token_order_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    x_rows = x_ptr + rows[:, None] * stride_x
    a_rows = a_ptr + slot.to(tl.int64) * stride_a_s + offs_r[:, None].to(tl.int64) * stride_a_r
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_rows + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_rows + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(a), input_precision=PRECISION)
    tl.store(z_ptr + split * stride_z_split + rows[:, None] * RANK + offs_r[None, :], acc,
             mask=mask_t[:, None] & mask_r[None, :])


@triton.jit
def _expand_tile_kernel(y_ptr, b_ptr, ranks_ptr, token_order_ptr, tile_start_ptr, tile_end_ptr, tile_slot_ptr,
                        num_tiles_ptr, last_tile, z_ptr, num_out, num_splits, stride_y, stride_b_s, stride_b_n,
                        stride_z_split,
                        RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Program (tile, column block): y[rows, block] += z[rows, :rank] B[slot, block, :rank]^T on the tensor cores
    (z, summed over splits in float32, rounded to B's dtype for the dot)."""
    tile = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    slot, offs_t, mask_t, idle = tile_tokens(tile, last_tile, num_tiles_ptr, tile_slot_ptr, tile_start_ptr,
                                             tile_end_ptr, BLOCK_T)
    if idle:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), RANK)
    rows = tl.load(token_order_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    if rank == 0:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_out
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    y_ptrs = y_ptr + rows[:, None] * stride_y + offs_n[None, :]
    mask = mask_t[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_b_s + offs_n[:, None].to(tl.int64) * stride_b_n + offs_r[None, :],
                mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    z_ptrs = z_ptr + rows[:, None] * RANK + offs_r[None, :]
    mask_z = mask_t[:, None] & mask_r[None, :]
    z = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for s in range(num_splits):
        z += tl.load(z_ptrs + s * stride_z_split, mask=mask_z, other=0.0)
    acc = tl.dot(z.to(b.dtype), tl.trans(b), input_precision=PRECISION)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


@dataclass(frozen=True)
class LoraConfig:
    """Block shapes of the four kernels and how far the shrink splits `in` (defaults: default_config)."""

    block_k: int = 128
    """`in` elements per step of either shrink (at least 16 for the tile shrink's dots)."""
    block_n: int = 64
    """Output columns per program of either expand."""
    num_warps: int = 4
    programs_per_sm: int = 4
    """The shrink splits `in` until it has about this many programs per SM (fewer where `in` runs out)."""
    max_splits: int = 16
    """At most this many partial z's per token (the expand sums them per column block: more splits, more reads)."""
    splits: int | None = None
    """A fixed split count instead (tests: several splits on a few tokens)."""


def default_config(rank: int, per_token: bool, tile_tokens: int = 16) -> LoraConfig:
    """Per token: K and column blocks of about 8K and 4K elements of A and B per step (R=16: 512 and 256, R=64: 128
    and 64). Tiles: K blocks of 64 and 128 columns; decode-sized tiles split `in` up to 8 ways (few tiles,
    latency-bound), prefill tiles at most 4 (many tiles already, and every column block of a tile reads each
    partial z). Warps and the R >= 128 blocks keep every kernel within 255 registers without spills on sm_90
    (ptxas via triton.compile, bf16: 4 warps spill at 64-token tiles and at R=256)."""
    block_r = max(16, triton.next_power_of_2(rank))
    wide = block_r >= 128
    if per_token:
        return LoraConfig(block_k=max(32, min(512, 8192 // block_r)), block_n=max(32, min(256, 4096 // block_r)),
                          num_warps=8 if wide else 4)
    return LoraConfig(block_k=32 if wide else 64, block_n=64 if wide else 128,
                      num_warps=8 if wide or tile_tokens > 16 else 4, programs_per_sm=2,
                      max_splits=8 if tile_tokens <= 16 else 4)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; 4 elsewhere (Triton's interpreter), so CPU checks still split `in`."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def split_plan(in_features: int, programs: int, cfg: LoraConfig, sms: int) -> tuple[int, int]:
    """(number of splits, `in` elements per split, a multiple of cfg.block_k) for a shrink of `programs` programs
    before splitting: about cfg.programs_per_sm programs per SM, at most cfg.max_splits, a K block at least each."""
    block_k = cfg.block_k
    k_blocks = triton.cdiv(in_features, block_k)
    want = cfg.splits or triton.cdiv(cfg.programs_per_sm * sms, max(programs, 1))
    splits = max(1, min(want, k_blocks, cfg.splits or cfg.max_splits))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    return triton.cdiv(in_features, k_per_split), k_per_split


def lora_grouped(x: torch.Tensor, y: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, ranks: torch.Tensor,
                 groups, config: LoraConfig | None = None) -> torch.Tensor:
    """x [T, in], y [T, out] (rows may be strided, as a shared GEMM's member columns are), a_stack [S, R, in],
    b_stack [S, out, R], ranks [S] int32 (this layer's rank per slot, on the device), groups: the step's SlotIndex
    -> y, updated in place (float32 accumulation, z kept in float32 between the two products)."""
    num_tokens, in_features = x.shape
    num_out, rank = y.shape[1], a_stack.shape[1]
    assert y.shape[0] == num_tokens and x.stride(1) == 1 and y.stride(1) == 1
    assert a_stack.shape[2] == in_features and a_stack.stride(2) == 1 and b_stack.stride(2) == 1
    assert b_stack.shape[1] == num_out and b_stack.shape[2] == rank and ranks.dtype == torch.int32
    if num_tokens == 0 or rank == 0:
        return y
    per_token = groups.per_token
    cfg = config or default_config(rank, per_token, groups.tile_tokens)
    block_r = max(16, triton.next_power_of_2(rank))
    sms = num_sms(x.device)
    if per_token:
        splits, k_per_split = split_plan(in_features, num_tokens, cfg, sms)
        z = torch.empty(splits, num_tokens, rank, dtype=torch.float32, device=x.device)
        z_rank = torch.empty(num_tokens, dtype=torch.int32, device=x.device)
        slots = groups.token_slots
        _shrink_token_kernel[(num_tokens, splits)](
            x, a_stack, ranks, slots, z, z_rank, in_features, k_per_split, x.stride(0), a_stack.stride(0),
            a_stack.stride(1), z.stride(0), RANK=rank, BLOCK_R=block_r, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
        _expand_token_kernel[(num_tokens, triton.cdiv(num_out, cfg.block_n))](
            y, b_stack, slots, z, z_rank, num_out, splits, y.stride(0), b_stack.stride(0), b_stack.stride(1),
            z.stride(0), RANK=rank, BLOCK_R=block_r, BLOCK_N=cfg.block_n,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=cfg.num_warps)  # 2: no size-1 reduction
        return y
    # a graph being captured replays for any slot mapping: its grid (and so its splits) covers the most tiles
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    num_tiles = max(groups.max_tiles(num_tokens, a_stack.shape[0]) if capturing else groups.num_tiles_host, 1)
    splits, k_per_split = split_plan(in_features, num_tiles, cfg, sms)
    z = torch.empty(splits, num_tokens, rank, dtype=torch.float32, device=x.device)
    tiles = (groups.token_order, groups.tile_start, groups.tile_end, groups.tile_slot, groups.num_tiles,
             groups.max_tokens - 1)
    _shrink_tile_kernel[(num_tiles, splits)](
        x, a_stack, ranks, *tiles, z, in_features, k_per_split, x.stride(0), a_stack.stride(0), a_stack.stride(1),
        z.stride(0), RANK=rank, BLOCK_T=groups.tile_tokens, BLOCK_R=block_r, BLOCK_K=cfg.block_k,
        PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps)
    _expand_tile_kernel[(num_tiles, triton.cdiv(num_out, cfg.block_n))](
        y, b_stack, ranks, *tiles, z, num_out, splits, y.stride(0), b_stack.stride(0), b_stack.stride(1), z.stride(0),
        RANK=rank, BLOCK_T=groups.tile_tokens, BLOCK_R=block_r, BLOCK_N=cfg.block_n,
        PRECISION=dot_precision(b_stack.dtype), num_warps=cfg.num_warps)
    return y
