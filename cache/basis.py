"""Computes the canonical frozen basis of one weight: its top-r right singular vectors, P [r, in].

PiCa adapts W0 [out, in] (PyTorch layout) as `W0 + M P`: P holds the top-r right singular vectors
of W0 (rows of Vh; the paper, which writes weights as [in, out], calls them left ones). An M only
means something against the exact P it was trained with, so P must be reproducible: computed in
float64 from the stored weight, with each row's sign fixed so that its entry of largest magnitude
is positive.
"""

from __future__ import annotations

import torch


def canonical_signs(p: torch.Tensor) -> torch.Tensor:
    """Flip each row of p (r x in) so that its entry of largest |value| is positive."""
    idx = p.abs().argmax(dim=1, keepdim=True)  # [r, 1]
    signs = torch.sign(p.gather(1, idx))  # [r, 1]
    signs[signs == 0] = 1
    return p * signs


def principal_basis(weight: torch.Tensor, rank: int, method: str = "gram") -> torch.Tensor:
    """Top-`rank` right singular vectors of weight (out x in) as float32 rows [rank, in], canonical signs.

    method 'svd': full thin SVD. method 'gram': eigendecomposition of the smaller Gram matrix
    (W^T W when in <= out, else W W^T and V = W^T U / sigma), several times faster than the SVD
    for the same top vectors; tests check the two agree.
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank {rank} outside [1, {min(out_features, in_features)}] for weight {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if method == "svd":
        p = torch.linalg.svd(w, full_matrices=False).Vh[:rank]
    elif method == "gram":
        if in_features <= out_features:
            _, vecs = torch.linalg.eigh(w.T @ w)  # ascending eigenvalues
            p = vecs[:, -rank:].flip(1).T
        else:
            vals, vecs = torch.linalg.eigh(w @ w.T)
            u = vecs[:, -rank:].flip(1)  # [out, rank]
            sigma = vals[-rank:].flip(0).clamp_min(0).sqrt()
            v = (w.T @ u) / sigma.clamp_min(torch.finfo(torch.float64).tiny)  # [in, rank]
            v, _ = torch.linalg.qr(v)  # re-orthonormalise; keeps column directions up to sign
            p = v.T
    else:
        raise ValueError(f"unknown basis method {method!r}")
    return canonical_signs(p).to(torch.float32).contiguous()


def random_basis(in_features: int, rank: int, seed: int) -> torch.Tensor:
    """Random orthonormal rows [rank, in] (the paper's ablation), reproducible from seed."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=gen, dtype=torch.float64))
    return canonical_signs(q.T).to(torch.float32).contiguous()
