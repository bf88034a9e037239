"""Builds a CERSA folder from a base model (tests, bench): per target layer the top-k SVD by the energy rule and
a core near diag(S_k), standing in for a trained one (no CERSA trainer exists here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapters.methods.cersa import cersa_config_json, energy_rank, tensor_names
from adapters.targets import find_target_linears
from cache.basis import canonical_signs
from cache.basis_cache import basis_checksum


@dataclass(frozen=True)
class CersaFactors:
    u: torch.Tensor
    """[out, k] top left singular vectors (columns)."""
    s: torch.Tensor
    """[k] top singular values."""
    v: torch.Tensor
    """[k, in] top right singular vectors (rows), each signed so its largest-magnitude entry is positive."""


def cersa_factors(weight: torch.Tensor, energy_threshold: float) -> CersaFactors:
    """The top-k SVD of weight [out, in] in float64, k by the energy rule; U's columns share V's row signs, so
    U_k diag(S_k) V_k is the truncated weight whatever signs the SVD chose."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64).cpu(), full_matrices=False)
    k = energy_rank(s.square(), energy_threshold)
    v = canonical_signs(vh[:k])
    signs = (v * vh[:k]).sum(1)  # [k] of +-1: the flip canonical_signs made to each row
    return CersaFactors(u[:, :k] * signs, s[:k], v)


@torch.no_grad()
def build_cersa(model: nn.Module, target_modules: tuple[str, ...], energy_threshold: float = 0.9,
                core_noise: float = 0.1, seed: int = 0) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(ranks, tensors) of a CERSA file for `model`: per target layer U_k, V_k (float32) and a core
    diag(S_k) + core_noise * mean(S_k) * G / sqrt(k), G standard normal (core_noise 0: the truncated SVD)."""
    gen = torch.Generator().manual_seed(seed)
    ranks, tensors = {}, {}
    for layer, linear in find_target_linears(model, target_modules).items():
        f = cersa_factors(linear.weight, energy_threshold)
        k = f.s.numel()
        noise = torch.randn(k, k, generator=gen, dtype=torch.float64) * (core_noise * float(f.s.mean()) / k**0.5)
        u_name, core_name, v_name = tensor_names(layer)
        tensors[u_name], tensors[core_name], tensors[v_name] = (
            t.to(torch.float32).contiguous() for t in (f.u, torch.diag(f.s) + noise, f.v))
        ranks[layer] = k
    return ranks, tensors


def write_cersa_dir(path: Path, model: nn.Module, target_modules: tuple[str, ...], energy_threshold: float = 0.9,
                    core_noise: float = 0.1, seed: int = 0, base_model: str | None = None) -> Path:
    """Write a CERSA folder for `model` (see build_cersa), naming the model by its basis checksum."""
    ranks, tensors = build_cersa(model, target_modules, energy_threshold, core_noise, seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS_FILE).write_bytes(save_safetensors_bytes(tensors))
    config = cersa_config_json(energy_threshold, ranks, basis_checksum(model, "principal"), base_model)
    (path / CONFIG_FILE).write_text(config)
    return path
