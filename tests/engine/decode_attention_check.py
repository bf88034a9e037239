"""Paged decode attention kernel vs the gathered reference (run by test_decode_attention.py).

CUDA when there is a GPU, else Triton's interpreter (TRITON_INTERPRET=1 set by the caller).
"""

import random
import sys

import torch

from server.engine.attention import attention_reference
from server.engine.decode_attention import DecodeConfig, paged_decode_attention


def check(num_seqs, heads, kv_heads, head_dim, block_size, max_len, dtype, device, seed, window=None, softcap=None,
          config=None):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = num_seqs * (max_len // block_size + 1) + 3
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered, non-contiguous blocks
    lens = [rng.randint(1, max_len) for _ in range(num_seqs)]
    max_blocks = max(-(-n // block_size) for n in lens)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32, device=device)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).to(dtype).to(device)
    scale = head_dim**-0.5
    got = paged_decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32, device=device),
                                 block_size, scale, window, softcap, config).float().cpu()
    for s, n in enumerate(lens):
        slots = torch.tensor([tables[s][p // block_size] * block_size + p % block_size for p in range(n)])
        k = k_cache.float().cpu()[slots].transpose(0, 1)[None]  # [1, Hkv, n, D]
        v = v_cache.float().cpu()[slots].transpose(0, 1)[None]
        mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
        if window:
            mask[..., : max(0, n - window)] = False
        ref = attention_reference(q.float().cpu()[s][None, :, None], k, v, mask, scale, softcap)[0, :, 0]
        err = (got[s] - ref).norm() / ref.norm()
        tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 2e-2
        assert torch.isfinite(got[s]).all() and err < tol, (s, n, float(err), dtype, window, softcap, config)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    cases = [dict(num_seqs=5, heads=4, kv_heads=2, head_dim=16, block_size=4, max_len=40),
             dict(num_seqs=3, heads=8, kv_heads=8, head_dim=24, block_size=16, max_len=70),
             dict(num_seqs=4, heads=4, kv_heads=1, head_dim=16, block_size=8, max_len=50, window=9),
             dict(num_seqs=2, heads=4, kv_heads=2, head_dim=16, block_size=4, max_len=30, softcap=5.0)]
    if device == "cuda":
        cases += [dict(num_seqs=64, heads=32, kv_heads=8, head_dim=128, block_size=16, max_len=600),
                  dict(num_seqs=7, heads=16, kv_heads=4, head_dim=80, block_size=16, max_len=300)]
    # the step's own (split at these sizes), one pipelined program, then flash-decoding splits (some of them empty at short contexts) and other pipeline depths
    configs = [None, DecodeConfig(), DecodeConfig(block_n=16, splits=3, num_stages=2), DecodeConfig(block_n=32, splits=2,
                                                                                               num_stages=1)]
    for i, case in enumerate(cases):
        for dtype in dtypes:
            for config in configs:
                check(dtype=dtype, device=device, seed=i, config=config, **case)
    print(f"decode attention ok on {device}: {len(cases) * len(dtypes) * len(configs)} cases")


if __name__ == "__main__":
    sys.exit(main())
