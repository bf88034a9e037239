"""What an adapter method must say so the server can validate, serve and merge it.

Every method here writes its weight delta as three factors, `delta_W(layer) = E @ K @ S`, with
E [out, r], K [r, r] and S [r, in]. Each factor has a scope:
- FROZEN: per layer, the same for every adapter, from the basis cache (P, the top-r right singular
  vectors of W0, serves as S);
- GROUP: per adapter, shared by every layer of a functional group (q_proj, ...);
- LAYER: per adapter and layer;
- IDENTITY: no factor (K only).
PiCa: E per group (M), S frozen (P), K per layer and diagonal (signs; identity unless the adapter
was imported from a basis with other signs). LoRA: S (A) and E (B) per layer, K identity.
PSOFT: E and S frozen (both SVD factors), K per layer (an r x r orthogonal core).
CERSA (`separate_model`): the factors are of the whole weight, not a delta (W = U_k C V_k, W0 dropped), all
three in its file; servers refuse it and merge writes it out (`merged_weight`).
A method is one module in this folder that subclasses AdapterMethod and registers itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from adapters.targets import GroupInfo, group_of


class Scope(str, Enum):
    FROZEN = "frozen per layer"
    GROUP = "per adapter and group"
    LAYER = "per adapter and layer"
    IDENTITY = "identity"


@dataclass(frozen=True)
class Factors:
    """The scope of each factor of `delta_W = E @ K @ S`."""

    expand: Scope
    core: Scope
    shrink: Scope


SLOT_SERVED = Factors(expand=Scope.GROUP, core=Scope.LAYER, shrink=Scope.FROZEN)
"""The layout the slot stacks serve today: S rides in the base GEMM as extra rows ([W0; P] x), each slot
holds one E per group, and the per-layer core is diagonal (a sign per basis vector and layer, which
absorbs another SVD's sign choices: see `pica-serve import`). Full cores and per-layer E's come with
the next methods."""


class AdapterMethod(ABC):
    name: ClassVar[str]
    factors: ClassVar[Factors]
    peft_type: ClassVar[str | None] = None
    """The `peft_type` of the PEFT folders this method reads unchanged (None: only its own format)."""
    separate_model: ClassVar[bool] = False
    """The file is a model of its own, not a delta on W0 (CERSA): servers refuse it, `pica-serve merge` writes it
    out; its factors are then those of the whole weight, and it reads its own adapter_config.json (parse_config)."""

    def separate_model_reason(self) -> str:
        """Why a server refuses this separate-model method's files, and what to do with them instead."""
        return f"{self.name} is a separate model, not a delta on this base model: write it out with `pica-serve merge`"

    def parse_config(self, raw: dict, expect, problems: list[str], warnings: list[str]):
        """An AdapterConfig from this method's own adapter_config.json (separate-model methods, whose keys are not
        PiCa's), appending every problem found to `problems`; None when there are any."""
        raise NotImplementedError(f"{self.name} reads the shared PiCa-style config")

    def parse_peft_config(self, raw: dict, expect, problems: list[str], warnings: list[str]):
        """An AdapterConfig from a PEFT adapter_config.json (only methods with a peft_type), appending
        every problem found to `problems`; None when there are any."""
        raise NotImplementedError(f"{self.name} reads no PEFT folders")

    def max_elements(self, expect) -> int:
        """The most tensor elements a file of this method can hold on a server expecting `expect`."""
        r = max(expect.group_rank.values())
        shapes = {**self.expected_tensors(r, expect.groups), **self.optional_tensors(r, expect.groups)}
        return sum(math.prod(shape) for shape in shapes.values())

    def resolve(self, config, tensors: dict[str, torch.Tensor], expect, problems: list[str]):
        """The config completed from the file's tensors (LoRA: which layers it adapts, at which rank),
        appending problems found; methods whose config says it all return it unchanged."""
        return config

    def expected_tensors_for(self, config, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape for one adapter's config (per-layer methods read its layer ranks)."""
        return self.expected_tensors(config.r, groups)

    def slot_tensors_for(self, adapter) -> dict[str, torch.Tensor]:
        """What one GPU slot holds for this adapter (see slot_tensors)."""
        return self.slot_tensors(adapter.tensors, adapter.config.target_modules)

    @abstractmethod
    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape an adapter file must hold for these groups and rank."""

    def optional_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape an adapter file may hold besides (absent: that factor's default)."""
        return {}

    def outdated_format(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why these tensors are an older format of this method's files (then that is the one problem
        reported about them, not a list of missing and unexpected names), or None."""
        return None

    def check_values(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Problems with tensor values beyond shape, dtype and finiteness (none by default)."""
        return []

    def check_against_base(self, config, tensors: dict[str, torch.Tensor], expect) -> list[str]:
        """Problems found by reading the base weights (`expect.base_weights`; only separate-model methods, which
        are given them), over tensors of the right shape and dtype with finite values."""
        return []

    @abstractmethod
    def trained_factor(self, tensors: dict[str, torch.Tensor], part: str, layer: str, group: GroupInfo):
        """The adapter's own factor `part` ('expand', 'core' or 'shrink') of `layer` (a full module name of
        `group`), or None where the adapter leaves it at identity."""

    def factor(self, tensors: dict[str, torch.Tensor], part: str, layer: str, basis, r: int) -> torch.Tensor | None:
        """Factor `part` of `layer` as a float32 tensor: the adapter's own, the basis's (sliced to r),
        or None for identity."""
        scope = getattr(self.factors, part)
        if scope is Scope.IDENTITY:
            return None
        if scope is Scope.FROZEN:
            if part != "shrink":
                raise NotImplementedError(f"the basis cache holds the shrink factor P only, not a frozen {part}")
            return basis.p[layer][:r].to(torch.float32)
        factor = self.trained_factor(tensors, part, layer, basis.groups[group_of(layer)])
        return None if factor is None else factor.to(torch.float32)

    def delta_weight(self, tensors: dict[str, torch.Tensor], layer: str, basis, r: int) -> torch.Tensor:
        """Dense weight delta [out, in] (float32) of one layer: E @ K @ S."""
        expand, core, shrink = (self.factor(tensors, part, layer, basis, r) for part in ("expand", "core", "shrink"))
        return expand @ shrink if core is None else expand @ core @ shrink

    def delta_weight_for(self, adapter, layer: str, basis) -> torch.Tensor:
        """Dense weight delta [out, in] (float32) of one layer of a parsed Adapter."""
        return self.delta_weight(adapter.tensors, layer, basis, adapter.config.r)

    def merged_weight(self, adapter, layer: str, weight: torch.Tensor, basis) -> torch.Tensor:
        """The layer's weight [out, in] (float32) with the adapter folded in: W0 + delta for every delta method."""
        return weight.to(torch.float32) + self.delta_weight_for(adapter, layer, basis).to(weight.device)

    def slot_tensors(self, tensors: dict[str, torch.Tensor], groups) -> dict[str, torch.Tensor]:
        """What one GPU slot holds for this adapter: `<group>` -> E [out, r], and `signs.<group>` -> the
        diagonal cores [num_layers, r] where the adapter has them. Only SLOT_SERVED methods have one."""
        raise NotImplementedError(f"{self.name}: the slot stacks serve {SLOT_SERVED}, not {self.factors}")
