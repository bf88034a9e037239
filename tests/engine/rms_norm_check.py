"""Fused RMSNorm kernel vs its reference and vs transformers' own norms (run by test_rms_norm.py).

Runs on CUDA when there is a GPU, else in Triton's interpreter (TRITON_INTERPRET=1 set by the caller).
"""

import sys

import torch
from torch import nn

from server.engine.rms_norm import FusedRMSNorm, fuse_rms_norms, restore_rms_norms, rms_norm, rms_norm_reference


class OnePlusWeightNorm(nn.Module):
    """Gemma's formula (scales by 1 + weight): must not be swapped."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.1)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for shape in ((1, 64), (7, 100), (2, 5, 4096)):
            x = (torch.randn(*shape, generator=gen) * 3).to(device, dtype)
            w = torch.randn(shape[-1], generator=gen).to(device, dtype)
            got, ref = rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding step where the sums differ
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(device).eval()
    model.model.layers[1].post_attention_layernorm = OnePlusWeightNorm(32).to(device)
    ids = torch.randint(0, 64, (2, 6), generator=gen).to(device)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert fuse_rms_norms(model) == 2 * 2  # both norms of layer 0, layer 1's input norm, the final norm
        assert isinstance(model.model.norm, FusedRMSNorm)
        assert isinstance(model.model.layers[1].post_attention_layernorm, OnePlusWeightNorm)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        restore_rms_norms(model)
        assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    print(f"rms norm ok on {device}")


if __name__ == "__main__":
    sys.exit(main())
