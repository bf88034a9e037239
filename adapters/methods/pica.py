"""PiCa: W = W0 + M_g P, with P the top-r right singular vectors of W0 (rows of Vh, [r, in], frozen,
per layer) and one M_g [out, r] shared by every layer of functional group g. The file holds one
tensor `M.<group>` [out_features, r] per group (adapter format 2)."""

from __future__ import annotations

import torch

from adapters.methods.base import AdapterMethod, Factors, Scope
from adapters.registry import register_method
from adapters.targets import GroupInfo, group_of


@register_method
class PiCa(AdapterMethod):
    name = "pica"
    factors = Factors(expand=Scope.GROUP, core=Scope.IDENTITY, shrink=Scope.FROZEN)

    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        return {f"M.{g}": (info.out_features, r) for g, info in groups.items()}

    def trained_factor(self, tensors: dict[str, torch.Tensor], part: str, layer: str) -> torch.Tensor:
        assert part == "expand", part
        return tensors[f"M.{group_of(layer)}"]
