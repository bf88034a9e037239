"""Dense merge: fold an adapter into the base weights (`W0 + M P` for PiCa; CERSA's `U_k C V_k` in place of W0)
as a plain transformers model.

Users deploying elsewhere want this; tests use it as the slow reference every fast path must match.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.format import Adapter
from adapters.registry import get_method
from adapters.targets import find_target_linears


@torch.no_grad()
def merge_adapter(model: nn.Module, basis, adapter: Adapter) -> nn.Module:
    """Fold the adapter into each target weight of an unwrapped model, in place: W0 + delta, or for a
    separate-model method (CERSA) its own weight U_k C V_k, W0 dropped."""
    method = get_method(adapter.config.method)
    for name, linear in find_target_linears(model, adapter.config.target_modules).items():
        weight = linear.weight
        weight.copy_(method.merged_weight(adapter, name, weight, basis).to(weight.device, weight.dtype))
    return model
