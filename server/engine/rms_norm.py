"""One-kernel RMSNorm for the decode path (Triton), swapped in for the model's own where it agrees; and the
residual add before it fused into the same kernel (add_rms_norm, for our Llama-family decoder).

Transformers' eager RMSNorm is about eight small kernels (cast, square, mean, rsqrt, two products,
casts); a Llama-3-8B decode step runs 65 of them, ~500 launches. This kernel does one row per
program. Semantics: exactly `rms_norm_reference`, the Llama/Qwen2/Mistral formula, including where
it rounds to the input dtype. A module is only swapped after it computes the same thing on a test
input, so a norm with another formula (Gemma's `1 + weight`, say) keeps its own forward.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import nn

from adapters.targets import replace_module, unwrap_modules

log = logging.getLogger(__name__)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Semantics: weight * (x / sqrt(mean(x^2) + eps)), in float32, rounded to x's dtype before the weight
    (the Llama/Qwen2/Mistral RMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    h = (x * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask)
    y = h.to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] -> same shape, dtype of `weight * x` (as the reference)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    n = x2.shape[1]
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), eps, N=n,
                                     BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
    return y.view(x.shape)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """Semantics: the residual stream after a sub-layer and its norm, `(s, rms_norm_reference(s))` with
    s = x + delta rounded to x's dtype (a decoder layer's `hidden + o_proj(...)` then its next norm)."""
    s = x + delta
    return s, rms_norm_reference(s, weight, eps)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, s_ptr, y_ptr, stride_x, stride_d, stride_s, stride_y, eps,
                         N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + d).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + row * stride_s + offs, s, mask=mask)
    h = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask)
    y = (h * rstd).to(s_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """x, delta [T, N] -> (x + delta, its RMSNorm), both new tensors, in one kernel (one read of each input)."""
    assert x.shape == delta.shape and x.dim() == 2 and x.stride(-1) == 1 and delta.stride(-1) == 1
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    n = x.shape[1]
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](x, delta, weight, s, y, x.stride(0), delta.stride(0), s.stride(0),
                                            y.stride(0), eps, N=n, BLOCK=triton.next_power_of_2(n),
                                            num_warps=4 if n <= 4096 else 8)
    return s, y


class FusedRMSNorm(nn.Module):
    """Wraps a model's RMSNorm module (keeping its weight) and runs the one-kernel version."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.norm.weight, self.norm.variance_epsilon)


def _agrees(norm: nn.Module) -> bool:
    weight = norm.weight
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen, device=weight.device).to(weight.dtype)
    with torch.no_grad():
        expected = norm(x)
        got = rms_norm(x, weight, norm.variance_epsilon)
    return got.dtype == expected.dtype and torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


def fuse_rms_norms(model: nn.Module) -> int:
    """Swap every RMSNorm-like module (a 1-D weight and `variance_epsilon`) whose output matches the
    kernel's for a FusedRMSNorm; returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if not (hasattr(module, "variance_epsilon") and isinstance(weight, torch.Tensor) and weight.dim() == 1):
            continue
        if not _agrees(module):
            log.info("keeping %s (%s): its formula differs from the fused RMSNorm", name, type(module).__name__)
            continue
        replace_module(model, name, FusedRMSNorm(module))
        swapped += 1
    return swapped


def restore_rms_norms(model: nn.Module) -> None:
    """Put the model's own norm modules back (benchmarks reuse one loaded model for other systems)."""
    unwrap_modules(model, FusedRMSNorm, "norm")
