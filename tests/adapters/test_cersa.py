"""CERSA folders: the merged model equals a torch reference that applies W = U_k C V_k per layer (llama and qwen2),
the core diag(S_k) reproduces the truncated-SVD model, and every refusal names its reason (and its layer)."""

import json
import re

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from transformers import AutoModelForCausalLM

from adapters.cersa_writer import cersa_factors, write_cersa_dir
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterExpectation, AdapterValidationError, parse_adapter
from adapters.merge import merge_adapter
from adapters.targets import find_target_linears
from cache.basis_cache import BasisCache
from server.config import DEFAULT_TARGET_MODULES, ModelConfig
from server.model_loader import load_model
from tests.helpers import ARCHS, build_tiny_model

THRESHOLD = 0.9
Q0, Q1, DOWN1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module", params=ARCHS)
def world(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(f"cersa-{request.param}")
    model_dir = build_tiny_model(root / "m", request.param, seed=3)
    cfg = ModelConfig(model=str(model_dir), rank_max=8, cache_dir=root / "cache", device="cpu")
    model = load_model(cfg).model
    basis = BasisCache(cfg.basis_dir).load_or_compute(model, cfg.target_modules, 8, progress=False)
    return root, model_dir, model, basis


def merge_expect(model, basis) -> AdapterExpectation:
    """What `pica-serve merge` checks a CERSA file against: the base weights."""
    weights = {layer: model.get_submodule(layer).weight for info in basis.groups.values() for layer in info.layers}
    return AdapterExpectation.from_basis(basis, base_weights=weights)


def read_folder(folder):
    return json.loads((folder / CONFIG_FILE).read_text()), load_safetensors_bytes((folder / WEIGHTS_FILE).read_bytes())


def reference_model(model_dir, weight_of):
    """The base model with each target weight replaced by weight_of(layer, W0) (float64 math, float32 weights)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer, linear in find_target_linears(model, DEFAULT_TARGET_MODULES).items():
            linear.weight.copy_(weight_of(layer, linear.weight.double()).float())
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))


def test_merged_model_equals_u_core_v_per_layer(world, tmp_path):
    root, model_dir, model, basis = world
    folder = write_cersa_dir(tmp_path / "cersa", model, DEFAULT_TARGET_MODULES, THRESHOLD, core_noise=0.3, seed=1)
    adapter = parse_adapter((folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes(),
                            merge_expect(model, basis))
    merged = merge_adapter(load_model(ModelConfig(model=str(model_dir), device="cpu")).model, basis, adapter)

    _, tensors = read_folder(folder)
    reference = reference_model(model_dir, lambda layer, w: tensors[f"U.{layer}"].double()
                                @ tensors[f"core.{layer}"].double() @ tensors[f"V.{layer}"].double())
    torch.testing.assert_close(logits(merged, IDS), logits(reference, IDS), atol=1e-5, rtol=1e-5)
    base = logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), IDS)
    assert (logits(merged, IDS) - base).abs().max() > 1e-2
    # the energy rule, spelled independently: first k whose cumulative squared singular values reach 0.9
    for layer, linear in find_target_linears(model, DEFAULT_TARGET_MODULES).items():
        s2 = torch.linalg.svdvals(linear.weight.double()).square()
        cumulative = torch.cumsum(s2, 0) / s2.sum()
        expected_k = int(torch.searchsorted(cumulative, torch.tensor(THRESHOLD, dtype=torch.float64))) + 1
        assert adapter.config.layer_ranks[layer] == expected_k
    assert any(k < min(model.get_submodule(layer).weight.shape) for layer, k in adapter.config.layer_ranks.items())


def test_core_diag_s_reproduces_the_truncated_svd_model(world, tmp_path):
    root, model_dir, model, basis = world
    folder = write_cersa_dir(tmp_path / "svd", model, DEFAULT_TARGET_MODULES, THRESHOLD, core_noise=0.0)
    adapter = parse_adapter((folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes(),
                            merge_expect(model, basis))
    merged = merge_adapter(load_model(ModelConfig(model=str(model_dir), device="cpu")).model, basis, adapter)

    def truncated(layer, w):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        k = adapter.config.layer_ranks[layer]
        return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]

    torch.testing.assert_close(logits(merged, IDS), logits(reference_model(model_dir, truncated), IDS),
                               atol=1e-5, rtol=1e-5)
    full = logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), IDS)
    assert (logits(merged, IDS) - full).abs().max() > 1e-3  # the dropped 10% of energy changes the model


def test_factors_are_signed_canonically_and_rebuild_the_truncation(world):
    _, _, model, _ = world
    w = model.get_submodule(DOWN1).weight.double()
    f = cersa_factors(w, THRESHOLD)
    k = f.s.numel()
    rows = torch.arange(k)
    assert bool((f.v[rows, f.v.abs().argmax(1)] > 0).all())
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(f.u @ torch.diag(f.s) @ f.v, u[:, :k] @ torch.diag(s[:k]) @ vh[:k])


def test_bfloat16_factors_load_and_merge_close(world, tmp_path):
    root, model_dir, model, basis = world
    folder = write_cersa_dir(tmp_path / "bf16", model, ("q_proj", "down_proj"), THRESHOLD, core_noise=0.2)
    config, tensors = read_folder(folder)
    tensors = {n: t.to(torch.bfloat16) for n, t in tensors.items()}
    adapter = parse_adapter(json.dumps(config).encode(), save_safetensors_bytes(tensors), merge_expect(model, basis))
    merged = merge_adapter(load_model(ModelConfig(model=str(model_dir), device="cpu")).model, basis, adapter)
    layer = Q1
    expected = tensors[f"U.{layer}"].double() @ tensors[f"core.{layer}"].double() @ tensors[f"V.{layer}"].double()
    torch.testing.assert_close(merged.get_submodule(layer).weight.double(), expected, atol=1e-5, rtol=1e-5)
    untouched = "model.layers.0.self_attn.k_proj"
    assert torch.equal(merged.get_submodule(untouched).weight, model.get_submodule(untouched).weight)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cersa-refusals")
    model_dir = build_tiny_model(root / "m", "llama", seed=4)
    cfg = ModelConfig(model=str(model_dir), rank_max=8, cache_dir=root / "cache", device="cpu")
    model = load_model(cfg).model
    basis = BasisCache(cfg.basis_dir).load_or_compute(model, cfg.target_modules, 8, progress=False)
    folder = write_cersa_dir(root / "cersa", model, ("q_proj", "down_proj"), THRESHOLD, core_noise=0.2)
    return folder, model, basis


def problems(llama_folder, config_changes=None, tensor_changes=None, drop=(), server=False) -> str:
    folder, model, basis = llama_folder
    config, tensors = read_folder(folder)
    config.update(config_changes or {})
    for key in drop:
        config.pop(key)
    tensors.update(tensor_changes or {})
    tensors = {n: t for n, t in tensors.items() if t is not None}
    expect = AdapterExpectation.from_basis(basis) if server else merge_expect(model, basis)
    with pytest.raises(AdapterValidationError) as err:
        parse_adapter(json.dumps(config).encode(), save_safetensors_bytes(tensors), expect)
    return str(err.value)


def test_the_valid_folder_loads(llama_folder):
    folder, model, basis = llama_folder
    adapter = parse_adapter((folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes(),
                            merge_expect(model, basis))
    assert adapter.config.target_modules == ("q_proj", "down_proj") and len(adapter.config.layer_ranks) == 4
    assert adapter.config.r == max(adapter.config.layer_ranks.values())


@pytest.mark.parametrize("changes", [{}, {"method": "CERSA"}, {"peft_type": "CERSA"}])
def test_a_server_refuses_cersa_with_the_merge_command(llama_folder, changes):
    text = problems(llama_folder, changes, drop=("method",) if "peft_type" in changes else (), server=True)
    assert "its model is not this base model plus a delta: it is a separate model" in text
    assert "`pica-serve merge --model BASE --adapter DIR --out OUT`" in text
    assert "`pica-serve serve --model OUT`" in text and len(text) < 300
    assert "unknown method" not in text


def test_unknown_methods_list_what_is_served_and_what_is_merged(llama_folder):
    text = problems(llama_folder, {"method": "cersa-x"}, server=True)
    assert "unknown method 'cersa-x'; this server knows ['lora', 'pica', 'psoft'] (and writes ['cersa'] out" in text


def k_of(llama_folder, layer):
    return json.loads((llama_folder[0] / CONFIG_FILE).read_text())["ranks"][layer]


@pytest.mark.parametrize("changes, drop, message", [
    ({"peft_type": "CERSA"}, ("method",), "peft_type 'CERSA' names no PEFT folder format: a cersa folder says "
                                          '"method": "cersa"'),
    ({"format_version": 2}, (), "CERSA format_version 2 is not read; this server reads format 1"),
    ({}, ("format_version",), "CERSA format_version None is not read"),
    ({"energy_threshold": 1.5}, (), "energy_threshold must be a number between 0 and 1"),
    ({"energy_threshold": True}, (), "energy_threshold must be a number between 0 and 1"),
    ({}, ("energy_threshold",), "energy_threshold must be a number between 0 and 1"),
    ({"target_modules": ["q_proj", "lm_head"]}, (), "target_modules ['lm_head'] are not target groups of this base"),
    ({"target_modules": ["q_proj", "q_proj"]}, (), "target_modules lists ['q_proj'] more than once"),
    ({"target_modules": "q_proj"}, (), "target_modules must be a non-empty list of strings"),
    ({"ranks": [3]}, (), "ranks must map every target layer's full module name to its k"),
    ({"target_modules": ["q_proj", "down_proj", "v_proj"]}, (), "ranks lacks target layers "
                                                                "['model.layers.0.self_attn.v_proj', "
                                                                "'model.layers.1.self_attn.v_proj']"),
    ({"target_modules": ["q_proj"]}, (), "ranks names ['model.layers.0.mlp.down_proj', "
                                         "'model.layers.1.mlp.down_proj'], which are not layers of the target groups"),
    ({}, ("basis_checksum",), "basis_checksum (the base model's fingerprint) is required"),
    ({"basis_checksum": "b" * 64}, (), "CERSA file was cut from the base model with checksum bbbbbbbbbbbbbbbb..."),
])
def test_config_refusals(llama_folder, changes, drop, message):
    assert message in problems(llama_folder, changes, drop=drop)


@pytest.mark.parametrize("k, message", [(0, "must be an integer in [1, 64]"), (65, "must be an integer in [1, 64]"),
                                        ("3", "must be an integer in [1, 64]")])
def test_rank_refusals_name_the_layer(llama_folder, k, message):
    config = json.loads((llama_folder[0] / CONFIG_FILE).read_text())
    text = problems(llama_folder, {"ranks": {**config["ranks"], Q0: k}})
    assert f"ranks[{Q0!r}] {message}" in text and "(the weight is [64, 64])" in text


def test_a_rank_off_the_energy_rule_is_refused_naming_the_layer(llama_folder):
    k = k_of(llama_folder, Q0)
    config = json.loads((llama_folder[0] / CONFIG_FILE).read_text())
    text = problems(llama_folder, {"ranks": {**config["ranks"], Q0: k - 3}})
    assert f"layer {Q0}: k={k - 3} keeps" in text
    allowed = re.search(r"energy_threshold 0\.9 gives k(?:=(\d+)| in \[(\d+), (\d+)\])", text).groups()
    low, high = (int(allowed[0]),) * 2 if allowed[0] else (int(allowed[1]), int(allowed[2]))
    assert low <= k <= high and high - low <= 1
    assert f"tensor U.{Q0} has shape [64, {k}], expected [64, {k - 3}]" in text  # the file's tensors disagree too


def test_another_threshold_than_the_files_is_refused_in_every_layer(llama_folder):
    text = problems(llama_folder, {"energy_threshold": 0.5})
    for layer in (Q0, Q1, "model.layers.0.mlp.down_proj", DOWN1):
        assert f"layer {layer}: k={k_of(llama_folder, layer)} keeps" in text
    assert "energy_threshold 0.5 gives k=" in text


def test_tensor_refusals(llama_folder):
    k = k_of(llama_folder, Q0)
    _, tensors = read_folder(llama_folder[0])
    cases = [
        ({f"core.{Q0}": None}, f"missing tensors ['core.{Q0}']"),
        ({f"core.{Q0}.extra": torch.zeros(2)}, f"unexpected tensors ['core.{Q0}.extra']"),
        ({f"core.{Q0}": torch.zeros(k, k + 1)}, f"tensor core.{Q0} has shape [{k}, {k + 1}], expected [{k}, {k}]"),
        ({f"V.{Q1}": torch.zeros(k_of(llama_folder, Q1), 65)}, f"tensor V.{Q1} has shape"),
        ({f"core.{Q0}": torch.full((k, k), float("nan"))}, f"tensor core.{Q0} has non-finite values"),
        ({f"U.{Q0}": torch.zeros(64, k, dtype=torch.int32)}, f"tensor U.{Q0} has dtype torch.int32"),
        ({f"U.{Q0}": tensors[f"U.{Q0}"] * 1.01}, f"tensor U.{Q0}: its columns must be orthonormal"),
        ({f"V.{DOWN1}": tensors[f"V.{DOWN1}"].flip(1)}, f"layer {DOWN1}: U and V do not span the weight's top-"),
    ]
    for change, message in cases:
        assert message in problems(llama_folder, tensor_changes=change), message


def test_orthonormal_factors_of_another_subspace_are_refused(llama_folder):
    """Rotating V_k out of the top subspace keeps it orthonormal; only the captured energy can tell."""
    k = k_of(llama_folder, Q0)
    q, _ = torch.linalg.qr(torch.randn(64, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    text = problems(llama_folder, tensor_changes={f"V.{Q0}": q.T.float().contiguous()})
    assert f"layer {Q0}: U and V do not span the weight's top-{k} singular subspaces" in text
    assert "orthonormal" not in text


def test_every_problem_is_reported_at_once(llama_folder):
    k = k_of(llama_folder, Q0)
    text = problems(llama_folder, {"basis_checksum": "c" * 64, "energy_threshold": 2},
                    tensor_changes={f"core.{Q0}": torch.zeros(k, 1)})
    assert "cut from the base model with checksum cccc" in text and "energy_threshold must be" in text


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_cli_merge_of_bfloat16_weights_checks_and_writes_u_core_v(tmp_path, device, capsys):
    """A model loaded in bf16 (a GPU server's default) is not the float32 weights the file was cut from: the energy
    rule and subspace checks must still pass, on the device the weights sit on, and the merge round only to bf16."""
    from safetensors.torch import load_file

    from server.cli import main

    model_dir = build_tiny_model(tmp_path / "m", "qwen2", seed=6)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    folder = write_cersa_dir(tmp_path / "c", base, DEFAULT_TARGET_MODULES, THRESHOLD, core_noise=0.2)
    out = tmp_path / "out"
    assert main(["merge", "--model", str(model_dir), "--device", device, "--dtype", "bfloat16", "--rank-max", "8",
                 "--cache-dir", str(tmp_path / "cache"), "--adapter", str(folder), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tensors = load_file(folder / WEIGHTS_FILE)
    for layer in find_target_linears(base, DEFAULT_TARGET_MODULES):
        expected = tensors[f"U.{layer}"].double() @ tensors[f"core.{layer}"].double() @ tensors[f"V.{layer}"].double()
        torch.testing.assert_close(merged.get_submodule(layer).weight.double(), expected, atol=1e-4, rtol=8e-3)
    untouched = "model.embed_tokens"
    torch.testing.assert_close(merged.get_submodule(untouched).weight, base.get_submodule(untouched).weight,
                               atol=0, rtol=8e-3)
