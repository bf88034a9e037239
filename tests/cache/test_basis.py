import pytest
import torch

from cache.basis import canonical_signs, principal_basis, random_basis


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_gram_route_matches_full_svd(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    r = 24
    u_gram = principal_basis(w, r, "gram")
    u_svd = principal_basis(w, r, "svd")
    assert u_gram.shape == (shape[0], r) and u_gram.dtype == torch.float32
    torch.testing.assert_close(u_gram, u_svd, atol=1e-5, rtol=0)
    # really the top-r left singular vectors of w
    ref = torch.linalg.svd(w.double(), full_matrices=False).U[:, :r]
    torch.testing.assert_close((u_gram.double().T @ ref).abs(), torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)


def test_canonical_signs_are_stable():
    w = torch.randn(40, 56)
    u1 = principal_basis(w, 12)
    u2 = principal_basis(w.clone(), 12)
    assert torch.equal(u1, u2)
    idx = u1.abs().argmax(0)
    assert (u1[idx, torch.arange(12)] > 0).all()
    # -W has the same singular vectors up to sign: the canonical basis is identical
    torch.testing.assert_close(principal_basis(-w, 12), u1, atol=1e-5, rtol=0)


def test_canonical_signs_flips_negative_columns():
    u = torch.tensor([[0.1, -0.9], [-0.8, 0.2]])
    assert torch.equal(canonical_signs(u), torch.tensor([[-0.1, 0.9], [0.8, -0.2]]))


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank 9 outside"):
        principal_basis(torch.randn(8, 10), 9)


def test_random_basis_is_orthonormal_and_reproducible():
    a, b = random_basis(50, 10, seed=3), random_basis(50, 10, seed=3)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.T @ a, torch.eye(10), atol=1e-5, rtol=0)
    assert not torch.equal(a, random_basis(50, 10, seed=4))
