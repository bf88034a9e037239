import pytest
import torch

from adapters.layer import SlotIndex
from adapters.ops import expand_reference, expand_torch


@pytest.mark.parametrize("bounds,rank", [([12], 4), ([16, 24, 32], 3), ([8, 40], 5)])
def test_expand_torch_matches_reference(bounds, rank):
    bounds = [0, *bounds]
    num_members, num_out = len(bounds) - 1, bounds[-1]
    gen = torch.Generator().manual_seed(num_out)
    num_tokens, num_slots = 11, 3
    y0z = torch.randn(num_tokens, num_out + num_members * rank, generator=gen)
    stack = torch.randn(num_slots, num_out, rank, generator=gen)
    ranks = torch.full((num_members, num_slots), rank, dtype=torch.int32)
    ranks[-1, 1] = 0  # the last member left alone by slot 1: its M rows are zero
    for m in range(num_members):
        stack[1, bounds[m] : bounds[m + 1], ranks[m, 1] :] = 0
    signs = torch.ones(num_slots, 3, num_members * rank)
    signs[2, 1] = torch.randint(0, 2, (num_members * rank,), generator=gen) * 2.0 - 1  # slot 2's layer-1 core
    slots = [-1, 2, 0, 2, 1, -1, 0, 0, 2, 1, 1]
    index = SlotIndex(16, "cpu")
    index.set(slots)
    for layer in (0, 1):
        ref = expand_reference(y0z, stack, ranks, signs, layer, bounds, torch.tensor(slots))
        got = expand_torch(y0z.clone(), stack, signs, layer, bounds, index)
        torch.testing.assert_close(got, ref)
        assert torch.equal(got[0], y0z[0, :num_out])  # base-model tokens keep y0
        z = y0z[1, num_out : num_out + rank] * signs[2, layer, :rank]
        torch.testing.assert_close(got[1, : bounds[1]], y0z[1, : bounds[1]] + stack[2, : bounds[1]] @ z)
    assert not torch.allclose(expand_torch(y0z.clone(), stack, signs, 0, bounds, index),
                              expand_torch(y0z.clone(), stack, signs, 1, bounds, index))  # the signs matter
