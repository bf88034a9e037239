"""Adapted linear layers: the base model's target linears, wrapped once at load time.

Each adapted layer computes `y = W0 x + U (core[slot] x)` for its token's adapter slot. The cores
of every resident adapter live in preallocated per-group slot stacks [num_slots, r_max, in], so
activating an adapter is a copy_ and nothing is re-registered at request time. The per-token slot
index is set once per step (-1 = base model) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adapters.ops import expand_add, shrink
from adapters.targets import find_target_linears
from cache.slot_table import BASE_SLOT


class SlotIndex:
    """Per-token adapter slot for the current step, shared by every adapted layer.

    Besides `token_slots`, it holds the step's tokens grouped by slot for the grouped shrink kernel:
    `token_order` (token indices sorted by slot) cut into tiles of at most `tile_tokens` tokens of
    one slot each (`tile_start`, `tile_end`, `tile_slot`, `num_tiles`), all in one preallocated
    device buffer, so CUDA graphs captured on it stay valid.
    """

    def __init__(self, max_tokens: int, device: torch.device | str):
        device = torch.device(device)
        self.max_tokens = m = max_tokens
        self._slots = torch.full((m,), BASE_SLOT, dtype=torch.long, device=device)
        self._groups = torch.zeros(4 * m + 1, dtype=torch.int32, device=device)
        self._staging = torch.zeros(4 * m + 1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._staging_np = self._staging.numpy()  # filled with numpy, copied to the device in one go
        self.token_order, self.tile_start, self.tile_end, self.tile_slot = self._groups[: 4 * m].view(4, m)
        self.num_tiles = self._groups[4 * m :]
        self.num_tokens = 0
        self.tile_tokens = 16
        self.any_adapter = False

    @property
    def token_slots(self) -> torch.Tensor:
        return self._slots[: self.num_tokens]

    def set(self, token_slots: list[int]) -> None:
        """Set the slots of the next forward's tokens (flattened in [batch, seq] order).

        Reuses one staging buffer: the previous step's copy has finished, since every step ends
        with the sampler's host sync."""
        n, m = len(token_slots), self.max_tokens
        if n > m:
            raise ValueError(f"{n} tokens in one forward, more than the {m} this index holds")
        tile = 16 if n <= 256 else 64  # decode-sized steps: small tiles, more programs
        slots = np.asarray(token_slots, dtype=np.int64)
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_slots)) + 1, [n])).astype(np.int64)
        tiles_per_segment = -(-np.diff(starts) // tile)
        segment = np.repeat(np.arange(len(tiles_per_segment)), tiles_per_segment)
        first_tile = np.cumsum(tiles_per_segment) - tiles_per_segment
        tile_start = starts[segment] + (np.arange(len(segment)) - first_tile[segment]) * tile
        staging = self._staging_np
        k = len(segment)
        staging[:n] = order
        staging[m : m + k] = tile_start
        staging[2 * m : 2 * m + k] = np.minimum(tile_start + tile, starts[segment + 1])
        staging[3 * m : 3 * m + k] = sorted_slots[starts[segment]] if k else []
        staging[4 * m] = k
        self._groups.copy_(self._staging, non_blocking=True)
        self._slots[:n].copy_(torch.from_numpy(slots), non_blocking=True)
        self.num_tokens = n
        self.tile_tokens = tile
        self.any_adapter = bool(n) and bool((slots != BASE_SLOT).any())


class SlotStacks:
    """Per-group preallocated adapter cores: group -> [num_slots, r_max_g, in_g], zero-padded,
    with each slot's rank per group (0 where the adapter leaves the group alone)."""

    def __init__(self, group_shapes: dict[str, tuple[int, int]], num_slots: int, dtype, device):
        self.num_slots = num_slots
        self.stacks = {
            g: torch.zeros(num_slots, r, in_features, dtype=dtype, device=device)
            for g, (r, in_features) in group_shapes.items()
        }
        self.ranks = {g: torch.zeros(num_slots, dtype=torch.int32, device=device) for g in group_shapes}

    def write(self, slot: int, cores: dict[str, torch.Tensor], non_blocking: bool = False) -> None:
        """Copy an adapter's cores into `slot` (groups it does not adapt get rank 0 and zeros)."""
        for g, stack in self.stacks.items():
            core = cores.get(g)
            rank = 0 if core is None else core.shape[0]
            stack[slot, rank:].zero_()
            if core is not None:
                stack[slot, :rank].copy_(core, non_blocking=non_blocking)
            self.ranks[g][slot] = rank


class AdaptedLinear(nn.Module):
    """An nn.Linear plus the slot-indexed PiCa delta U (core[slot] x)."""

    def __init__(self, base: nn.Linear, u: torch.Tensor, stack: torch.Tensor, slot_rank: torch.Tensor,
                 slot_index: SlotIndex):
        super().__init__()
        self.base = base
        self.register_buffer("u", u, persistent=False)  # [out, r_max_g]
        self.stack = stack  # [num_slots, r_max_g, in], shared by the group's layers
        self.slot_rank = slot_rank  # [num_slots] int32, shared too
        self.slot_index = slot_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.slot_index.any_adapter:
            return y
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        z = shrink(x2, self.stack, self.slot_rank, self.slot_index)  # [T, r]
        return expand_add(y.reshape(-1, y.shape[-1]), z, self.u).view_as(y)


@dataclass
class AdaptedModel:
    """A base model whose target linears read adapter slots."""

    model: nn.Module
    slot_index: SlotIndex
    slot_stacks: SlotStacks
    layers: dict[str, AdaptedLinear]

    def detach(self) -> nn.Module:
        """Put the plain nn.Linear modules back (benchmarks reuse one loaded model)."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer.base)
        self.layers = {}
        return self.model


def attach_adapters(model: nn.Module, basis, num_slots: int, max_rank: int, max_tokens: int = 4096) -> AdaptedModel:
    """Wrap every target linear of `model` in an AdaptedLinear reading shared slot stacks."""
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    group_rank = {g: min(max_rank, basis.group_rank(g)) for g in basis.groups}
    stacks = SlotStacks(
        {g: (group_rank[g], info.in_features) for g, info in basis.groups.items()}, num_slots, dtype, device
    )
    slot_index = SlotIndex(max_tokens, device)
    linears = find_target_linears(model, tuple(basis.groups))
    layers = {}
    for name, linear in linears.items():
        group = name.rsplit(".", 1)[-1]
        u = basis.u[name][:, : group_rank[group]].to(device=device, dtype=dtype)
        layer = AdaptedLinear(linear, u, stacks.stacks[group], stacks.ranks[group], slot_index)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        layers[name] = layer
    return AdaptedModel(model, slot_index, stacks, layers)
