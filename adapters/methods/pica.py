"""PiCa: W = W0 + U_r B_g, with U_r the top-r left singular vectors of W0 and one B_g (r x in)
shared by every layer of functional group g. The file holds one tensor `B.<group>` per group."""

from __future__ import annotations

import torch

from adapters.methods.base import AdapterMethod
from adapters.registry import register_method
from adapters.targets import GroupInfo


@register_method
class PiCa(AdapterMethod):
    name = "pica"

    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        return {f"B.{g}": (r, info.in_features) for g, info in groups.items()}

    def group_cores(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name.split(".", 1)[1]: t for name, t in tensors.items()}
