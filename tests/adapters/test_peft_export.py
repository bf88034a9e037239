"""`pica-serve export --format peft-lora`: PEFT itself serves the exported folder as our merged model computes it."""

import pytest
import torch

from adapters.format import AdapterExpectation, load_adapter_dir
from adapters.merge import merge_adapter
from cache.basis_cache import BasisCache
from server.cli import main
from server.model_loader import load_model
from tests.helpers import build_tiny_model, write_random_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("arch,signs", [("llama", False), ("qwen2", True)])
def test_exported_lora_equals_the_pica_adapter_under_peft(tmp_path, model_config_for, arch, signs):
    cfg = model_config_for(build_tiny_model(tmp_path / "m", arch), rank_max=8)
    basis = BasisCache(cfg.basis_dir).load_or_compute(load_model(cfg).model, cfg.target_modules, 8, progress=False)
    folder = write_random_adapter(tmp_path / "pica", basis, r=6, groups=["q_proj", "v_proj", "down_proj"], signs=signs)
    assert main(["export", "--model", cfg.model, "--adapter", str(folder), "--out", str(tmp_path / "lora"),
                 "--device", "cpu", "--rank-max", "8", "--cache-dir", str(cfg.cache_dir)]) == 0
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    adapter = load_adapter_dir(folder, AdapterExpectation.from_basis(basis))
    merged = merge_adapter(load_model(cfg).model, basis, adapter)
    lora = peft.PeftModel.from_pretrained(load_model(cfg).model, str(tmp_path / "lora")).eval()
    with torch.no_grad():
        expected, got = merged(input_ids=ids).logits, lora(input_ids=ids).logits
        base = load_model(cfg).model(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output: the comparison can fail
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
