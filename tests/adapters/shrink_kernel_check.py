"""Grouped shrink kernel vs the plain-torch reference on random slot maps (run by test_shrink_kernel.py).

Runs on CUDA when there is a GPU, else in Triton's interpreter (TRITON_INTERPRET=1 set by the caller).
"""

import sys

import torch

from adapters.layer import SlotIndex, SlotStacks
from adapters.ops import shrink_reference
from adapters.shrink_kernel import grouped_shrink


def check(num_tokens, num_slots, rank_max, in_features, ranks, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    stacks = SlotStacks({"g": (rank_max, in_features)}, num_slots, dtype, device)
    for slot, r in enumerate(ranks):
        if r:
            stacks.write(slot, {"g": torch.randn(r, in_features, generator=gen).to(dtype)})
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).tolist()
    slots[0] = -1
    if num_tokens > 3:
        slots[1] = slots[3] = num_slots - 1
    index = SlotIndex(max(num_tokens, 8), device)
    index.set(slots)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(device)
    got = grouped_shrink(x, stacks.stacks["g"], stacks.ranks["g"], index).float().cpu()
    ref = shrink_reference(x.float().cpu(), stacks.stacks["g"].float().cpu(), torch.tensor(slots))
    err = (got - ref).norm() / ref.norm().clamp_min(1e-6)
    tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 1e-2
    assert torch.isfinite(got).all() and err < tol, (num_tokens, num_slots, rank_max, in_features, dtype, float(err))
    assert (got[torch.tensor(slots) == -1] == 0).all()


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    cases = [(1, 1, 16, 64, [16]), (7, 3, 16, 100, [16, 0, 5]), (37, 5, 48, 130, [48, 7, 0, 33, 1]),
             (64, 9, 32, 257, [32, 32, 8, 0, 16, 32, 3, 32, 20]),
             (300, 3, 16, 40, [16, 5, 0]),  # > 256 tokens: 64-token tiles
             (290, 2, 128, 48, [128, 70]),  # large rank, long step: split-K
             (70, 1, 32, 64, [32])]  # one adapter for every token: many tiles of one slot
    if device == "cuda":
        cases += [(64, 64, 256, 4096, [256] * 64), (300, 16, 32, 4096, [32] * 16), (2048, 8, 256, 4096, [256, 128] * 4)]
    for i, (t, s, r, k, ranks) in enumerate(cases):
        for dtype in dtypes:
            check(t, s, r, k, ranks, dtype, device, seed=i)
    print(f"shrink kernel ok on {device}: {len(cases) * len(dtypes)} cases")


if __name__ == "__main__":
    sys.exit(main())
