"""LoRA from PEFT folders: PEFT itself builds and saves each adapter; our parse, merge and mixed-batch serving
must match PEFT's own forward, and every refusal names its reason."""

import json

import pytest
import torch
from peft import LoraConfig

from adapters.format import AdapterExpectation, AdapterValidationError, load_adapter_dir
from adapters.layer import BASE_SLOT, SlotIndex, attach_adapters
from adapters.merge import merge_adapter
from adapters.ops import lora_gathered, lora_reference, lora_torch
from cache.basis_cache import BasisCache
from server.model_loader import load_model
from tests.helpers import build_tiny_model, make_adapter, save_peft_adapter

LORA_KINDS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
                     alpha_pattern={r"model\.layers\.0\.self_attn\.o_proj": 3}),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.1\.(self_attn\.(k|v)_proj|mlp\.down_proj)"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model_dir = build_tiny_model(root / "m", "llama", seed=5)
    from server.config import ModelConfig

    cfg = ModelConfig(model=str(model_dir), rank_max=8, cache_dir=root / "cache", device="cpu")
    basis = BasisCache(cfg.basis_dir).load_or_compute(load_model(cfg).model, cfg.target_modules, 8, progress=False)
    return root, cfg, basis


def expect_for(basis, max_lora_rank=8):
    return AdapterExpectation.from_basis(basis, max_lora_rank)


@pytest.mark.parametrize("kind", sorted(LORA_KINDS))
def test_peft_lora_served_mixed_with_pica_and_base_matches_peft(world, kind, tmp_path):
    root, cfg, basis = world
    peft_model, folder = save_peft_adapter(cfg.model, tmp_path / kind, LoraConfig(**LORA_KINDS[kind]), seed=1)
    lora = load_adapter_dir(folder, expect_for(basis))
    pica = make_adapter(tmp_path, basis, r=5, seed=3)
    assert lora.config.method == "lora"

    adapted = attach_adapters(load_model(cfg).model, basis, num_slots=3, max_rank=8, max_layer_rank=8)
    adapted.slot_stacks.write(2, lora.slot_tensors())
    adapted.slot_stacks.write(0, pica.slot_tensors())
    rows = [BASE_SLOT, 2, 0, 2]  # base, LoRA, PiCa, LoRA again
    ids = torch.randint(0, 250, (len(rows), 9), generator=torch.Generator().manual_seed(7))
    adapted.slot_index.set([s for s in rows for _ in range(ids.shape[1])])
    with torch.no_grad():
        mixed = adapted.model(input_ids=ids).logits
        expected_lora = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            expected_base = peft_model(input_ids=ids).logits
        expected_pica = merge_adapter(load_model(cfg).model, basis, pica)(input_ids=ids).logits
        merged_lora = merge_adapter(load_model(cfg).model, basis, lora)(input_ids=ids).logits

    for row, slot in enumerate(rows):
        expected = {BASE_SLOT: expected_base, 2: expected_lora, 0: expected_pica}[slot]
        torch.testing.assert_close(mixed[row], expected[row], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_lora, expected_lora, atol=1e-4, rtol=1e-4)  # pica-serve merge
    assert (expected_lora[1] - expected_base[1]).abs().max() > 1e-2  # the LoRA changes the output


def test_pattern_ranks_and_scalings_follow_peft(world, tmp_path):
    _, cfg, basis = world
    peft_model, folder = save_peft_adapter(cfg.model, tmp_path / "p", LoraConfig(**LORA_KINDS["patterns"]))
    config = load_adapter_dir(folder, expect_for(basis)).config
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            layer = name.removeprefix("base_model.model.")
            assert config.layer_ranks[layer] == module.r["default"], layer
            assert config.layer_scaling[layer] == pytest.approx(module.scaling["default"]), layer
    assert set(config.layer_ranks.values()) == {2, 4, 6}
    assert config.r == 6 and set(config.target_modules) == {"q_proj", "o_proj", "up_proj"}


def test_converted_pissa_is_served_as_plain_lora(world, tmp_path):
    """PEFT's own conversion (path_initial_model_for_weight_conversion) gives a rank-2r LoRA delta on W0."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    _, cfg, basis = world
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights="pissa", target_modules=["q_proj", "down_proj"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(cfg.model), config)
    peft_model.save_pretrained(tmp_path / "init")
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.3)
    with pytest.raises(AdapterValidationError, match="path_initial_model_for_weight_conversion"):
        peft_model.save_pretrained(tmp_path / "raw")
        load_adapter_dir(tmp_path / "raw", expect_for(basis))
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lora = load_adapter_dir(tmp_path / "converted", expect_for(basis))
    assert lora.config.r == 4
    oracle = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model), tmp_path / "converted").eval()
    ids = torch.randint(0, 250, (1, 8))
    with torch.no_grad():
        merged = merge_adapter(load_model(cfg).model, basis, lora)(input_ids=ids).logits
        torch.testing.assert_close(merged, oracle(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged, peft_model(input_ids=ids).logits, atol=1e-3, rtol=1e-3)


def rewrite_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"init_lora_weights": "pissa_niter_4"}, "save_pretrained(out_dir, path_initial_model_for_weight_conversion="),
    ({"init_lora_weights": "olora"}, "rewrites the base weights"),
    ({"init_lora_weights": "corda"}, "rewrites the base weights"),
    ({"init_lora_weights": "lora_ga"}, "rewrites the base weights"),
    ({"use_dora": True}, "DoRA rescales each column"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save (fully trained copies of modules) is not served"),
    ({"bias": "lora_only"}, "bias='lora_only' (trained biases of the base layers) is not served"),
    ({"lora_bias": True}, "lora_bias (a trained bias on lora_B) is not served"),
    ({"peft_type": "LOHA"}, "PEFT adapter type 'LOHA' is not served; this server serves ['LORA', 'PSOFT'] from PEFT folders, and ['pica'] in its own format"),
    ({"r": 0}, "r must be a positive integer"),
    ({"peft_type": "CERSA"}, "CERSA keeps only the top singular components"),
    ({"method": "cersa"}, "its model is not this base model plus a delta"),
    ({"method": "lora"}, "method 'lora' is read from PEFT folders: upload the folder PEFT's save_pretrained wrote"),
])
def test_refusals_name_their_reason(world, tmp_path, changes, message):
    _, cfg, basis = world
    _, folder = save_peft_adapter(cfg.model, tmp_path / "a", LoraConfig(**LORA_KINDS["plain"]))
    with pytest.raises(AdapterValidationError) as err:
        load_adapter_dir(rewrite_config(folder, **changes), expect_for(basis))
    assert message in str(err.value)


def test_dora_as_saved_by_peft_is_refused(world, tmp_path):
    _, cfg, basis = world
    _, folder = save_peft_adapter(cfg.model, tmp_path / "d", LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(AdapterValidationError, match="DoRA rescales each column"):
        load_adapter_dir(folder, expect_for(basis))


@pytest.mark.parametrize("targets, message", [
    (["embed_tokens"], "LoRA on embeddings is not served"),
    (["lm_head"], "LoRA on lm_head is not served"),
])
def test_embedding_and_lm_head_lora_are_refused(world, tmp_path, targets, message):
    _, cfg, basis = world
    _, folder = save_peft_adapter(cfg.model, tmp_path / "e", LoraConfig(r=2, target_modules=targets))
    with pytest.raises(AdapterValidationError, match=message):
        load_adapter_dir(folder, expect_for(basis))


def test_rank_above_the_servers_lora_stacks_is_refused(world, tmp_path):
    _, cfg, basis = world
    _, folder = save_peft_adapter(cfg.model, tmp_path / "big", LoraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(AdapterValidationError, match="LoRA rank 8 exceeds this server's --max-lora-rank 4"):
        load_adapter_dir(folder, expect_for(basis, 4))
    with pytest.raises(AdapterValidationError, match="start it with --max-lora-rank 8"):
        load_adapter_dir(folder, expect_for(basis, 0))


def test_lora_ops_match_reference_on_random_slot_mappings():
    gen = torch.Generator().manual_seed(0)
    num_slots, rank, d_in, d_out = 4, 5, 24, 16
    a_stack = torch.randn(num_slots, rank, d_in, generator=gen)
    b_stack = torch.randn(num_slots, d_out, rank, generator=gen)
    ranks = [5, 0, 3, 5]  # slot 1 holds no LoRA (a PiCa adapter's slot): zeros
    for s, r in enumerate(ranks):
        a_stack[s, r:] = 0
        b_stack[s, :, r:] = 0
    slot_index = SlotIndex(64, "cpu")
    for trial in range(5):
        slots = torch.randint(-1, num_slots, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
        slot_index.set(slots)
        x = torch.randn(len(slots), d_in, generator=gen)
        y = torch.randn(len(slots), d_out, generator=gen)
        expected = lora_reference(x, y, a_stack, b_stack, torch.tensor(slots))
        for op in ("torch", "gathered"):
            out = y.clone()
            wide = torch.zeros(len(slots), d_out + 3)
            wide[:, 1 : 1 + d_out] = out
            view = wide[:, 1 : 1 + d_out]  # a strided view, as the shared GEMM's member columns are
            if op == "torch":
                lora_torch(x, view, a_stack, b_stack, ranks, slot_index)
            else:
                lora_gathered(x, view, a_stack, b_stack, slot_index.token_slots)
            torch.testing.assert_close(view, expected, atol=1e-4, rtol=1e-4)
        lora_rows = [t for t, s in enumerate(slots) if s in (0, 2, 3)]
        if lora_rows:
            assert (expected[lora_rows] - y[lora_rows]).abs().max() > 1e-3
        base_rows = [t for t, s in enumerate(slots) if s in (-1, 1)]
        torch.testing.assert_close(expected[base_rows], y[base_rows])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_lora_ops_on_cuda_match_reference(dtype, tol):
    from adapters.ops import lora

    gen = torch.Generator().manual_seed(1)
    num_slots, rank, d_in, d_out = 6, 16, 256, 384
    a_stack = (torch.randn(num_slots, rank, d_in, generator=gen) * 0.1).to(dtype)
    b_stack = (torch.randn(num_slots, d_out, rank, generator=gen) * 0.1).to(dtype)
    ranks = [16, 0, 8, 16, 4, 16]
    for s, r in enumerate(ranks):
        a_stack[s, r:] = 0
        b_stack[s, :, r:] = 0
    slot_index = SlotIndex(1024, "cuda")
    device_ranks = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    for num_tokens in (1, 7, 64, 600):  # decode sizes (per-token or tile kernels) and a prefill-sized step (tiles)
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).tolist()
        slot_index.set(slots)
        x = torch.randn(num_tokens, d_in, generator=gen).to(dtype)
        y = torch.randn(num_tokens, d_out, generator=gen).to(dtype)
        expected = lora_reference(x, y, a_stack, b_stack, torch.tensor(slots))
        out = y.cuda()
        lora(x.cuda(), out, a_stack.cuda(), b_stack.cuda(), ranks, device_ranks, slot_index)
        torch.testing.assert_close(out.cpu().float(), expected.float(), atol=tol, rtol=tol)
