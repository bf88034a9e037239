"""Fused RoPE, SiLU * up and residual add + RMSNorm kernels vs their torch references, and our decoder's layer
pieces with them vs without (run by test_fused_pointwise.py).

Runs on CUDA when there is a GPU, else in Triton's interpreter (TRITON_INTERPRET=1 set by the caller).
"""

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from server.engine.fused_pointwise import rope, rope_store, silu_mul
from server.engine.llama_decoder import LlamaDecoder, rotate
from server.engine.rms_norm import add_rms_norm, add_rms_norm_reference, fuse_rms_norms


def strided(tokens: int, width: int, offset: int, total: int, device, dtype, gen) -> torch.Tensor:
    """[tokens, width] columns offset.. of a [tokens, total] buffer: how a fused GEMM's output is sliced."""
    buffer = (torch.randn(tokens, total, generator=gen) * 2).to(device, dtype)
    return buffer[:, offset:offset + width]


def check_kernels(device, dtype, gen) -> int:
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    cases = 0
    for tokens, heads, dim in ((1, 1, 2), (5, 3, 8), (7, 8, 64), (3, 32, 128), (0, 4, 16)):
        x = strided(tokens, heads * dim, dim, heads * dim + 3 * dim, device, dtype, gen).view(tokens, heads, dim)
        angles = torch.randn(tokens, dim // 2, generator=gen).repeat(1, 2)  # transformers' cat(freqs, freqs)
        cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
        got = rope(x, cos, sin)
        assert got.shape == x.shape and got.is_contiguous()
        torch.testing.assert_close(got, rotate(x, cos, sin), **tol)
        cases += 1
    for tokens, heads, kv_heads, dim in ((1, 1, 1, 2), (5, 4, 2, 8), (6, 12, 4, 80), (3, 32, 8, 128), (0, 4, 2, 16)):
        fused = strided(tokens, (heads + 2 * kv_heads) * dim, 0, (heads + 2 * kv_heads + 1) * dim, device, dtype, gen)
        q, k, v = (part.view(tokens, h, dim) for part, h in zip(fused.split([heads * dim, kv_heads * dim, kv_heads * dim], 1),
                                                                 (heads, kv_heads, kv_heads)))
        angles = torch.randn(tokens, dim // 2, generator=gen).repeat(1, 2)
        cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
        cache = torch.randn(2, 3 * tokens + 5, kv_heads, dim, generator=gen).to(device, dtype)
        slots = torch.randperm(3 * tokens + 5, generator=gen)[:tokens].to(device)
        expected = cache.clone()
        expected[0].index_copy_(0, slots, rope(k, cos, sin))
        expected[1].index_copy_(0, slots, v)
        got = rope_store(q, k, v, cos, sin, cache[0], cache[1], slots)
        torch.testing.assert_close(got, rope(q, cos, sin), rtol=0, atol=0)
        torch.testing.assert_close(cache, expected, rtol=0, atol=0)  # the rest of the cache untouched
        cases += 1
    for tokens, n in ((1, 1), (4, 33), (6, 1000), (2, 2500), (0, 8)):
        gate = strided(tokens, n, 0, 2 * n + 5, device, dtype, gen)
        up = strided(tokens, n, n, 2 * n + 5, device, dtype, gen)
        torch.testing.assert_close(silu_mul(gate, up), F.silu(gate) * up, **tol)
        cases += 1
    for tokens, n in ((1, 16), (5, 100), (3, 4096), (0, 8)):
        x = (torch.randn(tokens, n, generator=gen) * 3).to(device, dtype)
        delta = strided(tokens, n, 2, n + 7, device, dtype, gen)
        w = torch.randn(n, generator=gen).to(device, dtype)
        got, expected = add_rms_norm(x, delta, w, 1e-5), add_rms_norm_reference(x, delta, w, 1e-5)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype and g.shape == e.shape
            torch.testing.assert_close(g, e, **tol)
        cases += 1
    return cases


def check_decoder_pieces(device, gen) -> int:
    """Each layer's attention inputs and post-attention part: the decoder with the kernels vs without (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shapes = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    cases = 0
    for model in (LlamaForCausalLM(LlamaConfig(**shapes)), Qwen2ForCausalLM(Qwen2Config(**shapes))):
        model = model.to(device).eval()
        assert fuse_rms_norms(model) == 2 * 2 + 1
        plain, fused = LlamaDecoder(model), LlamaDecoder(model, fused_kernels=True)
        assert len(fused.fused_norms) == 2 * 2 + 1 and not plain.fused_norms
        with torch.no_grad():
            ids, positions = torch.randint(0, 64, (6,), generator=gen).to(device), torch.arange(3, 9, device=device)
            hidden, cos, sin = plain.embed(ids, positions)
            attended = torch.randn(6, 64, generator=gen).to(device)
            pending = None  # layer 0 has no MLP output to add; layer 1 adds the one layer 0 left
            for i in range(2):
                added, q, k, v = plain.attention_inputs(i, hidden, cos, sin, pending)
                for a, b in zip((added, q, k, v), fused.attention_inputs(i, hidden, cos, sin, pending)):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
                slots = torch.tensor([9, 2, 4, 0, 7, 1], device=device)
                meta = SimpleNamespace(kv_caches=[torch.zeros(2, 10, 2, 16, device=device)] * 2, slot_mapping=slots)
                stored_added, stored_q = fused.stored_attention_inputs(i, hidden, cos, sin, meta, pending)
                torch.testing.assert_close(stored_added, added, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(stored_q, q, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(meta.kv_caches[i][0][slots], k, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(meta.kv_caches[i][1][slots], v, rtol=0, atol=0)
                expected = plain.after_attention(i, added, attended)
                for a, b in zip(expected, fused.after_attention(i, added, attended)):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
                hidden, pending = expected
                cases += 1
            torch.testing.assert_close(fused.final_norm(hidden, pending), plain.final_norm(hidden, pending),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(plain.final_norm(hidden, pending), model.model.norm(hidden + pending),
                                       rtol=1e-5, atol=1e-5)
    return cases


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for dtype in [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]:
        cases += check_kernels(device, dtype, gen)
    cases += check_decoder_pieces(device, gen)
    print(f"fused pointwise ok on {device}: {cases} cases")


if __name__ == "__main__":
    sys.exit(main())
