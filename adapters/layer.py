"""Adapted linear layers: the base model's target linears, wrapped once at load time.

Each adapted layer computes `y = W0 x + M[slot] (P x)` for its token's adapter slot. The shrink
z = P x is the same for every adapter (P is the layer's frozen basis), so it rides in the base GEMM
as extra output rows: `[W0; P] @ x` gives y0 and z at once. The per-adapter part is the expand
`y += M[slot] z` (adapters.ops.expand). Layers that read one input (q/k/v, gate/up of a block)
share one GEMM `[W_q; W_k; W_v; P_q; P_k; P_v] @ x` and one expand launch. The M's of every resident
adapter live in preallocated per-group pools of rank pages (adapters.rank_pages: a slot holds as many
pages as its own rank needs), so activating an adapter is a copy and nothing is re-registered at request
time. The per-token slot index is set once per step (-1 = base model) and shared by every layer.

Methods with per-layer factors (LoRA: W0 + B_l A_l) have their own preallocated stacks per layer,
A [num_slots, R, in] and B [num_slots, out, R] with R = `max_layer_rank` (`--max-lora-rank`; 0 holds
none); each layer's rank per slot is kept on the host and the device (the LoRA kernels stop at it, so a slot
of another method costs no loads). Methods whose E and S are both frozen (PSOFT: W0 + E_l K_l P_l) hold only K
per slot and layer, in per-group core stacks [num_slots, num_layers, R, R] with R = `max_core_rank`
(`--max-psoft-rank`; 0 holds none); E_l = W0_l P_l^T [out, R] is computed once at attach and held by the
layer's GEMM, and z = P_l x is the GEMM's own extra columns (adapters.core_ops). Each slot holds one method's
tensors and zeros in the others' stacks, so a mixed batch runs every token through its own adapter's factors
and nothing else.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.core_ops import core
from adapters.ops import expand, lora
from adapters.rank_pages import PagedStack, page_size_for, pages_for_rank
from adapters.staging import HostStaging
from adapters.targets import find_target_linears, group_of, replace_module, unwrap_modules
from cache.slot_table import BASE_SLOT

RANK_UNKNOWN = 1 << 30
"""A token's rank where the index has no slot ranks (tests, benchmarks): every column of its stack is read."""

DECODE_MAX_TOKENS = 256
"""Steps of at most this many tokens are decode-sized: 16-token tiles, or the per-token kernel."""
TILE_MAX_SLOTS = 16
TILE_MIN_TOKENS = 4
"""At decode sizes the tile kernel serves steps of at most TILE_MAX_SLOTS adapter slots with at least
TILE_MIN_TOKENS tokens each on average (SlotIndex.prefers_per_token); the rest run a program per token."""
SPLIT_MIN_TOKENS = 16
"""In a step with prompts that runs the per-token kernel, the slots with at least this many tokens (a whole tile:
a prompt's chunk) go to the tile kernel instead (SlotIndex.split): per token, 192 prompt tokens of one adapter
read its M 192 times (64 adapters on the H200, 8B shape: such steps took 16.7 against 9.0 ms with no adapter)."""

MAX_SHARED_MEMBERS = 3
"""Layers of one input that share a GEMM and an expand launch (q/k/v); the kernel takes their bounds."""


class SlotIndex:
    """Per-token adapter slot for the current step, shared by every adapted layer.

    Besides `token_slots`, it holds each token's rank (`token_ranks`: the widest rank its slot holds, from
    `slot_ranks` on the host; RANK_UNKNOWN without them) and the step's tokens grouped by slot for the
    grouped expand kernel: `token_order` (token indices sorted by slot) cut into tiles of at most
    `tile_tokens` tokens of one slot each (`tile_start`, `tile_end`, `tile_slot`, `num_tiles`), all in one
    preallocated device buffer, so CUDA graphs captured on it stay valid. `segments` keeps the same
    grouping on the host (one (slot, token indices) per adapter) for the torch path.

    `split` (steps with prompts, where the per-token kernel is picked): the PiCa expand runs both kernels, the
    tiles over the slots of at least SPLIT_MIN_TOKENS tokens only and the per-token kernel over the others
    (`expand_token_ranks` is 0 for the tiled tokens, so the per-token programs skip them); LoRA and PSOFT keep
    the per-token path over every token.
    """

    def __init__(self, max_tokens: int, device: torch.device | str, slot_ranks: np.ndarray | None = None):
        device = torch.device(device)
        self.max_tokens = m = max_tokens
        self.slot_ranks = slot_ranks
        self._slots = torch.full((m,), BASE_SLOT, dtype=torch.long, device=device)
        self._groups = torch.zeros(6 * m + 1, dtype=torch.int32, device=device)
        self._staging = HostStaging(self._groups, device)  # filled with numpy, copied to the device in one go
        (self.token_order, self.tile_start, self.tile_end, self.tile_slot, self._ranks,
         self._expand_ranks) = self._groups[: 6 * m].view(6, m)
        self.num_tiles = self._groups[6 * m :]
        self.num_tokens = 0
        self.tile_tokens = 16
        self.any_adapter = False
        self.per_token = False
        self.split = False
        self.num_tiles_host = 0
        self.tile_cap: int | None = None
        """Set while a CUDA graph is captured for decode steps of at most this many tiles (DecodeGraphs' tile-count
        variants): max_tiles, the captured grid, is at most this. None: any step's count."""
        self.version = 0  # bumped by every set(): outputs computed for an earlier step are never reused
        self._host = (np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))

    @property
    def token_slots(self) -> torch.Tensor:
        return self._slots[: self.num_tokens]

    @property
    def token_ranks(self) -> torch.Tensor:
        return self._ranks[: self.num_tokens]

    @property
    def expand_token_ranks(self) -> torch.Tensor:
        """token_ranks for the per-token expand: 0 for the tokens the tile kernel takes in a split step."""
        return self._expand_ranks[: self.num_tokens]

    @staticmethod
    def tile_tokens_for(num_tokens: int) -> int:
        return 16 if num_tokens <= DECODE_MAX_TOKENS else 64  # decode-sized steps: small tiles, more programs

    @staticmethod
    def prefers_per_token(num_tokens: int, adapted_tokens: int, adapted_slots: int) -> bool:
        """Whether the expand should run a program per token rather than per tile of one slot's tokens: at decode
        sizes, when the adapted tokens are spread over more than TILE_MAX_SLOTS slots or fewer than
        TILE_MIN_TOKENS tokens a slot (kernels-h200.json: 64 tokens on 8 slots, tiles 2x faster; on 64, tokens 1.6x)."""
        return num_tokens <= DECODE_MAX_TOKENS and (
            adapted_slots > TILE_MAX_SLOTS or adapted_tokens < TILE_MIN_TOKENS * adapted_slots)

    def max_tiles(self, num_tokens: int, num_slots: int, every_slot: bool = False) -> int:
        """Most tiles a step of num_tokens can have when the tile kernel runs it (each slot's last tile may be
        partial; at decode sizes the tile kernel serves at most TILE_MAX_SLOTS slots, unless every_slot: it serves
        the per-token steps too): a CUDA graph's grid. Never more than the tokens: no tile is empty."""
        if self.split:  # tiles of 16 over slots of >= 16 tokens each: at most 2 per 16 tokens
            return max(1, num_tokens // 8)
        slots = TILE_MAX_SLOTS if num_tokens <= DECODE_MAX_TOKENS and not every_slot else num_slots
        most = min(num_tokens, -(-num_tokens // self.tile_tokens_for(num_tokens)) + min(num_tokens, slots + 1))
        return most if self.tile_cap is None else min(most, self.tile_cap)

    def set(self, token_slots: list[int], per_token: bool | None = None, with_prompts: bool = False) -> None:
        """Set the slots of the next forward's tokens (flattened in [batch, seq] order), and which expand kernel
        serves them (per_token: prefers_per_token unless given; CUDA graphs capture each kind). with_prompts:
        the step carries prompt chunks, so where the per-token kernel is picked the expand is split (`split`).

        The host staging is double-buffered (adapters.staging): the engine sets step N+1's index while
        step N's copy may still be queued."""
        n, m = len(token_slots), self.max_tokens
        if n > m:
            raise ValueError(f"{n} tokens in one forward, more than the {m} this index holds")
        tile = self.tile_tokens_for(n)
        slots = np.asarray(token_slots, dtype=np.int64)
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_slots)) + 1, [n])).astype(np.int64)
        adapted = slots != BASE_SLOT
        adapted_slots = len(starts) - 1 - int(n > 0 and sorted_slots[0] == BASE_SLOT)
        self.per_token = (self.prefers_per_token(n, int(adapted.sum()), adapted_slots) if per_token is None
                          else per_token)
        self.split = self.per_token and with_prompts
        sizes = np.diff(starts)
        tiles_per_segment = -(-sizes // tile)
        if self.split:  # only adapter slots with a tile's tokens or more get tiles
            tiled = (sizes >= SPLIT_MIN_TOKENS) & (sorted_slots[starts[:-1]] != BASE_SLOT)
            tiles_per_segment = np.where(tiled, tiles_per_segment, 0)
        segment = np.repeat(np.arange(len(tiles_per_segment)), tiles_per_segment)
        first_tile = np.cumsum(tiles_per_segment) - tiles_per_segment
        tile_start = starts[segment] + (np.arange(len(segment)) - first_tile[segment]) * tile
        staging = self._staging.next()
        k = len(segment)
        staging[:n] = order
        staging[m : m + k] = tile_start
        staging[2 * m : 2 * m + k] = np.minimum(tile_start + tile, starts[segment + 1])
        staging[3 * m : 3 * m + k] = sorted_slots[starts[segment]] if k else []
        widest = RANK_UNKNOWN if self.slot_ranks is None else self.slot_ranks[np.maximum(slots, 0)]
        ranks = np.where(adapted, widest, 0)
        staging[4 * m : 4 * m + n] = ranks
        if self.split:  # the tiled tokens' programs of the per-token kernel exit at once
            ranks = ranks.copy()
            ranks[order[np.repeat(tiled, sizes)]] = 0
        staging[5 * m : 5 * m + n] = ranks
        staging[6 * m] = k
        self._staging.copy_to(self._groups)
        self._slots[:n].copy_(torch.from_numpy(slots), non_blocking=True)
        self.num_tokens = n
        self.tile_tokens = tile
        self.any_adapter = bool(adapted.any())
        self.num_tiles_host = k
        self._host = (order, starts, sorted_slots[starts[:-1]])
        self.version += 1

    def segments(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, token indices) for every adapter slot in the step (the torch path's grouping)."""
        order, starts, seg_slots = self._host
        return [(int(s), torch.from_numpy(order[starts[i] : starts[i + 1]]))
                for i, s in enumerate(seg_slots) if s != BASE_SLOT]


class SlotStacks:
    """Per-group adapter M's in rank-paged pools (adapters.rank_pages): group -> [num_pages + 1, out_g, page], with
    one page table for every group, each slot's rank per group (0 where the adapter leaves the group alone) and
    its per-layer signs paged the same way (the diagonal core; ones unless the adapter has its own); the
    per-layer LoRA stacks; and the full cores between frozen factors (PSOFT), group -> [num_slots + 1,
    num_layers_g, R_g, R_g] with R_g = min(max_core_rank, r_max_g) (the last row zero, for slot -1)."""

    def __init__(self, group_shapes: dict[str, tuple[int, int, int]], num_slots: int, dtype, device,
                 layer_shapes: dict[str, tuple[int, int]] | None = None, max_layer_rank: int = 0,
                 max_core_rank: int = 0, pool_ranks: int | None = None):
        """group_shapes: group -> (out_features, r_max, num_layers); layer_shapes: full module name ->
        (out_features, in_features), for the per-layer stacks of rank max_layer_rank (none if 0);
        max_core_rank: the core stacks' rank (none if 0; a group's is capped at its r_max, the z it reads);
        pool_ranks: the rank columns each group's pool holds in all, in whole pages (default: every slot at the
        widest r_max)."""
        self.num_slots = num_slots
        # one row past the slots, never written: slot -1 (base) indexes it, so the gathered op needs no mask
        self.cores = {g: torch.zeros(num_slots + 1, num_layers, min(max_core_rank, r), min(max_core_rank, r),
                                     dtype=dtype, device=device)
                      for g, (_, r, num_layers) in group_shapes.items()} if max_core_rank else {}
        self.core_ranks = {g: [0] * num_slots for g in self.cores}
        """Group -> each slot's core rank there, on the host (the torch path skips rank 0)."""
        layer_shapes = layer_shapes if max_layer_rank else {}
        self.layer_a = {n: torch.zeros(num_slots, max_layer_rank, i, dtype=dtype, device=device)
                        for n, (_, i) in layer_shapes.items()}
        self.layer_b = {n: torch.zeros(num_slots, o, max_layer_rank, dtype=dtype, device=device)
                        for n, (o, _) in layer_shapes.items()}
        self.layer_ranks = {n: [0] * num_slots for n in layer_shapes}
        """Full module name -> each slot's rank there, on the host (the torch path skips rank 0)."""
        self._layer_rank_table = torch.zeros(len(layer_shapes), num_slots, dtype=torch.int32, device=device)
        self.layer_ranks_device = dict(zip(layer_shapes, self._layer_rank_table))
        """The same ranks on the device, int32 [num_slots] per layer (rows of one table, written by one copy in
        `write`): the kernels stop each slot's loads at its own rank without reading host data."""
        self.group_rank = {g: r for g, (_, r, _) in group_shapes.items()}
        widest = max(self.group_rank.values(), default=1)
        self.page = page_size_for(widest)
        self.max_pages = pages_for_rank(widest, self.page)
        self.num_pages = num_slots * self.max_pages if pool_ranks is None else pages_for_rank(pool_ranks, self.page)
        if self.num_pages < self.max_pages:
            raise ValueError(f"{self.num_pages} rank pages of {self.page} hold no adapter of the widest rank {widest}")
        self.zero_page = self.num_pages
        """The page past the pool's own, never written: table entries past a slot's pages name it."""
        self.host_table = np.full((num_slots, self.max_pages), self.zero_page, dtype=np.int32)
        self.page_table = torch.from_numpy(self.host_table).to(device)
        self.stacks = {g: torch.zeros(self.num_pages + 1, out_features, self.page, dtype=dtype, device=device)
                       for g, (out_features, _, _) in group_shapes.items()}
        self.signs = {g: torch.ones(self.num_pages + 1, num_layers, self.page, dtype=dtype, device=device)
                      for g, (_, _, num_layers) in group_shapes.items()}
        self.ranks = {g: torch.zeros(num_slots, dtype=torch.int32, device=device) for g in group_shapes}
        self.slot_ranks = np.zeros(num_slots, dtype=np.int32)
        """Per slot, the widest rank it holds in any group, on the host (SlotIndex.token_ranks): a kernel that
        reads this many columns of every group's pages gets the right answer, the pages being zero past each
        group's own rank."""

    def widest_rank(self, tensors: dict[str, torch.Tensor]) -> int:
        """The widest rank of an adapter's M's among its slot tensors (0 for methods that hold none)."""
        return max((m.shape[1] for g, m in tensors.items() if g in self.stacks), default=0)

    def pages_for(self, tensors: dict[str, torch.Tensor]) -> int:
        """Rank pages an adapter's slot tensors take (those of its widest M)."""
        return pages_for_rank(self.widest_rank(tensors), self.page)

    def own_pages(self, slot: int, num_pages: int) -> list[int]:
        """A fixed page run per slot, for callers that keep no page allocator (tests, kernel benchmarks): valid
        while every slot can hold the widest rank (the default pool)."""
        if self.num_pages < self.num_slots * self.max_pages:
            raise ValueError("a pool smaller than every slot at the widest rank needs its pages given (SlotTable)")
        return list(range(slot * self.max_pages, slot * self.max_pages + num_pages))

    def write(self, slot: int, tensors: dict[str, torch.Tensor], pages: list[int] | None = None,
              non_blocking: bool = False) -> None:
        """Copy an adapter's slot tensors into `slot`, its M's into `pages` (pages_for(tensors) of them; default
        own_pages): `<group>` -> M [out, r] (groups it does not adapt get rank 0 and zeros), `signs.<group>` ->
        [num_layers, r] where it has them, `lora_A.<layer>` and `lora_B.<layer>`, `core.<group>` -> K
        [num_layers, r, r]; every stack it leaves out is zeroed."""
        needed = self.pages_for(tensors)
        pages = self.own_pages(slot, needed) if pages is None else list(pages)
        if len(pages) != needed:
            raise ValueError(f"an adapter of {needed} rank pages given {len(pages)}")
        self.host_table[slot] = self.zero_page
        self.host_table[slot, :needed] = pages
        self.page_table[slot].copy_(torch.from_numpy(self.host_table[slot]))
        index = torch.tensor(pages, dtype=torch.long).to(self.page_table.device)
        width = needed * self.page
        for g, pool in self.stacks.items():
            m, signs = tensors.get(g), tensors.get(f"signs.{g}")
            rank = 0 if m is None else m.shape[1]
            if needed:  # the slot's pages whole: zeros past this group's rank, ones for the signs it lacks
                dense = torch.zeros(pool.shape[1], width, dtype=pool.dtype, device=pool.device)
                dense_signs = torch.ones(self.signs[g].shape[1], width, dtype=pool.dtype, device=pool.device)
                if m is not None:
                    dense[:, :rank].copy_(m, non_blocking=non_blocking)
                if signs is not None:
                    dense_signs[:, :rank].copy_(signs, non_blocking=non_blocking)
                pool.index_copy_(0, index, dense.unflatten(1, (needed, self.page)).transpose(0, 1))
                self.signs[g].index_copy_(0, index, dense_signs.unflatten(1, (needed, self.page)).transpose(0, 1))
            self.ranks[g][slot] = rank
        self.slot_ranks[slot] = self.widest_rank(tensors)
        for name, a_stack in self.layer_a.items():
            a, b = tensors.get(f"lora_A.{name}"), tensors.get(f"lora_B.{name}")
            rank = 0 if a is None else a.shape[0]
            a_stack[slot, rank:].zero_()
            self.layer_b[name][slot, :, rank:].zero_()
            if a is not None:
                a_stack[slot, :rank].copy_(a, non_blocking=non_blocking)
                self.layer_b[name][slot, :, :rank].copy_(b, non_blocking=non_blocking)
            self.layer_ranks[name][slot] = rank
        if self.layer_a:
            column = torch.tensor([ranks[slot] for ranks in self.layer_ranks.values()], dtype=torch.int32)
            self._layer_rank_table[:, slot].copy_(column)
        for g, core_stack in self.cores.items():  # `core.<group>` -> K [num_layers, r, r]
            k = tensors.get(f"core.{g}")
            rank = 0 if k is None else k.shape[-1]
            core_stack[slot].zero_()
            if k is not None:
                core_stack[slot, :, :rank, :rank].copy_(k, non_blocking=non_blocking)
            self.core_ranks[g][slot] = rank

    def per_layer(self, name: str):
        """(A stack, B stack, host ranks, device ranks) of one layer, or None where no per-layer stacks are held."""
        if name not in self.layer_a:
            return None
        return self.layer_a[name], self.layer_b[name], self.layer_ranks[name], self.layer_ranks_device[name]

    def core_of(self, group: str):
        """(core stack [S + 1, L, R, R], host ranks) of one group, or None where no core stacks are held."""
        return (self.cores[group], self.core_ranks[group]) if group in self.cores else None

    def fuse(self, groups: tuple[str, ...]) -> PagedStack:
        """Stack the pools of groups whose layers share a GEMM row-wise, so one expand launch serves them all
        (pool [P + 1, sum(out), page], ranks [M, S], signs [P + 1, L, M*page]); each group's tensors become views
        of these."""
        first = self.stacks[groups[0]]
        num_layers = self.signs[groups[0]].shape[1]
        outs = [self.stacks[g].shape[1] for g in groups]
        pool = torch.zeros(first.shape[0], sum(outs), self.page, dtype=first.dtype, device=first.device)
        ranks = torch.zeros(len(groups), self.num_slots, dtype=torch.int32, device=first.device)
        signs = torch.ones(first.shape[0], num_layers, len(groups) * self.page, dtype=first.dtype, device=first.device)
        offset = 0
        for m, (g, out_features) in enumerate(zip(groups, outs)):
            pool[:, offset : offset + out_features].copy_(self.stacks[g])
            ranks[m].copy_(self.ranks[g])
            signs[:, :, m * self.page : (m + 1) * self.page].copy_(self.signs[g])
            self.stacks[g], self.ranks[g] = pool[:, offset : offset + out_features], ranks[m]
            self.signs[g] = signs[:, :, m * self.page : (m + 1) * self.page]
            offset += out_features
        return PagedStack(pool, signs, ranks, self.page_table, self.host_table, self.group_rank[groups[0]])

    def served(self, groups: tuple[str, ...]) -> PagedStack:
        """The pooled operands of one GEMM's groups: fused where there are several."""
        if len(groups) > 1:
            return self.fuse(groups)
        g = groups[0]
        return PagedStack(self.stacks[g], self.signs[g], self.ranks[g][None], self.page_table, self.host_table,
                          self.group_rank[g])

    @property
    def bytes_per_page(self) -> int:
        """GPU memory one rank page takes over every group (M and signs): an adapter's is this times its pages."""
        return sum(t[0].numel() * t.element_size() for t in (*self.stacks.values(), *self.signs.values()))


class SharedGemm:
    """The adapted layers that read one input x, as one GEMM `[W_1; ..; W_M; P_1; ..; P_M] @ x` whose output
    is [T, sum(out) + M*R] = [y0 | z]; the expand then adds each token's M[slot] z into y0 in place. The
    first member to see a new x computes every member's output; the others take their columns. Each base
    linear keeps a view of its W rows, so nothing is stored twice. A layer that reads its own input is a
    group of one."""

    def __init__(self, linears: list[nn.Linear], bases: list[torch.Tensor], served: PagedStack, layer: int,
                 slot_index: SlotIndex, per_layer: list | None = None, cores: list | None = None):
        """served: the pooled M's of the members' groups (SlotStacks.served); layer: the members'
        index in their groups (the row of the signs they read); per_layer: each member's
        SlotStacks.per_layer (None: no per-layer factors); cores: each member's (core stack, host ranks,
        E [out, R]) (None: no core stacks)."""
        first = linears[0].weight
        in_features, rank = first.shape[1], served.rank
        outs = [lin.out_features for lin in linears]
        self.num_out = sum(outs)
        self.bounds = [sum(outs[:m]) for m in range(len(outs) + 1)]  # member m: columns bounds[m]:bounds[m+1]
        self.weight = torch.empty(self.num_out + len(outs) * rank, in_features, dtype=first.dtype, device=first.device)
        has_bias = any(lin.bias is not None for lin in linears)
        self.bias = torch.zeros(self.weight.shape[0], dtype=first.dtype, device=first.device) if has_bias else None
        for m, (lin, p) in enumerate(zip(linears, bases)):
            lo, hi = self.bounds[m], self.bounds[m + 1]
            self.weight[lo:hi].copy_(lin.weight.detach())
            self.weight[self.num_out + m * rank : self.num_out + (m + 1) * rank].copy_(p.detach())
            lin.weight = nn.Parameter(self.weight[lo:hi], requires_grad=lin.weight.requires_grad)
            if lin.bias is not None:
                self.bias[lo:hi].copy_(lin.bias.detach())
                lin.bias = nn.Parameter(self.bias[lo:hi], requires_grad=lin.bias.requires_grad)
        self.paged, self.layer, self.slot_index = served, layer, slot_index
        self.per_layer = [] if per_layer is None or all(p is None for p in per_layer) else per_layer
        self.cores = [] if cores is None or all(c is None for c in cores) else cores
        self._x: torch.Tensor | None = None
        self._version = -1
        self._out: torch.Tensor | None = None
        self._pending = 0

    def output_for(self, member: int, x: torch.Tensor) -> torch.Tensor:
        """This member's y [..., out] for input x (a view into the shared GEMM's output)."""
        if x is not self._x or self._version != self.slot_index.version:
            x2 = x.reshape(-1, x.shape[-1])
            if self.slot_index.any_adapter:
                y0z = F.linear(x2, self.weight, self.bias)  # [T, num_out + M*R] = [y0 | z]
                out = expand(y0z, self.paged, self.layer, self.bounds, self.slot_index)
                for m, factors in enumerate(self.per_layer):  # per-layer methods (LoRA): y += B[slot] A[slot] x
                    lora(x2, out[:, self.bounds[m] : self.bounds[m + 1]], *factors, self.slot_index)
                rank = self.paged.rank
                for m, (core_stack, core_ranks, e) in enumerate(self.cores):  # PSOFT: y += E K[slot, layer] z
                    z = y0z[:, self.num_out + m * rank : self.num_out + m * rank + core_stack.shape[-1]]
                    core(z, out[:, self.bounds[m] : self.bounds[m + 1]], core_stack, self.layer, e, core_ranks,
                         self.slot_index)
            else:
                bias = None if self.bias is None else self.bias[: self.num_out]
                out = F.linear(x2, self.weight[: self.num_out], bias)
            self._x, self._out = x, out
            self._version, self._pending = self.slot_index.version, len(self.bounds) - 1
        y = self._out[:, self.bounds[member] : self.bounds[member + 1]]
        self._pending -= 1
        if self._pending == 0:  # every member has its output: hold no activations past this forward
            self._x = self._out = None
        return y.view(*x.shape[:-1], y.shape[-1])


class AdaptedLinear(nn.Module):
    """An nn.Linear plus the slot-indexed PiCa delta, `y = W0 x + M[slot] (P x)`, computed by its SharedGemm.

    The base linear's weight is a view of the shared GEMM's W rows; `base` stays the unchanged
    nn.Linear, so detach() puts it back as it was."""

    def __init__(self, base: nn.Linear, shared: SharedGemm, member: int):
        super().__init__()
        self.base = base
        self.shared = shared
        self.member = member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(self.member, x)


@dataclass
class AdaptedModel:
    """A base model whose target linears read adapter slots."""

    model: nn.Module
    slot_index: SlotIndex
    slot_stacks: SlotStacks
    layers: dict[str, AdaptedLinear]

    def detach(self) -> nn.Module:
        """Put the plain nn.Linear modules back (benchmarks reuse one loaded model)."""
        unwrap_modules(self.model, AdaptedLinear, "base")
        self.layers = {}
        return self.model


def run_probe(model: nn.Module, handles: list) -> None:
    """Run the model once on two tokens, so that hooks see which module's output feeds which layer;
    then remove the hooks."""
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()


def find_shared_inputs(model: nn.Module, layers: dict[str, nn.Module]) -> list[list[str]]:
    """The target layers that read the same input tensor, each list in call order (q/k/v and gate/up
    in a Llama block)."""
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}  # keeps each x alive, so ids are not reused

    def record(name):
        def hook(module, args):
            seen.setdefault(id(args[0]), (args[0], []))[1].append(name)

        return hook

    run_probe(model, [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()])
    return [names for _, names in seen.values()]


def can_share(stacks: SlotStacks, groups: tuple[str, ...]) -> bool:
    """Whether these groups' layers can share one GEMM and expand launch: distinct groups, one rank, as many
    layers each, and output widths the kernel's 16-column blocks never straddle."""
    return (1 < len(groups) <= MAX_SHARED_MEMBERS and len(set(groups)) == len(groups)
            and len({stacks.group_rank[g] for g in groups}) == 1 and len({stacks.signs[g].shape[1] for g in groups}) == 1
            and math.gcd(*(stacks.stacks[g].shape[1] for g in groups)) % 16 == 0)


def plan_shared(stacks: SlotStacks, shared: list[list[str]]) -> dict[tuple[str, ...], list[list[str]]]:
    """Sets of layers that share a GEMM, keyed by their groups in call order. Groups that read one input
    in every block fuse their stacks once; a group is fused at most once; any other layer is alone."""
    counts = Counter(tuple(group_of(n) for n in names) for names in shared if len(names) > 1)
    fused, taken = set(), set()
    for groups, _ in counts.most_common():
        if can_share(stacks, groups) and not taken & set(groups):
            fused.add(groups)
            taken |= set(groups)
    plan: dict[tuple[str, ...], list[list[str]]] = {}
    for names in shared:
        groups = tuple(group_of(n) for n in names)
        if groups in fused:
            plan.setdefault(groups, []).append(names)
        else:
            for name in names:
                plan.setdefault((group_of(name),), []).append([name])
    return plan


def frozen_expand(linear: nn.Linear, p: torch.Tensor, rank: int) -> torch.Tensor:
    """E = W0 P_r^T [out, rank] of one layer, in float32 then the model's dtype: the expand shared by every
    adapter whose E and S are frozen (PSOFT's U_r S_r up to the rotation Q its load folds into the core)."""
    weight = linear.weight.detach()
    return (weight.float() @ p[:rank].to(device=weight.device, dtype=torch.float32).T).to(weight.dtype)


@torch.no_grad()
def attach_adapters(model: nn.Module, basis, num_slots: int, max_rank: int, max_tokens: int = 4096,
                    max_layer_rank: int = 0, max_core_rank: int = 0, pool_ranks: int | None = None) -> AdaptedModel:
    """Wrap every target linear of `model` in an AdaptedLinear reading shared slot stacks (and per-layer
    stacks of rank max_layer_rank for LoRA, core stacks of rank max_core_rank for PSOFT, where > 0); pool_ranks:
    the rank columns the M pools hold in all (default: every slot at max_rank)."""
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    group_rank = {g: min(max_rank, basis.group_rank(g)) for g in basis.groups}
    layer_shapes = {layer: (info.out_features, in_features) for info in basis.groups.values()
                    for layer, in_features in zip(info.layers, info.in_features)}
    stacks = SlotStacks({g: (info.out_features, group_rank[g], len(info.layers)) for g, info in basis.groups.items()},
                        num_slots, dtype, device, layer_shapes, max_layer_rank, max_core_rank, pool_ranks)
    slot_index = SlotIndex(max_tokens, device, stacks.slot_ranks)
    linears = find_target_linears(model, tuple(basis.groups))
    layers = {}
    shared_inputs = find_shared_inputs(model, linears)
    seen = {n for names in shared_inputs for n in names}
    shared_inputs += [[n] for n in linears if n not in seen]  # not called by the probe: each alone
    for groups, members in plan_shared(stacks, shared_inputs).items():
        served = stacks.served(groups)
        for names in members:
            bases = [basis.p[n][: group_rank[group_of(n)]].to(device=device, dtype=dtype) for n in names]
            layer = {basis.groups[group_of(n)].layers.index(n) for n in names}
            if len(layer) != 1:
                raise ValueError(f"layers {names} share an input but sit at different depths of their groups")
            cores = None
            if stacks.cores:  # each member's core stack and host ranks, and its E = W0 P^T
                held = [stacks.core_of(group_of(n)) for n in names]
                cores = [(k, ranks, frozen_expand(linears[n], basis.p[n], k.shape[-1]))
                         for n, (k, ranks) in zip(names, held)]
            shared = SharedGemm([linears[n] for n in names], bases, served, layer.pop(), slot_index,
                                [stacks.per_layer(n) for n in names], cores)
            for member, name in enumerate(names):
                layers[name] = AdaptedLinear(linears[name], shared, member)
                replace_module(model, name, layers[name])
    return AdaptedModel(model, slot_index, stacks, layers)
