"""The canonical basis of a real model is reproducible across arithmetic: the trainer may run on a GPU and
the server on a CPU, and an M only means something against the P it was trained with.

Where two singular values of a layer are distinct, each row of P is fixed up to rounding; where they
are equal to rounding (a gap below GAP), no sign rule fixes the rows, only the subspace they span, so
those rows are compared as a subspace and counted."""

import pytest
import torch

from adapters.targets import find_target_linears
from cache.basis import principal_basis
from server.model_loader import load_model

pytestmark = pytest.mark.real
RANK = 8
GAP = 1e-6
"""Relative singular gap below which rows are compared as a subspace."""


def near_degenerate_rows(sigma: torch.Tensor, rank: int) -> set[int]:
    """Rows i < rank whose singular value is within GAP * sigma_0 of a neighbour's."""
    rel_gaps = (sigma[:rank] - sigma[1 : rank + 1]) / sigma[0]  # gap between i and i+1
    rows = set()
    for i in range(rank):
        if rel_gaps[i] < GAP:
            rows.update({i, i + 1} & set(range(rank)))
    return rows


def assert_same_basis(name: str, a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor) -> int:
    """Rows equal to float32 rounding, except near-degenerate ones, whose span must agree; returns their number."""
    loose = near_degenerate_rows(sigma, a.shape[0])
    fixed = [i for i in range(a.shape[0]) if i not in loose]
    torch.testing.assert_close(a[fixed], b[fixed], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    if loose:
        rows = sorted(loose)
        span_a, span_b = a[rows].double().T @ a[rows].double(), b[rows].double().T @ b[rows].double()
        assert (span_a - span_b).abs().max() < 1e-5, name
    return len(loose)


def compare(weights: dict[str, torch.Tensor], route_a, route_b) -> int:
    loose = 0
    for name, w in sorted(weights.items()):
        sigma = torch.linalg.svdvals(w.double())
        loose += assert_same_basis(name, route_a(w), route_b(w), sigma)
    return loose


@pytest.fixture(scope="module")
def weights(real_cfg):
    loaded = load_model(real_cfg)
    return {n: m.weight.detach().clone() for n, m in find_target_linears(loaded.model, real_cfg.target_modules).items()}


def test_gram_and_svd_routes_give_the_same_basis_of_smollm2(weights):
    """On CPU, two different float64 computations (the CI half of the CPU/GPU check below)."""
    loose = compare(weights, lambda w: principal_basis(w, RANK, "gram"), lambda w: principal_basis(w, RANK, "svd"))
    assert loose == 0, f"{loose} near-degenerate rows among the top {RANK} of {len(weights)} layers"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_gpu_give_the_same_basis_of_smollm2(weights):
    on_cpu = lambda w: principal_basis(w, RANK, "gram")  # noqa: E731
    on_gpu = lambda w: principal_basis(w.cuda(), RANK, "gram").cpu()  # noqa: E731
    compare(weights, on_cpu, on_gpu)
