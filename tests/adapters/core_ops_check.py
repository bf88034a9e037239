"""The core op between frozen factors (PSOFT) on a device vs its plain-torch reference, and inside a CUDA graph
replayed with other slot mappings (run by test_core_ops.py; `python tests/adapters/core_ops_check.py` on a GPU).
"""

import sys

import torch

from adapters.core_ops import core, core_gathered, core_reference, core_torch
from adapters.layer import BASE_SLOT, SlotIndex, SlotStacks


def random_stacks(num_slots, num_layers, rank_max, out, dtype, device, seed):
    """Core stacks with a random K per slot (the first and last at full rank, the others at a random rank, some 0:
    slots of other methods), and E [out, R]."""
    gen = torch.Generator().manual_seed(seed)
    stacks = SlotStacks({"g": (out, rank_max, num_layers)}, num_slots, dtype, device, max_core_rank=rank_max)
    for slot in range(num_slots):
        r = int(torch.randint(0, rank_max + 1, (1,), generator=gen)) if 0 < slot < num_slots - 1 else rank_max
        stacks.write(slot, {"core.g": torch.randn(num_layers, r, r, generator=gen).to(dtype)} if r else {})
    expand = torch.randn(out, rank_max, generator=gen).to(dtype).to(device)
    return stacks, expand


def random_slots(num_tokens, num_slots, gen) -> list[int]:
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).tolist()
    slots[0] = BASE_SLOT
    if num_tokens > 3:
        slots[1] = slots[3] = num_slots - 1  # a repeated slot, not next to each other
    return slots


def check(num_tokens, num_slots, rank_max, out, dtype, device, seed, fn="core"):
    gen = torch.Generator().manual_seed(seed)
    num_layers = 3
    stacks, expand = random_stacks(num_slots, num_layers, rank_max, out, dtype, device, seed)
    cores, ranks = stacks.core_of("g")
    layer = 1 + seed % (num_layers - 1)  # never 0, so a wrong row of the stack shows
    slots = random_slots(num_tokens, num_slots, gen)
    index = SlotIndex(max(num_tokens, 8), device)
    index.set(slots)
    z = torch.randn(num_tokens, rank_max, generator=gen).to(dtype).to(device)
    y0 = torch.randn(num_tokens, out, generator=gen).to(dtype).to(device)
    ref = core_reference(z.cpu().float(), y0.cpu().float(), cores.cpu().float(), layer, expand.cpu().float(),
                         torch.tensor(slots))
    y = y0.clone()
    if fn == "gathered":
        core_gathered(z, y, cores, layer, expand, index.token_slots)
    elif fn == "torch":
        core_torch(z, y, cores, layer, expand, ranks, index)
    else:
        core(z, y, cores, layer, expand, ranks, index)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    case = (num_tokens, num_slots, rank_max, out, dtype, fn)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.cpu().float(), ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{case}: {m}")
    untouched = [t for t, s in enumerate(slots) if s == BASE_SLOT or ranks[s] == 0]
    assert torch.equal(y[untouched].cpu(), y0[untouched].cpu()), case  # base and other methods' rows left exactly
    if len(untouched) < num_tokens:
        assert (ref - y0.cpu().float()).abs().max() > 1e-2, case  # the cores change the PSOFT rows


def check_captured(device, dtype=torch.bfloat16):
    """The op captured in a CUDA graph on one slot mapping, replayed on others (and after a slot's core changes),
    equals the reference each time: it reads only device data."""
    gen = torch.Generator().manual_seed(11)
    num_slots, num_layers, rank_max, out, num_tokens = 16, 2, 16, 512, 64
    stacks, expand = random_stacks(num_slots, num_layers, rank_max, out, dtype, device, seed=3)
    cores, ranks = stacks.core_of("g")
    index = SlotIndex(num_tokens, device)
    z = torch.zeros(num_tokens, rank_max, dtype=dtype, device=device)
    y = torch.zeros(num_tokens, out, dtype=dtype, device=device)
    y0 = torch.zeros_like(y)
    index.set([0] * num_tokens)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        core(z, y, cores, 1, expand, ranks, index)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(y0)
        core(z, y, cores, 1, expand, ranks, index)
    for replay in range(4):
        slots = random_slots(num_tokens, num_slots, gen)
        if replay == 3:  # a slot changes hands after capture: a new core is copied in
            stacks.write(num_slots - 1, {"core.g": torch.randn(num_layers, 5, 5, generator=gen).to(dtype)})
        index.set(slots)
        z.copy_(torch.randn(num_tokens, rank_max, generator=gen).to(dtype))
        y0.copy_(torch.randn(num_tokens, out, generator=gen).to(dtype))
        graph.replay()
        ref = core_reference(z.cpu().float(), y0.cpu().float(), cores.cpu().float(), 1, expand.cpu().float(),
                             torch.tensor(slots))
        scale = ref.abs().max().item()
        torch.testing.assert_close(y.cpu().float(), ref, rtol=3e-2, atol=3e-2 * scale, msg=lambda m: f"replay {replay}: {m}")


def main(device: str) -> None:
    for seed, (num_tokens, num_slots, rank_max, out) in enumerate(
            [(1, 2, 4, 16), (9, 4, 8, 48), (64, 16, 16, 256), (300, 8, 32, 96), (600, 8, 16, 64)]):
        for dtype in (torch.float32, torch.bfloat16):
            check(num_tokens, num_slots, rank_max, out, dtype, device, seed)
            check(num_tokens, num_slots, rank_max, out, dtype, device, seed, fn="gathered")
    if device == "cuda":
        check_captured(device)
    print("core ops: ok on", device)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
