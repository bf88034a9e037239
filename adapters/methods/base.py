"""What an adapter method must say so the server can validate, serve and merge it.

Served methods have the form `delta_W(layer) = U_layer @ core_group`: a frozen per-layer basis
from the basis cache times a small per-adapter core shared by a functional group. The server keeps
every adapter's cores in preallocated slot stacks and applies them with one shrink (core @ x) and
one expand (U @ z) per layer. A new method is one module in this folder that subclasses
AdapterMethod and registers itself: PSOFT would fold its r x r rotation into the core at load time,
CERSA picks its own rank from the spectrum, LoRA would ask for no basis and bring its own A.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from adapters.targets import GroupInfo


class AdapterMethod(ABC):
    name: ClassVar[str]

    @abstractmethod
    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape an adapter file must hold for these groups and rank."""

    @abstractmethod
    def group_cores(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Group -> core [r, in_features] to copy into that group's slot stack."""

    def delta_weight(self, core: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Dense weight delta [out, in] of one layer, from its group core [r, in] and basis U [out, >= r]."""
        r = core.shape[0]
        return u[:, :r].to(torch.float32) @ core.to(torch.float32)
