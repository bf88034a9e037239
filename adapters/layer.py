"""Adapted linear layers: the base model's target linears, wrapped once at load time.

Each adapted layer computes `y = W0 x + U (core[slot] x)` for its token's adapter slot, as one GEMM
`[W0 | U] @ [x ; core[slot] x]`. The cores of every resident adapter live in preallocated per-group
slot stacks [num_slots, r_max, in], so activating an adapter is a copy_ and nothing is re-registered
at request time. The per-token slot index is set once per step (-1 = base model) and shared by
every layer. Layers that read the same input (q/k/v, gate/up) share one stack and one shrink launch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.ops import concat_inputs, empty_padded_rows, kernel_counters
from adapters.targets import find_target_linears, group_of, replace_module, unwrap_modules
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
        self.version = 0  # bumped by every set(): inputs built for an earlier step are never reused

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
        self.version += 1


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

    def fuse(self, groups: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Lay the cores of groups whose layers read one input side by side, so one kernel launch serves
        them all: returns (stack [S, M*R, in], ranks [M, S]); each group's stack becomes a view of it."""
        num_slots, rank, in_features = self.stacks[groups[0]].shape
        first = self.stacks[groups[0]]
        stack = torch.zeros(num_slots, len(groups) * rank, in_features, dtype=first.dtype, device=first.device)
        ranks = torch.zeros(len(groups), num_slots, dtype=torch.int32, device=first.device)
        for m, g in enumerate(groups):
            stack[:, m * rank : (m + 1) * rank].copy_(self.stacks[g])
            ranks[m].copy_(self.ranks[g])
            self.stacks[g], self.ranks[g] = stack[:, m * rank : (m + 1) * rank], ranks[m]
        return stack, ranks


class SharedInput:
    """The adapted layers that read one input x (q/k/v, or gate/up, of one block), with their cores in one
    stack: the first of them to see a new x builds every member's GEMM input in one launch, the others
    take theirs. A layer that reads its own input is a group of one."""

    def __init__(self, stack: torch.Tensor, ranks: torch.Tensor, slot_index: SlotIndex):
        self.stack = stack  # [S, M*R, in]
        self.ranks = ranks  # [M, S] int32
        self.slot_index = slot_index
        num_members, rank = ranks.shape[0], stack.shape[1] // ranks.shape[0]
        self.counters = kernel_counters(slot_index.max_tokens, num_members, rank, stack.device)
        self._x: torch.Tensor | None = None
        self._version = -1
        self._inputs: torch.Tensor | None = None
        self._pending = 0

    def input_for(self, member: int, x: torch.Tensor) -> torch.Tensor:
        """[T, in + R]: `[x | core[slot] @ x]` for this member's rows of the stack."""
        if x is not self._x or self._version != self.slot_index.version:
            self._hold(x, concat_inputs(x.reshape(-1, x.shape[-1]), self.stack, self.ranks, self.slot_index,
                                        self.counters))
        inputs = self._inputs[member]
        self._pending -= 1
        if self._pending == 0:  # every member has its input: hold no activations past this forward
            self._x = self._inputs = None
        return inputs

    def input_from(self, h: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None,
                   up: torch.Tensor | None = None) -> torch.Tensor:
        """For the op that makes these layers' input from h (their RMSNorm: `norm` = (weight, eps); a gated
        MLP's silu(h) * up): that input, made in the same launch as their GEMM inputs. Returns a view into
        those inputs, which input_for then recognises."""
        in_features = h.shape[-1]
        h2 = h.reshape(-1, in_features)
        up2 = None if up is None else up.reshape(-1, in_features)
        if up2 is not None and up2.stride() != h2.stride():  # the kernel reads both with one row stride
            h2, up2 = h2.contiguous(), up2.contiguous()
        inputs = concat_inputs(h2, self.stack, self.ranks, self.slot_index, self.counters, norm=norm, up=up2)
        x = inputs[0, :, :in_features].view(h.shape)
        self._hold(x, inputs)
        return x

    def _hold(self, x: torch.Tensor, inputs: torch.Tensor) -> None:
        self._x, self._inputs = x, inputs
        self._version, self._pending = self.slot_index.version, self.ranks.shape[0]


class AdaptedLinear(nn.Module):
    """An nn.Linear plus the slot-indexed PiCa delta, `y = [W0 | U] @ [x ; core[slot] x]` in one GEMM.

    W0 and U live side by side in one weight, `weight_cat` [out, in + R]; the base linear keeps a view
    of its W0 part, so the no-adapter path is the unchanged nn.Linear and nothing is stored twice."""

    def __init__(self, base: nn.Linear, u: torch.Tensor, slot_index: SlotIndex):
        super().__init__()
        out_features, in_features = base.weight.shape
        weight_cat = empty_padded_rows(out_features, in_features + u.shape[1], dtype=base.weight.dtype,
                                       device=base.weight.device)
        weight_cat[:, :in_features].copy_(base.weight)
        weight_cat[:, in_features:].copy_(u)
        base.weight = nn.Parameter(weight_cat[:, :in_features], requires_grad=base.weight.requires_grad)
        self.base = base
        self.register_buffer("weight_cat", weight_cat, persistent=False)
        self.slot_index = slot_index
        self.shared_input: SharedInput | None = None  # set by attach_adapters
        self.member = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.slot_index.any_adapter:
            return self.base(x)
        y = F.linear(self.shared_input.input_for(self.member, x), self.weight_cat, self.base.bias)
        return y.view(*x.shape[:-1], y.shape[-1])


@dataclass
class AdaptedModel:
    """A base model whose target linears read adapter slots."""

    model: nn.Module
    slot_index: SlotIndex
    slot_stacks: SlotStacks
    layers: dict[str, AdaptedLinear]

    def detach(self) -> nn.Module:
        """Put the plain nn.Linear modules back (benchmarks reuse one loaded model). Found by walking the
        model, since wrappers put in later (GatedMLP) move the layers' paths."""
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
    """The adapted layers that read the same input tensor, each list in call order (q/k/v and gate/up
    in a Llama block)."""
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}  # keeps each x alive, so ids are not reused

    def record(name):
        def hook(module, args):
            seen.setdefault(id(args[0]), (args[0], []))[1].append(name)

        return hook

    run_probe(model, [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()])
    return [names for _, names in seen.values()]


def share_inputs(adapted: AdaptedModel, shared: list[list[str]]) -> None:
    """Give every adapted layer its SharedInput. Groups whose layers read one input in every block
    (same rank and width) get one fused stack; any other layer is a group of one."""
    stacks = adapted.slot_stacks
    counts = Counter(tuple(sorted(group_of(n) for n in names)) for names in shared if len(names) > 1)
    fused, taken = {}, set()
    for groups, _ in counts.most_common():
        shapes = {stacks.stacks[g].shape for g in groups}
        if len(set(groups)) == len(groups) and not taken & set(groups) and len(shapes) == 1:
            fused[groups] = stacks.fuse(groups)
            taken |= set(groups)
    for names in shared:
        groups = tuple(sorted(group_of(n) for n in names))
        if groups in fused:
            shared_input = SharedInput(*fused[groups], adapted.slot_index)
            for name in names:
                adapted.layers[name].shared_input = shared_input
                adapted.layers[name].member = groups.index(group_of(name))
    for name, layer in adapted.layers.items():
        if layer.shared_input is None:
            g = group_of(name)
            layer.shared_input = SharedInput(stacks.stacks[g], stacks.ranks[g][None], adapted.slot_index)


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
        u = basis.u[name][:, : group_rank[group_of(name)]].to(device=device, dtype=dtype)
        layer = AdaptedLinear(linear, u, slot_index)
        replace_module(model, name, layer)
        layers[name] = layer
    adapted = AdaptedModel(model, slot_index, stacks, layers)
    share_inputs(adapted, find_shared_inputs(model, layers))
    return adapted
