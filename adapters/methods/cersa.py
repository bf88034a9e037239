"""CERSA: a separate model W_l = U_k C_l V_k per target layer, written out by `pica-serve merge`, never served.

The reading taken (README, "CERSA"): the paper (Ge et al., arXiv:2605.08174, "Cumulative Energy-Retaining Subspace
Adaptation"; no code is public and the stored copy holds only its abstract) keeps each weight's principal components
holding 90-95% of its spectral energy and fine-tunes "low-rank representations derived from this principal
subspace"; the issue's seed pins the rest: U_k and V_k are frozen and a core between them is trained, the rest of
W0 is dropped. So, in PyTorch layout, for W0 [out, in] = U diag(s) Vh:
- k is the smallest rank whose squared singular values reach `energy_threshold` of their sum (energy_rank);
- U_k [out, k] holds the top left singular vectors as columns, V_k [k, in] the top right ones as rows (Vh[:k]);
- C [k, k] is a full trained core (diag(s_k) before training); the layer's weight is U_k C V_k, its bias W0's.
The file holds U_k and V_k as well as C: a core only means something against the exact vectors it was trained
between, and recomputing them on another machine flips signs and rotates near-equal pairs with no error raised.
Stored, the model is exact and the same everywhere; they are checked to be orthonormal and to span W0's top-k
subspaces (their captured energy), which ties the file to its base weights beyond the checksum.
"""

from __future__ import annotations

import json

import torch

from adapters.methods.base import AdapterMethod, Factors, Scope
from adapters.registry import register_method
from adapters.targets import GroupInfo, group_of

FORMAT_VERSION = 1
"""1: U.<layer> [out, k], core.<layer> [k, k], V.<layer> [k, in] per target layer."""
KNOWN_KEYS = ("method", "format_version", "energy_threshold", "target_modules", "ranks", "base_model",
              "basis_checksum")
PAPER_THRESHOLDS = (0.90, 0.95)
"""The range of energy thresholds the paper reports; others are read, with a warning."""
ENERGY_TOLERANCE = 5e-4
"""A file's k may be the energy rule's at any threshold within this of its own. Its trainer's SVD moves the
cumulative energies by less (float32 by ~1e-7; bf16 rounding of the weights by up to 7e-5 on 64 x 64 weights,
less on larger ones); a k off by more follows another rule (the sum of singular values, a strict inequality)."""
SUBSPACE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
"""How far U_k, V_k of each dtype may be from orthonormal, and their captured energy from the top-k energy
(relative): a few units of the dtype's rounding over the sizes of real weights."""


def tensor_names(layer: str) -> tuple[str, str, str]:
    return f"U.{layer}", f"core.{layer}", f"V.{layer}"


def energy_rank(energies: torch.Tensor, threshold: float) -> int:
    """The smallest k with sum(energies[:k]) >= threshold * sum(energies); energies are the squared singular
    values, descending (float64)."""
    cumulative = torch.cumsum(energies, 0) / energies.sum()
    return min(int((cumulative < threshold).sum()) + 1, energies.numel())


def weight_energies(weight: torch.Tensor) -> torch.Tensor:
    """Squared singular values of weight [out, in], descending, float64 on its device: the eigenvalues of the
    smaller Gram matrix, much cheaper than an SVD for the same numbers."""
    w = weight.detach().to(torch.float64)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


@register_method
class Cersa(AdapterMethod):
    name = "cersa"
    factors = Factors(expand=Scope.LAYER, core=Scope.LAYER, shrink=Scope.LAYER)  # of the weight itself, not a delta
    separate_model = True

    def separate_model_reason(self) -> str:
        # under the 300 characters an HTTP error quotes of each problem
        return ("CERSA keeps only the top singular components of each weight and drops the rest of W0, so its model is "
                "not this base model plus a delta: it is a separate model. Write it out with `pica-serve merge --model "
                "BASE --adapter DIR --out OUT`, then `pica-serve serve --model OUT`")

    def parse_config(self, raw: dict, expect, problems: list[str], warnings: list[str]):
        from adapters.format import CONFIG_FILE, AdapterConfig, check_target_modules

        start = len(problems)
        unknown = sorted(set(raw) - set(KNOWN_KEYS))
        if unknown:
            warnings.append(f"{CONFIG_FILE}: ignoring unknown keys {unknown}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            problems.append(f"CERSA format_version {str(version)[:20]} is not read; this server reads format "
                            f"{FORMAT_VERSION} (U.<layer> [out, k], core.<layer> [k, k], V.<layer> [k, in])")
        threshold = raw.get("energy_threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold < 1:
            problems.append(f"energy_threshold must be a number between 0 and 1 (the share of each weight's squared "
                            f"singular values kept; the paper keeps 0.9 to 0.95), got {str(threshold)[:40]}")
            threshold = None
        elif not PAPER_THRESHOLDS[0] <= threshold <= PAPER_THRESHOLDS[1]:
            warnings.append(f"energy_threshold {threshold} is outside the 0.9-0.95 the CERSA paper keeps")
        found, targets = check_target_modules(raw.get("target_modules"), expect.groups)
        problems += found
        layers: dict[str, GroupInfo] = {layer: expect.groups[t] for t in targets or () if t in expect.groups
                                         for layer in expect.groups[t].layers}
        ranks = raw.get("ranks")
        if not isinstance(ranks, dict):
            problems.append("ranks must map every target layer's full module name to its k, got "
                            f"{str(ranks)[:80]}")
            ranks = None
        elif targets is not None:
            missing = sorted(set(layers) - set(ranks))
            extra = sorted(set(ranks) - set(layers))
            if missing:
                problems.append(f"ranks lacks target layers {missing[:8]}{' ...' if len(missing) > 8 else ''}: "
                                "CERSA replaces every layer of each target group")
            if extra:
                problems.append(f"ranks names {extra[:8]}, which are not layers of the target groups "
                                f"{list(targets)}")
            for layer in sorted(set(ranks) & set(layers)):
                k, info = ranks[layer], layers[layer]
                in_features = info.in_features[info.layers.index(layer)]
                if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(info.out_features, in_features):
                    problems.append(f"ranks[{layer!r}] must be an integer in [1, {min(info.out_features, in_features)}]"
                                    f" (the weight is [{info.out_features}, {in_features}]), got {str(k)[:20]}")
        checksum = raw.get("basis_checksum")
        if not isinstance(checksum, str):
            problems.append("basis_checksum (the base model's fingerprint) is required: a CERSA file replaces whole "
                            "weights, so it must name the model it was cut from")
        elif checksum != expect.basis_checksum:
            problems.append(f"CERSA file was cut from the base model with checksum {checksum[:16]}..., this one's is "
                            f"{expect.basis_checksum[:16]}... (another base model)")
        if expect.basis_kind != "principal":
            problems.append(f"CERSA needs the base model's principal basis checksum, not {expect.basis_kind!r}")
        if len(problems) > start:
            return None
        base_model = raw.get("base_model")
        return AdapterConfig(self.name, max(ranks.values()), tuple(targets),
                             base_model if isinstance(base_model, str) else None, checksum,
                             layer_ranks={layer: ranks[layer] for layer in layers},
                             peft_options={"energy_threshold": float(threshold)})

    def max_elements(self, expect) -> int:
        """No server takes a CERSA file (it is a separate model), so it never raises the upload limit."""
        return 0

    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for info in groups.values():
            for layer, in_features in zip(info.layers, info.in_features):
                shapes.update(self._layer_shapes(layer, info.out_features, in_features, r))
        return shapes

    @staticmethod
    def _layer_shapes(layer: str, out_features: int, in_features: int, k: int) -> dict[str, tuple[int, ...]]:
        u, core, v = tensor_names(layer)
        return {u: (out_features, k), core: (k, k), v: (k, in_features)}

    def expected_tensors_for(self, config, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for info in groups.values():
            for layer, in_features in zip(info.layers, info.in_features):
                shapes.update(self._layer_shapes(layer, info.out_features, in_features, config.layer_ranks[layer]))
        return shapes

    def check_values(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        problems = []
        for name, t in sorted(tensors.items()):
            side = name.split(".", 1)[0]
            if side not in ("U", "V") or t.dtype not in SUBSPACE_TOLERANCE or not torch.isfinite(t).all():
                continue
            m = t.to(torch.float64)
            gram = m.T @ m if side == "U" else m @ m.T  # [k, k]
            error = float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max())
            if error > SUBSPACE_TOLERANCE[t.dtype]:
                what = "columns" if side == "U" else "rows"
                problems.append(f"tensor {name}: its {what} must be orthonormal (frozen singular vectors), but "
                                f"{'U^T U' if side == 'U' else 'V V^T'} is {error:.2e} from the identity")
        return problems

    def check_against_base(self, config, tensors: dict[str, torch.Tensor], expect) -> list[str]:
        """Each layer's k follows the energy rule on W0's spectrum, and its U_k, V_k span W0's top-k subspaces:
        for orthonormal U, V the energy ||U^T W0 V^T||^2 reaches the top-k energy only then (Ky Fan)."""
        problems = []
        threshold = config.peft_options["energy_threshold"]
        for layer, k in config.layer_ranks.items():
            weight = expect.base_weights[layer]
            energies = weight_energies(weight)
            k_low, k_high = (energy_rank(energies, threshold - ENERGY_TOLERANCE),
                             energy_rank(energies, min(threshold + ENERGY_TOLERANCE, 1.0)))
            kept = float(energies[:k].sum() / energies.sum())
            if not k_low <= k <= k_high:
                span = f"k={k_low}" if k_low == k_high else f"k in [{k_low}, {k_high}]"
                problems.append(f"layer {layer}: k={k} keeps {kept:.2%} of the weight's energy (squared singular "
                                f"values); energy_threshold {threshold} gives {span}")
            u_name, _, v_name = tensor_names(layer)
            if u_name not in tensors or v_name not in tensors:
                continue  # reported already: missing, misshapen or non-finite
            u, v, w = tensors[u_name], tensors[v_name], weight.detach().to(torch.float64)
            captured = float(((u.to(w.device, torch.float64).T @ w) @ v.to(w.device, torch.float64).T).square().sum())
            top = float(energies[:k].sum())
            tolerance = max(SUBSPACE_TOLERANCE[u.dtype], SUBSPACE_TOLERANCE[v.dtype])
            if top > 0 and abs(captured / top - 1) > tolerance:
                problems.append(f"layer {layer}: U and V do not span the weight's top-{k} singular subspaces (they "
                                f"capture {captured / top:.4f} of the top-{k} energy): they were cut from another "
                                "weight")
        return problems

    def merged_weight(self, adapter, layer: str, weight: torch.Tensor, basis) -> torch.Tensor:
        """U_k C V_k [out, in] (float32): W0 is dropped, not added to."""
        u, core, v = (adapter.tensors[name].to(torch.float32) for name in tensor_names(layer))
        return u @ core @ v

    def trained_factor(self, tensors, part: str, layer: str, group: GroupInfo):
        raise NotImplementedError("a CERSA file is a separate model, not a delta on W0: merge it (merged_weight)")

    def delta_weight_for(self, adapter, layer: str, basis) -> torch.Tensor:
        raise NotImplementedError("a CERSA file is a separate model, not a delta on W0: merge it (merged_weight)")


def cersa_config_json(energy_threshold: float, ranks: dict[str, int], basis_checksum: str,
                      base_model: str | None = None) -> str:
    """adapter_config.json of a CERSA folder (target_modules from the layers' groups, in first-seen order)."""
    groups = list(dict.fromkeys(group_of(layer) for layer in ranks))
    return json.dumps({"method": "cersa", "format_version": FORMAT_VERSION, "energy_threshold": energy_threshold,
                       "target_modules": groups, "ranks": ranks, "base_model": base_model,
                       "basis_checksum": basis_checksum}, indent=2)

