"""`pica-serve import`: adapters of the authors' reference code, served as that code computes them."""

import json
import os
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from adapters.format import AdapterExpectation, load_adapter_dir
from adapters.layer import attach_adapters
from cache.basis_cache import BasisCache
from server.cli import main
from server.model_loader import load_model
from tests.helpers import build_tiny_model

KEYWORDS = ("q_proj", "v_proj", "mlp.up_proj", "down_proj")  # the reference matches substrings of module paths
RANK = 6


class ReferenceLinear(nn.Module):
    """The reference's forward: x W^T + b + (x P^T) M^T."""

    def __init__(self, base: nn.Linear, p: torch.Tensor, m: torch.Tensor):
        super().__init__()
        self.base, self.p, self.m = base, p, m

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.p), self.m)


@pytest.fixture
def setup(tmp_path, model_config_for):
    model_dir = build_tiny_model(tmp_path / "m", "qwen2")
    cfg = model_config_for(model_dir, rank_max=8)
    model = load_model(cfg).model
    gen = torch.Generator().manual_seed(0)
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    m_ref = {}
    for kw in KEYWORDS:
        out_features = next(mod.out_features for name, mod in linears.items() if kw in name)
        m_ref[kw] = torch.randn(out_features, RANK, generator=gen) * 0.3
    p_svd = {name: torch.linalg.svd(mod.weight.detach().float(), full_matrices=False).Vh[:RANK]
             for name, mod in linears.items() if any(kw in name for kw in KEYWORDS)}
    return tmp_path, cfg, m_ref, p_svd


def write_reference(folder, m_ref):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pica_config.json").write_text(json.dumps({"target_modules": list(KEYWORDS), "rank": RANK,
                                                         "base_model_name_or_path": "tiny"}))
    torch.save(m_ref, folder / "pica_adapter.bin")
    return folder


def run_import(tmp_path, cfg, folder, *extra):
    return main(["import", "--model", cfg.model, "--adapter", str(folder), "--out", str(tmp_path / "ours"),
                 "--device", "cpu", "--rank-max", "8", "--cache-dir", str(cfg.cache_dir), "--svd-device", "cpu", *extra])


def reference_logits(cfg, m_ref, p_ref, ids):
    model = load_model(cfg).model
    for name, mod in list(model.named_modules()):
        kw = next((kw for kw in KEYWORDS if kw in name), None)
        if isinstance(mod, nn.Linear) and kw is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ReferenceLinear(mod, p_ref[name], m_ref[kw]))
    with torch.no_grad():
        return model(input_ids=ids).logits


def served_logits(cfg, adapter_dir, ids):
    model = load_model(cfg).model
    basis = BasisCache(cfg.basis_dir).load_or_compute(model, cfg.target_modules, 8, progress=False)
    adapter = load_adapter_dir(adapter_dir, AdapterExpectation.from_basis(basis))
    adapted = attach_adapters(model, basis, num_slots=1, max_rank=8)
    adapted.slot_stacks.write(0, adapter.slot_tensors())
    adapted.slot_index.set([0] * ids.numel())
    with torch.no_grad():
        return model(input_ids=ids).logits, adapter


def residuals(text):
    return [float(v) for v in re.findall(r"subspace residual ([0-9.e+-]+)", text)]


def test_import_recomputes_the_reference_basis_and_serves_its_function(setup, capsys):
    tmp_path, cfg, m_ref, p_svd = setup
    assert run_import(tmp_path, cfg, write_reference(tmp_path / "ref", m_ref)) == 0
    found = residuals(capsys.readouterr().out)
    assert len(found) == len(KEYWORDS) and max(found) < 1e-4  # float32 SVD rounding against our float64 basis
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(cfg, m_ref, p_svd, ids)
    got, adapter = served_logits(cfg, tmp_path / "ours", ids)
    assert adapter.config.target_modules == ("q_proj", "v_proj", "up_proj", "down_proj") and adapter.config.r == RANK
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    base = load_model(cfg).model(input_ids=ids).logits.detach()
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output: the comparison can fail


def test_import_with_the_trainers_own_basis_absorbs_its_signs(setup, capsys):
    tmp_path, cfg, m_ref, p_svd = setup
    gen = torch.Generator().manual_seed(2)
    flipped = {name: p * (torch.randint(0, 2, (RANK, 1), generator=gen) * 2.0 - 1) for name, p in p_svd.items()}
    save_file({name: p.contiguous() for name, p in flipped.items()}, str(tmp_path / "p_ref.safetensors"))
    folder = write_reference(tmp_path / "ref", m_ref)
    assert run_import(tmp_path, cfg, folder, "--reference-basis", str(tmp_path / "p_ref.safetensors")) == 0
    assert max(residuals(capsys.readouterr().out)) < 1e-4
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(3))
    got, adapter = served_logits(cfg, tmp_path / "ours", ids)
    assert any(name.startswith("signs.") for name in adapter.tensors)  # the flips landed in the per-layer core
    torch.testing.assert_close(got, reference_logits(cfg, m_ref, flipped, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, reference_logits(cfg, m_ref, p_svd, ids), atol=1e-3)  # signs matter


def test_a_basis_of_another_subspace_is_refused(setup, capsys):
    tmp_path, cfg, m_ref, p_svd = setup
    gen = torch.Generator().manual_seed(4)
    other = {name: torch.linalg.qr(torch.randn(p.shape[1], RANK, generator=gen))[0].T.contiguous()
             for name, p in p_svd.items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    folder = write_reference(tmp_path / "ref", m_ref)
    assert run_import(tmp_path, cfg, folder, "--reference-basis", str(tmp_path / "other.safetensors")) == 2
    assert "spans another subspace" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pica-import-unpickled-marker",))


def test_the_weights_file_is_never_unpickled(setup, capsys):
    tmp_path, cfg, m_ref, _ = setup
    marker = "/tmp/pica-import-unpickled-marker"
    if os.path.exists(marker):
        os.remove(marker)
    folder = write_reference(tmp_path / "ref", m_ref)
    (folder / "pica_adapter.bin").write_bytes(pickle.dumps({"q_proj": _Boom()}))
    assert run_import(tmp_path, cfg, folder) == 2
    assert "is not a weights-only torch file" in capsys.readouterr().err and not os.path.exists(marker)


def test_a_keyword_matching_several_groups_is_refused(setup, capsys):
    tmp_path, cfg, m_ref, _ = setup
    folder = write_reference(tmp_path / "ref", m_ref)
    config = json.loads((folder / "pica_config.json").read_text())
    (folder / "pica_config.json").write_text(json.dumps({**config, "target_modules": ["proj"]}))
    torch.save({"proj": m_ref["q_proj"]}, folder / "pica_adapter.bin")
    assert run_import(tmp_path, cfg, folder) == 2
    assert "keyword 'proj' matches the layers of" in capsys.readouterr().err
