"""Triton grouped expand: `y += M[slot] z` for the tokens of each adapter slot, in place in the GEMM output.

Semantics: exactly `adapters.ops.expand_reference`. The adapted layers' GEMM `[W0; P] @ x` writes
[y0 | z] per token (for up to three layers sharing the input, [y0_1 y0_2 y0_3 | z_1 z_2 z_3]); these
kernels add each token's M[slot] z into its y0 columns. SlotIndex picks tiles or tokens per step:
- tiles: tokens sorted by slot and cut into tiles of one slot each (on the host, once per step); a program
  takes a tile and a block of output columns, loads that block of the slot's M once and multiplies it with
  the tile's z's on the tensor cores. Best where slots have several tokens (prefill, or a decode step over a
  few adapters). `_expand_pages_kernel` runs them (`y^T += M z^T` a page at a time: each M block one
  contiguous, unmasked piece), and on servers above PER_TOKEN_MAX_RANK it takes the per-token steps too, a
  tile a slot; `_expand_kernel` (z as the left operand, K blocks gathered from several pages) is the older
  form, kept for pages under 16 columns and PICA_EXPAND_KERNEL=classic.
- per token (`_expand_token_kernel`): a program per token and column block, a matrix-vector product on
  the CUDA cores, needing no grouping of tokens by slot. Best where a decode step spreads over many
  adapters of small rank (64 tokens on 64 adapters r=32 on the H200). On servers of rank >= SPLIT_FROM_RANK
  it runs as two launches by token rank (`rank_buckets`).
All read M through the slot's row of the page table (adapters.rank_pages). In the older two a K block of
BLOCK_K columns is BLOCK_K / PAGE pages, loaded as [.., pages, PAGE] so each page's columns stay one vector
load (a flat gather of columns loads element by element: 64 x r=256 1199 tok/s that way, 2682 this way); the
page kernel reads one page a step (3647 tok/s there, bench/results/decode-llama3-8b-h200-pages.json). Base-model tokens
(slot -1) exit at once and columns past a slot's rank load nothing: y0 is already their answer. Grids depend
only on the number of tokens, and ranks and pages come from tensors, so a CUDA graph captured for a kind of
step replays for any slot mapping of that kind. Block shapes come from
`expand_configs.json`, measured per device by `bench/kernels_bench.py --tune` (the page kernel's by `--pages`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from adapters.rank_pages import PagedStack


@triton.jit
def tile_tokens(tile, last_tile, num_tiles_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, BLOCK_T: tl.constexpr):
    """A tile program's slot, token offsets (into SlotIndex.token_order) and their mask, in one round of loads; idle:
    the program has nothing to do (past the step's tiles, whose count is on the device, or the base model's)."""
    index = tl.minimum(tile, last_tile)
    slot = tl.load(tile_slot_ptr + index)
    offs_t = tl.load(tile_start_ptr + index) + tl.arange(0, BLOCK_T)
    mask_t = offs_t < tl.load(tile_end_ptr + index)
    idle = (tile >= tl.load(num_tiles_ptr)) | (slot < 0)
    return slot, offs_t, mask_t, idle


@triton.jit
def _expand_kernel(out_ptr, pool_ptr, ranks_ptr, signs_ptr, table_ptr, token_order_ptr, tile_start_ptr, tile_end_ptr,
                   tile_slot_ptr, num_tiles_ptr, last_tile, layer, stride_out, stride_pool_p, stride_pool_n,
                   stride_ranks_m, stride_signs_p, stride_signs_l, stride_table,
                   NUM_OUT: tl.constexpr, RANK: tl.constexpr, PAGE: tl.constexpr, BOUND1: tl.constexpr,
                   BOUND2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    member = (n0 >= BOUND1).to(tl.int32) + (n0 >= BOUND2).to(tl.int32)  # a block never straddles two members
    # the tile's count, slot and bounds in one round of loads, then its rank, rows and pages in one: at decode
    # sizes a program's time is mostly this chain (6 dependent loads before: 4.7 vs 4.4 us, kernels-sweep-h200.json)
    slot, offs_t, mask_t, idle = tile_tokens(tile, last_tile, num_tiles_ptr, tile_slot_ptr, tile_start_ptr,
                                             tile_end_ptr, BLOCK_T)
    if idle:
        return
    rank = tl.load(ranks_ptr + member * stride_ranks_m + slot)  # rank 0: the masks load nothing, y += 0
    rows = tl.load(token_order_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NUM_OUT
    z_ptrs = out_ptr + rows[:, None] * stride_out + (NUM_OUT + member * RANK)
    # a K block is BLOCK_K // PAGE pages of PAGE columns: loaded as [.., pages, PAGE], the last axis contiguous in
    # memory, so the compiler keeps vector loads (a flat gather of columns loads element by element)
    offs_j = tl.arange(0, BLOCK_K // PAGE)
    offs_i = tl.arange(0, PAGE)
    pages_ptr = table_ptr + slot.to(tl.int64) * stride_table
    m_ptrs = pool_ptr + offs_n[:, None, None].to(tl.int64) * stride_pool_n + offs_i[None, None, :]
    sign_ptrs = signs_ptr + layer * stride_signs_l + member * PAGE + offs_i[None, :]
    y_ptrs = out_ptr + rows[:, None] * stride_out + offs_n[None, :]
    mask = mask_t[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask)  # issued with the first M and z loads, not after the dots: one round trip less
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, RANK, BLOCK_K):  # a fixed bound (pipelined); blocks past the slot's rank load nothing
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < rank
        block_pages = k0 // PAGE + offs_j
        page = tl.load(pages_ptr + block_pages, mask=block_pages * PAGE < RANK, other=0).to(tl.int64)  # needs no rank
        mask_paged = (k0 + offs_j[:, None] * PAGE + offs_i[None, :]) < rank  # mask_k as [pages, PAGE]
        z = tl.load(z_ptrs + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        signs = tl.load(sign_ptrs + page[:, None] * stride_signs_p, mask=mask_paged, other=0.0)
        z = z * tl.reshape(signs, (BLOCK_K,))[None, :]  # the layer's diagonal core (+-1)
        m = tl.load(m_ptrs + (page * stride_pool_p)[None, :, None], mask=mask_n[:, None, None] & mask_paged[None, :, :],
                    other=0.0)
        acc += tl.dot(z, tl.trans(tl.reshape(m, (BLOCK_N, BLOCK_K))), input_precision=PRECISION)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


@triton.jit
def _expand_token_kernel(out_ptr, pool_ptr, signs_ptr, table_ptr, token_slots_ptr, token_ranks_ptr, layer, stride_out,
                         stride_pool_p, stride_pool_n, stride_signs_p, stride_signs_l, stride_table,
                         NUM_OUT: tl.constexpr, RANK: tl.constexpr, PAGE: tl.constexpr, BOUND1: tl.constexpr,
                         BOUND2: tl.constexpr, RANK_LO: tl.constexpr, RANK_HI: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """A program per token and block of output columns: a matrix-vector product on the CUDA cores. Its slot,
    rank, y and z need only the token's index, so they load in one round, its pages in the next and M in the
    last (the tile kernel needs as many); tokens of one slot read the same M block, the second time from L2.
    A launch serves the tokens of rank in (RANK_LO, RANK_HI] (the last launch, RANK_HI = RANK, every rank above
    RANK_LO) and runs RANK_HI columns; the others exit after their first loads."""
    token = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    member = (n0 >= BOUND1).to(tl.int32) + (n0 >= BOUND2).to(tl.int32)
    slot = tl.load(token_slots_ptr + token)
    rank = tl.load(token_ranks_ptr + token)  # the widest rank of the slot: past a group's own rank M is zero
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NUM_OUT
    y_ptrs = out_ptr + token * stride_out + offs_n
    y = tl.load(y_ptrs, mask=mask_n)
    if (slot < 0) | (rank <= RANK_LO) | ((rank > RANK_HI) & (RANK_HI < RANK)):
        return
    z_ptr = out_ptr + token * stride_out + NUM_OUT + member * RANK
    offs_j = tl.arange(0, BLOCK_K // PAGE)  # K blocks as [pages, PAGE], as in the tile kernel
    offs_i = tl.arange(0, PAGE)
    pages_ptr = table_ptr + slot * stride_table
    sign_ptrs = signs_ptr + layer * stride_signs_l + member * PAGE + offs_i[None, :]
    m_ptrs = pool_ptr + offs_n[:, None, None].to(tl.int64) * stride_pool_n + offs_i[None, None, :]
    # a fixed, unrolled bound: every block's loads issue at once (a loop to the token's own rank serializes them:
    # 64 x r=256 2105 vs 2682 tok/s, though r=8 tokens on that server then ran 5339 vs 3693, decode-*-paged-*.json)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    own_rank = tl.minimum(rank, RANK_HI)
    for k0 in tl.static_range(0, RANK_HI, BLOCK_K):
        block_pages = k0 // PAGE + offs_j
        mask_paged = (k0 + offs_j[:, None] * PAGE + offs_i[None, :]) < own_rank
        page = tl.load(pages_ptr + block_pages, mask=block_pages * PAGE < own_rank, other=0).to(tl.int64)
        z = tl.load(z_ptr + k0 + offs_j[:, None] * PAGE + offs_i[None, :], mask=mask_paged, other=0.0).to(tl.float32)
        z = z * tl.load(sign_ptrs + page[:, None] * stride_signs_p, mask=mask_paged, other=0.0).to(tl.float32)
        m = tl.load(m_ptrs + (page * stride_pool_p)[None, :, None], mask=mask_n[:, None, None] & mask_paged[None, :, :],
                    other=0.0)
        acc += tl.sum(tl.sum(m.to(tl.float32) * z[None, :, :], axis=2), axis=1)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask_n)


@triton.jit
def _expand_pages_kernel(out_ptr, pool_ptr, ranks_ptr, signs_ptr, table_ptr, token_order_ptr, tile_start_ptr,
                         tile_end_ptr, tile_slot_ptr, num_tiles_ptr, last_tile, layer, stride_out, stride_pool_p,
                         stride_pool_n, stride_ranks_m, stride_signs_p, stride_signs_l, stride_table,
                         NUM_OUT: tl.constexpr, RANK: tl.constexpr, PAGE: tl.constexpr, BOUND1: tl.constexpr,
                         BOUND2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_STAGES: tl.constexpr, UNROLL: tl.constexpr, PRECISION: tl.constexpr):
    """The tiles of `_expand_kernel` with M as the left operand, `y^T += M z^T`, a page a step: a step's M block
    [BLOCK_N, PAGE] is one contiguous piece of the pool and needs no mask on its columns (a slot's pages hold
    zeros past its rank), so it streams as plain vector loads, pipelined over a loop that stops at the slot's
    own rank, and the product runs on the tensor cores whatever the tile's token count (one token: z^T is a
    [PAGE, BLOCK_T] block with one live column). UNROLL: every page of the widest rank RANK in straight code, the
    pages past the slot's rank masked, so all loads issue at once (for small RANK, where a pipelined loop of one
    or two steps is mostly its prologue)."""
    tile = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    member = (n0 >= BOUND1).to(tl.int32) + (n0 >= BOUND2).to(tl.int32)
    slot, offs_t, mask_t, idle = tile_tokens(tile, last_tile, num_tiles_ptr, tile_slot_ptr, tile_start_ptr,
                                             tile_end_ptr, BLOCK_T)
    if idle:
        return
    rank = tl.load(ranks_ptr + member * stride_ranks_m + slot)
    rows = tl.load(token_order_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NUM_OUT
    offs_i = tl.arange(0, PAGE)
    y_ptrs = out_ptr + rows[None, :] * stride_out + offs_n[:, None]
    mask = mask_n[:, None] & mask_t[None, :]
    if BLOCK_T <= 16:  # decode-sized tiles: y's load goes out with the first ones (a larger y block would spill)
        y = tl.load(y_ptrs, mask=mask)
    z_ptrs = out_ptr + rows[None, :] * stride_out + (NUM_OUT + member * RANK) + offs_i[:, None]
    m_ptrs = pool_ptr + offs_n[:, None].to(tl.int64) * stride_pool_n + offs_i[None, :]
    sign_ptrs = signs_ptr + layer * stride_signs_l + member * PAGE + offs_i
    pages_ptr = table_ptr + slot.to(tl.int64) * stride_table
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    if UNROLL:
        for j in tl.static_range(0, (RANK + PAGE - 1) // PAGE):
            live = j * PAGE < rank
            page = tl.load(pages_ptr + j, mask=live, other=0).to(tl.int64)
            mask_k = (j * PAGE + offs_i < RANK) & live
            z = tl.load(z_ptrs + j * PAGE, mask=mask_k[:, None] & mask_t[None, :], other=0.0)
            z = z * tl.load(sign_ptrs + page * stride_signs_p, mask=mask_k, other=0.0)[:, None]
            m = tl.load(m_ptrs + page * stride_pool_p, mask=mask_n[:, None] & live, other=0.0)
            acc += tl.dot(m, z, input_precision=PRECISION)
    else:
        for j in tl.range(0, tl.cdiv(tl.minimum(rank, RANK), PAGE), num_stages=NUM_STAGES):  # never past R's z
            page = tl.load(pages_ptr + j).to(tl.int64)
            mask_k = j * PAGE + offs_i < RANK  # a page past the z columns (RANK not a multiple of PAGE) reads none
            z = tl.load(z_ptrs + j * PAGE, mask=mask_k[:, None] & mask_t[None, :], other=0.0)
            z = z * tl.load(sign_ptrs + page * stride_signs_p, mask=mask_k, other=0.0)[:, None]
            m = tl.load(m_ptrs + page * stride_pool_p, mask=mask_n[:, None], other=0.0)
            acc += tl.dot(m, z, input_precision=PRECISION)
    if BLOCK_T > 16:
        y = tl.load(y_ptrs, mask=mask)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


RANK_SPLIT = 32
SPLIT_FROM_RANK = 128
"""On servers of rank >= SPLIT_FROM_RANK the per-token expand runs as two launches, tokens of rank <= RANK_SPLIT
and the rest, so an r=8 or r=32 token pays for 32 columns' instructions, not the widest rank's (the kernel is
bound by issue there: a masked block costs nearly what a loaded one does). A token exits the other launch after
its first loads. H200, 64 tokens of ranks 8/32/256 on a rank-256 server: gate/up 157 vs 295 us; all r=256: 379
vs 374 us (kernels-rank-split-h200.json)."""


def rank_buckets(rank: int, split: int | None = None) -> list[tuple[int, int]]:
    """(lo, hi] rank ranges of the per-token launches for z columns of width `rank` (split: RANK_SPLIT's
    override, 0 for one launch)."""
    split = (RANK_SPLIT if rank >= SPLIT_FROM_RANK else 0) if split is None else split
    return [(0, split), (split, rank)] if 0 < split < rank else [(0, rank)]


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs (Triton would use tf32); the native mode otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class ExpandConfig:
    block_n: int = 128
    """Output columns per program (a divisor of every member boundary, so no block straddles two)."""
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    per_token: bool = False
    """A program per token (_expand_token_kernel) instead of per tile of one slot's tokens (tensor-core dots)."""
    pages: bool = False
    """The tiles through `_expand_pages_kernel` (M the left operand, a page a step; block_k unused), for every
    step the config serves, per_token steps too (then per_token is False)."""
    unroll: bool = False
    """With pages: the page loop unrolled over the widest rank (_expand_pages_kernel's UNROLL)."""


def default_config(rank: int, bounds: list[int], per_token: bool = False) -> ExpandConfig:
    """Tiles: 128 columns where the bounds allow, K blocks of up to 64. Per token: 64 columns, two warps. The
    rules on devices the tuned table does not name (the H200's best at 8 and 64 adapters, kernels-h200.json)."""
    inner = bounds[1:-1]
    block_n = 64 if per_token else 128
    while block_n > 16 and inner and math.gcd(*inner) % block_n:
        block_n //= 2
    block_k = max(16, min(64, triton.next_power_of_2(rank)))
    return ExpandConfig(block_n=block_n, block_k=block_k, num_warps=2 if per_token else 4, per_token=per_token)


TUNED_CONFIGS = Path(__file__).with_name("expand_configs.json")
"""The configs `bench/kernels_bench.py --tune` measured fastest, per device name and shape key
(`config_key`); PICA_EXPAND_CONFIGS names another such file (the tuning run's own, before it is committed)."""


def config_key(num_out: int, rank: int, tile_tokens: int, per_token: bool, pages: bool = False) -> str:
    return f"out{num_out}-r{rank}-t{tile_tokens}-{'pages' if pages else 'tokens' if per_token else 'tiles'}"


PAGES_KERNEL = os.environ.get("PICA_EXPAND_KERNEL", "pages") == "pages"
"""The tiles run `_expand_pages_kernel` wherever pages are of 16 columns or more; PICA_EXPAND_KERNEL=classic keeps
`_expand_kernel` (the benchmarks' A/B switch)."""
PER_TOKEN_MAX_RANK = 32
"""Steps the per-token kernel suits (SlotIndex.prefers_per_token) keep it on servers of rank <= this; above it the
page kernel's tiles take them, one tile a slot. H200, 64 tokens (kernels-pages-h200.json): on 64 adapters r=32
gate/up 37.6 us per token against 45.4 in pages (two pages a program: too short a loop), r=256 379 against 229,
on 25 adapters r=256 356 against 96 (a slot's tokens share its M loads in a tile). Measured and not kept: the
tokens of rank <= 32 to the per-token kernel beside the tiles (mixed ranks 8/32/256: gate/up 105.3 against 104.7
us, every other shape slower), and the page kernel as a programmatic dependent launch after the GEMM (GEMM +
expand within 1 us either way: the GEMM does not let it start early), kernels-{pages-split,pdl}-h200.json."""


@functools.lru_cache(maxsize=None)
def pages_config(device_name: str, rank: int, bounds: tuple[int, ...], tile_tokens: int) -> ExpandConfig:
    """The page kernel's tuned config for this shape, else 128 columns (or the bounds' largest divisor below), the
    loop unrolled up to rank 32 and pipelined in 3 stages above (the H200's picks on its shapes), 4 warps for
    decode-sized tiles and 8 for larger ones (4 spill there: tests/adapters/expand_kernel_compile.py)."""
    table = tuned_configs(os.environ.get("PICA_EXPAND_CONFIGS", str(TUNED_CONFIGS))).get(device_name, {})
    tuned = table.get(config_key(bounds[-1], rank, tile_tokens, False, pages=True))
    if tuned is not None and all(b % tuned["block_n"] == 0 for b in bounds[1:-1]):
        return ExpandConfig(**tuned)
    block_n = 128
    while block_n > 16 and any(b % block_n for b in bounds[1:-1]):
        block_n //= 2
    return ExpandConfig(block_n=block_n, block_k=16, num_warps=4 if tile_tokens <= 16 else 8, num_stages=3,
                        pages=True, unroll=rank <= 32)


@functools.lru_cache(maxsize=None)
def tuned_configs(path: str) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


@functools.lru_cache(maxsize=None)
def pick_config(device_name: str, rank: int, bounds: tuple[int, ...], tile_tokens: int, per_token: bool) -> ExpandConfig:
    """The tuned config of this kernel for this device and shape where there is one that fits these bounds, else
    the default."""
    table = tuned_configs(os.environ.get("PICA_EXPAND_CONFIGS", str(TUNED_CONFIGS))).get(device_name, {})
    tuned = table.get(config_key(bounds[-1], rank, tile_tokens, per_token))
    if tuned is not None:
        cfg = ExpandConfig(**tuned)
        if (cfg.per_token == per_token and all(b % cfg.block_n == 0 for b in bounds[1:-1])
                and cfg.block_k <= max(16, triton.next_power_of_2(rank))):
            return cfg
    return default_config(rank, list(bounds), per_token)


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def expand_grouped(y0z: torch.Tensor, paged: PagedStack, layer: int, bounds: list[int], groups,
                   config: ExpandConfig | None = None, split: int | None = None) -> torch.Tensor:
    """y0z [T, num_out + M*R] (row-major), paged: the members' pooled M's (pool rows contiguous), layer: the row
    of signs to use, bounds: the M members' column bounds, groups: the step's SlotIndex -> y0z[:, :num_out],
    updated. split: the per-token path's rank split (rank_buckets; None: the rule, 0: one launch). A split step
    (SlotIndex.split) runs the tiles of its large slots, then the per-token kernel over the rest. config: one
    kernel's config for every launch (tests, benchmarks); else the tuned ones, the page kernel's for the tiles
    (and for per-token steps above PER_TOKEN_MAX_RANK)."""
    pool, signs, ranks, table = paged.pool, paged.signs, paged.ranks, paged.page_table
    num_members, num_out, rank, page = len(bounds) - 1, bounds[-1], paged.rank, paged.page
    assert num_members <= 3 and y0z.shape[1] == num_out + num_members * rank and y0z.stride(1) == 1
    assert pool.shape[1] == num_out and pool.stride(2) == 1 and ranks.shape[0] == num_members
    assert signs.shape[2] == num_members * page and signs.stride(2) == 1 and 0 <= layer < signs.shape[1]
    assert table.shape[1] * page >= rank and table.stride(1) == 1
    name = device_name(y0z.device)
    pick = lambda r, per_token: pick_config(name, r, tuple(bounds), groups.tile_tokens, per_token)  # noqa: E731
    cfg = config or pick(rank, groups.per_token)
    if (config is None and PAGES_KERNEL and page >= 16
            and (not groups.per_token or groups.split or rank > PER_TOKEN_MAX_RANK)):
        cfg = pages_config(name, rank, tuple(bounds), groups.tile_tokens)  # split steps: for their tiles
    tile_cfg = token_cfg = None
    if cfg.pages and not groups.split:  # the tiles cover every slot
        tile_cfg = cfg
    elif groups.split:  # both kernels, each with its own config
        tile_cfg, token_cfg = (pick(rank, False), cfg) if cfg.per_token else (cfg, pick(rank, True))
    elif cfg.per_token:
        token_cfg = cfg
    else:
        tile_cfg = cfg
    bound1 = bounds[1] if num_members > 1 else num_out
    bound2 = bounds[2] if num_members > 2 else num_out
    if tile_cfg is not None:
        assert all(b % tile_cfg.block_n == 0 for b in bounds[1:-1])
        _expand_tiles(y0z, paged, layer, groups, tile_cfg, num_out, bound1, bound2)
    if token_cfg is not None:
        for lo, hi in rank_buckets(rank, split):
            part = token_cfg if hi == rank or config is not None else pick(hi, True)
            assert all(b % part.block_n == 0 for b in bounds[1:-1])
            _expand_token_kernel[(y0z.shape[0], triton.cdiv(num_out, part.block_n))](
                y0z, pool, signs, table, groups.token_slots, groups.expand_token_ranks, layer, y0z.stride(0),
                pool.stride(0), pool.stride(1), signs.stride(0), signs.stride(1), table.stride(0), NUM_OUT=num_out,
                RANK=rank, PAGE=page, BOUND1=bound1, BOUND2=bound2, RANK_LO=lo, RANK_HI=hi, BLOCK_N=part.block_n,
                BLOCK_K=max(page, min(part.block_k, triton.next_power_of_2(hi))),
                num_warps=part.num_warps, num_stages=part.num_stages,
            )
    return y0z[:, :num_out]


def _expand_tiles(y0z: torch.Tensor, paged: PagedStack, layer: int, groups, cfg: ExpandConfig, num_out: int,
                  bound1: int, bound2: int) -> None:
    """The step's tiles through the page kernel or, without cfg.pages, the older tile kernel. A graph being captured
    replays for any slot mapping: its grid covers the most tiles; else the step's own."""
    pool, signs, ranks, table = paged.pool, paged.signs, paged.ranks, paged.page_table
    capturing = y0z.is_cuda and torch.cuda.is_current_stream_capturing()
    every_slot = cfg.pages and groups.per_token  # the page kernel's tiles serve per-token steps too
    num_tiles = groups.max_tiles(y0z.shape[0], ranks.shape[1], every_slot) if capturing else groups.num_tiles_host
    if num_tiles == 0 and not capturing:
        return
    grid = (max(num_tiles, 1), triton.cdiv(num_out, cfg.block_n))
    args = (y0z, pool, ranks, signs, table, groups.token_order, groups.tile_start, groups.tile_end, groups.tile_slot,
            groups.num_tiles, groups.max_tokens - 1, layer, y0z.stride(0), pool.stride(0), pool.stride(1),
            ranks.stride(0), signs.stride(0), signs.stride(1), table.stride(0))
    shape = dict(NUM_OUT=num_out, RANK=paged.rank, PAGE=paged.page, BOUND1=bound1, BOUND2=bound2,
                 BLOCK_T=groups.tile_tokens, BLOCK_N=cfg.block_n, PRECISION=dot_precision(y0z.dtype),
                 num_warps=cfg.num_warps)
    if cfg.pages:  # the loop's stages are its own (tl.range), not the launch's
        assert paged.page >= 16, "the page kernel's dots need pages of 16 columns or more"
        _expand_pages_kernel[grid](*args, **shape, NUM_STAGES=cfg.num_stages, UNROLL=cfg.unroll)
    else:
        _expand_kernel[grid](*args, **shape, BLOCK_K=max(paged.page, cfg.block_k), num_stages=cfg.num_stages)
