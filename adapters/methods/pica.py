"""PiCa: W = W0 + M_g P, with P the top-r right singular vectors of W0 (rows of Vh, [r, in], frozen,
per layer) and one M_g [out, r] shared by every layer of functional group g. The file holds one
tensor `M.<group>` [out_features, r] per group (adapter format 2), and may hold `signs.<group>`
[num_layers, r] of +-1: the per-layer diagonal core of an adapter trained against a basis whose
vectors' signs differ from ours layer by layer (W = W0 + M_g diag(signs_l) P_l; see `pica-serve import`).
"""

from __future__ import annotations

import torch

from adapters.methods.base import SLOT_SERVED, AdapterMethod
from adapters.registry import register_method
from adapters.targets import GroupInfo, group_of


@register_method
class PiCa(AdapterMethod):
    name = "pica"
    factors = SLOT_SERVED  # M per group, diagonal signs per layer, P frozen: the layout the GPU slot stacks serve

    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        return {f"M.{g}": (info.out_features, r) for g, info in groups.items()}

    def optional_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        return {f"signs.{g}": (len(info.layers), r) for g, info in groups.items()}

    def outdated_format(self, tensors: dict[str, torch.Tensor]) -> str | None:
        if not any(name.startswith("B.") for name in tensors):
            return None
        return ("tensors B.<group> [r, in_features] are the transposed PiCa of adapter format 1 (W0 + U B); format 2 "
                "holds M.<group> [out_features, r] (W0 + M P, P the top right singular vectors): retrain the adapter, "
                "or convert one from the authors' code with `pica-serve import`")

    def check_values(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        return [f"tensor {name} must hold only +1 and -1" for name, t in sorted(tensors.items())
                if name.startswith("signs.") and not bool((t.abs() == 1).all())]

    def trained_factor(self, tensors: dict[str, torch.Tensor], part: str, layer: str, group: GroupInfo):
        if part == "expand":
            return tensors[f"M.{group_of(layer)}"]
        assert part == "core", part
        signs = tensors.get(f"signs.{group_of(layer)}")
        return None if signs is None else torch.diag(signs[group.layers.index(layer)].float())

    def slot_tensors(self, tensors: dict[str, torch.Tensor], groups) -> dict[str, torch.Tensor]:
        served = {g: tensors[f"M.{g}"] for g in groups}
        served.update({f"signs.{g}": tensors[f"signs.{g}"] for g in groups if f"signs.{g}" in tensors})
        return served
