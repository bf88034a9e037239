"""The per-layer adapter op: each adapted layer's GEMM input `[x | core[slot] @ x]` (the shrink).

An adapted layer computes `y = W0 x + U z` with `z = core[slot] x` as one GEMM,
`y = [W0 | U] @ [x ; z]`: the expand is the same dense matmul for every adapter (U is per layer), so
it rides along with the base weight and needs no kernel of its own. Every fast version here has a
plain-torch reference with a `Semantics:` docstring; tests compare them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shrink_reference(x: torch.Tensor, stack: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Semantics:
        for t in range(T):
            z[t] = stack[token_slots[t]] @ x[t]   if token_slots[t] >= 0
            z[t] = 0                              if token_slots[t] == -1
    x [T, in], stack [S, r, in], token_slots [T] int -> z [T, r].
    """
    z = x.new_zeros(x.shape[0], stack.shape[1])
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            z[t] = stack[slot] @ x[t]
    return z


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Semantics: weight * (x / sqrt(mean(x^2) + eps)), in float32, rounded to x's dtype before the weight
    (the Llama/Qwen2/Mistral RMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Semantics: silu(gate) * up, each rounded to the inputs' dtype (a gated MLP's act_fn(gate) * up)."""
    return F.silu(gate) * up


def concat_inputs_reference(x: torch.Tensor, stack: torch.Tensor, num_members: int, token_slots: torch.Tensor,
                            norm: tuple[torch.Tensor, float] | None = None, up: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Semantics:
        if norm:
            x = rms_norm_reference(x, *norm)
        if up:
            x = silu_mul_reference(x, up)
        for m in range(M):
            out[m] = concat(x, shrink_reference(x, stack[:, m*R : (m+1)*R], token_slots), dim=1)
    x [T, in], stack [S, M*R, in] (the cores of M layers that read x), norm (weight [in], eps), up [T, in]
    -> out [M, T, in + R].
    """
    if norm is not None:
        x = rms_norm_reference(x, *norm)
    if up is not None:
        x = silu_mul_reference(x, up)
    rank = stack.shape[1] // num_members
    return torch.stack([
        torch.cat([x, shrink_reference(x, stack[:, m * rank : (m + 1) * rank], token_slots)], dim=1)
        for m in range(num_members)
    ])


def shrink_torch(x: torch.Tensor, stack: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Same function as shrink_reference, batched with no host sync and no Python loop.

    Multiplies x by every slot's core at once ([T, S*r]) and keeps each token's own block:
    reads each slot's core once per call, costs T*S*r*in FLOPs (fine for the CPU and small S).
    """
    num_tokens = x.shape[0]
    num_slots, rank, in_features = stack.shape
    z_all = F.linear(x, stack.reshape(num_slots * rank, in_features)).view(num_tokens, num_slots, rank)
    index = token_slots.clamp(min=0).view(num_tokens, 1, 1).expand(num_tokens, 1, rank)
    z = z_all.gather(1, index).squeeze(1)  # [T, r]
    return z * (token_slots >= 0).unsqueeze(1).to(z.dtype)


def empty_padded_rows(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape) whose rows are stored 64 elements apart at least (128 bytes in bf16): GEMM
    operands of width in + R. cuBLAS ran packed rows of other widths up to 25% slower (gemm_k_padding)."""
    pitch = -(-shape[-1] // 64) * 64
    return torch.empty(*shape[:-1], pitch, dtype=dtype, device=device)[..., : shape[-1]]


def concat_inputs(x: torch.Tensor, stack: torch.Tensor, ranks: torch.Tensor, slot_index,
                  counters: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None,
                  up: torch.Tensor | None = None) -> torch.Tensor:
    """[M, T, in + R] GEMM inputs of the M layers that read x (RMSNorm'd first where `norm` is given;
    silu(x) * up where `up` is): the Triton kernel on CUDA, batched torch elsewhere. stack [S, M*R, in],
    ranks [M, S] int32, counters: the kernel's (see shrink_concat), norm: (weight [in], eps), up [T, in]."""
    num_members = ranks.shape[0]
    rank = stack.shape[1] // num_members
    if x.is_cuda and KERNELS_AVAILABLE:
        out = empty_padded_rows(num_members, x.shape[0], x.shape[1] + rank, dtype=x.dtype, device=x.device)
        return shrink_concat(x, stack, ranks, slot_index, out, counters, norm=norm, up=up)
    if norm is not None:
        x = rms_norm_reference(x, *norm)
    if up is not None:
        x = silu_mul_reference(x, up)
    z = shrink_torch(x, stack, slot_index.token_slots)  # [T, M*R]
    return torch.cat([x.expand(num_members, *x.shape), z.view(-1, num_members, rank).transpose(0, 1)], dim=2)


def kernel_counters(max_tokens: int, num_members: int, rank: int, device: torch.device) -> torch.Tensor | None:
    """The zeroed int32 counters the kernel's split-K needs for one SharedInput; None where torch runs."""
    if device.type != "cuda" or not KERNELS_AVAILABLE:
        return None
    return torch.zeros(counters_size(max_tokens, num_members, rank), dtype=torch.int32, device=device)


try:  # Triton is only needed (and usually only installed) where CUDA is
    from adapters.shrink_kernel import counters_size, shrink_concat

    KERNELS_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the machine
    KERNELS_AVAILABLE = False
