"""The per-layer core op of methods whose E and S are both frozen per layer (PSOFT): `y += E_l K[slot, layer] z`.

Such a method's delta is `E_l K S_l` with only K (r x r) per adapter and layer. S_l = P_l rides in the base GEMM
(z = P_l x are its extra columns, the same z PiCa's expand reads), E_l = W0_l P_l^T [out, R] is held once per layer,
and each slot holds its K's in a stack [S + 1, L, R, R] (zero past the adapter's rank, in slots of other methods,
and in the last row, slot -1's).
Per token the op computes w = K[slot, layer] z (tiny: R x R) and then one dense GEMM y += w E_l^T over the step's
tokens (tokens of other methods have w = 0). Every fast version has a plain-torch reference; tests compare them.
"""

from __future__ import annotations

import numpy as np
import torch

from adapters.staging import to_device_async


def core_reference(z: torch.Tensor, y: torch.Tensor, cores: torch.Tensor, layer: int, expand: torch.Tensor,
                   token_slots: torch.Tensor) -> torch.Tensor:
    """Semantics:
        for t in range(T):
            s = token_slots[t]
            if s == -1: continue                      # base model
            y[t] += expand @ (cores[s, layer] @ z[t])  # the slot's core, then the layer's frozen expand
    z [T, R] (the first R columns of the layer's z = P x), y [T, out], cores [S + 1, L, R, R] (zero past each slot's
    rank; the last row, which slot -1 indexes, all zeros), expand [out, R] -> a new y (float32 accumulation,
    rounded once).
    """
    out = y.float().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] += expand.float() @ (cores[s, layer].float() @ z[t].float())
    return out.to(y.dtype)


def core_torch(z: torch.Tensor, y: torch.Tensor, cores: torch.Tensor, layer: int, expand: torch.Tensor,
               ranks: list[int], slot_index) -> None:
    """core_reference in place on y (a view is fine): one small matmul per slot in the step that holds a core here
    (host ranks > 0), with SlotIndex's host grouping, then one GEMM over those slots' tokens. Not for CUDA graphs."""
    parts = [(s, rows) for s, rows in slot_index.segments() if ranks[s]]
    if not parts:
        return
    rows = to_device_async(torch.cat([r for _, r in parts]), z.device)  # the host grouping, without a stream sync
    w = torch.cat([z[rows[i : i + len(r)]].float() @ cores[s, layer].float().T
                   for (s, r), i in zip(parts, np.cumsum([0] + [len(r) for _, r in parts]))])  # [n, R]
    y[rows] = (y[rows].float() + w @ expand.float().T).to(y.dtype)


def core_gathered(z: torch.Tensor, y: torch.Tensor, cores: torch.Tensor, layer: int, expand: torch.Tensor,
                  token_slots: torch.Tensor) -> None:
    """core_reference in place on y with device tensors only (each token gathers its slot's K, a batched matmul,
    then one GEMM accumulated into y): no host data, so CUDA graphs capture it and replay it for any slot mapping.
    Base tokens (slot -1) index the stack's last row, kept zero, so they need no mask. The gather reads T * R * R
    elements, small beside the GEMM's E (out * R) at any step size."""
    w = torch.bmm(cores[token_slots, layer], z[:, :, None])  # [T, R, 1]
    y.addmm_(w[:, :, 0], expand.T)


GATHERED_MAX_TOKENS = 512
"""Steps up to this many tokens (every decode step CUDA graphs capture, whose buckets stop at max_num_seqs) take
core_gathered on CUDA; larger ones core_torch, which gathers no [T, R, R] copy of the cores (at R = 256 and 4096
tokens that would be 0.5 GB per layer). A step being captured always takes core_gathered."""


def core(z: torch.Tensor, y: torch.Tensor, cores: torch.Tensor, layer: int, expand: torch.Tensor, ranks: list[int],
         slot_index) -> None:
    """y [T, out] += E_l K[slot, layer] z for the step's tokens, in place: gathered on CUDA for decode-sized steps
    (so a captured graph holds it whichever slots it is replayed with), per slot for larger ones and elsewhere."""
    if z.is_cuda and (z.shape[0] <= GATHERED_MAX_TOKENS or torch.cuda.is_current_stream_capturing()):
        core_gathered(z, y, cores, layer, expand, slot_index.token_slots)
    else:
        core_torch(z, y, cores, layer, expand, ranks, slot_index)
