"""LoRA kernels (adapters/lora_kernel.py) vs lora_reference on random slot maps (run by test_lora_kernel.py).

    python tests/adapters/lora_kernel_check.py          # small shapes: natively on CUDA, else TRITON_INTERPRET=1
    python tests/adapters/lora_kernel_check.py --gpu    # also Llama-3-8B shapes and CUDA-graph capture/replay

Stacks are filled through SlotStacks.write (as the server does), so the device ranks are the ones it keeps.
"""

import sys

import torch

from adapters.layer import SlotIndex, SlotStacks
from adapters.lora_kernel import LoraConfig, lora_grouped
from adapters.ops import lora_reference

SPLIT_CONFIGS = [LoraConfig(block_k=32, splits=3), LoraConfig(block_k=32, block_n=16, splits=1)]
"""Fixed splits: an uneven last split (and more splits than the default picks on few tokens), and none."""


def tolerance(dtype):
    return 1e-4 if dtype == torch.float32 else 3e-2


def build(in_features, out_features, num_slots, rank_max, ranks, dtype, device, gen):
    """SlotStacks of one layer with slot s at rank ranks[s] (0: a slot of another method, nothing written); slot 0
    is first written at the full rank, then at its own, so a rewrite must clear the old rows and rank."""
    stacks = SlotStacks({}, num_slots, dtype, device, {"l": (out_features, in_features)}, rank_max)

    def factors(r):
        return {"lora_A.l": (torch.randn(r, in_features, generator=gen) / in_features**0.5).to(dtype),
                "lora_B.l": (torch.randn(out_features, r, generator=gen) / max(r, 1)**0.5).to(dtype)}

    stacks.write(0, factors(rank_max))
    for slot, r in enumerate(ranks):
        stacks.write(slot, factors(r) if r else {})
    a_stack, b_stack, host_ranks, device_ranks = stacks.per_layer("l")
    assert host_ranks == list(ranks) and device_ranks.tolist() == list(ranks)
    return stacks, a_stack, b_stack, device_ranks


def random_slots(num_tokens, num_slots, gen):
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).tolist()
    slots[0] = -1
    if num_tokens > 3:
        slots[1] = slots[3] = num_slots - 1  # a repeated slot, not next to each other
    return slots


def check(num_tokens, in_features, out_features, num_slots, rank_max, ranks, dtype, device, seed, per_token,
          config=None):
    gen = torch.Generator().manual_seed(seed)
    _, a_stack, b_stack, device_ranks = build(in_features, out_features, num_slots, rank_max, ranks, dtype, device, gen)
    slots = random_slots(num_tokens, num_slots, gen)
    index = SlotIndex(max(num_tokens, 8), device)
    index.set(slots, per_token=per_token)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
    wide = torch.randn(num_tokens, out_features + 5, generator=gen).to(dtype)  # y is a strided view, as in SharedGemm
    y = wide[:, 2 : 2 + out_features]
    ref = lora_reference(x.float(), y.float(), a_stack.cpu().float(), b_stack.cpu().float(), torch.tensor(slots))
    for slot, r in enumerate(ranks):  # past each slot's rank the kernels must load nothing: NaN there would show
        a_stack[slot, r:] = float("nan")
        b_stack[slot, :, r:] = float("nan")
    work = wide.to(device, copy=True)  # a copy on the CPU too: y must stay the input
    lora_grouped(x.to(device), work[:, 2 : 2 + out_features], a_stack, b_stack, device_ranks, index, config)
    got = work.cpu().float()
    tol = tolerance(dtype)
    case = (num_tokens, in_features, out_features, num_slots, rank_max, ranks, dtype, per_token, config)
    torch.testing.assert_close(got[:, 2 : 2 + out_features], ref, rtol=tol, atol=tol, msg=lambda m: f"{case}: {m}")
    assert torch.equal(got[:, :2], wide[:, :2].float()) and torch.equal(got[:, 2 + out_features :],
                                                                         wide[:, 2 + out_features :].float()), case
    untouched = [t for t, s in enumerate(slots) if s == -1 or ranks[s] == 0]
    assert torch.equal(got[untouched, 2 : 2 + out_features], y[untouched].float()), case  # y left exactly
    adapted = [t for t, s in enumerate(slots) if s >= 0 and ranks[s] > 0]
    if adapted:  # the delta is really there (a kernel that adds nothing fails above, or here on tiny deltas)
        assert (ref[adapted] - y[adapted].float()).abs().max() > 10 * tol, case


def check_captured(device):
    """A CUDA graph captured on one slot mapping replays right on others of its kind, and after a slot is rewritten
    at another rank (the device ranks are read by the kernels, never baked into the graph)."""
    gen = torch.Generator().manual_seed(11)
    dtype, num_tokens, num_slots, rank_max, in_features, out_features = torch.bfloat16, 64, 64, 32, 512, 384
    ranks = [0 if s % 9 == 4 else 1 + s % rank_max for s in range(num_slots)]
    stacks, a_stack, b_stack, device_ranks = build(in_features, out_features, num_slots, rank_max, ranks, dtype,
                                                   device, gen)
    index = SlotIndex(num_tokens, device)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(device)
    y = torch.randn(num_tokens, out_features, generator=gen).to(dtype).to(device)
    work = y.clone()
    cases = {False: [[s // 4 for s in range(num_tokens)], [-1] * 8 + [s % 7 for s in range(56)]],  # 16 slots x 4
             True: [list(range(num_tokens)), [s % 20 - 1 for s in range(num_tokens)]]}  # 64 slots; 19 and base
    count = 0
    for per_token, mappings in cases.items():
        index.set([0] * num_tokens, per_token=per_token)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles
            lora_grouped(x, work, a_stack, b_stack, device_ranks, index)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lora_grouped(x, work, a_stack, b_stack, device_ranks, index)
        for rewrite in (False, True):
            if rewrite:  # slot 2 and 5: another adapter at another rank; slot 0 leaves the layer
                stacks.write(2, {"lora_A.l": torch.randn(rank_max, in_features, generator=gen).to(dtype) / 20,
                                 "lora_B.l": torch.randn(out_features, rank_max, generator=gen).to(dtype) / 5})
                stacks.write(5, {"lora_A.l": torch.randn(3, in_features, generator=gen).to(dtype) / 20,
                                 "lora_B.l": torch.randn(out_features, 3, generator=gen).to(dtype)})
                stacks.write(0, {})
            for slots in mappings:
                index.set(slots)
                assert index.per_token == per_token, (per_token, slots)
                work.copy_(y)
                graph.replay()
                ref = lora_reference(x.cpu().float(), y.cpu().float(), a_stack.cpu().float(), b_stack.cpu().float(),
                                     torch.tensor(slots))
                torch.testing.assert_close(work.cpu().float(), ref, rtol=3e-2, atol=3e-2)
                count += 1
    return count


def llama_cases():
    """Llama-3-8B shapes (q, k, gate, down) at decode over 8 and 64 slots, r=16 and 64, and a 2048-token prefill."""
    return [(64, 4096, 4096, 8, 16, [16, 8, 16, 0, 1, 16, 12, 16]),
            (64, 4096, 1024, 64, 64, [64, 0, 17, 64, 32, 1, 63, 48] * 8),
            (64, 4096, 14336, 64, 16, [16, 4] * 32),
            (64, 14336, 4096, 8, 64, [64, 64, 8, 33, 0, 64, 16, 64]),
            (2048, 4096, 4096, 8, 64, [64, 64, 16, 0, 64, 32, 64, 8]),
            (300, 14336, 4096, 9, 32, [32, 1, 0, 17, 32, 32, 8, 31, 32])]


def main():
    gpu = "--gpu" in sys.argv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if gpu and device != "cuda":
        print("--gpu needs a CUDA device")
        return 1
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    cases = [
        (1, 64, 32, 2, 16, [16, 5]),
        (7, 200, 48, 3, 16, [16, 0, 9]),  # `in` not a multiple of the K block; a slot of rank 0
        (64, 256, 96, 64, 32, [(5 * s) % 33 for s in range(64)]),  # a decode step over 64 slots, ranks 0..32
        (300, 128, 80, 5, 16, [3, 16, 16, 8, 1]),  # > 256 tokens: 64-token tiles (prefill)
        (9, 96, 24, 2, 20, [20, 7]),  # R not a power of 2, width not a multiple of the column block
        (37, 64, 40, 4, 64, [64, 1, 33, 0]),
    ]
    if gpu:
        cases += llama_cases()
    seed = 0
    for dtype in dtypes:
        for num_tokens, in_features, out_features, num_slots, rank_max, ranks in cases:
            for per_token in (False, True):
                configs = [None] + (SPLIT_CONFIGS if in_features <= 256 else [])
                for config in configs:
                    check(num_tokens, in_features, out_features, num_slots, rank_max, ranks, dtype, device, seed,
                          per_token, config)
                    seed += 1
    if gpu:
        seed += check_captured(device)
    print(f"lora kernel ok on {device}: {seed} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
