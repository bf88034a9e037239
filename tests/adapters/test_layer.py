"""Mixed-batch oracle: each row of a mixed batch equals the dense merged model for its adapter."""

import numpy as np
import pytest
import torch

from adapters.layer import BASE_SLOT, SlotIndex, attach_adapters
from adapters.merge import merge_adapter
from cache.basis_cache import BasisCache
from server.model_loader import load_model
from tests.helpers import ARCHS, build_tiny_model, make_adapter


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_batch_matches_dense_merged_models(tmp_path, model_config_for, arch, seed):
    cfg = model_config_for(build_tiny_model(tmp_path / "m", arch, seed), rank_max=16)
    loaded = load_model(cfg)
    basis = BasisCache(cfg.basis_dir).load_or_compute(loaded.model, cfg.target_modules, 16, progress=False)
    adapters = [
        make_adapter(tmp_path, basis, r=16, seed=seed * 10 + 1),
        make_adapter(tmp_path, basis, r=4, seed=seed * 10 + 2, groups=["q_proj", "v_proj", "down_proj"]),
        make_adapter(tmp_path, basis, r=9, seed=seed * 10 + 3, signs=True),  # per-layer signs (imported form)
    ]
    adapted = attach_adapters(loaded.model, basis, num_slots=4, max_rank=16)
    slot_of = {0: 2, 1: 0, 2: 3}  # adapter index -> slot (not in order, one slot left empty)
    for i, a in enumerate(adapters):
        adapted.slot_stacks.write(slot_of[i], a.slot_tensors())

    row_adapters = [None, 0, 1, 2, 1, None]  # base, each adapter, a repeat
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (len(row_adapters), 11), generator=gen)
    seq = ids.shape[1]
    adapted.slot_index.set([BASE_SLOT if a is None else slot_of[a] for a in row_adapters for _ in range(seq)])
    with torch.no_grad():
        mixed = adapted.model(input_ids=ids).logits

    for row, a in enumerate(row_adapters):
        reference = load_model(cfg).model
        if a is not None:
            merge_adapter(reference, basis, adapters[a])
        with torch.no_grad():
            expected = reference(input_ids=ids[row : row + 1]).logits[0]
        torch.testing.assert_close(mixed[row], expected, atol=1e-4, rtol=1e-4)

    # the adapters really change the output (so the comparison above can fail)
    assert (mixed[1] - mixed[0]).abs().max() > 1e-2
    assert (mixed[3] - mixed[1]).abs().max() > 1e-2


def test_no_adapter_step_skips_adapter_math(tmp_path, model_config_for):
    cfg = model_config_for(build_tiny_model(tmp_path / "m"), rank_max=8)
    loaded = load_model(cfg)
    basis = BasisCache(cfg.basis_dir).load_or_compute(loaded.model, cfg.target_modules, 8, progress=False)
    ids = torch.randint(0, 250, (2, 5))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
    adapted = attach_adapters(loaded.model, basis, num_slots=2, max_rank=8)
    adapted.slot_stacks.write(0, make_adapter(tmp_path, basis, r=8).slot_tensors())
    adapted.slot_index.set([BASE_SLOT] * 10)
    assert not adapted.slot_index.any_adapter
    with torch.no_grad():
        assert torch.equal(adapted.model(input_ids=ids).logits, before)


def test_layers_reading_one_input_share_one_gemm_and_expand(tmp_path, model_config_for, monkeypatch):
    cfg = model_config_for(build_tiny_model(tmp_path / "m"), rank_max=8)
    loaded = load_model(cfg)
    basis = BasisCache(cfg.basis_dir).load_or_compute(loaded.model, cfg.target_modules, 8, progress=False)
    adapted = attach_adapters(loaded.model, basis, num_slots=2, max_rank=8)
    attn, mlp = loaded.model.model.layers[0].self_attn, loaded.model.model.layers[0].mlp
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared
    assert mlp.gate_proj.shared is mlp.up_proj.shared
    assert attn.o_proj.shared is not attn.q_proj.shared  # o_proj reads the attention output
    assert [layer.member for layer in (attn.q_proj, attn.k_proj, attn.v_proj)] == [0, 1, 2]
    # the base weights are views of the shared GEMM's rows, P's rows below them: nothing stored twice
    shared = attn.q_proj.shared
    assert attn.k_proj.base.weight.data_ptr() == shared.weight[shared.bounds[1]].data_ptr()
    torch.testing.assert_close(shared.weight[shared.num_out : shared.num_out + 8],
                               basis.p["model.layers.0.self_attn.q_proj"].to(shared.weight.dtype))

    import adapters.layer as layer_module

    calls = []
    real = layer_module.expand
    monkeypatch.setattr(layer_module, "expand", lambda *a: calls.append(a[3]) or real(*a))
    adapted.slot_stacks.write(0, make_adapter(tmp_path, basis, r=8).slot_tensors())
    adapted.slot_index.set([0] * 5)
    with torch.no_grad():
        adapted.model(input_ids=torch.randint(0, 250, (1, 5)))
    assert len(calls) == 4 * len(loaded.model.model.layers)  # q/k/v, o, gate/up, down: one expand each

    x = torch.randn(5, 64)
    first = shared.output_for(0, x).clone()
    adapted.slot_index.set([BASE_SLOT] + [0] * 4)  # a new step: the same x object must not reuse old outputs
    second = shared.output_for(0, x)
    with torch.no_grad():
        base = attn.q_proj.base(x)
    assert not torch.allclose(first[0], base[0]) and torch.equal(second[0], base[0])


def test_slot_index_picks_the_expand_kernel_and_token_ranks():
    """Decode steps over many slots, or few tokens a slot, run a program per token; the rest (and prefill) tiles."""
    slot_ranks = np.array([8 * (s + 1) for s in range(64)], dtype=np.int32)
    index = SlotIndex(512, "cpu", slot_ranks)
    cases = [([s // 4 for s in range(64)], False),  # 16 slots of 4 tokens: the tile kernel's boundary
             ([s // 3 for s in range(48)], True),  # 16 slots of 3
             ([s % 17 for s in range(68)], True),  # 17 slots
             (list(range(64)), True), ([0], True), ([-1] * 60 + [2] * 4, False), ([s % 64 for s in range(300)], False)]
    for slots, per_token in cases:
        index.set(slots)
        assert index.per_token == per_token, slots[:8]
    index.set([-1, 3, 0])
    assert index.token_ranks.tolist() == [0, 32, 8]
    index.set([-1, 3], per_token=False)  # forced, as CUDA graphs capture each kind
    assert not index.per_token and SlotIndex(4, "cpu").max_tiles(64, 64) == 4 + 17


def test_decode_graphs_replay_the_tile_variant_of_the_fewest_tiles_that_holds_the_step():
    """DecodeGraphs.graph_for on a stand-in (the graphs need CUDA): the tile kernel's variants by tile count, the
    one that serves every step past the largest cap, and one graph for the other kinds; SlotIndex.max_tiles
    (the captured grid) is at most the cap set while capturing."""
    from types import SimpleNamespace

    from server.engine.cuda_graphs import DecodeGraphs

    index = SlotIndex(64, "cpu", np.full(64, 32))
    runner = SimpleNamespace(adapted=SimpleNamespace(slot_index=index))
    caps = [4, 8, 12, 16]
    graphs = {(64, "tiles", cap): f"tiles<={cap}" for cap in caps + [None]}
    graphs.update({(64, "base", None): "base", (64, "per_token", None): "per token"})
    stand_in = SimpleNamespace(runner=runner, _caps={64: caps}, _graphs=graphs,
                               kind=lambda: DecodeGraphs.kind(stand_in))
    cases = [([0] * 64, "tiles<=4"), ([s // 8 for s in range(64)], "tiles<=8"),  # 8 slots of 8 tokens
             ([s // 5 for s in range(64)], "tiles<=16"),  # 13 slots: 13 tiles
             ([s // 4 for s in range(64)], "tiles<=16"),
             ([-1] + [s % 16 for s in range(63)], "tiles<=None"),  # 16 slots and the base token's tile: 17
             ([-1] * 64, "base"), (list(range(64)), "per token")]
    for slots, expected in cases:
        index.set(slots, per_token=expected == "per token")
        assert DecodeGraphs.graph_for(stand_in, 64) == expected, (index.num_tiles_host, expected)
    index.tile_cap = 8
    assert index.max_tiles(64, 64) == 8 and index.max_tiles(1, 64) == 1  # never more tiles than tokens
    index.tile_cap = None
    # 4 full tiles and one per slot of the 16 the tile kind serves, and the base tokens'; every slot: one a token
    assert index.max_tiles(64, 64) == 21 and index.max_tiles(64, 64, every_slot=True) == 64
    assert index.max_tiles(200, 64, every_slot=True) == 13 + 65
