"""Fused RMSNorm kernel vs its reference and vs transformers' own norms (run by test_rms_norm.py).

Runs on CUDA when there is a GPU, else in Triton's interpreter (TRITON_INTERPRET=1 set by the caller).
"""

import sys
from pathlib import Path

import torch
from torch import nn

from adapters.ops import rms_norm_reference
from server.engine.rms_norm import FusedRMSNorm, feed_adapted_layers, fuse_rms_norms, restore_rms_norms, rms_norm


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
    check_norms_feeding_adapted_layers(device)
    print(f"rms norm ok on {device}")


def check_norms_feeding_adapted_layers(device):
    """With adapters active, the norms in front of q/k/v and gate/up run inside their shrink: the logits
    match the model with its own norms (where there is no CUDA, the shrink is the torch one)."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters.layer import attach_adapters
    from cache.basis_cache import BasisCache
    from server.config import DEFAULT_TARGET_MODULES

    gen = torch.Generator().manual_seed(1)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(device).eval()
    with tempfile.TemporaryDirectory() as basis_dir:
        basis = BasisCache(Path(basis_dir)).load_or_compute(model, DEFAULT_TARGET_MODULES, 16, progress=False)
    adapted = attach_adapters(model, basis, num_slots=2, max_rank=16)
    assert fuse_rms_norms(model) == 2 * 2 + 1
    assert feed_adapted_layers(model) == 2 * 2  # input and post-attention norms; the final norm feeds lm_head
    assert model.model.layers[0].input_layernorm.feeds is model.model.layers[0].self_attn.q_proj.shared_input
    assert model.model.norm.feeds is None
    for slot in range(2):
        adapted.slot_stacks.write(slot, {g: torch.randn(16, info.in_features, generator=gen).to(device) * 0.3
                                         for g, info in basis.groups.items()})
    ids = torch.randint(0, 64, (2, 6), generator=gen).to(device)
    adapted.slot_index.set([0, -1, 1, 1, 0, 0] * 2)
    with torch.no_grad():
        fed = model(input_ids=ids).logits
        restore_rms_norms(model)
        expected = model(input_ids=ids).logits
        adapted.slot_index.set([-1] * 12)
        base = model(input_ids=ids).logits
    assert (fed - base).abs().max() > 1e-2  # the adapters change the output, so the comparison can fail
    torch.testing.assert_close(fed, expected, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    sys.exit(main())
