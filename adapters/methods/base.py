"""What an adapter method must say so the server can validate, serve and merge it.

Every method here writes its weight delta as three factors, `delta_W(layer) = E @ K @ S`, with
E [out, r], K [r, r] and S [r, in]. Each factor has a scope:
- FROZEN: per layer, the same for every adapter, from the basis cache (P, the top-r right singular
  vectors of W0, serves as S);
- GROUP: per adapter, shared by every layer of a functional group (q_proj, ...);
- LAYER: per adapter and layer;
- IDENTITY: no factor (K only).
PiCa: E per group (M), K identity, S frozen (P). LoRA: S (A) and E (B) per layer, K identity.
PSOFT: E and S frozen (both SVD factors), K per layer (an r x r orthogonal core).
A method is one module in this folder that subclasses AdapterMethod and registers itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from adapters.targets import GroupInfo


class Scope(str, Enum):
    FROZEN = "frozen per layer"
    GROUP = "per adapter and group"
    LAYER = "per adapter and layer"
    IDENTITY = "identity"


@dataclass(frozen=True)
class Factors:
    """The scope of each factor of `delta_W = E @ K @ S`."""

    expand: Scope
    core: Scope
    shrink: Scope


SLOT_SERVED = Factors(expand=Scope.GROUP, core=Scope.IDENTITY, shrink=Scope.FROZEN)
"""The layout the slot stacks serve today: S rides in the base GEMM as extra rows ([W0; P] x), and
each slot holds one E per group. LAYER-scoped and core factors come with the next methods."""


class AdapterMethod(ABC):
    name: ClassVar[str]
    factors: ClassVar[Factors]

    @abstractmethod
    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape an adapter file must hold for these groups and rank."""

    @abstractmethod
    def trained_factor(self, tensors: dict[str, torch.Tensor], part: str, layer: str) -> torch.Tensor:
        """The adapter's own factor `part` ('expand', 'core' or 'shrink') of `layer` (a full module name)."""

    def factor(self, tensors: dict[str, torch.Tensor], part: str, layer: str, basis, r: int) -> torch.Tensor | None:
        """Factor `part` of `layer` as a float32 tensor: the adapter's own, the basis's (sliced to r),
        or None for IDENTITY."""
        scope = getattr(self.factors, part)
        if scope is Scope.IDENTITY:
            return None
        if scope is Scope.FROZEN:
            if part != "shrink":
                raise NotImplementedError(f"the basis cache holds the shrink factor P only, not a frozen {part}")
            return basis.p[layer][:r].to(torch.float32)
        return self.trained_factor(tensors, part, layer).to(torch.float32)

    def delta_weight(self, tensors: dict[str, torch.Tensor], layer: str, basis, r: int) -> torch.Tensor:
        """Dense weight delta [out, in] (float32) of one layer: E @ K @ S."""
        expand, core, shrink = (self.factor(tensors, part, layer, basis, r) for part in ("expand", "core", "shrink"))
        return expand @ shrink if core is None else expand @ core @ shrink

    def slot_tensors(self, tensors: dict[str, torch.Tensor], groups) -> dict[str, torch.Tensor]:
        """Group -> E [out, r], what one GPU slot holds for this adapter (SLOT_SERVED methods)."""
        if self.factors != SLOT_SERVED:
            raise NotImplementedError(f"{self.name}: the slot stacks serve {SLOT_SERVED}, not {self.factors}")
        return {g: self.trained_factor(tensors, "expand", g) for g in groups}  # a bare group names its layers

