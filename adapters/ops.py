"""The two per-layer adapter ops: shrink (per-token core @ x) and expand (U @ z).

Every fast version has a plain-torch reference with a `Semantics:` docstring; tests compare them.
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


def expand_add(y: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y + z @ U^T in one fused kernel (addmm): y [T, out], z [T, r], U [out, r]. The expand is the same
    dense matmul for every adapter (U is per layer), so it needs no per-slot kernel."""
    return torch.addmm(y, z, u.t())


def shrink(x: torch.Tensor, stack: torch.Tensor, slot_rank: torch.Tensor, slot_index) -> torch.Tensor:
    """z [T, r] for the step's tokens: the Triton grouped kernel on CUDA, the batched torch op elsewhere."""
    if x.is_cuda and KERNELS_AVAILABLE:
        return grouped_shrink(x, stack, slot_rank, slot_index)
    return shrink_torch(x, stack, slot_index.token_slots)


try:  # Triton is only needed (and usually only installed) where CUDA is
    from adapters.shrink_kernel import grouped_shrink

    KERNELS_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the machine
    KERNELS_AVAILABLE = False
