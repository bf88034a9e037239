"""Grouped expand kernel vs the plain-torch reference on random slot maps (run by test_expand_kernel.py).

Runs on CUDA when there is a GPU, else in Triton's interpreter (TRITON_INTERPRET=1 set by the caller).
"""

import sys

import torch

from adapters.expand_kernel import ExpandConfig, expand_grouped

PER_TOKEN = [ExpandConfig(16, 16, per_token=True), ExpandConfig(16, 256, num_warps=2, per_token=True)]
"""The program-per-token kernel: several K blocks, and the whole rank in one."""
PAGES = [ExpandConfig(16, 16, 4, 2, pages=True), ExpandConfig(32, 16, 4, 3, pages=True),
         ExpandConfig(32, 16, 4, 1, pages=True, unroll=True)]
"""The page kernel: one column block per member, blocks of 32 where the bounds allow, and its loop unrolled."""
from adapters.layer import SlotIndex, SlotStacks
from adapters.ops import expand_reference
from adapters.rank_pages import page_size_for, pages_for_rank


def check(num_tokens, outs, num_slots, rank_max, ranks, dtype, device, seed, config=None, runs=()):
    """`ranks[slot]` is the adapter rank in each member; member m >= 1 leaves slot 0 alone (rank 0). runs: (slot,
    count) pairs that take the first tokens, one slot after the other (a prompt's chunk each): the step is split
    (the tile kernel over those, the per-token kernel over the rest)."""
    gen = torch.Generator().manual_seed(seed)
    groups = tuple(f"g{m}" for m in range(len(outs)))
    num_layers = 3
    # a pool of just the pages these slots take (plus one), handed out shuffled: no slot holds a contiguous run
    page = page_size_for(rank_max)
    num_pages = sum(pages_for_rank(r, page) for r in ranks) + 1
    stacks = SlotStacks({g: (o, rank_max, num_layers) for g, o in zip(groups, outs)}, num_slots, dtype, device,
                        pool_ranks=num_pages * page)
    free = torch.randperm(num_pages, generator=gen).tolist()
    paged = stacks.served(groups)
    for slot, r in enumerate(ranks):
        tensors = {g: torch.randn(o, r, generator=gen).to(dtype) for m, (g, o) in enumerate(zip(groups, outs))
                   if r and not (m and slot == 0)}
        if slot % 2:  # odd slots bring per-layer signs (an imported adapter), even ones the identity
            tensors.update({f"signs.{g}": (torch.randint(0, 2, (num_layers, r), generator=gen) * 2 - 1).to(dtype)
                            for g in list(tensors)})
        stacks.write(slot, tensors, [free.pop() for _ in range(stacks.pages_for(tensors))])
    layer = seed % num_layers
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).tolist()
    slots[0] = -1
    if num_tokens > 3:
        slots[1] = slots[3] = num_slots - 1  # a repeated slot, not next to each other
    if runs:
        first = [slot for slot, count in runs for _ in range(count)]
        slots[1 : 1 + len(first)] = first
        slots[len(first) + 2] = runs[0][0]  # one more token of a tiled slot, after the others: still tiled
    bounds = [sum(outs[:m]) for m in range(len(outs) + 1)]
    # half the cases give the index the slots' ranks (as the engine does), half leave them unknown (whole stacks read)
    index = SlotIndex(max(num_tokens, 8), device, stacks.slot_ranks if seed % 2 else None)
    index.set(slots, per_token=True if runs else None, with_prompts=bool(runs))
    if runs:  # tiles of 16 over the slots of at least 16 tokens, none for the others
        counts = [slots.count(s) for s in range(num_slots)]
        assert index.split and index.num_tiles_host == sum(-(-c // 16) for c in counts if c >= 16), counts
    y0z = torch.randn(num_tokens, bounds[-1] + len(outs) * rank_max, generator=gen).to(dtype).to(device)
    ref = expand_reference(y0z.float(), paged, layer, bounds, torch.tensor(slots)).cpu()
    got = expand_grouped(y0z.clone(), paged, layer, bounds, index, config).cpu().float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    case = (num_tokens, outs, num_slots, rank_max, ranks, dtype, config)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * rank_max**0.5, msg=lambda m: f"{case}: {m}")
    base_rows = [t for t, s in enumerate(slots) if s == -1]
    assert torch.equal(got[base_rows], y0z[base_rows, : bounds[-1]].cpu().float()), case  # y0 left exactly


def check_captured(device, rank):
    """A CUDA graph captured on one slot mapping replays right on others of its kind: the tile kernel's grid
    covers any decode step of at most TILE_MAX_SLOTS slots; the per-token kind, any step (at rank 32 the
    per-token kernel, above PER_TOKEN_MAX_RANK the page kernel's tiles over every slot)."""
    gen = torch.Generator().manual_seed(7)
    outs, num_slots, num_tokens = (256, 64, 64), 64, 64
    groups = tuple(f"g{m}" for m in range(len(outs)))
    stacks = SlotStacks({g: (o, rank, 1) for g, o in zip(groups, outs)}, num_slots, torch.bfloat16, device)
    paged = stacks.served(groups)
    for slot in range(num_slots):
        stacks.write(slot, {g: torch.randn(o, 8 + slot % (rank - 7), generator=gen).to(torch.bfloat16)
                            for g, o in zip(groups, outs)})
    bounds = [0, 256, 320, 384]
    index = SlotIndex(num_tokens, device, stacks.slot_ranks)
    y0z = torch.randn(num_tokens, bounds[-1] + 3 * rank, generator=gen).to(torch.bfloat16).to(device)
    work = y0z.clone()
    cases = {False: [[s // 4 for s in range(num_tokens)], [-1] * 8 + [s % 7 for s in range(56)]],  # 16 slots x 4
             True: [list(range(num_tokens)), [s % 20 - 1 for s in range(num_tokens)]],  # 64 slots; 19 and base
             "split": [[5] * 40 + list(range(24)), [3] * 16 + [9] * 17 + [-1] * 3 + list(range(28)),  # prompt runs
                       list(range(num_tokens))]}  # none: the tile programs exit
    for per_token, mappings in cases.items():
        split = per_token == "split"
        index.set([0] * num_tokens, per_token=bool(per_token), with_prompts=split)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            expand_grouped(work, paged, 0, bounds, index)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            expand_grouped(work, paged, 0, bounds, index)
        for slots in mappings:
            index.set(slots, per_token=True if split else None, with_prompts=split)
            assert index.per_token == bool(per_token) and index.split == split, (per_token, slots)
            work.copy_(y0z)
            graph.replay()
            ref = expand_reference(y0z.float(), paged, 0, bounds, torch.tensor(slots)).cpu()
            torch.testing.assert_close(work[:, : bounds[-1]].cpu().float(), ref, rtol=3e-2, atol=3e-2 * rank**0.5)
    return sum(len(m) for m in cases.values())


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    cases = [
        (1, (32,), 2, 16, [16, 5]),
        (7, (48, 16, 16), 3, 16, [16, 0, 9]),  # q/k/v-like members, a slot of rank 0
        (37, (96, 96), 4, 32, [32, 17, 1, 32]),  # gate/up-like, odd token count, prefill-sized tiles below
        (300, (64,), 5, 16, [3, 16, 16, 8, 12]),  # > 256 tokens: 64-token tiles
        (9, (24,), 2, 20, [20, 7]),  # width not a multiple of 16: masked column blocks
        (11, (32, 16), 5, 128, [128, 8, 33, 32, 0]),  # rank 128: the per-token path splits at 32 (both sides of it)
    ]
    if device == "cuda":
        cases += [(64, (4096, 1024, 1024), 16, 64, [64, 32, 16, 48] * 4), (64, (14336,), 64, 256, [256, 32] * 32),
                  (2048, (4096, 1024, 1024), 8, 32, [32] * 8), (513, (1536,), 9, 256, [256, 8, 64, 255, 1, 0, 16, 128, 32])]
    seed = 0
    for dtype in dtypes:
        for num_tokens, outs, num_slots, rank_max, ranks in cases:
            bounds = [sum(outs[:m]) for m in range(len(outs) + 1)]
            pages = [cfg for cfg in PAGES if page_size_for(rank_max) >= 16 and not any(b % cfg.block_n for b in bounds[1:-1])]
            for config in [None, *(PER_TOKEN if num_tokens <= 256 else []), *pages]:  # per token: decode only
                check(num_tokens, outs, num_slots, rank_max, ranks, dtype, device, seed, config)
                seed += 1
        for config in [None, PER_TOKEN[0], ExpandConfig(16, 16)]:  # split steps: a prompt's run beside decodes
            check(50, (96, 96), 6, 32, [32, 17, 1, 32, 8, 0], dtype, device, seed, config, runs=((1, 18), (3, 16)))
            check(30, (32, 16), 5, 128, [128, 8, 33, 32, 0], dtype, device, seed + 1, config, runs=((0, 17),))
            seed += 2
        for odd in (0, 1):  # a per-token step above rank 32 (the page kernel's tiles), slot ranks unknown / known
            check(40, (32, 16), 20, 128, [128, 8, 32, 64, 0] * 4, dtype, device, seed - seed % 2 + odd)
        seed += 2
        check(7, (48, 16, 16), 3, 32, [32, 20, 9], dtype, device, seed, ExpandConfig(16, 16))  # several K steps
        check(40, (96, 32), 3, 64, [64, 3, 9], dtype, device, seed + 1, ExpandConfig(32, 32, num_stages=2))
        seed += 2
    if device == "cuda":
        seed += check_captured(device, 32) + check_captured(device, 64)
    print(f"expand kernel ok on {device}: {seed} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
