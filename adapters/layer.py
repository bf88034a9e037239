"""Adapted linear layers: the base model's target linears, wrapped once at load time.

Each adapted layer computes `y = W0 x + U (core[slot] x)` for its token's adapter slot. The cores
of every resident adapter live in preallocated per-group slot stacks [num_slots, r_max, in], so
activating an adapter is a copy_ and nothing is re-registered at request time. The per-token slot
index is set once per step (-1 = base model) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters.ops import expand, shrink
from adapters.targets import find_target_linears

BASE_SLOT = -1


class SlotIndex:
    """Per-token adapter slot for the current step, shared by every adapted layer."""

    def __init__(self, max_tokens: int, device: torch.device):
        self._buffer = torch.full((max_tokens,), BASE_SLOT, dtype=torch.long, device=device)
        self.num_tokens = 0
        self.any_adapter = False

    @property
    def token_slots(self) -> torch.Tensor:
        return self._buffer[: self.num_tokens]

    def set(self, token_slots: list[int]) -> None:
        """Set the slots of the next forward's tokens (flattened in [batch, seq] order)."""
        n = len(token_slots)
        if n > self._buffer.numel():  # grows only when a larger step than ever before arrives
            self._buffer = torch.full((n,), BASE_SLOT, dtype=torch.long, device=self._buffer.device)
        self._buffer[:n].copy_(torch.tensor(token_slots, dtype=torch.long), non_blocking=True)
        self.num_tokens = n
        self.any_adapter = any(s != BASE_SLOT for s in token_slots)


class SlotStacks:
    """Per-group preallocated adapter cores: group -> [num_slots, r_max_g, in_g], zero-padded."""

    def __init__(self, group_shapes: dict[str, tuple[int, int]], num_slots: int, dtype, device):
        self.num_slots = num_slots
        self.stacks = {
            g: torch.zeros(num_slots, r, in_features, dtype=dtype, device=device)
            for g, (r, in_features) in group_shapes.items()
        }

    def write(self, slot: int, cores: dict[str, torch.Tensor], non_blocking: bool = False) -> None:
        """Copy an adapter's cores into `slot` (groups it does not adapt are zeroed)."""
        for g, stack in self.stacks.items():
            stack[slot].zero_()
            core = cores.get(g)
            if core is not None:
                stack[slot, : core.shape[0]].copy_(core, non_blocking=non_blocking)

    def clear(self, slot: int) -> None:
        for stack in self.stacks.values():
            stack[slot].zero_()


class AdaptedLinear(nn.Module):
    """An nn.Linear plus the slot-indexed PiCa delta U (core[slot] x)."""

    def __init__(self, base: nn.Linear, u: torch.Tensor, stack: torch.Tensor, slot_index: SlotIndex):
        super().__init__()
        self.base = base
        self.register_buffer("u", u, persistent=False)  # [out, r_max_g]
        self.stack = stack  # [num_slots, r_max_g, in], shared by the group's layers
        self.slot_index = slot_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.slot_index.any_adapter:
            return y
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        z = shrink(x2, self.stack, self.slot_index.token_slots)  # [T, r]
        return y + expand(z, self.u).view_as(y)


@dataclass
class AdaptedModel:
    """A base model whose target linears read adapter slots."""

    model: nn.Module
    slot_index: SlotIndex
    slot_stacks: SlotStacks
    layers: dict[str, AdaptedLinear]


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
        layer = AdaptedLinear(linear, u, stacks.stacks[group], slot_index)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        layers[name] = layer
    return AdaptedModel(model, slot_index, stacks, layers)
