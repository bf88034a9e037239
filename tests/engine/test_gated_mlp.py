"""GatedMLP: with adapters active, silu·mul runs inside down_proj's shrink and the logits do not change
(here the shrink is the torch one; the kernel is checked in tests/adapters/shrink_kernel_check.py)."""

import pytest
import torch
from torch import nn

from adapters.layer import BASE_SLOT, AdaptedLinear, attach_adapters
from cache.basis_cache import BasisCache
from server.engine import gated_mlp
from server.engine.gated_mlp import GatedMLP, fuse_gated_mlps, restore_gated_mlps
from server.model_loader import load_model
from tests.helpers import ARCHS, build_tiny_model, make_adapter


@pytest.mark.parametrize("arch", ARCHS)
def test_silu_mul_inside_the_shrink_keeps_the_logits(tmp_path, model_config_for, arch):
    cfg = model_config_for(build_tiny_model(tmp_path / "m", arch, num_layers=3), rank_max=8)
    model = load_model(cfg).model
    basis = BasisCache(cfg.basis_dir).load_or_compute(model, cfg.target_modules, 8, progress=False)
    adapted = attach_adapters(model, basis, num_slots=2, max_rank=8)
    model.model.layers[2].mlp.act_fn = nn.GELU()  # another activation: this MLP keeps its own forward
    assert fuse_gated_mlps(model) == 2
    assert fuse_gated_mlps(model) == 0  # already wrapped
    assert not isinstance(model.model.layers[2].mlp, GatedMLP)
    for slot in range(2):
        adapted.slot_stacks.write(slot, make_adapter(tmp_path, basis, r=8, seed=slot).group_cores())
    fed = []

    def spy(input_from):
        def with_record(h, norm=None, up=None):
            fed.append(up is not None)
            return input_from(h, norm=norm, up=up)

        return with_record

    for layer in model.model.layers[:2]:
        shared = layer.mlp.mlp.down_proj.shared_input
        shared.input_from = spy(shared.input_from)
    ids = torch.randint(0, 250, (2, 5), generator=torch.Generator().manual_seed(0))
    adapted.slot_index.set([0, 1, BASE_SLOT, 1, 0] * 2)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        assert fed == [True, True]  # both wrapped MLPs took the fused path
        restore_gated_mlps(model)
        assert not any(isinstance(m, GatedMLP) for m in model.modules())
        expected = model(input_ids=ids).logits
        adapted.slot_index.set([BASE_SLOT] * 10)
        base = model(input_ids=ids).logits
        fuse_gated_mlps(model)
        adapted.detach()  # finds the adapted layers inside the wrappers too
        assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert (got - base).abs().max() > 1e-2  # the adapters change the output, so the comparison can fail
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_large_stack_ranks_keep_silu_mul_apart(tmp_path, model_config_for, monkeypatch):
    monkeypatch.setattr(gated_mlp, "GATE_INSIDE_MAX_RANK", 7)  # the tiny model's ranks stop at 64
    cfg = model_config_for(build_tiny_model(tmp_path / "m"), rank_max=8)
    model = load_model(cfg).model
    basis = BasisCache(cfg.basis_dir).load_or_compute(model, cfg.target_modules, 8, progress=False)
    attach_adapters(model, basis, num_slots=2, max_rank=8)
    assert fuse_gated_mlps(model) == 0
