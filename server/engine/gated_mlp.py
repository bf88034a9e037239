"""A gated MLP, `down_proj(silu(gate_proj(x)) * up_proj(x))` (Llama, Mistral, Qwen2), whose silu·mul runs
inside down_proj's shrink in decode-sized steps with adapters.

The shrink kernel then takes the gate and up projections and makes silu(gate) * up on the way, so the
two elementwise launches (silu, then the product) go: 64 fewer per Llama-3-8B step with adapters, whose
step then launches as many kernels as the base model's (947). In the engine's step (8 adapters r=32,
batch 64, shrink-in-situ-h100.json) 9.89 against 9.97 ms. The base-model path is the module's own. An
MLP is only wrapped after its forward gives exactly the result of that formula on a test input, so one
that computes something else (another activation, say) keeps its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.layer import AdaptedLinear
from adapters.targets import replace_module, unwrap_modules

GATE_INSIDE_MAX_TOKENS = 256
"""Steps up to this many tokens (decode) run silu·mul inside down_proj's shrink; longer ones (prefill)
keep it apart, where the fused kernel was not timed."""
GATE_INSIDE_MAX_RANK = 64
"""Only where down_proj's stack rank is at most this: at r=256 the kernel's programs each loop over all
14336 input features and recompute silu·mul for every block of rows (8 adapters r=256, batch 64: 15.3 ms
per step in decode-llama3-8b-h100-gated-all-ranks.json against 13.1 with silu·mul apart)."""


class GatedMLP(nn.Module):
    """Wraps a model's gated MLP module (keeping its layers)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        shared = mlp.down_proj.shared_input
        index = shared.slot_index
        if not (index.any_adapter and index.num_tokens <= GATE_INSIDE_MAX_TOKENS):
            return mlp(x)
        return mlp.down_proj(shared.input_from(mlp.gate_proj(x), up=mlp.up_proj(x)))


def _is_gated_silu(module: nn.Module) -> bool:
    """down_proj an adapted layer reading an input of its own (stack rank <= GATE_INSIDE_MAX_RANK), and
    forward == the formula on a test input."""
    down = getattr(module, "down_proj", None)
    if not (isinstance(down, AdaptedLinear) and down.shared_input.ranks.shape[0] == 1
            and down.shared_input.stack.shape[1] <= GATE_INSIDE_MAX_RANK
            and all(hasattr(module, name) for name in ("gate_proj", "up_proj"))):
        return False
    weight = down.base.weight
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(3, down.base.out_features, generator=gen, device=weight.device).to(weight.dtype)
    with torch.no_grad():
        try:
            return torch.equal(module(x), down(F.silu(module.gate_proj(x)) * module.up_proj(x)))
        except (RuntimeError, TypeError, AttributeError):  # another signature or layout: leave it alone
            return False


def fuse_gated_mlps(model: nn.Module) -> int:
    """Wrap every gated-silu MLP whose down_proj is adapted with a small enough stack rank in a GatedMLP
    (call with no adapter active); returns how many were wrapped."""
    wrapped = 0
    inside = {id(m.mlp) for m in model.modules() if isinstance(m, GatedMLP)}  # wrapped by an earlier call
    for name, module in list(model.named_modules()):
        if isinstance(module, GatedMLP) or id(module) in inside or not _is_gated_silu(module):
            continue
        replace_module(model, name, GatedMLP(module))
        wrapped += 1
    return wrapped


def restore_gated_mlps(model: nn.Module) -> None:
    """Put the model's own MLP modules back (benchmarks reuse one loaded model for other systems)."""
    unwrap_modules(model, GatedMLP, "mlp")
