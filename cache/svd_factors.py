"""Both sides of each target weight's thin SVD, for methods whose frozen factors are U_r S_r and Vh_r (PSOFT).

Computed only when such an adapter is loaded (most servers never pay for it), per layer, the way PEFT
computes them at load (`torch.linalg.svd` of the float32 weight, its own sign choices, not the canonical
signs of cache/basis.py): a PSOFT core only means something against the SVD its trainer saw, and PEFT
recomputes that SVD at every load rather than saving it. Kept in memory, largest rank asked so far.
Beside them it hands out the server's own basis rows (cache/basis.py's P, which the base GEMM serves), so a
method can express PEFT's factors in that basis once at load (adapters/methods/psoft.py).

Not cached on disk: a restart redoes the SVD of each layer a PSOFT adapter adapts, at its first load (PEFT does
the same at every load). Vh_r per layer could go in a safetensors file beside the basis (atomic writes, a
manifest checksum, as cache/basis_cache.py does) if that start-up cost shows on large models.
"""

from __future__ import annotations

import threading

import torch
from torch import nn


class SvdFactors:
    is_local = True
    """The factors can be computed here (the model's weights are in this process)."""

    def __init__(self, linears: dict[str, nn.Linear], basis_p: dict[str, torch.Tensor] | None = None):
        """linears: full module name -> the base model's target linear (read when first asked); basis_p: the
        server's basis (cache.basis_cache.Basis.p), for basis_rows."""
        self._linears = linears
        self._basis_p = basis_p or {}
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

    def basis_rows(self, layer: str, r: int) -> torch.Tensor:
        """The first r rows of the server's basis P of the layer [r, in], float32 on the CPU (as served: a bf16
        server's P is its bf16 copy)."""
        return self._basis_p[layer][:r].to(device="cpu", dtype=torch.float32)


def svd_factors_of(model: nn.Module, basis) -> SvdFactors:
    """The SVD factors of `model`'s target linears (the basis's groups); nothing is computed yet."""
    return SvdFactors({layer: model.get_submodule(layer) for info in basis.groups.values() for layer in info.layers},
                      basis.p)


class SvdFactorsInCore:
    """Stands for the SVD factors in another process (the engine core's, which holds the model): enough for an
    HTTP front end to accept PSOFT uploads; the core loads them against its own SvdFactors (and refuses there
    what only the SVD can tell: a subspace that leaves the basis)."""

    is_local = False

    def __contains__(self, layer: str) -> bool:
        return True

    def top(self, layer: str, r: int):
        raise RuntimeError("the SVD factors live in the engine core's process; PSOFT adapters are loaded there")
