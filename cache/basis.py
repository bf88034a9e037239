"""Computes the canonical frozen basis of one weight: its top-r left singular vectors.

A B matrix only means something against the exact basis it was trained with, so the basis must
be reproducible: computed in float64 from the stored weight, with each column's sign fixed so
that its entry of largest magnitude is positive.
"""

from __future__ import annotations

import torch


def canonical_signs(u: torch.Tensor) -> torch.Tensor:
    """Flip each column of u (out x r) so that its entry of largest |value| is positive."""
    idx = u.abs().argmax(dim=0)  # [r]
    signs = torch.sign(u.gather(0, idx[None, :]))  # [1, r]
    signs[signs == 0] = 1
    return u * signs


def principal_basis(weight: torch.Tensor, rank: int, method: str = "gram") -> torch.Tensor:
    """Top-`rank` left singular vectors of weight (out x in) as float32 [out, rank], canonical signs.

    method 'svd': full thin SVD. method 'gram': eigendecomposition of the smaller Gram matrix
    (W W^T when out <= in, else W^T W and U = W V / sigma), several times faster than the SVD
    for the same top columns; tests check the two agree.
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank {rank} outside [1, {min(out_features, in_features)}] for weight {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if method == "svd":
        u = torch.linalg.svd(w, full_matrices=False).U[:, :rank]
    elif method == "gram":
        if out_features <= in_features:
            _, vecs = torch.linalg.eigh(w @ w.T)  # ascending eigenvalues
            u = vecs[:, -rank:].flip(1)
        else:
            vals, vecs = torch.linalg.eigh(w.T @ w)
            v = vecs[:, -rank:].flip(1)  # [in, rank]
            sigma = vals[-rank:].flip(0).clamp_min(0).sqrt()
            u = (w @ v) / sigma.clamp_min(torch.finfo(torch.float64).tiny)
            u, _ = torch.linalg.qr(u)  # re-orthonormalise; keeps column directions up to sign
    else:
        raise ValueError(f"unknown basis method {method!r}")
    return canonical_signs(u).to(torch.float32).contiguous()


def random_basis(out_features: int, rank: int, seed: int) -> torch.Tensor:
    """A random orthonormal basis [out, rank] (the paper's ablation), reproducible from seed."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=gen, dtype=torch.float64))
    return canonical_signs(q).to(torch.float32).contiguous()
