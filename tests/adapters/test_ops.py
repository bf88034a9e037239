import pytest
import torch

from adapters.layer import SlotIndex
from adapters.ops import concat_inputs, concat_inputs_reference, shrink_reference, shrink_torch


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


@pytest.mark.parametrize("num_members", [1, 3])
def test_concat_inputs_match_reference(num_members):
    gen = torch.Generator().manual_seed(num_members)
    num_tokens, num_slots, rank, in_features = 9, 3, 4, 10
    x = torch.randn(num_tokens, in_features, generator=gen)
    stack = torch.randn(num_slots, num_members * rank, in_features, generator=gen)
    slots = [-1, 2, 0, 2, 1, -1, 0, 0, 2]
    index = SlotIndex(16, "cpu")
    index.set(slots)
    ranks = torch.full((num_members, num_slots), rank, dtype=torch.int32)
    got = concat_inputs(x, stack, ranks, index)
    assert got.shape == (num_members, num_tokens, in_features + rank)
    torch.testing.assert_close(got, concat_inputs_reference(x, stack, num_members, torch.tensor(slots)))
    for m in range(num_members):  # each member reads its own rows of the stack, next to a copy of x
        assert torch.equal(got[m, :, :in_features], x)
        torch.testing.assert_close(got[m, 1, in_features:], stack[2, m * rank : (m + 1) * rank] @ x[1])
