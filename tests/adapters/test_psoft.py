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
