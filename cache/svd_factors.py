"""Both sides of each target weight's thin SVD, for methods whose frozen factors are U_r S_r and Vh_r (PSOFT).

Computed only when such an adapter is loaded (most servers never pay for it), per layer, the way PEFT
computes them at load (`torch.linalg.svd` of the float32 weight, its own sign choices, not the canonical
signs of cache/basis.py): a PSOFT core only means something against the SVD its trainer saw, and PEFT
recomputes that SVD at every load rather than saving it. Kept in memory, largest rank asked so far.
"""

from __future__ import annotations

import threading

import torch
from torch import nn


class SvdFactors:
    def __init__(self, linears: dict[str, nn.Linear]):
        """linears: full module name -> the base model's target linear (read when first asked)."""
        self._linears = linears
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def __contains__(self, layer: str) -> bool:
        return layer in self._linears

    @torch.no_grad()
    def top(self, layer: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_r diag(S_r) [out, r], Vh_r [r, in]) of the layer's weight, float32 on the CPU."""
        with self._lock:
            cached = self._factors.get(layer)
            if cached is None or cached[1].shape[0] < r:
                weight = self._linears[layer].weight.detach().to(torch.float32)
                u, s, vh = torch.linalg.svd(weight, full_matrices=False)
                keep = max(r, 64)
                cached = ((u[:, :keep] * s[:keep]).cpu(), vh[:keep].cpu())
                self._factors[layer] = cached
        return cached[0][:, :r], cached[1][:r]


def svd_factors_of(model: nn.Module, basis) -> SvdFactors:
    """The SVD factors of `model`'s target linears (the basis's groups); nothing is computed yet."""
    return SvdFactors({layer: model.get_submodule(layer) for info in basis.groups.values() for layer in info.layers})


class SvdFactorsInCore:
    """Stands for the SVD factors in another process (the engine core's, which holds the model): enough for an
    HTTP front end to accept PSOFT uploads; the core loads them against its own SvdFactors."""

    def __contains__(self, layer: str) -> bool:
        return True

    def top(self, layer: str, r: int):
        raise RuntimeError("the SVD factors live in the engine core's process; PSOFT adapters are loaded there")
