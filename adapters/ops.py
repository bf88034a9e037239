"""The per-layer adapter op: the expand `y += M[slot] z` of an adapted layer (or of layers sharing a GEMM).

An adapted layer computes `y = W0 x + M[slot] z` with `z = P x`. P is per layer and the same for every
adapter, so z comes out of the base GEMM as extra rows (`[W0; P] @ x = [y0 | z]`); what is left per
adapter is the expand, a grouped matmul over the tokens of each slot. Every fast version here has a
plain-torch reference with a `Semantics:` docstring; tests compare them.
"""

from __future__ import annotations

import torch

from adapters.rank_pages import PagedStack, pages_for_rank


def expand_reference(y0z: torch.Tensor, paged: PagedStack, layer: int, bounds: list[int],
                     token_slots: torch.Tensor) -> torch.Tensor:
    """Semantics:
        num_out = bounds[-1]; R = paged.rank
        y = y0z[:, :num_out] (copied)
        for t in range(T):
            s = token_slots[t]
            if s == -1: continue                    # base model
            M, signs = paged.dense(s)               # the slot's pages side by side: [num_out, R], [L, members*R]
            for m in members:                       # layers sharing the GEMM, columns bounds[m]:bounds[m+1]
                z = y0z[t, num_out + m*R : num_out + (m+1)*R] * signs[layer, m*R : (m+1)*R]
                r = paged.ranks[m, s]
                y[t, bounds[m]:bounds[m+1]] += M[bounds[m]:bounds[m+1], :r] @ z[:r]
    y0z [T, num_out + M*R] = [y0 | z_1 .. z_M] -> y [T, num_out] (accumulated in float32, rounded once).
    """
    num_out, rank = bounds[-1], paged.rank
    y = y0z[:, :num_out].float().clone()
    dense = {}
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        if s not in dense:
            dense[s] = paged.dense(s)
        m_s, signs = dense[s]
        for m in range(len(bounds) - 1):
            lo, hi, r = bounds[m], bounds[m + 1], int(paged.ranks[m, s])
            z = y0z[t, num_out + m * rank : num_out + m * rank + r].float() * signs[layer, m * rank : m * rank + r].float()
            y[t, lo:hi] += m_s[lo:hi, :r].float() @ z
    return y.to(y0z.dtype)


def expand_torch(y0z: torch.Tensor, paged: PagedStack, layer: int, bounds: list[int], slot_index) -> torch.Tensor:
    """Same function as expand_reference (up to rounding), in place on y0z's y0 columns: one matmul per
    adapter in the step and member over the pages the slot holds (its widest rank's, where the index knows the
    slots' ranks), with the grouping SlotIndex already made on the host (CPU path)."""
    num_out, rank = bounds[-1], paged.rank
    y = y0z[:, :num_out]
    for s, rows in slot_index.segments():
        num_pages = None if slot_index.slot_ranks is None else pages_for_rank(int(slot_index.slot_ranks[s]), paged.page)
        if num_pages == 0:
            continue
        m_s, signs = paged.dense(s, num_pages)
        width = m_s.shape[1]
        for m in range(len(bounds) - 1):
            lo, hi = bounds[m], bounds[m + 1]
            z = y0z[rows, num_out + m * rank : num_out + m * rank + width].float() * signs[layer, m * width : (m + 1) * width]
            y[rows, lo:hi] = (y[rows, lo:hi].float() + z @ m_s[lo:hi].float().T).to(y.dtype)
    return y


def expand(y0z: torch.Tensor, paged: PagedStack, layer: int, bounds: list[int], slot_index) -> torch.Tensor:
    """y [T, num_out] = y0 + M[slot] diag(signs[slot, layer]) z for the step's tokens, written into y0z's
    first columns (a view is returned): the Triton kernel on CUDA, one torch matmul per adapter elsewhere."""
    if y0z.is_cuda and KERNELS_AVAILABLE:
        return expand_grouped(y0z, paged, layer, bounds, slot_index)
    return expand_torch(y0z, paged, layer, bounds, slot_index)


try:  # Triton is only needed (and usually only installed) where CUDA is
    from adapters.expand_kernel import expand_grouped
    from adapters.lora_kernel import lora_grouped

    KERNELS_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the machine
    KERNELS_AVAILABLE = False


def lora_reference(x: torch.Tensor, y: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                   token_slots: torch.Tensor) -> torch.Tensor:
    """Semantics:
        for t in range(T):
            s = token_slots[t]
            if s == -1: continue                    # base model
            y[t] += b_stack[s] @ (a_stack[s] @ x[t])  # the slot's per-layer shrink, then its expand
    x [T, in], y [T, out], a_stack [S, R, in], b_stack [S, out, R] (zero-padded past each slot's rank, the
    layer's scaling folded into B; slots holding no per-layer factors are all zeros) -> a new y (float32
    accumulation, rounded once).
    """
    out = y.float().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] += b_stack[s].float() @ (a_stack[s].float() @ x[t].float())
    return out.to(y.dtype)


def lora_torch(x: torch.Tensor, y: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, ranks: list[int],
               slot_index) -> None:
    """lora_reference in place on y (a view is fine): two matmuls per slot in the step that holds per-layer
    factors (host ranks > 0), with SlotIndex's host grouping. Not for CUDA graphs (the grouping is host data)."""
    for s, rows in slot_index.segments():
        r = ranks[s]
        if r:
            z = x[rows].float() @ a_stack[s, :r].float().T  # [n, r]
            y[rows] = (y[rows].float() + z @ b_stack[s, :, :r].float().T).to(y.dtype)


def lora_gathered(x: torch.Tensor, y: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                  token_slots: torch.Tensor) -> None:
    """lora_reference in place on y with device tensors only (each token gathers its slot's whole A and B, two
    batched matmuls): the GPU reference the Triton kernels (adapters.lora_kernel) are benchmarked against, and
    the CUDA path where Triton is missing. It reads T * R * (in + out) elements whatever the slots' ranks."""
    slots = token_slots.clamp_min(0)
    keep = (token_slots >= 0).to(x.dtype)[:, None, None]  # base tokens add nothing
    z = torch.bmm(a_stack[slots], x[:, :, None]) * keep  # [T, R, 1]
    y.add_(torch.bmm(b_stack[slots], z)[:, :, 0])


GATHERED_MAX_TOKENS = 512
"""Without Triton, steps up to this many tokens take lora_gathered on CUDA (every decode step CUDA graphs
capture: the buckets stop at max_num_seqs); larger ones lora_torch."""


def lora(x: torch.Tensor, y: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, ranks: list[int],
         device_ranks: torch.Tensor, slot_index) -> None:
    """y [T, out] += B[slot] (A[slot] x) for the step's tokens, in place: the Triton kernels on CUDA (every step
    size, graph-safe; device_ranks [S] int32 stop each slot's loads at its rank), lora_torch elsewhere (host
    ranks skip slots of rank 0)."""
    if x.is_cuda and KERNELS_AVAILABLE:
        lora_grouped(x, y, a_stack, b_stack, device_ranks, slot_index)
    elif x.is_cuda and x.shape[0] <= GATHERED_MAX_TOKENS:
        lora_gathered(x, y, a_stack, b_stack, slot_index.token_slots)
    else:
        lora_torch(x, y, a_stack, b_stack, ranks, slot_index)
