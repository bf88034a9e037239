"""Shrink-concat kernel vs the plain-torch reference on random slot maps (run by test_shrink_kernel.py).

Runs on CUDA when there is a GPU, else in Triton's interpreter (TRITON_INTERPRET=1 set by the caller).
"""

import sys

import torch

from adapters.layer import SlotIndex, SlotStacks
from adapters.ops import concat_inputs_reference, rms_norm_reference, silu_mul_reference
from adapters.shrink_kernel import ShrinkConfig, counters_size, shrink_concat


def check(num_tokens, num_members, num_slots, rank_max, in_features, ranks, dtype, device, seed, config=None,
          prologue=None):
    """`ranks[slot]` is the adapter rank in each member; member m >= 1 leaves slot 0 alone (rank 0).
    prologue "norm": x is RMSNorm'd by the kernel on the way (the q/k/v and gate/up inputs of a Llama block);
    "gated": the input is silu(x) * up (down_proj's)."""
    gen = torch.Generator().manual_seed(seed)
    groups = [f"g{m}" for m in range(num_members)]
    stacks = SlotStacks({g: (rank_max, in_features) for g in groups}, num_slots, dtype, device)
    stack, member_ranks = stacks.fuse(tuple(groups)) if num_members > 1 else (stacks.stacks["g0"], None)
    for slot, r in enumerate(ranks):
        cores = {g: torch.randn(r, in_features, generator=gen).to(dtype) for m, g in enumerate(groups)
                 if r and not (m and slot == 0)}
        stacks.write(slot, cores)
    member_ranks = member_ranks if member_ranks is not None else stacks.ranks["g0"][None]
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).tolist()
    slots[0] = -1
    if num_tokens > 3:
        slots[1] = slots[3] = num_slots - 1
    case = (num_tokens, num_members, num_slots, rank_max, in_features, dtype, config, prologue)
    index = SlotIndex(max(num_tokens, 8), device)
    index.set(slots)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(device)
    norm = up = None
    if prologue == "norm":
        x = x * torch.linspace(0.1, 10, num_tokens, device=device, dtype=dtype)[:, None]  # rows of other scales
        norm = (torch.randn(in_features, generator=gen).to(dtype).to(device), 1e-5)
    elif prologue == "gated":
        x = x * 4  # the gate: silu's curved part and both tails
        up = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(device)
    width = in_features + rank_max
    padded = torch.full((num_members, num_tokens, width + 5), float("nan"), dtype=dtype, device=device)
    counters = torch.zeros(counters_size(num_tokens, num_members, rank_max), dtype=torch.int32, device=device)
    got = shrink_concat(x, stack, member_ranks, index, padded[:, :, :width], counters, config, norm, up).float().cpu()
    assert padded[:, :, width:].isnan().all(), case  # rows pitched wider than written stay untouched
    assert not counters.any(), case  # re-armed for the next launch
    x_in = x  # the prologues round in x's dtype, the shrink is float32
    if prologue == "norm":
        x_in = rms_norm_reference(x, *norm)
    elif prologue == "gated":
        x_in = silu_mul_reference(x, up)
    ref = concat_inputs_reference(x_in.float().cpu(), stack.float().cpu(), num_members, torch.tensor(slots))
    assert torch.isfinite(got).all(), case  # every element written, rows past a rank as zeros
    if prologue:  # bf16: one rounding step where float32 sums (or exp) differ
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[:, :, :in_features], ref[:, :, :in_features], rtol=tol, atol=tol)
    else:
        assert torch.equal(got[:, :, :in_features], ref[:, :, :in_features]), case  # x copied exactly
    z, z_ref = got[:, :, in_features:], ref[:, :, in_features:]
    err = (z - z_ref).norm() / z_ref.norm().clamp_min(1e-6)
    tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 1e-2
    assert err < tol, (*case, float(err))
    assert (z[:, torch.tensor(slots) == -1] == 0).all()


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    cases = [(1, 1, 1, 16, 64, [16]), (7, 3, 3, 16, 100, [16, 0, 5]), (37, 2, 5, 48, 130, [48, 7, 0, 33, 1]),
             (64, 1, 9, 32, 257, [32, 32, 8, 0, 16, 32, 3, 32, 20]),
             (300, 2, 3, 16, 40, [16, 5, 0]),  # > 256 tokens: 64-token tiles
             (290, 1, 2, 128, 48, [128, 70]),  # large rank, long step
             (70, 3, 1, 32, 64, [32])]  # one adapter for every token: many tiles of one slot
    prologues = (None, "norm", "gated")
    big = []  # Llama-3-8B shapes on the GPU, each with the prologue the engine gives it
    if device == "cuda":
        big = [((64, 3, 64, 256, 4096, [256] * 64), "norm"), ((64, 1, 16, 32, 14336, [32] * 16), "gated"),
               ((64, 1, 16, 32, 14336, [32] * 16), None), ((300, 2, 16, 32, 4096, [32] * 16), "norm"),
               ((2048, 3, 8, 256, 4096, [256, 128] * 4), None)]
    configs = [None, ShrinkConfig(block_r=16, block_k=32, split_k=3, tile_major=False),
               ShrinkConfig(block_r=32, block_k=16, split_k=2, tile_programs=2)]  # programs loop over tiles
    runs = [(case, prologue) for case in cases for prologue in prologues] + big
    checked = 0
    for i, ((t, m, s, r, k, ranks), prologue) in enumerate(runs):  # the default, and split-K on every case
        for dtype in dtypes:
            for config in configs:
                check(t, m, s, r, k, ranks, dtype, device, seed=i, config=config, prologue=prologue)
                checked += 1
    print(f"shrink kernel ok on {device}: {checked} cases")


if __name__ == "__main__":
    sys.exit(main())
