"""Dense merge: fold an adapter into the base weights (`W0 + U_r B`) as a plain transformers model.

Users deploying elsewhere want this; tests use it as the slow reference every fast path must match.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.format import Adapter
from adapters.registry import get_method
from adapters.targets import find_target_linears, group_of


@torch.no_grad()
def merge_adapter(model: nn.Module, basis, adapter: Adapter) -> nn.Module:
    """Add the adapter's dense delta to each target weight of an unwrapped model, in place."""
    method = get_method(adapter.config.method)
    cores = method.group_cores(adapter.tensors)
    linears = find_target_linears(model, tuple(cores))
    for name, linear in linears.items():
        core = cores[group_of(name)]
        u = basis.u[name].to(linear.weight.device)
        delta = method.delta_weight(core.to(linear.weight.device), u)  # float32 [out, in]
        linear.weight.copy_((linear.weight.to(torch.float32) + delta).to(linear.weight.dtype))
    return model
