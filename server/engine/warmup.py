"""Warm-up before the server reports ready: one prefill-sized step, base and adapted.

CUDA graph capture already runs every decode kind once; a fresh process's first prefill still compiles the
Triton kernels of prefill shapes (the expand's 64-token tiles, RMSNorm's row counts) and loads cuBLAS's
kernels for the large GEMMs: a second or more that the first requests after a (re)start would otherwise
pay in their time to first token. The step writes K/V into blocks nobody holds yet and reads slot 0's
zeros, so it leaves nothing behind.
"""

from __future__ import annotations

import time

import torch

from cache.slot_table import BASE_SLOT
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import Sequence


@torch.no_grad()
def warm_up(runner, max_num_batched_tokens: int, max_num_seqs: int) -> float:
    """Run a step of up to max_num_batched_tokens prompt tokens (sequences of at most max_model_len) twice,
    on the base model and on adapter slot 0; returns the seconds it took."""
    start = time.perf_counter()
    bs = runner.block_size
    lengths, left, free_blocks = [], max_num_batched_tokens, runner.num_kv_blocks
    while left > 0 and len(lengths) < max_num_seqs:
        n = min(runner.max_model_len, left, free_blocks * bs)
        if n <= 0:
            break
        lengths.append(n)
        left, free_blocks = left - n, free_blocks - -(-n // bs)
    for slot in (BASE_SLOT, 0):
        scheduled, next_block = [], 0
        for i, n in enumerate(lengths):
            seq = Sequence(f"warm-up-{i}", [1 + (7 * j) % 97 for j in range(n)], SamplingParams(max_tokens=1), None, None)
            seq.block_table = list(range(next_block, next_block + -(-n // bs)))
            seq.slot = slot
            next_block += len(seq.block_table)
            scheduled.append(ScheduledSeq(seq, 0, n, True))
        runner.run(scheduled)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - start
