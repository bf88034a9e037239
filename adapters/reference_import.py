"""Import an adapter trained by the PiCa authors' reference implementation into our format.

The reference saves `pica_config.json` (`target_modules`: keywords matched as substrings of module
paths, `rank`, `base_model_name_or_path`) and `pica_adapter.bin` (a torch.save dict
{keyword: M [out, r]}). It trains against P_ref = the top-r rows of Vh from `torch.linalg.svd` in
float32 of the weight as loaded for training, with no sign rule, so its M only means something
against the signs (and, inside near-degenerate singular pairs, the rotations) that run produced.

We express it in our canonical basis P_l per layer: R_l = P_ref_l P_l^T is, up to rounding, the
diagonal of signs s_l where the two top-r subspaces agree, and then

    M_ref P_ref_l = M_ref R_l P_l ~= M diag(s_l) P_l   with   M = mean_l M_ref R_l diag(s_l),

served exactly through PiCa's per-layer diagonal core (`signs.<group>`). What that leaves over, per
layer, ||M_ref P_ref_l - M diag(s_l) P_l|| / ||M_ref P_ref_l||, is the residual we report; a group
above `max_residual` is refused (its subspaces differ: another model, another rank, another weight).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapters.format import AdapterConfig
from adapters.targets import find_target_linears

log = logging.getLogger(__name__)

REFERENCE_CONFIG = "pica_config.json"
REFERENCE_WEIGHTS = "pica_adapter.bin"
MAX_RESIDUAL = 1e-3
"""Largest relative weight-delta error accepted per group. Sign flips and rotations inside singular
pairs whose gap exceeds float32 rounding cost far less (1e-6 to 1e-4 on the models we tried)."""


class ReferenceImportError(ValueError):
    """Why an adapter cannot be imported."""


@dataclass(frozen=True)
class ReferenceAdapter:
    rank: int
    base_model: str | None
    m: dict[str, torch.Tensor]
    """Keyword -> M [out, r]."""


@dataclass(frozen=True)
class ImportResult:
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    residuals: dict[str, float]
    """Group -> the largest relative weight-delta error over its layers."""


def read_reference(folder: Path) -> ReferenceAdapter:
    """Read a reference folder. The weights go through torch.load(weights_only=True): tensors and plain
    containers only, never arbitrary pickled objects."""
    folder = Path(folder)
    try:
        raw = json.loads((folder / REFERENCE_CONFIG).read_text())
        rank, keywords = int(raw["rank"]), list(raw["target_modules"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReferenceImportError(f"{folder / REFERENCE_CONFIG}: not a reference PiCa config ({exc})") from None
    try:
        weights = torch.load(folder / REFERENCE_WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or OSError, by what is wrong
        raise ReferenceImportError(f"{folder / REFERENCE_WEIGHTS} is not a weights-only torch file of tensors: {exc}") from None
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in weights.values()):
        raise ReferenceImportError(f"{REFERENCE_WEIGHTS} must map keywords to 2-D tensors M [out, r]")
    problems = [f"{kw}: shape {list(t.shape)} has no rank {rank}" for kw, t in weights.items() if t.shape[1] != rank]
    problems += [f"{kw} is in target_modules but has no tensor" for kw in keywords if kw not in weights]
    if problems:
        raise ReferenceImportError("; ".join(problems))
    return ReferenceAdapter(rank, raw.get("base_model_name_or_path"), {kw: weights[kw].float() for kw in keywords})


def keyword_groups(keywords, basis) -> dict[str, str]:
    """Keyword -> our group: the layers whose paths hold the keyword must be exactly one group's."""
    mapping, problems = {}, []
    for kw in keywords:
        hits = [g for g, info in basis.groups.items() if any(kw in name for name in info.layers)]
        if len(hits) == 1 and all(kw in name for name in basis.groups[hits[0]].layers):
            mapping[kw] = hits[0]
        else:
            problems.append(f"keyword {kw!r} matches the layers of {hits or 'no group'} (it must match one group, all "
                            f"its layers; this server's groups are {sorted(basis.groups)})")
    if problems:
        raise ReferenceImportError("; ".join(problems))
    return mapping


@torch.no_grad()
def reference_bases(model: nn.Module, layers, rank: int, device: str, train_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference recipe: P_ref = Vh[:rank] of svd(W.float()), W as loaded for training (train_dtype)."""
    linears = find_target_linears(model, tuple({name.rsplit(".", 1)[-1] for name in layers}))
    return {name: torch.linalg.svd(linears[name].weight.to(train_dtype).float().to(device), full_matrices=False)
            .Vh[:rank].cpu() for name in layers}


@torch.no_grad()
def to_our_basis(m_ref: torch.Tensor, p_ref: list[torch.Tensor], p_ours: list[torch.Tensor]):
    """(M [out, r], signs [L, r], residual) for one group: M_ref against the P_ref of its L layers, in ours."""
    m_ref = m_ref.double()
    rotations = [pr.double() @ po.double().T for pr, po in zip(p_ref, p_ours)]  # R_l [r, r]
    signs = torch.stack([torch.where(r.diagonal() < 0, -1.0, 1.0).double() for r in rotations])  # [L, r]
    m = torch.stack([m_ref @ r * s for r, s in zip(rotations, signs)]).mean(0)  # (M_ref R_l) diag(s_l)
    residual = 0.0
    for pr, po, s in zip(p_ref, p_ours, signs):
        ref = m_ref @ pr.double()
        norm = float(ref.norm())
        if norm > 0:
            residual = max(residual, float((ref - (m * s) @ po.double()).norm()) / norm)
    return m.float(), signs.float(), residual


def import_reference(folder: Path, model: nn.Module, basis, p_ref: dict[str, torch.Tensor] | None = None,
                     svd_device: str = "cpu", train_dtype: torch.dtype = torch.float32,
                     max_residual: float = MAX_RESIDUAL, base_model: str | None = None) -> ImportResult:
    """Convert a reference adapter for `model` (with our `basis`); p_ref: the trainer's own bases by module
    name ([>= r, in]) for an exact import, else recomputed by the reference recipe."""
    ref = read_reference(folder)
    groups = keyword_groups(list(ref.m), basis)
    problems = [f"group {g!r}: rank {ref.rank} exceeds the basis rank {basis.group_rank(g)}"
                for g in groups.values() if ref.rank > basis.group_rank(g)]
    problems += [f"keyword {kw!r}: M has {ref.m[kw].shape[0]} rows, group {g!r} has out_features "
                 f"{basis.groups[g].out_features}" for kw, g in groups.items()
                 if ref.m[kw].shape[0] != basis.groups[g].out_features]
    if problems:
        raise ReferenceImportError("; ".join(problems))
    layers = [name for g in groups.values() for name in basis.groups[g].layers]
    if p_ref is None:
        p_ref = reference_bases(model, layers, ref.rank, svd_device, train_dtype)
    missing = [name for name in layers if name not in p_ref]
    if missing:
        raise ReferenceImportError(f"the reference basis has no tensor for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    tensors, residuals = {}, {}
    for kw, g in groups.items():
        names = basis.groups[g].layers
        m, signs, residual = to_our_basis(ref.m[kw], [p_ref[n][: ref.rank] for n in names],
                                          [basis.p[n][: ref.rank].cpu() for n in names])
        tensors[f"M.{g}"] = m
        if (signs < 0).any():
            tensors[f"signs.{g}"] = signs
        residuals[g] = residual
        log.info("group %s (keyword %r): subspace residual %.2e", g, kw, residual)
    refused = {g: r for g, r in residuals.items() if not r <= max_residual}
    if refused:
        raise ReferenceImportError("the reference basis spans another subspace than this model's for "
                           + ", ".join(f"{g} (residual {r:.2e})" for g, r in refused.items())
                           + f"; the limit is {max_residual:g} (another base model or weights?)")
    config = AdapterConfig("pica", ref.rank, tuple(groups.values()), base_model or ref.base_model, basis.checksum,
                           basis.kind)
    return ImportResult(config, tensors, residuals)
