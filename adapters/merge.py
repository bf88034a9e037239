"""Dense merge: fold an adapter into the base weights (`W0 + M P` for PiCa) as a plain transformers model.

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
    """Add the adapter's dense delta to each target weight of an unwrapped model, in place."""
    method = get_method(adapter.config.method)
    for name, linear in find_target_linears(model, adapter.config.target_modules).items():
        delta = method.delta_weight_for(adapter, name, basis)  # float32 [out, in]
        weight = linear.weight
        weight.copy_((weight.to(torch.float32) + delta.to(weight.device)).to(weight.dtype))
    return model
