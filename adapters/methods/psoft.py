"""PSOFT, read from PEFT folders unchanged: W = W0 + U_r S_r (R_l - I) Vh_r per adapted layer.

What PEFT 0.21 does (peft/tuners/psoft/layer.py): frozen A = Vh_r [r, in] and B = U_r diag(S_r) / scaling
[out, r] from `torch.linalg.svd` of the float32 base weight, recomputed at every load and not saved; per
adapter and layer a packed skew vector `psoft_R.weight` [r(r-1)/2] (the strict upper triangle, row by row),
and with psoft_mag_a / psoft_mag_b the vectors `vector_a`, `vector_b` [r]. R = diag(b) C diag(a), C the
Cayley transform of the skew Q, exact `(I + Q)(I - Q)^-1` or its Neumann series (with use_cayley_neumann);
with psoft_orth false, `psoft_R.weight` is R itself [r, r]. The delta is `scaling B (R - I) A`, and scaling
(psoft_alpha / r) cancels the 1 / scaling inside B. So E = U_r S_r and S = Vh_r are frozen per layer, from
cache/svd_factors.py (computed only when a PSOFT adapter arrives), and K = R - I [r, r] per adapter and
layer is computed once at load.

Served with the frozen factors shared by every adapter, from the basis the base GEMM already serves. With
A = Vh_r, B = U_r S_r = W0 A^T and the server's basis rows P (cache/basis.py: the same top subspace, other
signs; its first R rows, R = --max-psoft-rank capped at the group's basis rank), Q = A P^T [r, R] gives
A = Q P wherever A's rows lie in span(P), so the delta B K A = (W0 P^T) (Q^T K Q) P. Per adapter and layer the
slot holds only K' = Q^T K Q [R, R] (computed here at load); z = P x comes from the base GEMM and E = W0 P^T
[out, R] is held once per layer (adapters/layer.py, adapters/core_ops.py). Where A leaves span(P) (singular
values tied at the cut, or a random basis) that identity fails, and the adapter is refused at load with the
residual (SUBSPACE_TOLERANCE). Merge needs none of this: it folds in B K A itself.
"""

from __future__ import annotations

import math
import re

import torch

from adapters.methods.base import AdapterMethod, Factors, Scope
from adapters.methods.peft_folder import PEFT_PREFIX, common_config_problems
from adapters.registry import register_method
from adapters.targets import GroupInfo, group_of

UNSERVED_OPTIONS = {
    "modules_to_save": "modules_to_save (fully trained copies of modules) is not served: only deltas on the "
                       "target linears are",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights) is not served: the base model's target layers are nn.Linear",
}


SUBSPACE_TOLERANCE = 1e-2
"""Largest residual accepted, over a layer's rows, of PEFT's Vh_r against the server's basis: |a - Q_a P| for each
row a of Vh_r (a unit vector), the sine of its angle to span(P). A matching subspace leaves rounding: about 1e-6
with a float32 basis, 2e-3 with a bf16 one (a bf16 server's serving copy). Above it the delta served would miss
that share of the adapter's direction, so the adapter is refused rather than served wrong."""


def basis_alignment(vh: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(Q = Vh P^T [r, R] float32, the largest row norm of Vh - Q P) for vh [r, in] and basis rows p [R, in]: Q is
    a signed permutation (a rotation within tied singular values) when vh's rows lie in span(p)."""
    vh, p = vh.double(), p.double()
    q = vh @ p.T
    return q.float(), float((vh - q @ p).norm(dim=1).max())


def tensor_name(layer: str, part: str) -> str:
    return f"{PEFT_PREFIX}{layer}.psoft_R.{part}"


def cayley(q: torch.Tensor, num_neumann_terms: int | None, eps: float | None) -> torch.Tensor:
    """The orthogonal matrix of a skew-symmetric q [r, r]: exact (I + q)(I - q)^-1 when num_neumann_terms is
    None, else PEFT's truncated series I + 2q + 2q^2 + ... + 2q^(t-2) + q^(t-1) (q scaled to Frobenius norm
    eps first when eps is set and smaller)."""
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    if num_neumann_terms is None:
        return torch.linalg.solve(eye - q, eye + q, left=False)
    if eps is not None:
        norm = torch.linalg.norm(q)
        if torch.isfinite(norm) and norm > eps:
            q = q * (eps / (norm + 1e-12))
    t = int(num_neumann_terms)
    if t <= 1:
        return eye
    r = eye + 2 * q
    if t == 2:
        return r
    power = q @ q
    r = r + 2 * power
    for _ in range(3, t - 1):  # as PEFT counts its terms (t = 3 and t = 4 give the same series)
        power = power @ q
        r = r + 2 * power
    return r + power @ q


@register_method
class Psoft(AdapterMethod):
    name = "psoft"
    peft_type = "PSOFT"
    factors = Factors(expand=Scope.FROZEN, core=Scope.LAYER, shrink=Scope.FROZEN)

    def parse_peft_config(self, raw: dict, expect, problems: list[str], warnings: list[str]):
        from adapters.format import AdapterConfig

        start = len(problems)
        problems += common_config_problems(raw, UNSERVED_OPTIONS)
        if raw.get("ab_svd_init", "psoft_init") != "psoft_init":
            problems.append(f"ab_svd_init={raw['ab_svd_init']!r} puts sqrt(S) on both sides of the core; only "
                            "'psoft_init' (A = Vh_r, B = U_r S_r) is served")
        if raw.get("psoft_svd", "full") != "full":
            problems.append(f"psoft_svd={raw['psoft_svd']!r} (a randomized SVD) is not served: the core only "
                            "means something against the exact SVD; train with psoft_svd='full'")
        r = raw.get("r")
        if expect.svd_factors is None:
            problems.append("PSOFT needs both sides of the base weights' SVD, which is not available here")
        if len(problems) > start:
            return None
        terms = raw.get("num_cayley_neumann_terms", 5) if raw.get("use_cayley_neumann") else None
        base_model = raw.get("base_model_name_or_path")
        return AdapterConfig(self.name, r, (), base_model if isinstance(base_model, str) else None, peft_options={
            "orth": raw.get("psoft_orth", True), "mag_a": raw.get("psoft_mag_a", True),
            "mag_b": raw.get("psoft_mag_b", True), "neumann_terms": terms, "eps": raw.get("cayley_neumann_eps")})

    def resolve(self, config, tensors: dict[str, torch.Tensor], expect, problems: list[str]):
        from dataclasses import replace

        served = {layer: g for g, info in expect.groups.items() for layer in info.layers}
        layers, unknown = set(), []
        for name in tensors:
            match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.psoft_R\.(weight|vector_a|vector_b)", name)
            (layers.add(match.group(1)) if match and match.group(1) in served else unknown.append(name))
        if unknown:
            problems.append(f"tensors {sorted(unknown)[:8]} are not PSOFT cores of a layer this server adapts "
                            f"(its target groups are {sorted(expect.groups)})")
        if not layers:
            if not unknown:
                problems.append("the adapter holds no psoft_R tensors")
            return config
        groups = tuple(g for g in expect.groups if any(served[layer] == g for layer in layers))
        options = {**config.peft_options, "svd_factors": expect.svd_factors}
        if expect.slot_served:
            options.update(self._served_options(config.r, sorted(layers), groups, expect, problems))
        return replace(config, target_modules=groups, layer_ranks={layer: config.r for layer in sorted(layers)},
                       layer_scaling={layer: 1.0 for layer in sorted(layers)}, peft_options=options)

    @staticmethod
    def _served_options(r: int, layers: list[str], groups: tuple[str, ...], expect, problems: list[str]) -> dict:
        """Check that the server can serve rank r here and, where the SVD is at hand, express PEFT's A in the
        server's basis: {"basis_q": layer -> Q [r, R], "layer_index": layer -> (group, index, num_layers)}."""
        start = len(problems)
        if r > expect.max_core_rank:
            problems.append(f"PSOFT rank {r} exceeds this server's --max-psoft-rank {expect.max_core_rank} (each "
                            f"GPU slot holds PSOFT cores up to that rank; start it with --max-psoft-rank {r} or more)")
        for g in groups:
            if r > expect.group_rank[g]:
                problems.append(f"PSOFT rank {r} exceeds the basis rank {expect.group_rank[g]} of group {g!r} (PSOFT's "
                                f"frozen factors are served from the basis: start the server with --rank-max {r} or "
                                "more)")
        if len(problems) == start and expect.basis_kind != "principal" and not getattr(expect.svd_factors, "is_local",
                                                                                        False):
            # what the front end can tell without the model (the engine core's load would refuse it, too late
            # for a 400: the stored adapter would then fail every request)
            problems.append(f"PSOFT's frozen factors are the top singular vectors of W0, served from the basis; this "
                            f"server's basis is {expect.basis_kind!r}, not 'principal' (`pica-serve merge` folds the "
                            "adapter in without the basis)")
        if len(problems) > start or not getattr(expect.svd_factors, "is_local", False):
            return {}  # a front end without the model: the engine core checks the subspace at its load
        svd, q_of, worst = expect.svd_factors, {}, []
        for layer in layers:
            width = min(expect.max_core_rank, expect.group_rank[group_of(layer)])
            q_of[layer], residual = basis_alignment(svd.top(layer, r)[1], svd.basis_rows(layer, width))
            if residual > SUBSPACE_TOLERANCE:
                worst.append((residual, layer, width))
        if worst:
            residual, layer, width = max(worst)
            problems.append(
                f"PSOFT's frozen factors leave this server's basis in {len(worst)} of {len(layers)} layers: the top-{r} "
                f"right singular vectors PEFT takes (Vh_r) are not in the span of the basis's top {width} rows, up to "
                f"a residual of {residual:.3g} in {layer} (accepted: {SUBSPACE_TOLERANCE:g}); usually singular values "
                "tied at the rank cut, or a random basis. A larger --max-psoft-rank (up to the basis rank) serves more "
                "basis rows; `pica-serve merge` folds the adapter in without the basis")
            return {}
        index = {}
        for layer in layers:
            info = expect.groups[group_of(layer)]
            index[layer] = (group_of(layer), info.layers.index(layer), len(info.layers))
        return {"basis_q": q_of, "layer_index": index}

    def max_elements(self, expect) -> int:
        """Bounded by the core stacks' rank, not the basis's."""
        return sum(math.prod(shape) for shape in self.expected_tensors(expect.max_core_rank, expect.groups).values())

    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        return {name: shape for info in groups.values() for layer in info.layers
                for name, shape in self._layer_tensors(layer, r, True, True, True).items()}

    @staticmethod
    def _layer_tensors(layer: str, r: int, orth: bool, mag_a: bool, mag_b: bool) -> dict[str, tuple[int, ...]]:
        shapes = {tensor_name(layer, "weight"): (r * (r - 1) // 2,) if orth else (r, r)}
        if mag_a:
            shapes[tensor_name(layer, "vector_a")] = (r,)
        if mag_b:
            shapes[tensor_name(layer, "vector_b")] = (r,)
        return shapes

    def expected_tensors_for(self, config, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        o = config.peft_options
        return {name: shape for layer in config.layer_ranks
                for name, shape in self._layer_tensors(layer, config.r, o["orth"], o["mag_a"], o["mag_b"]).items()}

    def core(self, adapter, layer: str) -> torch.Tensor:
        """K = R - I [r, r] (float32) of one layer."""
        o, t, r = adapter.config.peft_options, adapter.tensors, adapter.config.r
        weight = t[tensor_name(layer, "weight")].to(torch.float32)
        if o["orth"]:
            q = torch.zeros(r, r)
            rows, cols = torch.triu_indices(r, r, 1)
            q[rows, cols] = weight
            rot = cayley(q - q.T, o["neumann_terms"], o["eps"])
        else:
            rot = weight
        if o["mag_b"]:
            rot = t[tensor_name(layer, "vector_b")].to(torch.float32)[:, None] * rot
        if o["mag_a"]:
            rot = rot * t[tensor_name(layer, "vector_a")].to(torch.float32)[None, :]
        return rot - torch.eye(r)

    def trained_factor(self, tensors, part: str, layer: str, group: GroupInfo):
        raise NotImplementedError("PSOFT's factors need the parsed adapter: use delta_weight_for / slot_tensors_for")

    def _factors(self, adapter, layer: str):
        expand, shrink = adapter.config.peft_options["svd_factors"].top(layer, adapter.config.r)
        return expand, self.core(adapter, layer) @ shrink  # U_r S_r [out, r], (R - I) Vh_r [r, in]

    def delta_weight_for(self, adapter, layer: str, basis) -> torch.Tensor:
        if layer not in adapter.config.layer_ranks:
            info = basis.groups[group_of(layer)]
            return torch.zeros(info.out_features, info.in_features[info.layers.index(layer)])
        expand, shrink = self._factors(adapter, layer)
        return expand @ shrink

    def slot_tensors_for(self, adapter) -> dict[str, torch.Tensor]:
        """The core stacks' `core.<group>` -> K' = Q^T (R - I) Q [num_layers, R, R] per adapted group (zero in the
        layers it leaves alone), in the server's basis: E = W0 P^T and S = P are the layers' own."""
        options = adapter.config.peft_options
        if "basis_q" not in options:
            raise RuntimeError("this PSOFT adapter was loaded without the server's basis (a merge, or an HTTP front "
                               "end): only the engine core's load can fill a GPU slot")
        served = {}
        for layer, q in options["basis_q"].items():
            group, index, num_layers = options["layer_index"][layer]
            width = q.shape[1]
            cores = served.setdefault(f"core.{group}", torch.zeros(num_layers, width, width))
            cores[index] = q.T @ self.core(adapter, layer) @ q
        return served
