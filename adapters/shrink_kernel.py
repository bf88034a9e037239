"""Triton shrink that writes each layer's GEMM input `[x | core[slot] @ x]`, for layers sharing x at once.

Semantics: exactly `adapters.ops.concat_inputs_reference`. The adapted layers compute
`y = [W0 | U] @ [x ; z]` in one GEMM (no separate expand kernel), so the shrink writes z next to a
copy of x. Layers that read the same input (q/k/v, gate/up) keep their cores in one stack of M
members and get all their inputs from one launch. Where x is the output of an RMSNorm (q/k/v and
gate/up in a Llama block), the kernel takes the norm's input and weight and normalizes on the way,
so the norm needs no launch of its own. Likewise for a gated MLP's down_proj: the kernel takes the gate
and up projections and computes silu(gate) * up on the way.

Tokens arrive sorted by slot and cut into tiles of one slot each (computed on the host once per
step, see SlotIndex); a program takes a tile and one block of one member's rows, loads that block of
the core once and multiplies it with the tile's tokens, so in a decode step each distinct core is
read once. One more row of programs copies (and normalizes) x a token at a time. The grid is fixed
by the number of tokens and the programs loop over the step's tiles, and ranks come from a per-slot
tensor, so CUDA graphs capture it and replay it for any slot mapping.
Base-model tokens (slot -1) get tiles too, and rows past an adapter's rank are written as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul(gate, up):
    """silu_mul_reference: silu in float32 rounded to the gate's dtype, times up rounded again."""
    g = gate.to(tl.float32)
    h = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (h.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _copy_row(x_row, norm_ptr, up_row, out_row, eps, stride_out_member, IN_FEATURES: tl.constexpr,
              BLOCK: tl.constexpr, NUM_MEMBERS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr):
    """One token's x into every member's input; with NORM, RMSNorm'd exactly as rms_norm_reference
    (float32 statistics, rounded to x's dtype before the weight); with GATED, silu(x) * up."""
    offs = tl.arange(0, BLOCK)
    if NORM:
        squares = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, IN_FEATURES, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < IN_FEATURES, other=0.0).to(tl.float32)
            squares += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / IN_FEATURES + eps)
    for k0 in range(0, IN_FEATURES, BLOCK):
        mask = k0 + offs < IN_FEATURES
        x = tl.load(x_row + k0 + offs, mask=mask)
        if GATED:
            x = _silu_mul(x, tl.load(up_row + k0 + offs, mask=mask))
        if NORM:
            h = (x.to(tl.float32) * rstd).to(x.dtype)
            w = tl.load(norm_ptr + k0 + offs, mask=mask)
            x = (h.to(tl.float32) * w.to(tl.float32)).to(x.dtype)
        for m in range(NUM_MEMBERS):
            tl.store(out_row + m * stride_out_member + k0 + offs, x, mask=mask)


@triton.jit
def _inv_rms(squares, eps, IN_FEATURES: tl.constexpr):
    return 1.0 / tl.sqrt(squares / IN_FEATURES + eps)


@triton.jit
def _store_split(acc, squares, z, mask_z, partials_ptr, counters_ptr, block, split, eps, IN_FEATURES: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, NORM: tl.constexpr):
    """Serial split-K: each split stores its partial sums (of the products, and with NORM of x's squares);
    the last one to arrive adds them up, writes z and re-arms the counter for the next launch (no
    zeroing kernel, no float atomics)."""
    per_split: tl.constexpr = BLOCK_T * (BLOCK_R + 1)
    partials = partials_ptr + block.to(tl.int64) * (SPLIT_K * per_split)
    offs_acc = tl.arange(0, BLOCK_T)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
    offs_squares = BLOCK_T * BLOCK_R + tl.arange(0, BLOCK_T)
    tl.store(partials + split * per_split + offs_acc, acc)
    if NORM:
        tl.store(partials + split * per_split + offs_squares, squares)
    tl.debug_barrier()  # every thread's partial is stored before the counter moves
    if tl.atomic_add(counters_ptr + block, 1, sem="acq_rel") == SPLIT_K - 1:
        total = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        total_squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            total += tl.load(partials + s * per_split + offs_acc, cache_modifier=".cg")
            if NORM:
                total_squares += tl.load(partials + s * per_split + offs_squares, cache_modifier=".cg")
        if NORM:
            total *= _inv_rms(total_squares, eps, IN_FEATURES)[:, None]
        tl.store(z, total.to(z.dtype.element_ty), mask=mask_z)
        tl.atomic_xchg(counters_ptr + block, 0)


@triton.jit
def _shrink_concat_kernel(
    x_ptr, norm_ptr, up_ptr, stack_ptr, ranks_ptr, out_ptr, partials_ptr, counters_ptr, token_order_ptr, tile_start_ptr,
    tile_end_ptr, tile_slot_ptr, num_tiles_ptr, num_tokens, eps, stride_x, stride_stack_slot, stride_ranks_member,
    stride_out_member, stride_out_t, IN_FEATURES: tl.constexpr, RANK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    NUM_MEMBERS: tl.constexpr, COPY_BLOCK: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
    TILE_MAJOR: tl.constexpr,
):
    row_block = tl.program_id(1)
    if TILE_MAJOR:  # tiles on the slowest grid axis
        split, first_tile, tile_step = tl.program_id(0), tl.program_id(2), tl.num_programs(2)
    else:
        split, first_tile, tile_step = tl.program_id(2), tl.program_id(0), tl.num_programs(0)
    if row_block == tl.num_programs(1) - 1:  # the last row block copies x, a token per program
        token = first_tile * SPLIT_K + split
        while token < num_tokens:  # while loops, since Triton's interpreter takes no tensor bounds in range()
            row = token.to(tl.int64) * stride_x
            _copy_row(x_ptr + row, norm_ptr, up_ptr + row, out_ptr + token.to(tl.int64) * stride_out_t, eps,
                      stride_out_member, IN_FEATURES, COPY_BLOCK, NUM_MEMBERS, NORM, GATED)
            token += tile_step * SPLIT_K
    else:
        blocks_per_member: tl.constexpr = (RANK + BLOCK_R - 1) // BLOCK_R
        member = row_block // blocks_per_member
        row0 = (row_block % blocks_per_member) * BLOCK_R
        offs_r = row0 + tl.arange(0, BLOCK_R)
        offs_k = split * K_PER_SPLIT + tl.arange(0, BLOCK_K)
        tile = first_tile
        num_tiles = tl.load(num_tiles_ptr)
        while tile < num_tiles:
            offs_t = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_T)
            mask_t = offs_t < tl.load(tile_end_ptr + tile)
            tokens = tl.load(token_order_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
            slot = tl.load(tile_slot_ptr + tile)
            rank = tl.load(ranks_ptr + member * stride_ranks_member + tl.maximum(slot, 0))
            rank = tl.where(slot < 0, 0, rank)
            mask_r = offs_r < rank
            core = (stack_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_stack_slot
                    + (member * RANK + offs_r).to(tl.int64)[None, :] * IN_FEATURES)  # rows of this member, [1, BLOCK_R]
            has_rows = row0 < rank
            acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            gram = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # NORM: its diagonal is this split's sum(x^2)
            if has_rows:
                # GATED: the gate and up tiles are loaded an iteration ahead, since arithmetic between a load
                # and the dot keeps the compiler from pipelining that load (in the engine's step: 14 us slower
                # per down_proj shrink than silu·mul apart, 3 us faster with the loads ahead)
                if GATED:
                    x_rows = tokens[:, None] * stride_x + offs_k[None, :]  # [BLOCK_T, BLOCK_K] at k0 = 0
                    mask_x = mask_t[:, None] & (offs_k < IN_FEATURES)[None, :]
                    gate_next = tl.load(x_ptr + x_rows, mask=mask_x, other=0.0)
                    up_next = tl.load(up_ptr + x_rows, mask=mask_x, other=0.0)
                for k0 in range(0, K_PER_SPLIT, BLOCK_K):
                    mask_k = k0 + offs_k < IN_FEATURES
                    if GATED:
                        ahead = (k0 + BLOCK_K < K_PER_SPLIT) & (k0 + BLOCK_K + offs_k < IN_FEATURES)  # next k0's columns
                        gate_tile, up_tile = gate_next, up_next
                        gate_next = tl.load(x_ptr + x_rows + k0 + BLOCK_K, mask=mask_t[:, None] & ahead[None, :],
                                            other=0.0)
                        up_next = tl.load(up_ptr + x_rows + k0 + BLOCK_K, mask=mask_t[:, None] & ahead[None, :],
                                          other=0.0)
                        x_tile = _silu_mul(gate_tile, up_tile)
                    else:
                        x_tile = tl.load(x_ptr + tokens[:, None] * stride_x + (k0 + offs_k)[None, :],
                                         mask=mask_t[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
                    core_tile = tl.load(core + (k0 + offs_k)[:, None], mask=mask_k[:, None] & mask_r[None, :],
                                        other=0.0)  # [BLOCK_K, BLOCK_R]
                    if NORM:  # x @ (w * core) now, times 1/rms(x) once the sums are complete, so that x goes to
                        # the dots as loaded (x normalized in registers made the shrink 2x slower; loading the
                        # core and w an iteration ahead made the step 0.04 ms slower)
                        w = tl.load(norm_ptr + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                        core_tile = (core_tile.to(tl.float32) * w[:, None]).to(core_tile.dtype)
                        gram = tl.dot(x_tile, tl.trans(x_tile), gram, input_precision=PRECISION)
                    acc += tl.dot(x_tile, core_tile, input_precision=PRECISION)
            squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
            if NORM:
                squares = tl.sum(tl.where(tl.arange(0, BLOCK_T)[:, None] == tl.arange(0, BLOCK_T)[None, :], gram, 0.0),
                                 axis=1)
            z = out_ptr + tokens[:, None] * stride_out_t + member * stride_out_member + IN_FEATURES + offs_r[None, :]
            mask_z = mask_t[:, None] & (offs_r < RANK)[None, :]
            if SPLIT_K == 1:
                if NORM:
                    acc *= _inv_rms(squares, eps, IN_FEATURES)[:, None]
                tl.store(z, acc.to(out_ptr.dtype.element_ty), mask=mask_z)
            elif has_rows:
                block = tile * (tl.num_programs(1) - 1) + row_block
                _store_split(acc, squares, z, mask_z, partials_ptr, counters_ptr, block, split, eps, IN_FEATURES,
                             SPLIT_K, BLOCK_T, BLOCK_R, NORM)
            elif split == 0:
                tl.store(z, acc.to(out_ptr.dtype.element_ty), mask=mask_z)  # no rows: zeros
            tile += tile_step


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs (Triton would use tf32); the native mode otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class ShrinkConfig:
    block_r: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    """> 1 splits in_features over programs: more parallelism when few adapters and a small rank leave
    most of the GPU idle (decode). The splits add up their partials through `counters`."""
    tile_programs: int = 0
    """Programs along the tiles, each looping over every tile_programs-th tile; 0: one per possible tile.
    The grid is sized for the worst case (a tile per token), so with few adapters most of those
    programs would only start and exit."""
    tile_major: bool = True
    """Tiles on the slowest grid axis: the programs of a tile are launched together, and programs
    past the step's last tile come last instead of between the busy ones."""


def default_config(num_tokens: int, rank: int, in_features: int = 4096, num_members: int = 1,
                   gated: bool = False) -> ShrinkConfig:
    """Chosen from bench/kernels_bench.py --sweep on an H100 (CUDA-graph timings, kernels-sweep-h100.json):
    small ranks at decode are latency-bound (split-K, programs looping over the few tiles a step has),
    large ranks bandwidth-bound on the cores. gated (silu·mul inside): a program per tile, since its
    gate/up loads are pipelined by hand within a tile only."""
    if num_tokens > 256:
        return ShrinkConfig(block_r=64 if rank >= 64 else 32, block_k=128)
    if rank <= 64:
        return ShrinkConfig(block_r=16 if rank <= 16 else 32, block_k=128, split_k=16 if in_features > 8192 else 8,
                            tile_programs=0 if gated else 16)
    return ShrinkConfig(block_r=32, block_k=256 if num_members > 1 and in_features <= 8192 else 128, tile_major=False)


NORM_INSIDE_MAX_TOKENS = 256
"""Steps up to this many tokens run an RMSNorm feeding the shrink inside it: in the engine's decode step
(shrink-in-situ-h100.json, 8 adapters r=32, batch 64) 9.97 vs 10.03 ms per step. Longer steps run them
apart: the Gram products that give sum(x^2) double the tensor-core work of a 64-token tile
(kernels-h100.json, 2048 tokens: 117 vs 98 us)."""


def counters_size(num_tokens: int, num_members: int, rank: int) -> int:
    """int32 split-K counters a SharedInput keeps (zeroed once; every launch leaves them zero)."""
    return num_tokens * num_members * triton.cdiv(rank, 16)


def shrink_concat(x: torch.Tensor, stack: torch.Tensor, ranks: torch.Tensor, groups, out: torch.Tensor,
                  counters: torch.Tensor, config: ShrinkConfig | None = None,
                  norm: tuple[torch.Tensor, float] | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in], stack [S, M*R, in] (rows contiguous), ranks [M, S] int32, groups: the step's SlotIndex,
    out [M, T, in + R] (written whole), counters: zeroed int32 [>= counters_size(T, M, R)] -> out.
    norm: (weight [in], eps) of an RMSNorm to apply to x first; up: the layers' input is silu(x) * up
    instead of x (see concat_inputs_reference)."""
    num_tokens, in_features = x.shape
    num_members, _, width = out.shape
    rank = width - in_features
    assert stack.stride(2) == 1 and stack.stride(1) == in_features and stack.shape[1] == num_members * rank
    assert out.stride(2) == 1 and ranks.shape[0] == num_members and ranks.stride(1) == 1 and x.stride(1) == 1
    norm_weight, eps = norm if norm is not None else (x, 0.0)  # x: an unread stand-in
    assert norm is None or (eps > 0 and norm_weight.shape == (in_features,) and norm_weight.dtype == out.dtype)
    assert up is None or (norm is None and up.shape == x.shape and up.stride() == x.stride() and up.dtype == x.dtype)
    cfg = config or default_config(num_tokens, rank, in_features, num_members, gated=up is not None)
    blocks = num_members * triton.cdiv(rank, cfg.block_r)
    assert cfg.block_r >= 16 and counters.numel() >= num_tokens * blocks
    k_per_split = triton.cdiv(triton.cdiv(in_features, cfg.split_k), cfg.block_k) * cfg.block_k
    partials = (torch.empty(num_tokens * blocks * cfg.split_k * groups.tile_tokens * (cfg.block_r + 1),
                            dtype=torch.float32, device=x.device) if cfg.split_k > 1 else counters)  # unread otherwise
    tile_programs = min(num_tokens, cfg.tile_programs or num_tokens, 65535)  # a grid's z-size limit
    grid = (cfg.split_k, blocks + 1, tile_programs) if cfg.tile_major else (tile_programs, blocks + 1, cfg.split_k)
    _shrink_concat_kernel[grid](  # blocks + 1: the x copy
        x, norm_weight, x if up is None else up, stack, ranks, out, partials, counters, groups.token_order, groups.tile_start, groups.tile_end,
        groups.tile_slot, groups.num_tiles, num_tokens, eps, x.stride(0), stack.stride(0), ranks.stride(0),
        out.stride(0), out.stride(1), IN_FEATURES=in_features, RANK=rank, BLOCK_T=groups.tile_tokens,
        BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, K_PER_SPLIT=k_per_split,
        NUM_MEMBERS=num_members, COPY_BLOCK=min(triton.next_power_of_2(in_features), 4096), NORM=norm is not None,
        GATED=up is not None, PRECISION=dot_precision(x.dtype), TILE_MAJOR=cfg.tile_major, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
