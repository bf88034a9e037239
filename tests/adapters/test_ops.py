import pytest
import torch

from adapters.layer import SlotIndex, SlotStacks
from adapters.ops import expand_reference, expand_torch


@pytest.mark.parametrize("bounds,rank", [([12], 4), ([16, 24, 32], 3), ([8, 40], 5), ([16, 32], 40)])
def test_expand_torch_matches_reference(bounds, rank):
    """Both expands against y0 + M z computed from the tensors as written, with slots in scattered rank pages
    (rank 40: three 16-column pages, the last one partial) and a member one slot leaves alone."""
    bounds = [0, *bounds]
    num_members, num_out = len(bounds) - 1, bounds[-1]
    groups = [f"g{m}" for m in range(num_members)]
    outs = [bounds[m + 1] - bounds[m] for m in range(num_members)]
    gen = torch.Generator().manual_seed(num_out + rank)
    num_tokens, num_slots, num_layers = 11, 3, 3
    stacks = SlotStacks({g: (o, rank, num_layers) for g, o in zip(groups, outs)}, num_slots, torch.float32, "cpu",
                        pool_ranks=4 * rank)
    paged = stacks.served(tuple(groups))
    slot_rank = [rank, max(1, rank - 2), rank]
    written = {}
    for s in range(num_slots):
        tensors = {g: torch.randn(o, slot_rank[s], generator=gen) for m, (g, o) in enumerate(zip(groups, outs))
                   if not (s == 1 and m == num_members - 1)}  # the last member left alone by slot 1
        if s == 2:  # slot 2 brings its own per-layer signs
            tensors.update({f"signs.{g}": torch.randint(0, 2, (num_layers, slot_rank[s]), generator=gen) * 2.0 - 1
                            for g in list(tensors)})
        written[s] = tensors
    free = list(range(stacks.num_pages))[::-1]  # pages handed out back to front, so no slot has a contiguous run
    for s in (2, 0, 1):
        pages = [free.pop(0) for _ in range(stacks.pages_for(written[s]))]
        stacks.write(s, written[s], pages)
    slots = [-1, 2, 0, 2, 1, -1, 0, 0, 2, 1, 1]
    y0z = torch.randn(num_tokens, num_out + num_members * rank, generator=gen)
    for layer in (0, 1):
        want = y0z[:, :num_out].clone()
        for t, s in enumerate(slots):
            for m, g in enumerate(groups):
                if s < 0 or g not in written[s]:
                    continue
                r = slot_rank[s]
                signs = written[s].get(f"signs.{g}", torch.ones(num_layers, r))[layer]
                z = y0z[t, num_out + m * rank : num_out + m * rank + r] * signs
                want[t, bounds[m] : bounds[m + 1]] += written[s][g] @ z
        for slot_ranks in (stacks.slot_ranks, None):  # the index knows each slot's pages, or reads them all
            index = SlotIndex(16, "cpu", slot_ranks)
            index.set(slots)
            got = expand_torch(y0z.clone(), paged, layer, bounds, index)
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(expand_reference(y0z, paged, layer, bounds, torch.tensor(slots)), want)
        assert torch.equal(got[0], y0z[0, :num_out])  # base-model tokens keep y0


def test_slot_pages_follow_rank():
    """An r=8 adapter takes one page where an r=256 one takes sixteen; the pool's last page stays zero."""
    stacks = SlotStacks({"g": (32, 256, 2)}, 4, torch.float32, "cpu", pool_ranks=256 + 16)
    assert (stacks.page, stacks.num_pages, stacks.max_pages) == (16, 17, 16)
    small, large = {"g": torch.randn(32, 8)}, {"g": torch.randn(32, 256)}
    assert stacks.pages_for(small) == 1 and stacks.pages_for(large) == 16 and stacks.pages_for({}) == 0
    stacks.write(0, large, list(range(16)))
    stacks.write(1, small, [16])
    assert not stacks.stacks["g"][stacks.zero_page].any()
    m, _ = stacks.served(("g",)).dense(1)
    torch.testing.assert_close(m[:, :8], small["g"])
    assert not m[:, 8:].any()
    with pytest.raises(ValueError, match="pages given"):
        stacks.write(2, small, [])
    with pytest.raises(ValueError, match="needs its pages given"):
        stacks.write(2, small)
