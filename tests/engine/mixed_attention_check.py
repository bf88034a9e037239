"""A step's attention as the model runner builds it (ModelRunner._attention_metadata) vs each sequence's own
reference attention: steps that mix decodes, one-token prompt chunks (at 0 and mid-prompt), and chunks starting
at 0 and later, in scrambled order, with grouped heads, sliding windows and softcap; through the varlen kernel
(decode_kernels: the CUDA path) and padded SDPA. Run by test_mixed_attention.py: natively on a GPU (which also takes the
CUDA padded-SDPA path), else in Triton's interpreter (TRITON_INTERPRET=1 set by the caller).
"""

import random
import sys
from types import SimpleNamespace

import numpy as np
import torch

from server.engine.attention import (AttentionMetadata, MixedMetadata, VarlenMetadata, attention_reference,
                                     paged_attention_forward)
from server.engine.model_runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import Sequence


def runner_for(kv_cache, block_size, max_blocks_per_seq, decode_kernels, device):
    """The runner's state _attention_metadata reads, without a model."""
    runner = ModelRunner.__new__(ModelRunner)
    runner.device, runner.block_size, runner.kv_caches = torch.device(device), block_size, [kv_cache]
    runner.max_blocks_per_seq, runner.scratch_block = max_blocks_per_seq, kv_cache.shape[1] // block_size - 1
    runner.decode_kernels = decode_kernels
    return runner


def check(kinds, heads, kv_heads, head_dim, block_size, dtype, device, seed, decode_kernels, window=None,
          softcap=None):
    """kinds: per sequence (start, num_tokens, samples), in scheduled order."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    max_len = max(start + n for start, n, _ in kinds) + 2
    max_blocks = -(-max_len // block_size)
    num_blocks = len(kinds) * max_blocks + 1  # + the scratch block
    kv = torch.randn(2, num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    free = list(range(num_blocks - 1))
    rng.shuffle(free)
    scheduled = []
    for i, (start, n, samples) in enumerate(kinds):
        seq = Sequence(f"s{i}", [rng.randrange(3, 99) for _ in range(start + n + (0 if samples else 2))],
                       SamplingParams(max_tokens=4), None, None)
        seq.block_table = [free.pop() for _ in range(-(-(start + n) // block_size))]
        scheduled.append(ScheduledSeq(seq, start, n, samples))
    runner = runner_for(kv, block_size, max_blocks, decode_kernels, device)
    slot_mapping = [item.seq.block_table[p // block_size] * block_size + p % block_size
                    for item in scheduled for p in range(item.start, item.start + item.num_tokens)]
    as_long = lambda values: torch.tensor(np.asarray(values), dtype=torch.long, device=device)  # noqa: E731
    meta = runner._attention_metadata(scheduled, as_long(slot_mapping), as_long)
    mixed = any(item.num_tokens == 1 for item in scheduled) and any(item.num_tokens > 1 for item in scheduled)
    expected = VarlenMetadata if decode_kernels else MixedMetadata if mixed else AttentionMetadata
    assert type(meta) is expected, type(meta)
    num_tokens = len(slot_mapping)
    query = torch.randn(1, heads, num_tokens, head_dim, generator=gen).to(dtype).to(device)
    key = torch.randn(1, kv_heads, num_tokens, head_dim, generator=gen).to(dtype).to(device)
    value = torch.randn(1, kv_heads, num_tokens, head_dim, generator=gen).to(dtype).to(device)
    scale = head_dim**-0.5
    got = paged_attention_forward(SimpleNamespace(layer_idx=0), query, key, value, None, scaling=scale,
                                  sliding_window=window, softcap=softcap, pica_attention=meta)[0][0].float().cpu()
    kv_host, q_host = kv.float().cpu(), query[0].float().cpu()  # the cache holds this step's K/V now
    row = 0
    for s, item in enumerate(scheduled):
        ctx, n = item.start + item.num_tokens, item.num_tokens
        slots = torch.tensor([item.seq.block_table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        k, v = kv_host[0][slots].transpose(0, 1)[None], kv_host[1][slots].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
        qpos = torch.arange(item.start, ctx)[:, None]
        kpos = torch.arange(ctx)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= qpos - kpos < window
        ref = attention_reference(q_host[:, row : row + n][None], k, v, mask[None, None], scale, softcap)[0]
        ref = ref.transpose(0, 1)  # [n, H, D]
        err = (got[row : row + n] - ref).norm() / ref.norm()
        tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 2e-2
        assert torch.isfinite(got[row : row + n]).all() and err < tol, (s, item.start, n, float(err), window, softcap)
        row += n
    assert row == num_tokens


STEPS = [
    # decodes, a 1-token prompt, a 1-token chunk mid-prompt, chunks at 0 and later, scrambled
    [(9, 1, True), (0, 5, False), (4, 1, True), (0, 1, True), (6, 1, False), (3, 7, True), (17, 1, True)],
    [(0, 3, True), (12, 1, True)],  # one chunk, one decode
    [(20, 1, True), (5, 1, False), (1, 4, True), (30, 1, True), (0, 9, False)],
    [(0, 6, True), (2, 3, True)],  # prompt chunks only
    [(7, 1, True), (0, 1, True), (3, 1, False)],  # one-token rows only
    [(3, 40, True), (25, 1, True), (0, 20, False), (16, 17, True)],  # chunks over several 16-token tiles
]


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    shapes = [dict(heads=4, kv_heads=2, head_dim=16, block_size=4),
              dict(heads=4, kv_heads=4, head_dim=16, block_size=8),
              dict(heads=8, kv_heads=2, head_dim=32, block_size=16)]  # Llama-3-8B's 4 query heads per kv head
    n = 0
    for i, kinds in enumerate(STEPS):
        for shape in shapes:
            for extra in ({}, dict(window=5), dict(softcap=5.0)):
                for decode_kernels in (False, True):
                    for dtype in dtypes:
                        check(kinds, dtype=dtype, device=device, seed=i, decode_kernels=decode_kernels, **shape,
                              **extra)
                        n += 1
    print(f"mixed attention ok on {device}: {n} cases")


if __name__ == "__main__":
    sys.exit(main())
