import pytest
import torch

from cache.basis import canonical_signs, principal_basis, random_basis


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_gram_route_matches_full_svd(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    r = 24
    p_gram = principal_basis(w, r, "gram")
    p_svd = principal_basis(w, r, "svd")
    assert p_gram.shape == (r, shape[1]) and p_gram.dtype == torch.float32
    torch.testing.assert_close(p_gram, p_svd, atol=1e-5, rtol=0)
    # really the top-r RIGHT singular vectors of w (rows of Vh): the input side of W0 [out, in]
    ref = torch.linalg.svd(w.double(), full_matrices=False).Vh[:r]
    torch.testing.assert_close((p_gram.double() @ ref.T).abs(), torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)


def test_canonical_signs_are_stable():
    w = torch.randn(40, 56)
    p1 = principal_basis(w, 12)
    p2 = principal_basis(w.clone(), 12)
    assert torch.equal(p1, p2)
    idx = p1.abs().argmax(1)
    assert (p1[torch.arange(12), idx] > 0).all()
    # -W has the same singular vectors up to sign: the canonical basis is identical
    torch.testing.assert_close(principal_basis(-w, 12), p1, atol=1e-5, rtol=0)


def test_canonical_signs_flips_negative_rows():
    p = torch.tensor([[0.1, -0.9], [-0.8, 0.2]])
    assert torch.equal(canonical_signs(p), torch.tensor([[-0.1, 0.9], [0.8, -0.2]]))


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank 9 outside"):
        principal_basis(torch.randn(8, 10), 9)


def test_random_basis_is_orthonormal_and_reproducible():
    a, b = random_basis(50, 10, seed=3), random_basis(50, 10, seed=3)
    assert torch.equal(a, b) and a.shape == (10, 50)
    torch.testing.assert_close(a @ a.T, torch.eye(10), atol=1e-5, rtol=0)
    assert not torch.equal(a, random_basis(50, 10, seed=4))
