import pytest
import torch

from adapters.ops import expand_add, shrink_reference, shrink_torch


@pytest.mark.parametrize("num_tokens,num_slots,rank,in_features", [(1, 1, 4, 8), (17, 5, 8, 33), (64, 16, 3, 20)])
def test_shrink_matches_reference(num_tokens, num_slots, rank, in_features):
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, in_features, generator=gen)
    stack = torch.randn(num_slots, rank, in_features, generator=gen)
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    slots[0] = -1  # always include the base slot and a repeated slot
    if num_tokens > 2:
        slots[1] = slots[2] = num_slots - 1
    got = shrink_torch(x, stack, slots)
    ref = shrink_reference(x, stack, slots)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got[slots == -1] == 0).all()


def test_expand_add_is_y_plus_u_times_z():
    y, z, u = torch.randn(5, 7), torch.randn(5, 3), torch.randn(7, 3)
    torch.testing.assert_close(expand_add(y, z, u), y + z @ u.T)
