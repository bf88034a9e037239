"""PSOFT from PEFT folders: PEFT builds and saves each adapter; our merge and mixed-batch serving (beside LoRA,
PiCa and base rows) must match PEFT's own forward, and every refusal names its reason."""

import json

import pytest
import torch
from peft import LoraConfig, PsoftConfig

from adapters.format import AdapterExpectation, AdapterValidationError, load_adapter_dir
from adapters.layer import BASE_SLOT, attach_adapters
from adapters.merge import merge_adapter
from cache.svd_factors import svd_factors_of
from server.model_loader import load_model
from tests.adapters.test_lora import world  # noqa: F401 (the module's tiny model and basis)
from tests.helpers import make_adapter, save_peft_adapter

PSOFT_KINDS = {
    "cayley": dict(r=4, psoft_alpha=8, target_modules=["q_proj", "down_proj"]),
    "neumann": dict(r=6, psoft_alpha=6, use_cayley_neumann=True, num_cayley_neumann_terms=6,
                    target_modules=["k_proj", "up_proj"]),
    "neumann-eps": dict(r=3, use_cayley_neumann=True, num_cayley_neumann_terms=4, cayley_neumann_eps=0.5,
                        target_modules=["v_proj"]),
    "plain-core": dict(r=4, psoft_orth=False, psoft_mag_a=False, target_modules=["o_proj", "gate_proj"]),
}


def expect_for(cfg, basis, max_psoft_rank=8, max_lora_rank=8):
    return AdapterExpectation.from_basis(basis, max_lora_rank, svd_factors_of(load_model(cfg).model, basis),
                                         max_psoft_rank)


@pytest.mark.parametrize("kind", sorted(PSOFT_KINDS))
def test_peft_psoft_served_mixed_with_lora_pica_and_base_matches_peft(world, kind, tmp_path):  # noqa: F811
    _, cfg, basis = world
    expect = expect_for(cfg, basis)
    psoft_model, folder = save_peft_adapter(cfg.model, tmp_path / kind, PsoftConfig(**PSOFT_KINDS[kind]), seed=4)
    psoft = load_adapter_dir(folder, expect)
    lora_model, lora_folder = save_peft_adapter(cfg.model, tmp_path / "lora", LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"]), seed=5)
    lora = load_adapter_dir(lora_folder, expect)
    pica = make_adapter(tmp_path, basis, r=5, seed=6)
    assert psoft.config.method == "psoft" and psoft.config.r == PSOFT_KINDS[kind]["r"]

    adapted = attach_adapters(load_model(cfg).model, basis, num_slots=4, max_rank=8, max_layer_rank=8,
                              max_core_rank=8)
    for slot, adapter in ((3, psoft), (1, lora), (0, pica)):
        adapted.slot_stacks.write(slot, adapter.slot_tensors())
    rows = [3, BASE_SLOT, 1, 0, 3]
    ids = torch.randint(0, 250, (len(rows), 9), generator=torch.Generator().manual_seed(8))
    adapted.slot_index.set([s for s in rows for _ in range(ids.shape[1])])
    with torch.no_grad():
        mixed = adapted.model(input_ids=ids).logits
        expected = {3: psoft_model(input_ids=ids).logits, 1: lora_model(input_ids=ids).logits,
                    0: merge_adapter(load_model(cfg).model, basis, pica)(input_ids=ids).logits}
        with psoft_model.disable_adapter():
            expected[BASE_SLOT] = psoft_model(input_ids=ids).logits
        merged = merge_adapter(load_model(cfg).model, basis, psoft)(input_ids=ids).logits
    for row, slot in enumerate(rows):
        torch.testing.assert_close(mixed[row], expected[slot][row], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, expected[3], atol=1e-4, rtol=1e-4)  # pica-serve merge
    assert (expected[3][0] - expected[BASE_SLOT][0]).abs().max() > 1e-2  # the PSOFT core changes the output


@pytest.mark.parametrize("changes, message", [
    ({"ab_svd_init": "pissa_init"}, "only 'psoft_init' (A = Vh_r, B = U_r S_r) is served"),
    ({"psoft_svd": "lowrank"}, "psoft_svd='lowrank' (a randomized SVD) is not served"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save (fully trained copies of modules) is not served"),
])
def test_psoft_refusals_name_their_reason(world, tmp_path, changes, message):  # noqa: F811
    _, cfg, basis = world
    _, folder = save_peft_adapter(cfg.model, tmp_path / "p", PsoftConfig(**PSOFT_KINDS["cayley"]))
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(AdapterValidationError) as err:
        load_adapter_dir(folder, expect_for(cfg, basis))
    assert message in str(err.value)


def test_psoft_rank_above_the_stacks_or_without_svd_is_refused(world, tmp_path):  # noqa: F811
    _, cfg, basis = world
    _, folder = save_peft_adapter(cfg.model, tmp_path / "p", PsoftConfig(**PSOFT_KINDS["neumann"]))
    with pytest.raises(AdapterValidationError, match="PSOFT rank 6 exceeds this server's --max-psoft-rank 4"):
        load_adapter_dir(folder, expect_for(cfg, basis, 4))
    with pytest.raises(AdapterValidationError, match="PSOFT needs both sides of the base weights' SVD"):
        load_adapter_dir(folder, AdapterExpectation.from_basis(basis, 8))


def tied_weight(out_features, in_features, tie, seed):
    """A random weight whose singular values `tie` and tie + 1 (0-based) are equal: there any rotation of the two
    right singular vectors is as good, so two SVDs may differ by one."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, in_features, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=gen, dtype=torch.float64))
    s = torch.linspace(3, 0.5, in_features, dtype=torch.float64)
    s[tie + 1] = s[tie]
    return (u * s) @ v.T


@pytest.mark.parametrize("r, width", [(3, 3), (3, 6), (2, 6), (6, 6)])
def test_psoft_served_in_the_basis_equals_the_dense_delta(r, width):
    """The served form E K' z with E = W0 P^T, K' = Q^T K Q, z = P x (P the canonical basis, whose signs differ from
    PEFT's SVD, and which is rotated against it inside a tied pair) equals PEFT's delta B K A on random weights,
    beside a PiCa slot, a base token and an empty slot in one step of the layer."""
    from adapters.layer import SharedGemm, SlotIndex, SlotStacks, frozen_expand
    from adapters.methods.psoft import basis_alignment
    from cache.basis import principal_basis

    out_features, in_features, rank_max = 24, 20, 8
    w0 = tied_weight(out_features, in_features, tie=1, seed=r + width)  # values 1 and 2 tied: inside r = 3 and 6
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data.copy_(w0)
    u, s, vh = torch.linalg.svd(w0.float(), full_matrices=False)  # PEFT's way
    gen = torch.Generator().manual_seed(r)
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])[:r]  # another valid SVD: other signs, ...
    a, b = flip[:, None] * vh[:r], (u[:, :r] * s[:r]) * flip
    turn = torch.tensor([[0.6, -0.8], [0.8, 0.6]])  # ... and another pair of vectors inside the tie
    if r >= 3:
        a[1:3], b[:, 1:3] = turn @ a[1:3], b[:, 1:3] @ turn.T
    k = torch.randn(r, r, generator=gen)
    p = principal_basis(w0, rank_max)
    q, residual = basis_alignment(a, p[:width])
    assert residual < 1e-5
    assert (q[:, :r].diagonal() < 0).any(), "the test must cover a basis whose signs differ from the SVD's"

    stacks = SlotStacks({"g": (out_features, rank_max, 1)}, 3, torch.float32, "cpu", max_core_rank=width)
    stacks.write(1, {"core.g": (q.T @ k @ q)[None]})
    m = torch.randn(out_features, 5, generator=gen)
    stacks.write(0, {"g": m})  # a PiCa slot beside it
    index = SlotIndex(16, "cpu")
    cores = [(*stacks.core_of("g"), frozen_expand(linear, p, width))]
    shared = SharedGemm([linear], [p], stacks.served(("g",)), 0, index, None, cores)
    slots = [1, BASE_SLOT, 0, 1, 2]
    x = torch.randn(len(slots), in_features, generator=gen)
    index.set(slots)
    with torch.no_grad():
        y = shared.output_for(0, x)
    w0 = w0.float()
    expected = {1: x @ (w0 + b @ k @ a).T, BASE_SLOT: x @ w0.T, 0: x @ (w0 + m @ p[:5]).T, 2: x @ w0.T}
    for t, slot in enumerate(slots):  # fp32 rounding scales with the outputs' size (several products deep)
        scale = float(expected[slot][t].abs().max())
        torch.testing.assert_close(y[t], expected[slot][t], atol=1e-5 * max(scale, 1.0), rtol=1e-5)
    assert (expected[1] - expected[BASE_SLOT]).abs().max() > 1e-1


def test_psoft_basis_alignment_refuses_a_cut_inside_a_tie():
    """A rank cut between two tied singular values: PEFT's vector may be any rotation of the pair, so it leaves the
    span of the basis's first r rows (refused) but lies in a wider one (served)."""
    from adapters.methods.psoft import SUBSPACE_TOLERANCE, basis_alignment
    from cache.basis import principal_basis

    w0 = tied_weight(24, 20, tie=1, seed=0)
    p = principal_basis(w0, 8)
    a = p[:2].clone()
    a[1] = 0.6 * p[1] + 0.8 * p[2]  # a right singular vector of w0 as good as p[1] (the pair is tied)
    assert torch.allclose(torch.linalg.norm(w0.float() @ a[1]), torch.linalg.norm(w0.float() @ p[1]))
    assert basis_alignment(a, p[:2])[1] == pytest.approx(0.8, abs=1e-5)
    assert basis_alignment(a, p[:3])[1] < 1e-6 < SUBSPACE_TOLERANCE


def test_psoft_refusals_of_the_served_layout(world, tmp_path):  # noqa: F811
    """No core stacks, a rank above the basis's, and factors outside the basis (a random basis) are each refused
    with the reason; merge, which needs no basis, still takes the last."""
    import dataclasses

    from cache.basis_cache import BasisCache
    from cache.svd_factors import SvdFactorsInCore

    _, cfg, basis = world
    peft_model, folder = save_peft_adapter(cfg.model, tmp_path / "p", PsoftConfig(**PSOFT_KINDS["cayley"]), seed=2)
    with pytest.raises(AdapterValidationError, match=r"exceeds this server's --max-psoft-rank 0 .* start it with "
                                                     "--max-psoft-rank 4"):
        load_adapter_dir(folder, expect_for(cfg, basis, max_psoft_rank=0))
    narrow = dataclasses.replace(expect_for(cfg, basis), group_rank={g: 3 for g in basis.groups})
    with pytest.raises(AdapterValidationError, match="PSOFT rank 4 exceeds the basis rank 3 of group 'q_proj'"):
        load_adapter_dir(folder, narrow)

    model = load_model(cfg).model
    random = BasisCache(cfg.basis_dir).load_or_compute(model, cfg.target_modules, 8, kind="random:1", progress=False)
    with pytest.raises(AdapterValidationError) as err:
        load_adapter_dir(folder, AdapterExpectation.from_basis(random, 8, svd_factors_of(model, random), 8))
    assert "PSOFT's frozen factors leave this server's basis in 4 of 4 layers" in str(err.value)
    assert "accepted: 0.01" in str(err.value)
    front_end = AdapterExpectation.from_basis(random, 8, SvdFactorsInCore(), 8)  # no model: refused by the kind alone
    with pytest.raises(AdapterValidationError, match="this server's basis is 'random:1', not 'principal'"):
        load_adapter_dir(folder, front_end)
    load_adapter_dir(folder, AdapterExpectation.from_basis(basis, 8, SvdFactorsInCore(), 8))  # principal: accepted

    adapter = load_adapter_dir(folder, AdapterExpectation.from_basis(random, 8, svd_factors_of(model, random),
                                                                     slot_served=False))
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = merge_adapter(load_model(cfg).model, random, adapter)(input_ids=ids).logits
        torch.testing.assert_close(merged, peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_psoft_slot_memory_is_its_cores_only(world, tmp_path):  # noqa: F811
    """A PSOFT slot holds K' [num_layers, R, R] per adapted group and nothing in the LoRA stacks (a server with
    --max-lora-rank 0 serves it)."""
    _, cfg, basis = world
    _, folder = save_peft_adapter(cfg.model, tmp_path / "p", PsoftConfig(**PSOFT_KINDS["cayley"]), seed=2)
    tensors = load_adapter_dir(folder, expect_for(cfg, basis, max_psoft_rank=6, max_lora_rank=0)).slot_tensors()
    layers = {g: len(basis.groups[g].layers) for g in ("q_proj", "down_proj")}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {f"core.{g}": (n, 6, 6) for g, n in layers.items()}
